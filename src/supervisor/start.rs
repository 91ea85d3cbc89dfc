//! Start: unseal (Argon2 under the semaphore), unpack into a fresh private
//! runtime directory, watch it, spawn swtpm, check that it serves its
//! control socket, then answer. Any failure undoes every step: no
//! directory, no socket, no process, and the sealed files untouched.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid};

use crate::error_chain::chain;
use crate::protocol::GuestId;
use crate::secret::SecretBuf;
use crate::store::{self, RunRecord, StoreError};
use crate::swtpm::ctrl::CtrlClient;
use crate::swtpm::spawn::{self, SpawnError, SpawnSpec, Swtpm};
use crate::vault::{Opened, SealedState, VaultError};

use super::guest::{Guest, Run, Slot};
use super::state::{Action, GuestState, permit};
use super::{
    EventKind, GuestInfo, Shared, StartTimings, SupervisorError, Unlock, blocking, exit,
    lost_write, reattach, reseal, resealer, space,
};

/// How long swtpm has to answer CMD_GET_CAPABILITY on its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn start_guest(
    shared: Arc<Shared>,
    id: GuestId,
    passphrase: Unlock,
) -> Result<GuestInfo, SupervisorError> {
    let called = Instant::now();
    let _admitted = shared.enter().await?;
    let guest = shared.guest(id)?;
    let mut slot = guest.lock(shared.config.lock_wait).await?;
    if slot.run.as_ref().is_some_and(|r| r.sealer.is_none()) {
        // Running without its key (adopted after a restart that brought
        // none): the passphrase lets vtpmd take over that swtpm again.
        return reattach::reattach(&shared, &guest, &mut slot, passphrase).await;
    }
    let before = guest.info();
    // Start is the only thing the table allows for Action::Start.
    permit(id, before.state, Action::Start)?;
    // Cluster mode: this host owns the guest before its state is used,
    // and etcd holds nothing newer than it (no rollback).
    super::cluster::claim_current(&shared, id, false).await?;
    let starting = guest.update(|i| i.state = GuestState::Starting);
    shared.publish(EventKind::Starting, starting, None);

    match launch(&shared, &guest, &mut slot, passphrase).await {
        Ok((info, detail, mut timings)) => {
            timings.total = called.elapsed();
            // Timings at debug: the `running` event's line says the rest.
            tracing::debug!(
                guest = %id,
                pid = info.pid,
                generation = info.generation,
                queued_us = micros(timings.queued),
                kdf_us = micros(timings.kdf),
                unseal_us = micros(timings.unseal),
                spawn_us = micros(timings.spawn),
                ready_us = micros(timings.ready),
                total_us = micros(timings.total),
                "guest running"
            );
            shared.publish(
                EventKind::Running {
                    start: Some(timings),
                },
                info.clone(),
                detail,
            );
            Ok(info)
        }
        Err(e) => {
            // Nothing changed: back to where the guest was (and, in
            // cluster mode, free for another host again).
            super::cluster::release(&shared, id);
            let restored = guest.update(|i| *i = before.clone());
            shared.publish(
                EventKind::settled(restored.state),
                restored,
                Some(format!("start failed: {}", chain(&e))),
            );
            Err(e)
        }
    }
}

