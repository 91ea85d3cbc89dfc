//! Stop, and the daemon's shutdown (Stop for every running guest).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinSet;

use crate::protocol::GuestId;

use super::finish::{Ending, finish};
use super::guest::Guest;
use super::state::{Action, GuestState, permit};
use super::{EventKind, GuestInfo, Shared, SupervisorError};

pub(super) async fn stop_guest(
    shared: Arc<Shared>,
    id: GuestId,
) -> Result<GuestInfo, SupervisorError> {
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let mut slot = guest.lock(shared.config.lock_wait).await?;
    permit(id, guest.state(), Action::Stop)?;
    let Some(run) = slot.run.take() else {
        // `running` without a run cannot happen; say so rather than panic.
        let info = guest.update(|i| {
            i.state = GuestState::Stopped;
            i.pid = None;
            i.ctrl_socket = None;
        });
        tracing::error!(guest = %id, "running without a swtpm; marked stopped");
        return Ok(info);
    };
    let stopping = guest.update(|i| i.state = GuestState::Stopping);
    shared.publish(EventKind::Stopping, stopping, None);
    Ok(finish(&shared, &guest, run, Ending::Stop).await)
}

/// Refuses new operations, waits for those in flight, then stops every
/// running guest (in parallel), each with a final reseal and wipe.
///
/// Operations still queued for a KDF permit give up at once (ShuttingDown,
/// nothing done): after a burst of hundreds of Starts, waiting for every
/// queued Argon2 would hold a SIGTERM for minutes, past systemd's stop
/// timeout, whose SIGKILL then skips the final reseals. Derivations already
/// running finish.
pub(super) async fn shutdown(shared: Arc<Shared>) {
    shared.shutting_down.store(true, Ordering::SeqCst);
    shared.kdf_permits.close();
    let _exclusive = Arc::clone(&shared.gate).write_owned().await;
    let mut stops = JoinSet::new();
    for guest in shared.registry.all() {
        let shared = Arc::clone(&shared);
        stops.spawn(async move { stop_for_shutdown(&shared, &guest).await });
    }
    while let Some(done) = stops.join_next().await {
        if let Err(e) = done {
            tracing::error!("stopping a guest at shutdown failed: {e}");
        }
    }
    tracing::info!("supervisor shut down");
}

async fn stop_for_shutdown(shared: &Shared, guest: &Arc<Guest>) {
    let mut slot = guest.lock_unbounded().await;
    if let Some(run) = slot.run.take() {
        let stopping = guest.update(|i| i.state = GuestState::Stopping);
        shared.publish(EventKind::Stopping, stopping, None);
        finish(shared, guest, run, Ending::Stop).await;
    }
}
