//! The vault against real files: a TPM state made by the real swtpm_setup,
//! damaged copies, moved files, rekeyed slots.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{
    FreshKey, KdfParams, KdfPolicy, SealedPaths, SealedState, StateArchive, VaultError,
};

const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const OTHER_GUEST: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";

fn guest() -> GuestId {
    GuestId::parse(GUEST).unwrap()
}

fn spec() -> TpmSpec {
    TpmSpec::new(TpmVersion::V2_0, TpmModel::Crb).unwrap()
}

fn passphrase(text: &str) -> SecretBuf {
    let mut buf = SecretBuf::with_capacity(text.len()).unwrap();
    buf.extend_from_slice(text.as_bytes()).unwrap();
    buf
}

/// Cheap parameters so that thousands of opens stay fast; allowed only
/// because the policy says so.
fn weak_policy() -> KdfPolicy {
    KdfPolicy {
        params: KdfParams::new(64, 1, 1).unwrap(),
        allow_weak: true,
    }
}

fn small_archive(tag: u8) -> StateArchive {
    StateArchive::from_entries([("tpm2-00.permall".to_owned(), vec![tag; 8])]).unwrap()
}

fn sha256_of(path: &Path) -> [u8; 32] {
    Sha256::digest(fs::read(path).unwrap()).into()
}

/// Opens the state `create_small` made, with its passphrase.
fn open_state(paths: &SealedPaths) -> SealedState {
    SealedState::open(
        paths.clone(),
        guest(),
        &passphrase("correct horse"),
        &weak_policy(),
    )
    .unwrap()
    .state
}

fn create_small(dir: &Path) -> SealedPaths {
    let paths = SealedPaths::new(dir.join("tpm.sealed"));
    SealedState::create(
        paths.clone(),
        guest(),
        spec(),
        &passphrase("correct horse"),
        &weak_policy(),
        &small_archive(1),
    )
    .unwrap();
    paths
}

/// A TPM 2.0 state directory made by the real swtpm_setup, with an EK.
fn swtpm_setup_state(dir: &Path) -> PathBuf {
    let state = dir.join("tpmstate");
    fs::create_dir(&state).unwrap();
    let log = dir.join("swtpm_setup.log");
    let out = Command::new("swtpm_setup")
        .args([
            "--tpm2",
            "--createek",
            "--pcr-banks",
            "sha256",
            "--tpmstate",
        ])
        .arg(&state)
        .arg("--logfile")
        .arg(&log)
        .output()
        .expect("swtpm_setup is installed (apt-get install swtpm-tools)");
    assert!(
        out.status.success(),
        "swtpm_setup failed: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    state
}

#[test]
fn a_real_swtpm_setup_state_round_trips_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = swtpm_setup_state(dir.path());
    let archive = StateArchive::from_dir(&state_dir).unwrap();
    assert!(
        archive
            .get("tpm2-00.permall")
            .is_some_and(|d| d.len() > 1000)
    );
    let paths = SealedPaths::new(dir.path().join("tpm.sealed"));
    let pass = passphrase("correct horse");
    let policy = KdfPolicy::default();

    SealedState::create(paths.clone(), guest(), spec(), &pass, &policy, &archive).unwrap();
    let opened = SealedState::open(paths.clone(), guest(), &pass, &policy).unwrap();

    assert_eq!(opened.archive, archive);
    assert!(opened.fell_back.is_none());
    assert_eq!(opened.state.generation(), 1);
    assert_eq!(opened.state.spec(), spec());
    let restored = dir.path().join("restored");
    fs::create_dir(&restored).unwrap();
    opened.archive.write_to_dir(&restored).unwrap();
    assert_eq!(
        fs::read(restored.join("tpm2-00.permall")).unwrap(),
        fs::read(state_dir.join("tpm2-00.permall")).unwrap()
    );
    let sealed = fs::read(paths.current()).unwrap();
    let permall = fs::read(state_dir.join("tpm2-00.permall")).unwrap();
    assert!(
        !sealed
            .windows(32)
            .any(|w| permall.windows(32).any(|p| p == w)),
        "plaintext state visible in the sealed file"
    );
}

