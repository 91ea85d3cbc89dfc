//! While a guest runs: every state write of swtpm becomes a durable sealed
//! generation.
//!
//! swtpm writes `TMP2-00.permall` (or `TMP-00.*`), closes it and renames it
//! over the real file; it never fsyncs. An inotify watch on the runtime dir
//! for `IN_CLOSE_WRITE | IN_MOVED_TO` (names starting with `TMP` or `.`
//! ignored) wakes the resealer; events arriving within `reseal_coalesce`
//! of the first are folded into one reseal; the archive of the directory
//! (without `TMP*` files) is sealed with the data key held in memory, fsync
//! included, on a blocking thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use crate::vault::{StateArchive, VaultError};

use super::fdwatch::{self, OwnsFd};
use super::guest::{Guest, Sealer};
use super::{EventKind, Shared};

/// How often an archive is retried when a file vanished under it (swtpm
/// deletes `*.volatilestate` after reading it at CMD_INIT).
const ARCHIVE_ATTEMPTS: usize = 3;

/// swtpm's temporary files and dot-files are not state.
pub(super) fn is_state_file(name: &str) -> bool {
    !name.starts_with("TMP") && !name.starts_with('.')
}

#[derive(Debug)]
struct InotifyFd(Inotify);

/// The inotify instance owns its fd and is never replaced.
impl OwnsFd for InotifyFd {}

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify watch on one runtime directory, registered with tokio.
#[derive(Debug)]
pub(super) struct Watch {
    fd: AsyncFd<InotifyFd>,
}

impl Watch {
    /// Set up before swtpm is spawned, so no write can be missed.
    pub(super) fn new(dir: &Path) -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
        )?;
        let fd = fdwatch::readable(InotifyFd(inotify))?;
        Ok(Self { fd })
    }

    /// Waits for events and reads all that are queued; true if any names a
    /// state file.
    async fn next(&self) -> io::Result<bool> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) => {
                    return Ok(events.iter().any(|e| {
                        e.name
                            .as_ref()
                            .and_then(|n| n.to_str())
                            .is_some_and(is_state_file)
                    }));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EAGAIN as i32) => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    /// Waits until a state file was written.
    async fn written(&self) -> io::Result<()> {
        while !self.next().await? {}
        Ok(())
    }
}

/// Archives `dir` and seals it as the next generation.
pub(super) fn reseal_now(sealer: &Sealer, dir: &Path) -> Result<u64, VaultError> {
    let mut state = sealer.lock().unwrap_or_else(PoisonError::into_inner);
    let mut attempt = 1;
    let archive = loop {
        match StateArchive::from_dir_matching(dir, is_state_file) {
            Ok(archive) => break archive,
            Err(e) if attempt < ARCHIVE_ATTEMPTS => {
                tracing::debug!(dir = %dir.display(), "archive attempt {attempt} failed: {e}");
                attempt += 1;
            }
            Err(e) => return Err(VaultError::Archive(e)),
        }
    };
    state.seal(&archive)
}

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
        loop {
            if let Err(e) = watch.written().await {
                tracing::error!(guest = %guest.id, "inotify on {} failed: {e}; no more reseals until the guest stops", dir.display());
                return;
            }
            let seen = Instant::now();
            gather(&watch, seen + coalesce).await;
            let (sealer, dir2) = (Arc::clone(&sealer), dir.clone());
            let sealed = tokio::task::spawn_blocking(move || reseal_now(&sealer, &dir2)).await;
            match sealed {
                Ok(Ok(generation)) => {
                    let latency = seen.elapsed();
                    guest.record_latency(latency);
                    let info = guest.update(|i| i.generation = i.generation.max(generation));
                    tracing::debug!(guest = %guest.id, generation, latency_us = latency.as_micros(), "resealed");
                    shared.publish(EventKind::Resealed { latency }, info, None);
                }
                Ok(Err(e)) => {
                    tracing::error!(guest = %guest.id, "reseal failed: {}", crate::error_chain::chain(&e));
                }
                Err(e) => tracing::error!(guest = %guest.id, "reseal task failed: {e}"),
            }
        }
    })
}

/// Reads (and discards) further events until `until`: they are covered by
/// the reseal that follows.
async fn gather(watch: &Watch, until: Instant) {
    let deadline = tokio::time::Instant::from_std(until);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return,
            more = watch.next() => {
                if more.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_and_dot_files_are_not_state() {
        assert!(is_state_file("tpm2-00.permall"));
        assert!(is_state_file("tpm-00.volatilestate"));
        assert!(!is_state_file("TMP2-00.permall"));
        assert!(!is_state_file("TMP-00.permall"));
        assert!(!is_state_file(".lock"));
    }
}
