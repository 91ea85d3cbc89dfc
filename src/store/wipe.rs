//! Removing plaintext runtime directories and sockets, and handing a
//! directory's files to a guest's swtpm uid.
//!
//! The files in a runtime directory are encrypted by swtpm itself (its
//! `--key`), and the directory lives in RAM in production, so the wipe is
//! an unlink of everything: overwriting tmpfs pages or journaled blocks
//! before unlinking would add nothing but the appearance of safety.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::libc;
use nix::unistd::{Gid, Uid};

use super::StoreError;

/// Removes `path` and everything in it; a missing path is fine. A symlink
/// at `path` is removed itself, never followed. A directory that is a mount
/// point (a guest's own tmpfs) is emptied and stays: only whoever mounted
/// it can take it away.
pub fn wipe_dir(path: &Path) -> Result<(), StoreError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Remove {
                path: path.to_owned(),
                source,
            });
        }
    };
    let removed = if meta.is_dir() && is_mount_point(path) {
        empty_dir(path)
    } else if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Whether the directory at `path` is the root of a file system of its
/// own: its device differs from its parent's. Never follows a symlink.
pub fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return false;
    };
    match (fs::symlink_metadata(path), fs::symlink_metadata(parent)) {
        (Ok(meta), Ok(up)) => meta.is_dir() && meta.dev() != up.dev(),
        _ => false,
    }
}

/// Removes everything inside `dir`, which stays.
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Removes a socket at `path`; a missing path is fine, any other kind of
/// file is refused.
pub fn remove_socket(path: &Path) -> Result<(), StoreError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => {
            return Err(StoreError::Unexpected {
                path: path.to_owned(),
                expected: "socket",
            });
        }
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Remove {
                path: path.to_owned(),
                source,
            });
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::Remove {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Creates `<dir>/.lock` for swtpm (which opens it with `O_TRUNC` and locks
/// it): vtpmd's, group `gid`, [`GUEST_LOCK_MODE`](super::GUEST_LOCK_MODE),
/// so vtpmd can lock it too (its liveness check) while swtpm uses it
/// through the group bits. A `.lock` already there is refused.
pub fn lay_lock(dir: &Path, gid: Gid) -> Result<(), StoreError> {
    let path = dir.join(".lock");
    let err = |source| StoreError::Chown {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(super::GUEST_LOCK_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(err)?;
    file.set_permissions(std::fs::Permissions::from_mode(super::GUEST_LOCK_MODE))
        .map_err(|source| StoreError::Chmod {
            path: path.clone(),
            source,
        })?;
    std::os::unix::fs::fchown(&file, None, Some(gid.as_raw())).map_err(err)
}

/// Gives every regular file directly in `dir` to `uid:gid` with `mode`,
/// acting on the open file (`O_NOFOLLOW`) and refusing hard-linked files.
/// The mode is set first, while vtpmd still owns the file (changing the
/// mode of another uid's file would take `CAP_FOWNER`), then the owner
/// (`CAP_CHOWN`).
pub fn hand_over_entries(dir: &Path, uid: Uid, gid: Gid, mode: u32) -> Result<(), StoreError> {
    let read_err = |source| StoreError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let chown_err = |source| StoreError::Chown {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(chown_err)?;
        let meta = file.metadata().map_err(chown_err)?;
        if !meta.is_file() {
            return Err(StoreError::Unexpected {
                path,
                expected: "regular file",
            });
        }
        if meta.nlink() != 1 {
            return Err(StoreError::HardLinked {
                path,
                links: meta.nlink(),
            });
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|source| StoreError::Chmod {
                path: path.clone(),
                source,
            })?;
        std::os::unix::fs::fchown(&file, Some(uid.as_raw()), Some(gid.as_raw()))
            .map_err(chown_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wipe_removes_everything_and_tolerates_absence() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("g");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a"), b"1").unwrap();
        fs::write(dir.join(".lock"), b"").unwrap();
        wipe_dir(&dir).unwrap();
        assert!(!dir.exists());
        wipe_dir(&dir).unwrap();
    }

    #[test]
    fn a_symlink_is_removed_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"1").unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        wipe_dir(&link).unwrap();
        assert!(target.join("keep").exists());
        assert!(fs::symlink_metadata(&link).is_err());
    }

    #[test]
    fn only_sockets_are_removed_as_sockets() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("f.sock");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            remove_socket(&file),
            Err(StoreError::Unexpected { .. })
        ));
        let sock = root.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        remove_socket(&sock).unwrap();
        assert!(!sock.exists());
    }

    #[test]
    fn chown_refuses_hard_links() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a"), b"1").unwrap();
        let me = (nix::unistd::geteuid(), nix::unistd::getegid());
        hand_over_entries(&dir, me.0, me.1, 0o640).unwrap();
        let meta = fs::metadata(dir.join("a")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        fs::hard_link(dir.join("a"), root.path().join("outside")).unwrap();
        assert!(matches!(
            hand_over_entries(&dir, me.0, me.1, 0o640),
            Err(StoreError::HardLinked { .. })
        ));
    }
}
