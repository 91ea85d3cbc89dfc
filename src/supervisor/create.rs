//! Create: a fresh TPM, provisioned by swtpm_setup under the guest's swtpm
//! state key in a private directory, sealed as generation 1, and the
//! guest's own swtpm uid recorded. A failure at any step leaves nothing
//! behind: no sealed file, no guest directory, no provisioning directory,
//! no uid taken. The passphrase slot's Argon2id and swtpm_setup run at the
//! same time: both need only the new data key.
//!
//! swtpm_setup (and the swtpm it runs) run as vtpmd's user, not as the
//! guest's uid: they read no input from the guest, and with certificates
//! they need the local CA's signing key, which stays vtpmd's (0700). The
//! result is archived and sealed; at Start the files are written into the
//! guest's runtime directory and handed to its uid.

use std::sync::Arc;

use crate::error_chain::chain;
use crate::protocol::{GuestId, TpmSpec};
use crate::secret::SecretBuf;
use crate::store::{self, Store, StoreError};
use crate::swtpm::provision::{ProvisionSpec, provision};
use crate::vault::{FreshKey, SealedState, StateArchive, VaultError};

use super::guest::Guest;
use super::registry::Taken;
use super::reseal::is_state_file;
use super::state::{Action, GuestState, decide};
use super::{CreatePolicy, EventKind, GuestInfo, Shared, SupervisorError, blocking};

pub(super) async fn create(
    shared: Arc<Shared>,
    id: GuestId,
    spec: TpmSpec,
    passphrase: SecretBuf,
    slots: CreatePolicy,
    ek_certificate: bool,
) -> Result<GuestInfo, SupervisorError> {
    let _admitted = shared.enter().await?;
    // Validate everything first.
    if !shared.host.supports(spec.version()) {
        return Err(SupervisorError::UnsupportedTpm {
            version: spec.version(),
        });
    }
    if ek_certificate && !shared.host.can_create_certificates() {
        return Err(SupervisorError::CertificatesUnavailable {
            guest: id,
            missing: shared.host.missing_cert_tools.clone(),
        });
    }
    let reservation = shared.registry.reserve(id).map_err(|taken| match taken {
        Taken::Exists(state) => match decide(state, Action::Create) {
            Err(why) => SupervisorError::refused(id, state, Action::Create, why),
            Ok(_) => SupervisorError::GuestExists { guest: id },
        },
        Taken::BeingCreated => SupervisorError::Busy { guest: id },
    })?;

    // Then act; the guards undo whatever was done if we return early.
    let placed = NewGuest::place(&shared, id).await?;
    let uid = placed.uid;
    let store = shared.store.clone();

    // The data key first (microseconds), then two things at once that
    // need only it: the passphrase slot's Argon2id (under a KDF permit) and
    // swtpm_setup under the swtpm state key. Neither waits for the other,
    // so a Create costs the slower of the two, not their sum (swtpm_setup
    // takes about 0.6 s, mostly waiting; Argon2id with the defaults a few
    // hundred ms of CPU). The permit is taken before either starts: a
    // Create queued behind other KDFs when shutdown closes the permits has
    // done nothing.
    let permit = shared.kdf_permit().await?;
    let paths = store.sealed_paths(id);
    let fresh = blocking(id, "generate the data key for", move || {
        FreshKey::generate(paths, id, spec)
    })
    .await?
    .map_err(|e| match e {
        VaultError::AlreadyExists { .. } => SupervisorError::GuestExists { guest: id },
        other => SupervisorError::from_vault(id, "prepare", other),
    })?;
    let swtpm_key = fresh
        .swtpm_state_key()
        .map_err(|e| SupervisorError::from_vault(id, "derive the swtpm key for", e))?;
    let policy = shared.config.kdf;
    let host_key = Arc::clone(&shared.host_key);
    let derive = blocking(id, "derive the key for", move || {
        let prepared = fresh.with_passphrase(&passphrase, &policy);
        drop(passphrase);
        drop(permit);
        // The policy's other slots, in memory: the first seal writes
        // them all at once.
        let prepared = prepared.and_then(|mut state| {
            slots.apply(&mut state, &host_key)?;
            Ok(state)
        });
        drop(slots);
        prepared
    });
    let worker = Arc::clone(&shared);
    let provision_spec = ProvisionSpec {
        version: spec.version(),
        pcr_banks: shared.config.pcr_banks.clone(),
        ek_certificate,
    };
    let provisioning = blocking(id, "provision", move || {
        provision_archive(&worker, id, &swtpm_key, &provision_spec)
    });
    let (prepared, archive) = tokio::join!(derive, provisioning);
    let mut prepared = prepared?.map_err(|e| SupervisorError::from_vault(id, "prepare", e))?;
    let archive = archive??;
    let keyslots = prepared.keyslots();
    let generation = blocking(id, "seal", move || {
        prepared
            .seal(&archive)
            .map_err(|e| SupervisorError::from_vault(id, "seal", e))
    })
    .await??;
    // Cluster mode: new to the cluster too, its generation 1 in etcd; a
    // stopped guest is nobody's (another host may start it).
    super::cluster::claim_current(&shared, id, true).await?;
    super::cluster::release(&shared, id);
    if let Some(uid) = uid {
        let store = store.clone();
        blocking(id, "record the swtpm uid", move || {
            store.write_owner(id, uid)
        })
        .await?
        .map_err(|source| SupervisorError::Store {
            guest: id,
            op: "record the swtpm uid",
            source,
        })?;
    }

    placed.keep();
    let info = GuestInfo {
        guest: id,
        spec,
        state: GuestState::Stopped,
        pid: None,
        ctrl_socket: None,
        generation,
        failure: None,
        reason: None,
        keyslots,
        replication: None,
    };
    reservation.commit(Guest::new(info.clone()));
    tracing::debug!(guest = %id, %spec, ek_certificate, swtpm_uid = ?uid, keyslots = info.keyslots.len(), "guest created");
    shared.publish(EventKind::Created, info.clone(), None);
    Ok(info)
}

