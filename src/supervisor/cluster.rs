//! The supervisor's side of cluster mode (`crate::cluster`): ownership
//! taken before a guest's state is used, each durable reseal handed to the
//! replicator, a stopped guest let go, and the fences carried out.
//! In local mode (no `[cluster]` endpoints) every function here does
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::cluster::{Cluster, ClusterError, Fence, SealedSource};
use crate::error_chain::chain;
use crate::protocol::GuestId;
use crate::store::Store;
use crate::vault::{self, VaultError};

use super::finish::{Ending, finish};
use super::{EventKind, Shared, SupervisorError, blocking};

/// The replicator's view of the state directory, and where what it
/// finds is told (Monitor events, once the supervisor is up).
#[derive(Debug)]
pub(super) struct Source {
    pub(super) store: Store,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    pub(super) shared: std::sync::OnceLock<std::sync::Weak<Shared>>,
}

impl Source {
    fn publish(&self, guest: GuestId, kind: EventKind, detail: String) {
        let Some(shared) = self.shared.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        if let Ok(g) = shared.guest(guest) {
            shared.publish(kind, g.info(), Some(detail));
        }
    }
}

impl SealedSource for Source {
    fn read(&self, guest: GuestId) -> Result<Option<(u64, Vec<u8>)>, String> {
        match vault::read_sealed(self.store.sealed_paths(guest).current(), guest) {
            Ok(file) => Ok(Some((file.header.generation, file.bytes))),
            Err(VaultError::Missing { .. }) => Ok(None),
            Err(e) => Err(chain(&e)),
        }
    }

    fn replicated(&self, _guest: GuestId, _generation: u64, lag: Duration) {
        self.metrics.cluster_replicated(lag);
    }

    fn behind(&self, guest: GuestId, error: &str) {
        self.publish(
            guest,
            EventKind::ReplicationBehind,
            format!("its reseals are not in etcd yet (retried): {error}"),
        );
    }

    fn caught_up(&self, guest: GuestId, generation: u64) {
        self.publish(
            guest,
            EventKind::ReplicationCaughtUp,
            format!("etcd has its newest reseal again (generation {generation})"),
        );
    }
}

/// The typed error for a refusal or failure of etcd's about `guest`.
pub(super) fn refused(guest: GuestId, e: ClusterError) -> SupervisorError {
    match e {
        ClusterError::OwnedElsewhere { owner, .. } => {
            SupervisorError::OwnedElsewhere { guest, owner }
        }
        ClusterError::Stale { local, newest, .. } => SupervisorError::RolledBack {
            guest,
            generation: local,
            current: newest,
        },
        ClusterError::Exists { .. } => SupervisorError::GuestExists { guest },
        ClusterError::NoRecord { .. } => SupervisorError::NoSuchGuest { guest },
        ClusterError::Contended { .. } => SupervisorError::Busy { guest },
        ClusterError::Corrupt { what, .. } => SupervisorError::StateCorrupt {
            guest,
            what: format!("its record in etcd: {what}"),
        },
        other => SupervisorError::ClusterUnavailable {
            guest,
            source: Box::new(other),
        },
    }
}

/// Takes ownership of `guest` for its current sealed file here (Start,
/// Create with `new`), refusing a rollback; nothing in local mode.
pub(super) async fn claim_current(
    shared: &Shared,
    guest: GuestId,
    new: bool,
) -> Result<(), SupervisorError> {
    let Some(cluster) = &shared.cluster else {
        return Ok(());
    };
    let store = shared.store.clone();
    let file = blocking(guest, "read the sealed file of", move || {
        vault::read_sealed(store.sealed_paths(guest).current(), guest)
    })
    .await?
    .map_err(|e| SupervisorError::from_vault(guest, "read", e))?;
    claim(
        cluster,
        guest,
        file.header.generation,
        Some(&file.bytes),
        new,
    )
    .await
}

