//! docs/sealed-format.md is enough to read vtpmd's files: an outside reader
//! written from the spec alone (tests/outside_reader.py, Python with
//! argon2-cffi and cryptography) decodes a sealed file the real daemon made
//! from real swtpm_setup state, gets the archive the vault gets, and on one
//! test vector per case of the decoding procedure reaches the verdict
//! `vtpmctl state verify` reaches (and the step the spec says).
//!
//! The vectors are generated here rather than kept as files under
//! tests/vectors/: each is the daemon's current output with one edit the
//! spec names (a byte, a length, a recomputed checksum), so they follow the
//! real producer instead of freezing an old one, carry fresh salts and
//! keys, and say in code which rule each one breaks, where a directory of
//! binary files would say nothing in review. Archive-level vectors need the
//! data key: the Python side writes them (`seal-archive`), per the spec's
//! encoding rules, which tests the spec from the writer's side too.
//!
//! /usr/bin/python3 on purpose: a `python3` first on PATH may be another
//! interpreter without the Debian modules. Without them this test fails
//! (CI installs them: .ci/run), it does not skip.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, b64};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use vtpmd::protocol::GuestId;
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{KdfParams, KdfPolicy, SealedPaths, SealedState, StateArchive};

const PYTHON: &str = "/usr/bin/python3";
const READER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/outside_reader.py");
const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const OTHER: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASS: &str = "correct horse battery staple";

/// Fails, naming the packages, unless /usr/bin/python3 has what the reader
/// imports.
fn require_python_modules() {
    let probe = Command::new(PYTHON)
        .args([
            "-c",
            "import argon2.low_level, cryptography.hazmat.primitives.ciphers.aead, \
             cryptography.hazmat.primitives.kdf.hkdf",
        ])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{PYTHON} lacks the outside reader's modules ({}): apt-get install python3 \
             python3-argon2 python3-cryptography (.ci/run installs them)",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run {PYTHON} ({e}): apt-get install python3 python3-argon2 \
             python3-cryptography (.ci/run installs them)"
        ),
    }
}

fn secret(text: &[u8]) -> SecretBuf {
    let mut buf = SecretBuf::with_capacity(text.len()).unwrap();
    buf.extend_from_slice(text).unwrap();
    buf
}

/// The daemon's test parameters are below the floor, so both readers are
/// told to accept them, except where the vector is about that.
fn weak_policy() -> KdfPolicy {
    KdfPolicy {
        params: KdfParams::new(64, 1, 1).unwrap(),
        allow_weak: true,
    }
}

