//! Is a runtime directory still used by a live swtpm?
//!
//! swtpm holds a POSIX write lock on `<dir>/.lock` from CMD_INIT until it
//! exits, and serves its control socket while it lives. Either sign means
//! the directory must not be wiped (a swtpm outliving an earlier vtpmd).

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use nix::unistd::{Gid, Uid};

use crate::swtpm::ctrl::{CtrlClient, CtrlError};
use crate::swtpm::spawn::listening_as;

/// How long the liveness probe of a control socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// The answer of [`in_use`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InUse {
    No,
    /// A live process holds the lock (its pid, when the kernel says) or
    /// accepts connections on the socket.
    Yes {
        holder: Option<i32>,
    },
}

/// Whether `dir` (swtpm's state directory) or `socket` (its control
/// socket) is in use by a live process.
pub fn in_use(dir: &Path, socket: Option<&Path>) -> InUse {
    if let Some(holder) = lock_holder(&dir.join(".lock")) {
        return InUse::Yes {
            holder: Some(holder),
        };
    }
    if let Some(socket) = socket {
        let Ok(meta) = std::fs::symlink_metadata(socket) else {
            return InUse::No;
        };
        if !meta.file_type().is_socket() {
            return InUse::No;
        }
        // A stale socket refuses connections; a live swtpm's accepts them
        // (even while it serves another client: the backlog takes it).
        match CtrlClient::connect(socket, CONNECT_TIMEOUT) {
            Ok(_) => return InUse::Yes { holder: None },
            Err(CtrlError::Connect { source, .. })
                if source.kind() == ErrorKind::PermissionDenied
                    && meta.uid() != nix::unistd::geteuid().as_raw() =>
            {
                // A socket of a guest's uid and the VMM's group: vtpmd
                // (without CAP_DAC_OVERRIDE) may not connect; its owner may.
                let owner = meta.uid();
                match listening_as(Uid::from_raw(owner), Gid::from_raw(owner), socket) {
                    Ok(true) => return InUse::Yes { holder: None },
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(socket = %socket.display(), "cannot probe the control socket as uid {owner}: {e}");
                    }
                }
            }
            Err(_) => {}
        }
    }
    InUse::No
}

/// The pid holding a write-conflicting POSIX lock on `path`, if any.
fn lock_holder(path: &Path) -> Option<i32> {
    let file = match crate::regular::open(path, crate::regular::Access::ReadWrite) {
        Ok(Some(file)) => file,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot check swtpm's lock: {e}");
            return None;
        }
    };
    let mut lock = libc::flock {
        l_type: libc::c_short::try_from(libc::F_WRLCK).ok()?,
        l_whence: libc::c_short::try_from(libc::SEEK_SET).ok()?,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match fcntl(file.as_fd(), FcntlArg::F_GETLK(&mut lock)) {
        Ok(_) if i32::from(lock.l_type) == libc::F_UNLCK => None,
        Ok(_) => Some(lock.l_pid),
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot check swtpm's lock: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_empty_dir_and_a_stale_socket_are_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert_eq!(in_use(dir.path(), Some(&socket)), InUse::No);
    }

    #[test]
    fn a_listening_socket_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(
            in_use(dir.path(), Some(&socket)),
            InUse::Yes { holder: None }
        );
    }
}
