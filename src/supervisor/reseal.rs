//! Sealing a runtime directory as the next generation (the task that
//! does it while a guest runs is `resealer`). The archive leaves out
//! `TMP*` and dot files; the seal includes its fsyncs.

use std::path::Path;
use std::sync::PoisonError;

use crate::vault::{SealedState, StateArchive, VaultError};

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
/// the directory's state, and whether it was written just now.
pub(super) fn reseal_now(sealer: &Sealer, dir: &Path) -> Result<(u64, bool), VaultError> {
    let mut state = sealer.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(match state.seal_if_changed(&archive_dir(dir)?)? {
        Some(generation) => (generation, true),
        None => (state.generation(), false),
    })
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
    let generation = match state.seal_if_changed(&archive)? {
        Some(generation) => generation,
        None => state.generation(),
    };
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
    fn temporary_and_dot_files_are_not_state() {
        assert!(is_state_file("tpm2-00.permall"));
        assert!(is_state_file("tpm-00.volatilestate"));
        assert!(!is_state_file("TMP2-00.permall"));
        assert!(!is_state_file("TMP-00.permall"));
        assert!(!is_state_file(".lock"));
    }
}
