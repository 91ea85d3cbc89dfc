//! Export and Import: a guest's sealed file leaves this host or arrives
//! from another, the building blocks of cold migration, shelve/unshelve
//! and evacuation. Neither needs a passphrase: the file is ciphertext, and
//! what can be checked without its key (the structure and whose it is) is
//! checked before anything is written.
//!
//! One writer per guest: Export hands out a copy and changes nothing (a
//! running guest is resealed first, so the copy holds every write swtpm
//! acknowledged); Import never touches a guest that runs, never rolls one
//! back (the file must be newer than every sound generation here), and
//! never replaces writes that are not sealed yet.

use std::path::Path;
use std::sync::Arc;

use crate::error_chain::chain;
use crate::protocol::{GuestId, TpmSpec};
use crate::vault::{self, HeaderInfo, Placement, SealedFile, VaultError};

use super::create::NewGuest;
use super::finish::LEFTOVER_REASON;
use super::guest::{Guest, Slot};
use super::recover::spec_of;
use super::registry::{Reservation, Taken};
use super::state::{Action, Allowed, GuestState, permit};
use super::{EventKind, GuestInfo, Shared, SupervisorError, blocking, reseal};

/// How errors name the file that came with an Import.
const IMPORTED: &str = "the imported sealed file";

/// A sealed file handed out by Export.
#[derive(Debug, Clone)]
pub struct Exported {
    pub sealed: Vec<u8>,
    /// The generation in its header.
    pub generation: u64,
}

pub(super) async fn export(shared: Arc<Shared>, id: GuestId) -> Result<Exported, SupervisorError> {
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let slot = guest.lock(shared.config.lock_wait).await?;
    let file = match permit(id, guest.state(), Action::Export)? {
        Allowed::ExportRunning => export_running(&shared, &guest, &slot).await?,
        Allowed::ExportAtRest => {
            if slot.unsealed_leftover {
                return Err(unsealed_leftover(&guest));
            }
            let paths = shared.store.sealed_paths(id);
            blocking(id, "read the sealed file", move || {
                export_at_rest(&paths, id)
            })
            .await??
        }
        other => {
            tracing::error!(guest = %id, ?other, "the state table allowed an export as something else");
            return Err(SupervisorError::NotAllowed {
                guest: id,
                state: guest.state(),
                action: Action::Export,
            });
        }
    };
    drop(slot);
    let generation = file.header.generation;
    tracing::info!(guest = %id, generation, bytes = file.bytes.len(), "sealed file exported");
    Ok(Exported {
        sealed: file.bytes,
        generation,
    })
}

/// Reseals what the running swtpm wrote (nothing is written when the file
/// holds it already), then reads the file under the same lock, so no
/// reseal can come between.
async fn export_running(
    shared: &Arc<Shared>,
    guest: &Arc<Guest>,
    slot: &Slot,
) -> Result<SealedFile, SupervisorError> {
    let id = guest.id;
    let Some(run) = slot.run.as_ref() else {
        return Err(SupervisorError::GuestNotRunning {
            guest: id,
            state: guest.state(),
        });
    };
    let Some(sealer) = run.sealer.clone() else {
        return Err(SupervisorError::UnsealedWrites {
            guest: id,
            reason: "it runs without its key (adopted after a vtpmd restart that could not bring the key back), so what its swtpm wrote since cannot be sealed; Start it with the passphrase (which re-attaches and seals), then Export".to_owned(),
        });
    };
    let dir = run.dir.clone();
    let (file, written) = blocking(id, "reseal for the export", move || {
        reseal::reseal_and_read(&sealer, &dir, id)
    })
    .await?
    .map_err(|e| SupervisorError::from_vault(id, "reseal for the export", e))?;
    let generation = file.header.generation;
    if written {
        // A reseal like any other: in cluster mode etcd must hold it too.
        super::cluster::resealed(shared, id);
    }
    let info = guest.update(|i| i.generation = i.generation.max(generation));
    let detail = if written {
        format!("generation {generation}, resealed for the export")
    } else {
        format!("generation {generation}, which held every write already")
    };
    shared.publish(EventKind::Exported, info, Some(detail));
    Ok(file)
}

