//! systemd's service protocol, without libsystemd: readiness, status and
//! stopping notifications (`sd_notify(3)`), the watchdog
//! (`sd_watchdog_enabled(3)`) and socket activation (`sd_listen_fds(3)`).
//!
//! Each piece is inert unless the environment asks for it, so vtpmd runs
//! the same by hand, under systemd (`Type=notify`, `WatchdogSec=`,
//! `vtpmd.socket`) and under `systemd-socket-activate`. The environment is
//! only read: unsetting a variable is unsound once threads run, and no
//! child sees these variables anyway, because every child vtpmd spawns
//! (swtpm, swtpm_setup, the probe) starts from `env_clear()`. The activated
//! socket is made close-on-exec before any child can be spawned.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{SockType, getsockopt, sockopt};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// How long one notification may wait for room in the manager's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to the service manager's notification socket
/// (`NOTIFY_SOCKET`): a filesystem path or, with a leading `@`, an abstract
/// address.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
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
            Some(b'/') => SocketAddr::from_pathname(value)?,
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={value:?} is neither an absolute path nor an abstract address (@name)"
                    ),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Self { socket, addr })
    }

    /// Sends newline-separated assignments, e.g. `"READY=1\nSTATUS=…"`, as
    /// one datagram.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
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

/// A listening socket passed by socket activation.
#[derive(Debug)]
pub struct Activated {
    /// Blocking, close-on-exec; hand it to tokio after
    /// `set_nonblocking(true)`.
    pub listener: UnixListener,
    /// Its filesystem path; `None` for an abstract or unnamed socket.
    pub path: Option<PathBuf>,
}

/// The listening socket the service manager passed, when `LISTEN_PID` is
/// this process and `LISTEN_FDS` is 1. vtpmd serves exactly one socket:
/// more than one, or one that is not a listening `AF_UNIX` stream socket,
/// is an error rather than something to guess about.
///
/// Call it before anything can spawn a child: until then the descriptor is
/// inheritable (systemd passes it without `FD_CLOEXEC`).
pub fn listen_socket() -> io::Result<Option<Activated>> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let Some(pid) = var("LISTEN_PID") else {
        return Ok(None);
    };
    let pid: u32 = pid
        .parse()
        .map_err(|_| invalid(format!("LISTEN_PID={pid:?} is not a pid")))?;
    if pid != std::process::id() {
        // Meant for another process (a parent that did not unset it).
        return Ok(None);
    }
    let count = var("LISTEN_FDS").unwrap_or_default();
    match count.parse::<u32>() {
        Ok(0) => return Ok(None),
        Ok(1) => {}
        Ok(n) => {
            return Err(invalid(format!(
                "LISTEN_FDS={n}: vtpmd serves one socket; give the .socket unit one ListenStream="
            )));
        }
        Err(_) => return Err(invalid(format!("LISTEN_FDS={count:?} is not a count"))),
    }
    // Before owning the number, make sure something is open there at all:
    // stat follows the magic link to the open file itself.
    let fd_path = format!("/proc/self/fd/{LISTEN_FDS_START}");
    let meta = std::fs::metadata(&fd_path)
        .map_err(|e| io::Error::new(e.kind(), format!("LISTEN_FDS=1 but {fd_path}: {e}")))?;
    if !meta.file_type().is_socket() {
        return Err(invalid("LISTEN_FDS=1 but fd 3 is not a socket".into()));
    }
    // SAFETY: `OwnedFd::from_raw_fd` needs an open descriptor that nothing
    // else owns. Open: fd 3 resolved to a socket just above, and nothing
    // in vtpmd closes descriptors by number. Not owned elsewhere: LISTEN_PID
    // is our pid, so the service manager (or systemd-socket-activate)
    // passed fds 3..3+LISTEN_FDS to this process to take; vtpmd adopts no
    // other descriptor by number, std and tokio only use descriptors they
    // opened themselves, and an open fd 3 can never be handed out by
    // open/socket/dup to anyone else. This function is the only adopter
    // and runs once, at start-up.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    if getsockopt(&fd, sockopt::SockType)? != SockType::Stream {
        return Err(invalid(
            "the activated socket is not a stream socket".into(),
        ));
    }
    if !getsockopt(&fd, sockopt::AcceptConn)? {
        return Err(invalid("the activated socket is not listening".into()));
    }
    let listener = UnixListener::from(fd);
    // getsockname: fails unless the socket is AF_UNIX.
    let addr = listener
        .local_addr()
        .map_err(|e| invalid(format!("the activated socket is not AF_UNIX: {e}")))?;
    Ok(Some(Activated {
        path: addr.as_pathname().map(PathBuf::from),
        listener,
    }))
}

fn var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v: OsString| v.to_string_lossy().into_owned())
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
    fn status_counts_guests() {
        assert_eq!(running_status(0), "0 guests running");
        assert_eq!(running_status(1), "1 guest running");
        assert_eq!(running_status(7), "7 guests running");
    }
}
