//! The one way a run ends, whoever ends it (Stop, Drain, or swtpm exiting
//! by itself): stop the resealer, reap swtpm, reseal a last time, wipe the
//! plaintext directory (only once its state is sealed) and the socket,
//! drop the key (here and in the fd store), and settle in `stopped` or
//! `failed` with the reason. (A shutdown of vtpmd ends no run: see
//! `stop::shutdown`.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error_chain::chain;
use crate::store;
use crate::swtpm::spawn::{ExitReason, Swtpm};

use super::guest::{Guest, Run, Sealer, Slot};
use super::reseal::reseal_now;
use super::state::GuestState;
use super::{EventKind, GuestInfo, Shared, space};
use crate::metrics::ExitCause;

/// How long to wait for a swtpm whose pidfd said it exited to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// Who ends the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// swtpm exited on its own (VMM gone with `--terminate`, CMD_SHUTDOWN,
    /// a crash, a kill).
    Exited,
    /// Stop or daemon shutdown: SIGTERM, grace, SIGKILL.
    Stop,
    /// Cluster mode: the guest is not this host's any more (its lease
    /// expired, or etcd names another owner). swtpm is killed at once and
    /// nothing is resealed: what this host wrote since its last
    /// replicated reseal is not the guest's history any more. The
    /// plaintext goes.
    Fenced,
}

/// What winding down found.
#[derive(Debug)]
struct Outcome {
    exit: Result<Option<ExitReason>, String>,
    log_tail: Vec<String>,
    /// swtpm's line saying it could not store its state.
    lost_write: Option<String>,
    resealed: Result<u64, Unsealed>,
    wiped: Result<(), String>,
}

/// Ends the run in `slot` (which must hold one); call with the guest's
/// operation lock held. Updates the snapshot and publishes Stopped or
/// Failed. The runtime directory is wiped only once its state is sealed:
/// otherwise (no key, or the final reseal failed) it is kept and marked
/// for the next Start.
pub(super) async fn finish(
    shared: &Shared,
    guest: &Arc<Guest>,
    slot: &mut Slot,
    ending: Ending,
) -> GuestInfo {
    let Some(mut run) = slot.run.take() else {
        return guest.info();
    };
    // No reseal may race the final one: wait for the resealer to be gone
    // (one in flight on a blocking thread finishes first, under the
    // sealer's mutex).
    if let Some(resealer) = run.resealer.take() {
        resealer.abort();
        let _ = resealer.await;
    }
    if matches!(ending, Ending::Stop | Ending::Fenced) {
        if let Some(watcher) = run.watcher.take() {
            watcher.abort();
            let _ = watcher.await;
        }
    }
    let grace = shared.config.stop_grace;
    let Run {
        swtpm,
        sealer,
        dir,
        socket,
        ..
    } = run;
    let outcome =
        tokio::task::spawn_blocking(move || wind_down(swtpm, sealer, &dir, &socket, ending, grace))
            .await
            .unwrap_or_else(|e| Outcome {
                exit: Err(format!("the task ending swtpm failed: {e}")),
                log_tail: Vec::new(),
                lost_write: None,
                resealed: Err(Unsealed::Failed("not attempted".to_owned())),
                wiped: Err("not attempted".to_owned()),
            });
    let id = guest.id;
    // A wiped directory's tmpfs goes before the guest is said to be
    // stopped (release() leaves one that still holds writes).
    space::release(shared, id).await;
    // The run record goes with the process; the key with the sealed state.
    if let Err(e) = shared.store.remove_run_record(id) {
        tracing::warn!(guest = %id, "{}", chain(&e));
    }
    slot.unsealed_leftover =
        outcome.resealed.is_err() && !matches!(outcome.resealed, Err(Unsealed::Fenced));
    // Cluster mode: the last reseal goes to etcd, and then the guest is
    // let go (another host may start it). A run whose state could not be
    // sealed keeps its claim: its writes are only here.
    if outcome.resealed.is_ok() {
        super::cluster::run_ended(shared, id);
    }
    if !slot.unsealed_leftover {
        shared.handover.remove(id);
    }

    shared.metrics.swtpm_exit(exit_cause(ending, &outcome.exit));
    let (mut state, failure) = settle(ending, &outcome);
    let mut reason = match &outcome.resealed {
        Err(Unsealed::NoKey) => Some(LEFTOVER_REASON.to_owned()),
        _ => None,
    };
    // A migration's destination whose VMM left before the source's state
    // arrived (the destination QEMU died mid-way): nothing of the guest
    // is this host's, so nothing of it stays.
    if let Some(from) = slot.incoming.take() {
        if outcome.resealed.as_ref().is_ok_and(|g| *g <= from) && outcome.wiped.is_ok() {
            return super::migrate::forget_unarrived(shared, guest, slot).await;
        }
    }
    // A run handed out with MigrateOut that ended cleanly: its VMM moved.
    if let (Some(out), GuestState::Stopped) = (slot.outgoing.take(), state) {
        state = GuestState::MigratedOut;
        reason = Some(format!(
            "migrated out to host {} (from generation {}): Delete it here once it runs there",
            out.to, out.generation
        ));
    }
    let info = guest.update(|i| {
        i.state = state;
        i.pid = None;
        i.ctrl_socket = None;
        if let Ok(generation) = outcome.resealed {
            i.generation = i.generation.max(generation);
        }
        i.failure.clone_from(&failure);
        i.reason.clone_from(&reason);
    });
    // The event's own line (publish) says it to the journal.
    shared.publish(EventKind::settled(state), info.clone(), failure.or(reason));
    info
}

