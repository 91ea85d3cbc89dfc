//! Durable, atomic replacement of a sealed file, keeping the previous
//! generation beside it.
//!
//! swtpm itself never fsyncs; this is what makes a guest's state survive a
//! power loss. At every instant the current path names a complete file:
//! the old one until the final rename, the new one after it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::VaultError;

/// The two files of one guest: `<name>` and `<name>.prev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedPaths {
    current: PathBuf,
    previous: PathBuf,
}

impl SealedPaths {
    /// The previous generation lives beside `current`, named `<current>.prev`.
    pub fn new(current: impl Into<PathBuf>) -> Self {
        let current = current.into();
        let mut previous = current.clone().into_os_string();
        previous.push(".prev");
        Self {
            current,
            previous: previous.into(),
        }
    }

    pub fn current(&self) -> &Path {
        &self.current
    }

    pub fn previous(&self) -> &Path {
        &self.previous
    }

    fn sibling(path: &Path, suffix: &str) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        name.into()
    }

    fn dir(&self) -> &Path {
        match self.current.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> VaultError + '_ {
    move |source| VaultError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a new generation: temp file → fsync → keep the current file as
/// `.prev` (hard link + rename, so the current path never goes missing) →
/// rename the temp file over the current one → fsync the directory.
pub(crate) fn write_new_generation(paths: &SealedPaths, bytes: &[u8]) -> Result<(), VaultError> {
    let tmp = write_temp(&paths.current, bytes)?;
    if exists(&paths.current)? {
        let prev_tmp = SealedPaths::sibling(&paths.previous, ".tmp");
        remove_if_exists(&prev_tmp)?;
        fs::hard_link(&paths.current, &prev_tmp).map_err(io_err(&prev_tmp))?;
        fs::rename(&prev_tmp, &paths.previous).map_err(io_err(&paths.previous))?;
        // rename(2) between two links of one inode does nothing and leaves
        // the source: possible after a crash right after the line above.
        remove_if_exists(&prev_tmp)?;
    }
    fs::rename(&tmp, &paths.current).map_err(io_err(&paths.current))?;
    sync_dir(paths.dir())
}

/// Replaces one file atomically and durably, without rotating generations
/// (keyslot changes rewrite both generations in place).
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    let tmp = write_temp(path, bytes)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// Creates `<path>.tmp` afresh (a stale one from a crash is removed), writes
/// and fsyncs it. Mode 0600 and O_NOFOLLOW: nobody else reads sealed files,
/// and a planted symlink cannot redirect the write.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf, VaultError> {
    let tmp = SealedPaths::sibling(path, ".tmp");
    remove_if_exists(&tmp)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    Ok(tmp)
}

fn sync_dir(dir: &Path) -> Result<(), VaultError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn exists(path: &Path) -> Result<bool, VaultError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), VaultError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads a sealed file without following a symlink, refusing anything
/// larger than a sealed file can be.
pub(crate) fn read(path: &Path, max_len: usize) -> Result<Option<Vec<u8>>, VaultError> {
    use std::io::Read;
    // A FIFO or anything else but a regular file at the sealed path is
    // refused at once, never waited on.
    let Some(file) =
        crate::regular::open(path, crate::regular::Access::Read).map_err(io_err(path))?
    else {
        return Ok(None);
    };
    let limit = u64::try_from(max_len).unwrap_or(u64::MAX).saturating_add(1);
    let mut bytes = Vec::new();
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    Ok(Some(bytes))
}

/// Removes both generations and any temp files (for Delete).
pub(crate) fn remove_all(paths: &SealedPaths) -> Result<(), VaultError> {
    for path in [
        SealedPaths::sibling(&paths.current, ".tmp"),
        SealedPaths::sibling(&paths.previous, ".tmp"),
        paths.previous.clone(),
        paths.current.clone(),
    ] {
        remove_if_exists(&path)?;
    }
    sync_dir(paths.dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_generation_moves_the_current_one_to_prev() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SealedPaths::new(dir.path().join("tpm.sealed"));
        write_new_generation(&paths, b"one").unwrap();
        assert!(!paths.previous().exists());
        write_new_generation(&paths, b"two").unwrap();
        write_new_generation(&paths, b"three").unwrap();
        assert_eq!(fs::read(paths.current()).unwrap(), b"three");
        assert_eq!(fs::read(paths.previous()).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "left behind: {names:?}");
    }

    #[test]
    fn leftovers_of_a_crash_are_cleaned_on_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SealedPaths::new(dir.path().join("tpm.sealed"));
        write_new_generation(&paths, b"one").unwrap();
        // A crash after linking prev.tmp and renaming it: prev and current
        // are one inode, and temp files remain.
        fs::hard_link(paths.current(), paths.previous()).unwrap();
        fs::hard_link(
            paths.current(),
            SealedPaths::sibling(paths.previous(), ".tmp"),
        )
        .unwrap();
        fs::write(SealedPaths::sibling(paths.current(), ".tmp"), b"half").unwrap();
        write_new_generation(&paths, b"two").unwrap();
        assert_eq!(fs::read(paths.current()).unwrap(), b"two");
        assert_eq!(fs::read(paths.previous()).unwrap(), b"one");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("tpm.sealed");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(read(&link, 100).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"keep");
    }
}