#[test]
fn a_wrong_passphrase_is_told_apart_and_leaves_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let before = sha256_of(paths.current());

    let result = SealedState::open(paths.clone(), guest(), &passphrase("wrong"), &weak_policy());

    assert!(
        matches!(result, Err(VaultError::WrongPassphrase { .. })),
        "{result:?}"
    );
    assert_eq!(sha256_of(paths.current()), before);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn rekey_retires_the_old_passphrase_in_both_files_and_seals_the_next_generation() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let mut state = open_state(&paths);
    state.seal(&small_archive(2)).unwrap(); // now a .prev exists too
    let body_of = |p: &Path| {
        let bytes = fs::read(p).unwrap();
        let header = vtpmd::vault::inspect_bytes(p, &bytes).unwrap().header_bytes;
        bytes[header..].to_vec()
    };
    let bodies = (body_of(paths.current()), body_of(paths.previous()));

    state
        .change_passphrase(&passphrase("battery staple"), &weak_policy())
        .unwrap();

    for path in [paths.current(), paths.previous()] {
        let old = SealedState::open(
            SealedPaths::new(path),
            guest(),
            &passphrase("correct horse"),
            &weak_policy(),
        );
        assert!(
            matches!(old, Err(VaultError::WrongPassphrase { .. })),
            "{}: {old:?}",
            path.display()
        );
    }
    let opened = SealedState::open(
        paths.clone(),
        guest(),
        &passphrase("battery staple"),
        &weak_policy(),
    )
    .unwrap();
    assert_eq!(opened.archive, small_archive(2));
    // The file the change rewrote (its body verbatim) is now the previous
    // generation; the current one is the same state sealed once more.
    assert_eq!(opened.state.generation(), 3);
    assert_eq!(body_of(paths.previous()), bodies.0);
    assert_ne!(body_of(paths.current()), bodies.0);
}

/// The spec: a keyslot change rewrites each file "that exists and decodes
/// with the right guest", and "a file that fails to decode is left as it
/// is". A previous generation whose header is sound but whose body is
/// damaged does not decode: it keeps its bytes and is reported.
#[test]
fn rekey_leaves_a_previous_generation_with_a_damaged_body_as_it_is_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let archive = StateArchive::from_dir(&swtpm_setup_state(dir.path())).unwrap();
    let paths = SealedPaths::new(dir.path().join("tpm.sealed"));
    let pass = passphrase("correct horse");
    let mut state = SealedState::create(
        paths.clone(),
        guest(),
        spec(),
        &pass,
        &weak_policy(),
        &archive,
    )
    .unwrap();
    state.seal(&small_archive(2)).unwrap();
    let mut prev = fs::read(paths.previous()).unwrap();
    let last = prev.len() - 1;
    prev[last] ^= 0x01;
    fs::write(paths.previous(), &prev).unwrap();
    let damaged = sha256_of(paths.previous());

    let left = state
        .change_passphrase(&passphrase("battery staple"), &weak_policy())
        .unwrap();

    assert_eq!(
        sha256_of(paths.previous()),
        damaged,
        "the damaged .prev was rewritten"
    );
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].path, paths.previous());
    assert!(
        left[0].problem.contains("body fails authentication"),
        "{left:?}"
    );
    // The current file did take the new keyslot.
    let opened = SealedState::open(
        paths.clone(),
        guest(),
        &passphrase("battery staple"),
        &weak_policy(),
    )
    .unwrap();
    assert!(opened.fell_back.is_none());
    assert_eq!(opened.archive, small_archive(2));
}

#[test]
fn two_keyslots_both_open_and_the_last_cannot_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let mut state = open_state(&paths);

    let added = state
        .add_passphrase(&passphrase("host key"), &weak_policy())
        .unwrap();

    assert_eq!(added, 1);
    for pass in ["correct horse", "host key"] {
        let opened =
            SealedState::open(paths.clone(), guest(), &passphrase(pass), &weak_policy()).unwrap();
        assert_eq!(opened.archive, small_archive(1), "{pass}");
    }
    state.remove_keyslot(0).unwrap();
    let gone = SealedState::open(
        paths.clone(),
        guest(),
        &passphrase("correct horse"),
        &weak_policy(),
    );
    assert!(matches!(gone, Err(VaultError::WrongPassphrase { .. })));
    assert!(matches!(
        state.remove_keyslot(0),
        Err(VaultError::LastKeyslot { index: 0 })
    ));
    assert!(SealedState::open(paths, guest(), &passphrase("host key"), &weak_policy()).is_ok());
}