/// Removes the runtime directory unless disarmed (every early return of
/// `launch`), and then its tmpfs.
struct DirGuard {
    dir: PathBuf,
    armed: bool,
    release: Option<(Arc<Shared>, GuestId)>,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = store::wipe_dir(&self.dir) {
            tracing::error!(
                "cannot wipe {} after a failed start: {}",
                self.dir.display(),
                chain(&e)
            );
            return;
        }
        // Unmounting waits for systemd: not in a destructor. The guest's
        // lock is released by then, so a Start that comes first finds the
        // empty tmpfs and uses it; release() leaves a non-empty one alone.
        if let Some((shared, id)) = self.release.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { space::release(&shared, id).await });
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn launch(
    shared: &Arc<Shared>,
    guest: &Arc<Guest>,
    slot: &mut Slot,
    passphrase: Unlock,
) -> Result<(GuestInfo, Option<String>, StartTimings), SupervisorError> {
    let id = guest.id;
    let store = &shared.store;

    // 1. Unseal. The passphrase (or key) is gone once the key is derived.
    //    Only a passphrase queues for a KDF permit: a key or host open
    //    costs microseconds and must not wait behind Argon2.
    let paths = store.sealed_paths(id);
    let policy = shared.config.kdf;
    let host_key = Arc::clone(&shared.host_key);
    let asked = Instant::now();
    let needs_permit = passphrase.needs_kdf_permit();
    let unseal = move || {
        let queued = asked.elapsed();
        let began = Instant::now();
        let opened = passphrase.open(paths, id, &host_key, &policy);
        drop(passphrase);
        (opened, queued, began.elapsed())
    };
    let (opened, queued, opening) = if needs_permit {
        shared.kdf(id, "unseal", unseal).await?
    } else {
        blocking(id, "unseal", unseal).await?
    };
    let Opened {
        mut state,
        mut archive,
        fell_back,
        kdf_time,
    } = opened.map_err(|e| SupervisorError::from_vault(id, "open", e))?;
    // A sound current file older than what this vtpmd sealed was put in
    // place by someone (the previous generation standing in for a damaged
    // one is the documented fallback, not this).
    let known = guest.info().generation;
    if fell_back.is_none() && state.generation() < known {
        return Err(SupervisorError::RolledBack {
            guest: id,
            generation: state.generation(),
            current: known,
        });
    }
    if let Some(floor) = slot.generation_floor.take() {
        state.raise_generation_above(floor);
    }
    let mut detail = Vec::new();
    if slot.unsealed_leftover {
        // Writes a swtpm made that were never sealed: sealed first, and
        // what this run starts from.
        let dir = store.runtime_state_dir(id);
        let (caught_up, state_back) = blocking(id, "seal the writes left behind", move || {
            let caught_up = reseal::catch_up(&mut state, &archive, &dir);
            (caught_up, state)
        })
        .await?;
        state = state_back;
        let caught_up = caught_up.map_err(|source| SupervisorError::Vault {
            guest: id,
            op: "seal the writes left in the runtime directory by",
            source,
        })?;
        let generation = caught_up.generation;
        tracing::info!(guest = %id, generation, "writes left in the runtime directory sealed");
        detail.push(format!(
            "the runtime directory its last swtpm left is recovered: {}",
            caught_up.describe()
        ));
        archive = caught_up.archive;
        slot.unsealed_leftover = false;
        guest.update(|i| {
            i.generation = generation;
            i.reason = None;
        });
    }
    if let Some(f) = fell_back {
        tracing::warn!(guest = %id, problem = %f.current_problem, "started from the previous sealed generation");
        detail.push(format!(
            "the current sealed file is damaged ({}); started from the previous generation",
            f.current_problem
        ));
    }
    let detail = (!detail.is_empty()).then(|| detail.join("; "));
    let (info, ran) = run(shared, guest, slot, state, Some(archive)).await?;
    let timings = StartTimings {
        queued,
        kdf: kdf_time,
        unseal: opening.saturating_sub(kdf_time) + ran.unpacked,
        spawn: ran.spawn,
        ready: ran.ready,
        total: Duration::ZERO,
    };
    Ok((info, detail, timings))
}

/// How long the steps of [`run`] took.
pub(super) struct Ran {
    pub(super) unpacked: Duration,
    pub(super) spawn: Duration,
    pub(super) ready: Duration,
}

