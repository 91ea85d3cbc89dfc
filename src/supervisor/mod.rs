//! The guest registry and each guest's lifecycle: one swtpm per running
//! guest, its state sealed at rest and resealed on every write.
//!
//! The [`Supervisor`] is what the API server calls. Its parts, one job per
//! file:
//!
//! | file | job |
//! |---|---|
//! | `state` | the (state, action) table, with no wildcard |
//! | `registry`, `guest` | the guests, each with a snapshot (read without waiting) and an operation lock |
//! | `recover` | the registry rebuilt from the state root; crash leftovers wiped |
//! | `create`, `start`, `stop`, `manage` | the operations |
//! | `reseal` | inotify on the runtime dir → coalesced, durable reseals |
//! | `exit` | the pidfd watcher: swtpm's exit noticed at once |
//! | `finish` | the one way a run ends: final reseal, wipe, key dropped |
//! | `uids` | one uid per guest from the configured range, recorded with the guest |
//!
//! Concurrency: each guest's operations are serialized by a tokio mutex
//! held for the whole operation (waiting at most `lock_wait`, then
//! [`SupervisorError::Busy`]); different guests run fully in parallel;
//! Argon2 runs on blocking threads under a semaphore, so parallel starts
//! cannot exhaust memory. Every operation runs in its own task, so a caller
//! that gives up (a client disconnecting) cannot cut it off half-way and
//! leave something behind.

#![forbid(unsafe_code)]

mod adopted;
mod cluster;
mod config;
mod create;
mod error;
mod exit;
mod fdwatch;
mod finish;
mod guest;
mod handover;
mod keys;
mod lost_write;
mod manage;
mod migrate;
mod mobility;
mod reattach;
mod recover;
mod registry;
mod reseal;
mod resealer;
mod scopes;
mod space;
mod start;
mod state;
mod stop;
mod uids;
mod watcher;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, RwLock, Semaphore, broadcast};

use crate::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use crate::secret::SecretBuf;
use crate::store::{DaemonLock, Store};
use crate::swtpm::probe::HostSupport;
use crate::swtpm::provision::LocalCa;

pub use config::{
    ClusterSetup, DEFAULT_RUNTIME_SPACE_MIB, SupervisorConfig, default_kdf_parallelism,
};
pub use error::SupervisorError;
pub use handover::KeyStore;
pub use keys::{CreatePolicy, Unlock};
pub use migrate::{DEFAULT_TICKET_TTL, MigrationOut};
pub use mobility::Exported;
pub use state::{Action, Allowed, GuestState, Refused, decide};
pub use uids::UidRange;

use guest::Guest;
use registry::Registry;
use uids::UidPool;

/// How many events a slow subscriber may fall behind before it sees
/// `RecvError::Lagged`.
const EVENT_CAPACITY: usize = 1024;

/// One guest as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    pub guest: GuestId,
    pub spec: TpmSpec,
    pub state: GuestState,
    /// swtpm's pid while running.
    pub pid: Option<u32>,
    /// Where the VMM connects, while running.
    pub ctrl_socket: Option<PathBuf>,
    /// The sealed generation on disk.
    pub generation: u64,
    /// Why the guest is `failed`.
    pub failure: Option<String>,
    /// What an operator must know about a guest that is not failed: a
    /// running guest whose key is needed to reseal (adopted after a
    /// restart without it), a stopped one whose runtime directory holds
    /// writes not sealed yet.
    pub reason: Option<String>,
    /// The sealed file's keyslots: each one's kind (and host).
    pub keyslots: Vec<crate::vault::SlotSummary>,
    /// Cluster mode: what etcd has of the guest from this host (while this
    /// host owns it); `None` otherwise.
    pub replication: Option<crate::cluster::Replica>,
}