#[test]
fn every_single_bit_flip_is_detected_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let original = fs::read(paths.current()).unwrap();
    let victim = SealedPaths::new(dir.path().join("flipped"));
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();

    for bit in 0..original.len() * 8 {
        let mut bytes = original.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        fs::write(victim.current(), &bytes).unwrap();
        let result = SealedState::open(
            victim.clone(),
            guest(),
            &passphrase("correct horse"),
            &weak_policy(),
        );
        let kind = match result {
            Err(VaultError::Corrupt { .. }) => "corrupt",
            Err(VaultError::UnsupportedVersion { .. }) if (64..80).contains(&bit) => "version",
            other => panic!("bit {bit}: expected damage, got {other:?}"),
        };
        *outcomes.entry(kind.to_owned()).or_default() += 1;
    }
    eprintln!("{} bits flipped: {outcomes:?}", original.len() * 8);
}

#[test]
fn every_truncation_is_an_error_and_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let original = fs::read(paths.current()).unwrap();
    let victim = SealedPaths::new(dir.path().join("short"));

    for len in 0..original.len() {
        fs::write(victim.current(), &original[..len]).unwrap();
        let result = SealedState::open(
            victim.clone(),
            guest(),
            &passphrase("correct horse"),
            &weak_policy(),
        );
        assert!(
            matches!(result, Err(VaultError::Corrupt { .. })),
            "length {len}: {result:?}"
        );
    }
}

#[test]
fn a_sealed_file_moved_to_another_guest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let other = GuestId::parse(OTHER_GUEST).unwrap();
    let moved = SealedPaths::new(dir.path().join("other.sealed"));
    fs::copy(paths.current(), moved.current()).unwrap();

    let result = SealedState::open(moved, other, &passphrase("correct horse"), &weak_policy());

    assert!(
        matches!(result, Err(VaultError::GuestMismatch { expected, found, .. }) if expected == other && found == guest()),
    );
}

#[test]
fn a_damaged_current_file_falls_back_to_the_previous_generation() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let pass = passphrase("correct horse");
    let mut state = SealedState::open(paths.clone(), guest(), &pass, &weak_policy())
        .unwrap()
        .state;
    state.seal(&small_archive(2)).unwrap();
    let mut bytes = fs::read(paths.current()).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // inside the body's tag
    fs::write(paths.current(), &bytes).unwrap();

    let opened = SealedState::open(paths.clone(), guest(), &pass, &weak_policy()).unwrap();

    let fallback = opened.fell_back.expect("reports the fallback");
    assert!(
        fallback
            .current_problem
            .contains("body fails authentication"),
        "{fallback:?}"
    );
    assert_eq!(opened.archive, small_archive(1));
    assert_eq!(opened.state.generation(), 2 - 1);

    // The next seal replaces the damaged file and keeps the good .prev.
    let mut state = opened.state;
    state.seal(&small_archive(3)).unwrap();
    let again = SealedState::open(paths.clone(), guest(), &pass, &weak_policy()).unwrap();
    assert!(again.fell_back.is_none());
    assert_eq!(again.archive, small_archive(3));
    let prev = SealedState::open(
        SealedPaths::new(paths.previous()),
        guest(),
        &pass,
        &weak_policy(),
    )
    .unwrap();
    assert_eq!(prev.archive, small_archive(1));
}

#[test]
fn a_wrong_passphrase_does_not_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let mut state = open_state(&paths);
    state.seal(&small_archive(2)).unwrap();

    let result = SealedState::open(paths, guest(), &passphrase("nope"), &weak_policy());

    assert!(matches!(result, Err(VaultError::WrongPassphrase { .. })));
}

#[test]
fn weak_parameters_in_a_file_need_the_switch_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());

    let strict = KdfPolicy::default();
    let result = SealedState::open(paths, guest(), &passphrase("correct horse"), &strict);

    assert!(
        matches!(result, Err(VaultError::WeakKdf { .. })),
        "{result:?}"
    );
}

