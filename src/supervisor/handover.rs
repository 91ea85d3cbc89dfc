//! Keys across a restart of vtpmd, through memory only.
//!
//! When a guest starts (or a Start re-attaches to it), its handover (the
//! data key and the keyslot it was unlocked with, see
//! [`SealedState::handover`]) goes into a memfd (`memfd_secret` where the
//! kernel has it) that is handed to the service manager's file-descriptor
//! store under the name `key-<uuid>`: pushed at once, so that even a crash
//! of vtpmd a moment later loses nothing, and removed when the guest's run
//! ends. systemd keeps the fds while the service restarts (also after a
//! crash with `Restart=`) and passes them back to the next vtpmd, which
//! adopts the guest's swtpm and goes on resealing it without asking anyone
//! for the passphrase. No file ever holds a key. Without a service manager
//! (vtpmd run by hand) there is no store: an adopted guest then waits for
//! a Start with its passphrase.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error_chain::chain;
use crate::protocol::GuestId;
use crate::secret::{self as keyfd, SecretBuf};
use crate::systemd::Notifier;
use crate::vault::SealedState;

/// Name prefix of a guest's key in the fd store.
const KEY_PREFIX: &str = "key-";
/// A handover is 34 bytes; anything much larger is not one.
const MAX_HANDOVER: usize = 256;

/// What the service manager passed at start-up, and where to push keys.
#[derive(Debug, Default)]
pub struct KeyStore {
    /// `None`: no service manager, so no fd store.
    pub notifier: Option<Arc<Notifier>>,
    /// The fds passed back by the fd store (LISTEN_FDNAMES names).
    pub stored: Vec<(String, OwnedFd)>,
}

/// The supervisor's side of the fd store.
#[derive(Debug)]
pub(super) struct Handover {
    notifier: Option<Arc<Notifier>>,
    /// Keys passed back at start-up and not yet claimed by recovery.
    passed: Mutex<BTreeMap<GuestId, OwnedFd>>,
}

impl Handover {
    pub(super) fn new(store: KeyStore) -> Self {
        let mut passed = BTreeMap::new();
        for (name, fd) in store.stored {
            match name.strip_prefix(KEY_PREFIX).map(GuestId::parse) {
                Some(Ok(guest)) => {
                    passed.insert(guest, fd);
                }
                _ => {
                    tracing::warn!(
                        name,
                        "an fd of unknown purpose came back from the fd store; dropped"
                    );
                    if let Some(n) = &store.notifier {
                        if let Err(e) = n.remove_fd(&name) {
                            tracing::warn!(name, "cannot remove it from the fd store: {e}");
                        }
                    }
                }
            }
        }
        if !passed.is_empty() {
            tracing::info!(keys = passed.len(), "keys came back from the fd store");
        }
        Handover {
            notifier: store.notifier,
            passed: Mutex::new(passed),
        }
    }

    fn passed(&self) -> MutexGuard<'_, BTreeMap<GuestId, OwnedFd>> {
        self.passed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `guest`'s key into the fd store (replacing an older one). A
    /// failure is logged, not fatal: the guest runs on, and only a restart
    /// of vtpmd would then need its passphrase again.
    pub(super) fn push(&self, guest: GuestId, state: &SealedState) {
        let Some(notifier) = &self.notifier else {
            return;
        };
        let stored = state
            .handover()
            .map_err(|e| chain(&e))
            .and_then(|key| keyfd::seal_into_fd(&key).map_err(|e| chain(&e)))
            .and_then(|fd| {
                // FDSTORE=1 with a name already stored adds a second fd of
                // that name: remove the old one first.
                let name = key_name(guest);
                let _ = notifier.remove_fd(&name);
                notifier
                    .store_fd(&name, fd.as_fd())
                    .map_err(|e| e.to_string())
            });
        match stored {
            Ok(()) => tracing::debug!(%guest, "key handed to the fd store"),
            Err(e) => {
                tracing::warn!(%guest, "cannot hand the key to the fd store: {e}; a restart of vtpmd will need the passphrase")
            }
        }
    }

    /// Removes `guest`'s key from the fd store (its run ended).
    pub(super) fn remove(&self, guest: GuestId) {
        self.passed().remove(&guest);
        if let Some(notifier) = &self.notifier {
            if let Err(e) = notifier.remove_fd(&key_name(guest)) {
                tracing::warn!(%guest, "cannot remove the key from the fd store: {e}");
            }
        }
    }

    /// The key passed back for `guest`, if any (once); the fd stays in the
    /// store, which still holds it for the next restart.
    pub(super) fn take(&self, guest: GuestId) -> Option<SecretBuf> {
        let fd = self.passed().remove(&guest)?;
        match keyfd::read_from_fd(fd.as_fd(), MAX_HANDOVER) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(%guest, "the key that came back from the fd store is unreadable: {}", chain(&e));
                None
            }
        }
    }

    /// Drops the keys no guest claimed (a guest deleted meanwhile, state
    /// gone): they must not linger in the store.
    pub(super) fn forget_unclaimed(&self) {
        let left: Vec<GuestId> = self.passed().keys().copied().collect();
        for guest in left {
            tracing::info!(%guest, "a key came back for a guest with nothing to resume; removed from the fd store");
            self.remove(guest);
        }
    }
}

fn key_name(guest: GuestId) -> String {
    format!("{KEY_PREFIX}{guest}")
}
