//! A guest's TPM from birth to rest, with the parts vtpmd is made of (until
//! the daemon lands, this is its main job done by hand):
//!
//! 1. provision a TPM 2.0 with swtpm_setup, encrypted by swtpm under the
//!    guest's state key from the first byte, and seal it under a passphrase
//!    (Argon2id, default parameters); the plaintext directory is wiped;
//! 2. open it, spawn swtpm on it (the control socket is bound by us and
//!    handed over as an fd, the key goes through a pipe);
//! 3. attach as QEMU does and run real TPM commands (Startup, GetRandom,
//!    NV define/write);
//! 4. the VMM quits; reseal generation 2 and wipe;
//! 5. a wrong passphrase is refused; 6. the right one finds the NV data.
//!
//! `cargo run --release --example attach_real_tpm` (needs swtpm and swtpm-tools).

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};
use vtpmd::swtpm::probe::{self, Binaries};
use vtpmd::swtpm::provision::{ProvisionSpec, provision};
use vtpmd::swtpm::spawn::{SpawnSpec, Swtpm, spawn};
use vtpmd::vault::{self, KdfPolicy, SealedPaths, SealedState, StateArchive, VaultError};

const NV_INDEX: u32 = 0x0150_0016;
const NV_DATA: &[u8] = b"hello from the guest";
const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> Result<(), Box<dyn Error>> {
    let bins = Binaries::default();
    let host = probe::probe(&bins)?;
    println!(
        "0. swtpm {} serves TPM {:?}; traits {:?}",
        host.swtpm_version,
        host.versions,
        host.traits()
    );

    let work = tempfile::tempdir()?;
    let guest = GuestId::parse("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40")?;
    let spec = TpmSpec::new(TpmVersion::V2_0, TpmModel::Crb)?;
    let policy = KdfPolicy::default();
    let passphrase = SecretBuf::random(32)?;
    let paths = SealedPaths::new(work.path().join("tpm.sealed"));
    let runtime = work.path().join("run");
    let ctrl = work.path().join("ctrl.sock");

    // 1. Provision under the state key, seal under the passphrase.
    let started = Instant::now();
    std::fs::create_dir(&runtime)?;
    let empty = StateArchive::default();
    let mut sealed = SealedState::create(paths.clone(), guest, spec, &passphrase, &policy, &empty)?;
    let state_key = sealed.swtpm_state_key()?;
    let setup = ProvisionSpec::new(TpmVersion::V2_0);
    let report = provision(&bins, &runtime, &state_key, &setup, None)?;
    sealed.seal(&StateArchive::from_dir(&runtime)?)?;
    std::fs::remove_dir_all(&runtime)?;
    drop((sealed, state_key));
    println!(
        "1. swtpm_setup took {:?}; sealed under {} (total {:?}); plaintext removed",
        report.elapsed,
        policy.params,
        started.elapsed()
    );

    // 2. Open, unseal into the runtime directory, spawn.
    let started = Instant::now();
    let (mut sealed, mut swtpm) = start(&paths, guest, &passphrase, &policy, &runtime, &ctrl)?;
    println!(
        "2. opened generation {} and spawned swtpm (pid {}) in {:?}; control socket {}",
        sealed.generation(),
        swtpm.pid(),
        started.elapsed(),
        ctrl.display()
    );

    // 3. Act as the VMM.
    let mut vmm = Vmm::attach(&ctrl, TIMEOUT)?;
    let startup = vmm.transact(&tpm::tpm2_startup_clear())?;
    let random = vmm.transact(&tpm::tpm2_get_random(8))?;
    let attrs = nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
    let define = vmm.transact(&tpm::tpm2_nv_define_space(NV_INDEX, attrs, 32))?;
    let write = vmm.transact(&tpm::tpm2_nv_write(NV_INDEX, NV_DATA, 0)?)?;
    println!(
        "3. as a VMM: Startup rc={:#x}, GetRandom {:02x?}, NV_DefineSpace rc={:#x}, NV_Write rc={:#x}",
        startup.rc,
        random.tpm2_random_bytes()?,
        define.rc,
        write.rc
    );

    // 4. The VMM quits; reseal; wipe.
    vmm.shutdown()?;
    let exit = swtpm.wait_exit(TIMEOUT)?;
    let generation = sealed.seal(&StateArchive::from_dir(&runtime)?)?;
    std::fs::remove_dir_all(&runtime)?;
    drop(sealed);
    println!("4. swtpm exited ({exit:?}); resealed as generation {generation}; plaintext removed");
    let info = vault::inspect(paths.current())?;
    println!("   sealed header: {}", serde_json::to_string(&info)?);

    // 5. A wrong passphrase.
    let mut wrong = SecretBuf::with_capacity(5)?;
    wrong.extend_from_slice(b"guess")?;
    match SealedState::open(paths.clone(), guest, &wrong, &policy) {
        Err(e @ VaultError::WrongPassphrase { .. }) => {
            println!("5. a wrong passphrase is refused: {e}")
        }
        other => return Err(format!("expected WrongPassphrase, got {other:?}").into()),
    }

    // 6. The right one, and the data is there.
    let (_sealed, mut swtpm) = start(&paths, guest, &passphrase, &policy, &runtime, &ctrl)?;
    let mut vmm = Vmm::attach(&ctrl, TIMEOUT)?;
    vmm.transact(&tpm::tpm2_startup_clear())?;
    let len = u16::try_from(NV_DATA.len())?;
    let read = vmm.transact(&tpm::tpm2_nv_read(NV_INDEX, len, 0))?;
    println!(
        "6. with the right passphrase, NV index {NV_INDEX:#x} reads {:?}",
        String::from_utf8_lossy(read.tpm2_nv_data()?)
    );
    vmm.shutdown()?;
    swtpm.wait_exit(TIMEOUT)?;
    Ok(())
}

/// Open the sealed state, write its files into `runtime`, spawn swtpm.
fn start(
    paths: &SealedPaths,
    guest: GuestId,
    passphrase: &SecretBuf,
    policy: &KdfPolicy,
    runtime: &Path,
    ctrl: &Path,
) -> Result<(SealedState, Swtpm), Box<dyn Error>> {
    let opened = SealedState::open(paths.clone(), guest, passphrase, policy)?;
    std::fs::create_dir(runtime)?;
    opened.archive.write_to_dir(runtime)?;
    let state_key = opened.state.swtpm_state_key()?;
    let version = opened.state.spec().version();
    let swtpm = Binaries::default().swtpm;
    let mut spec = SpawnSpec::new(swtpm, version, guest, runtime, ctrl, &state_key);
    spec.early_exit_window = Duration::ZERO;
    Ok((opened.state, spawn(&spec)?))
}
