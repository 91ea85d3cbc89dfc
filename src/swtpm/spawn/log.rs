//! The log pipe reader: swtpm's log and stderr into `tracing`, plus a tail,
//! and the one line that says swtpm lost a write.
//!
//! What swtpm says, the guest can drive (hundreds of thousands of lines in
//! seconds), so only a rate-limited share reaches `tracing`, with the count
//! of what was dropped; the tail and the store-failure check see every
//! line.
//!
//! swtpm 0.7.1 says nothing else when it cannot store its state (a full or
//! failing runtime file system): libtpms enters failure mode, every
//! command from then on answers TPM_RC_FAILURE, and swtpm exits cleanly
//! when its VMM quits. This line is the only sign that a write was lost.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::log_limit::{Bucket, Rate, report_suppressed};
use crate::protocol::GuestId;

/// Lines kept for error reports.
pub(super) const TAIL_LINES: usize = 50;
/// Longer lines are cut (a line without a newline cannot grow memory).
const MAX_LINE: u64 = 4096;
/// How swtpm's NVRAM layer begins the line of a write it could not make
/// (`SWTPM_NVRAM_StoreData: Error (fatal), data write of 1468 only wrote
/// 4294967295`, measured on a full tmpfs).
const STORE_FAILED: &str = "SWTPM_NVRAM_StoreData: Error";

/// Called once, from the reader thread, with the line that says swtpm
/// could not store its state.
pub type StoreFailureHook = Box<dyn FnOnce(String) + Send>;

#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    eof: bool,
    store_failure: Option<String>,
    hook: Option<StoreFailureHook>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("lines", &self.lines.len())
            .field("eof", &self.eof)
            .field("store_failure", &self.store_failure)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Shared {
    tail: Mutex<Tail>,
    eof: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tail> {
        // A panic in the reader cannot leave the deque inconsistent.
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One reader thread per child; it ends at EOF, i.e. when swtpm (the only
/// holder of the write end once `spawn` returns) has exited.
#[derive(Debug)]
pub(super) struct LogReader {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LogReader {
    /// `rate`: how many lines go to the log (all go to the tail).
    pub(super) fn start(guest: GuestId, pipe: OwnedFd, rate: Rate) -> std::io::Result<LogReader> {
        let shared = Arc::new(Shared::default());
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("swtpm-log-{guest}"))
            .spawn(move || read_lines(guest, File::from(pipe), rate, &for_thread))?;
        Ok(LogReader {
            shared,
            thread: Some(thread),
        })
    }

    pub(super) fn tail(&self) -> Vec<String> {
        self.shared.lock().lines.iter().cloned().collect()
    }

    /// swtpm's line saying it could not store its state, if it said so.
    pub(super) fn store_failure(&self) -> Option<String> {
        self.shared.lock().store_failure.clone()
    }

    /// Calls `hook` when swtpm says it could not store its state (at once
    /// if it has said so already).
    pub(super) fn on_store_failure(&self, hook: StoreFailureHook) {
        let mut tail = self.shared.lock();
        match tail.store_failure.clone() {
            Some(line) => {
                drop(tail);
                hook(line);
            }
            None => tail.hook = Some(hook),
        }
    }

    /// Waits (on a condition variable, no polling) until the pipe reached
    /// EOF, at most `timeout`; joins the thread if it did.
    pub(super) fn wait_eof(&mut self, timeout: Duration) -> bool {
        let eof = {
            let guard = self.shared.lock();
            let (guard, _) = self
                .shared
                .eof
                .wait_timeout_while(guard, timeout, |t| !t.eof)
                .unwrap_or_else(PoisonError::into_inner);
            guard.eof
        };
        if eof {
            if let Some(thread) = self.thread.take() {
                // It has set `eof` and returns right after: a short join.
                let _ = thread.join();
            }
        }
        eof
    }
}

/// One guest's swtpm as a source of log lines.
struct SwtpmSource(GuestId);

impl std::fmt::Display for SwtpmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "swtpm of guest {}", self.0)
    }
}