/// Import: ownership for a checked file of generation `generation` that
/// is not on disk yet (the replicator writes it once it is).
pub(super) async fn claim_for_import(
    shared: &Shared,
    guest: GuestId,
    generation: u64,
) -> Result<(), SupervisorError> {
    let Some(cluster) = &shared.cluster else {
        return Ok(());
    };
    claim(cluster, guest, generation, None, false).await
}

async fn claim(
    cluster: &Cluster,
    guest: GuestId,
    generation: u64,
    bytes: Option<&[u8]>,
    new: bool,
) -> Result<(), SupervisorError> {
    cluster
        .claim(guest, generation, bytes, new)
        .await
        .map(|_| ())
        .map_err(|e| refused(guest, e))
}

/// Rekey, Grant, Revoke: a keyslot change writes the next generation, which
/// etcd must get like any reseal. A running guest is this host's already;
/// a stopped one (let go in etcd) is claimed for it, refused like a Start
/// when another host owns it or etcd holds a newer generation. Dropping
/// the claim, whether the change was made or refused, hands the file to
/// the replicator and lets a stopped guest go again once etcd has it.
pub(super) async fn claim_for_keyslot_change(
    shared: &Shared,
    guest: GuestId,
    running: bool,
) -> Result<KeyslotClaim<'_>, SupervisorError> {
    if !running {
        claim_current(shared, guest, false).await?;
    }
    Ok(KeyslotClaim {
        shared,
        guest,
        running,
    })
}

pub(super) struct KeyslotClaim<'a> {
    shared: &'a Shared,
    guest: GuestId,
    running: bool,
}

impl Drop for KeyslotClaim<'_> {
    fn drop(&mut self) {
        resealed(self.shared, self.guest);
        if !self.running {
            release(self.shared, self.guest);
        }
    }
}

/// MigrateIn: ownership moves from the source with the first reseal
/// here. Refused while etcd cannot be read (the move could not be made).
pub(super) async fn expect_handoff(shared: &Shared, guest: GuestId) -> Result<(), SupervisorError> {
    let Some(cluster) = &shared.cluster else {
        return Ok(());
    };
    cluster
        .expect_handoff(guest)
        .await
        .map_err(|e| refused(guest, e))
}

/// This host forgets the guest locally; nothing more goes to etcd.
pub(super) fn dropped(shared: &Shared, guest: GuestId) {
    if let Some(cluster) = &shared.cluster {
        cluster.dropped(guest);
    }
}

/// A durable reseal: to etcd within the replication window.
pub(super) fn resealed(shared: &Shared, guest: GuestId) {
    if let Some(cluster) = &shared.cluster {
        cluster.resealed(guest);
    }
}

/// A guest this host claimed but does not run: let go once etcd has its
/// newest reseal.
pub(super) fn release(shared: &Shared, guest: GuestId) {
    if let Some(cluster) = &shared.cluster {
        cluster.release(guest);
    }
}

/// After a restart: every adopted guest is claimed again (its owner key is
/// bound to the lease taken up again, or must be taken anew). One another
/// host owns now, or whose newer state etcd holds, is fenced at once; with
/// etcd unreachable the guests run on and their reseals are written once
/// it answers (the write checks ownership then).
pub(super) async fn claim_adopted(shared: &Arc<Shared>) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let mut stopped = Vec::new();
    for guest in shared.registry.all() {
        if guest.info().pid.is_none() {
            stopped.push(guest.id);
            continue;
        }
        let id = guest.id;
        match claim_current(shared, id, false).await {
            Ok(()) => cluster.resealed(id),
            Err(SupervisorError::ClusterUnavailable { source, .. }) => {
                tracing::warn!(guest = %id, "cannot claim the adopted guest in etcd yet: {}", chain(&*source));
                cluster.resealed(id);
            }
            Err(e) => {
                tracing::error!(guest = %id, "the adopted guest is not this host's in the cluster: {}", chain(&e));
                let owner = match e {
                    SupervisorError::OwnedElsewhere { owner, .. } => Some(owner),
                    _ => None,
                };
                fence_guest(shared, id, &Fence::Guest { guest: id, owner }).await;
            }
        }
    }
    // In the background: one read per stopped guest must not hold up a
    // start-up with many guests (or with etcd unreachable).
    let cluster = Arc::clone(cluster);
    tokio::spawn(async move {
        for id in stopped {
            if let Err(e) = cluster.settle_stopped(id).await {
                tracing::warn!(guest = %id, "cannot check whether this host still owns the stopped guest: {}", chain(&e));
            }
        }
    });
}