#[test]
fn create_refuses_to_replace_existing_state_and_an_empty_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let before = sha256_of(paths.current());

    let again = SealedState::create(
        paths.clone(),
        guest(),
        spec(),
        &passphrase("x"),
        &weak_policy(),
        &small_archive(9),
    );
    let empty = SealedState::create(
        SealedPaths::new(dir.path().join("new")),
        guest(),
        spec(),
        &SecretBuf::with_capacity(1).unwrap(),
        &weak_policy(),
        &small_archive(9),
    );

    assert!(matches!(again, Err(VaultError::AlreadyExists { .. })));
    assert!(matches!(empty, Err(VaultError::EmptyPassphrase)));
    assert_eq!(sha256_of(paths.current()), before);
    assert!(!dir.path().join("new").exists());
}

#[test]
fn the_swtpm_state_key_is_the_same_on_every_open() {
    use secrecy::ExposeSecret;
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let pass = passphrase("correct horse");
    let a = SealedState::open(paths.clone(), guest(), &pass, &weak_policy())
        .unwrap()
        .state;
    let b = SealedState::open(paths, guest(), &pass, &weak_policy())
        .unwrap()
        .state;

    let key_a = a.swtpm_state_key().unwrap();
    let key_b = b.swtpm_state_key().unwrap();

    assert_eq!(key_a.len(), vtpmd::vault::SWTPM_STATE_KEY_LEN);
    assert!(key_a.ct_eq(&key_b));
    assert_ne!(key_a.expose_secret(), &[0u8; 32]);
}

/// Create provisions under a fresh data key's swtpm state key before the
/// passphrase slot exists (FreshKey): the key swtpm encrypted the state with
/// must be the one every open of the sealed file derives.
#[test]
fn a_fresh_keys_swtpm_state_key_is_the_sealed_states() {
    let dir = tempfile::tempdir().unwrap();
    let paths = SealedPaths::new(dir.path().join("tpm.sealed"));
    let fresh = FreshKey::generate(paths.clone(), guest(), spec()).unwrap();
    let early = fresh.swtpm_state_key().unwrap();
    // Nothing is written before the first seal.
    assert!(!paths.current().exists());
    let mut state = fresh
        .with_passphrase(&passphrase("correct horse"), &weak_policy())
        .unwrap();
    assert!(early.ct_eq(&state.swtpm_state_key().unwrap()));
    state.seal(&small_archive(1)).unwrap();

    let opened = open_state(&paths);
    assert!(early.ct_eq(&opened.swtpm_state_key().unwrap()));
    // A state already there is refused before any key is made.
    assert!(matches!(
        FreshKey::generate(paths, guest(), spec()),
        Err(VaultError::AlreadyExists { .. })
    ));
}

#[test]
fn a_damaged_current_file_is_reported_as_damage_even_with_a_wrong_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let mut state = open_state(&paths);
    state.seal(&small_archive(2)).unwrap();
    let mut bytes = fs::read(paths.current()).unwrap();
    bytes[100] ^= 1; // inside keyslot 0: the header checksum catches it
    fs::write(paths.current(), &bytes).unwrap();

    let result = SealedState::open(paths, guest(), &passphrase("wrong"), &weak_policy());

    assert!(
        matches!(result, Err(VaultError::Corrupt { .. })),
        "{result:?}"
    );
}

#[test]
fn a_newer_format_is_reported_as_such_whatever_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let paths = SealedPaths::new(dir.path().join("future.sealed"));
    let mut bytes = b"VTPMSEAL\x00\x03".to_vec();
    bytes.resize(17 * 1024 * 1024 + 1, 0); // larger than any version-1 file

    fs::write(paths.current(), &bytes).unwrap();
    let result = SealedState::open(paths, guest(), &passphrase("x"), &weak_policy());

    assert!(
        matches!(result, Err(VaultError::UnsupportedVersion { found: 3, .. })),
        "{result:?}"
    );
}

#[test]
fn a_handover_resumes_the_state_without_the_passphrase_and_goes_on_sealing() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let mut state = open_state(&paths);
    state.seal(&small_archive(2)).unwrap();
    let handover = state.handover().unwrap();
    drop(state);

    let resumed = SealedState::resume(paths.clone(), guest(), &handover).unwrap();
    assert!(resumed.fell_back.is_none());
    assert_eq!(resumed.archive, small_archive(2));
    assert_eq!(resumed.state.generation(), 2);
    // The keyslot it was unlocked with travels too (Rekey needs it).
    assert_eq!(resumed.state.unlocked_slot(), Some(0));
    let mut state = resumed.state;
    assert_eq!(state.seal(&small_archive(3)).unwrap(), 3);
    assert_eq!(open_state(&paths).generation(), 3);
    assert_eq!(
        SealedState::open(
            paths.clone(),
            guest(),
            &passphrase("correct horse"),
            &weak_policy()
        )
        .unwrap()
        .archive,
        small_archive(3)
    );
}

