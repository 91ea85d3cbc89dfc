//! A swtpm that says it could not store its state (its runtime file system
//! full or failing): the write is lost and its TPM answers TPM_RC_FAILURE
//! from then on. The guest keeps `running` (the VMM is still attached and
//! decides what to do) but says so in its `reason` and a `store-failed`
//! event at once, and its run ends `failed` (see `finish::settle`).

use std::sync::{Arc, Weak};

use crate::swtpm::spawn::Swtpm;

use super::guest::Guest;
use super::{EventKind, Shared};

/// What a guest whose swtpm lost a write says, with swtpm's line.
pub(super) fn describe(line: &str) -> String {
    format!(
        "swtpm could not store its state ({line}): that write is lost and its TPM answers TPM_RC_FAILURE until the guest is started again from its last sealed generation"
    )
}

/// Reports the lost write of `swtpm`'s run as soon as its log says so.
/// Weak handles: the hook lives in the log reader, which must keep
/// neither the supervisor nor the guest alive.
pub(super) fn report(shared: &Arc<Shared>, guest: &Arc<Guest>, swtpm: &Swtpm) {
    let (shared, guest): (Weak<Shared>, Weak<Guest>) =
        (Arc::downgrade(shared), Arc::downgrade(guest));
    swtpm.on_store_failure(Box::new(move |line| {
        let (Some(shared), Some(guest)) = (shared.upgrade(), guest.upgrade()) else {
            return;
        };
        let reason = describe(&line);
        tracing::error!(guest = %guest.id, "{reason}");
        // For a later vtpmd that adopts this swtpm: its run must still end
        // failed.
        if let Err(e) = shared.store.record_lost_write(guest.id, &line) {
            tracing::warn!(guest = %guest.id, "cannot record the lost write in the run record: {}", crate::error_chain::chain(&e));
        }
        let info = guest.update(|i| i.reason = Some(reason.clone()));
        shared.publish(EventKind::StoreFailed, info, Some(reason));
    }));
}