/// A run ended with its state sealed: replicated, then let go.
pub(super) fn run_ended(shared: &Shared, guest: GuestId) {
    if let Some(cluster) = &shared.cluster {
        cluster.resealed(guest);
        cluster.release(guest);
    }
}

/// Delete: the guest's cluster record goes too, when it is this host's or
/// nobody's. An unreachable etcd refuses the Delete (the record would be
/// left behind for another host to start).
pub(super) async fn forget(shared: &Shared, guest: GuestId) -> Result<(), SupervisorError> {
    let Some(cluster) = &shared.cluster else {
        return Ok(());
    };
    cluster.forget(guest).await.map_err(|e| refused(guest, e))
}

/// Carries out every fence etcd's answers call for, for as long as the
/// supervisor lives.
pub(super) fn spawn_fencer(shared: &Arc<Shared>, mut fences: mpsc::UnboundedReceiver<Fence>) {
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        while let Some(fence) = fences.recv().await {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let guests: Vec<GuestId> = match &fence {
                Fence::All { .. } => shared
                    .registry
                    .all()
                    .into_iter()
                    .filter(|g| g.info().pid.is_some())
                    .map(|g| g.id)
                    .collect(),
                Fence::Guest { guest, .. } => vec![*guest],
            };
            for guest in guests {
                fence_guest(&shared, guest, &fence).await;
            }
        }
    });
}

async fn fence_guest(shared: &Arc<Shared>, id: GuestId, fence: &Fence) {
    let Ok(guest) = shared.guest(id) else {
        return;
    };
    // However long the guest's current operation takes: a fence does not
    // give up.
    let mut slot = loop {
        match guest.lock(Duration::from_secs(1)).await {
            Ok(slot) => break slot,
            Err(_) => tracing::debug!(guest = %id, "fence waits for the guest's operation"),
        }
    };
    if slot.run.is_none() {
        return;
    }
    // A run handed out with MigrateOut: the destination took the guest
    // over (its first reseal there); this run ends as its VMM leaves.
    if slot.outgoing.is_some() {
        tracing::info!(guest = %id, "etcd names the migration's destination the owner now");
        return;
    }
    let why = match fence {
        Fence::All { lease } => format!("this host's etcd lease {lease:x} expired"),
        Fence::Guest { owner: Some(o), .. } => format!("etcd names {o} its owner"),
        Fence::Guest { owner: None, .. } => "etcd names no owner".to_owned(),
    };
    shared.metrics.fenced();
    let info = finish(shared, &guest, &mut slot, Ending::Fenced).await;
    shared.publish(EventKind::Fenced, info, Some(why));
}

/// A cluster joined: the membership, its fences, and the replicator's
/// source (told the supervisor once it exists).
pub(super) type Joined = (Arc<Cluster>, mpsc::UnboundedReceiver<Fence>, Arc<Source>);

/// Connects when `[cluster]` is configured.
pub(super) async fn join(
    config: &super::SupervisorConfig,
    store: &Store,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<Option<Joined>, SupervisorError> {
    let Some(setup) = &config.cluster else {
        return Ok(None);
    };
    let source = Arc::new(Source {
        store: store.clone(),
        metrics: Arc::clone(metrics),
        shared: std::sync::OnceLock::new(),
    });
    Cluster::join(
        &setup.section,
        setup.host.clone(),
        store.state_dir().join("cluster.lease"),
        Arc::clone(&source) as Arc<dyn SealedSource>,
    )
    .await
    .map(|(cluster, fences)| Some((cluster, fences, source)))
    .map_err(SupervisorError::JoinCluster)
}
