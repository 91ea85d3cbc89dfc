//! Live migration, vtpmd to vtpmd through the orchestrator, with no
//! passphrase on either side.
//!
//! Source: `MigrateOut` seals the running guest once more (durably) and
//! answers that sealed file with a ticket: the data key sealed for the
//! destination's host key, bound to the guest and that generation, short
//! lived (`vault::ticket`). The guest keeps running and being resealed
//! here while QEMU migrates; when this run ends, the guest is
//! `migrated-out` (never started or resealed here again; Delete once the
//! destination runs it). `Abort` on the source calls that off (the
//! migration failed, the VM goes on here).
//!
//! Destination: `MigrateIn` opens the ticket with this host's key (once:
//! its nonce is remembered until it expires), takes the sealed file in as
//! a new guest here, and runs a swtpm on an empty runtime directory with
//! the same keys (the state key and the migration key are derived from the
//! data key): QEMU started with `-incoming` hands it the source's state
//! blobs. From its first write on, the guest is resealed here, at
//! generations above the source's (`GENERATION_LEAP`). `Abort` removes
//! it again, leaving nothing behind.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use crate::error_chain::chain;
use crate::protocol::GuestId;
use crate::vault::{HostPublicKey, SealedState, VaultError};

use super::finish::{Ending, finish};
use super::guest::Guest;
use super::registry::Taken;
use super::state::GuestState;
use super::{EventKind, GuestInfo, Shared, SupervisorError, blocking, reseal, start};

/// How far above the ticket's generation the destination's first seal
/// goes: above anything the source can seal while QEMU migrates (a reseal
/// every 5 ms for an hour is 720,000), so the destination's history is
/// always the newer one, and an Import of the source's last file refused.
pub(super) const GENERATION_LEAP: u64 = 1 << 20;

/// A ticket's default life: the orchestrator starts the migration at once.
pub const DEFAULT_TICKET_TTL: Duration = Duration::from_secs(300);

/// What the source hands the orchestrator for the destination.
#[derive(Debug)]
pub struct MigrationOut {
    pub ticket: Vec<u8>,
    pub sealed: Vec<u8>,
    pub generation: u64,
    pub expires: SystemTime,
}

/// A run handed out with MigrateOut.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    /// The destination's fingerprint (hex).
    pub(super) to: String,
    pub(super) generation: u64,
}

pub(super) async fn migrate_out(
    shared: Arc<Shared>,
    id: GuestId,
    destination: HostPublicKey,
    ttl: Duration,
) -> Result<MigrationOut, SupervisorError> {
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let mut slot = guest.lock(shared.config.lock_wait).await?;
    let state = guest.state();
    match state {
        GuestState::Running => {}
        GuestState::MigratedOut => return Err(SupervisorError::MigratedOut { guest: id }),
        _ => return Err(SupervisorError::GuestNotRunning { guest: id, state }),
    }
    if destination == shared.host_key.public() {
        return Err(SupervisorError::Migration {
            guest: id,
            why: "the destination's host key is this host's own".to_owned(),
        });
    }
    let Some(run) = slot.run.as_ref() else {
        return Err(SupervisorError::GuestNotRunning { guest: id, state });
    };
    let Some(sealer) = run.sealer.clone() else {
        return Err(SupervisorError::Migration {
            guest: id,
            why: "vtpmd holds no key for it (adopted after a restart that brought none): Start it with its credential first".to_owned(),
        });
    };
    let dir = run.dir.clone();
    let to = destination.fingerprint_hex();
    let out = blocking(id, "seal for the migration", move || {
        // Durable first: the file handed over holds every write the VMM
        // saw acknowledged so far.
        reseal::reseal_now(&sealer, &dir)?;
        let state = sealer.lock().unwrap_or_else(PoisonError::into_inner);
        let ticket = state.migration_ticket(&destination, ttl)?;
        Ok::<_, VaultError>(MigrationOut {
            sealed: state.current_file()?,
            generation: state.generation(),
            ticket,
            expires: SystemTime::now() + ttl.min(crate::vault::MAX_TICKET_TTL),
        })
    })
    .await?
    .map_err(|e| SupervisorError::from_vault(id, "seal for the migration", e))?;
    slot.outgoing = Some(Outgoing {
        to: to.clone(),
        generation: out.generation,
    });
    let info = guest.update(|i| {
        i.generation = i.generation.max(out.generation);
        i.reason = Some(format!(
            "migrating out to host {to}: it goes on here until its VMM has moved"
        ));
    });
    tracing::debug!(guest = %id, to, generation = out.generation, "migration ticket handed out");
    shared.publish(
        EventKind::MigratingOut,
        info,
        Some(format!(
            "ticket for host {to}, generation {}",
            out.generation
        )),
    );
    Ok(out)
}

