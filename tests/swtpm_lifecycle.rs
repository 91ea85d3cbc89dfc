//! The swtpm driver end to end, as vtpmd will compose it: provision a state
//! with swtpm_setup under the guest's state key, spawn swtpm on it through
//! the module, attach as a VMM does (SET_DATAFD + INIT), run real TPM
//! commands, shut down, spawn again and find the data.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vtpmd::protocol::{GuestId, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};
use vtpmd::swtpm::probe::Binaries;
use vtpmd::swtpm::provision::{LocalCa, ProvisionSpec, provision};
use vtpmd::swtpm::spawn::{ExitReason, SpawnSpec, Swtpm, spawn};

const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const NV_INDEX: u32 = 0x0150_0016;
/// TCG's RSA EK certificate index, written by swtpm_setup --create-ek-cert.
const EK_CERT_INDEX: u32 = 0x01c0_0002;
const TIMEOUT: Duration = Duration::from_secs(5);

struct Guest {
    _root: tempfile::TempDir,
    state_dir: PathBuf,
    ctrl: PathBuf,
    key: SecretBuf,
    version: TpmVersion,
}

impl Guest {
    fn provisioned(version: TpmVersion, ek_certificate: bool) -> Self {
        let root = tempfile::tempdir().unwrap();
        let state_dir = root.path().join("state");
        fs::create_dir(&state_dir).unwrap();
        let key = SecretBuf::random(32).unwrap();
        let ca = ek_certificate.then(|| LocalCa::open(&root.path().join("ca")).unwrap());
        let spec = ProvisionSpec {
            ek_certificate,
            ..ProvisionSpec::new(version)
        };
        provision(&Binaries::default(), &state_dir, &key, &spec, ca.as_ref())
            .unwrap_or_else(|e| panic!("{}", vtpmd::error_chain::chain(&e)));
        let ctrl = root.path().join("ctrl.sock");
        Self {
            _root: root,
            state_dir,
            ctrl,
            key,
            version,
        }
    }

    fn spawn_with(&self, key: &SecretBuf) -> Swtpm {
        let spec = SpawnSpec::new(
            Binaries::default().swtpm,
            self.version,
            GuestId::parse(GUEST).unwrap(),
            &self.state_dir,
            &self.ctrl,
            key,
        );
        spawn(&spec).unwrap_or_else(|e| panic!("{}", vtpmd::error_chain::chain(&e)))
    }

    fn spawn(&self) -> Swtpm {
        self.spawn_with(&self.key)
    }
}

fn started(ctrl: &Path) -> Vmm {
    let mut vmm = Vmm::attach(ctrl, TIMEOUT).unwrap();
    let startup = vmm.transact(&tpm::tpm2_startup_clear()).unwrap();
    assert_eq!(startup.rc, 0, "TPM2_Startup");
    vmm
}

#[test]
fn tpm2_nv_data_survives_a_shutdown_and_a_new_swtpm() {
    let guest = Guest::provisioned(TpmVersion::V2_0, false);
    let data = b"written through vtpmd's swtpm";
    let attrs = nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;

    let mut first = guest.spawn();
    let mut vmm = started(first.ctrl_path());
    let random = vmm.transact(&tpm::tpm2_get_random(16)).unwrap();
    let define = vmm
        .transact(&tpm::tpm2_nv_define_space(NV_INDEX, attrs, 64))
        .unwrap();
    let write = vmm
        .transact(&tpm::tpm2_nv_write(NV_INDEX, data, 0).unwrap())
        .unwrap();
    vmm.shutdown().unwrap();
    let exit = first.wait_exit(TIMEOUT).unwrap();

    let mut second = guest.spawn();
    let mut vmm = started(second.ctrl_path());
    let read = vmm
        .transact(&tpm::tpm2_nv_read(
            NV_INDEX,
            u16::try_from(data.len()).unwrap(),
            0,
        ))
        .unwrap();
    let stopped = second.stop(TIMEOUT).unwrap();

    assert_eq!(random.rc, 0);
    assert_eq!(random.tpm2_random_bytes().unwrap().len(), 16);
    assert_eq!((define.rc, write.rc), (0, 0), "NV_DefineSpace, NV_Write");
    assert_eq!(
        exit,
        Some(ExitReason::Exited(0)),
        "swtpm after CMD_SHUTDOWN"
    );
    assert_eq!(read.rc, 0, "NV_Read");
    assert_eq!(read.tpm2_nv_data().unwrap(), data);
    assert_eq!(stopped, ExitReason::Exited(0));
    assert!(!guest.ctrl.exists(), "control socket left behind");
    assert!(
        !guest.state_dir.join(".lock").exists(),
        "lock file left behind"
    );
}

#[test]
fn the_ek_certificate_is_readable_through_the_tpm() {
    let guest = Guest::provisioned(TpmVersion::V2_0, true);
    let mut swtpm = guest.spawn();
    let mut vmm = started(swtpm.ctrl_path());

    let read = vmm
        .transact(&tpm::tpm2_nv_read(EK_CERT_INDEX, 16, 0))
        .unwrap();
    swtpm.stop(TIMEOUT).unwrap();

    assert_eq!(read.rc, 0, "NV_Read of the EK certificate");
    let der = read.tpm2_nv_data().unwrap();
    assert_eq!(
        &der[..2],
        &[0x30, 0x82],
        "a DER SEQUENCE with a two-byte length"
    );
}

#[test]
fn the_vmm_hanging_up_ends_swtpm_by_itself() {
    let guest = Guest::provisioned(TpmVersion::V2_0, false);
    let mut swtpm = guest.spawn();
    let vmm = started(swtpm.ctrl_path());

    drop(vmm); // QEMU gone: its data channel closes (--terminate)
    let exit = swtpm.wait_exit(TIMEOUT).unwrap();

    assert_eq!(exit, Some(ExitReason::Exited(0)));
}

#[test]
fn another_key_cannot_read_the_state_and_swtpm_says_why() {
    let guest = Guest::provisioned(TpmVersion::V2_0, false);
    let wrong = SecretBuf::random(32).unwrap();
    let mut swtpm = guest.spawn_with(&wrong);

    let attach = Vmm::attach(swtpm.ctrl_path(), TIMEOUT);
    swtpm.stop(TIMEOUT).unwrap();

    assert!(attach.is_err(), "INIT succeeded with the wrong key");
    let log = swtpm.log_tail().join("\n");
    assert!(log.contains("HMAC"), "swtpm's log does not say why: {log}");
}

#[test]
fn tpm12_answers_startup_and_get_random() {
    let guest = Guest::provisioned(TpmVersion::V1_2, false);
    let mut swtpm = guest.spawn();
    let mut vmm = Vmm::attach(swtpm.ctrl_path(), TIMEOUT).unwrap();

    let startup = vmm.transact(&tpm::tpm12_startup_clear()).unwrap();
    let random = vmm.transact(&tpm::tpm12_get_random(8)).unwrap();
    let caps = vmm.capabilities();
    vmm.shutdown().unwrap();
    let exit = swtpm.wait_exit(TIMEOUT).unwrap();

    assert_eq!(
        caps, 0x7fff,
        "TPM 1.2 has no send-command-header capability"
    );
    assert_eq!(startup.rc, 0, "TPM_Startup(ST_CLEAR)");
    assert_eq!(random.rc, 0, "TPM_GetRandom");
    assert_eq!(random.tpm12_random_bytes().unwrap().len(), 8);
    assert_eq!(exit, Some(ExitReason::Exited(0)));
}
