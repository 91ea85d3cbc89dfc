//! Probing and provisioning against the real swtpm 0.7.1: the state
//! swtpm_setup makes is a working TPM, carries certificates from vtpmd's own
//! local CA when asked, and is encrypted with the key vtpmd handed over.
//! Needs swtpm, swtpm-tools, gnutls-bin and tpm2-tools installed.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use vtpmd::protocol::TpmVersion;
use vtpmd::secret::SecretBuf;
use vtpmd::swtpm::probe::{self, Binaries, ProbeError};
use vtpmd::swtpm::provision::{
    LocalCa, PcrBanks, ProvisionError, ProvisionReport, ProvisionSpec, provision,
};

fn key() -> SecretBuf {
    SecretBuf::random(32).unwrap()
}

fn spec(version: TpmVersion, certs: bool) -> ProvisionSpec {
    ProvisionSpec {
        ek_certificate: certs,
        ..ProvisionSpec::new(version)
    }
}

/// A fresh empty state directory inside `root`.
fn state_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir(&dir).unwrap();
    dir
}

fn provision_ok(
    dir: &Path,
    key: &SecretBuf,
    spec: &ProvisionSpec,
    ca: Option<&LocalCa>,
) -> ProvisionReport {
    match provision(&Binaries::default(), dir, key, spec, ca) {
        Ok(report) => report,
        Err(err) => panic!("provisioning failed: {}", vtpmd::error_chain::chain(&err)),
    }
}

/// One swtpm on a provisioned state, killed on drop.
struct Swtpm {
    child: Child,
    sock: PathBuf,
}

enum Key<'a> {
    None,
    Hex(&'a SecretBuf),
}