pub(super) async fn migrate_in(
    shared: Arc<Shared>,
    id: GuestId,
    ticket: Vec<u8>,
    sealed: Vec<u8>,
) -> Result<GuestInfo, SupervisorError> {
    let _admitted = shared.enter().await?;
    let now = SystemTime::now();
    let opened = crate::vault::open_ticket(&ticket, id, &shared.host_key, now)
        .map_err(|source| SupervisorError::Ticket { guest: id, source })?;
    let given = std::path::Path::new("(the sealed file MigrateIn was given)");
    // The checks Import makes (structure, checksum, whose it is), then
    // the ticket's generation: nothing is written until all passed.
    let header = crate::vault::check_sealed(given, &sealed, id)
        .map_err(|e| SupervisorError::from_vault(id, "check the migrated sealed file of", e))?;
    let Some(spec) = super::recover::spec_of(&header) else {
        return Err(SupervisorError::StateCorrupt {
            guest: id,
            what: format!(
                "the migrated sealed file names TPM {} with {}, which vtpmd does not know",
                header.tpm_version, header.tpm_model
            ),
        });
    };
    if !shared.host.supports(spec.version()) {
        return Err(SupervisorError::UnsupportedTpm {
            version: spec.version(),
        });
    }
    if header.generation != opened.generation {
        return Err(SupervisorError::Migration {
            guest: id,
            why: format!(
                "the sealed file is generation {}, the ticket is for generation {}: not the file MigrateOut handed out with it",
                header.generation, opened.generation
            ),
        });
    }
    let used = Arc::clone(&shared.used_tickets);
    let (nonce, expires) = (opened.nonce, opened.expires);
    let fresh = blocking(id, "record the ticket as used", move || {
        used.take(nonce, expires, now)
    })
    .await?
    .map_err(|e| SupervisorError::from_vault(id, "record the ticket as used", e))?;
    if !fresh {
        return Err(SupervisorError::Ticket {
            guest: id,
            source: crate::vault::TicketError::Used,
        });
    }
    let reservation = shared.registry.reserve(id).map_err(|taken| match taken {
        Taken::Exists(_) => SupervisorError::GuestExists { guest: id },
        Taken::BeingCreated => SupervisorError::Busy { guest: id },
    })?;
    // Taken in as Import takes a new guest (uid, directory, file), then
    // opened with the ticket's key: the file must open with it as it is.
    let (_, _) = super::mobility::register_new(
        &shared,
        reservation,
        sealed,
        &header,
        spec,
        GuestState::Starting,
    )
    .await?;
    let guest = shared.guest(id)?;
    let mut slot = guest.lock(shared.config.lock_wait).await?;
    let paths = shared.store.sealed_paths(id);
    let handover = opened.handover;
    let resumed = blocking(
        id,
        "open the migrated state",
        move || match SealedState::resume(paths.clone(), id, &handover) {
            Ok(opened) if opened.fell_back.is_none() => Ok(opened.state),
            Ok(_) => Err(VaultError::WrongHandover {
                path: paths.current().to_owned(),
            }),
            Err(e) => Err(e),
        },
    )
    .await
    .and_then(|r| r.map_err(|e| SupervisorError::from_vault(id, "open the migrated state of", e)));
    let mut state = match resumed {
        Ok(state) => state,
        Err(e) => {
            let_go(&shared, id, &mut slot).await;
            return Err(e);
        }
    };
    state.raise_generation_above(opened.generation + GENERATION_LEAP);
    if let Err(e) = super::cluster::expect_handoff(&shared, id).await {
        let_go(&shared, id, &mut slot).await;
        return Err(e);
    }
    let ran = start::run(&shared, &guest, &mut slot, state, None).await;
    match ran {
        Ok((_, _)) => {
            slot.incoming = Some(opened.generation + GENERATION_LEAP);
            let info = guest.update(|i| {
                i.reason = Some(
                    "migrating in: its swtpm waits for the VMM's state (QEMU -incoming)".to_owned(),
                )
            });
            tracing::debug!(guest = %id, generation = opened.generation, "migration taken in");
            shared.publish(EventKind::MigratingIn, info.clone(), None);
            Ok(info)
        }
        Err(e) => {
            let_go(&shared, id, &mut slot).await;
            Err(e)
        }
    }
}

