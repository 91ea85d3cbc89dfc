//! docs/sealed-format.md against what vtpmd does: the statements of the
//! spec that a writer or reader of another implementation relies on,
//! checked on the real daemon, the real swtpm and real files, and an
//! outside reader (tests/outside_reader.py, written from the spec alone)
//! that must decode what vtpmd sealed and reach vtpmctl's verdicts.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use common::{Daemon, b64};
use serde_json::json;

const SPEC: &str = include_str!("../docs/sealed-format.md");
const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASS: &str = "correct horse battery staple";

/// The `--key` and `--migration-key` options of the real swtpm vtpmd
/// started are the ones the spec gives, word for word (the fd number
/// written `N`, and named where the spec says which one vtpmd uses).
#[test]
fn swtpm_gets_the_key_options_the_spec_gives() {
    let d = Daemon::start();
    d.create_guest(G, PASS);
    d.start_guest(G, PASS);
    let pids = common::swtpms_under(&d.runtime_dir);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    for option in ["--key", "--migration-key"] {
        let at = args
            .iter()
            .position(|a| a == option)
            .unwrap_or_else(|| panic!("swtpm has no {option}: {args:?}"));
        let value = &args[at + 1];
        let (fd, rest) = value
            .strip_prefix("fd=")
            .and_then(|v| v.split_once(','))
            .unwrap_or_else(|| panic!("{option} {value}"));
        assert!(fd.parse::<u32>().is_ok(), "{option} {value}");
        let documented = format!("`{option} fd=N,{rest}`");
        assert!(
            SPEC.contains(&documented),
            "the spec does not give swtpm's actual option {documented}"
        );
        let paragraph = &SPEC[SPEC.find(&documented).unwrap_or(0)..];
        let paragraph = &paragraph[..paragraph.find("\n\n").unwrap_or(paragraph.len())];
        assert!(
            paragraph.contains(&format!("(vtpmd uses {fd})")),
            "the spec names another fd than {fd} for {option}"
        );
    }
}

/// Step 10 and "Guest binding": a file moved to another guest's path is
/// refused as `GuestMismatch`, an answer about a sound file, not damage;
/// the API says so with its own error, as `vtpmctl state verify` does.
#[test]
fn a_sealed_file_moved_to_another_guest_is_a_guest_mismatch_not_corruption() {
    const OTHER: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
    let d = Daemon::start();
    d.create_guest(G, PASS);
    d.create_guest(OTHER, PASS);
    std::fs::copy(d.sealed_file(G), d.sealed_file(OTHER)).unwrap();

    let refused = d
        .client()
        .manager("Start", json!({"guest": OTHER, "passphrase": b64(PASS)}));

    let remote = common::assert_error(refused, "GuestMismatch");
    assert_eq!(remote.parameters["guest"], OTHER, "{remote:?}");
    assert_eq!(remote.parameters["found"], G, "{remote:?}");
    assert_eq!(d.guest_status(OTHER)["state"], "stopped");
    // The daemon's own interface description lists the error.
    let description = d
        .client()
        .call(
            "org.varlink.service.GetInterfaceDescription",
            json!({"interface": "io.vtpmd.Manager"}),
        )
        .unwrap();
    assert!(
        description["description"]
            .as_str()
            .unwrap()
            .contains("error GuestMismatch (guest: string, found: string)"),
        "{description}"
    );
}

