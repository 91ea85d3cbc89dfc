//! Walks the vault through a real TPM: swtpm_setup provisions a TPM 2.0
//! state with an endorsement key, the vault seals it under a passphrase
//! (default Argon2id parameters), the plaintext directory is wiped, and the
//! sealed file is opened again, once with the right passphrase and once
//! with a wrong one.
//!
//! `cargo run --release --example seal_real_tpm` (needs swtpm-tools).

use std::error::Error;
use std::process::Command;
use std::time::Instant;

use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{self, KdfPolicy, SealedPaths, SealedState, StateArchive, VaultError};

fn main() -> Result<(), Box<dyn Error>> {
    let work = tempfile::tempdir()?;
    let state_dir = work.path().join("tpmstate");
    std::fs::create_dir(&state_dir)?;
    let guest = GuestId::parse("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40")?;

    let started = Instant::now();
    let status = Command::new("swtpm_setup")
        .args([
            "--tpm2",
            "--createek",
            "--pcr-banks",
            "sha256",
            "--tpmstate",
        ])
        .arg(&state_dir)
        .arg("--logfile")
        .arg(work.path().join("swtpm_setup.log"))
        .status()
        .map_err(|e| format!("swtpm_setup: {e} (apt-get install swtpm-tools)"))?;
    if !status.success() {
        return Err("swtpm_setup failed".into());
    }
    println!(
        "1. swtpm_setup provisioned a TPM 2.0 with an EK in {:?}",
        started.elapsed()
    );

    let archive = StateArchive::from_dir(&state_dir)?;
    let passphrase = SecretBuf::random(32)?;
    let paths = SealedPaths::new(work.path().join("tpm.sealed"));
    let spec = TpmSpec::new(TpmVersion::V2_0, TpmModel::Crb)?;
    let policy = KdfPolicy::default();
    let started = Instant::now();
    SealedState::create(paths.clone(), guest, spec, &passphrase, &policy, &archive)?;
    std::fs::remove_dir_all(&state_dir)?;
    println!(
        "2. sealed {} files under {} in {:?}; plaintext directory removed",
        archive.entries().len(),
        policy.params,
        started.elapsed()
    );

    let info = vault::inspect(paths.current())?;
    println!("3. the sealed file's header, as `vtpmctl state inspect` shows it:");
    println!("{}", serde_json::to_string_pretty(&info)?);

    let started = Instant::now();
    let opened = SealedState::open(paths.clone(), guest, &passphrase, &policy)?;
    assert_eq!(opened.archive, archive);
    println!(
        "4. opened generation {} with the right passphrase in {:?}: state identical",
        opened.state.generation(),
        started.elapsed()
    );

    let mut wrong = SecretBuf::with_capacity(5)?;
    wrong.extend_from_slice(b"guess")?;
    match SealedState::open(paths, guest, &wrong, &policy) {
        Err(e @ VaultError::WrongPassphrase { .. }) => {
            println!("5. a wrong passphrase is refused: {e}")
        }
        other => return Err(format!("expected WrongPassphrase, got {other:?}").into()),
    }
    Ok(())
}
