//! Start of a guest that runs without its key: a swtpm adopted after a
//! restart of vtpmd that brought no key back (no fd store, e.g. vtpmd run
//! by hand, or `systemctl stop` then `start`). The passphrase opens the
//! sealed state again; vtpmd then takes that same swtpm over (no new
//! process: the VMM stays attached and notices nothing), seals what it
//! wrote meanwhile, and reseals it from then on.

use std::sync::{Arc, Mutex, PoisonError};

use super::guest::{Guest, Slot};
use super::state::GuestState;
use super::{EventKind, GuestInfo, Shared, SupervisorError, Unlock, blocking};
use super::{reseal, resealer};

pub(super) async fn reattach(
    shared: &Arc<Shared>,
    guest: &Arc<Guest>,
    slot: &mut Slot,
    passphrase: Unlock,
) -> Result<GuestInfo, SupervisorError> {
    let id = guest.id;
    let paths = shared.store.sealed_paths(id);
    let policy = shared.config.kdf;
    let host_key = Arc::clone(&shared.host_key);
    let needs_permit = passphrase.needs_kdf_permit();
    let unseal = move || {
        let opened = passphrase.open(paths, id, &host_key, &policy);
        drop(passphrase);
        opened
    };
    let opened = if needs_permit {
        shared.kdf(id, "unseal", unseal).await?
    } else {
        blocking(id, "unseal", unseal).await?
    }
    .map_err(|e| SupervisorError::from_vault(id, "open", e))?;
    let Some(run) = slot.run.as_mut() else {
        return Err(not_running(guest));
    };
    let dir = run.dir.clone();
    let pid = run.swtpm.pid();
    // Watch before reading: a write after this point raises a reseal.
    let watch = shared.watch(id, &dir)?;
    let (mut state, sealed, dir2) = (opened.state, opened.archive, dir.clone());
    let (caught_up, state) = blocking(id, "reseal", move || {
        let caught_up = reseal::catch_up(&mut state, &sealed, &dir2);
        (caught_up, state)
    })
    .await?;
    let caught_up = caught_up.map_err(|source| SupervisorError::Vault {
        guest: id,
        op: "seal the writes made without a key by",
        source,
    })?;
    let generation = caught_up.generation;
    let sealer = Arc::new(Mutex::new(state));
    shared
        .handover
        .push(id, &sealer.lock().unwrap_or_else(PoisonError::into_inner));
    let resealer = resealer::spawn(
        Arc::clone(shared),
        Arc::clone(guest),
        Arc::clone(&sealer),
        dir,
        watch,
    );
    run.sealer = Some(sealer);
    run.resealer = Some(resealer);
    let info = guest.update(|i| {
        i.generation = i.generation.max(generation);
        i.reason = None;
    });
    tracing::info!(guest = %id, pid, generation, "re-attached to the running swtpm; its writes are sealed");
    shared.publish(
        EventKind::Running { start: None },
        info.clone(),
        Some(format!(
            "re-attached to the running swtpm (pid {pid}): {}",
            caught_up.describe()
        )),
    );
    Ok(info)
}

fn not_running(guest: &Guest) -> SupervisorError {
    SupervisorError::GuestNotRunning {
        guest: guest.id,
        state: GuestState::Stopped,
    }
}
