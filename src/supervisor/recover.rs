//! At start-up: the registry rebuilt from `<state_dir>/guests/*` (headers
//! only, no passphrase needed), and the runtime directory read for what an
//! earlier vtpmd left: the swtpms it started that still run (found through
//! their run records and proven to be them, to be adopted), runtime
//! directories whose swtpm ended meanwhile (kept: they may hold writes
//! never sealed), and what is safe to remove (stale sockets and records,
//! provisioning directories). Nothing a live process uses, and nothing
//! that may hold unsealed writes, is ever wiped here.

use std::collections::BTreeSet;
use std::path::Path;

use nix::unistd::{Gid, Uid};

use crate::error_chain::chain;
use crate::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use crate::store::{self, InUse, RuntimeEntry, Store};
use crate::swtpm::spawn::{Adoption, Swtpm, adopt};
use crate::vault::{self, HeaderInfo, VaultError};

use super::state::GuestState;
use super::uids::{UidPool, UidRange};
use super::{GuestInfo, SupervisorError};

/// Shown as the spec of a guest whose headers are both unreadable.
const UNKNOWN_SPEC_NOTE: &str = "(its TPM version and model are unknown; shown as 2.0/tpm-tis)";

/// What recovery found of a guest in the runtime directory.
#[derive(Debug)]
pub(super) enum Found {
    /// The swtpm an earlier vtpmd started, still running, proven to be it.
    Live(Box<Swtpm>),
    /// Its runtime directory, with no process using it: possibly writes
    /// that were never sealed.
    Leftover,
}

/// One guest as recovery found it.
#[derive(Debug)]
pub(super) struct Recovered {
    pub(super) info: GuestInfo,
    pub(super) found: Option<Found>,
}

/// The registry rebuilt from the state root, and what each guest left in
/// the runtime directory. `swtpm` is the binary vtpmd runs: an adopted
/// process must be it.
pub(super) fn recover(store: &Store, swtpm: &Path) -> Result<Vec<Recovered>, SupervisorError> {
    let mut guests = Vec::new();
    for id in store.list_guests().map_err(SupervisorError::ScanStore)? {
        if let Some(info) = recover_guest(store, id) {
            guests.push(Recovered { info, found: None });
        }
    }
    clean_runtime(store, swtpm, &mut guests)?;
    Ok(guests)
}

fn recover_guest(store: &Store, id: GuestId) -> Option<GuestInfo> {
    let paths = store.sealed_paths(id);
    let header = match vault::inspect(paths.current()) {
        Ok(h) => Ok(h),
        Err(current) => match vault::inspect(paths.previous()) {
            Ok(h) => {
                tracing::warn!(guest = %id, "current sealed file unreadable ({}); its previous generation will be used", chain(&current));
                Ok(h)
            }
            Err(_) => Err(current),
        },
    };
    let keyslots = header
        .as_ref()
        .map(|h| h.slot_summaries())
        .unwrap_or_default();
    let stopped = |spec, generation, failure: Option<String>| GuestInfo {
        guest: id,
        spec,
        state: if failure.is_some() {
            GuestState::Failed
        } else {
            GuestState::Stopped
        },
        pid: None,
        ctrl_socket: None,
        generation,
        failure,
        reason: None,
        keyslots: keyslots.clone(),
        replication: None,
    };
    match header {
        Ok(h) if h.guest == id => match spec_of(&h) {
            Some(spec) => Some(stopped(spec, h.generation, None)),
            None => Some(stopped(
                fallback_spec(),
                h.generation,
                Some(format!(
                    "the sealed header names an unknown TPM {UNKNOWN_SPEC_NOTE}"
                )),
            )),
        },
        Ok(h) => Some(stopped(
            fallback_spec(),
            h.generation,
            Some(format!(
                "the sealed file belongs to guest {}, not {id} {UNKNOWN_SPEC_NOTE}",
                h.guest
            )),
        )),
        Err(VaultError::Missing { .. }) => {
            // No generation at all: an interrupted Create or Delete.
            match store.remove_guest_dir(id) {
                Ok(()) => {
                    tracing::info!(guest = %id, "removed a guest directory without sealed state")
                }
                Err(e) => tracing::warn!(guest = %id, "{}", chain(&e)),
            }
            None
        }
        Err(e) => Some(stopped(
            fallback_spec(),
            0,
            Some(format!(
                "the sealed state is unreadable: {} {UNKNOWN_SPEC_NOTE}",
                chain(&e)
            )),
        )),
    }
}

/// The uid pool rebuilt from the guests' owner records. A guest without a
/// usable record gets a uid at its next Start.
pub(super) fn recover_uids(store: &Store, range: UidRange, guests: &[Recovered]) -> UidPool {
    let pool = UidPool::new(range);
    for guest in guests {
        let id = guest.info.guest;
        match store.read_owner(id) {
            Ok(Some(uid)) if pool.assign(id, uid) => {}
            Ok(Some(uid)) => tracing::warn!(
                guest = %id, uid, %range,
                "recorded swtpm uid is outside the range or another guest's; a new one is given at the next Start"
            ),
            Ok(None) => {
                tracing::info!(guest = %id, "no swtpm uid recorded yet; one is given at the next Start")
            }
            Err(e) => tracing::warn!(
                guest = %id,
                "{}; a new swtpm uid is given at the next Start",
                chain(&e)
            ),
        }
    }
    pool
}