/// Runs the guest from its opened `state`: a fresh runtime directory of
/// vtpmd and the guest's group, `archive` unpacked in it (none for a
/// migration's destination, whose swtpm gets its state from the VMM),
/// watched, swtpm spawned and serving, recorded, resealed from then on.
/// The guest is `running` when this returns; on an error nothing is left.
pub(super) async fn run(
    shared: &Arc<Shared>,
    guest: &Arc<Guest>,
    slot: &mut Slot,
    state: SealedState,
    archive: Option<crate::vault::StateArchive>,
) -> Result<(GuestInfo, Ran), SupervisorError> {
    let id = guest.id;
    let store = &shared.store;
    let spec = state.spec();
    if !shared.host.supports(spec.version()) {
        return Err(SupervisorError::UnsupportedTpm {
            version: spec.version(),
        });
    }

    // 2. The guest's own uid, and a fresh runtime directory of vtpmd and
    //    the guest's group with the state files (the guest's) in it.
    let uid = swtpm_uid(shared, id).await?;
    let vtpmd_gid = nix::unistd::getegid();
    let owner = uid.map(|uid| (Uid::from_raw(uid), Gid::from_raw(uid)));
    let dir = store.runtime_state_dir(id);
    let socket = store.ctrl_socket(id);
    let (store2, dir2, socket2) = (store.clone(), dir.clone(), socket.clone());
    let unpacking = Instant::now();
    let made = blocking(id, "prepare the runtime directory", move || {
        store2
            .fresh_private_dir(&dir2, Some(&socket2), owner.map(|(_, gid)| gid))
            .map_err(Unpack::Store)
    })
    .await?;
    // A directory found in use was not touched, and must not be now.
    let mut dir_guard = DirGuard {
        dir: dir.clone(),
        armed: !matches!(made, Err(Unpack::Store(StoreError::InUse { .. }))),
        release: Some((Arc::clone(shared), id)),
    };
    let prepared = match made {
        Ok(()) => {
            space::bound(shared, id, &dir, owner.map(|(_, gid)| gid)).await?;
            let dir2 = dir.clone();
            blocking(id, "unpack the state", move || {
                unpack(&dir2, owner, archive.as_ref())
            })
            .await?
        }
        Err(e) => Err(e),
    };
    let unpacked = unpacking.elapsed();
    prepared.map_err(|e| match e {
        Unpack::Store(StoreError::InUse { path, holder }) => SupervisorError::RuntimeInUse {
            guest: id,
            path,
            holder,
        },
        Unpack::Store(source) => SupervisorError::Store {
            guest: id,
            op: "prepare the runtime directory",
            source,
        },
        Unpack::Vault(source) => SupervisorError::Vault {
            guest: id,
            op: "unpack",
            source,
        },
    })?;

    // 3. Watch before swtpm can write anything.
    reseal::forget_skipped(&dir);
    let watch = shared.watch(id, &dir)?;

    // 4. Spawn, and make sure it serves before answering.
    let keys = SwtpmKeys::of(id, &state)?;
    // The control socket belongs to the guest's uid and the VMM's group
    // (vtpmd's when none is configured), so only those two can attach.
    let socket_group = shared.config.socket_group;
    let settings = SpawnSettings {
        swtpm: shared.config.binaries.swtpm.clone(),
        socket_mode: shared.config.socket_mode,
        socket_owner: match uid {
            Some(uid) => Some((Uid::from_raw(uid), socket_group.unwrap_or(vtpmd_gid))),
            None => socket_group.map(|gid| (nix::unistd::geteuid(), gid)),
        },
        run_as: uid.map(|uid| (Uid::from_raw(uid), Gid::from_raw(uid))),
        state_mode: match uid {
            Some(_) => store::GUEST_STATE_FILE_MODE,
            None => 0o600,
        },
        seccomp: shared.host.seccomp,
        grace: shared.config.stop_grace,
        log_rate: shared.config.log_rate,
    };
    let grace = shared.config.stop_grace;
    let (dir2, socket2) = (dir.clone(), socket.clone());
    let version = spec.version();
    let (swtpm, pidfd, spawn_time, ready_time) = blocking(id, "spawn swtpm", move || {
        let spawned = spawn_ready(&settings, version, id, &dir2, &socket2, &keys);
        drop(keys);
        spawned
    })
    .await??;

    // 5. Recorded for a later vtpmd (it adopts this swtpm if this vtpmd
    //    exits first), and the key handed to the fd store.
    let record = RunRecord {
        pid: swtpm.pid(),
        start_time: swtpm.start_time(),
        uid,
        ctrl_id: swtpm.ctrl_id(),
        lost_write: None,
    };
    let store2 = store.clone();
    let recorded = blocking(id, "write the run record", move || {
        store2.write_run_record(id, &record)
    })
    .await?;
    if let Err(source) = recorded {
        let mut swtpm = swtpm;
        let _ = blocking(id, "stop swtpm", move || swtpm.stop(grace)).await;
        return Err(SupervisorError::Store {
            guest: id,
            op: "record the running swtpm",
            source,
        });
    }
    shared.handover.push(id, &state);
    shared.scopes.place(id, swtpm.pid(), false).await;

    // 6. Running: the resealer and the exit watcher take over.
    let generation = state.generation();
    let keyslots = state.keyslots();
    let sealer = Arc::new(Mutex::new(state));
    let epoch = slot.next_epoch();
    let resealer = resealer::spawn(
        Arc::clone(shared),
        Arc::clone(guest),
        Arc::clone(&sealer),
        dir.clone(),
        watch,
    );
    let watcher = exit::spawn(Arc::clone(shared), Arc::clone(guest), epoch, pidfd);
    lost_write::report(shared, guest, &swtpm);
    let pid = swtpm.pid();
    slot.run = Some(Run {
        epoch,
        swtpm,
        sealer: Some(sealer),
        resealer: Some(resealer),
        watcher: Some(watcher),
        dir,
        socket: socket.clone(),
    });
    dir_guard.armed = false;
    let info = guest.update(|i| {
        i.state = GuestState::Running;
        i.pid = Some(pid);
        i.ctrl_socket = Some(socket);
        i.generation = generation;
        i.failure = None;
        i.reason = None;
        i.keyslots = keyslots;
    });
    tracing::debug!(guest = %id, pid, generation, swtpm_uid = ?uid, "swtpm serving");
    Ok((
        info,
        Ran {
            unpacked,
            spawn: spawn_time,
            ready: ready_time,
        },
    ))
}

