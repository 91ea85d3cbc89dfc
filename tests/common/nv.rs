//! The test playing a VMM that uses its guest's TPM 2.0: NV data written
//! in one run and read back in another.

use std::path::Path;
use std::time::Duration;

use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};

/// The owner-readable/writable NV index the tests use.
pub const NV_INDEX: u32 = 0x0150_0016;
const TIMEOUT: Duration = Duration::from_secs(10);

/// As a VMM: attach, Startup, write `data` into a fresh NV index; the VMM
/// stays attached.
pub fn attach_and_write_nv(ctrl: &Path, data: &[u8]) -> Vmm {
    let mut vmm = Vmm::attach(ctrl, TIMEOUT).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    let attrs = nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
    let len = u16::try_from(data.len()).unwrap();
    let define = tpm::tpm2_nv_define_space(NV_INDEX, attrs, len);
    assert_eq!(vmm.transact(&define).unwrap().rc, 0, "NV_DefineSpace");
    let write = tpm::tpm2_nv_write(NV_INDEX, data, 0).unwrap();
    assert_eq!(vmm.transact(&write).unwrap().rc, 0, "NV_Write");
    vmm
}

/// As a VMM: attach, Startup, read `len` bytes of the NV index, quit.
pub fn read_nv(ctrl: &Path, len: usize) -> Vec<u8> {
    let mut vmm = Vmm::attach(ctrl, TIMEOUT).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    let read = vmm
        .transact(&tpm::tpm2_nv_read(NV_INDEX, u16::try_from(len).unwrap(), 0))
        .unwrap();
    assert_eq!(read.rc, 0, "NV_Read");
    let data = read.tpm2_nv_data().unwrap().to_vec();
    vmm.shutdown().unwrap();
    data
}

/// A VMM that keeps writing a counter into one NV index.
pub struct Writer {
    pub vmm: Vmm,
    pub acknowledged: u64,
}

impl Writer {
    pub fn attach(ctrl: &Path) -> Self {
        let mut vmm = Vmm::attach(ctrl, TIMEOUT).unwrap();
        assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
        let attrs =
            nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
        let define = tpm::tpm2_nv_define_space(NV_INDEX, attrs, 8);
        assert_eq!(vmm.transact(&define).unwrap().rc, 0, "NV_DefineSpace");
        Self {
            vmm,
            acknowledged: 0,
        }
    }

    /// A counter index defined through `vmm`, already started up.
    pub fn on(mut vmm: Vmm) -> Self {
        let attrs =
            nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
        assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
        let define = tpm::tpm2_nv_define_space(NV_INDEX, attrs, 8);
        assert_eq!(vmm.transact(&define).unwrap().rc, 0, "NV_DefineSpace");
        Self {
            vmm,
            acknowledged: 0,
        }
    }

    /// A VMM on a TPM whose counter index exists and holds `acknowledged`
    /// (the guest moved to another host).
    pub fn attach_existing(ctrl: &Path, acknowledged: u64) -> Self {
        let mut vmm = Vmm::attach(ctrl, TIMEOUT).unwrap();
        assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
        Self { vmm, acknowledged }
    }

    /// Writes the next values; each must be acknowledged with success.
    pub fn write(&mut self, count: u64) {
        for _ in 0..count {
            let value = self.acknowledged + 1;
            let cmd = tpm::tpm2_nv_write(NV_INDEX, &value.to_be_bytes(), 0).unwrap();
            let rsp = self.vmm.transact(&cmd).unwrap();
            assert_eq!(rsp.rc, 0, "NV_Write of {value} failed: {:#x}", rsp.rc);
            self.acknowledged = value;
        }
    }

    /// The VMM quits (CMD_SHUTDOWN): its swtpm exits.
    pub fn quit(self) -> u64 {
        self.vmm.shutdown().unwrap();
        self.acknowledged
    }
}

/// As a VMM on a fresh start: the value the TPM holds.
pub fn read_counter(ctrl: &Path) -> u64 {
    let data = read_nv(ctrl, 8);
    u64::from_be_bytes(data.try_into().unwrap())
}