/// What this host can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub versions: Vec<TpmVersion>,
    /// `tpm-tis` always; `tpm-crb` when TPM 2.0 is served.
    pub models: Vec<TpmModel>,
    /// Nova traits (`COMPUTE_SECURITY_TPM_1_2`, `COMPUTE_SECURITY_TPM_2_0`).
    pub traits: Vec<String>,
    pub swtpm_version: String,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Starting,
    /// `start` is set when a Start brought the guest up (not when a failed
    /// operation left it running).
    Running {
        start: Option<StartTimings>,
    },
    Stopping,
    Stopped,
    Failed,
    Deleted,
    /// A restarted vtpmd took over a swtpm an earlier one started (the
    /// detail says whether its key came back and what was resealed).
    Adopted,
    /// A write of swtpm is durable; `latency` runs from the moment vtpmd
    /// saw the write (inotify) to the end of the directory fsync.
    Resealed {
        latency: Duration,
    },
    /// A reseal failed: writes exist only in the runtime directory until
    /// a retry succeeds (the detail says why; the `resealed` that follows
    /// says it recovered).
    ResealFailed,
    /// swtpm said it could not store its state: a write is lost and its
    /// TPM fails every command (detail: swtpm's words).
    StoreFailed,
    /// A running guest's state was sealed for an Export, or found sealed
    /// already (the detail says which); an Export of a stopped guest
    /// changes nothing and raises no event.
    Exported,
    /// An Import registered the guest or gave it a newer generation.
    Imported,
    /// MigrateOut handed a ticket for the guest to another host; the guest
    /// runs here until its VMM has moved.
    MigratingOut,
    /// The run handed out ended: the guest lives on the other host now.
    MigratedOut,
    /// MigrateIn: a swtpm waits for the VMM's state from the source.
    MigratingIn,
    /// Abort: a migration was called off on this host.
    MigrationAborted,
    /// Cluster mode: the guest is not this host's any more (its lease
    /// expired, or another host took it over); its swtpm was killed and
    /// nothing was resealed (the detail says why).
    Fenced,
    /// Cluster mode: the guest's reseals cannot be written to etcd now
    /// (the detail says why); they are retried, the guest runs on.
    ReplicationBehind,
    /// Cluster mode: etcd has the guest's newest reseal again.
    ReplicationCaughtUp,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Starting => "starting",
            EventKind::Running { .. } => "running",
            EventKind::Stopping => "stopping",
            EventKind::Stopped => "stopped",
            EventKind::Failed => "failed",
            EventKind::Deleted => "deleted",
            EventKind::Adopted => "adopted",
            EventKind::Resealed { .. } => "resealed",
            EventKind::ResealFailed => "reseal-failed",
            EventKind::StoreFailed => "store-failed",
            EventKind::Exported => "exported",
            EventKind::Imported => "imported",
            EventKind::MigratingOut => "migrating-out",
            EventKind::MigratedOut => "migrated-out",
            EventKind::MigratingIn => "migrating-in",
            EventKind::MigrationAborted => "migration-aborted",
            EventKind::Fenced => "fenced",
            EventKind::ReplicationBehind => "replication-behind",
            EventKind::ReplicationCaughtUp => "replication-caught-up",
        }
    }

    /// The journal's `MESSAGE_ID` of this kind's log line: stable across
    /// releases (as systemd's own daemons do), so an operator can filter on
    /// it (`journalctl MESSAGE_ID=…`); docs/integration.md lists them.
    pub fn message_id(self) -> &'static str {
        match self {
            EventKind::Created => "69332dcb0edf4de6b45a92a2b0e75d15",
            EventKind::Starting => "14d64565a5f04261ac18579cba2f5c4b",
            EventKind::Running { .. } => "a0e55e4c445d49079043d9ac368e6861",
            EventKind::Stopping => "71835469a1d147db8f693ed267c8dd70",
            EventKind::Stopped => "a01348523b7a4c0ebcec544b8b0b360f",
            EventKind::Failed => "a91df47a5a4943b79935443ebe106850",
            EventKind::Deleted => "28f11e699f3a4a7c8ad6f5c2cf0970e7",
            EventKind::Adopted => "8d8cf6f40cae471c9a179fbdfc45cd38",
            EventKind::Resealed { .. } => "74f54cdf17d54481ba2c6ced725083a3",
            EventKind::ResealFailed => "1e45c59e304849e2bff8013c3cbc31df",
            EventKind::StoreFailed => "0fe843e7a91a46c8ae18514640c316a9",
            EventKind::Exported => "1f33f14dfbc447f8901494e849eddd27",
            EventKind::Imported => "332302d1f7b54a58ae3cfd5eaab20404",
            EventKind::MigratingOut => "d74330149b1c4e68af1b196b2f91cfe8",
            EventKind::MigratedOut => "74ed981899814384bdb11f6e5a16f44b",
            EventKind::MigratingIn => "789adcb8b7204cb0aab57941471a1dc6",
            EventKind::MigrationAborted => "896546539df24d3d8ca9293170f5c23a",
            EventKind::Fenced => "c4b1f3a2e67d4e0f9a5b8c7d6e1f2a3b",
            EventKind::ReplicationBehind => "5b9e2d7c4a1f4e3b8c6d0a2f7e9b1c48",
            EventKind::ReplicationCaughtUp => "e07a4c2b9d6f4b1e8a3c5d7f9b2e4a61",
        }
    }

    /// The event that reports a guest settling in `state`.
    fn settled(state: GuestState) -> Self {
        match state {
            GuestState::Stopped => EventKind::Stopped,
            GuestState::Starting => EventKind::Starting,
            GuestState::Running => EventKind::Running { start: None },
            GuestState::Stopping => EventKind::Stopping,
            GuestState::Failed => EventKind::Failed,
            GuestState::MigratedOut => EventKind::MigratedOut,
        }
    }
}

