//! Cluster mode: the guests' newest sealed state, their owners and the
//! hosts' liveness in etcd, so that a dead host's guests can be evacuated
//! with their TPM, two hosts never run one TPM, and an old file is never
//! replayed (docs/integration.md, "Cluster mode").
//!
//! Parts, one job each:
//!
//! | file | job |
//! |---|---|
//! | `layout` | the keys, and generations as etcd compares them |
//! | `lease` | this host's lease, kept alive; its loss fences every guest |
//! | `replicate` | each durable reseal written to etcd, coalesced, retried |
//!
//! Every write that matters is one etcd transaction that checks what it
//! relies on: a reseal is written only while this host's lease holds the
//! guest's owner key and only over an older generation; ownership is
//! taken only over what was read (compare on mod revisions), so two hosts
//! racing for a guest cannot both win.

#![forbid(unsafe_code)]

mod error;
mod layout;
mod lease;
mod replicate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::mpsc;

use crate::config::ClusterSection;
use crate::protocol::GuestId;

pub use error::ClusterError;
pub use layout::{check_host_name, check_prefix};
pub use replicate::{Replica, SealedSource};

use layout::{Layout, decode_generation, encode_generation};

/// How often a transaction whose reads went stale is tried again.
const CONTENDED_TRIES: usize = 5;

/// The pause before a call etcd answered "unavailable" is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// gRPC's status codes NOT_FOUND and UNAVAILABLE (the gRPC spec's 5, 14).
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_UNAVAILABLE: i32 = 14;

/// Why running guests must stop here at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// This host's lease expired: it owns nothing any more.
    All { lease: i64 },
    /// etcd says another host owns the guest (or nobody does).
    Guest {
        guest: GuestId,
        owner: Option<String>,
    },
}

/// Where a claimed guest stands in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The generation etcd holds after the claim.
    pub generation: u64,
}

/// This host's membership: the etcd client, its lease, the replicator.
pub struct Cluster {
    client: Client,
    layout: Layout,
    host: String,
    ttl: i64,
    timeout: Duration,
    interval: Duration,
    lease: AtomicI64,
    lease_file: PathBuf,
    /// Whether this host holds a lease and etcd answered its last
    /// keep-alive.
    up: AtomicBool,
    /// etcd refused a put under this host's lease as not found: the
    /// keeper ends the lease at once rather than at its next keep-alive.
    lease_lost: AtomicBool,
    /// Wakes the keeper before its next keep-alive is due: the lease is
    /// in doubt and must be looked at now, not up to a third of its TTL
    /// later.
    check_lease: Arc<tokio::sync::Notify>,
    fences: mpsc::UnboundedSender<Fence>,
    replicas: replicate::Replicas,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("host", &self.host)
            .field("layout", &self.layout)
            .field("lease", &self.lease())
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects, takes up this host's lease again (one a vtpmd before this
    /// one held, if it is still alive: its guests' owner keys are bound to
    /// it) or a new one, and registers this host's name under it. The
    /// receiver gets every fence.
    pub async fn join(
        config: &ClusterSection,
        host: String,
        lease_file: PathBuf,
        source: Arc<dyn SealedSource>,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Fence>), ClusterError> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut options = ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        if let Some(ca) = &config.ca_file {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        let endpoints = config.endpoints.join(",");
        let client =
            tokio::time::timeout(timeout, Client::connect(&config.endpoints, Some(options)))
                .await
                .map_err(|_| ClusterError::Timeout {
                    op: "connect",
                    after: timeout,
                })?
                .map_err(|source| ClusterError::Connect { endpoints, source })?;
        let (fences, fenced) = mpsc::unbounded_channel();
        let cluster = Arc::new(Self {
            client,
            layout: Layout::new(&config.prefix),
            host,
            ttl: i64::try_from(config.lease_ttl_s).unwrap_or(i64::MAX),
            timeout,
            interval: Duration::from_millis(config.replicate_interval_ms),
            lease: AtomicI64::new(0),
            lease_file,
            up: AtomicBool::new(false),
            lease_lost: AtomicBool::new(false),
            check_lease: Arc::new(tokio::sync::Notify::new()),
            fences,
            replicas: replicate::Replicas::new(source),
        });
        // An etcd that does not answer must not keep vtpmd (and the guests
        // it adopts) from running: the keeper joins once etcd answers,
        // and until then nothing is claimed or written. A name another
        // live vtpmd holds is a configuration error: vtpmd stops.
        match cluster.take_lease().await {
            Ok(()) => {}
            Err(e @ ClusterError::HostNameInUse { .. }) => return Err(e),
            Err(e) => tracing::warn!(
                host = %cluster.host,
                "cluster mode: etcd does not answer yet; running guests go on, new Starts wait for it: {}",
                crate::error_chain::chain(&e)
            ),
        }
        lease::spawn_keeper(Arc::clone(&cluster));
        replicate::spawn(Arc::clone(&cluster));
        Ok((cluster, fenced))
    }