/// The current file, checked as far as it can be without the key. A
/// damaged current file is refused rather than the previous generation
/// handed out in its place: Export cannot open either body, so it cannot
/// tell whether `.prev` opens, and a destination importing it would start
/// a generation behind without the warning a local fallback gives. A
/// Start here falls back, saying so, and its first reseal repairs the
/// current file.
fn export_at_rest(paths: &vault::SealedPaths, id: GuestId) -> Result<SealedFile, SupervisorError> {
    match vault::read_sealed(paths.current(), id) {
        Ok(file) => Ok(file),
        Err(e @ (VaultError::Corrupt { .. } | VaultError::Missing { .. })) => {
            let previous = vault::read_sealed(paths.previous(), id).ok();
            let advice = match previous {
                Some(p) => format!(
                    "the previous generation {} beside it passes the header checks: Start the guest here with its passphrase (it falls back to that generation and its first reseal replaces the damaged file), Stop it, then Export",
                    p.header.generation
                ),
                None => "no sound previous generation is here either: Import a copy (an earlier Export or a backup)".to_owned(),
            };
            Err(SupervisorError::StateCorrupt {
                guest: id,
                what: format!(
                    "{}; Export does not fall back to the previous generation, whose body it cannot check without the key; {advice}",
                    chain(&e)
                ),
            })
        }
        Err(e) => Err(SupervisorError::from_vault(id, "read", e)),
    }
}

fn unsealed_leftover(guest: &Guest) -> SupervisorError {
    let info = guest.info();
    SupervisorError::UnsealedWrites {
        guest: guest.id,
        reason: info
            .reason
            .or(info.failure)
            .unwrap_or_else(|| LEFTOVER_REASON.to_owned()),
    }
}

/// Registers `sealed` as guest `id` on this host, `stopped`: a guest this
/// host does not know gets a directory and a swtpm uid as Create gives
/// them; a known one that is not running gets the file as its next
/// generation, if it is newer than every sound generation here. In
/// cluster mode the guest must be nobody's (or this host's) and the file
/// no older than etcd's newest; it goes to etcd, and the guest is let go.
pub(super) async fn import(
    shared: Arc<Shared>,
    id: GuestId,
    sealed: Vec<u8>,
) -> Result<GuestInfo, SupervisorError> {
    let header = vault::check_sealed(Path::new(IMPORTED), &sealed, id)
        .map_err(|e| SupervisorError::from_vault(id, "check", e))?;
    super::cluster::claim_for_import(&shared, id, header.generation).await?;
    let taken = take_in(Arc::clone(&shared), id, sealed).await;
    if taken.is_ok() {
        super::cluster::resealed(&shared, id);
    }
    super::cluster::release(&shared, id);
    taken
}

/// Evacuate (cluster mode): the guest of a host whose lease expired,
/// taken over with the newest state etcd holds and started here, its
/// generations from now on above anything that host may have sealed and
/// never replicated.
pub(super) async fn evacuate(
    shared: Arc<Shared>,
    id: GuestId,
    unlock: super::Unlock,
) -> Result<GuestInfo, SupervisorError> {
    let Some(cluster) = shared.cluster.clone() else {
        return Err(SupervisorError::NotInClusterMode {
            guest: id,
            what: "Evacuate",
        });
    };
    if let Some(guest) = shared.registry.get(id) {
        let state = guest.state();
        if state != GuestState::Stopped && state != GuestState::Failed {
            return Err(SupervisorError::GuestRunning { guest: id, state });
        }
    }
    let (generation, sealed) = cluster
        .evacuate(id)
        .await
        .map_err(|e| super::cluster::refused(id, e))?;
    let evacuated = async {
        let here = shared.registry.get(id).map(|g| g.info().generation);
        if here != Some(generation) {
            take_in(Arc::clone(&shared), id, sealed).await?;
        }
        let guest = shared.guest(id)?;
        guest.lock(shared.config.lock_wait).await?.generation_floor =
            Some(generation + super::migrate::GENERATION_LEAP);
        super::start::start_guest(Arc::clone(&shared), id, unlock).await
    }
    .await;
    if evacuated.is_err() {
        super::cluster::release(&shared, id);
    }
    evacuated
}

/// Import's local part: the checks against what this host holds, and
/// the write.
async fn take_in(
    shared: Arc<Shared>,
    id: GuestId,
    sealed: Vec<u8>,
) -> Result<GuestInfo, SupervisorError> {
    let _admitted = shared.enter().await?;
    // Validate everything first: nothing is written until each check passed.
    let header = vault::check_sealed(Path::new(IMPORTED), &sealed, id)
        .map_err(|e| SupervisorError::from_vault(id, "check", e))?;
    let Some(spec) = spec_of(&header) else {
        return Err(SupervisorError::StateCorrupt {
            guest: id,
            what: format!(
                "{IMPORTED} names TPM {} with {}, which vtpmd does not know",
                header.tpm_version, header.tpm_model
            ),
        });
    };
    if !shared.host.supports(spec.version()) {
        return Err(SupervisorError::UnsupportedTpm {
            version: spec.version(),
        });
    }
    // A Create or Delete of the same id may come between the look-up and
    // the reservation; a few tries settle which case this is.
    let mut tries = 0;
    let reservation = loop {
        tries += 1;
        match shared.registry.reserve(id) {
            Ok(reservation) => break reservation,
            Err(Taken::Exists(_)) => {
                if let Some(guest) = shared.registry.get(id) {
                    return import_over(&shared, &guest, sealed, &header).await;
                }
            }
            Err(Taken::BeingCreated) => return Err(SupervisorError::Busy { guest: id }),
        }
        if tries == 3 {
            return Err(SupervisorError::Busy { guest: id });
        }
    };

    let (info, uid) = register_new(
        &shared,
        reservation,
        sealed,
        &header,
        spec,
        GuestState::Stopped,
    )
    .await?;
    tracing::debug!(guest = %id, %spec, generation = header.generation, swtpm_uid = ?uid, "guest imported");
    shared.publish(
        EventKind::Imported,
        info.clone(),
        Some(format!(
            "generation {}, a guest new to this host",
            header.generation
        )),
    );
    Ok(info)
}