/// Where the time of one Start went, phase by phase, for operators (the
/// log and Monitor) and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTimings {
    /// Waiting for a KDF permit (other guests' Argon2 runs).
    pub queued: Duration,
    /// Argon2 over the passphrase.
    pub kdf: Duration,
    /// Reading, authenticating and decrypting the sealed file, and writing
    /// the state files into the fresh runtime directory.
    pub unseal: Duration,
    /// Forking and executing swtpm, until `spawn` returned.
    pub spawn: Duration,
    /// From there until swtpm answered on its control socket.
    pub ready: Duration,
    /// The whole Start, from the call to the answer.
    pub total: Duration,
}

/// One event on [`Supervisor::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The guest as it is after the event.
    pub guest: GuestInfo,
    /// Extra words for operators: why a guest failed, that Start opened
    /// the previous generation, why an operation was undone.
    pub detail: Option<String>,
}

/// The supervisor; share it as `Arc<Supervisor>`.
#[derive(Debug)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

/// What every operation and background task of the supervisor uses.
#[derive(Debug)]
pub(crate) struct Shared {
    config: SupervisorConfig,
    store: Store,
    host: HostSupport,
    ca: Option<LocalCa>,
    /// Per-guest uids; `None` when every swtpm runs as vtpmd's user.
    uids: Option<UidPool>,
    kdf_permits: Arc<Semaphore>,
    /// The runtime directories' inotify watches, all in one instance.
    watcher: Arc<watcher::Watcher>,
    events: broadcast::Sender<Event>,
    shutting_down: AtomicBool,
    /// Operations hold it shared; `shutdown` takes it exclusively, so it
    /// waits for every operation in flight and no new one starts.
    gate: Arc<RwLock<()>>,
    registry: Registry,
    /// Keys across restarts (the service manager's fd store).
    handover: handover::Handover,
    /// Each swtpm's transient systemd scope.
    scopes: scopes::Scopes,
    /// Migration tickets taken here, until they expire.
    used_tickets: Arc<crate::vault::UsedTickets>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Whether each guest's runtime directory gets a tmpfs of its own.
    space: space::RuntimeSpace,
    /// One vtpmd per state directory, for as long as this one lives.
    _daemon_lock: DaemonLock,
    /// This host's identity: what `host` keyslots for this host open with.
    host_key: Arc<crate::vault::HostKey>,
    /// Cluster mode's etcd membership; `None` in local mode.
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    /// Admission of an operation: refused once shutdown has begun.
    async fn enter(&self) -> Result<OwnedRwLockReadGuard<()>, SupervisorError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SupervisorError::ShuttingDown);
        }
        let guard = Arc::clone(&self.gate).read_owned().await;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SupervisorError::ShuttingDown);
        }
        Ok(guard)
    }

    /// A one-shot watch on guest `id`'s runtime directory (set before its
    /// state is read, so a later write raises a reseal).
    fn watch(&self, id: GuestId, dir: &std::path::Path) -> Result<watcher::Watch, SupervisorError> {
        self.watcher.watch(dir).map_err(|e| SupervisorError::Store {
            guest: id,
            op: "watch the runtime directory",
            source: crate::store::StoreError::ReadDir {
                path: dir.to_owned(),
                source: e,
            },
        })
    }

    /// The registered guest `id`, or NoSuchGuest.
    fn guest(&self, id: GuestId) -> Result<Arc<guest::Guest>, SupervisorError> {
        self.registry
            .get(id)
            .ok_or(SupervisorError::NoSuchGuest { guest: id })
    }

    /// `info` with what etcd has of the guest (cluster mode).
    fn with_replication(&self, mut info: GuestInfo) -> GuestInfo {
        if let Some(cluster) = &self.cluster {
            info.replication = cluster.replica(info.guest);
        }
        info
    }

    fn publish(&self, kind: EventKind, guest: GuestInfo, detail: Option<String>) {
        let guest = self.with_replication(guest);
        log_event(kind, &guest, detail.as_deref());
        self.metrics.event(kind.as_str());
        match kind {
            EventKind::Running { start: Some(t) } => self.metrics.start(
                &[
                    ("queued", t.queued),
                    ("kdf", t.kdf),
                    ("unseal", t.unseal),
                    ("spawn", t.spawn),
                    ("ready", t.ready),
                ],
                t.total,
            ),
            EventKind::Resealed { latency } => self.metrics.resealed(latency),
            EventKind::ResealFailed => self.metrics.reseal_failed(),
            _ => {}
        }
        // No subscriber is fine.
        let _ = self.events.send(Event {
            kind,
            guest,
            detail,
        });
    }

    /// One of the KDF permits (they bound how many Argon2id run at once),
    /// counted in the metrics as waiting, then as in use until dropped;
    /// `ShuttingDown` once shutdown has closed them.
    async fn kdf_permit(&self) -> Result<KdfPermit, SupervisorError> {
        let waiting = self.metrics.kdf_waiting();
        let permit = Arc::clone(&self.kdf_permits)
            .acquire_owned()
            .await
            .map_err(|_| SupervisorError::ShuttingDown)?;
        drop(waiting);
        Ok(KdfPermit {
            _running: self.metrics.kdf_running(),
            _permit: permit,
        })
    }

    /// Runs `f` (which derives keys) on a blocking thread while holding one
    /// of the KDF permits.
    async fn kdf<T, F>(&self, guest: GuestId, op: &'static str, f: F) -> Result<T, SupervisorError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = self.kdf_permit().await?;
        blocking(guest, op, move || {
            let out = f();
            drop(permit);
            out
        })
        .await
    }

    fn capabilities(&self) -> Capabilities {
        let mut models = vec![TpmModel::Tis];
        if self.host.supports(TpmVersion::V2_0) {
            models.push(TpmModel::Crb);
        }
        Capabilities {
            versions: self.host.versions.clone(),
            models,
            traits: self.host.traits().into_iter().map(str::to_owned).collect(),
            swtpm_version: self.host.swtpm_version.clone(),
        }
    }
}