fn sha256_of(path: &std::path::Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// Makes the guest's state change (a file written into its runtime
/// directory) and waits for the new generation: afterwards `.prev` exists.
fn write_a_second_generation(d: &Daemon, guest: &str) {
    let generation = d.guest_status(guest)["generation"].as_u64().unwrap();
    std::fs::write(d.runtime_dir.join(guest).join("extra"), b"second").unwrap();
    d.wait_generation_above(guest, generation, std::time::Duration::from_secs(20));
}

/// "A file that fails to decode is left as it is": Rekey with a `.prev`
/// whose body is damaged does not write the new keyslot into it, and says
/// so in its reply.
#[test]
fn rekey_leaves_a_damaged_previous_generation_untouched_and_reports_it() {
    let d = Daemon::start();
    d.create_guest(G, PASS);
    d.start_guest(G, PASS);
    write_a_second_generation(&d, G);
    d.client().manager("Stop", json!({"guest": G})).unwrap();
    let prev = d.sealed_file(G).with_extension("sealed.prev");
    let mut bytes = std::fs::read(&prev).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&prev, &bytes).unwrap();
    let damaged = sha256_of(&prev);

    let reply = d
        .client()
        .manager(
            "Rekey",
            json!({"guest": G, "passphrase": b64(PASS), "new_passphrase": b64("new one")}),
        )
        .unwrap();

    assert_eq!(sha256_of(&prev), damaged, "the damaged .prev was rewritten");
    let left = reply["left_as_is"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"));
    assert_eq!(left.len(), 1, "{reply}");
    assert!(
        left[0].as_str().unwrap().contains(prev.to_str().unwrap()),
        "{reply}"
    );
    assert_eq!(d.start_guest(G, "new one")["state"], "running");
}

/// The limits table's lower bounds, on real files: the smallest file the
/// vault writes (an empty archive) and a smaller one that passes every
/// header check but cannot open.
#[test]
fn the_limits_tables_lower_bounds_are_what_the_code_does() {
    use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
    use vtpmd::secret::SecretBuf;
    use vtpmd::vault::{KdfParams, KdfPolicy, SealedPaths, SealedState, StateArchive, VaultError};

    let dir = tempfile::tempdir().unwrap();
    let paths = SealedPaths::new(dir.path().join("tpm.sealed"));
    let mut pass = SecretBuf::with_capacity(PASS.len()).unwrap();
    pass.extend_from_slice(PASS.as_bytes()).unwrap();
    let policy = KdfPolicy {
        params: KdfParams::new(8, 1, 1).unwrap(),
        allow_weak: true,
    };
    let guest = GuestId::parse(G).unwrap();
    let spec = TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).unwrap();
    let empty = StateArchive::from_entries(Vec::new()).unwrap();
    SealedState::create(paths.clone(), guest, spec, &pass, &policy, &empty).unwrap();

    let smallest = std::fs::read(paths.current()).unwrap();
    let info = vtpmd::vault::inspect(paths.current()).unwrap();
    assert_eq!(
        (smallest.len(), info.header_bytes, info.body_bytes),
        (241, 223, 18)
    );
    let opened = SealedState::open(paths.clone(), guest, &pass, &policy).unwrap();
    assert_eq!(opened.archive, empty);

    // body_len 16: the tag alone. Header-valid, not openable.
    let mut tiny = smallest[..239].to_vec();
    tiny[80..84].copy_from_slice(&16u32.to_be_bytes());
    use sha2::Digest;
    let checksum = sha2::Sha256::digest(&tiny[..191]);
    tiny[191..223].copy_from_slice(&checksum);
    let tiny_path = dir.path().join("tiny.sealed");
    std::fs::write(&tiny_path, &tiny).unwrap();
    assert_eq!(vtpmd::vault::inspect(&tiny_path).unwrap().body_bytes, 16);
    let refused = SealedState::open(SealedPaths::new(&tiny_path), guest, &pass, &policy);
    assert!(
        matches!(refused, Err(VaultError::Corrupt { .. })),
        "{:?}",
        refused.map(|_| ())
    );

    for bound in [
        "| 16..=16,777,232",
        "| 18..=16,777,232",
        "| 239..=16,778,197 bytes",
        "| 241..=16,778,197 bytes",
        "| 2..=16,777,216",
        "| 1..=4096 bytes",
    ] {
        assert!(SPEC.contains(bound), "the limits table lacks {bound:?}");
    }
}