/// What a fenced guest says.
pub(super) const FENCED_REASON: &str = "fenced: this host does not own the guest in the cluster any more (its etcd lease expired, or another host took the guest over); its swtpm was killed and nothing it wrote since the last reseal in etcd was sealed";

/// What a stopped guest whose runtime directory was kept unsealed says.
pub(super) const LEFTOVER_REASON: &str = "its runtime directory holds writes that are not sealed yet (no key was at hand when its swtpm ended): the next Start seals them first";

/// Why the final state could not be sealed.
#[derive(Debug)]
enum Unsealed {
    /// The run had no key (adopted after a restart without one).
    NoKey,
    /// Not this host's to seal (fenced).
    Fenced,
    Failed(String),
}

/// The blocking part: reap, final reseal, wipe (only when sealed). The key
/// goes with the last handle on `sealer`, dropped here.
fn wind_down(
    mut swtpm: Swtpm,
    sealer: Option<Sealer>,
    dir: &Path,
    socket: &Path,
    ending: Ending,
    grace: Duration,
) -> Outcome {
    let exit = match ending {
        Ending::Exited => swtpm.wait_exit(REAP_WAIT),
        Ending::Stop => swtpm.stop(grace).map(Some),
        Ending::Fenced => swtpm.stop(Duration::ZERO).map(Some),
    }
    .map_err(|e| chain(&e));
    let log_tail = swtpm.log_tail();
    let lost_write = swtpm.store_failure();
    // Reaps (and if need be kills) whatever is left; removes the socket
    // and `.lock`.
    drop(swtpm);
    let resealed = match &sealer {
        _ if ending == Ending::Fenced => Err(Unsealed::Fenced),
        Some(sealer) => reseal_now(sealer, dir)
            .map(|(generation, _)| generation)
            .map_err(|e| Unsealed::Failed(chain(&e))),
        None => Err(Unsealed::NoKey),
    };
    drop(sealer);
    // Unsealed writes are sacred: a directory whose state did not make it
    // into the sealed file stays for the next Start.
    let wiped = match resealed {
        Ok(_) | Err(Unsealed::Fenced) => store::wipe_dir(dir),
        Err(_) => Ok(()),
    }
    .and_then(|()| store::remove_socket(socket))
    .map_err(|e| chain(&e));
    Outcome {
        exit,
        log_tail,
        lost_write,
        resealed,
        wiped,
    }
}