pub(super) fn spec_of(h: &HeaderInfo) -> Option<TpmSpec> {
    let version = TpmVersion::parse(h.tpm_version).ok()?;
    let model = TpmModel::parse(h.tpm_model).ok()?;
    TpmSpec::new(version, model).ok()
}

fn fallback_spec() -> TpmSpec {
    TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).expect("TPM 2.0 with TIS is a valid pair")
}

fn clean_runtime(
    store: &Store,
    swtpm: &Path,
    guests: &mut [Recovered],
) -> Result<(), SupervisorError> {
    let entries = store.scan_runtime().map_err(SupervisorError::ScanStore)?;
    // Guests whose socket and run record belong to a live swtpm.
    let mut live = BTreeSet::new();
    for entry in &entries {
        let RuntimeEntry::StateDir(id) = entry else {
            continue;
        };
        let dir = store.runtime_state_dir(*id);
        let socket = store.ctrl_socket(*id);
        let Some(guest) = guests.iter_mut().find(|g| g.info.guest == *id) else {
            // No sealed state to reseal into (an interrupted Create, a
            // guest deleted meanwhile): only a live process keeps it.
            match store::in_use(&dir, Some(&socket)) {
                InUse::No => wipe(&dir, store::wipe_dir(&dir)),
                InUse::Yes { .. } => {
                    live.insert(*id);
                    tracing::warn!(guest = %id, dir = %dir.display(), "a live process uses the runtime directory of a guest without sealed state; left alone");
                }
            }
            continue;
        };
        match find_swtpm(store, *id, swtpm) {
            Ok(found) => {
                tracing::info!(guest = %id, pid = found.pid(), "found the swtpm an earlier vtpmd started");
                live.insert(*id);
                guest.found = Some(Found::Live(Box::new(found)));
            }
            Err(why) => match store::in_use(&dir, Some(&socket)) {
                InUse::Yes { holder } => {
                    // Alive but not provably the swtpm vtpmd started:
                    // neither adopted nor ever wiped.
                    live.insert(*id);
                    let who = holder.map(|p| format!(" (pid {p})")).unwrap_or_default();
                    let reason = format!(
                        "a process{who} still uses {} but cannot be adopted ({why}); its writes are not sealed: end it, then Start",
                        dir.display()
                    );
                    tracing::error!(guest = %id, "{reason}");
                    guest.info.state = GuestState::Failed;
                    guest.info.failure = Some(reason);
                }
                InUse::No => {
                    // Its swtpm ended while no vtpmd ran: the directory
                    // may hold writes newer than the sealed file. Kept
                    // until a key seals them.
                    tracing::warn!(guest = %id, dir = %dir.display(), "runtime directory left by a swtpm that ended while vtpmd was down; kept until its key seals it ({why})");
                    guest.found = Some(Found::Leftover);
                }
            },
        }
    }
    for entry in entries {
        match entry {
            RuntimeEntry::StateDir(_) => {}
            RuntimeEntry::Socket(id) => {
                let socket = store.ctrl_socket(id);
                let dir = store.runtime_state_dir(id);
                if !live.contains(&id) && store::in_use(&dir, Some(&socket)) == InUse::No {
                    wipe(&socket, store::remove_socket(&socket));
                }
            }
            RuntimeEntry::RunRecord(id) => {
                if !live.contains(&id) {
                    let path = store.run_record_path(id);
                    wipe(&path, store.remove_run_record(id));
                }
            }
            RuntimeEntry::CreateDir(id) => {
                let dir = store.create_dir(id);
                wipe(&dir, store::wipe_dir(&dir));
            }
            RuntimeEntry::Unknown(path) => {
                tracing::warn!(path = %path.display(), "unknown entry in the runtime directory; left alone");
            }
        }
    }
    Ok(())
}

/// The swtpm recorded for `id`, once it has proven to be that process.
fn find_swtpm(store: &Store, id: GuestId, swtpm: &Path) -> Result<Swtpm, String> {
    let record = store
        .read_run_record(id)
        .map_err(|e| chain(&e))?
        .ok_or_else(|| "no run record".to_owned())?;
    let adoption = Adoption {
        guest: id,
        pid: record.pid,
        start_time: record.start_time,
        swtpm: swtpm.to_owned(),
        state_dir: store.runtime_state_dir(id),
        ctrl_socket: store.ctrl_socket(id),
        ctrl_id: record.ctrl_id,
        run_as: record
            .uid
            .map(|uid| (Uid::from_raw(uid), Gid::from_raw(uid))),
        store_failure: record.lost_write,
    };
    adopt(&adoption).map_err(|e| chain(&e))
}

fn wipe(path: &std::path::Path, result: Result<(), store::StoreError>) {
    match result {
        Ok(()) => tracing::info!(path = %path.display(), "removed a leftover of an earlier run"),
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot remove a leftover: {}", chain(&e))
        }
    }
}
