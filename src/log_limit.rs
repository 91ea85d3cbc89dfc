//! Rate limits for the log lines that other parties can cause: a local
//! user's refused or denied calls, a guest's swtpm writing to stderr.
//! Unlimited, either floods the journal within seconds (journald then
//! drops lines of its own choosing, real events among them). Each source
//! has its own token bucket, so one noisy source never silences another,
//! and what was dropped is counted and said: "suppressed N messages from
//! SOURCE", on the source's next line that goes out, or by [`Limiter::flush`].

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How many lines one source may log: `burst` at once, refilled at
/// `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

impl Default for Rate {
    fn default() -> Self {
        Self {
            burst: 20,
            per_minute: 60,
        }
    }
}

impl Rate {
    fn tokens_per_second(self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }

    /// How long a drained bucket takes to fill again.
    fn refill_time(self) -> Duration {
        if self.per_minute == 0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(f64::from(self.burst) / self.tokens_per_second())
    }
}

/// One source's bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Bucket {
    /// A full bucket: a source's first lines always go out.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            last: now,
            suppressed: 0,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.tokens_per_second()).min(f64::from(rate.burst));
        self.last = now;
    }

    /// Whether a line may go out now. `Some(n)`: yes, and `n` lines were
    /// dropped since the last one that went out (the caller says so);
    /// `None`: drop it (it is counted).
    pub fn take(&mut self, rate: Rate, now: Instant) -> Option<u64> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }

    /// Lines dropped and not reported yet; reporting them is the caller's.
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }

    fn is_full(&self, rate: Rate) -> bool {
        self.tokens >= f64::from(rate.burst)
    }
}

/// Says that `count` lines of `source` were dropped.
pub fn report_suppressed(source: &dyn Display, count: u64) {
    if count > 0 {
        tracing::warn!(
            source = %source,
            suppressed = count,
            "suppressed {count} messages from {source}"
        );
    }
}

/// Buckets for many sources, made on a source's first line.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone + Display> Limiter<K> {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `source` may log a line now; when lines were dropped before
    /// it, says how many first.
    pub fn allow(&self, source: &K) -> bool {
        self.allow_at(source, Instant::now())
    }

    fn allow_at(&self, source: &K, now: Instant) -> bool {
        let taken = {
            let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
            buckets
                .entry(source.clone())
                .or_insert_with(|| Bucket::new(self.rate, now))
                .take(self.rate, now)
        };
        match taken {
            Some(dropped) => {
                report_suppressed(source, dropped);
                true
            }
            None => false,
        }
    }

    /// Says what each source has had dropped since its last line (a source
    /// that went quiet would otherwise never tell), and forgets sources
    /// whose bucket is full again, so the map holds only recent ones.
    /// Call it now and then (every few seconds).
    pub fn flush(&self) {
        self.flush_at(Instant::now());
    }

    fn flush_at(&self, now: Instant) {
        let reports: Vec<(K, u64)> = {
            let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
            let mut reports = Vec::new();
            buckets.retain(|source, bucket| {
                bucket.refill(self.rate, now);
                let dropped = bucket.take_suppressed();
                if dropped > 0 {
                    reports.push((source.clone(), dropped));
                }
                !bucket.is_full(self.rate)
            });
            reports
        };
        for (source, dropped) in reports {
            report_suppressed(&source, dropped);
        }
    }

    /// How often [`flush`](Self::flush) is worth calling: a drained
    /// bucket's refill time, within 1 s to 60 s.
    pub fn flush_every(&self) -> Duration {
        self.rate
            .refill_time()
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        burst: 3,
        per_minute: 60,
    };

    #[test]
    fn a_burst_goes_out_then_one_line_per_refill_with_the_count_dropped() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RATE, t0);
        for _ in 0..3 {
            assert_eq!(b.take(RATE, t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(b.take(RATE, t0), None);
        }
        // One token a second at 60 a minute.
        assert_eq!(b.take(RATE, t0 + Duration::from_millis(500)), None);
        assert_eq!(b.take(RATE, t0 + Duration::from_millis(1001)), Some(1001));
        assert_eq!(b.take(RATE, t0 + Duration::from_millis(1002)), None);
        // Never more than the burst, however long the quiet.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.take(RATE, later).is_some());
        }
        assert_eq!(b.take(RATE, later), None);
        assert_eq!(b.take_suppressed(), 1);
    }

    #[test]
    fn sources_are_limited_apart_and_forgotten_once_full_again() {
        let t0 = Instant::now();
        let limiter = Limiter::<u32>::new(RATE);
        let allowed = |source, now| (0..100).filter(|_| limiter.allow_at(&source, now)).count();
        assert_eq!(allowed(1, t0), 3);
        assert_eq!(allowed(2, t0), 3);
        assert_eq!(limiter.sources(), 2);
        limiter.flush_at(t0 + Duration::from_secs(1));
        assert_eq!(limiter.sources(), 2);
        limiter.flush_at(t0 + Duration::from_secs(10));
        assert_eq!(limiter.sources(), 0);
        assert_eq!(limiter.flush_every(), Duration::from_secs(3));
    }

    #[test]
    fn a_rate_of_zero_per_minute_allows_the_burst_only() {
        let rate = Rate {
            burst: 2,
            per_minute: 0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::new(rate, t0);
        assert!(b.take(rate, t0).is_some());
        assert!(b.take(rate, t0).is_some());
        assert!(b.take(rate, t0 + Duration::from_secs(3600)).is_none());
        assert_eq!(rate.refill_time(), Duration::MAX);
    }
}
