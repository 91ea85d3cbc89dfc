//! Taking over at start-up what an earlier vtpmd left running or unsealed.
//!
//! A live swtpm (found and proven by `recover`) becomes the guest's run
//! again, with the same pid and control socket, watched through its pidfd
//! like a child. With its key back from the fd store, the sealed state is
//! resumed, whatever swtpm wrote while no vtpmd ran is sealed at once, and
//! resealing goes on; without it the guest is `running` with the reason,
//! until a Start brings the passphrase (`reattach`), unless it has a host
//! slot for this host: then this host's key opens it, as a key come back
//! would. A runtime directory
//! whose swtpm ended meanwhile is sealed when its key came back, and kept
//! for the next Start otherwise.

use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

use crate::error_chain::chain;
use crate::secret::SecretBuf;
use crate::store;
use crate::swtpm::spawn::Swtpm;
use crate::vault::SealedState;

use super::finish::LEFTOVER_REASON;
use super::guest::{Guest, Run, Slot};
use super::recover::Found;
use super::state::GuestState;
use super::{EventKind, Shared, Unlock, blocking, exit, space};
use super::{reseal, resealer};

/// Why an adopted guest runs without resealing.
pub(super) const KEY_NEEDED_REASON: &str = "key needed to reseal: its swtpm was adopted after a vtpmd restart that brought no key back; Start with the passphrase re-attaches to it (the VMM stays attached)";

/// Takes over every guest recovery found something of; returns how many
/// swtpms were adopted.
pub(super) async fn take_over(shared: &Arc<Shared>, found: Vec<(Arc<Guest>, Found)>) -> usize {
    let mut tasks = JoinSet::new();
    for (guest, what) in found {
        let shared = Arc::clone(shared);
        tasks.spawn(async move {
            let mut slot = guest.lock_unbounded().await;
            match what {
                Found::Live(swtpm) => {
                    adopt_live(&shared, &guest, &mut slot, *swtpm).await;
                    true
                }
                Found::Leftover => {
                    seal_leftover(&shared, &guest, &mut slot).await;
                    false
                }
            }
        });
    }
    let mut adopted = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(true) => adopted += 1,
            Ok(false) => {}
            Err(e) => tracing::error!("taking over a guest failed: {e}"),
        }
    }
    adopted
}

async fn adopt_live(shared: &Arc<Shared>, guest: &Arc<Guest>, slot: &mut Slot, swtpm: Swtpm) {
    let id = guest.id;
    let pid = swtpm.pid();
    let dir = shared.store.runtime_state_dir(id);
    let socket = shared.store.ctrl_socket(id);
    let pidfd = swtpm.pidfd().try_clone_to_owned();
    // In the background: a scope's start job waits for vtpmd.service's own
    // (the scope is ordered after it), which ends only at READY=1, after
    // this start-up. Normally the swtpm is in its scope already.
    let for_scope = Arc::clone(shared);
    tokio::spawn(async move { for_scope.scopes.place(id, pid, true).await });
    let epoch = slot.next_epoch();
    let mut run = Run {
        epoch,
        swtpm,
        sealer: None,
        resealer: None,
        watcher: None,
        dir: dir.clone(),
        socket: socket.clone(),
    };
    let mut generation = None;
    let key = match shared.handover.take(id) {
        Some(key) => Some(key),
        None => own_host_key(shared, guest).await,
    };
    let (reason, detail) = match key {
        None => (
            Some(KEY_NEEDED_REASON.to_owned()),
            format!(
                "adopted the running swtpm (pid {pid}); no key came back, so nothing is resealed until a Start with the passphrase"
            ),
        ),
        Some(key) => match resume(shared, guest, &mut run, key).await {
            Ok(caught_up) => {
                generation = Some(caught_up.generation);
                (
                    None,
                    format!(
                        "adopted the running swtpm (pid {pid}) with its key; resealed after restart: {}",
                        caught_up.describe()
                    ),
                )
            }
            Err(e) => (
                Some(KEY_NEEDED_REASON.to_owned()),
                format!(
                    "adopted the running swtpm (pid {pid}), but its key did not serve ({e}); nothing is resealed until a Start with the passphrase"
                ),
            ),
        },
    };
    match pidfd {
        Ok(pidfd) => {
            run.watcher = Some(exit::spawn(
                Arc::clone(shared),
                Arc::clone(guest),
                epoch,
                pidfd,
            ))
        }
        Err(e) => {
            tracing::error!(guest = %id, "cannot watch the adopted swtpm's pidfd: {e}; its exit will only be seen by Stop")
        }
    }
    // A write an earlier vtpmd saw this swtpm lose is still lost.
    let reason = match (run.swtpm.store_failure(), reason) {
        (Some(line), None) => Some(super::lost_write::describe(&line)),
        (Some(line), Some(also)) => Some(format!("{}; {also}", super::lost_write::describe(&line))),
        (None, reason) => reason,
    };
    shared.metrics.adopted(run.sealer.is_some());
    slot.run = Some(run);
    let info = guest.update(|i| {
        i.state = GuestState::Running;
        i.pid = Some(pid);
        i.ctrl_socket = Some(socket);
        i.failure = None;
        i.reason = reason;
        if let Some(g) = generation {
            i.generation = i.generation.max(g);
        }
    });
    tracing::debug!(guest = %id, pid, "{detail}");
    shared.publish(EventKind::Adopted, info, Some(detail));
}

