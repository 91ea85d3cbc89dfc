//! Every durable reseal also written to etcd, coalesced per guest: at
//! most one write per guest per `replicate_interval_ms`, always of the
//! newest sealed file (what is on disk when the write is made), so a guest
//! writing its TPM in a loop costs etcd one write per window. A write is
//! one transaction: this host's lease holds the owner key, and etcd's
//! generation is below the new one. Running guests never wait for it: a
//! write etcd does not answer is retried (1 s, doubling to 10 s) until it
//! is in, and Status says how far behind the guest is meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use tokio::sync::Notify;

use crate::error_chain::chain;
use crate::protocol::GuestId;

use super::layout::{decode_generation, encode_generation};
use super::{Cluster, Fence};

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Where the replicator reads a guest's newest sealed file and reports
/// what reached etcd (the supervisor).
pub trait SealedSource: Send + Sync + std::fmt::Debug {
    /// The guest's current sealed file and its generation; `None` when it
    /// has none (deleted meanwhile).
    fn read(&self, guest: GuestId) -> Result<Option<(u64, Vec<u8>)>, String>;
    /// `generation` is in etcd, `lag` after the first reseal it holds
    /// that was not.
    fn replicated(&self, guest: GuestId, generation: u64, lag: Duration);
    /// A write of the guest's reseal to etcd failed (`error`), the first
    /// time or with a new error; it is retried.
    fn behind(&self, guest: GuestId, error: &str);
    /// etcd has the guest's newest reseal again after `behind`.
    fn caught_up(&self, guest: GuestId, generation: u64);
}

/// One guest's replication, as Status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The newest generation etcd holds from this host.
    pub generation: u64,
    /// Whether a reseal here is not in etcd yet.
    pub pending: bool,
    /// Why the last write failed, while it is being retried.
    pub error: Option<String>,
}

#[derive(Debug)]
struct Entry {
    replicated: u64,
    dirty: bool,
    release: bool,
    /// The first reseal not in etcd yet.
    since: Option<Instant>,
    last_write: Option<Instant>,
    retry_at: Option<Instant>,
    delay: Duration,
    error: Option<String>,
    /// A live migration's destination before its first write: the owner
    /// key's mod revision when MigrateIn read it (the source's). The first
    /// write takes ownership in the same transaction, if that key is as
    /// it was.
    handoff: Option<i64>,
    /// A write of this guest is under way: no second one starts (the two
    /// could commit out of order).
    in_flight: bool,
    /// The owner key's mod revision as this host last put it (0: not
    /// known): letting go deletes exactly that key, never one a claim
    /// made since.
    owner_revision: i64,
    /// Claims of the guest so far: a let-go that raced a new claim keeps
    /// the entry.
    claims: u64,
}

impl Entry {
    fn new(replicated: u64) -> Self {
        Self {
            replicated,
            dirty: false,
            release: false,
            since: None,
            last_write: None,
            retry_at: None,
            delay: RETRY_FIRST,
            error: None,
            handoff: None,
            in_flight: false,
            owner_revision: 0,
            claims: 0,
        }
    }

    /// When this entry is next due (`now` if it is), given the window.
    fn due_at(&self, interval: Duration, now: Instant) -> Option<Instant> {
        if self.in_flight || (!self.dirty && !self.release) {
            return None;
        }
        let after_window = self.last_write.map(|w| w + interval);
        let at = match (after_window, self.retry_at) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b).unwrap_or(now),
        };
        Some(at.max(now))
    }

    fn failed(&mut self, error: String) {
        self.retry_at = Some(Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(RETRY_MAX);
        self.error = Some(error);
    }
}

/// The guests this host owns and how far etcd has their state.
#[derive(Debug)]
pub(super) struct Replicas {
    source: Arc<dyn SealedSource>,
    entries: Mutex<HashMap<GuestId, Entry>>,
    wake: Notify,
}

