//! The service manager's file-descriptor store (`FDSTORE=1` in
//! `sd_notify(3)`): fds it holds for the service while the service
//! restarts, and passes back with the next start (see [`super::passed_fds`]).
//!
//! The unit must set `FileDescriptorStoreMax=` (0 by default: systemd then
//! closes every fd offered and only logs it). systemd 252 keeps the store
//! across `systemctl restart`, a restart by `Restart=` after a crash or a
//! watchdog timeout, `daemon-reload` and `daemon-reexec`, and empties it
//! when the service stops without a restart pending (`systemctl stop`, an
//! exit that `Restart=` does not restart).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::Notifier;

/// systemd's `FDNAME_MAX`.
const FD_NAME_MAX: usize = 255;

/// Whether systemd accepts `name` as an `FDNAME=`: 1 to 255 printable
/// ASCII characters other than `:` (which separates `LISTEN_FDNAMES`).
///
/// systemd does not refuse an fd with an invalid name: it logs "Passed
/// FDNAME= name is invalid, ignoring" and stores the fd as `stored`, where
/// nobody would look for it. So names are checked before anything is sent.
pub fn is_valid_fd_name(name: &str) -> bool {
    (1..=FD_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

fn check_name(name: &str) -> io::Result<()> {
    if is_valid_fd_name(name) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{name:?} is not a valid fd store name (1 to {FD_NAME_MAX} printable ASCII characters, no ':')"
            ),
        ))
    }
}

impl Notifier {
    /// Hands a duplicate of `fd` to the service manager's fd store under
    /// `name` (`FDSTORE=1`, `FDNAME=`). The caller may close its own copy.
    ///
    /// Storing a second fd under a name already stored keeps both (systemd
    /// only folds an fd that refers to a file it already holds); remove the
    /// old one first to replace it. Success means the manager received the
    /// datagram, not that it kept the fd: it drops fds beyond
    /// `FileDescriptorStoreMax=` or from a sender other than the main
    /// process (`NotifyAccess=main`), saying so only in its log.
    pub fn store_fd(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        check_name(name)?;
        self.send(&format!("FDSTORE=1\nFDNAME={name}"), &[fd.as_raw_fd()])
            .map_err(|e| io::Error::new(e.kind(), format!("storing fd {name:?}: {e}")))
    }

    /// Removes every fd stored under `name` (`FDSTOREREMOVE=1`). Removing a
    /// name that is not stored is not an error.
    pub fn remove_fd(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
            .map_err(|e| io::Error::new(e.kind(), format!("removing fd {name:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSliceMut;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixDatagram;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
    use nix::sys::stat::fstat;

    use super::*;

    fn bound() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.as_os_str()).unwrap();
        (dir, rx, notifier)
    }

    /// One datagram and the fds that came with it.
    fn receive(rx: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        let mut buf = [0u8; 512];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            rx.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        assert!(!msg.flags.contains(MsgFlags::MSG_CTRUNC));
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS just installed these fds in this
                // process; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        (String::from_utf8(buf[..n].to_vec()).unwrap(), fds)
    }

    #[test]
    fn store_fd_sends_a_duplicate_of_the_fd_with_its_name() {
        // Arrange
        let (_dir, rx, notifier) = bound();
        let file = tempfile::tempfile().unwrap();

        // Act
        notifier.store_fd("key-guest", file.as_fd()).unwrap();

        // Assert
        let (text, fds) = receive(&rx);
        assert_eq!(text, "FDSTORE=1\nFDNAME=key-guest");
        assert_eq!(fds.len(), 1);
        let (sent, got) = (fstat(&file).unwrap(), fstat(&fds[0]).unwrap());
        assert_eq!((got.st_dev, got.st_ino), (sent.st_dev, sent.st_ino));
        assert_ne!(fds[0].as_raw_fd(), file.as_raw_fd());
    }

    #[test]
    fn remove_fd_sends_the_name_and_no_fd() {
        let (_dir, rx, notifier) = bound();
        notifier.remove_fd("key-guest").unwrap();
        let (text, fds) = receive(&rx);
        assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=key-guest");
        assert!(fds.is_empty());
    }

    #[test]
    fn an_invalid_name_sends_nothing() {
        // Arrange
        let (_dir, rx, notifier) = bound();
        let file = tempfile::tempfile().unwrap();
        rx.set_nonblocking(true).unwrap();

        // Act
        let stored = notifier.store_fd("a:b", file.as_fd()).unwrap_err();
        let removed = notifier.remove_fd("").unwrap_err();

        // Assert
        assert_eq!(stored.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(removed.kind(), io::ErrorKind::InvalidInput);
        let mut buf = [0u8; 64];
        let nothing = rx.recv(&mut buf).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn fd_names_follow_systemds_rule() {
        // The cases measured against systemd 252 (a service storing fds
        // under each name, then restarted).
        for good in [
            "key-0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40",
            "sp ace",
            "~",
            &"x".repeat(255),
        ] {
            assert!(is_valid_fd_name(good), "{good:?}");
        }
        for bad in [
            "",
            "bad:name",
            "t\tab",
            "new\nline",
            "\u{e9}",
            "\x7f",
            &"y".repeat(256),
        ] {
            assert!(!is_valid_fd_name(bad), "{bad:?}");
        }
    }
}
