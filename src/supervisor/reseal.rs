//! Sealing a runtime directory as the next generation (the task that
//! does it while a guest runs is `resealer`). The archive leaves out
//! `TMP*` and dot files, and skips (logging each name once) what a guest's
//! uid may have planted that cannot be an entry; the seal includes its
//! fsyncs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, PoisonError};

use crate::protocol::GuestId;
use crate::vault::{self, SealedFile, SealedState, Skipped, StateArchive, VaultError};

use super::guest::Sealer;

/// How often an archive is retried when a file vanished under it (swtpm
/// deletes `*.volatilestate` after reading it at CMD_INIT).
const ARCHIVE_ATTEMPTS: usize = 3;

/// swtpm's temporary files and dot-files are not state.
pub(super) fn is_state_file(name: &str) -> bool {
    !name.starts_with("TMP") && !name.starts_with('.')
}

/// Archives `dir` and seals it as the next generation, unless it holds
/// exactly what is sealed already. Returns the generation that now holds
/// the directory's state, and the archive's length when it was written
/// just now.
///
/// A directory without the TPM's permanent state (`*.permall`) holds no
/// TPM: nothing is sealed over the sealed one. That is a migration's
/// destination before the VMM's state arrived (its swtpm starts on an
/// empty directory), or a directory someone emptied under swtpm.
pub(super) fn reseal_now(sealer: &Sealer, dir: &Path) -> Result<(u64, Option<usize>), VaultError> {
    // Archived under the lock: an archive taken earlier must never be
    // sealed after one taken later.
    let mut state = sealer.lock().unwrap_or_else(PoisonError::into_inner);
    let archive = archive_dir(dir)?;
    if !holds_permanent_state(&archive) {
        tracing::debug!(dir = %dir.display(), "no permanent TPM state in it: nothing to seal");
        return Ok((state.generation(), None));
    }
    Ok(match state.seal_if_changed(&archive)? {
        Some(generation) => (generation, Some(archive.encoded_len())),
        None => (state.generation(), None),
    })
}

/// Whether `archive` holds a TPM's permanent state (swtpm's
/// `tpm2-00.permall`, or `tpm-00.permall` for TPM 1.2).
fn holds_permanent_state(archive: &StateArchive) -> bool {
    archive
        .entries()
        .iter()
        .any(|e| e.name().ends_with(".permall"))
}

/// [`reseal_now`], then the sealed file as it is on disk, read under the
/// same lock: no other reseal comes between, so the file holds everything
/// `dir` held (for an Export of a running guest). Also whether a new
/// generation was written for it.
pub(super) fn reseal_and_read(
    sealer: &Sealer,
    dir: &Path,
    guest: GuestId,
) -> Result<(SealedFile, bool), VaultError> {
    let mut state = sealer.lock().unwrap_or_else(PoisonError::into_inner);
    let archive = archive_dir(dir)?;
    let written = holds_permanent_state(&archive) && state.seal_if_changed(&archive)?.is_some();
    Ok((vault::read_sealed(state.paths().current(), guest)?, written))
}

/// The state files of `dir`, retried when one vanished under the reader.
fn archive_dir(dir: &Path) -> Result<StateArchive, VaultError> {
    let mut attempt = 1;
    loop {
        match StateArchive::scan_dir(dir, is_state_file) {
            Ok((archive, skipped)) => {
                report_skipped(dir, &skipped);
                return Ok(archive);
            }
            Err(e) if attempt < ARCHIVE_ATTEMPTS => {
                tracing::debug!(dir = %dir.display(), "archive attempt {attempt} failed: {e}");
                attempt += 1;
            }
            Err(e) => return Err(VaultError::Archive(e)),
        }
    }
}

/// How many skipped names are remembered per runtime directory; past that
/// one line says that more go unreported. A guest's uid can create names
/// without end, and neither the log nor this set may grow with them.
const MAX_REPORTED: usize = 256;

/// The skipped names already logged, per runtime directory: every reseal
/// sees a planted file again, and once is enough to hear of it.
static REPORTED: LazyLock<Mutex<HashMap<PathBuf, Reported>>> = LazyLock::new(Default::default);

#[derive(Debug, Default)]
struct Reported {
    names: HashSet<String>,
    overflowed: bool,
}

impl Reported {
    /// The entries of `skipped` not reported before, and whether the
    /// overflow line is due now.
    fn news<'a>(&mut self, skipped: &'a [Skipped]) -> (Vec<&'a Skipped>, bool) {
        let mut news = Vec::new();
        let mut overflow = false;
        for s in skipped {
            if self.names.contains(&s.name) {
                continue;
            }
            if self.names.len() < MAX_REPORTED {
                self.names.insert(s.name.clone());
                news.push(s);
            } else if !self.overflowed {
                self.overflowed = true;
                overflow = true;
            }
        }
        (news, overflow)
    }
}

