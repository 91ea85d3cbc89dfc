//! Delete and Rekey.

use std::sync::{Arc, PoisonError};

use crate::error_chain::chain;
use crate::protocol::GuestId;
use crate::secret::SecretBuf;
use crate::store::{self, InUse};
use crate::vault::SealedState;

use super::guest::Slot;
use super::state::{Action, Allowed, GuestState, permit};
use super::{EventKind, Shared, SupervisorError, blocking, space};

/// Removes both generations and the guest's directory (its uid record
/// with it), and frees its uid. Refused while the guest runs.
pub(super) async fn delete(shared: Arc<Shared>, id: GuestId) -> Result<(), SupervisorError> {
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let mut slot = guest.lock(shared.config.lock_wait).await?;
    permit(id, guest.state(), Action::Delete)?;
    super::cluster::forget(&shared, id).await?;
    forget(&shared, id, &mut slot).await?;
    let info = guest.info();
    drop(slot);
    tracing::debug!(guest = %id, "guest deleted");
    shared.publish(EventKind::Deleted, info, None);
    Ok(())
}

/// Removes everything of a guest that does not run (its run, if it had
/// one, has ended): its sealed files and directory, a runtime directory
/// no live swtpm uses, its tmpfs, its key, uid and registry entry. Call
/// with the guest's operation lock held (`slot`): whoever takes it next
/// finds no guest. Delete, and a migration's destination letting go.
pub(super) async fn forget(
    shared: &Shared,
    id: GuestId,
    slot: &mut Slot,
) -> Result<(), SupervisorError> {
    let store = shared.store.clone();
    blocking(id, "delete", move || {
        SealedState::delete(&store.sealed_paths(id))
            .map_err(|e| SupervisorError::from_vault(id, "delete", e))?;
        store
            .remove_guest_dir(id)
            .map_err(|source| SupervisorError::Store {
                guest: id,
                op: "remove the guest directory",
                source,
            })?;
        // A failed guest may have left a runtime directory that a live
        // swtpm of an earlier vtpmd still uses: that one stays.
        let dir = store.runtime_state_dir(id);
        let socket = store.ctrl_socket(id);
        if store::in_use(&dir, Some(&socket)) == InUse::No {
            for result in [store::wipe_dir(&dir), store::remove_socket(&socket)] {
                if let Err(e) = result {
                    tracing::warn!(guest = %id, "cleaning the runtime directory: {}", chain(&e));
                }
            }
        }
        Ok::<_, SupervisorError>(())
    })
    .await??;
    space::release(shared, id).await;
    super::cluster::dropped(shared, id);
    slot.deleted = true;
    slot.unsealed_leftover = false;
    shared.handover.remove(id);
    shared.registry.remove(id);
    if let Some(pool) = &shared.uids {
        pool.release(id);
    }
    Ok(())
}

/// Whether the keyslots may change now (Rekey, Grant, Revoke), and how:
/// as Rekey's state table says, except that a guest running without its
/// key (adopted) has nothing in memory to keep in step, so its files are
/// rewritten as at rest.
pub(super) fn permit_keyslot_change(
    id: GuestId,
    state: GuestState,
    slot: &Slot,
) -> Result<Allowed, SupervisorError> {
    Ok(match permit(id, state, Action::Rekey)? {
        Allowed::RekeyRunning if slot.run.as_ref().is_some_and(|r| r.sealer.is_none()) => {
            Allowed::RekeyAtRest
        }
        allowed => allowed,
    })
}

/// Rewraps the keyslot `passphrase` opens under `new_passphrase`. Returns
/// what the caller must hear of: each sealed file left as it was because
/// it is damaged (the old passphrase still opens it).
pub(super) async fn rekey(
    shared: Arc<Shared>,
    id: GuestId,
    passphrase: SecretBuf,
    new_passphrase: SecretBuf,
) -> Result<Vec<String>, SupervisorError> {
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let slot = guest.lock(shared.config.lock_wait).await?;
    let state = guest.state();
    let allowed = permit_keyslot_change(id, state, &slot)?;
    let paths = shared.store.sealed_paths(id);
    let policy = shared.config.kdf;
    let running = slot.run.is_some();
    let _claim = if matches!(allowed, Allowed::RekeyRunning | Allowed::RekeyAtRest) {
        Some(super::cluster::claim_for_keyslot_change(&shared, id, running).await?)
    } else {
        None
    };
    let (left_as_is, generation) = match allowed {
        Allowed::RekeyRunning => {
            let Some(sealer) = slot.run.as_ref().and_then(|r| r.sealer.clone()) else {
                return Err(SupervisorError::GuestNotRunning { guest: id, state });
            };
            shared
                .kdf(id, "rekey", move || {
                    // The old passphrase must open the file: holding the
                    // key in memory is no licence to change it.
                    let opened = SealedState::open(paths, id, &passphrase, &policy);
                    drop(passphrase);
                    let opened = opened.map_err(|e| SupervisorError::from_vault(id, "open", e))?;
                    // The slot the old passphrase opens, not the one the
                    // guest was started with (a key or host slot, maybe).
                    let index = opened
                        .state
                        .unlocked_slot()
                        .ok_or(SupervisorError::WrongPassphrase { guest: id })?;
                    drop(opened);
                    // Rewrap through the running guest's own state, so its
                    // next reseal writes the new keyslot, not the old one.
                    let mut held = sealer.lock().unwrap_or_else(PoisonError::into_inner);
                    let left = held
                        .change_passphrase_of(index, &new_passphrase, &policy)
                        .map_err(|e| SupervisorError::from_vault(id, "rekey", e))?;
                    Ok::<_, SupervisorError>((left, held.generation()))
                })
                .await??
        }
        Allowed::RekeyAtRest => {
            shared
                .kdf(id, "rekey", move || {
                    let opened = SealedState::open(paths, id, &passphrase, &policy);
                    drop(passphrase);
                    let mut state = opened
                        .map_err(|e| SupervisorError::from_vault(id, "open", e))?
                        .state;
                    let left = state
                        .change_passphrase(&new_passphrase, &policy)
                        .map_err(|e| SupervisorError::from_vault(id, "rekey", e))?;
                    Ok::<_, SupervisorError>((left, state.generation()))
                })
                .await??
        }
        Allowed::Start
        | Allowed::Stop
        | Allowed::Delete
        | Allowed::ExportAtRest
        | Allowed::ExportRunning
        | Allowed::ImportOver => {
            return Err(SupervisorError::NotAllowed {
                guest: id,
                state,
                action: Action::Rekey,
            });
        }
    };
    guest.update(|i| i.generation = i.generation.max(generation));
    drop(slot);
    tracing::info!(guest = %id, left_as_is = left_as_is.len(), generation, "passphrase changed");
    Ok(left_as_is.iter().map(ToString::to_string).collect())
}