/// The one log line of each event: `GUEST=`, `OPERATION=` (the event's
/// kind), `MESSAGE_ID=`, the state and generation after it, and what the
/// event says (`DETAIL=`). Reseals are debug (one per TPM write); the
/// troubles are warnings; the rest is the guest's lifecycle, info.
fn log_event(kind: EventKind, guest: &GuestInfo, detail: Option<&str>) {
    macro_rules! line {
        ($level:ident) => {
            match detail {
                Some(detail) => tracing::$level!(
                    guest = %guest.guest,
                    operation = kind.as_str(),
                    message_id = kind.message_id(),
                    state = %guest.state,
                    generation = guest.generation,
                    detail,
                    "guest {}",
                    kind.as_str()
                ),
                None => tracing::$level!(
                    guest = %guest.guest,
                    operation = kind.as_str(),
                    message_id = kind.message_id(),
                    state = %guest.state,
                    generation = guest.generation,
                    "guest {}",
                    kind.as_str()
                ),
            }
        };
    }
    match kind {
        EventKind::Resealed { .. } => line!(debug),
        EventKind::Failed | EventKind::ResealFailed => line!(warn),
        EventKind::StoreFailed | EventKind::Fenced => line!(error),
        EventKind::ReplicationBehind => line!(warn),
        _ => line!(info),
    }
}

