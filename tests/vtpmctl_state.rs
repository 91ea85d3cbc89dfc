//! `vtpmctl state inspect|verify` as an operator runs them: the real
//! binary, real files, exit codes as documented in the README.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{KdfParams, KdfPolicy, SealedPaths, SealedState, StateArchive};

const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const OTHER_GUEST: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASSPHRASE: &str = "s3cr3t-passphrase-never-printed";

fn seal(dir: &Path, generations: u8) -> SealedPaths {
    let paths = SealedPaths::new(dir.join("tpm.sealed"));
    let mut pass = SecretBuf::with_capacity(PASSPHRASE.len()).unwrap();
    pass.extend_from_slice(PASSPHRASE.as_bytes()).unwrap();
    let policy = KdfPolicy {
        params: KdfParams::new(1024, 1, 1).unwrap(),
        allow_weak: true,
    };
    let archive =
        |g: u8| StateArchive::from_entries([("tpm2-00.permall".to_owned(), vec![g; 64])]).unwrap();
    let spec = TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).unwrap();
    let mut state = SealedState::create(
        paths.clone(),
        GuestId::parse(GUEST).unwrap(),
        spec,
        &pass,
        &policy,
        &archive(1),
    )
    .unwrap();
    for g in 2..=generations {
        state.seal(&archive(g)).unwrap();
    }
    paths
}

fn vtpmctl(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The child may exit before reading (a usage error): a broken pipe is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn verify(file: &Path, guest: &str, passphrase: &str) -> Output {
    vtpmctl(
        &[
            "state",
            "verify",
            file.to_str().unwrap(),
            "--guest",
            guest,
            "--passphrase-file",
            "-",
            "--allow-weak-kdf",
            "--json",
        ],
        passphrase,
    )
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn inspect_shows_the_header_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let paths = seal(dir.path(), 3);

    let text = vtpmctl(&["state", "inspect", paths.current().to_str().unwrap()], "");
    let json = vtpmctl(
        &[
            "state",
            "inspect",
            "--json",
            paths.current().to_str().unwrap(),
        ],
        "",
    );

    assert_eq!(text.status.code(), Some(0));
    let shown = String::from_utf8(text.stdout.clone()).unwrap();
    assert!(
        shown.contains(GUEST) && shown.contains("generation      3"),
        "{shown}"
    );
    assert!(
        shown.contains("argon2id-passphrase, m=1024 KiB t=1 p=1"),
        "{shown}"
    );
    let value = json_of(&json);
    assert_eq!(value["guest"], GUEST);
    assert_eq!(value["generation"], 3);
    assert_eq!(value["tpm_version"], "2.0");
    assert_eq!(value["keyslots"].as_array().unwrap().len(), 1);
    for out in [&text, &json] {
        assert!(!String::from_utf8_lossy(&out.stdout).contains(PASSPHRASE));
    }
}

#[test]
fn verify_exit_codes_tell_each_outcome_apart() {
    let dir = tempfile::tempdir().unwrap();
    let paths = seal(dir.path(), 2);
    let file = paths.current();

    let ok = verify(file, GUEST, &format!("{PASSPHRASE}\n"));
    let wrong = verify(file, GUEST, "not it");
    let other = verify(file, OTHER_GUEST, PASSPHRASE);

    assert_eq!(
        (ok.status.code(), json_of(&ok)["result"].as_str()),
        (Some(0), Some("ok"))
    );
    assert_eq!(json_of(&ok)["generation"], 2);
    assert_eq!(wrong.status.code(), Some(3));
    assert_eq!(json_of(&wrong)["result"], "wrong-passphrase");
    assert_eq!(other.status.code(), Some(5));

    // Damage the current generation: the previous one stands in.
    let mut bytes = fs::read(file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(file, &bytes).unwrap();
    let fell_back = verify(file, GUEST, PASSPHRASE);
    assert_eq!(fell_back.status.code(), Some(1));
    assert_eq!(json_of(&fell_back)["generation"], 1);

    // Damage both: nothing opens.
    let mut prev = fs::read(paths.previous()).unwrap();
    prev[100] ^= 1;
    fs::write(paths.previous(), &prev).unwrap();
    let corrupt = verify(file, GUEST, PASSPHRASE);
    assert_eq!(corrupt.status.code(), Some(4));
    assert_eq!(json_of(&corrupt)["result"], "corrupt");
}

#[test]
fn a_file_that_is_not_sealed_state_is_reported_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("random");
    fs::write(&file, b"definitely not a sealed file").unwrap();

    let out = vtpmctl(&["state", "inspect", file.to_str().unwrap()], "");

    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));
}