#[test]
fn a_handover_of_another_guest_or_a_damaged_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let other_dir = tempfile::tempdir().unwrap();
    let other_paths = SealedPaths::new(other_dir.path().join("tpm.sealed"));
    let other = GuestId::parse(OTHER_GUEST).unwrap();
    SealedState::create(
        other_paths.clone(),
        other,
        spec(),
        &passphrase("correct horse"),
        &weak_policy(),
        &small_archive(9),
    )
    .unwrap();
    let other_handover = SealedState::open(
        other_paths,
        other,
        &passphrase("correct horse"),
        &weak_policy(),
    )
    .unwrap()
    .state
    .handover()
    .unwrap();
    let before = sha256_of(paths.current());

    let err = SealedState::resume(paths.clone(), guest(), &other_handover).unwrap_err();
    assert!(matches!(err, VaultError::WrongHandover { .. }), "{err:?}");
    let mut short = SecretBuf::with_capacity(3).unwrap();
    short.extend_from_slice(&[1, 0, 0]).unwrap();
    let err = SealedState::resume(paths.clone(), guest(), &short).unwrap_err();
    assert!(matches!(err, VaultError::BadHandover), "{err:?}");
    assert_eq!(
        sha256_of(paths.current()),
        before,
        "a refusal changed the file"
    );
}

#[test]
fn an_unchanged_state_is_not_sealed_again() {
    let dir = tempfile::tempdir().unwrap();
    let paths = create_small(dir.path());
    let mut state = open_state(&paths);
    let before = sha256_of(paths.current());

    assert_eq!(state.seal_if_changed(&small_archive(1)).unwrap(), None);
    assert_eq!(
        sha256_of(paths.current()),
        before,
        "an unchanged state was rewritten"
    );
    assert_eq!(state.seal_if_changed(&small_archive(2)).unwrap(), Some(2));
    assert_eq!(state.seal_if_changed(&small_archive(2)).unwrap(), None);
    // Resumed from a handover, it knows what is sealed too.
    let handover = state.handover().unwrap();
    let mut resumed = SealedState::resume(paths.clone(), guest(), &handover)
        .unwrap()
        .state;
    assert_eq!(resumed.seal_if_changed(&small_archive(2)).unwrap(), None);
    assert_eq!(resumed.seal_if_changed(&small_archive(3)).unwrap(), Some(3));
}

mod kinds {
    //! `key` and `host` keyslots (format version 2) on real files.

    use super::*;
    use vtpmd::vault::{Credential, HostKey, SlotKind};

    fn key(byte: u8) -> SecretBuf {
        let mut buf = SecretBuf::with_capacity(32).unwrap();
        buf.extend_from_slice(&[byte; 32]).unwrap();
        buf
    }

    fn created(dir: &Path) -> (SealedPaths, SealedState) {
        let paths = SealedPaths::new(dir.join("state.sealed"));
        let state = SealedState::create(
            paths.clone(),
            guest(),
            spec(),
            &passphrase("correct horse"),
            &weak_policy(),
            &small_archive(1),
        )
        .unwrap();
        (paths, state)
    }

    fn open(paths: &SealedPaths, credential: Credential<'_>) -> Result<SealedState, VaultError> {
        SealedState::open_with(paths.clone(), guest(), credential, &weak_policy()).map(|o| o.state)
    }

    fn version_of(path: &Path) -> u16 {
        let bytes = fs::read(path).unwrap();
        u16::from_be_bytes([bytes[8], bytes[9]])
    }