impl Replicas {
    pub(super) fn new(source: Arc<dyn SealedSource>) -> Self {
        Self {
            source,
            entries: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GuestId, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This host owns `guest` (its owner key put at `owner_revision`);
    /// etcd holds `generation`.
    pub(super) fn claimed(&self, guest: GuestId, generation: u64, owner_revision: i64) {
        let mut entries = self.lock();
        let entry = entries
            .entry(guest)
            .or_insert_with(|| Entry::new(generation));
        entry.replicated = entry.replicated.max(generation);
        entry.release = false;
        entry.owner_revision = owner_revision;
        entry.claims += 1;
    }

    /// A durable reseal of `guest`. A guest with no entry (adopted while
    /// etcd was unreachable, or after its entry went) gets one: the write
    /// itself checks that this host owns it.
    pub(super) fn resealed(&self, guest: GuestId) {
        let mut entries = self.lock();
        let entry = entries.entry(guest).or_insert_with(|| Entry::new(0));
        entry.dirty = true;
        entry.since.get_or_insert_with(Instant::now);
        drop(entries);
        self.wake.notify_one();
    }

    /// A migration's destination: ownership moves with its first write.
    pub(super) fn hand_off(&self, guest: GuestId, generation: u64, owner_mod_revision: i64) {
        let mut entry = Entry::new(generation);
        entry.handoff = Some(owner_mod_revision);
        self.lock().insert(guest, entry);
    }

    pub(super) fn release(&self, guest: GuestId) {
        if let Some(entry) = self.lock().get_mut(&guest) {
            entry.release = true;
        }
        self.wake.notify_one();
    }

    pub(super) fn forget(&self, guest: GuestId) {
        self.lock().remove(&guest);
    }

    /// Marks a write of `guest` under way; false when one is already (or
    /// the guest went meanwhile).
    fn begin(&self, guest: GuestId) -> bool {
        match self.lock().get_mut(&guest) {
            Some(entry) if !entry.in_flight => {
                entry.in_flight = true;
                true
            }
            _ => false,
        }
    }

    /// The write of `guest` ended; the replicator looks again.
    fn end(&self, guest: GuestId) {
        if let Some(entry) = self.lock().get_mut(&guest) {
            entry.in_flight = false;
        }
        self.wake.notify_one();
    }

    /// Every guest this host owns goes (the lease that held them expired).
    pub(super) fn forget_all(&self) {
        self.lock().clear();
    }

    pub(super) fn get(&self, guest: GuestId) -> Option<Replica> {
        self.lock().get(&guest).map(|e| Replica {
            generation: e.replicated,
            pending: e.dirty,
            error: e.error.clone(),
        })
    }

    pub(super) fn pending(&self) -> usize {
        self.lock().values().filter(|e| e.dirty).count()
    }

    /// The guests due now, and when the next one is.
    fn due(&self, interval: Duration) -> (Vec<GuestId>, Option<Instant>) {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (guest, entry) in self.lock().iter() {
            match entry.due_at(interval, now) {
                Some(at) if at <= now => due.push(*guest),
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
        }
        (due, next)
    }
}

/// How many guests' writes to etcd are under way at once: one guest's
/// round trip must not hold up the others (with hundreds of guests
/// writing, one at a time falls behind its window).
const WRITERS: usize = 32;

/// The replicator, for as long as the process lives (the cluster is
/// never dropped before it ends).
pub(super) fn spawn(cluster: Arc<Cluster>) {
    tokio::spawn(async move {
        let writers = Arc::new(tokio::sync::Semaphore::new(WRITERS));
        loop {
            // Armed before the look: a reseal (or a write ending) after it
            // wakes the wait.
            let wake = cluster.replicas.wake.notified();
            let (due, next) = cluster.replicas.due(cluster.interval);
            if due.is_empty() {
                let sleep = next.map_or(Duration::from_secs(3600), |n| {
                    n.saturating_duration_since(Instant::now())
                });
                tokio::select! {
                    () = wake => {}
                    () = tokio::time::sleep(sleep) => {}
                }
                continue;
            }
            for guest in due {
                let Ok(permit) = Arc::clone(&writers).acquire_owned().await else {
                    return;
                };
                if !cluster.replicas.begin(guest) {
                    continue;
                }
                let cluster = Arc::clone(&cluster);
                tokio::spawn(async move {
                    cluster.replicate(guest).await;
                    cluster.replicas.end(guest);
                    drop(permit);
                });
            }
        }
    });
}

/// What one write found.
enum Outcome {
    Written {
        generation: u64,
    },
    /// Nothing newer than etcd's to write.
    Current,
    /// Another host owns the guest now (or nobody does).
    NotOwner {
        owner: Option<String>,
    },
}

impl Cluster {
    async fn replicate(&self, guest: GuestId) {
        let (dirty, release) = {
            let mut entries = self.replicas.lock();
            let Some(entry) = entries.get_mut(&guest) else {
                return;
            };
            let dirty = std::mem::take(&mut entry.dirty);
            (dirty, entry.release)
        };
        if dirty {
            match self.write_newest(guest).await {
                Ok(outcome) => self.written(guest, outcome),
                Err(error) => {
                    let news = {
                        let mut entries = self.replicas.lock();
                        let Some(entry) = entries.get_mut(&guest) else {
                            return;
                        };
                        entry.dirty = true;
                        let news = entry.error.as_deref() != Some(&error);
                        entry.failed(error.clone());
                        news
                    };
                    if news {
                        tracing::warn!(guest = %guest, "cannot write the newest reseal to etcd yet (retried): {error}");
                        self.replicas.source.behind(guest, &error);
                    }
                    return;
                }
            }
        }
        // A claim since the start of this write (a Start right after a
        // Stop) has called the release off.
        let still = self
            .replicas
            .lock()
            .get(&guest)
            .map(|e| (e.dirty, e.release));
        if release && still == Some((false, true)) {
            self.let_go(guest).await;
        }
    }

    fn written(&self, guest: GuestId, outcome: Outcome) {
        let generation = match outcome {
            Outcome::Written { generation } => Some(generation),
            Outcome::Current => None,
            Outcome::NotOwner { owner } => {
                self.replicas.forget(guest);
                tracing::error!(guest = %guest, owner = owner.as_deref().unwrap_or("nobody"), "etcd refused this host's reseal: the guest is not this host's any more; fencing it");
                self.fence(Fence::Guest { guest, owner });
                // Another host could take the guest only once this host's
                // lease was gone (or its owner key deleted with it).
                self.doubt_lease();
                return;
            }
        };
        let (lag, recovered) = {
            let mut entries = self.replicas.lock();
            let Some(entry) = entries.get_mut(&guest) else {
                return;
            };
            if let Some(g) = generation {
                entry.replicated = entry.replicated.max(g);
            }
            entry.last_write = Some(Instant::now());
            entry.retry_at = None;
            entry.delay = RETRY_FIRST;
            let recovered = entry.error.take().is_some().then_some(entry.replicated);
            let lag = entry.since.map(|s| s.elapsed());
            if !entry.dirty {
                entry.since = None;
            }
            (lag, recovered)
        };
        if let Some(generation) = recovered {
            tracing::info!(guest = %guest, generation, "etcd has this guest's newest reseal again");
            self.replicas.source.caught_up(guest, generation);
        }
        if let Some(g) = generation {
            self.replicas
                .source
                .replicated(guest, g, lag.unwrap_or_default());
        }
    }

    /// Writes the guest's current sealed file unless etcd has it already.
    async fn write_newest(&self, guest: GuestId) -> Result<Outcome, String> {
        let source = Arc::clone(&self.replicas.source);
        let read = tokio::task::spawn_blocking(move || source.read(guest))
            .await
            .map_err(|e| format!("the read task failed: {e}"))??;
        let Some((generation, bytes)) = read else {
            return Ok(Outcome::Current);
        };
        let lease = self.live_lease().map_err(|e| chain(&e))?;
        let (known, handoff, claimed) = self
            .replicas
            .lock()
            .get(&guest)
            .map_or((0, None, false), |e| {
                (e.replicated, e.handoff, e.claims > 0)
            });
        if generation <= known {
            return Ok(Outcome::Current);
        }
        let owner = self.layout.owner(guest);
        let gen_key = self.layout.generation(guest);
        let newer = Compare::value(
            gen_key.clone(),
            CompareOp::Less,
            encode_generation(generation),
        );
        let mut ops = self.put_state(guest, generation, &bytes).to_vec();
        let owned = match handoff {
            None => Compare::lease(owner.clone(), CompareOp::Equal, lease),
            Some(revision) => {
                ops.push(self.put_owner(guest, lease));
                Compare::mod_revision(owner.clone(), CompareOp::Equal, revision)
            }
        };
        let txn = Txn::new()
            .when(vec![owned, newer])
            .and_then(ops)
            .or_else(vec![TxnOp::get(owner, None), TxnOp::get(gen_key, None)]);
        let response = self
            .txn("write a reseal", txn)
            .await
            .map_err(|e| chain(&e))?;
        if response.succeeded() {
            if handoff.is_some() {
                let revision = response.header().map_or(0, |h| h.revision());
                if let Some(entry) = self.replicas.lock().get_mut(&guest) {
                    entry.handoff = None;
                    entry.owner_revision = revision;
                }
                tracing::info!(guest = %guest, generation, "a migrated guest is this host's in etcd now (taken over with its first reseal here)");
            }
            return Ok(Outcome::Written { generation });
        }
        let mut gets = response.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get.kvs().first().cloned()),
            _ => None,
        });
        let owner_kv = gets.next().flatten();
        let stored = gets
            .next()
            .flatten()
            .and_then(|kv| decode_generation(kv.value()));
        match owner_kv {
            Some(kv) if kv.lease() == lease => match stored {
                // In etcd already (a claim carried it, or a vtpmd before
                // this one wrote it): this host's record catches up.
                Some(s) if s == generation => Ok(Outcome::Written { generation }),
                Some(s) if s > generation => Ok(Outcome::NotOwner {
                    owner: Some(format!(
                        "{} (etcd holds generation {s}, above this host's {generation})",
                        self.host
                    )),
                }),
                _ => Err(format!(
                    "etcd's generation record of guest {guest} is missing or damaged"
                )),
            },
            // A guest adopted while etcd did not answer and never claimed
            // by this vtpmd, whose owner key lapsed with the previous lease
            // meanwhile: the claim start-up could not make, made now, with
            // its checks (another owner, or a newer generation in etcd,
            // is a refusal and fences).
            None if !claimed && handoff.is_none() => {
                match self.claim(guest, generation, Some(&bytes), false).await {
                    Ok(_) => {
                        tracing::info!(guest = %guest, generation, "claimed the adopted guest nobody owned in etcd any more");
                        Ok(Outcome::Written { generation })
                    }
                    Err(super::ClusterError::OwnedElsewhere { owner, .. }) => {
                        Ok(Outcome::NotOwner { owner: Some(owner) })
                    }
                    Err(super::ClusterError::Stale { newest, .. }) => Ok(Outcome::NotOwner {
                        owner: Some(format!(
                            "nobody (etcd holds generation {newest}, above this host's {generation})"
                        )),
                    }),
                    Err(e) => Err(chain(&e)),
                }
            }
            other => Ok(Outcome::NotOwner {
                owner: other.map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            }),
        }
    }