/// The used-ticket nonces; a damaged file is reported and set aside (the
/// set starts empty: a replay then still meets the ticket's expiry and
/// the registry's refusal of a guest that exists).
fn load_used_tickets(path: &std::path::Path) -> crate::vault::UsedTickets {
    let (used, damage) = crate::vault::UsedTickets::load(path, std::time::SystemTime::now());
    if let Some(e) = damage {
        tracing::error!(path = %path.display(), "used migration tickets: {}; starting with none", crate::error_chain::chain(&e));
    }
    used
}

/// A KDF permit and its in-use gauge: both go when it is dropped.
struct KdfPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _running: crate::metrics::GaugeHold,
}

/// Runs blocking work (file system, fork/exec, fsync) off the async
/// threads.
async fn blocking<T, F>(guest: GuestId, op: &'static str, f: F) -> Result<T, SupervisorError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| SupervisorError::Task { guest, op, source })
}

/// Runs an operation in its own task: dropping the caller's future does not
/// cancel it half-way.
async fn detached<T, F>(guest: GuestId, op: &'static str, fut: F) -> Result<T, SupervisorError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, SupervisorError>> + Send + 'static,
{
    tokio::spawn(fut)
        .await
        .map_err(|source| SupervisorError::Task { guest, op, source })?
}

impl Supervisor {
    /// Probes swtpm, lays out the directories, rebuilds the registry from
    /// `<state_dir>/guests/*` and wipes what a crash left in the runtime
    /// directory (never what a live swtpm still uses: that guest is marked
    /// failed instead).
    pub async fn start(config: SupervisorConfig) -> Result<Arc<Supervisor>, SupervisorError> {
        Self::start_with(config, KeyStore::default()).await
    }

    /// [`start`](Self::start) under a service manager: `keys` is where
    /// keys go while guests run, and what came back from there. Every
    /// swtpm an earlier vtpmd left running is adopted: with its key when
    /// one came back (resealed at once), else `running` with the reason
    /// until a Start brings the passphrase.
    pub async fn start_with(
        config: SupervisorConfig,
        keys: KeyStore,
    ) -> Result<Arc<Supervisor>, SupervisorError> {
        if config.socket_mode & !0o777 != 0 {
            return Err(SupervisorError::Config {
                what: format!(
                    "socket_mode {:#o} has bits outside 0o777",
                    config.socket_mode
                ),
            });
        }
        let euid = nix::unistd::geteuid();
        match config.swtpm_uids {
            Some(range) if !euid.is_root() => {
                return Err(SupervisorError::Config {
                    what: format!(
                        "swtpm_uid_range {range} needs vtpmd to run as root (it runs as uid {euid})"
                    ),
                });
            }
            Some(range) => {
                tracing::info!(%range, "each guest's swtpm runs as its own uid from this range")
            }
            None => tracing::warn!(
                uid = euid.as_raw(),
                "every swtpm runs as vtpmd's own user: one guest's swtpm is not isolated from another's (per-guest uids need vtpmd to run as root)"
            ),
        }
        let store = Store::new(&config.state_dir, &config.runtime_dir)
            .map_err(SupervisorError::InitStore)?;
        let bins = config.binaries.clone();
        let for_setup = store.clone();
        let uid_range = config.swtpm_uids;
        let (host, ca, guests, uids, daemon_lock, host_key, used_tickets) =
            tokio::task::spawn_blocking(move || {
                for_setup.init().map_err(SupervisorError::InitStore)?;
                // Before anything is read or removed: a second vtpmd on this
                // state would take the first one's guests for leftovers.
                let daemon_lock = for_setup
                    .lock_daemon()
                    .map_err(SupervisorError::InitStore)?;
                // Under the lock: two vtpmds never race to make it.
                let host_key = crate::vault::HostKey::load_or_create(&for_setup.host_key_path())
                    .map_err(SupervisorError::HostKey)?;
                let used_tickets = load_used_tickets(&for_setup.used_tickets_path());
                let host =
                    crate::swtpm::probe::probe(&bins).map_err(SupervisorError::ProbeSwtpm)?;
                if uid_range.is_some() {
                    for_setup
                        .check_reachable()
                        .map_err(SupervisorError::InitStore)?;
                }
                let ca = if host.can_create_certificates() {
                    Some(LocalCa::open(&for_setup.ca_dir()).map_err(SupervisorError::OpenLocalCa)?)
                } else {
                    None
                };
                let guests = recover::recover(&for_setup, &bins.swtpm)?;
                let uids = uid_range.map(|range| recover::recover_uids(&for_setup, range, &guests));
                Ok::<_, SupervisorError>((
                    host,
                    ca,
                    guests,
                    uids,
                    daemon_lock,
                    host_key,
                    used_tickets,
                ))
            })
            .await
            .map_err(|source| SupervisorError::Config {
                what: format!("start-up task failed: {source}"),
            })??;

        let watcher = watcher::Watcher::start().map_err(|e| SupervisorError::Config {
            what: format!("cannot create an inotify instance: {e}"),
        })?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let scopes = scopes::Scopes::connect().await;
        let space = space::RuntimeSpace::choose(
            config.runtime_space,
            scopes.systemd().is_some(),
            &config.runtime_dir,
        );
        let registry = Registry::default();
        let mut found = Vec::new();
        for recovered in guests {
            let guest = Guest::new(recovered.info);
            if let Some(f) = recovered.found {
                found.push((Arc::clone(&guest), f));
            }
            registry.insert_recovered(guest);
        }
        let metrics = Arc::new(crate::metrics::Metrics::new(&host.swtpm_version));
        let joined = cluster::join(&config, &store, &metrics).await?;
        let (cluster, fences, source) = match joined {
            Some((cluster, fences, source)) => (Some(cluster), Some(fences), Some(source)),
            None => (None, None, None),
        };
        let shared = Arc::new(Shared {
            kdf_permits: Arc::new(Semaphore::new(config.kdf_parallelism.max(1))),
            watcher,
            config,
            store,
            host,
            ca,
            uids,
            events,
            shutting_down: AtomicBool::new(false),
            gate: Arc::new(RwLock::new(())),
            registry,
            handover: handover::Handover::new(keys),
            scopes,
            space,
            used_tickets: Arc::new(used_tickets),
            metrics,
            _daemon_lock: daemon_lock,
            host_key: Arc::new(host_key),
            cluster,
        });
        if let Some(fences) = fences {
            cluster::spawn_fencer(&shared, fences);
        }
        if let Some(source) = source {
            let _ = source.shared.set(Arc::downgrade(&shared));
        }
        let adopted = adopted::take_over(&shared, found).await;
        cluster::claim_adopted(&shared).await;
        // Tmpfs mounts whose guest stopped while no vtpmd ran (emptied by
        // the recovery above).
        for guest in shared.registry.all() {
            if guest.info().pid.is_none() {
                space::release(&shared, guest.id).await;
            }
        }
        shared.handover.forget_unclaimed();
        tracing::info!(
            guests = shared.registry.len(),
            adopted,
            kdf_parallelism = shared.config.kdf_parallelism,
            state_dir = %shared.config.state_dir.display(),
            runtime_dir = %shared.config.runtime_dir.display(),
            "supervisor ready"
        );
        Ok(Arc::new(Supervisor { shared }))
    }

    pub fn capabilities(&self) -> Capabilities {
        self.shared.capabilities()
    }

    /// This host's public key, what `Grant` on another host is given to
    /// let this one open a guest.
    pub fn host_public_key(&self) -> crate::vault::HostPublicKey {
        self.shared.host_key.public()
    }

    /// Provisions and seals a new TPM (generation 1); the guest is
    /// `stopped`. A failure leaves nothing behind.
    pub async fn create(
        &self,
        guest: GuestId,
        spec: TpmSpec,
        passphrase: SecretBuf,
        ek_certificate: bool,
    ) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "create", async move {
            create::create(
                shared,
                guest,
                spec,
                passphrase,
                CreatePolicy::User,
                ek_certificate,
            )
            .await
        })
        .await
    }

    /// [`create`](Self::create) with a policy: `Host` adds a host slot
    /// for this host, `Deployment` a key slot for its key.
    pub async fn create_with_policy(
        &self,
        guest: GuestId,
        spec: TpmSpec,
        passphrase: SecretBuf,
        policy: CreatePolicy,
        ek_certificate: bool,
    ) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "create", async move {
            create::create(shared, guest, spec, passphrase, policy, ek_certificate).await
        })
        .await
    }

    /// Unseals, spawns swtpm and answers once its control socket serves.
    pub async fn start_guest(
        &self,
        guest: GuestId,
        passphrase: SecretBuf,
    ) -> Result<GuestInfo, SupervisorError> {
        self.start_guest_with(guest, Unlock::Passphrase(passphrase))
            .await
    }

    /// [`start_guest`](Self::start_guest) with a passphrase, a key, or
    /// this host's own key (its host slot).
    pub async fn start_guest_with(
        &self,
        guest: GuestId,
        unlock: Unlock,
    ) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "start", async move {
            start::start_guest(shared, guest, unlock).await
        })
        .await
    }

    /// Adds a host slot for `host`; `unlock` must open the state. Returns
    /// the slot's index and the keyslots now.
    pub async fn grant(
        &self,
        guest: GuestId,
        unlock: Unlock,
        host: crate::vault::HostPublicKey,
    ) -> Result<(usize, Vec<crate::vault::SlotSummary>), SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "grant", async move {
            keys::grant(shared, guest, unlock, host).await
        })
        .await
    }

    /// Cluster mode: takes over a guest whose owner's lease expired (its
    /// host is gone), with the newest state etcd holds, and starts it here
    /// as Start does with `unlock`.
    pub async fn evacuate(
        &self,
        guest: GuestId,
        unlock: Unlock,
    ) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "evacuate", async move {
            mobility::evacuate(shared, guest, unlock).await
        })
        .await
    }

    /// Removes keyslot `index`, never the last one.
    pub async fn revoke(
        &self,
        guest: GuestId,
        unlock: Unlock,
        index: usize,
    ) -> Result<(usize, Vec<crate::vault::SlotSummary>), SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "revoke", async move {
            keys::revoke(shared, guest, unlock, index).await
        })
        .await
    }

    /// The source of a live migration: seals the running guest once more
    /// and answers that file with a ticket for `destination` (valid for
    /// `ttl`). The guest goes on here; once this run ends it is
    /// `migrated-out`.
    pub async fn migrate_out(
        &self,
        guest: GuestId,
        destination: crate::vault::HostPublicKey,
        ttl: Duration,
    ) -> Result<MigrationOut, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "migrate out", async move {
            migrate::migrate_out(shared, guest, destination, ttl).await
        })
        .await
    }

    /// The destination of a live migration: takes the guest in from the
    /// source's sealed file and ticket, and runs a swtpm for QEMU's
    /// `-incoming`.
    pub async fn migrate_in(
        &self,
        guest: GuestId,
        ticket: Vec<u8>,
        sealed: Vec<u8>,
    ) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "migrate in", async move {
            migrate::migrate_in(shared, guest, ticket, sealed).await
        })
        .await
    }

    /// Calls a migration off on this host (source or destination).
    pub async fn abort_migration(&self, guest: GuestId) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "abort the migration of", async move {
            migrate::abort(shared, guest).await
        })
        .await
    }

    /// Stops swtpm gracefully, reseals a last time, wipes the plaintext.
    pub async fn stop_guest(&self, guest: GuestId) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "stop", async move {
            stop::stop_guest(shared, guest).await
        })
        .await
    }

    /// The guest's snapshot; never waits for an operation.
    pub fn status(&self, guest: GuestId) -> Result<GuestInfo, SupervisorError> {
        self.shared
            .registry
            .get(guest)
            .map(|g| self.shared.with_replication(g.info()))
            .ok_or(SupervisorError::NoSuchGuest { guest })
    }

    /// Every guest, sorted by id; never waits for an operation.
    /// What vtpmd counts (see `metrics`), rendered now.
    pub fn render_metrics(&self, format: crate::metrics::Format) -> String {
        let mut counts = [0i64; GuestState::ALL.len()];
        for guest in self.shared.registry.all() {
            let state = guest.state();
            if let Some(i) = GuestState::ALL.iter().position(|s| *s == state) {
                counts[i] += 1;
            }
        }
        let snapshot = crate::metrics::Snapshot {
            guests: GuestState::ALL
                .iter()
                .zip(counts)
                .map(|(s, n)| (s.as_str(), n))
                .collect(),
            cluster: self
                .shared
                .cluster
                .as_ref()
                .map(|c| (c.is_up(), i64::try_from(c.pending()).unwrap_or(i64::MAX))),
        };
        self.shared.metrics.render(&snapshot, format)
    }

    /// The counters the API layer moves (calls, connections).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.metrics
    }

    pub fn list(&self) -> Vec<GuestInfo> {
        self.shared
            .registry
            .all()
            .iter()
            .map(|g| self.shared.with_replication(g.info()))
            .collect()
    }

    /// Removes both sealed generations and the guest's directory.
    pub async fn delete(&self, guest: GuestId) -> Result<(), SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "delete", async move {
            manage::delete(shared, guest).await
        })
        .await
    }

    /// Rewraps the guest's keyslot under `new_passphrase`; `passphrase`
    /// must open it. Works stopped and running.
    pub async fn rekey(
        &self,
        guest: GuestId,
        passphrase: SecretBuf,
        new_passphrase: SecretBuf,
    ) -> Result<Vec<String>, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "rekey", async move {
            manage::rekey(shared, guest, passphrase, new_passphrase).await
        })
        .await
    }

    /// The guest's sealed file, current: a running guest is resealed
    /// first. Needs no passphrase; changes nothing on disk but that reseal.
    pub async fn export(&self, guest: GuestId) -> Result<Exported, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "export", async move {
            mobility::export(shared, guest).await
        })
        .await
    }

    /// Registers `sealed` (another host's file of this guest) here,
    /// `stopped`; refuses, writing nothing, a file that does not check out,
    /// is another guest's or not newer than this host's, and a guest that
    /// runs.
    pub async fn import(
        &self,
        guest: GuestId,
        sealed: Vec<u8>,
    ) -> Result<GuestInfo, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(guest, "import", async move {
            mobility::import(shared, guest, sealed).await
        })
        .await
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The latest reseal latencies of a guest (seen write → durable), oldest
    /// first, at most the last 1024. Empty for an unknown guest.
    pub fn reseal_latencies(&self, guest: GuestId) -> Vec<Duration> {
        self.shared
            .registry
            .get(guest)
            .map(|g| g.latencies())
            .unwrap_or_default()
    }

    /// Stops every running guest, each with a final reseal and wipe (host
    /// maintenance: a restart of vtpmd stops none). Returns those stopped.
    pub async fn drain(&self) -> Result<Vec<GuestInfo>, SupervisorError> {
        let shared = Arc::clone(&self.shared);
        detached(GuestId::from_bytes([0; 16]), "drain", async move {
            stop::drain(shared).await
        })
        .await
    }

    /// The daemon's SIGTERM: refuse new operations, wait for those in
    /// flight, reseal every running guest once and leave its swtpm running
    /// for the next vtpmd to adopt.
    pub async fn shutdown(&self) {
        stop::shutdown(Arc::clone(&self.shared)).await;
    }

    /// The store's layout (paths of sealed files, sockets).
    pub fn store(&self) -> &Store {
        &self.shared.store
    }
}