/// When no key came back: a guest with a host slot for this host needs
/// none (its `host` policy says this host may open it alone), so its
/// state is opened with this host's key and handed over as if it had come
/// back. `None` for every other guest, or if that open fails (logged).
async fn own_host_key(shared: &Arc<Shared>, guest: &Arc<Guest>) -> Option<SecretBuf> {
    let id = guest.id;
    let fingerprint = shared.host_key.public().fingerprint_hex();
    let has_slot = guest.info().keyslots.iter().any(|s| {
        s.kind == crate::vault::SlotKind::Host
            && s.host_fingerprint.as_deref() == Some(fingerprint.as_str())
    });
    if !has_slot {
        return None;
    }
    let paths = shared.store.sealed_paths(id);
    let host_key = Arc::clone(&shared.host_key);
    let policy = shared.config.kdf;
    let opened = blocking(id, "open with this host's key", move || {
        Unlock::ThisHost
            .open(paths, id, &host_key, &policy)
            .and_then(|opened| opened.state.handover())
    })
    .await;
    match opened {
        Ok(Ok(key)) => {
            tracing::info!(guest = %id, "no key came back; this host's key opened its host slot");
            Some(key)
        }
        Ok(Err(e)) => {
            tracing::warn!(guest = %id, "no key came back, and this host's key does not open the guest: {}", chain(&e));
            None
        }
        Err(e) => {
            tracing::warn!(guest = %id, "{}", chain(&e));
            None
        }
    }
}

/// Resumes the sealed state with the key that came back, seals what
/// swtpm wrote while no vtpmd ran and starts resealing. Returns the
/// generation sealed.
async fn resume(
    shared: &Arc<Shared>,
    guest: &Arc<Guest>,
    run: &mut Run,
    key: crate::secret::SecretBuf,
) -> Result<reseal::CaughtUp, String> {
    let id = guest.id;
    let paths = shared.store.sealed_paths(id);
    let opened = blocking(id, "resume", move || SealedState::resume(paths, id, &key))
        .await
        .map_err(|e| chain(&e))?
        .map_err(|e| chain(&e))?;
    // Watch before reading: a write after this point raises a reseal.
    let watch = shared.watch(id, &run.dir).map_err(|e| chain(&e))?;
    let (mut state, sealed, dir) = (opened.state, opened.archive, run.dir.clone());
    let (caught_up, state) = blocking(id, "reseal", move || {
        let caught_up = reseal::catch_up(&mut state, &sealed, &dir);
        (caught_up, state)
    })
    .await
    .map_err(|e| chain(&e))?;
    let caught_up = caught_up.map_err(|e| chain(&e))?;
    let sealer = Arc::new(Mutex::new(state));
    run.resealer = Some(resealer::spawn(
        Arc::clone(shared),
        Arc::clone(guest),
        Arc::clone(&sealer),
        run.dir.clone(),
        watch,
    ));
    run.sealer = Some(sealer);
    Ok(caught_up)
}

/// A runtime directory whose swtpm ended while no vtpmd ran.
async fn seal_leftover(shared: &Arc<Shared>, guest: &Arc<Guest>, slot: &mut Slot) {
    let id = guest.id;
    let dir = shared.store.runtime_state_dir(id);
    let socket = shared.store.ctrl_socket(id);
    let key = match shared.handover.take(id) {
        Some(key) => Some(key),
        None => own_host_key(shared, guest).await,
    };
    let sealed = match key {
        None => Err("no key came back".to_owned()),
        Some(key) => {
            let paths = shared.store.sealed_paths(id);
            blocking(id, "seal the writes left behind", move || {
                let opened = SealedState::resume(paths, id, &key).map_err(|e| chain(&e))?;
                let mut state = opened.state;
                let caught_up =
                    reseal::catch_up(&mut state, &opened.archive, &dir).map_err(|e| chain(&e))?;
                // Sealed: now the plaintext may go.
                store::wipe_dir(&dir)
                    .and_then(|()| store::remove_socket(&socket))
                    .map_err(|e| chain(&e))?;
                Ok(caught_up)
            })
            .await
            .map_err(|e| chain(&e))
            .and_then(|r| r)
        }
    };
    match sealed {
        Ok(caught_up) => {
            shared.handover.remove(id);
            space::release(shared, id).await;
            let generation = caught_up.generation;
            let info = guest.update(|i| {
                i.generation = i.generation.max(generation);
                i.reason = None;
            });
            let detail = format!(
                "its swtpm ended while vtpmd was down; what it wrote is recovered: {}",
                caught_up.describe()
            );
            tracing::debug!(guest = %id, generation, "{detail}");
            shared.publish(EventKind::Stopped, info, Some(detail));
        }
        Err(why) => {
            tracing::warn!(guest = %id, "runtime directory kept for the next Start: {why}");
            slot.unsealed_leftover = true;
            guest.update(|i| {
                if i.state != GuestState::Failed {
                    i.reason = Some(LEFTOVER_REASON.to_owned());
                }
            });
        }
    }
}
