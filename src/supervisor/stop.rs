//! Stop, Drain, and the daemon's shutdown, which stops no guest.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinSet;

use crate::error_chain::chain;
use crate::protocol::GuestId;

use super::finish::{Ending, finish};
use super::guest::Guest;
use super::reseal::reseal_now;
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
    if slot.run.is_none() {
        // `running` without a run cannot happen; say so rather than panic.
        let info = guest.update(|i| {
            i.state = GuestState::Stopped;
            i.pid = None;
            i.ctrl_socket = None;
        });
        tracing::error!(guest = %id, "running without a swtpm; marked stopped");
        return Ok(info);
    }
    let stopping = guest.update(|i| i.state = GuestState::Stopping);
    shared.publish(EventKind::Stopping, stopping, None);
    Ok(finish(&shared, &guest, &mut slot, Ending::Stop).await)
}

/// Stops every running guest (in parallel), each as Stop does: for host
/// maintenance, since a restart of vtpmd stops none. Returns the guests it
/// stopped, as they settled.
pub(super) async fn drain(shared: Arc<Shared>) -> Result<Vec<GuestInfo>, SupervisorError> {
    let _admitted = shared.enter().await?;
    let mut stops = JoinSet::new();
    for guest in shared.registry.all() {
        let shared = Arc::clone(&shared);
        stops.spawn(async move {
            let mut slot = guest.lock_unbounded().await;
            if slot.deleted || slot.run.is_none() {
                return None;
            }
            let stopping = guest.update(|i| i.state = GuestState::Stopping);
            shared.publish(EventKind::Stopping, stopping, None);
            Some(finish(&shared, &guest, &mut slot, Ending::Stop).await)
        });
    }
    let mut stopped = Vec::new();
    while let Some(done) = stops.join_next().await {
        match done {
            Ok(Some(info)) => stopped.push(info),
            Ok(None) => {}
            Err(e) => tracing::error!("stopping a guest for a drain failed: {e}"),
        }
    }
    stopped.sort_by_key(|i| i.guest);
    tracing::info!(guests = stopped.len(), "drained: every guest stopped");
    Ok(stopped)
}

/// The daemon's SIGTERM: refuses new operations, waits for those in
/// flight, then reseals every running guest once, durably, and lets its
/// swtpm run on for the next vtpmd to adopt (it finds it through the run
/// record; its key waits in the fd store, or for a Start). Nothing is
/// wiped and no guest is stopped.
///
/// Operations still queued for a KDF permit give up at once (ShuttingDown,
/// nothing done): after a burst of hundreds of Starts, waiting for every
/// queued Argon2 would hold a SIGTERM for minutes, past systemd's stop
/// timeout. Derivations already running finish.
pub(super) async fn shutdown(shared: Arc<Shared>) {
    shared.shutting_down.store(true, Ordering::SeqCst);
    shared.kdf_permits.close();
    let _exclusive = Arc::clone(&shared.gate).write_owned().await;
    let mut handovers = JoinSet::new();
    for guest in shared.registry.all() {
        handovers.spawn(async move { hand_over(&guest).await });
    }
    let mut left_running = 0;
    while let Some(done) = handovers.join_next().await {
        match done {
            Ok(true) => left_running += 1,
            Ok(false) => {}
            Err(e) => tracing::error!("handing a guest over at shutdown failed: {e}"),
        }
    }
    tracing::info!(
        guests = left_running,
        "supervisor shut down; running guests keep their swtpm"
    );
}

/// Reseals `guest` a last time and lets its swtpm go on running. Returns
/// whether it had one.
async fn hand_over(guest: &Arc<Guest>) -> bool {
    let mut slot = guest.lock_unbounded().await;
    let Some(mut run) = slot.run.take() else {
        return false;
    };
    if let Some(resealer) = run.resealer.take() {
        resealer.abort();
        let _ = resealer.await;
    }
    if let Some(watcher) = run.watcher.take() {
        watcher.abort();
        let _ = watcher.await;
    }
    let pid = run.swtpm.pid();
    let (sealer, dir, swtpm) = (run.sealer, run.dir, run.swtpm);
    let id = guest.id;
    let resealed = tokio::task::spawn_blocking(move || {
        let resealed = sealer.as_ref().map(|s| reseal_now(s, &dir));
        // The process runs on; the key leaves this vtpmd's memory here
        // (a copy waits in the fd store, if there is one).
        swtpm.detach();
        drop(sealer);
        resealed
    })
    .await;
    match resealed {
        Ok(Some(Ok((generation, written)))) => {
            let written = written.is_some();
            tracing::info!(guest = %id, pid, generation, written, "sealed; swtpm left running for the next vtpmd")
        }
        Ok(Some(Err(e))) => tracing::error!(
            guest = %id, pid,
            "the last reseal before exiting failed: {}; the runtime directory keeps the writes for the next vtpmd",
            chain(&e)
        ),
        Ok(None) => {
            tracing::info!(guest = %id, pid, "swtpm left running (its key is still needed to reseal)")
        }
        Err(e) => tracing::error!(guest = %id, "the hand-over task failed: {e}"),
    }
    true
}