/// A sealed file of guest `G` as the real daemon leaves it: created (its
/// swtpm_setup state), run, written to, stopped: generation 2 or more.
fn sealed_by_the_daemon() -> Vec<u8> {
    let d = Daemon::start();
    d.client()
        .manager(
            "Create",
            json!({"guest": G, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    d.start_guest(G, PASS);
    let generation = d.guest_status(G)["generation"].as_u64().unwrap();
    fs::write(d.runtime_dir.join(G).join("extra"), b"a second generation").unwrap();
    d.wait_generation_above(G, generation, Duration::from_secs(20));
    d.client().manager("Stop", json!({"guest": G})).unwrap();
    fs::read(d.sealed_file(G)).unwrap()
}

struct Judged {
    python: Value,
    vtpmctl: Value,
}

impl Judged {
    fn python_verdict(&self) -> &str {
        self.python["verdict"].as_str().unwrap()
    }

    /// vtpmctl's answer in the spec's words: "ok", or its `error`.
    fn vtpmctl_verdict(&self) -> &str {
        match self.vtpmctl["result"].as_str() {
            Some("ok") => "ok",
            _ => self.vtpmctl["error"].as_str().unwrap_or("?"),
        }
    }
}

/// Lays `file` alone (no `.prev` to fall back to) in a fresh directory and
/// has both readers open it.
struct Bench {
    root: tempfile::TempDir,
    count: usize,
}

/// What is at the sealed path.
enum At<'a> {
    Bytes(&'a [u8]),
    Nothing,
    Fifo,
}

impl Bench {
    fn new() -> Self {
        Self {
            root: tempfile::tempdir().unwrap(),
            count: 0,
        }
    }

    fn fresh_dir(&mut self) -> PathBuf {
        self.count += 1;
        let dir = self.root.path().join(format!("case{}", self.count));
        fs::create_dir(&dir).unwrap();
        dir
    }

    fn judge(&mut self, at: At<'_>, guest: &str, pass: &[u8], allow_weak: bool) -> Judged {
        let dir = self.fresh_dir();
        let file = dir.join("tpm.sealed");
        match at {
            At::Bytes(bytes) => fs::write(&file, bytes).unwrap(),
            At::Nothing => {}
            At::Fifo => {
                nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
            }
        }
        let pass_file = dir.join("passphrase");
        fs::write(&pass_file, pass).unwrap();
        let python = python(&["open"], &file, guest, &pass_file, allow_weak, &[]);
        let mut args = vec![
            "state".to_owned(),
            "verify".to_owned(),
            file.to_str().unwrap().to_owned(),
            "--guest".to_owned(),
            guest.to_owned(),
            "--passphrase-file".to_owned(),
            pass_file.to_str().unwrap().to_owned(),
            "--json".to_owned(),
        ];
        if allow_weak {
            args.push("--allow-weak-kdf".to_owned());
        }
        let out = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
            .args(&args)
            .output()
            .unwrap();
        let vtpmctl: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "vtpmctl printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Judged { python, vtpmctl }
    }

    /// The Python writer's next generation of `file` with `archive` as its
    /// body's plaintext, byte for byte.
    fn python_sealed(&mut self, file: &[u8], archive: &[u8]) -> Vec<u8> {
        let dir = self.fresh_dir();
        let (src, arch, out, pass) = (
            dir.join("src.sealed"),
            dir.join("archive"),
            dir.join("out.sealed"),
            dir.join("passphrase"),
        );
        fs::write(&src, file).unwrap();
        fs::write(&arch, archive).unwrap();
        fs::write(&pass, PASS).unwrap();
        let extra = [
            "--archive",
            arch.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        python(&["seal-archive"], &src, G, &pass, true, &extra);
        fs::read(&out).unwrap()
    }
}

fn python(
    command: &[&str],
    file: &Path,
    guest: &str,
    pass_file: &Path,
    allow_weak: bool,
    extra: &[&str],
) -> Value {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(READER)
        .args(command)
        .arg(file)
        .args(["--guest", guest, "--passphrase-file"])
        .arg(pass_file)
        .args(extra);
    if allow_weak {
        cmd.arg("--allow-weak");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "outside_reader.py {command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The checksum made right for the keyslot count in the file (step 6), so
/// that an edit reaches the step behind it.
fn fix_checksum(bytes: &mut [u8]) {
    let h = 117 + 106 * usize::from(bytes[84]);
    let sum = Sha256::digest(&bytes[..h - 32]);
    bytes[h - 32..h].copy_from_slice(&sum);
}

fn edited(base: &[u8], edit: impl FnOnce(&mut Vec<u8>), checksum: bool) -> Vec<u8> {
    let mut bytes = base.to_vec();
    edit(&mut bytes);
    if checksum {
        fix_checksum(&mut bytes);
    }
    bytes
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// An archive of `(name, data)` entries in the order given, encoded as the
/// spec's grammar says, however wrong the entries are.
fn archive_bytes(count: u16, entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = count.to_be_bytes().to_vec();
    for (name, data) in entries {
        out.push(u8::try_from(name.len()).unwrap());
        out.extend_from_slice(name);
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
    }
    out
}

fn entries_of(archive: &StateArchive) -> Value {
    archive
        .entries()
        .iter()
        .map(|e| {
            json!({
                "name": e.name(),
                "len": e.data().len(),
                "sha256": hex(&Sha256::digest(e.data())),
            })
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_outside_reader_decodes_what_vtpmd_sealed_and_agrees_with_vtpmctl_on_every_case() {
    require_python_modules();
    let base = sealed_by_the_daemon();
    let mut bench = Bench::new();

    // The real file: the outside reader's archive is the vault's.
    let dir = bench.fresh_dir();
    let copy = dir.join("tpm.sealed");
    fs::write(&copy, &base).unwrap();
    let opened = SealedState::open(
        SealedPaths::new(&copy),
        GuestId::parse(G).unwrap(),
        &secret(PASS.as_bytes()),
        &weak_policy(),
    )
    .unwrap();
    let ok = bench.judge(At::Bytes(&base), G, PASS.as_bytes(), true);
    assert_eq!(ok.python_verdict(), "ok", "{}", ok.python);
    assert_eq!(ok.vtpmctl_verdict(), "ok", "{}", ok.vtpmctl);
    assert_eq!(ok.python["entries"], entries_of(&opened.archive));
    assert!(
        opened.archive.get("tpm2-00.permall").is_some(),
        "{:?}",
        opened.archive
    );
    assert_eq!(
        ok.python["generation"], ok.vtpmctl["generation"],
        "{} {}",
        ok.python, ok.vtpmctl
    );
    assert_eq!(ok.python["generation"], opened.state.generation());
    // The swtpm state key the spec derives is the one vtpmd derives.
    let key = opened.state.swtpm_state_key().unwrap();
    assert_eq!(
        ok.python["swtpm_key_sha256"],
        hex(&Sha256::digest(secrecy::ExposeSecret::expose_secret(&key)))
    );

    // More keyslots: a weak one, then one with the real default parameters
    // (RFC 9106's second option), which a reader without the weak switch
    // reaches by skipping the weak ones.
    let mut state = opened.state;
    state
        .add_passphrase(&secret(b"second"), &weak_policy())
        .unwrap();
    state
        .add_passphrase(&secret(b"strong"), &KdfPolicy::default())
        .unwrap();
    let three_slots = fs::read(&copy).unwrap();
    let second = bench.judge(At::Bytes(&three_slots), G, b"second", true);
    assert_eq!(
        (second.python_verdict(), second.python["keyslot"].as_u64()),
        ("ok", Some(1)),
        "{}",
        second.python
    );
    assert_eq!(second.vtpmctl_verdict(), "ok");
    let strong = bench.judge(At::Bytes(&three_slots), G, b"strong", false);
    assert_eq!(
        (strong.python_verdict(), strong.python["keyslot"].as_u64()),
        ("ok", Some(2)),
        "{}",
        strong.python
    );
    assert_eq!(strong.vtpmctl_verdict(), "ok", "{}", strong.vtpmctl);

    let n = usize::from(base[84]);
    assert_eq!(n, 1, "the daemon's file has one keyslot");
    let h = 117 + 106 * n;
    let slot = 85;
    let p = PASS.as_bytes();
    let mut padded = base.clone();
    padded.resize(16_778_198, 0);
    let mut newer_padded = padded.clone();
    newer_padded[9] = 3;
    let long_pass = vec![b'a'; 4097];

    // (what, bytes, guest, passphrase, allow weak, verdict, step)
    type Vector<'a> = (&'a str, At<'a>, &'a str, &'a [u8], bool, &'a str, u64);
    type Edited<'a> = (&'a str, Vec<u8>, &'a str, &'a [u8], bool, &'a str, u64);
    let header_vectors: Vec<Edited> = vec![
        (
            "step 1: 5 bytes",
            base[..5].to_vec(),
            G,
            p,
            true,
            "corrupt",
            1,
        ),
        (
            "step 1: bad magic",
            edited(&base, |b| b[0] ^= 0x20, false),
            G,
            p,
            true,
            "corrupt",
            1,
        ),
        (
            "step 2: no version",
            base[..9].to_vec(),
            G,
            p,
            true,
            "corrupt",
            2,
        ),
        (
            "step 2: version 3",
            edited(&base, |b| b[9] = 3, false),
            G,
            p,
            true,
            "unsupported-version",
            2,
        ),
        (
            "step 2: version 3, oversized",
            newer_padded,
            G,
            p,
            true,
            "unsupported-version",
            2,
        ),
        ("step 3: oversized", padded, G, p, true, "corrupt", 3),
        (
            "step 4: 84 bytes",
            base[..84].to_vec(),
            G,
            p,
            true,
            "corrupt",
            4,
        ),
        (
            "step 4: 0 keyslots",
            edited(&base, |b| b[84] = 0, false),
            G,
            p,
            true,
            "corrupt",
            4,
        ),
        (
            "step 4: 9 keyslots",
            edited(&base, |b| b[84] = 9, false),
            G,
            p,
            true,
            "corrupt",
            4,
        ),
        (
            "step 5: header cut",
            base[..h - 1].to_vec(),
            G,
            p,
            true,
            "corrupt",
            5,
        ),
        (
            "step 6: checksum",
            edited(&base, |b| b[h - 1] ^= 1, false),
            G,
            p,
            true,
            "corrupt",
            6,
        ),
        (
            "step 6: slot salt",
            edited(&base, |b| b[slot + 20] ^= 1, false),
            G,
            p,
            true,
            "corrupt",
            6,
        ),
        (
            "step 6: count 2",
            edited(&base, |b| b[84] = 2, false),
            G,
            p,
            true,
            "corrupt",
            6,
        ),
        (
            "step 7: TPM version 3",
            edited(&base, |b| b[34] = 3, true),
            G,
            p,
            true,
            "corrupt",
            7,
        ),
        (
            "step 7: TPM model 0",
            edited(&base, |b| b[35] = 0, true),
            G,
            p,
            true,
            "corrupt",
            7,
        ),
        (
            "step 7: 1.2 with crb",
            edited(
                &base,
                |b| {
                    b[34] = 1;
                    b[35] = 2
                },
                true,
            ),
            G,
            p,
            true,
            "corrupt",
            7,
        ),
        (
            "step 7: body_len 15",
            edited(&base, |b| put_u32(b, 80, 15), true),
            G,
            p,
            true,
            "corrupt",
            7,
        ),
        (
            "step 7: body_len 16 MiB+17",
            edited(&base, |b| put_u32(b, 80, 16_777_233), true),
            G,
            p,
            true,
            "corrupt",
            7,
        ),
        (
            "step 7: generation 0",
            edited(&base, |b| b[26..34].fill(0), true),
            G,
            p,
            true,
            "corrupt",
            7,
        ),
        (
            "step 8: kind 2",
            edited(&base, |b| b[slot] = 2, true),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 8: Argon2 0x10",
            edited(&base, |b| b[slot + 1] = 0x10, true),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 8: memory < 8p",
            edited(
                &base,
                |b| {
                    put_u32(b, slot + 2, 7);
                    put_u32(b, slot + 10, 1)
                },
                true,
            ),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 8: memory 4 GiB+1",
            edited(&base, |b| put_u32(b, slot + 2, 4_194_305), true),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 8: 0 iterations",
            edited(&base, |b| put_u32(b, slot + 6, 0), true),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 8: 65 iterations",
            edited(&base, |b| put_u32(b, slot + 6, 65), true),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 8: 0 lanes",
            edited(&base, |b| put_u32(b, slot + 10, 0), true),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 8: 65 lanes",
            edited(&base, |b| put_u32(b, slot + 10, 65), true),
            G,
            p,
            true,
            "corrupt",
            8,
        ),
        (
            "step 9: trailing byte",
            edited(&base, |b| b.push(0), false),
            G,
            p,
            true,
            "corrupt",
            9,
        ),
        (
            "step 9: missing byte",
            base[..base.len() - 1].to_vec(),
            G,
            p,
            true,
            "corrupt",
            9,
        ),
        (
            "step 10: another guest's file",
            base.clone(),
            OTHER,
            p,
            true,
            "guest-mismatch",
            10,
        ),
        (
            "step 11: guest field edited to match",
            edited(
                &base,
                |b| b[10..26].copy_from_slice(&GuestId::parse(OTHER).unwrap().as_bytes()[..]),
                true,
            ),
            OTHER,
            p,
            true,
            "wrong-passphrase",
            11,
        ),
        (
            "step 11: wrong passphrase",
            base.clone(),
            G,
            b"not it",
            true,
            "wrong-passphrase",
            11,
        ),
        (
            "step 11: wrapped key edited",
            edited(&base, |b| b[slot + 60] ^= 1, true),
            G,
            p,
            true,
            "wrong-passphrase",
            11,
        ),
        (
            "step 11: slot parameters edited",
            edited(&base, |b| put_u32(b, slot + 2, 72), true),
            G,
            p,
            true,
            "wrong-passphrase",
            11,
        ),
        (
            "step 11: weak without the switch",
            base.clone(),
            G,
            p,
            false,
            "weak-kdf",
            11,
        ),
        (
            "step 12: body byte",
            edited(
                &base,
                |b| {
                    let last = b.len() - 1;
                    b[last] ^= 1
                },
                false,
            ),
            G,
            p,
            true,
            "corrupt",
            12,
        ),
        (
            "step 12: body salt edited",
            edited(&base, |b| b[40] ^= 1, true),
            G,
            p,
            true,
            "corrupt",
            12,
        ),
        (
            "step 12: generation edited",
            edited(&base, |b| b[33] ^= 1, true),
            G,
            p,
            true,
            "corrupt",
            12,
        ),
        (
            "step 0: empty passphrase",
            base.clone(),
            G,
            b"",
            true,
            "passphrase",
            0,
        ),
        (
            "step 0: 4097-byte passphrase",
            base.clone(),
            G,
            &long_pass,
            true,
            "passphrase",
            0,
        ),
    ];
    let mut vectors: Vec<Vector> = header_vectors
        .iter()
        .map(|(what, bytes, guest, pass, weak, verdict, step)| {
            (
                *what,
                At::Bytes(bytes),
                *guest,
                *pass,
                *weak,
                *verdict,
                *step,
            )
        })
        .collect();
    vectors.push(("step 0: no file", At::Nothing, G, p, true, "missing", 0));
    vectors.push(("step 0: a FIFO", At::Fifo, G, p, true, "io", 0));

    // Step 13: bodies the Python writer sealed with the right data key.
    let valid = archive_bytes(2, &[(b"a-file", b"one"), (b"b.file", b"two")]);
    let sixty_five: Vec<(Vec<u8>, Vec<u8>)> = (0..65)
        .map(|i| (format!("f{i:02}").into_bytes(), Vec::new()))
        .collect();
    let sixty_five: Vec<(&[u8], &[u8])> = sixty_five
        .iter()
        .map(|(n, d)| (n.as_slice(), d.as_slice()))
        .collect();
    let mut trailing = valid.clone();
    trailing.push(0);
    let archive_vectors: Vec<(&str, Vec<u8>, &str)> = vec![
        ("step 13: two entries", valid.clone(), "ok"),
        ("step 13: no entries", archive_bytes(0, &[]), "ok"),
        ("step 13: one byte", vec![0], "corrupt"),
        (
            "step 13: not ascending",
            archive_bytes(2, &[(b"b", b""), (b"a", b"")]),
            "corrupt",
        ),
        (
            "step 13: duplicate",
            archive_bytes(2, &[(b"a", b""), (b"a", b"")]),
            "corrupt",
        ),
        (
            "step 13: ../x",
            archive_bytes(1, &[(b"../x", b"")]),
            "corrupt",
        ),
        (
            "step 13: .lock",
            archive_bytes(1, &[(b".lock", b"")]),
            "corrupt",
        ),
        (
            "step 13: a space",
            archive_bytes(1, &[(b"a b", b"")]),
            "corrupt",
        ),
        (
            "step 13: empty name",
            archive_bytes(1, &[(b"", b"")]),
            "corrupt",
        ),
        (
            "step 13: 65-byte name",
            archive_bytes(1, &[(&[b'n'; 65], b"")]),
            "corrupt",
        ),
        (
            "step 13: 65 entries",
            archive_bytes(65, &sixty_five),
            "corrupt",
        ),
        (
            "step 13: count says 3",
            archive_bytes(3, &[(b"a-file", b"one"), (b"b.file", b"two")]),
            "corrupt",
        ),
        ("step 13: trailing byte", trailing, "corrupt"),
        (
            "step 13: data cut",
            valid[..valid.len() - 1].to_vec(),
            "corrupt",
        ),
    ];
    let resealed: Vec<(&str, Vec<u8>, &str)> = archive_vectors
        .into_iter()
        .map(|(what, archive, verdict)| (what, bench.python_sealed(&base, &archive), verdict))
        .collect();
    for (what, bytes, verdict) in &resealed {
        vectors.push((what, At::Bytes(bytes), G, p, true, verdict, 13));
    }

    let mut wrong = Vec::new();
    for (what, at, guest, pass, weak, verdict, step) in vectors {
        let judged = bench.judge(at, guest, pass, weak);
        let got = (
            judged.python_verdict().to_owned(),
            judged.python["step"].as_u64().unwrap_or(99),
            judged.vtpmctl_verdict().to_owned(),
        );
        eprintln!(
            "{what}: outside reader {} (step {}), vtpmctl {}",
            got.0, got.1, got.2
        );
        if got != (verdict.to_owned(), step, verdict.to_owned()) {
            wrong.push(format!(
                "{what}: expected {verdict} at step {step}; outside reader {} ({}), vtpmctl {}",
                judged.python, got.1, judged.vtpmctl
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // The Python writer's valid archive opens in the vault as written.
    let (_, two_entries, _) = &resealed[0];
    let dir = bench.fresh_dir();
    let file = dir.join("tpm.sealed");
    fs::write(&file, two_entries).unwrap();
    let opened = SealedState::open(
        SealedPaths::new(&file),
        GuestId::parse(G).unwrap(),
        &secret(PASS.as_bytes()),
        &weak_policy(),
    )
    .unwrap();
    assert_eq!(opened.archive.get("a-file"), Some(&b"one"[..]));
    assert_eq!(opened.archive.get("b.file"), Some(&b"two"[..]));
    assert_eq!(
        opened.state.generation(),
        ok.python["generation"].as_u64().unwrap() + 1
    );
}

/// Both readers on `bytes` (alone in a fresh directory), the credential
/// given as `flag FILE` to each (the flags are the same for both).
fn judge_kind(bench: &mut Bench, bytes: &[u8], guest: &str, flag: &str, secret: &Path) -> Judged {
    let dir = bench.fresh_dir();
    let file = dir.join("tpm.sealed");
    fs::write(&file, bytes).unwrap();
    let out = Command::new(PYTHON)
        .arg(READER)
        .arg("open")
        .arg(&file)
        .args(["--guest", guest, flag])
        .arg(secret)
        .arg("--allow-weak")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "outside_reader.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python: Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
        .args(["state", "verify"])
        .arg(&file)
        .args(["--guest", guest, flag])
        .arg(secret)
        .args(["--allow-weak-kdf", "--json"])
        .output()
        .unwrap();
    let vtpmctl: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vtpmctl printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Judged { python, vtpmctl }
}

#[test]
fn the_outside_reader_opens_key_and_host_slots_and_agrees_with_vtpmctl() {
    use vtpmd::vault::{Credential, HostKey};
    require_python_modules();

    // The spec's test vectors are what the reader computes from their
    // inputs (the vault opens them: src/vault/crypto.rs).
    let out = Command::new(PYTHON)
        .args([READER, "vectors"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vectors: Value = serde_json::from_slice(&out.stdout).unwrap();
    let spec = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/sealed-format.md"
    ))
    .unwrap();
    let block = spec.split("## Test vectors").nth(1).unwrap();
    for (name, value) in vectors.as_object().unwrap() {
        if name == "guest" {
            assert!(block.contains(value.as_str().unwrap()));
            continue;
        }
        let line = block
            .lines()
            .find(|l| l.split('=').next().map(str::trim) == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no {name} in the spec's test vectors"));
        assert_eq!(
            line.split('=').nth(1).unwrap().trim(),
            value.as_str().unwrap(),
            "{name}"
        );
    }

    // A file with all three kinds: the vault writes it, both readers open
    // it with each credential.
    let root = tempfile::tempdir().unwrap();
    let host_path = root.path().join("host.key");
    let host = HostKey::load_or_create(&host_path).unwrap();
    let other_path = root.path().join("other.key");
    HostKey::load_or_create(&other_path).unwrap();
    let key_bytes: Vec<u8> = (0..32u8).map(|b| b.wrapping_mul(7)).collect();
    let key_path = root.path().join("key");
    fs::write(&key_path, &key_bytes).unwrap();
    let wrong_key_path = root.path().join("wrong-key");
    fs::write(&wrong_key_path, [9u8; 32]).unwrap();
    let short_key_path = root.path().join("short-key");
    fs::write(&short_key_path, [9u8; 31]).unwrap();
    let pass_path = root.path().join("pass");
    fs::write(&pass_path, PASS).unwrap();

    let guest = GuestId::parse(G).unwrap();
    let spec = vtpmd::protocol::TpmSpec::new(
        vtpmd::protocol::TpmVersion::V2_0,
        vtpmd::protocol::TpmModel::Tis,
    )
    .unwrap();
    let archive = StateArchive::from_entries(vec![
        ("tpm2-00.permall".to_owned(), b"permanent state".to_vec()),
        ("tpm2-00.volatilestate".to_owned(), vec![7; 300]),
    ])
    .unwrap();
    let paths = SealedPaths::new(root.path().join("made.sealed"));
    let mut state = SealedState::create(
        paths.clone(),
        guest,
        spec,
        &secret(PASS.as_bytes()),
        &weak_policy(),
        &archive,
    )
    .unwrap();
    assert_eq!(state.add_key(&secret(&key_bytes)).unwrap(), 1);
    assert_eq!(state.add_host(&host.public()).unwrap(), 2);
    let file = fs::read(paths.current()).unwrap();
    assert_eq!(&file[8..10], &[0, 2]);
    let swtpm_key = hex(&Sha256::digest(secrecy::ExposeSecret::expose_secret(
        &state.swtpm_state_key().unwrap(),
    )));
    let opened_by = |credential| {
        SealedState::open_with(paths.clone(), guest, credential, &weak_policy())
            .unwrap()
            .state
            .unlocked_slot()
    };
    let key_secret = secret(&key_bytes);
    assert_eq!(opened_by(Credential::Key(&key_secret)), Some(1));
    assert_eq!(opened_by(Credential::Host(&host)), Some(2));

    let mut bench = Bench::new();
    for (flag, path, slot) in [
        ("--passphrase-file", &pass_path, 0),
        ("--key-file", &key_path, 1),
        ("--host-key-file", &host_path, 2),
    ] {
        let j = judge_kind(&mut bench, &file, G, flag, path);
        assert_eq!(j.python_verdict(), "ok", "{flag}: {}", j.python);
        assert_eq!(j.vtpmctl_verdict(), "ok", "{flag}: {}", j.vtpmctl);
        assert_eq!(j.python["keyslot"], slot, "{flag}");
        assert_eq!(j.python["swtpm_key_sha256"], swtpm_key.as_str(), "{flag}");
        assert_eq!(j.python["entries"], entries_of(&archive), "{flag}");
    }

    // One vector per new rule: (what, bytes, flag, secret, verdict, step).
    let slot_at = |i: usize| 85 + 106 * i;
    let only_passphrase = {
        // Version 2 with passphrase slots only: the key and host slots
        // dropped, the count and checksum made right.
        let mut b = file[..85 + 106].to_vec();
        b[84] = 1;
        b.extend_from_slice(&[0; 32]);
        b.extend_from_slice(&file[117 + 3 * 106..]);
        fix_checksum(&mut b);
        b
    };
    type KindCase<'a> = (&'a str, Vec<u8>, &'a str, &'a Path, &'a str, u64);
    let cases: Vec<KindCase> = vec![
        (
            "step 0: a key of 31 bytes",
            file.clone(),
            "--key-file",
            &short_key_path,
            "key",
            0,
        ),
        (
            "step 8: a key slot in a version 1 file",
            edited(&file, |b| b[9] = 1, true),
            "--key-file",
            &key_path,
            "corrupt",
            8,
        ),
        (
            "step 8: a key slot's reserved byte",
            edited(&file, |b| b[slot_at(1) + 5] = 1, true),
            "--key-file",
            &key_path,
            "corrupt",
            8,
        ),
        (
            "step 8: a host slot's reserved byte",
            edited(&file, |b| b[slot_at(2) + 9] = 1, true),
            "--host-key-file",
            &host_path,
            "corrupt",
            8,
        ),
        (
            "step 8: kind 4",
            edited(&file, |b| b[slot_at(1)] = 4, true),
            "--key-file",
            &key_path,
            "corrupt",
            8,
        ),
        (
            "step 8: version 2 with passphrase slots only",
            only_passphrase,
            "--passphrase-file",
            &pass_path,
            "corrupt",
            8,
        ),
        (
            "step 11: the wrong key",
            file.clone(),
            "--key-file",
            &wrong_key_path,
            "wrong-key",
            11,
        ),
        (
            "step 11: another host",
            file.clone(),
            "--host-key-file",
            &other_path,
            "no-keyslot",
            11,
        ),
        (
            "step 11: a host slot's ciphertext edited",
            edited(&file, |b| b[slot_at(2) + 70] ^= 1, true),
            "--host-key-file",
            &host_path,
            "wrong-key",
            11,
        ),
        (
            "step 11: a key slot's salt edited",
            edited(&file, |b| b[slot_at(1) + 20] ^= 1, true),
            "--key-file",
            &key_path,
            "wrong-key",
            11,
        ),
    ];
    let mut checked = 0;
    for (what, bytes, flag, path, verdict, step) in cases {
        let j = judge_kind(&mut bench, &bytes, G, flag, path);
        assert_eq!(j.python_verdict(), verdict, "{what}: {}", j.python);
        assert_eq!(j.python["step"], step, "{what}: {}", j.python);
        assert_eq!(j.vtpmctl_verdict(), verdict, "{what}: {}", j.vtpmctl);
        checked += 1;
    }
    eprintln!("{checked} key/host vectors: both readers agree");
}

/// (case, ticket, guest, daemon asked, its host key file, sealed file,
/// python's verdict, what the daemon's refusal says)
type TicketCase<'a> = (
    &'a str,
    Vec<u8>,
    &'a str,
    &'a Daemon,
    &'a Path,
    &'a [u8],
    &'a str,
    &'a str,
);

/// `outside_reader.py open-ticket`: its JSON verdict.
fn python_ticket(
    ticket: &[u8],
    guest: &str,
    host_key: &Path,
    sealed: &[u8],
    now: Option<u64>,
) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (t, s) = (dir.path().join("ticket"), dir.path().join("sealed"));
    fs::write(&t, ticket).unwrap();
    fs::write(&s, sealed).unwrap();
    let mut cmd = Command::new(PYTHON);
    cmd.arg(READER)
        .arg("open-ticket")
        .arg(&t)
        .args(["--guest", guest, "--host-key-file"])
        .arg(host_key)
        .arg("--sealed")
        .arg(&s);
    if let Some(now) = now {
        cmd.args(["--now", &now.to_string()]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "outside_reader.py open-ticket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn unbase64(value: &Value) -> Vec<u8> {
    use base64ct::{Base64, Encoding};
    Base64::decode_vec(value.as_str().unwrap()).unwrap()
}

fn base64(bytes: &[u8]) -> String {
    use base64ct::{Base64, Encoding};
    Base64::encode_string(bytes)
}

/// A ticket the real daemon handed out (MigrateOut) opens in the outside
/// reader, written from the spec's "Migration tickets" alone, with the
/// destination's host key file: same generation, and its data key opens
/// the sealed file that came with it to the archive the passphrase opens.
/// Each misuse gets the verdict the spec orders, and the destination
/// daemon refuses the same ticket for the same reason.
#[test]
fn the_outside_reader_opens_a_ticket_vtpmd_handed_out_and_refuses_what_the_daemon_refuses() {
    require_python_modules();
    let a = Daemon::start();
    let b = Daemon::start();
    let c = Daemon::start();
    a.client()
        .manager(
            "Create",
            json!({"guest": G, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    a.start_guest(G, PASS);
    let destination = b.client().manager("GetHostKey", json!({})).unwrap()["public_key"].clone();
    let out = a
        .client()
        .manager(
            "MigrateOut",
            json!({"guest": G, "destination": destination}),
        )
        .unwrap();
    let (ticket, sealed) = (unbase64(&out["ticket"]), unbase64(&out["sealed"]));
    let b_key = b.state_dir.join("host.key");
    let c_key = c.state_dir.join("host.key");

    let opened = python_ticket(&ticket, G, &b_key, &sealed, None);
    assert_eq!(opened["verdict"], "ok", "{opened}");
    assert_eq!(opened["generation"], out["generation"], "{opened}");
    // The passphrase opens the same file to the same archive and key.
    let dir = tempfile::tempdir().unwrap();
    let (file, pass) = (dir.path().join("sealed"), dir.path().join("pass"));
    fs::write(&file, &sealed).unwrap();
    fs::write(&pass, PASS).unwrap();
    let by_passphrase = python(&["open"], &file, G, &pass, true, &[]);
    assert_eq!(by_passphrase["verdict"], "ok", "{by_passphrase}");
    for field in ["archive_sha256", "swtpm_key_sha256"] {
        assert_eq!(opened[field], by_passphrase[field], "{field}");
    }
    let expires = opened["expires"].as_u64().unwrap();
    let expired = python_ticket(&ticket, G, &b_key, &sealed, Some(expires));
    assert_eq!(expired["verdict"], "expired", "{expired}");
    assert_eq!(
        python_ticket(&ticket, G, &b_key, &sealed, Some(expires - 1))["verdict"],
        "ok"
    );

    // A later file (the guest wrote more) than the ticket's generation.
    let generation = out["generation"].as_u64().unwrap();
    fs::write(
        a.runtime_dir.join(G).join("extra"),
        b"written after the ticket",
    )
    .unwrap();
    a.wait_generation_above(G, generation, Duration::from_secs(20));
    let later = a.client().manager("Export", json!({"guest": G})).unwrap();
    let later = unbase64(&later["sealed"]);

    let edit = |at: usize, value: u8| {
        let mut t = ticket.clone();
        t[at] ^= value;
        t
    };
    let mut version_2 = ticket.clone();
    version_2[9] = 2;
    let cases: Vec<TicketCase<'_>> = vec![
        (
            "cut short",
            ticket[..153].to_vec(),
            G,
            &b,
            &b_key,
            &sealed,
            "malformed",
            "not a vtpmd migration ticket",
        ),
        (
            "another magic",
            edit(0, 1),
            G,
            &b,
            &b_key,
            &sealed,
            "malformed",
            "not a vtpmd migration ticket",
        ),
        (
            "version 2",
            version_2,
            G,
            &b,
            &b_key,
            &sealed,
            "unsupported-version",
            "version 2",
        ),
        (
            "another guest",
            ticket.clone(),
            OTHER,
            &b,
            &b_key,
            &sealed,
            "other-guest",
            "is for guest",
        ),
        (
            "another host",
            ticket.clone(),
            G,
            &c,
            &c_key,
            &sealed,
            "other-host",
            "not this one",
        ),
        (
            "generation altered",
            edit(33, 1),
            G,
            &b,
            &b_key,
            &sealed,
            "does-not-open",
            "does not open",
        ),
        (
            "nonce altered",
            edit(50, 1),
            G,
            &b,
            &b_key,
            &sealed,
            "does-not-open",
            "does not open",
        ),
        (
            "enc altered",
            edit(80, 1),
            G,
            &b,
            &b_key,
            &sealed,
            "does-not-open",
            "does not open",
        ),
        (
            "wrapped key altered",
            edit(140, 1),
            G,
            &b,
            &b_key,
            &sealed,
            "does-not-open",
            "does not open",
        ),
        (
            "a later file",
            ticket.clone(),
            G,
            &b,
            &b_key,
            &later,
            "generation-mismatch",
            "not the file MigrateOut handed out",
        ),
    ];
    for (case, t, guest, daemon, key, file, verdict, refusal) in cases {
        let judged = python_ticket(&t, guest, key, file, None);
        assert_eq!(judged["verdict"], verdict, "{case}: {judged}");
        let refused = daemon
            .client()
            .manager(
                "MigrateIn",
                json!({"guest": guest, "ticket": base64(&t), "sealed": base64(file)}),
            )
            .unwrap_err();
        let reason = refused.parameters.to_string();
        assert!(
            reason.contains(refusal),
            "{case}: {} {reason}",
            refused.name
        );
    }
    // And the ticket as handed out is taken.
    let taken = b
        .client()
        .manager(
            "MigrateIn",
            json!({"guest": G, "ticket": out["ticket"], "sealed": out["sealed"]}),
        )
        .unwrap();
    assert_eq!(taken["guest"]["state"], "running", "{taken}");
    b.client()
        .manager("AbortMigration", json!({"guest": G}))
        .unwrap();
}