/// The guest's swtpm uid: the recorded one, or (a guest created before
/// per-guest uids, or whose record was unusable) the lowest free one, now
/// recorded. `None` when every swtpm runs as vtpmd's user.
async fn swtpm_uid(shared: &Arc<Shared>, id: GuestId) -> Result<Option<u32>, SupervisorError> {
    let Some(pool) = &shared.uids else {
        return Ok(None);
    };
    if let Some(uid) = pool.get(id) {
        return Ok(Some(uid));
    }
    let uid = pool.allocate(id).ok_or(SupervisorError::NoFreeUid {
        guest: id,
        range: pool.range(),
    })?;
    let store = shared.store.clone();
    let recorded = blocking(id, "record the swtpm uid", move || {
        store.write_owner(id, uid)
    })
    .await
    .and_then(|written| {
        written.map_err(|source| SupervisorError::Store {
            guest: id,
            op: "record the swtpm uid",
            source,
        })
    });
    match recorded {
        Ok(()) => {
            tracing::info!(guest = %id, uid, "swtpm uid given and recorded");
            Ok(Some(uid))
        }
        Err(e) => {
            pool.release(id);
            Err(e)
        }
    }
}

enum Unpack {
    Store(StoreError),
    Vault(VaultError),
}

/// The fresh runtime directory, filled: with `owner` (the guest's uid and
/// gid) the directory is vtpmd's and the guest's group (0770), the state
/// files the guest's (0644), and `.lock` vtpmd's with the guest's group
/// (0660).
fn unpack(
    dir: &Path,
    owner: Option<(Uid, Gid)>,
    archive: Option<&crate::vault::StateArchive>,
) -> Result<(), Unpack> {
    if let Some(archive) = archive {
        archive
            .write_to_dir(dir)
            .map_err(|e| Unpack::Vault(VaultError::Archive(e)))?;
    }
    if let Some((uid, gid)) = owner {
        store::hand_over_entries(dir, uid, gid, store::GUEST_STATE_FILE_MODE)
            .map_err(Unpack::Store)?;
        store::lay_lock(dir, gid).map_err(Unpack::Store)?;
    }
    Ok(())
}

