//! The fds the service manager passes at start (`LISTEN_FDS`, from fd 3
//! on, named by `LISTEN_FDNAMES`): the socket of `vtpmd.socket` when
//! socket-activated, and the fds vtpmd put into the fd store before a
//! restart.
//!
//! systemd 252 passes the socket unit's fds first, then the stored ones
//! (newest first, but the order changes across a `daemon-reload`: go by
//! name, never by position). They arrive without `FD_CLOEXEC`.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{SockType, getsockopt, sockopt};
use nix::sys::stat::{SFlag, fstat};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// More fds than any process can hold (the kernel's ceiling on
/// `fs.nr_open`) is not a count but a broken environment.
const MAX_PASSED: usize = 1 << 20;

/// The name `sd_listen_fds_with_names(3)` gives an fd that has none.
const UNKNOWN: &str = "unknown";

/// Set by the first adoption of passed fds; see [`adopt`].
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// A listening socket passed by socket activation.
#[derive(Debug)]
pub struct Activated {
    /// Blocking, close-on-exec; hand it to tokio after
    /// `set_nonblocking(true)`.
    pub listener: UnixListener,
    /// Its filesystem path; `None` for an abstract or unnamed socket.
    pub path: Option<PathBuf>,
}

/// Everything the service manager passed to this process.
#[derive(Debug, Default)]
pub struct Passed {
    /// The one listening `AF_UNIX` stream socket, if socket-activated.
    pub listener: Option<Activated>,
    /// Every other fd with its `LISTEN_FDNAMES` name (`"unknown"` when the
    /// manager gave no names), in the order passed; close-on-exec. Mostly
    /// what vtpmd put into the fd store earlier, but nothing is known
    /// about them: check what each is before trusting it.
    pub stored: Vec<(String, OwnedFd)>,
}

/// Every fd passed to this process: nothing when `LISTEN_PID` is unset or
/// another process's, else fds 3 to 3+`LISTEN_FDS`, all of them adopted and
/// made close-on-exec before any is looked at. A listening socket must be
/// an `AF_UNIX` stream socket and there may be only one (vtpmd serves one
/// socket: more is a misconfigured socket unit, not something to guess
/// about); every other fd goes to [`Passed::stored`].
///
/// Call this or [`listen_socket`], once, before anything can spawn a
/// child: until then the fds are inheritable. Any later call of either
/// fails, because the fd numbers are no longer ours to take.
pub fn passed_fds() -> io::Result<Passed> {
    let names = from_env()?;
    let mut passed = Passed::default();
    for (name, fd) in adopt(names)? {
        if !is_listening_socket(&fd)? {
            passed.stored.push((name, fd));
        } else if passed.listener.is_some() {
            return Err(invalid(
                "more than one listening socket was passed: vtpmd serves one; \
                 give the .socket unit one ListenStream="
                    .into(),
            ));
        } else {
            passed.listener = Some(activated(fd)?);
        }
    }
    Ok(passed)
}

/// The listening socket the service manager passed, when `LISTEN_PID` is
/// this process and `LISTEN_FDS` is 1. More than one fd, or one that is not
/// a listening `AF_UNIX` stream socket, is an error rather than something
/// to guess about; a service with an fd store gets more than one fd after a
/// restart, and must use [`passed_fds`] instead.
///
/// The same contract as [`passed_fds`]: one call of either, before
/// anything can spawn a child (systemd passes the fd without `FD_CLOEXEC`).
pub fn listen_socket() -> io::Result<Option<Activated>> {
    let names = from_env()?;
    if names.len() > 1 {
        return Err(invalid(format!(
            "LISTEN_FDS={}: vtpmd serves one socket; give the .socket unit one ListenStream=",
            names.len()
        )));
    }
    let Some((_, fd)) = adopt(names)?.pop() else {
        return Ok(None);
    };
    if !is_socket(&fd)? {
        return Err(invalid("LISTEN_FDS=1 but fd 3 is not a socket".into()));
    }
    if getsockopt(&fd, sockopt::SockType)? != SockType::Stream {
        return Err(invalid(
            "the activated socket is not a stream socket".into(),
        ));
    }
    if !getsockopt(&fd, sockopt::AcceptConn)? {
        return Err(invalid("the activated socket is not listening".into()));
    }
    activated(fd).map(Some)
}

