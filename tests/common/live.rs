//! QEMU's part of a live migration, as QEMU 7.2's tpm_emulator plays it,
//! through the real control channels of the two swtpms.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use vtpmd::swtpm::ctrl::{BlobType, CtrlClient, DataChannel, StateBlob, Vmm};

const TIMEOUT: Duration = Duration::from_secs(20);

/// QEMU's source side: the blobs it reads from swtpm (decrypted from the
/// state key, so only the migration key protects them).
pub fn read_blobs(vmm: &mut Vmm) -> Vec<(BlobType, StateBlob)> {
    [BlobType::Permanent, BlobType::Volatile]
        .into_iter()
        .map(|blob| (blob, vmm.ctrl().get_state_blob(blob, true).unwrap()))
        .collect()
}

/// QEMU's destination side (`-incoming`): the prologue without INIT,
/// STOP, each blob, INIT. Returns the data channel.
pub fn set_blobs(ctrl: &Path, blobs: Vec<(BlobType, StateBlob)>) -> (CtrlClient, DataChannel) {
    let mut ctrl = CtrlClient::connect(ctrl, TIMEOUT).unwrap();
    let (data, theirs) = DataChannel::new_pair().unwrap();
    ctrl.set_data_fd(theirs.as_fd()).unwrap();
    drop(theirs);
    ctrl.stop().unwrap();
    for (blob, got) in blobs {
        ctrl.set_state_blob(blob, got.encrypted, got.data).unwrap();
    }
    ctrl.init(true).unwrap();
    (ctrl, data)
}
