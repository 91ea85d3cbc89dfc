//! systemd's service protocol, without libsystemd: readiness, status and
//! stopping notifications (`sd_notify(3)`), the file-descriptor store
//! (`FDSTORE=1`), the watchdog (`sd_watchdog_enabled(3)`) and the fds
//! passed at start (`sd_listen_fds_with_names(3)`: the activated socket and
//! whatever vtpmd stored before a restart).
//!
//! Each piece is inert unless the environment asks for it, so vtpmd runs
//! the same by hand, under systemd (`Type=notify`, `WatchdogSec=`,
//! `vtpmd.socket`) and under `systemd-socket-activate`. The environment is
//! only read: unsetting a variable is unsound once threads run, and no
//! child sees these variables anyway, because every child vtpmd spawns
//! (swtpm, swtpm_setup, the probe) starts from `env_clear()`. Every passed
//! fd is made close-on-exec before any child can be spawned.

mod fdstore;
mod listen;
pub mod mount;
pub mod scope;

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

pub use fdstore::is_valid_fd_name;
pub use listen::{Activated, Passed, listen_socket, passed_fds};

/// How long one notification may wait for room in the manager's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to the service manager's notification socket
/// (`NOTIFY_SOCKET`): a filesystem path or, with a leading `@`, an abstract
/// address.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: UnixAddr,
}

impl Notifier {
    /// The manager named by `NOTIFY_SOCKET`; `None` when it is unset or
    /// empty (not started by a service manager).
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(value) if !value.is_empty() => Self::new(&value).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for one `NOTIFY_SOCKET` value.
    pub fn new(value: &std::ffi::OsStr) -> io::Result<Self> {
        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => UnixAddr::new(value),
            Some(b'@') => UnixAddr::new_abstract(&bytes[1..]),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={value:?} is neither an absolute path nor an abstract address (@name)"
                    ),
                ));
            }
        }
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("NOTIFY_SOCKET={value:?}: {e}")))?;
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Self { socket, addr })
    }

    /// Sends newline-separated assignments, e.g. `"READY=1\nSTATUS=…"`, as
    /// one datagram.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.send(state, &[])
    }

    /// One datagram to the manager, with `fds` attached (`SCM_RIGHTS`)
    /// unless empty. The manager reads the sender's pid from the socket's
    /// credentials, so this works from any thread of the main process
    /// (`NotifyAccess=main`).
    fn send(&self, state: &str, fds: &[RawFd]) -> io::Result<()> {
        let iov = [IoSlice::new(state.as_bytes())];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        let sent = loop {
            match sendmsg(
                self.socket.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                Some(&self.addr),
            ) {
                Ok(sent) => break sent,
                Err(Errno::EINTR) => {}
                // SO_SNDTIMEO ran out: the manager is not reading.
                Err(Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the service manager took no notification within {SEND_TIMEOUT:?}"),
                    ));
                }
                Err(errno) => return Err(errno.into()),
            }
        };
        if sent == state.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the notification was truncated",
            ))
        }
    }
}

/// The watchdog timeout systemd expects pings within (`WATCHDOG_USEC`),
/// when it is meant for this process: `WATCHDOG_PID` unset or equal to
/// our pid. Ping at half of it.
pub fn watchdog_timeout() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// `STATUS=` text for a number of running guests.
pub fn running_status(running: usize) -> String {
    match running {
        1 => "1 guest running".to_owned(),
        n => format!("{n} guests running"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;

    use super::*;

    #[test]
    fn notify_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.as_os_str())
            .unwrap()
            .notify("READY=1\nSTATUS=x")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        let name = format!("vtpmd-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::new(format!("@{name}").as_ref())
            .unwrap()
            .notify("WATCHDOG=1")
            .unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn a_relative_notify_socket_is_refused() {
        assert!(Notifier::new("relative/path".as_ref()).is_err());
        assert!(Notifier::new("vsock:2:1".as_ref()).is_err());
    }

    #[test]
    fn a_notify_socket_path_too_long_for_sockaddr_un_is_refused() {
        let long = format!("/{}", "x".repeat(200));
        assert!(Notifier::new(long.as_ref()).is_err());
    }

    #[test]
    fn status_counts_guests() {
        assert_eq!(running_status(0), "0 guests running");
        assert_eq!(running_status(1), "1 guest running");
        assert_eq!(running_status(7), "7 guests running");
    }
}