    /// This host's name in the cluster.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether etcd answered the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// This host's lease now (0 while it has none).
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    /// The lease, or `NoLease` while there is none: nothing may be claimed
    /// or written without one.
    fn live_lease(&self) -> Result<i64, ClusterError> {
        match self.lease() {
            0 => Err(ClusterError::NoLease),
            lease => Ok(lease),
        }
    }

    /// Takes ownership of `guest` for a Start, Create or Import whose
    /// sealed file here has generation `local` (`bytes` it, written to
    /// etcd in the same transaction when etcd has nothing as new; `None`:
    /// the replicator writes it later). Refused when another host owns
    /// it, or when etcd holds a newer generation (a rollback). A guest new
    /// to the cluster (`new`: a Create) must have no record at all.
    pub async fn claim(
        &self,
        guest: GuestId,
        local: u64,
        bytes: Option<&[u8]>,
        new: bool,
    ) -> Result<Claimed, ClusterError> {
        // What etcd's record says is answered first, lease or not (a host
        // taking a new lease after its old one expired still hears that
        // another host owns the guest now); only the claim needs one.
        let lease = self.lease();
        for _ in 0..CONTENDED_TRIES {
            let seen = self.read_unowned(guest, lease).await?;
            if let Some((newest, _)) = seen.generation {
                if new {
                    return Err(ClusterError::Exists {
                        guest,
                        generation: newest,
                    });
                }
                if newest > local {
                    return Err(ClusterError::Stale {
                        guest,
                        local,
                        newest,
                    });
                }
            }
            let lease = self.live_lease()?;
            let newer = seen.generation.is_none_or(|(newest, _)| local > newest);
            let mut ops = vec![self.put_owner(guest, lease)];
            let mut in_etcd = seen.newest();
            if let (true, Some(bytes)) = (newer, bytes) {
                ops.extend(self.put_state(guest, local, bytes));
                in_etcd = local;
            }
            let txn = Txn::new()
                .when(seen.unchanged(&self.layout, guest))
                .and_then(ops);
            let response = self.txn("claim a guest", txn).await?;
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                self.replicas.claimed(guest, in_etcd, revision);
                if in_etcd < local {
                    self.replicas.resealed(guest);
                }
                return Ok(Claimed {
                    generation: in_etcd,
                });
            }
        }
        Err(ClusterError::Contended { guest })
    }

    /// Takes ownership of `guest` from a host whose lease expired (its
    /// owner key went with it) and returns the newest sealed file etcd
    /// holds, to be imported and started here.
    pub async fn evacuate(&self, guest: GuestId) -> Result<(u64, Vec<u8>), ClusterError> {
        let lease = self.lease();
        for _ in 0..CONTENDED_TRIES {
            let seen = self.read_unowned(guest, lease).await?;
            let Some((generation, _)) = seen.generation else {
                return Err(ClusterError::NoRecord { guest });
            };
            let lease = self.live_lease()?;
            let txn = Txn::new()
                .when(seen.unchanged(&self.layout, guest))
                .and_then(vec![
                    self.put_owner(guest, lease),
                    TxnOp::get(self.layout.sealed(guest), None),
                ]);
            let response = self.txn("evacuate a guest", txn).await?;
            if !response.succeeded() {
                continue;
            }
            let sealed = response.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            let Some(sealed) = sealed else {
                return Err(ClusterError::Corrupt {
                    guest,
                    what: "a generation but no sealed file".to_owned(),
                });
            };
            let revision = response.header().map_or(0, |h| h.revision());
            self.replicas.claimed(guest, generation, revision);
            return Ok((generation, sealed));
        }
        Err(ClusterError::Contended { guest })
    }

    /// MigrateIn: the guest's owner key as it is now (the source's), so
    /// that the destination's first reseal takes ownership from exactly
    /// it, in the same transaction as that write.
    pub async fn expect_handoff(&self, guest: GuestId) -> Result<(), ClusterError> {
        self.live_lease()?;
        let seen = self.read_record(guest).await?;
        self.replicas.hand_off(
            guest,
            seen.newest(),
            seen.owner.map_or(0, |o| o.mod_revision),
        );
        Ok(())
    }

    /// This host forgets `guest` (a migration called off, a destination
    /// letting go): nothing of it is written to etcd from here any more.
    pub fn dropped(&self, guest: GuestId) {
        self.replicas.forget(guest);
    }

    /// The newest generation etcd holds of `guest`, if any.
    pub async fn newest_generation(&self, guest: GuestId) -> Result<Option<u64>, ClusterError> {
        Ok(self.read_record(guest).await?.generation.map(|(g, _)| g))
    }

    /// After a restart, for a guest that does not run here: when this
    /// host still owns it (a vtpmd before this one stopped it but ended
    /// before letting go), its newest reseal goes to etcd and it is let
    /// go. Another host's or nobody's guest is left alone.
    pub async fn settle_stopped(&self, guest: GuestId) -> Result<(), ClusterError> {
        let lease = self.live_lease()?;
        let seen = self.read_record(guest).await?;
        if let Some(owner) = seen.owner.as_ref().filter(|o| o.lease == lease) {
            self.replicas.claimed(
                guest,
                seen.generation.map_or(0, |(g, _)| g),
                owner.mod_revision,
            );
            self.replicas.resealed(guest);
            self.replicas.release(guest);
        }
        Ok(())
    }

    /// Lets go of `guest` once its newest reseal is in etcd: a stopped
    /// guest may then be started or evacuated on another host.
    pub fn release(&self, guest: GuestId) {
        self.replicas.release(guest);
    }

    /// Delete: the guest's whole record goes when this host owns it or
    /// nobody does; a guest another host owns keeps its record (this host
    /// only forgets its own copy).
    pub async fn forget(&self, guest: GuestId) -> Result<(), ClusterError> {
        let lease = self.live_lease()?;
        self.replicas.forget(guest);
        let owner = self.layout.owner(guest);
        let delete = || {
            vec![TxnOp::delete(
                self.layout.guest_prefix(guest),
                Some(DeleteOptions::new().with_prefix()),
            )]
        };
        let mine = Txn::new()
            .when(vec![Compare::lease(owner.clone(), CompareOp::Equal, lease)])
            .and_then(delete());
        if self.txn("delete a guest's record", mine).await?.succeeded() {
            return Ok(());
        }
        let nobodys = Txn::new()
            .when(vec![Compare::create_revision(owner, CompareOp::Equal, 0)])
            .and_then(delete());
        self.txn("delete a guest's record", nobodys).await?;
        Ok(())
    }

    /// A durable reseal of `guest` happened: its sealed file goes to etcd
    /// within the replication window.
    pub fn resealed(&self, guest: GuestId) {
        self.replicas.resealed(guest);
    }

    /// What etcd has of `guest` from this host, for Status.
    pub fn replica(&self, guest: GuestId) -> Option<Replica> {
        self.replicas.get(guest)
    }

    /// How many guests have reseals not in etcd yet.
    pub fn pending(&self) -> usize {
        self.replicas.pending()
    }

    /// The owner key, bound to `lease` (never 0: a key without a lease
    /// would outlive this host).
    fn put_owner(&self, guest: GuestId, lease: i64) -> TxnOp {
        TxnOp::put(
            self.layout.owner(guest),
            self.host.as_bytes(),
            Some(PutOptions::new().with_lease(lease)),
        )
    }

    fn put_state(&self, guest: GuestId, generation: u64, bytes: &[u8]) -> [TxnOp; 3] {
        [
            TxnOp::put(self.layout.sealed(guest), bytes, None),
            TxnOp::put(
                self.layout.generation(guest),
                encode_generation(generation),
                None,
            ),
            TxnOp::put(self.layout.writer(guest), self.host.as_bytes(), None),
        ]
    }

    /// The guest's record, unless another lease than `lease` holds its
    /// owner key (`OwnedElsewhere`): what Claim and Evacuate act on.
    async fn read_unowned(&self, guest: GuestId, lease: i64) -> Result<Record, ClusterError> {
        let seen = self.read_record(guest).await?;
        match &seen.owner {
            Some(owner) if owner.lease != lease => {
                tracing::debug!(guest = %guest, owner = %owner.host, owner_lease = format!("{:x}", owner.lease), lease = format!("{lease:x}"), "owned elsewhere");
                Err(ClusterError::OwnedElsewhere {
                    guest,
                    owner: owner.host.clone(),
                })
            }
            _ => Ok(seen),
        }
    }

    async fn read_record(&self, guest: GuestId) -> Result<Record, ClusterError> {
        let owner = self
            .get("read a guest's owner", self.layout.owner(guest))
            .await?;
        let generation = self
            .get("read a guest's generation", self.layout.generation(guest))
            .await?;
        let generation = match generation {
            None => None,
            Some(kv) => Some((
                decode_generation(kv.value()).ok_or_else(|| ClusterError::Corrupt {
                    guest,
                    what: format!(
                        "generation {:?} is not 20 digits",
                        String::from_utf8_lossy(kv.value())
                    ),
                })?,
                kv.mod_revision(),
            )),
        };
        Ok(Record {
            owner: owner.map(|kv| Owner {
                host: String::from_utf8_lossy(kv.value()).into_owned(),
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
            }),
            generation,
        })
    }

    async fn get(
        &self,
        op: &'static str,
        key: String,
    ) -> Result<Option<etcd_client::KeyValue>, ClusterError> {
        let mut response = self
            .retrying(op, |mut client| {
                let key = key.clone();
                async move { client.get(key, None::<GetOptions>).await }
            })
            .await?;
        Ok(response.take_kvs().into_iter().next())
    }

    async fn txn(
        &self,
        op: &'static str,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, ClusterError> {
        self.retrying(op, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    /// [`call`](Self::call), tried again on another member while etcd
    /// says it is unavailable (a member down: the client's balancer may
    /// still pick it) and the timeout allows. Safe for every call vtpmd
    /// makes: a transaction that was applied but whose answer was lost
    /// fails its compares the second time, and the caller reads again.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut make: F) -> Result<T, ClusterError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            match self.call(op, make(self.client.clone())).await {
                Err(ClusterError::Etcd {
                    source: etcd_client::Error::GRpcStatus(status),
                    ..
                }) if i32::from(status.code()) == GRPC_UNAVAILABLE
                    && std::time::Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                // A put under a lease etcd has expired: this host's lease
                // is gone (the keeper finds out at its next keep-alive and
                // fences); nothing was written.
                Err(ClusterError::Etcd { source, .. }) if is_lease_not_found(&source) => {
                    self.lease_lost.store(true, Ordering::SeqCst);
                    self.doubt_lease();
                    return Err(ClusterError::NoLease);
                }
                other => return other,
            }
        }
    }

    /// One etcd call within the timeout; whether it was answered is
    /// remembered for `is_up`.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        let answered = tokio::time::timeout(self.timeout, call).await;
        let result = match answered {
            Err(_) => Err(ClusterError::Timeout {
                op,
                after: self.timeout,
            }),
            Ok(Err(source)) => Err(ClusterError::Etcd { op, source }),
            Ok(Ok(v)) => Ok(v),
        };
        self.up.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    /// Not in the cluster until the keeper, woken now, has checked the
    /// lease with etcd (and taken a new one if it is gone).
    fn doubt_lease(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.check_lease.notify_one();
    }

    fn fence(&self, fence: Fence) {
        // No receiver: the supervisor is gone, nothing runs to fence.
        let _ = self.fences.send(fence);
    }
}