/// What a guest's swtpm is given, both derived from the data key: the key
/// of its state files, and the key of the state blobs it hands a VMM for a
/// migration (so QEMU's stream never carries TPM state in plaintext, and
/// the destination, which gets the same data key, can read them).
struct SwtpmKeys {
    state: SecretBuf,
    migration: SecretBuf,
}

impl SwtpmKeys {
    fn of(id: GuestId, state: &SealedState) -> Result<Self, SupervisorError> {
        let derive = |e| SupervisorError::from_vault(id, "derive the swtpm keys for", e);
        Ok(Self {
            state: state.swtpm_state_key().map_err(derive)?,
            migration: state.swtpm_migration_key().map_err(derive)?,
        })
    }
}

struct SpawnSettings {
    swtpm: PathBuf,
    socket_mode: u32,
    socket_owner: Option<(Uid, Gid)>,
    run_as: Option<(Uid, Gid)>,
    state_mode: u32,
    seccomp: bool,
    grace: Duration,
    log_rate: crate::log_limit::Rate,
}

/// Spawns swtpm and checks that it answers on its control socket (then
/// closes that connection: swtpm serves one client at a time, and the VMM
/// comes next). Returns it with a duplicate of its pidfd, the time `spawn`
/// took and the time swtpm then took to answer.
fn spawn_ready(
    s: &SpawnSettings,
    version: crate::protocol::TpmVersion,
    id: GuestId,
    dir: &Path,
    socket: &Path,
    keys: &SwtpmKeys,
) -> Result<(Swtpm, OwnedFd, Duration, Duration), SupervisorError> {
    let mut spec = SpawnSpec::new(&s.swtpm, version, id, dir, socket, &keys.state);
    spec.migration_key = Some(&keys.migration);
    spec.socket_mode = s.socket_mode;
    spec.socket_owner = s.socket_owner;
    spec.run_as = s.run_as;
    spec.state_mode = s.state_mode;
    // vtpmd may not connect to a socket of the guest's uid and the VMM's
    // group: its probe connects before the owner changes.
    spec.ready_probe = true;
    spec.seccomp = s.seccomp;
    spec.terminate = true;
    spec.log_rate = s.log_rate;
    spec.early_exit_window = Duration::ZERO;
    let began = Instant::now();
    let mut swtpm = match spawn::spawn(&spec) {
        Ok(swtpm) => swtpm,
        Err(SpawnError::Exited {
            reason, log_tail, ..
        }) => {
            return Err(SupervisorError::SwtpmFailed {
                guest: id,
                message: format!("swtpm {reason} right after start"),
                log_tail,
            });
        }
        Err(source) => return Err(SupervisorError::Spawn { guest: id, source }),
    };
    let spawned = began.elapsed();
    let ready = match swtpm.take_ready_probe() {
        Some(stream) => CtrlClient::from_stream(stream, READY_TIMEOUT),
        None => CtrlClient::connect(socket, READY_TIMEOUT),
    }
    .and_then(|mut ctrl| ctrl.get_capability());
    let answered = began.elapsed().saturating_sub(spawned);
    let pidfd = swtpm.pidfd().try_clone_to_owned();
    match (ready, pidfd) {
        (Ok(_caps), Ok(pidfd)) => Ok((swtpm, pidfd, spawned, answered)),
        (Err(e), _) => {
            let exit = swtpm.stop(s.grace);
            let ended = match exit {
                Ok(reason) => format!("; swtpm {reason}"),
                Err(e) => format!("; stopping it failed: {}", chain(&e)),
            };
            Err(SupervisorError::SwtpmFailed {
                guest: id,
                message: format!(
                    "swtpm does not serve its control socket: {}{ended}",
                    chain(&e)
                ),
                log_tail: swtpm.log_tail(),
            })
        }
        (Ok(_), Err(e)) => {
            let _ = swtpm.stop(s.grace);
            Err(SupervisorError::Spawn {
                guest: id,
                source: SpawnError::PidfdOpen {
                    pid: swtpm.pid(),
                    source: e,
                },
            })
        }
    }
}
