//! One guest: its snapshot (what Status and List read, never waiting) and
//! its operation lock, under which lives what a running guest owns.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::protocol::GuestId;
use crate::swtpm::spawn::Swtpm;
use crate::vault::SealedState;

use super::state::GuestState;
use super::{GuestInfo, SupervisorError};

/// How many reseal latencies are kept per guest.
const LATENCY_HISTORY: usize = 1024;

/// The unlocked state of a running guest, shared by the resealer and the
/// operations; dropping the last handle drops the key.
pub(super) type Sealer = Arc<Mutex<SealedState>>;

#[derive(Debug)]
pub(super) struct Guest {
    pub(super) id: GuestId,
    info: Mutex<GuestInfo>,
    /// Held for a whole operation; the exit watcher takes it too.
    slot: tokio::sync::Mutex<Slot>,
    latencies: Mutex<VecDeque<Duration>>,
}

/// What the operation lock protects.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// Present exactly while swtpm runs (state `running`, or `stopping`
    /// under the lock).
    pub(super) run: Option<Run>,
    /// Set by Delete: whoever takes the lock afterwards finds no guest.
    pub(super) deleted: bool,
    /// The runtime directory holds writes that are not sealed yet and no
    /// swtpm uses it (its swtpm ended while no key was at hand, or a final
    /// reseal failed): the next Start seals them before anything else, and
    /// nothing wipes the directory until then.
    pub(super) unsealed_leftover: bool,
    /// This run was handed out with MigrateOut: when it ends cleanly, the
    /// guest is `migrated-out`.
    pub(super) outgoing: Option<super::migrate::Outgoing>,
    /// This run is a migration's destination (MigrateIn), which Abort may
    /// still call off: the generation its state stands at until the first
    /// seal here (the ticket's plus the leap). A run that ends still at
    /// it never got the VMM's state.
    pub(super) incoming: Option<u64>,
    /// Evacuate: the next Start's first seal goes above this (etcd's
    /// generation plus the leap), above anything the dead host may have
    /// sealed locally and never replicated.
    pub(super) generation_floor: Option<u64>,
    next_epoch: u64,
}

impl Slot {
    /// A number for the next run, so an exit watcher of an earlier run
    /// never ends a later one.
    pub(super) fn next_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }
}

/// A running swtpm and everything that belongs to it.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) epoch: u64,
    pub(super) swtpm: Swtpm,
    /// `None` for a swtpm adopted after a restart that brought no key:
    /// nothing can be resealed until a Start brings the passphrase.
    pub(super) sealer: Option<Sealer>,
    /// Present with `sealer`.
    pub(super) resealer: Option<JoinHandle<()>>,
    pub(super) watcher: Option<JoinHandle<()>>,
    pub(super) dir: PathBuf,
    pub(super) socket: PathBuf,
}

impl Guest {
    pub(super) fn new(info: GuestInfo) -> Arc<Guest> {
        Arc::new(Guest {
            id: info.guest,
            info: Mutex::new(info),
            slot: tokio::sync::Mutex::new(Slot::default()),
            latencies: Mutex::new(VecDeque::new()),
        })
    }

    fn snapshot(&self) -> MutexGuard<'_, GuestInfo> {
        // A panic while updating a plain struct cannot break an invariant.
        self.info.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn info(&self) -> GuestInfo {
        self.snapshot().clone()
    }

    pub(super) fn state(&self) -> GuestState {
        self.snapshot().state
    }

    /// Changes the snapshot; returns the result.
    pub(super) fn update(&self, f: impl FnOnce(&mut GuestInfo)) -> GuestInfo {
        let mut info = self.snapshot();
        f(&mut info);
        info.clone()
    }

    /// Takes the operation lock, waiting at most `wait` ([`SupervisorError::Busy`]);
    /// a guest deleted meanwhile is [`SupervisorError::NoSuchGuest`].
    pub(super) async fn lock(
        &self,
        wait: Duration,
    ) -> Result<tokio::sync::MutexGuard<'_, Slot>, SupervisorError> {
        let slot = tokio::time::timeout(wait, self.slot.lock())
            .await
            .map_err(|_| SupervisorError::Busy { guest: self.id })?;
        if slot.deleted {
            return Err(SupervisorError::NoSuchGuest { guest: self.id });
        }
        Ok(slot)
    }

    /// The lock without a deadline (exit watcher, shutdown).
    pub(super) async fn lock_unbounded(&self) -> tokio::sync::MutexGuard<'_, Slot> {
        self.slot.lock().await
    }

    pub(super) fn record_latency(&self, latency: Duration) {
        let mut history = self
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if history.len() == LATENCY_HISTORY {
            history.pop_front();
        }
        history.push_back(latency);
    }

    pub(super) fn latencies(&self) -> Vec<Duration> {
        self.latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}
