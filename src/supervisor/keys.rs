//! The ways into a guest's sealed state other than a passphrase, and the
//! keyslot changes that go with them: Create's policies, Start with a key
//! or with this host's key, Grant (a host slot for another host) and
//! Revoke. Nova's vTPM secret policies map onto Create's: `user` (the
//! owner's passphrase only), `host` (also a slot for this host, so it can
//! start the guest unattended) and `deployment` (also a slot for a key the
//! deployment's key manager holds).

use std::sync::{Arc, PoisonError};

use crate::protocol::GuestId;
use crate::secret::SecretBuf;
use crate::vault::{
    Credential, HostKey, HostPublicKey, KdfPolicy, Opened, SealedPaths, SealedState, SlotSummary,
    VaultError,
};

use super::state::Allowed;
use super::{Shared, SupervisorError, blocking};

/// What a caller opens a guest's state with.
pub enum Unlock {
    /// The owner's passphrase (Argon2id).
    Passphrase(SecretBuf),
    /// A 32-byte key from a key manager (HKDF; no stretching).
    Key(SecretBuf),
    /// Nothing: this host's own key opens its host slot.
    ThisHost,
}

impl std::fmt::Debug for Unlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Passphrase(_) => "Unlock::Passphrase(<redacted>)",
            Self::Key(_) => "Unlock::Key(<redacted>)",
            Self::ThisHost => "Unlock::ThisHost",
        })
    }
}

impl Unlock {
    /// Only Argon2id needs one of the KDF permits: a key or host open
    /// costs microseconds and must not queue behind passphrase Starts.
    pub(super) fn needs_kdf_permit(&self) -> bool {
        matches!(self, Self::Passphrase(_))
    }

    pub(super) fn credential<'a>(&'a self, host: &'a HostKey) -> Credential<'a> {
        match self {
            Self::Passphrase(p) => Credential::Passphrase(p),
            Self::Key(k) => Credential::Key(k),
            Self::ThisHost => Credential::Host(host),
        }
    }

    /// Opens the sealed state (falling back to the previous generation on
    /// damage, as every open does).
    pub(super) fn open(
        &self,
        paths: SealedPaths,
        id: GuestId,
        host: &HostKey,
        policy: &KdfPolicy,
    ) -> Result<Opened, VaultError> {
        SealedState::open_with(paths, id, self.credential(host), policy)
    }
}

/// Which slots a new guest gets besides its owner's passphrase slot.
pub enum CreatePolicy {
    /// The passphrase only (Nova's `user`).
    User,
    /// Also a host slot for this host (Nova's `host`).
    Host,
    /// Also a key slot for the caller's key (Nova's `deployment`).
    Deployment(SecretBuf),
}

impl std::fmt::Debug for CreatePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::User => "CreatePolicy::User",
            Self::Host => "CreatePolicy::Host",
            Self::Deployment(_) => "CreatePolicy::Deployment(<redacted>)",
        })
    }
}

impl CreatePolicy {
    /// Adds the policy's slots to a state prepared with its passphrase
    /// slot (nothing is on disk yet, so nothing is written).
    pub(super) fn apply(&self, state: &mut SealedState, host: &HostKey) -> Result<(), VaultError> {
        match self {
            Self::User => Ok(()),
            Self::Host => state.add_host(&host.public()).map(drop),
            Self::Deployment(key) => state.add_key(key).map(drop),
        }
    }
}

/// What a keyslot change does, once the state is open.
enum Change {
    Grant(HostPublicKey),
    Revoke(usize),
}

/// Adds a host slot for `host` (another host, e.g. a migration
/// destination, or this one); returns its index. The credential must open
/// the state: holding the key of a running guest is no licence to hand it
/// on.
pub(super) async fn grant(
    shared: Arc<Shared>,
    id: GuestId,
    unlock: Unlock,
    host: HostPublicKey,
) -> Result<(usize, Vec<SlotSummary>), SupervisorError> {
    change(shared, id, unlock, Change::Grant(host)).await
}

/// Removes keyslot `index` (never the last one). A running guest's state
/// in memory changes with the files; a stopped one is opened with the
/// credential, or with this host's key when none is given.
pub(super) async fn revoke(
    shared: Arc<Shared>,
    id: GuestId,
    unlock: Unlock,
    index: usize,
) -> Result<(usize, Vec<SlotSummary>), SupervisorError> {
    change(shared, id, unlock, Change::Revoke(index)).await
}

async fn change(
    shared: Arc<Shared>,
    id: GuestId,
    unlock: Unlock,
    change: Change,
) -> Result<(usize, Vec<SlotSummary>), SupervisorError> {
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let slot = guest.lock(shared.config.lock_wait).await?;
    let state = guest.state();
    let allowed = super::manage::permit_keyslot_change(id, state, &slot)?;
    let paths = shared.store.sealed_paths(id);
    let policy = shared.config.kdf;
    let host_key = Arc::clone(&shared.host_key);
    let sealer = match allowed {
        Allowed::RekeyRunning => slot.run.as_ref().and_then(|r| r.sealer.clone()),
        _ => None,
    };
    let running = slot.run.is_some();
    let _claim = super::cluster::claim_for_keyslot_change(&shared, id, running).await?;
    let needs_permit = unlock.needs_kdf_permit();
    let work = move || {
        // The credential must open the file, running or not.
        let opened = unlock.open(paths, id, &host_key, &policy);
        drop(unlock);
        let opened = opened.map_err(|e| SupervisorError::from_vault(id, "open", e))?;
        let apply = |state: &mut SealedState| -> Result<usize, VaultError> {
            match &change {
                Change::Grant(host) => state.add_host(host),
                Change::Revoke(index) => state.remove_keyslot(*index).map(|()| *index),
            }
        };
        match sealer {
            // Through the running guest's own state, so its next reseal
            // writes the new keyslots, not the old ones.
            Some(sealer) => {
                let mut held = sealer.lock().unwrap_or_else(PoisonError::into_inner);
                let index = apply(&mut held).map_err(|e| keyslot_error(id, e))?;
                Ok((index, held.keyslots(), held.generation()))
            }
            None => {
                let mut state = opened.state;
                let index = apply(&mut state).map_err(|e| keyslot_error(id, e))?;
                Ok::<_, SupervisorError>((index, state.keyslots(), state.generation()))
            }
        }
    };
    let (index, keyslots, generation) = if needs_permit {
        shared.kdf(id, "change the keyslots of", work).await??
    } else {
        blocking(id, "change the keyslots of", work).await??
    };
    guest.update(|i| {
        i.keyslots = keyslots.clone();
        i.generation = i.generation.max(generation);
    });
    drop(slot);
    tracing::info!(guest = %id, index, keyslots = keyslots.len(), "keyslots changed");
    Ok((index, keyslots))
}

fn keyslot_error(id: GuestId, e: VaultError) -> SupervisorError {
    match e {
        VaultError::LastKeyslot { index } => SupervisorError::LastKeyslot { guest: id, index },
        VaultError::NoSuchKeyslot { index } => SupervisorError::NoSuchKeyslot { guest: id, index },
        VaultError::KeyslotsFull { max } => SupervisorError::KeyslotsFull { guest: id, max },
        other => SupervisorError::from_vault(id, "change the keyslots of", other),
    }
}