/// swtpm_setup into `<runtime_dir>/<uuid>.create/` under the swtpm state
/// key `key`; the files it made, read into memory (encrypted by swtpm).
/// The directory is wiped either way.
fn provision_archive(
    shared: &Shared,
    id: GuestId,
    key: &SecretBuf,
    spec: &ProvisionSpec,
) -> Result<StateArchive, SupervisorError> {
    let store = &shared.store;
    let work = store.create_dir(id);
    store
        .fresh_private_dir(&work, None, None)
        .map_err(|source| SupervisorError::Store {
            guest: id,
            op: "create the provisioning directory",
            source,
        })?;
    let result = (|| {
        provision(
            &shared.config.binaries,
            &work,
            key,
            spec,
            shared.ca.as_ref(),
        )
        .map_err(|source| SupervisorError::Provision { guest: id, source })?;
        StateArchive::from_dir_matching(&work, is_state_file).map_err(|e| SupervisorError::Vault {
            guest: id,
            op: "archive",
            source: VaultError::Archive(e),
        })
    })();
    if let Err(e) = store::wipe_dir(&work) {
        tracing::error!(guest = %id, "cannot wipe the provisioning directory: {}", chain(&e));
    }
    result
}

/// Gives the uid back when Create (or an Import of a new guest) fails.
/// A guest new to this host, being placed (Create, Import, MigrateIn): its
/// swtpm uid allocated and its directory made; both undone when dropped
/// unless kept.
pub(super) struct NewGuest<'s> {
    pub(super) uid: Option<u32>,
    uid_guard: UidGuard<'s>,
    undo: Undo,
}

impl<'s> NewGuest<'s> {
    /// Allocates a swtpm uid (when vtpmd runs each swtpm as its own) and
    /// makes the guest's directory under `guests/`.
    pub(super) async fn place(shared: &'s Shared, id: GuestId) -> Result<Self, SupervisorError> {
        let uid = match &shared.uids {
            Some(pool) => Some(pool.allocate(id).ok_or(SupervisorError::NoFreeUid {
                guest: id,
                range: pool.range(),
            })?),
            None => None,
        };
        let uid_guard = UidGuard {
            shared,
            id,
            armed: true,
        };
        let store = shared.store.clone();
        let made = blocking(id, "create the guest directory", {
            let store = store.clone();
            move || store.create_guest_dir(id)
        })
        .await?;
        match made {
            Ok(_) => {}
            // Foreign files in a directory no guest of this host owns.
            Err(StoreError::Unexpected { .. }) => {
                return Err(SupervisorError::GuestExists { guest: id });
            }
            Err(source) => {
                return Err(SupervisorError::Store {
                    guest: id,
                    op: "create the guest directory",
                    source,
                });
            }
        }
        Ok(Self {
            uid,
            uid_guard,
            undo: Undo {
                store,
                id,
                armed: true,
            },
        })
    }

    /// The guest is in place: nothing is undone.
    pub(super) fn keep(mut self) {
        self.undo.armed = false;
        self.uid_guard.armed = false;
    }
}

struct UidGuard<'s> {
    shared: &'s Shared,
    id: GuestId,
    armed: bool,
}

impl Drop for UidGuard<'_> {
    fn drop(&mut self) {
        if let (true, Some(pool)) = (self.armed, &self.shared.uids) {
            pool.release(self.id);
        }
    }
}

/// Undoes a half-done Create (or Import of a new guest).
struct Undo {
    store: Store,
    id: GuestId,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // The guest directory was new or empty when Create began, so
        // whatever is in it now is ours.
        let paths = self.store.sealed_paths(self.id);
        if let Err(e) = SealedState::delete(&paths) {
            tracing::error!(guest = %self.id, "cannot remove a half-created sealed state: {}", chain(&e));
        }
        if let Err(e) = store::wipe_dir(&self.store.create_dir(self.id)) {
            tracing::error!(guest = %self.id, "cannot wipe the provisioning directory: {}", chain(&e));
        }
        if let Err(e) = self.store.remove_guest_dir(self.id) {
            tracing::error!(guest = %self.id, "cannot remove the guest directory: {}", chain(&e));
        }
    }
}
