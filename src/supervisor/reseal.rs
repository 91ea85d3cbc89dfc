//! While a guest runs: every state write of swtpm becomes a durable sealed
//! generation.
//!
//! swtpm writes `TMP2-00.permall` (or `TMP-00.*`), closes it and renames it
//! over the real file; it never fsyncs. A one-shot inotify watch on the
//! runtime dir for `IN_CLOSE_WRITE | IN_MOVED_TO` wakes the resealer at the
//! first write; the watch is then gone, so the writes that follow within
//! `reseal_coalesce` cost neither swtpm an event nor vtpmd a wake-up (a
//! guest writing its TPM in a loop would otherwise wake vtpmd twice per
//! write). After the window the watch is set again and only then is the
//! directory read: a write before that point is in this reseal, a write
//! after it raises the next one. The archive of the directory (without
//! `TMP*` and dot files) is sealed with the data key held in memory, fsync
//! included, on a blocking thread.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use tokio::task::JoinHandle;

use crate::vault::{SealedState, StateArchive, VaultError};

use super::guest::{Guest, Sealer};
use super::watcher::Watch;
use super::{EventKind, Shared};

/// How often an archive is retried when a file vanished under it (swtpm
/// deletes `*.volatilestate` after reading it at CMD_INIT).
const ARCHIVE_ATTEMPTS: usize = 3;

/// swtpm's temporary files and dot-files are not state.
pub(super) fn is_state_file(name: &str) -> bool {
    !name.starts_with("TMP") && !name.starts_with('.')
}

/// Archives `dir` and seals it as the next generation.
pub(super) fn reseal_now(sealer: &Sealer, dir: &Path) -> Result<u64, VaultError> {
    let mut state = sealer.lock().unwrap_or_else(PoisonError::into_inner);
    state.seal(&archive_dir(dir)?)
}

/// The state files of `dir`, retried when one vanished under the reader.
fn archive_dir(dir: &Path) -> Result<StateArchive, VaultError> {
    let mut attempt = 1;
    loop {
        match StateArchive::from_dir_matching(dir, is_state_file) {
            Ok(archive) => return Ok(archive),
            Err(e) if attempt < ARCHIVE_ATTEMPTS => {
                tracing::debug!(dir = %dir.display(), "archive attempt {attempt} failed: {e}");
                attempt += 1;
            }
            Err(e) => return Err(VaultError::Archive(e)),
        }
    }
}

/// Seals what a runtime directory holds (writes a swtpm made that were
/// never sealed) as the next generation; returns it with the archive.
pub(super) fn seal_leftover(
    state: &mut SealedState,
    dir: &Path,
) -> Result<(u64, StateArchive), VaultError> {
    let archive = archive_dir(dir)?;
    let generation = state.seal(&archive)?;
    Ok((generation, archive))
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
            watch.written().await;
            let seen = Instant::now();
            if let Err(e) = gather(&watch, seen + coalesce).await {
                tracing::error!(guest = %guest.id, "cannot watch {} again: {e}; no more reseals until the guest stops", dir.display());
                return;
            }
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

/// Sleeps until `until` (the one-shot watch is off: writes meanwhile raise
/// nothing), then sets the watch again. The reseal that follows reads the
/// directory after this, so it covers every write up to here.
async fn gather(watch: &Watch, until: Instant) -> io::Result<()> {
    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
    watch.rearm()
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