/// Registers `sealed` (checked already: `header` is its) as a guest new
/// to this host, `stopped`, as Create would: a swtpm uid recorded beside
/// it, its directory and file written durably. Nothing is left on
/// failure. Import and MigrateIn both take a guest in this way, in
/// `state` (MigrateIn: `starting`, so no Start comes between it and the
/// swtpm it runs). Returns the guest's snapshot and its swtpm uid.
pub(super) async fn register_new(
    shared: &Arc<Shared>,
    reservation: Reservation<'_>,
    sealed: Vec<u8>,
    header: &HeaderInfo,
    spec: TpmSpec,
    state: GuestState,
) -> Result<(GuestInfo, Option<u32>), SupervisorError> {
    let id = header.guest;
    let placed = NewGuest::place(shared, id).await?;
    let uid = placed.uid;
    let store = shared.store.clone();
    let paths = store.sealed_paths(id);
    blocking(id, "write the imported sealed file", {
        let store = store.clone();
        move || {
            vault::install(&paths, &sealed, Placement::New)
                .map_err(|e| SupervisorError::from_vault(id, "write", e))?;
            if let Some(uid) = uid {
                store
                    .write_owner(id, uid)
                    .map_err(|source| SupervisorError::Store {
                        guest: id,
                        op: "record the swtpm uid",
                        source,
                    })?;
            }
            Ok::<_, SupervisorError>(())
        }
    })
    .await??;
    placed.keep();
    let info = GuestInfo {
        guest: id,
        spec,
        state,
        pid: None,
        ctrl_socket: None,
        generation: header.generation,
        failure: None,
        reason: None,
        keyslots: header.slot_summaries(),
        replication: None,
    };
    reservation.commit(Guest::new(info.clone()));
    Ok((info, uid))
}

/// The import over a guest this host knows.
async fn import_over(
    shared: &Arc<Shared>,
    guest: &Arc<Guest>,
    sealed: Vec<u8>,
    header: &HeaderInfo,
) -> Result<GuestInfo, SupervisorError> {
    let id = guest.id;
    let slot = guest.lock(shared.config.lock_wait).await?;
    permit(id, guest.state(), Action::Import)?;
    if slot.unsealed_leftover {
        return Err(unsealed_leftover(guest));
    }
    let generation = header.generation;
    let keyslots = header.slot_summaries();
    let paths = shared.store.sealed_paths(id);
    let replaced = blocking(id, "write the imported sealed file", move || {
        let here =
            vault::on_disk(&paths, id).map_err(|e| SupervisorError::from_vault(id, "read", e))?;
        if let Some(current) = here.newest().filter(|&newest| generation <= newest) {
            return Err(SupervisorError::StaleGeneration {
                guest: id,
                generation,
                current,
            });
        }
        let placement = here.placement();
        vault::install(&paths, &sealed, placement)
            .map_err(|e| SupervisorError::from_vault(id, "write", e))?;
        Ok((here.newest(), placement))
    })
    .await??;
    let (before, placement) = replaced;
    let spec = spec_of(header).unwrap_or(guest.info().spec);
    let info = guest.update(|i| {
        i.spec = spec;
        i.state = GuestState::Stopped;
        i.generation = generation;
        i.failure = None;
        i.reason = None;
        i.keyslots = keyslots;
    });
    drop(slot);
    let detail = match (before, placement) {
        (Some(before), Placement::Rotate) => {
            format!("generation {generation} over generation {before}, now the previous one")
        }
        (_, Placement::ReplaceCurrent) => format!(
            "generation {generation} in place of a current file that did not check out (the previous generation, if any, is kept)"
        ),
        _ => format!("generation {generation}"),
    };
    tracing::debug!(guest = %id, generation, "{detail}");
    shared.publish(EventKind::Imported, info.clone(), Some(detail));
    Ok(info)
}
