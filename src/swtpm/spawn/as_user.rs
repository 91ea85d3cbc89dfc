//! Acting for a moment as a guest's uid: signalling its swtpm, and probing
//! its control socket, without `CAP_KILL` or `CAP_DAC_OVERRIDE`.
//!
//! vtpmd keeps only `CAP_SETUID`, `CAP_SETGID` and `CAP_CHOWN`. `kill(2)`
//! (and `pidfd_send_signal(2)`, which checks the same) lets a process
//! signal another only if its real or effective uid matches the target's
//! real or saved uid, or with `CAP_KILL`. So vtpmd forks a helper that
//! switches to the guest's uid and gid (the capabilities vtpmd keeps
//! anyway), makes the one call, and exits with its result as status.
//!
//! Why a fork and not `/bin/kill` run with `Command::uid`: no dependency on
//! a binary at a fixed path (procps is absent from minimal images), no
//! exec, no argv parsing; and not a re-exec of vtpmd either (the library
//! runs inside other programs, tests among them). Between fork and exit the
//! child of a multi-threaded process may only make async-signal-safe calls:
//! it makes raw system calls only (`setgroups`, `setresgid`, `setresuid`,
//! then `kill` or `socket` + `connect`, then `_exit`), allocates nothing and
//! takes no lock. The raw `setres*id` calls change only the calling thread,
//! which in the child is the only one (glibc's wrappers would try to
//! broadcast to the parent's threads). The child inherits vtpmd's
//! non-dumpable flag, and dropping root resets it to non-dumpable anyway,
//! so the guest's swtpm (same uid) cannot ptrace it or read its memory.
//!
//! Signalling by pid is safe: only the [`Swtpm`](super::Swtpm) guard reaps
//! its child, so the pid cannot be reused while the guard lives.

use std::path::Path;

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::Signal;
use nix::sys::socket::{SockaddrLike, UnixAddr};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

/// Exit status of a helper that could not take on the uid; `kill` and
/// `connect` errors are reported as their errno (Linux's end at 133).
const SWITCH_FAILED: i32 = 255;
/// Exit status of a connect probe that found nobody listening.
const REFUSED: i32 = 254;

/// What a helper failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AsUserError {
    #[error("cannot fork the helper that acts as uid {uid}")]
    Fork { uid: u32, source: Errno },
    #[error("cannot wait for the helper that acts as uid {uid}")]
    Wait { uid: u32, source: Errno },
    #[error("the helper could not take on uid {uid}")]
    Switch { uid: u32 },
    #[error("the helper acting as uid {uid} ended abnormally")]
    Abnormal { uid: u32 },
    #[error("acting as uid {uid}")]
    Call {
        uid: u32,
        #[source]
        source: Errno,
    },
}

impl AsUserError {
    /// The errno of the call itself, when that is what failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            AsUserError::Call { source, .. } => Some(*source),
            _ => None,
        }
    }
}

/// Sends `signal` to `pid` as `uid`/`gid`.
pub fn signal_as(uid: Uid, gid: Gid, pid: u32, signal: Signal) -> Result<(), AsUserError> {
    let raw_uid = uid.as_raw();
    let pid = libc::pid_t::try_from(pid).map_err(|_| AsUserError::Call {
        uid: raw_uid,
        source: Errno::ESRCH,
    })?;
    let sig = signal as libc::c_int;
    let status = run_as(uid, gid, move || {
        // SAFETY: kill(2) takes two integers; async-signal-safe.
        if unsafe { libc::kill(pid, sig) } == 0 {
            0
        } else {
            Errno::last_raw()
        }
    })?;
    match status {
        0 => Ok(()),
        n => Err(AsUserError::Call {
            uid: raw_uid,
            source: Errno::from_raw(n),
        }),
    }
}