/// A guest's record as read, to be compared unchanged in the
/// transaction that acts on it.
#[derive(Debug)]
struct Record {
    owner: Option<Owner>,
    /// The generation and its key's mod revision.
    generation: Option<(u64, i64)>,
}

#[derive(Debug)]
struct Owner {
    host: String,
    lease: i64,
    mod_revision: i64,
}

impl Record {
    fn newest(&self) -> u64 {
        self.generation.map_or(0, |(g, _)| g)
    }

    /// Compares that hold while neither key changed since it was read (a
    /// key that was absent compares with mod revision 0).
    fn unchanged(&self, layout: &Layout, guest: GuestId) -> Vec<Compare> {
        vec![
            Compare::mod_revision(
                layout.owner(guest),
                CompareOp::Equal,
                self.owner.as_ref().map_or(0, |o| o.mod_revision),
            ),
            Compare::mod_revision(
                layout.generation(guest),
                CompareOp::Equal,
                self.generation.map_or(0, |(_, rev)| rev),
            ),
        ]
    }
}

/// etcd's answer to a put or keep-alive under a lease it does not have
/// (expired, revoked). A put gets gRPC's NOT_FOUND; a keep-alive stream
/// answers with a TTL of 0, which the client crate turns into its own
/// error with this fixed text (its only sign of it).
fn is_lease_not_found(status: &etcd_client::Error) -> bool {
    match status {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_NOT_FOUND && s.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(m) => m == "lease not found",
        _ => false,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClusterError> {
    std::fs::read(path).map_err(|source| ClusterError::ReadTls {
        path: path.to_owned(),
        source,
    })
}
