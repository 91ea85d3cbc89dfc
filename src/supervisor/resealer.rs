//! While a guest runs: every state write of swtpm becomes a durable sealed
//! generation, and a reseal that fails is reported and retried until one
//! succeeds.
//!
//! swtpm writes `TMP2-00.permall` (or `TMP-00.*`), closes it and renames it
//! over the real file; it never fsyncs. A one-shot inotify watch on the
//! runtime dir for `IN_CLOSE_WRITE | IN_MOVED_TO` wakes the resealer at the
//! first write; the watch is then gone, so the writes that follow within
//! `reseal_coalesce` cost neither swtpm an event nor vtpmd a wake-up (a
//! guest writing its TPM in a loop would otherwise wake vtpmd twice per
//! write). After the window the watch is set again and only then is the
//! directory read: a write before that point is in this reseal, a write
//! after it raises the next one. The seal runs on a blocking thread.
//!
//! A failed reseal (state file system full or read-only, an I/O error)
//! leaves writes that exist only in the plaintext runtime directory. The
//! guest keeps running (its TPM works; only durability is behind), but the
//! failure is put in the guest's `reason`, published as a `reseal-failed`
//! event and logged, and the reseal is retried with back-off even if the
//! guest writes nothing more, so the writes become durable as soon as space
//! returns. The retries are logged only when the error changes.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::error_chain::chain;

use super::guest::{Guest, Sealer};
use super::reseal::reseal_now;
use super::watcher::Watch;
use super::{EventKind, Shared};

/// The first retry after a failure, doubled after each failure up to
/// `RETRY_MAX`: quick enough for a transient error, and at worst one
/// attempt (an archive of a few KiB and a failed write) per half minute.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Starts the resealer of one run. It ends when aborted (the run ends) or
/// when the watch fails (logged).
pub(super) fn spawn(
    shared: Arc<Shared>,
    guest: Arc<Guest>,
    sealer: Sealer,
    dir: PathBuf,
    watch: Watch,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let coalesce = shared.config.reseal_coalesce;
        let mut behind: Option<Behind> = None;
        loop {
            // Up to date: wait for a write. Behind: for a write or the
            // next retry, whichever comes first.
            let wrote = match &behind {
                None => {
                    watch.written().await;
                    true
                }
                Some(b) => tokio::select! {
                    () = watch.written() => true,
                    () = tokio::time::sleep_until(b.next_attempt.into()) => false,
                },
            };
            let seen = Instant::now();
            if wrote {
                if let Err(e) = gather(&watch, seen + coalesce).await {
                    tracing::error!(guest = %guest.id, "cannot watch {} again: {e}; no more reseals until the guest stops", dir.display());
                    return;
                }
            }
            let (sealer, dir2) = (Arc::clone(&sealer), dir.clone());
            let sealed = tokio::task::spawn_blocking(move || reseal_now(&sealer, &dir2))
                .await
                .map_err(|e| format!("the reseal task failed: {e}"))
                .and_then(|r| r.map_err(|e| chain(&e)));
            match sealed {
                // A write that left the state as it was (nothing to seal).
                Ok((_, None)) if behind.is_none() => {}
                Ok((generation, written)) => {
                    if let Some(bytes) = written {
                        shared.metrics.reseal_bytes(bytes);
                        super::cluster::resealed(&shared, guest.id);
                    }
                    let written = written.is_some();
                    // Latency from the first unsealed write when behind.
                    let since = behind.as_ref().map_or(seen, |b| b.since);
                    let latency = since.elapsed();
                    guest.record_latency(latency);
                    let recovered = behind.take().map(|b| b.recovered());
                    let info = guest.update(|i| {
                        i.generation = i.generation.max(generation);
                        if recovered.is_some() {
                            i.reason = None;
                        }
                    });
                    if let Some(recovered) = &recovered {
                        tracing::info!(guest = %guest.id, generation, "{recovered}");
                    }
                    tracing::debug!(guest = %guest.id, generation, written, latency_us = latency.as_micros(), "resealed");
                    shared.publish(EventKind::Resealed { latency }, info, recovered);
                }
                Err(error) => {
                    let b = behind.get_or_insert_with(|| Behind::new(seen));
                    let changed = b.failed(&error);
                    let reason = b.reason(guest.info().generation);
                    if changed {
                        tracing::error!(guest = %guest.id, attempts = b.attempts, "{reason}");
                        let info = guest.update(|i| i.reason = Some(reason.clone()));
                        shared.publish(EventKind::ResealFailed, info, Some(reason));
                    } else {
                        guest.update(|i| i.reason = Some(reason));
                        tracing::debug!(guest = %guest.id, attempts = b.attempts, "reseal failed again: {error}");
                    }
                }
            }
        }
    })
}

/// Sleeps until `until` (the one-shot watch is off: writes meanwhile raise
/// nothing), then sets the watch again. The reseal that follows reads the
/// directory after this, so it covers every write up to here.
async fn gather(watch: &Watch, until: Instant) -> io::Result<()> {
    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
    watch.rearm()
}

/// Writes that are not sealed yet, and the retries that try to.
#[derive(Debug)]
struct Behind {
    /// When the first write that is not sealed was seen.
    since: Instant,
    attempts: u32,
    last_error: String,
    delay: Duration,
    next_attempt: Instant,
}

impl Behind {
    fn new(since: Instant) -> Self {
        Behind {
            since,
            attempts: 0,
            last_error: String::new(),
            delay: RETRY_FIRST,
            next_attempt: since,
        }
    }

    /// Counts a failed attempt and schedules the next; whether the error
    /// differs from the one before (worth reporting again).
    fn failed(&mut self, error: &str) -> bool {
        self.attempts += 1;
        self.next_attempt = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(RETRY_MAX);
        let changed = self.last_error != error;
        if changed {
            error.clone_into(&mut self.last_error);
        }
        changed
    }

    /// The guest's `reason` while behind.
    fn reason(&self, generation: u64) -> String {
        format!(
            "reseal failed ({}): writes since generation {generation} are not sealed yet, only in the runtime directory; {} attempt{} over {} s, retrying in {} s",
            self.last_error,
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            self.since.elapsed().as_secs(),
            self.next_attempt
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1),
        )
    }

    /// What the reseal that succeeded after failures says.
    fn recovered(self) -> String {
        format!(
            "sealed again after {} failed attempt{} over {} s (last error: {})",
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            self.since.elapsed().as_secs(),
            self.last_error
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_delay_doubles_up_to_its_cap_and_only_a_new_error_is_news() {
        let mut b = Behind::new(Instant::now());
        assert!(b.failed("No space left on device"));
        assert!(!b.failed("No space left on device"));
        assert_eq!(b.delay, RETRY_FIRST * 4);
        for _ in 0..10 {
            b.failed("No space left on device");
        }
        assert_eq!(b.delay, RETRY_MAX);
        assert!(b.failed("Read-only file system"));
        let reason = b.reason(7);
        assert!(
            reason.contains("Read-only file system")
                && reason.contains("since generation 7")
                && reason.contains("13 attempts"),
            "{reason}"
        );
        assert!(b.recovered().contains("13 failed attempts"));
    }
}