/// Whether something accepts connections on the Unix socket at `path`,
/// asked as `uid`/`gid` (the socket's owner, when vtpmd itself may not
/// connect). A full backlog counts as listening.
pub fn listening_as(uid: Uid, gid: Gid, path: &Path) -> Result<bool, AsUserError> {
    let raw_uid = uid.as_raw();
    // Built before the fork: the child must not allocate.
    let addr = UnixAddr::new(path).map_err(|source| AsUserError::Call {
        uid: raw_uid,
        source,
    })?;
    let status = run_as(uid, gid, move || {
        // SAFETY: socket(2) takes three integers; async-signal-safe.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Errno::last_raw();
        }
        // SAFETY: `addr` is a complete sockaddr_un owned by this closure and
        // `len()` its length; connect(2) only reads it. Async-signal-safe.
        // The socket is closed by the helper's exit.
        let rc = unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len()) };
        if rc == 0 {
            return 0;
        }
        match Errno::last() {
            // Non-blocking connect to a listener with a full backlog.
            Errno::EAGAIN | Errno::EINPROGRESS => 0,
            Errno::ECONNREFUSED | Errno::ENOENT => REFUSED,
            other => other as i32,
        }
    })?;
    match status {
        0 => Ok(true),
        REFUSED => Ok(false),
        n => Err(AsUserError::Call {
            uid: raw_uid,
            source: Errno::from_raw(n),
        }),
    }
}

/// Forks; the child drops every supplementary group, takes on `gid` and
/// `uid` (real, effective and saved), runs `call` and exits with its
/// result (kept within 0..=[`REFUSED`]). Returns that status.
fn run_as(uid: Uid, gid: Gid, call: impl FnOnce() -> i32) -> Result<i32, AsUserError> {
    let raw_uid = uid.as_raw();
    // SAFETY: the child runs only `become_user`, `call` and `_exit`, which
    // make raw system calls only: async-signal-safe, no allocation, no lock,
    // as required after fork in a multi-threaded process.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let status = match become_user(uid, gid) {
                Ok(()) => call().clamp(0, REFUSED),
                Err(()) => SWITCH_FAILED,
            };
            // SAFETY: _exit(2) ends the child at once, running no atexit
            // handler and flushing nothing of the parent's.
            unsafe { libc::_exit(status) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(source) => {
            return Err(AsUserError::Fork {
                uid: raw_uid,
                source,
            });
        }
    };
    wait_helper(child, raw_uid)
}

fn wait_helper(child: Pid, uid: u32) -> Result<i32, AsUserError> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, SWITCH_FAILED)) => return Err(AsUserError::Switch { uid }),
            Ok(WaitStatus::Exited(_, status)) => return Ok(status),
            Ok(WaitStatus::Signaled(..)) => return Err(AsUserError::Abnormal { uid }),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(source) => return Err(AsUserError::Wait { uid, source }),
        }
    }
}

/// In the forked child: no supplementary groups, then gid, then uid (the
/// uid last: after it, setting groups is no longer allowed).
fn become_user(uid: Uid, gid: Gid) -> Result<(), ()> {
    let (uid, gid) = (uid.as_raw(), gid.as_raw());
    // SAFETY: setgroups(0, NULL) reads no memory; a raw syscall, so only
    // this (the only) thread changes. Async-signal-safe.
    if unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) } != 0 {
        return Err(());
    }
    // SAFETY: setresgid(2) takes three integers; raw syscall as above.
    if unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } != 0 {
        return Err(());
    }
    // SAFETY: setresuid(2) takes three integers; raw syscall as above.
    if unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } != 0 {
        return Err(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signalling_a_missing_process_says_esrch() {
        let me = (nix::unistd::geteuid(), nix::unistd::getegid());
        // Arrange: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // Act
        let result = signal_as(me.0, me.1, pid, Signal::SIGTERM);
        // Assert
        assert_eq!(result.unwrap_err().errno(), Some(Errno::ESRCH));
    }

    #[test]
    fn a_listener_is_seen_and_a_stale_socket_is_not() {
        let me = (nix::unistd::geteuid(), nix::unistd::getegid());
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(listening_as(me.0, me.1, &live).unwrap());
        assert!(!listening_as(me.0, me.1, &stale).unwrap());
        assert!(!listening_as(me.0, me.1, &dir.path().join("none")).unwrap());
    }

    #[test]
    fn another_uid_cannot_signal_us() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to take on another uid");
            return;
        }
        let nobody = (Uid::from_raw(65534), Gid::from_raw(65534));
        let result = signal_as(nobody.0, nobody.1, std::process::id(), Signal::SIGTERM);
        assert_eq!(result.unwrap_err().errno(), Some(Errno::EPERM));
    }
}