fn report_skipped(dir: &Path, skipped: &[Skipped]) {
    if skipped.is_empty() {
        return;
    }
    let mut reported = REPORTED.lock().unwrap_or_else(PoisonError::into_inner);
    let (news, overflow) = reported.entry(dir.to_owned()).or_default().news(skipped);
    for s in news {
        tracing::warn!(dir = %dir.display(), name = %s.name, "not sealed: {}", s.why);
    }
    if overflow {
        tracing::warn!(dir = %dir.display(), "more entries that cannot be sealed; no more are logged");
    }
}

/// Forgets what was reported for `dir`: a new run lays it anew.
pub(super) fn forget_skipped(dir: &Path) {
    REPORTED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(dir);
}

/// What sealing writes made while no key was at hand brought in.
#[derive(Debug)]
pub(super) struct CaughtUp {
    pub(super) generation: u64,
    /// The state as now sealed.
    pub(super) archive: StateArchive,
    /// How many of its files differ from the generation sealed before
    /// (added, changed or removed).
    pub(super) changed: usize,
}

impl CaughtUp {
    /// For operators: what was recovered, in words.
    pub(super) fn describe(&self) -> String {
        match self.changed {
            0 => format!("nothing had changed since generation {}", self.generation),
            n => format!(
                "{n} of {} state files held writes not sealed before; sealed as generation {}",
                self.archive.entries().len(),
                self.generation
            ),
        }
    }
}

/// Seals what `dir` holds now (writes swtpm made while no key was at
/// hand: vtpmd down, or running without it) as the next generation of
/// `state`, whose last sealed content is `sealed`.
pub(super) fn catch_up(
    state: &mut SealedState,
    sealed: &StateArchive,
    dir: &Path,
) -> Result<CaughtUp, VaultError> {
    let archive = archive_dir(dir)?;
    let sealed_now = if holds_permanent_state(&archive) {
        state.seal_if_changed(&archive)?
    } else {
        None
    };
    let generation = sealed_now.unwrap_or_else(|| state.generation());
    let changed = changed_files(sealed, &archive);
    Ok(CaughtUp {
        generation,
        archive,
        changed,
    })
}

/// Files added, removed or changed between two archives.
fn changed_files(before: &StateArchive, after: &StateArchive) -> usize {
    let added_or_changed = after
        .entries()
        .iter()
        .filter(|e| before.get(e.name()) != Some(e.data()))
        .count();
    let removed = before
        .entries()
        .iter()
        .filter(|e| after.get(e.name()).is_none())
        .count();
    added_or_changed + removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_files_counts_additions_changes_and_removals() {
        let archive = |entries: &[(&str, u8)]| {
            StateArchive::from_entries(entries.iter().map(|(n, b)| ((*n).to_owned(), vec![*b; 4])))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let before = archive(&[("tpm2-00.permall", 1), ("tpm2-00.volatilestate", 2)]);
        assert_eq!(changed_files(&before, &before), 0);
        let after = archive(&[("tpm2-00.permall", 9), ("tpm2-00.savestate", 3)]);
        assert_eq!(changed_files(&before, &after), 3);
    }

    #[test]
    fn a_skipped_name_is_news_once_and_the_set_is_bounded() {
        let skip = |name: String| Skipped {
            name,
            why: "it is a FIFO",
        };
        let mut reported = Reported::default();
        let first = [skip("a b".to_owned()), skip("fifo".to_owned())];
        assert_eq!(reported.news(&first).0.len(), 2);
        assert_eq!(reported.news(&first), (Vec::new(), false));
        let many: Vec<Skipped> = (0..MAX_REPORTED * 2)
            .map(|i| skip(format!("x{i}")))
            .collect();
        let (news, overflow) = reported.news(&many);
        assert_eq!(news.len(), MAX_REPORTED - 2);
        assert!(overflow);
        assert_eq!(reported.news(&many), (Vec::new(), false));
        assert_eq!(reported.names.len(), MAX_REPORTED);
    }

    #[test]
    fn temporary_and_dot_files_are_not_state() {
        assert!(is_state_file("tpm2-00.permall"));
        assert!(is_state_file("tpm-00.volatilestate"));
        assert!(!is_state_file("TMP2-00.permall"));
        assert!(!is_state_file("TMP-00.permall"));
        assert!(!is_state_file(".lock"));
    }
}