/// What ended a run, for the metrics.
fn exit_cause(ending: Ending, exit: &Result<Option<ExitReason>, String>) -> ExitCause {
    use nix::sys::signal::Signal;
    match (ending, exit) {
        (Ending::Stop | Ending::Fenced, _) => ExitCause::Stopped,
        (Ending::Exited, Ok(Some(ExitReason::Exited(0) | ExitReason::Unknown))) => {
            ExitCause::VmmQuit
        }
        (Ending::Exited, Ok(Some(ExitReason::Signaled(Signal::SIGKILL | Signal::SIGTERM)))) => {
            ExitCause::Killed
        }
        (Ending::Exited, _) => ExitCause::Crashed,
    }
}

/// The state a run ends in, and the reason when that is `failed`.
fn settle(ending: Ending, outcome: &Outcome) -> (GuestState, Option<String>) {
    let mut reasons = Vec::new();
    match (&outcome.exit, ending) {
        (Err(e), _) => reasons.push(format!("swtpm could not be reaped: {e}")),
        (Ok(_), Ending::Fenced) => reasons.push(FENCED_REASON.to_owned()),
        (Ok(Some(ExitReason::Exited(0) | ExitReason::Unknown)), _) | (Ok(_), Ending::Stop) => {}
        (Ok(Some(reason)), Ending::Exited) => {
            let last = outcome
                .log_tail
                .last()
                .map(|l| format!("; its last words: {l}"))
                .unwrap_or_default();
            reasons.push(format!("swtpm {reason}{last}"));
        }
        (Ok(None), Ending::Exited) => reasons.push("swtpm did not exit".to_owned()),
    }
    if let Some(line) = &outcome.lost_write {
        reasons.push(super::lost_write::describe(line));
    }
    if let Err(Unsealed::Failed(e)) = &outcome.resealed {
        reasons.push(format!(
            "the final reseal failed ({e}); its runtime directory is kept and the next Start seals it"
        ));
    }
    if let Err(e) = &outcome.wiped {
        reasons.push(format!("the plaintext directory could not be wiped: {e}"));
    }
    if reasons.is_empty() {
        (GuestState::Stopped, None)
    } else {
        (GuestState::Failed, Some(reasons.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    fn outcome(exit: Result<Option<ExitReason>, String>) -> Outcome {
        Outcome {
            exit,
            log_tail: vec!["last line".to_owned()],
            lost_write: None,
            resealed: Ok(3),
            wiped: Ok(()),
        }
    }

    #[test]
    fn a_clean_exit_or_a_stop_settles_stopped() {
        let clean = outcome(Ok(Some(ExitReason::Exited(0))));
        assert_eq!(settle(Ending::Exited, &clean), (GuestState::Stopped, None));
        let killed = outcome(Ok(Some(ExitReason::Signaled(Signal::SIGKILL))));
        assert_eq!(settle(Ending::Stop, &killed), (GuestState::Stopped, None));
    }

    #[test]
    fn a_crash_fails_with_the_signal_and_swtpms_last_words() {
        let killed = outcome(Ok(Some(ExitReason::Signaled(Signal::SIGKILL))));
        let (state, reason) = settle(Ending::Exited, &killed);
        assert_eq!(state, GuestState::Failed);
        let reason = reason.unwrap_or_default();
        assert!(
            reason.contains("SIGKILL") && reason.contains("last line"),
            "{reason}"
        );
    }

    #[test]
    fn a_lost_write_fails_the_guest_even_after_a_clean_exit() {
        let mut o = outcome(Ok(Some(ExitReason::Exited(0))));
        o.lost_write = Some("SWTPM_NVRAM_StoreData: Error (fatal)".to_owned());
        let (state, reason) = settle(Ending::Exited, &o);
        assert_eq!(state, GuestState::Failed);
        assert!(
            reason
                .unwrap_or_default()
                .contains("could not store its state")
        );
    }

    #[test]
    fn a_failed_final_reseal_fails_the_guest() {
        let mut o = outcome(Ok(Some(ExitReason::Exited(0))));
        o.resealed = Err(Unsealed::Failed("disk full".to_owned()));
        let (state, reason) = settle(Ending::Stop, &o);
        assert_eq!(state, GuestState::Failed);
        assert!(reason.unwrap_or_default().contains("disk full"));
    }
}