fn read_lines(guest: GuestId, pipe: File, rate: Rate, shared: &Shared) {
    let source = SwtpmSource(guest);
    let mut bucket = Bucket::new(rate, Instant::now());
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(guest = %guest, "cannot read swtpm's log pipe: {e}");
                break;
            }
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        // Only this thread sets it: the answer holds until the tail is
        // updated below (not locked meanwhile, so that writing to the log
        // never holds up a reader of the tail).
        let store_failed = line.contains(STORE_FAILED) && shared.lock().store_failure.is_none();
        let error = line.to_ascii_lowercase().contains("error");
        let enabled = if error {
            tracing::enabled!(tracing::Level::WARN)
        } else {
            tracing::enabled!(tracing::Level::INFO)
        };
        // A lost write is always told, however noisy swtpm was before it;
        // a filtered-out level uses up nothing.
        let logged = if store_failed {
            report_suppressed(&source, bucket.take_suppressed());
            true
        } else if enabled {
            match bucket.take(rate, Instant::now()) {
                Some(dropped) => {
                    report_suppressed(&source, dropped);
                    true
                }
                None => false,
            }
        } else {
            false
        };
        if logged {
            if error {
                tracing::warn!(guest = %guest, "swtpm: {line}");
            } else {
                tracing::info!(guest = %guest, "swtpm: {line}");
            }
        }
        let mut tail = shared.lock();
        if tail.lines.len() == TAIL_LINES {
            tail.lines.pop_front();
        }
        tail.lines.push_back(line.to_owned());
        if store_failed {
            tail.store_failure = Some(line.to_owned());
            if let Some(hook) = tail.hook.take() {
                drop(tail);
                hook(line.to_owned());
            }
        }
    }
    report_suppressed(&source, bucket.take_suppressed());
    shared.lock().eof = true;
    shared.eof.notify_all();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_keeps_last_lines_and_eof_is_seen() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let guest = GuestId::parse("6f1c2e7a-1b2c-4d3e-8f90-0123456789ab").unwrap();
        let mut reader = LogReader::start(guest, r, Rate::default()).unwrap();
        let mut w = File::from(w);
        for i in 0..(TAIL_LINES + 10) {
            writeln!(w, "line {i}").unwrap();
        }
        write!(w, "no newline at end").unwrap();
        drop(w);
        assert!(reader.wait_eof(Duration::from_secs(5)));
        let tail = reader.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 11");
        assert_eq!(tail[TAIL_LINES - 1], "no newline at end");
    }

    #[test]
    fn the_line_of_a_lost_write_is_kept_and_reported_once() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let guest = GuestId::parse("6f1c2e7a-1b2c-4d3e-8f90-0123456789ab").unwrap();
        let reader = LogReader::start(guest, r, Rate::default()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        reader.on_store_failure(Box::new(move |line| tx.send(line).unwrap()));
        let mut w = File::from(w);
        writeln!(w, "a harmless line").unwrap();
        for _ in 0..2 {
            writeln!(
                w,
                "SWTPM_NVRAM_StoreData: Error (fatal), data write of 1468 only wrote 4294967295"
            )
            .unwrap();
        }
        drop(w);
        let line = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(line.starts_with(STORE_FAILED), "{line}");
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(reader.store_failure(), Some(line));
    }

    /// Everything logged by any thread of this test binary from now on.
    fn capture_log() -> Arc<Mutex<Vec<u8>>> {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(Arc::clone(&buf));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("only this test sets the global subscriber");
        buf
    }

    #[test]
    fn a_flood_beyond_the_log_rate_keeps_the_tail_and_the_store_failure_check() {
        let log = capture_log();
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Its own guest: the log lines of other tests' readers are not counted.
        let guest = GuestId::parse("0c4f1e2d-3b5a-4c6d-9e8f-7a6b5c4d3e2f").unwrap();
        let rate = Rate {
            burst: 1,
            per_minute: 1,
        };
        let mut reader = LogReader::start(guest, r, rate).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        reader.on_store_failure(Box::new(move |line| tx.send(line).unwrap()));
        let mut w = File::from(w);
        for i in 0..20_000 {
            writeln!(w, "error {i}: the log is long").unwrap();
        }
        writeln!(
            w,
            "SWTPM_NVRAM_StoreData: Error (fatal), data write of 1468 only wrote 4294967295"
        )
        .unwrap();
        for i in 0..(TAIL_LINES - 1) {
            writeln!(w, "after {i}").unwrap();
        }
        drop(w);
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(line.starts_with(STORE_FAILED), "{line}");
        assert!(reader.wait_eof(Duration::from_secs(10)));
        let tail = reader.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], line);
        assert_eq!(tail[TAIL_LINES - 1], format!("after {}", TAIL_LINES - 2));
        let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&guest.to_string()))
            .collect();
        // The burst's line, the count before the lost write, the lost
        // write, the count at the end.
        assert_eq!(ours.len(), 4, "{ours:#?}");
        assert!(
            ours[0].contains("swtpm: error 0: the log is long"),
            "{ours:#?}"
        );
        assert!(
            ours[1].contains(&format!(
                "suppressed 19999 messages from swtpm of guest {guest}"
            )),
            "{ours:#?}"
        );
        assert!(ours[2].contains(STORE_FAILED), "{ours:#?}");
        assert!(
            ours[3].contains(&format!(
                "suppressed 49 messages from swtpm of guest {guest}"
            )),
            "{ours:#?}"
        );
    }
}