impl Swtpm {
    /// Starts swtpm (already "powered on": `not-need-init,startup-clear`)
    /// and waits until its data socket accepts; or returns its log if it
    /// exits first.
    fn start(dir: &Path, version: TpmVersion, key: Key<'_>) -> Result<Swtpm, String> {
        let (child, sock, log) = Self::spawn(dir, version, key);
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let text = fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("swtpm exited ({status}): {text}"));
            }
            if UnixStream::connect(&sock).is_ok() {
                return Ok(Swtpm { child, sock });
            }
            assert!(Instant::now() < deadline, "swtpm did not listen in time");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts swtpm expecting it to fail (it may listen briefly before it
    /// loads the state, so only its exit counts) and returns its log.
    fn start_fails(dir: &Path, version: TpmVersion, key: Key<'_>) -> String {
        let (mut child, _, log) = Self::spawn(dir, version, key);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success(), "swtpm exited 0");
                return fs::read_to_string(&log).unwrap_or_default();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("swtpm kept running on a state it should not open");
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn spawn(dir: &Path, version: TpmVersion, key: Key<'_>) -> (Child, PathBuf, PathBuf) {
        let work = dir.parent().unwrap();
        let name = dir.file_name().unwrap().to_str().unwrap();
        let sock = work.join(format!("{name}.sock"));
        let log = work.join(format!("{name}.swtpm.log"));
        let _ = fs::remove_file(&log);
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket");
        if version == TpmVersion::V2_0 {
            cmd.arg("--tpm2");
        }
        cmd.arg("--tpmstate")
            .arg(format!("dir={}", dir.display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", sock.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}.ctrl", sock.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .arg("--log")
            .arg(format!("file={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Key::Hex(key) = key {
            // The test hands the key over in a file (0600, in its own temp
            // dir); vtpmd itself only ever uses pipes.
            let key_file = work.join(format!("{name}.key"));
            let hex: String = key
                .expose_secret()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            fs::write(&key_file, hex).unwrap();
            fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
            cmd.arg("--key").arg(format!(
                "file={},format=hex,mode=aes-256-cbc",
                key_file.display()
            ));
        }
        (cmd.spawn().unwrap(), sock, log)
    }

    fn tpm2(&self, args: &[&str]) -> Output {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env(
                "TPM2TOOLS_TCTI",
                format!("swtpm:path={}", self.sock.display()),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A raw command on the data socket, returning the response.
    fn raw(&self, command: &[u8]) -> Vec<u8> {
        let mut stream = UnixStream::connect(&self.sock).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(command).unwrap();
        let mut header = [0u8; 10];
        stream.read_exact(&mut header).unwrap();
        let len = usize::try_from(u32::from_be_bytes(header[2..6].try_into().unwrap())).unwrap();
        let mut rest = vec![0u8; len - header.len()];
        stream.read_exact(&mut rest).unwrap();
        [header.to_vec(), rest].concat()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The serial number of a DER certificate (Certificate → TBSCertificate →
/// optional [0] version → INTEGER serial).
fn der_serial(der: &[u8]) -> Vec<u8> {
    fn header(der: &[u8]) -> (u8, usize, usize) {
        let tag = der[0];
        let first = der[1];
        if first < 0x80 {
            return (tag, 2, usize::from(first));
        }
        let n = usize::from(first & 0x7f);
        let len = der[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
        (tag, 2 + n, len)
    }
    let (tag, hdr, _) = header(der);
    assert_eq!(tag, 0x30);
    let tbs = &der[hdr..];
    let (tag, hdr, _) = header(tbs);
    assert_eq!(tag, 0x30);
    let mut rest = &tbs[hdr..];
    let (tag, hdr, len) = header(rest);
    if tag == 0xa0 {
        rest = &rest[hdr + len..];
    }
    let (tag, hdr, len) = header(rest);
    assert_eq!(tag, 0x02, "serial is an INTEGER");
    rest[hdr..hdr + len].to_vec()
}

fn read_ek_cert(tpm: &Swtpm, out: &Path) -> Vec<u8> {
    tpm.tpm2(&["tpm2_nvread", "0x1c00002", "-o", out.to_str().unwrap()]);
    fs::read(out).unwrap()
}

#[test]
fn tpm2_without_certificates_is_a_usable_tpm() {
    let root = tempfile::tempdir().unwrap();
    let dir = state_dir(root.path(), "tpm2");
    let key = key();

    let report = provision_ok(&dir, &key, &spec(TpmVersion::V2_0, false), None);
    eprintln!(
        "swtpm_setup TPM 2.0 without certificates: {:?}",
        report.elapsed
    );

    let permall = dir.join("tpm2-00.permall");
    assert_eq!(report.state_file, permall);
    assert_eq!(
        fs::metadata(&permall).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let tpm = Swtpm::start(&dir, TpmVersion::V2_0, Key::Hex(&key)).unwrap();
    let out = tpm.tpm2(&["tpm2_getrandom", "8", "--hex"]);
    let random = String::from_utf8(out.stdout).unwrap();
    assert_eq!(random.trim().len(), 16, "{random:?}");
    assert!(random.trim().chars().all(|c| c.is_ascii_hexdigit()));
    // No EK was asked for, and none was made.
    let handles = tpm.tpm2(&["tpm2_getcap", "handles-persistent"]);
    assert!(!String::from_utf8_lossy(&handles.stdout).contains("0x81010001"));
}

#[test]
fn tpm2_state_is_encrypted_with_the_given_key() {
    let root = tempfile::tempdir().unwrap();
    let dir = state_dir(root.path(), "tpm2");
    let key = key();
    provision_ok(&dir, &key, &spec(TpmVersion::V2_0, false), None);

    let err = Swtpm::start_fails(&dir, TpmVersion::V2_0, Key::None);
    assert!(err.contains("Could not find plain data"), "{err}");

    let other = self::key();
    let err = Swtpm::start_fails(&dir, TpmVersion::V2_0, Key::Hex(&other));
    assert!(err.contains("Verification of HMAC failed"), "{err}");

    // Plain libtpms state starts with its blob header in clear; the
    // encrypted one must not contain the PCR bank names either.
    let permall = fs::read(dir.join("tpm2-00.permall")).unwrap();
    assert!(!permall.windows(6).any(|w| w == b"sha256"));
}

#[test]
fn tpm2_with_certificates_has_an_ek_and_its_certificate() {
    let root = tempfile::tempdir().unwrap();
    let ca = LocalCa::open(&root.path().join("ca")).unwrap();
    let key = key();

    let first_dir = state_dir(root.path(), "first");
    let first = provision_ok(&first_dir, &key, &spec(TpmVersion::V2_0, true), Some(&ca));
    eprintln!(
        "swtpm_setup TPM 2.0 with certificates, creating the CA: {:?}",
        first.elapsed
    );
    let dir = state_dir(root.path(), "tpm2");
    let report = provision_ok(&dir, &key, &spec(TpmVersion::V2_0, true), Some(&ca));
    eprintln!(
        "swtpm_setup TPM 2.0 with certificates: {:?}",
        report.elapsed
    );

    let tpm = Swtpm::start(&dir, TpmVersion::V2_0, Key::Hex(&key)).unwrap();
    let cert_file = root.path().join("ek.der");
    let cert = read_ek_cert(&tpm, &cert_file);
    assert_eq!(cert[..2], [0x30, 0x82], "a DER SEQUENCE");
    let handles = tpm.tpm2(&["tpm2_getcap", "handles-persistent"]);
    let handles = String::from_utf8(handles.stdout).unwrap();
    assert!(handles.contains("0x81010001"), "{handles}");
    assert!(handles.contains("0x81010016"), "{handles}");

    if let Ok(out) = Command::new("openssl")
        .args(["x509", "-inform", "der", "-noout", "-issuer", "-in"])
        .arg(&cert_file)
        .output()
    {
        let issuer = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && issuer.contains("swtpm-localca"),
            "{issuer}"
        );
    }

    // The CA is vtpmd's own and private.
    assert!(ca.issuer_certificate().is_file());
    assert_eq!(
        fs::metadata(ca.dir()).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for entry in fs::read_dir(ca.dir()).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", entry.path().display());
    }
}

#[test]
fn other_pcr_banks_are_activated_on_request() {
    let root = tempfile::tempdir().unwrap();
    let dir = state_dir(root.path(), "tpm2");
    let key = key();
    let spec = ProvisionSpec {
        pcr_banks: PcrBanks::parse("sha1,sha384").unwrap(),
        ..ProvisionSpec::new(TpmVersion::V2_0)
    };
    let report = provision_ok(&dir, &key, &spec, None);
    assert!(
        report
            .log
            .contains("Successfully activated PCR banks sha1,sha384"),
        "{}",
        report.log
    );
}

#[test]
fn tpm12_without_certificates_is_usable_and_encrypted() {
    let root = tempfile::tempdir().unwrap();
    let dir = state_dir(root.path(), "tpm12");
    let key = key();

    let report = provision_ok(&dir, &key, &spec(TpmVersion::V1_2, false), None);
    eprintln!(
        "swtpm_setup TPM 1.2 without certificates: {:?}",
        report.elapsed
    );
    assert!(dir.join("tpm-00.permall").is_file());

    let tpm = Swtpm::start(&dir, TpmVersion::V1_2, Key::Hex(&key)).unwrap();
    // TPM_GetRandom(8): tag 00c4 (RSP_COMMAND), result 0, 8 bytes.
    let rsp = tpm.raw(&[0x00, 0xc1, 0, 0, 0, 0x0e, 0, 0, 0, 0x46, 0, 0, 0, 8]);
    assert_eq!(rsp[..2], [0x00, 0xc4]);
    assert_eq!(rsp[6..10], [0, 0, 0, 0], "TPM_SUCCESS");
    assert_eq!(rsp.len(), 10 + 4 + 8);
    drop(tpm);

    let err = Swtpm::start_fails(&dir, TpmVersion::V1_2, Key::None);
    assert!(err.contains("Could not find plain data"), "{err}");
}

#[test]
fn tpm12_with_certificates_works() {
    let root = tempfile::tempdir().unwrap();
    let ca = LocalCa::open(&root.path().join("ca")).unwrap();
    let dir = state_dir(root.path(), "tpm12");
    let report = provision_ok(&dir, &key(), &spec(TpmVersion::V1_2, true), Some(&ca));
    eprintln!(
        "swtpm_setup TPM 1.2 with certificates (and a new CA): {:?}",
        report.elapsed
    );
    assert!(
        report.log.contains("Successfully created EK certificate"),
        "{}",
        report.log
    );
}

#[test]
fn parallel_provisioning_shares_one_ca_and_gets_distinct_serials() {
    let root = tempfile::tempdir().unwrap();
    let ca = LocalCa::open(&root.path().join("ca")).unwrap();
    let dirs: Vec<PathBuf> = (0..4)
        .map(|i| state_dir(root.path(), &format!("g{i}")))
        .collect();
    let keys: Vec<SecretBuf> = (0..4).map(|_| key()).collect();

    let started = Instant::now();
    thread::scope(|s| {
        for (dir, key) in dirs.iter().zip(&keys) {
            let ca = &ca;
            s.spawn(move || provision_ok(dir, key, &spec(TpmVersion::V2_0, true), Some(ca)));
        }
    });
    eprintln!(
        "4 parallel TPM 2.0 provisionings with certificates: {:?}",
        started.elapsed()
    );

    let mut serials = Vec::new();
    for (i, (dir, key)) in dirs.iter().zip(&keys).enumerate() {
        let tpm = Swtpm::start(dir, TpmVersion::V2_0, Key::Hex(key)).unwrap();
        let cert = read_ek_cert(&tpm, &root.path().join(format!("ek{i}.der")));
        serials.push(der_serial(&cert));
    }
    let mut distinct = serials.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{serials:?}");
}

#[test]
fn a_missing_state_dir_fails_with_swtpm_setups_message() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("missing");
    let err = provision(
        &Binaries::default(),
        &dir,
        &key(),
        &spec(TpmVersion::V2_0, false),
        None,
    )
    .expect_err("no directory");
    assert!(matches!(err, ProvisionError::SwtpmSetup { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("cannot access directory"), "{text}");
    assert!(text.contains(&dir.display().to_string()), "{text}");
    assert!(
        text.contains("its log:\n") && text.lines().count() > 1,
        "{text}"
    );
}

#[test]
fn existing_state_is_refused_and_left_alone() {
    let root = tempfile::tempdir().unwrap();
    let dir = state_dir(root.path(), "tpm2");
    let key = key();
    provision_ok(&dir, &key, &spec(TpmVersion::V2_0, false), None);
    let before = fs::read(dir.join("tpm2-00.permall")).unwrap();

    let err = provision(
        &Binaries::default(),
        &dir,
        &self::key(),
        &spec(TpmVersion::V2_0, false),
        None,
    )
    .expect_err("state exists");
    let text = err.to_string();
    assert!(matches!(err, ProvisionError::SwtpmSetup { .. }), "{err:?}");
    assert!(text.contains("Found existing TPM state"), "{text}");
    assert_eq!(fs::read(dir.join("tpm2-00.permall")).unwrap(), before);
    // ...and it still opens with the first key.
    Swtpm::start(&dir, TpmVersion::V2_0, Key::Hex(&key)).unwrap();
}

#[test]
fn a_missing_binary_is_reported_with_its_package() {
    let bins = Binaries {
        swtpm: "/nonexistent/bin/swtpm".into(),
        ..Binaries::default()
    };
    let err = probe::probe(&bins).expect_err("no swtpm");
    assert!(
        matches!(
            &err,
            ProbeError::NotFound {
                package: "swtpm",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("apt-get install swtpm swtpm-tools"),
        "{err}"
    );

    let bins = Binaries {
        swtpm_setup: "/nonexistent/bin/swtpm_setup".into(),
        ..Binaries::default()
    };
    let err = probe::probe(&bins).expect_err("no swtpm_setup");
    assert!(
        matches!(
            &err,
            ProbeError::NotFound {
                package: "swtpm-tools",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn the_installed_swtpm_serves_both_versions() {
    let started = Instant::now();
    let support = probe::probe(&Binaries::default()).unwrap();
    eprintln!("probe: {:?}", started.elapsed());
    assert!(support.supports(TpmVersion::V1_2));
    assert!(support.supports(TpmVersion::V2_0));
    assert_eq!(
        support.traits(),
        ["COMPUTE_SECURITY_TPM_1_2", "COMPUTE_SECURITY_TPM_2_0"]
    );
    assert!(support.rsa_key_sizes.contains(&2048), "{support:?}");
    assert!(support.can_create_certificates(), "{support:?}");
}

#[test]
fn a_hung_binary_does_not_hang_the_probe() {
    let root = tempfile::tempdir().unwrap();
    let fake = root.path().join("swtpm");
    fs::write(&fake, "#!/bin/sh\nexec sleep 600\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let bins = Binaries {
        swtpm: fake,
        ..Binaries::default()
    };
    let started = Instant::now();
    let err = probe::probe_with_timeout(&bins, Duration::from_millis(300)).expect_err("hangs");
    assert!(matches!(err, ProbeError::TimedOut { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn garbage_capabilities_are_a_typed_error_quoting_the_output() {
    let root = tempfile::tempdir().unwrap();
    let fake = root.path().join("swtpm");
    fs::write(&fake, "#!/bin/sh\necho 'TPM emulator version 0.5.2'\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let bins = Binaries {
        swtpm: fake,
        ..Binaries::default()
    };
    let err = probe::probe(&bins).expect_err("garbage");
    assert!(matches!(err, ProbeError::BadCapabilities { .. }), "{err:?}");
    assert!(
        err.to_string().contains("TPM emulator version 0.5.2"),
        "{err}"
    );

    let failing = root.path().join("swtpm_setup");
    fs::write(
        &failing,
        "#!/bin/sh\necho \"unrecognized option '--print-capabilities'\" >&2\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&failing, fs::Permissions::from_mode(0o755)).unwrap();
    let bins = Binaries {
        swtpm_setup: failing,
        ..Binaries::default()
    };
    let err = probe::probe(&bins).expect_err("fails");
    assert!(matches!(err, ProbeError::Failed { .. }), "{err:?}");
    assert!(err.to_string().contains("unrecognized option"), "{err}");
}
