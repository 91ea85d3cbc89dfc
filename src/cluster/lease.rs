//! This host's lease: taken up again after a restart when it is still
//! alive (the guests' owner keys are bound to it), kept alive every third
//! of its TTL, and, once etcd says it expired, the end of every guest
//! running here (fenced) and a new lease for what comes next.
//!
//! An unreachable etcd is not an expired lease: running guests go on
//! (etcd cannot expire a lease without a quorum either, and a new leader
//! extends every lease). The lease's end is learned from etcd itself, at
//! the first keep-alive it answers, or from a reseal it refuses because
//! another host owns the guest now.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use super::{Cluster, ClusterError, Fence};

impl Cluster {
    /// A lease (the previous vtpmd's if it lives) and this host's name
    /// registered under it.
    pub(super) async fn take_lease(&self) -> Result<(), ClusterError> {
        let previous = read_lease_file(&self.lease_file);
        let lease = self.resume_or_grant_lease(previous).await?;
        if let Err(e) = self.register_host(lease, previous).await {
            self.lease.store(0, Ordering::SeqCst);
            return Err(e);
        }
        self.up.store(true, Ordering::SeqCst);
        tracing::info!(host = %self.host, lease = format!("{lease:x}"), ttl_s = self.ttl, "cluster mode: joined etcd");
        Ok(())
    }

    /// The lease a vtpmd before this one left in the lease file
    /// (`previous`), if etcd still keeps it alive; else a new one (written
    /// to the file).
    async fn resume_or_grant_lease(&self, previous: Option<i64>) -> Result<i64, ClusterError> {
        if let Some(old) = previous {
            let alive = self
                .retrying("look up the previous lease", |mut client| async move {
                    client.lease_time_to_live(old, None).await
                })
                .await?;
            if alive.ttl() > 0 {
                tracing::debug!(
                    lease = format!("{old:x}"),
                    ttl_s = alive.ttl(),
                    "took up the previous vtpmd's lease"
                );
                self.lease.store(old, Ordering::SeqCst);
                return Ok(old);
            }
        }
        self.grant_lease().await
    }

    async fn grant_lease(&self) -> Result<i64, ClusterError> {
        let ttl = self.ttl;
        let granted = self
            .retrying("grant a lease", |mut client| async move {
                client.lease_grant(ttl, None).await
            })
            .await?;
        let lease = granted.id();
        write_lease_file(&self.lease_file, lease);
        self.lease.store(lease, Ordering::SeqCst);
        Ok(lease)
    }

    /// `<prefix>/hosts/<host>` under `lease`, unless another live lease
    /// holds the name (two vtpmds configured with one host name).
    ///
    /// `previous` is the lease this host held before (the lease file's, or
    /// the one that just expired): a name still under it is this host's
    /// own. etcd answers a lease's time to live as expired a moment before
    /// its revocation has deleted the lease's keys, and a vtpmd restarted
    /// in that moment was refused its own name (`HostNameInUse`) and
    /// stopped.
    async fn register_host(&self, lease: i64, previous: Option<i64>) -> Result<(), ClusterError> {
        let key = self.layout.host(&self.host);
        let put = || {
            vec![TxnOp::put(
                key.clone(),
                self.host.as_bytes(),
                Some(PutOptions::new().with_lease(lease)),
            )]
        };
        let free = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(put());
        if self.txn("register this host", free).await?.succeeded() {
            return Ok(());
        }
        for held in std::iter::once(lease).chain(previous.filter(|p| *p != lease)) {
            let ours = Txn::new()
                .when(vec![Compare::lease(key.clone(), CompareOp::Equal, held)])
                .and_then(put());
            if self.txn("register this host", ours).await?.succeeded() {
                return Ok(());
            }
        }
        let holder = self
            .get("read the host's registration", key)
            .await?
            .map_or(0, |kv| kv.lease());
        Err(ClusterError::HostNameInUse {
            host: self.host.clone(),
            lease: holder,
        })
    }