/// Calls a migration off: on the source, the run is no longer handed out
/// (the VM goes on here); on the destination, the incoming guest is
/// removed with everything it had here.
pub(super) async fn abort(shared: Arc<Shared>, id: GuestId) -> Result<GuestInfo, SupervisorError> {
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let mut slot = guest.lock(shared.config.lock_wait).await?;
    if slot.outgoing.take().is_some() {
        let info = guest.update(|i| i.reason = None);
        tracing::debug!(guest = %id, "outgoing migration called off; the guest goes on here");
        shared.publish(EventKind::MigrationAborted, info.clone(), None);
        return Ok(info);
    }
    // Taken first: the run ends as called off, not as a VMM that left.
    if slot.incoming.take().is_none() {
        return Err(SupervisorError::Migration {
            guest: id,
            why: "no migration of it is under way on this host".to_owned(),
        });
    }
    let ended = if slot.run.is_some() {
        finish(&shared, &guest, &mut slot, Ending::Stop).await
    } else {
        guest.info()
    };
    super::manage::forget(&shared, id, &mut slot).await?;
    drop(slot);
    tracing::debug!(guest = %id, "incoming migration called off; nothing of it is left");
    shared.publish(EventKind::MigrationAborted, ended.clone(), None);
    Ok(ended)
}

/// Ends an incoming guest whose VMM left before the source's state
/// arrived (its run has ended, its directory is wiped): removed as Abort
/// would, so a later Abort finds nothing (`GuestNotFound`).
pub(super) async fn forget_unarrived(
    shared: &Shared,
    guest: &Arc<Guest>,
    slot: &mut super::guest::Slot,
) -> GuestInfo {
    let id = guest.id;
    let_go(shared, id, slot).await;
    let info = guest.update(|i| {
        i.state = GuestState::Stopped;
        i.pid = None;
        i.ctrl_socket = None;
        i.reason = Some(UNARRIVED.to_owned());
    });
    tracing::debug!(guest = %id, "{UNARRIVED}");
    shared.publish(
        EventKind::MigrationAborted,
        info.clone(),
        Some(UNARRIVED.to_owned()),
    );
    info
}

const UNARRIVED: &str = "incoming migration ended before the source's state arrived (its VMM left): nothing of it is kept on this host";

/// Removes a guest that was only taken in, with everything it had here;
/// a failure is logged (the caller is failing already).
async fn let_go(shared: &Shared, id: GuestId, slot: &mut super::guest::Slot) {
    if let Err(e) = super::manage::forget(shared, id, slot).await {
        tracing::error!(guest = %id, "removing the incoming guest: {}", chain(&e));
    }
}