#[test]
fn a_guest_id_that_is_a_path_is_a_usage_error() {
    let out = verify(Path::new("/nonexistent"), "../../etc", PASSPHRASE);
    assert_eq!(out.status.code(), Some(2));
}

/// The spec's step 0: what is at the sealed path must be a regular file,
/// opened without following a symlink and without blocking; anything else
/// is refused at once as `Io` (exit 6, "failed"), never read, never waited
/// on, never replaced, and no reason to fall back to `.prev`.
#[test]
fn a_fifo_a_directory_or_a_symlink_at_the_sealed_path_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Two generations: a `.prev` that opens is there, and must not be used.
    let paths = seal(dir.path(), 2);
    let real = dir.path().join("real.sealed");
    fs::rename(paths.current(), &real).unwrap();

    type Make<'a> = &'a dyn Fn(&Path);
    let cases: [(&str, Make); 3] = [
        ("a FIFO", &|p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        }),
        ("a directory", &|p| fs::create_dir(p).unwrap()),
        ("a symlink", &|p| {
            std::os::unix::fs::symlink(&real, p).unwrap()
        }),
    ];
    for (what, make) in cases {
        let path = paths.current();
        make(path);
        let kind = fs::symlink_metadata(path).unwrap().file_type();
        let began = std::time::Instant::now();

        let verified = verify(path, GUEST, PASSPHRASE);
        let inspected = vtpmctl(&["state", "inspect", "--json", path.to_str().unwrap()], "");

        assert!(
            began.elapsed() < std::time::Duration::from_secs(10),
            "{what}: blocked"
        );
        for out in [&verified, &inspected] {
            assert_eq!(out.status.code(), Some(6), "{what}: {out:?}");
            let value = json_of(out);
            assert_eq!(value["result"], "failed", "{what}: {value}");
            assert!(
                value["detail"]
                    .as_str()
                    .unwrap()
                    .contains("not a regular file"),
                "{what}: {value}"
            );
        }
        assert_eq!(
            fs::symlink_metadata(path).unwrap().file_type(),
            kind,
            "{what} was replaced"
        );
        let _ = fs::remove_file(path).or_else(|_| fs::remove_dir(path));
    }
}

/// The spec's limits: a passphrase is 1..=4096 bytes. The longest one (with
/// the trailing newline a file may add) is read and tried; one byte more,
/// or none, is refused, and with `--json` each says so on stdout as every
/// other failure does.
#[test]
fn passphrase_length_limits_answer_in_json_too() {
    let dir = tempfile::tempdir().unwrap();
    let paths = seal(dir.path(), 1);
    let file = paths.current();

    let longest = verify(file, GUEST, &format!("{}\n", "a".repeat(4096)));
    let too_long = verify(file, GUEST, &"a".repeat(4097));
    let empty = verify(file, GUEST, "\n");

    assert_eq!(longest.status.code(), Some(3), "{longest:?}");
    assert_eq!(json_of(&longest)["result"], "wrong-passphrase");
    for (what, out) in [("4097 bytes", &too_long), ("empty", &empty)] {
        assert_eq!(out.status.code(), Some(6), "{what}: {out:?}");
        let value = json_of(out);
        assert_eq!(value["result"], "failed", "{what}: {value}");
        assert_eq!(value["error"], "passphrase", "{what}: {value}");
    }
    assert!(
        json_of(&too_long)["detail"]
            .as_str()
            .unwrap()
            .contains("longer than 4096 bytes"),
        "{too_long:?}"
    );
}

/// The online commands too: a passphrase file that is too long is a local
/// failure (exit 6) that `--json` reports on stdout, before any connection.
#[test]
fn an_overlong_passphrase_file_is_a_json_error_for_online_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    fs::write(&pass, "a".repeat(5000)).unwrap();
    let socket = dir.path().join("none.sock");

    let out = vtpmctl(
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--json",
            "start",
            GUEST,
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
        "",
    );

    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let value = json_of(&out);
    assert_eq!(value["error"], "vtpmctl.Passphrase", "{value}");
    assert!(
        value["parameters"]["reason"]
            .as_str()
            .unwrap()
            .contains("longer than 4096 bytes"),
        "{value}"
    );
}