    /// Called when etcd said the lease is gone: every guest is fenced,
    /// then a new lease and registration are taken (retried until etcd
    /// gives them).
    async fn lease_expired(&self, lease: i64) {
        tracing::error!(host = %self.host, lease = format!("{lease:x}"), "this host's etcd lease expired: every guest running here is fenced (another host may own it now)");
        self.lease.store(0, Ordering::SeqCst);
        self.up.store(false, Ordering::SeqCst);
        // Their owner keys went with the lease: nothing of theirs may be
        // written from here.
        self.replicas.forget_all();
        self.fence(Fence::All { lease });
        let mut pause = Duration::from_millis(200);
        loop {
            match self.grant_lease().await {
                Ok(new) => match self.register_host(new, Some(lease)).await {
                    Ok(()) => {
                        self.up.store(true, Ordering::SeqCst);
                        tracing::info!(
                            lease = format!("{new:x}"),
                            "a new etcd lease for this host"
                        );
                        return;
                    }
                    Err(e) => tracing::warn!(
                        "cannot register this host again: {}",
                        crate::error_chain::chain(&e)
                    ),
                },
                Err(e) => tracing::debug!(
                    "cannot get a new lease yet: {}",
                    crate::error_chain::chain(&e)
                ),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

/// Keeps the lease alive every third of its TTL for as long as the
/// cluster lives. One attempt (open the stream, send, read the answer)
/// may take at most a third of the TTL, and a failed one is tried again
/// after `RETRY_KEEP_ALIVE`: a slow etcd (an election after members came
/// back) must not make the lease lapse between two attempts.
pub(super) fn spawn_keeper(cluster: Arc<Cluster>) {
    let every = Duration::from_millis(u64::try_from(cluster.ttl).unwrap_or(1) * 1000 / 3);
    tokio::spawn(async move {
        let weak = Arc::downgrade(&cluster);
        let check_now = Arc::clone(&cluster.check_lease);
        drop(cluster);
        let mut pause = every;
        loop {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = check_now.notified() => {}
            }
            let Some(cluster) = weak.upgrade() else {
                return;
            };
            pause = every;
            let lease = cluster.lease();
            if lease == 0 {
                // Not joined yet (etcd did not answer at start-up).
                if let Err(e) = cluster.take_lease().await {
                    tracing::debug!("cannot join etcd yet: {}", crate::error_chain::chain(&e));
                }
                continue;
            }
            if cluster.lease_lost.swap(false, Ordering::SeqCst) {
                cluster.lease_expired(lease).await;
                continue;
            }
            let attempt = tokio::time::timeout(every, keep_alive_once(&cluster, lease)).await;
            match attempt {
                Ok(Ok(Some(ttl))) if ttl > 0 => cluster.up.store(true, Ordering::SeqCst),
                Ok(Ok(Some(_))) => cluster.lease_expired(lease).await,
                Ok(Err(ClusterError::Etcd { source, .. }))
                    if super::is_lease_not_found(&source) =>
                {
                    cluster.lease_expired(lease).await;
                }
                failed => {
                    cluster.up.store(false, Ordering::SeqCst);
                    pause = RETRY_KEEP_ALIVE.min(every);
                    match failed {
                        Ok(Err(e)) => tracing::debug!(
                            "lease keep-alive failed (etcd unreachable?): {}",
                            crate::error_chain::chain(&e)
                        ),
                        _ => tracing::debug!("lease keep-alive unanswered"),
                    }
                }
            }
        }
    });
}

/// The pause before a keep-alive that failed is tried again.
const RETRY_KEEP_ALIVE: Duration = Duration::from_millis(200);

/// One keep-alive; the TTL etcd answers (0 or less: the lease is gone;
/// `None`: the stream closed without an answer).
async fn keep_alive_once(cluster: &Cluster, lease: i64) -> Result<Option<i64>, ClusterError> {
    let mut client = cluster.client.clone();
    let (mut keeper, mut stream) = cluster
        .call("open a lease keep-alive", client.lease_keep_alive(lease))
        .await?;
    cluster
        .call("send a lease keep-alive", keeper.keep_alive())
        .await?;
    let answer = cluster
        .call("read a lease keep-alive", stream.message())
        .await?;
    Ok(answer.map(|a| a.ttl()))
}

fn read_lease_file(path: &std::path::Path) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    i64::from_str_radix(text.trim(), 16).ok().filter(|l| *l > 0)
}

/// Best effort: without it a restarted vtpmd takes a new lease, and its
/// running guests' owner keys (bound to the old one) lapse with the old.
fn write_lease_file(path: &std::path::Path, lease: i64) {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, format!("{lease:x}\n"))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), "cannot record this host's etcd lease: {e}");
    }
}
