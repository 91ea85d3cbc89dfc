//! The pidfd watcher: swtpm's exit is noticed the moment it happens (the
//! pidfd turns readable), without polling, and the run is ended.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use super::finish::{Ending, finish};
use super::guest::Guest;
use super::{Shared, fdwatch};

/// Watches run `epoch` of `guest` through `pidfd` (a duplicate of the
/// [`Swtpm`](crate::swtpm::spawn::Swtpm)'s own).
pub(super) fn spawn(
    shared: Arc<Shared>,
    guest: Arc<Guest>,
    epoch: u64,
    pidfd: OwnedFd,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        match fdwatch::readable(pidfd) {
            Ok(fd) => {
                if let Err(e) = fd.readable().await {
                    tracing::error!(guest = %guest.id, "cannot wait on swtpm's pidfd: {e}; its exit will only be seen by Stop");
                    return;
                }
            }
            Err(e) => {
                tracing::error!(guest = %guest.id, "cannot register swtpm's pidfd: {e}; its exit will only be seen by Stop");
                return;
            }
        }
        let noticed = Instant::now();
        let mut slot = guest.lock_unbounded().await;
        // Stop or shutdown may have ended this run already (and a new one
        // may have begun).
        if slot.run.as_ref().map(|r| r.epoch) != Some(epoch) {
            return;
        }
        let info = finish(&shared, &guest, &mut slot, Ending::Exited).await;
        drop(slot);
        tracing::info!(
            guest = %guest.id,
            state = %info.state,
            handled_us = noticed.elapsed().as_micros(),
            "swtpm exited"
        );
    })
}