    #[test]
    fn a_key_slot_opens_with_its_key_only_and_makes_the_file_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, mut state) = created(dir.path());
        state.seal(&small_archive(2)).unwrap();
        assert_eq!(version_of(paths.current()), 1);
        let body_before = fs::read(paths.current()).unwrap()[223..].to_vec();

        assert_eq!(state.add_key(&key(7)).unwrap(), 1);
        assert_eq!(version_of(paths.current()), 2);
        assert_eq!(version_of(paths.previous()), 2);
        // The rewritten file, body verbatim, became the previous
        // generation when the change sealed the next one.
        let file = fs::read(paths.previous()).unwrap();
        assert_eq!(file[329..], body_before[..], "the body is copied verbatim");
        assert_eq!(state.generation(), 3);

        let opened = SealedState::open_with(
            paths.clone(),
            guest(),
            Credential::Key(&key(7)),
            &weak_policy(),
        )
        .unwrap();
        assert_eq!(opened.state.unlocked_slot(), Some(1));
        assert_eq!(opened.archive, small_archive(2));
        assert!(
            opened.kdf_time < std::time::Duration::from_millis(50),
            "{:?}",
            opened.kdf_time
        );
        assert!(matches!(
            open(&paths, Credential::Key(&key(8))),
            Err(VaultError::WrongKey {
                kind: SlotKind::Key,
                ..
            })
        ));
        assert!(matches!(
            open(&paths, Credential::Key(&passphrase("short"))),
            Err(VaultError::InvalidKey { len: 5 })
        ));
        // The passphrase still opens its own slot.
        assert_eq!(
            open(&paths, Credential::Passphrase(&passphrase("correct horse")))
                .unwrap()
                .unlocked_slot(),
            Some(0)
        );

        // Removing the key slot brings the file back to version 1, still
        // with the same state, one generation further.
        state.remove_keyslot(1).unwrap();
        assert_eq!(version_of(paths.current()), 1);
        assert_eq!(state.generation(), 4);
        let reopened = SealedState::open_with(
            paths.clone(),
            guest(),
            Credential::Passphrase(&passphrase("correct horse")),
            &weak_policy(),
        )
        .unwrap();
        assert_eq!(reopened.archive, small_archive(2));
        assert!(matches!(
            open(&paths, Credential::Key(&key(7))),
            Err(VaultError::NoKeyslot {
                kind: SlotKind::Key,
                ..
            })
        ));
    }

    #[test]
    fn a_host_slot_opens_on_its_host_only() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, mut state) = created(dir.path());
        let here = HostKey::generate().unwrap();
        let there = HostKey::generate().unwrap();
        assert_eq!(state.add_host(&there.public()).unwrap(), 1);
        // Granting the same host again changes nothing.
        let before = fs::read(paths.current()).unwrap();
        assert_eq!(state.add_host(&there.public()).unwrap(), 1);
        assert_eq!(fs::read(paths.current()).unwrap(), before);

        let opened = open(&paths, Credential::Host(&there)).unwrap();
        assert_eq!(opened.unlocked_slot(), Some(1));
        assert!(
            opened
                .swtpm_state_key()
                .unwrap()
                .ct_eq(&state.swtpm_state_key().unwrap())
        );
        let e = open(&paths, Credential::Host(&here)).unwrap_err();
        assert!(
            matches!(
                &e,
                VaultError::NoKeyslot {
                    kind: SlotKind::Host,
                    for_host: Some(f),
                    ..
                } if *f == here.public().fingerprint_hex()
            ),
            "{e}"
        );
        let slots = state.keyslots();
        assert_eq!(slots[1].kind, SlotKind::Host);
        assert_eq!(
            slots[1].host_fingerprint.as_deref(),
            Some(there.public().fingerprint_hex().as_str())
        );
        let info = vtpmd::vault::inspect(paths.current()).unwrap();
        assert_eq!(info.format_version, 2);
        assert_eq!(info.keyslots[1].kind, "host");
        assert_eq!(info.keyslots[0].kind, "argon2id-passphrase");

        // Copied to another guest's path, the host slot is refused like any.
        let moved = SealedPaths::new(dir.path().join("other.sealed"));
        fs::copy(paths.current(), moved.current()).unwrap();
        assert!(matches!(
            SealedState::open_with(
                moved,
                GuestId::parse(OTHER_GUEST).unwrap(),
                Credential::Host(&there),
                &weak_policy()
            ),
            Err(VaultError::GuestMismatch { .. })
        ));

        // The last slot never goes, whatever its kind.
        state.remove_keyslot(0).unwrap();
        assert!(matches!(
            state.remove_keyslot(0),
            Err(VaultError::LastKeyslot { index: 0 })
        ));
        assert!(matches!(
            state.change_passphrase_of(0, &passphrase("x"), &weak_policy()),
            Err(VaultError::NotAPassphraseSlot { index: 0, .. })
        ));
    }
}
