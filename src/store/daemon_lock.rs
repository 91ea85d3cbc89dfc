//! One vtpmd per state directory: an exclusive lock on
//! `<state_dir>/vtpmd.lock`, held for the daemon's whole life.
//!
//! Two daemons on one state directory would each rebuild a registry, wipe
//! what they take for the other's leftovers and reseal the same guests.
//! A POSIX record lock (not `flock`) is used because `F_GETLK` then names
//! the holder's pid for the error message; it goes when the process does,
//! however it ends, so a crash never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use super::StoreError;

/// Held while the daemon runs; dropping it (or exiting) releases the lock.
#[derive(Debug)]
pub struct DaemonLock {
    // POSIX locks belong to the process and go when *any* fd of the file
    // is closed by it: nothing else in vtpmd opens this file.
    _file: File,
}

fn whole_file_write_lock() -> Option<libc::flock> {
    Some(libc::flock {
        l_type: libc::c_short::try_from(libc::F_WRLCK).ok()?,
        l_whence: libc::c_short::try_from(libc::SEEK_SET).ok()?,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    })
}

/// Takes the lock at `path`, or names the vtpmd that holds it.
pub(super) fn lock(path: &Path) -> Result<DaemonLock, StoreError> {
    let err = |source: std::io::Error| StoreError::LockStateDir {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(StoreError::Unexpected {
            path: path.to_owned(),
            expected: "regular file",
        });
    }
    let lock = whole_file_write_lock().ok_or_else(|| err(Errno::EINVAL.into()))?;
    match fcntl(file.as_fd(), FcntlArg::F_SETLK(&lock)) {
        Ok(_) => Ok(DaemonLock { _file: file }),
        Err(Errno::EAGAIN | Errno::EACCES) => {
            let mut probe = lock;
            let holder = match fcntl(file.as_fd(), FcntlArg::F_GETLK(&mut probe)) {
                Ok(_) if i32::from(probe.l_type) != libc::F_UNLCK => Some(probe.l_pid),
                _ => None,
            };
            Err(StoreError::StateDirLocked {
                path: path.to_owned(),
                holder,
            })
        }
        Err(e) => Err(err(e.into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // POSIX locks do not conflict within one process: the refusal of a
    // second daemon is tested with two real vtpmd processes
    // (tests/continuity.rs).

    #[test]
    fn the_lock_is_taken_on_a_regular_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vtpmd.lock");
        drop(lock(&path).unwrap());
        let fifo = dir.path().join("fifo.lock");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(lock(&fifo), Err(StoreError::Unexpected { .. })));
    }
}
