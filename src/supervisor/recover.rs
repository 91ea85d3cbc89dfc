//! At start-up: the registry rebuilt from `<state_dir>/guests/*` (headers
//! only, no passphrase needed), and the runtime directory cleaned of what a
//! crash left: plaintext directories, sockets, provisioning directories.
//! A directory a live swtpm still uses (one that outlived an earlier
//! vtpmd) is never wiped; its guest is marked failed with the reason.

use std::collections::BTreeSet;

use crate::error_chain::chain;
use crate::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use crate::store::{self, InUse, RuntimeEntry, Store};
use crate::vault::{self, HeaderInfo, VaultError};

use super::state::GuestState;
use super::uids::{UidPool, UidRange};
use super::{GuestInfo, SupervisorError};

/// Shown as the spec of a guest whose headers are both unreadable.
const UNKNOWN_SPEC_NOTE: &str = "(its TPM version and model are unknown; shown as 2.0/tpm-tis)";

pub(super) fn recover(store: &Store) -> Result<Vec<GuestInfo>, SupervisorError> {
    let mut guests = Vec::new();
    for id in store.list_guests().map_err(SupervisorError::ScanStore)? {
        if let Some(info) = recover_guest(store, id) {
            guests.push(info);
        }
    }
    clean_runtime(store, &mut guests)?;
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
pub(super) fn recover_uids(store: &Store, range: UidRange, guests: &[GuestInfo]) -> UidPool {
    let pool = UidPool::new(range);
    for guest in guests {
        let id = guest.guest;
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

fn spec_of(h: &HeaderInfo) -> Option<TpmSpec> {
    let version = TpmVersion::parse(h.tpm_version).ok()?;
    let model = TpmModel::parse(h.tpm_model).ok()?;
    TpmSpec::new(version, model).ok()
}

fn fallback_spec() -> TpmSpec {
    TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).expect("TPM 2.0 with TIS is a valid pair")
}

fn clean_runtime(store: &Store, guests: &mut [GuestInfo]) -> Result<(), SupervisorError> {
    let entries = store.scan_runtime().map_err(SupervisorError::ScanStore)?;
    let mut live = BTreeSet::new();
    for entry in &entries {
        if let RuntimeEntry::StateDir(id) = entry {
            let dir = store.runtime_state_dir(*id);
            let socket = store.ctrl_socket(*id);
            match store::in_use(&dir, Some(&socket)) {
                InUse::Yes { holder } => {
                    live.insert(*id);
                    let who = holder.map(|p| format!(" (pid {p})")).unwrap_or_default();
                    let reason = format!(
                        "a swtpm{who} from an earlier vtpmd still runs on {}; its writes since then are not sealed: stop it, then Start",
                        dir.display()
                    );
                    tracing::error!(guest = %id, "{reason}");
                    if let Some(info) = guests.iter_mut().find(|g| g.guest == *id) {
                        info.state = GuestState::Failed;
                        info.failure = Some(reason);
                    }
                }
                InUse::No => wipe(&dir, store::wipe_dir(&dir)),
            }
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

fn wipe(path: &std::path::Path, result: Result<(), store::StoreError>) {
    match result {
        Ok(()) => tracing::info!(path = %path.display(), "removed a leftover of an earlier run"),
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot remove a leftover: {}", chain(&e))
        }
    }
}