    /// Deletes the owner key (still this host's lease's) once the guest's
    /// last reseal is in etcd.
    async fn let_go(&self, guest: GuestId) {
        let lease = match self.live_lease() {
            Ok(lease) => lease,
            Err(e) => {
                if let Some(entry) = self.replicas.lock().get_mut(&guest) {
                    entry.failed(chain(&e));
                }
                return;
            }
        };
        let Some((owner_revision, claims)) = self
            .replicas
            .lock()
            .get(&guest)
            .map(|e| (e.owner_revision, e.claims))
        else {
            return;
        };
        let owner = self.layout.owner(guest);
        let mut compares = vec![Compare::lease(owner.clone(), CompareOp::Equal, lease)];
        if owner_revision > 0 {
            compares.push(Compare::mod_revision(
                owner.clone(),
                CompareOp::Equal,
                owner_revision,
            ));
        }
        let txn = Txn::new()
            .when(compares)
            .and_then(vec![TxnOp::delete(owner, None)]);
        match self.txn("release a guest", txn).await {
            Ok(_) => {
                let mut entries = self.replicas.lock();
                if entries.get(&guest).is_some_and(|e| e.claims == claims) {
                    entries.remove(&guest);
                    tracing::debug!(guest = %guest, "released in etcd: another host may start it");
                }
            }
            Err(e) => {
                let mut entries = self.replicas.lock();
                if let Some(entry) = entries.get_mut(&guest) {
                    entry.failed(chain(&e));
                }
            }
        }
    }
}