fn from_env() -> io::Result<Vec<String>> {
    let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    fd_names(
        var("LISTEN_PID").as_deref(),
        std::process::id(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    )
}

/// The name of each fd passed to `our_pid`, from the values of
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`; empty when nothing was
/// passed to this process. As in `sd_listen_fds_with_names(3)`, no names at
/// all means every fd is `unknown`, and a number of names that differs from
/// the number of fds is an error: which name belongs to which fd would be a
/// guess, and a guessed name could hand one guest's key to another.
fn fd_names(
    listen_pid: Option<&str>,
    our_pid: u32,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
) -> io::Result<Vec<String>> {
    let Some(pid) = listen_pid else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .parse()
        .map_err(|_| invalid(format!("LISTEN_PID={pid:?} is not a pid")))?;
    if pid != our_pid {
        // Meant for another process (a parent that did not unset it).
        return Ok(Vec::new());
    }
    let count = listen_fds.unwrap_or_default();
    let n: usize = count
        .parse()
        .ok()
        .filter(|&n| n <= MAX_PASSED)
        .ok_or_else(|| invalid(format!("LISTEN_FDS={count:?} is not a count")))?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let Some(names) = listen_fdnames else {
        return Ok(vec![UNKNOWN.to_owned(); n]);
    };
    let names: Vec<String> = names
        .split(':')
        .map(|name| if name.is_empty() { UNKNOWN } else { name }.to_owned())
        .collect();
    if names.len() != n {
        return Err(invalid(format!(
            "LISTEN_FDNAMES names {} fds but LISTEN_FDS={n}",
            names.len()
        )));
    }
    Ok(names)
}

/// Takes ownership of fds 3.. (one per name) and makes each close-on-exec
/// at once. Fails on a second call in this process, and on a number with
/// nothing open behind it (having closed the fds taken so far).
fn adopt(names: Vec<String>) -> io::Result<Vec<(String, OwnedFd)>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    if ADOPTED.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(
            "the passed fds were already taken (passed_fds or listen_socket runs once)",
        ));
    }
    let mut fds = Vec::with_capacity(names.len());
    for (raw, name) in (LISTEN_FDS_START..).zip(names) {
        // Before owning the number, make sure something is open there at
        // all: stat follows the magic link to the open file itself.
        let fd_path = format!("/proc/self/fd/{raw}");
        std::fs::metadata(&fd_path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("fd {raw} ({name}) was passed but {fd_path}: {e}"),
            )
        })?;
        // SAFETY: `OwnedFd::from_raw_fd` needs an open descriptor that
        // nothing else owns. Open: `raw` resolved to an open file just
        // above, and nothing in vtpmd closes descriptors by number. Not
        // owned elsewhere: LISTEN_PID is our pid, so the service manager
        // (or systemd-socket-activate) passed fds 3..3+LISTEN_FDS to this
        // process to take; vtpmd adopts no other descriptor by number, std
        // and tokio only use descriptors they opened themselves, and an
        // open fd can never be handed out by open/socket/dup to anyone
        // else. ADOPTED makes this loop run at most once per process.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        fds.push((name, fd));
    }
    Ok(fds)
}

fn is_socket(fd: &OwnedFd) -> io::Result<bool> {
    let mode = fstat(fd)?.st_mode;
    Ok(SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK)
}

fn is_listening_socket(fd: &OwnedFd) -> io::Result<bool> {
    Ok(is_socket(fd)? && getsockopt(fd, sockopt::AcceptConn)?)
}

/// A listening socket as the API listener: it must be an `AF_UNIX` stream
/// socket.
fn activated(fd: OwnedFd) -> io::Result<Activated> {
    if getsockopt(&fd, sockopt::SockType)? != SockType::Stream {
        return Err(invalid(
            "the activated socket is not a stream socket".into(),
        ));
    }
    let listener = UnixListener::from(fd);
    // getsockname: fails unless the socket is AF_UNIX.
    let addr = listener
        .local_addr()
        .map_err(|e| invalid(format!("the activated socket is not AF_UNIX: {e}")))?;
    Ok(Activated {
        path: addr.as_pathname().map(PathBuf::from),
        listener,
    })
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 4242;

    fn names(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> io::Result<Vec<String>> {
        fd_names(pid, ME, fds, names)
    }

    #[test]
    fn nothing_is_passed_without_our_listen_pid() {
        assert!(names(None, Some("3"), Some("a:b:c")).unwrap().is_empty());
        assert!(
            names(Some("1"), Some("3"), Some("a:b:c"))
                .unwrap()
                .is_empty()
        );
        assert!(names(Some("4242"), Some("0"), None).unwrap().is_empty());
    }

    #[test]
    fn the_socket_and_stored_fds_keep_their_names_in_order() {
        let got = names(Some("4242"), Some("3"), Some("vtpmd.socket:key-b:key-a")).unwrap();
        assert_eq!(got, ["vtpmd.socket", "key-b", "key-a"]);
    }

    #[test]
    fn fds_without_names_are_unknown() {
        assert_eq!(
            names(Some("4242"), Some("2"), None).unwrap(),
            ["unknown", "unknown"]
        );
        assert_eq!(
            names(Some("4242"), Some("2"), Some("a:")).unwrap(),
            ["a", "unknown"]
        );
        assert_eq!(
            names(Some("4242"), Some("1"), Some("")).unwrap(),
            ["unknown"]
        );
    }

    #[test]
    fn a_name_count_that_differs_from_the_fd_count_is_refused() {
        for (fds, list) in [("2", "a"), ("1", "a:b"), ("3", "a:b")] {
            let err = names(Some("4242"), Some(fds), Some(list)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{fds} {list}");
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        for (pid, fds) in [
            ("x", Some("1")),
            ("-1", Some("1")),
            ("4242", None),
            ("4242", Some("")),
            ("4242", Some("-1")),
            ("4242", Some("one")),
            ("4242", Some("1048577")),
            ("4242", Some("4294967296")),
        ] {
            let err = names(Some(pid), fds, None).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{pid} {fds:?}");
        }
    }

    #[test]
    fn adopting_nothing_takes_no_fd_number() {
        assert!(adopt(Vec::new()).unwrap().is_empty());
        assert!(!ADOPTED.load(Ordering::SeqCst));
    }
}
