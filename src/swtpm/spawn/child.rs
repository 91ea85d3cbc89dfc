//! [`spawn`] and the [`Swtpm`] guard that tracks the child through a pidfd.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid};
use secrecy::{ExposeSecret, ExposeSecretMut};

use super::as_user::signal_as;
use super::log::LogReader;
use super::vfork;
use super::{CTRL_FD, KEY_FD, MIGRATION_KEY_FD, SpawnError, SpawnSpec};
use crate::protocol::GuestId;
use crate::secret::SecretBuf;

/// Sources for the child's fixed fds are duplicated to at least this
/// number first, so placing them at 3, 4 and 5 can never overwrite one
/// another.
pub(super) const HIGH_FD: RawFd = 10;
/// How long `Drop` lets a still-running swtpm shut down before SIGKILL.
const DROP_GRACE: Duration = Duration::from_millis(500);
/// How long to wait for a SIGKILLed child to be gone (only a process stuck
/// in the kernel takes longer).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for swtpm's last log lines once it has exited. The
/// pipe's only writer is gone by then, so EOF is immediate unless swtpm
/// left a child of its own behind (it does not fork).
const LOG_EOF_WAIT: Duration = Duration::from_millis(200);

/// How swtpm ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// It called `exit` with this status (0 after SIGTERM or CMD_SHUTDOWN).
    Exited(i32),
    /// It was killed by this signal.
    Signaled(Signal),
    /// It was killed by a signal nix has no name for (a real-time signal).
    SignaledNumber(i32),
    /// An adopted swtpm ended; its status went to its parent (init or the
    /// service manager), not to vtpmd.
    Unknown,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Exited(code) => write!(f, "exited with status {code}"),
            ExitReason::Signaled(sig) => write!(f, "was killed by {sig}"),
            ExitReason::SignaledNumber(n) => write!(f, "was killed by signal {n}"),
            ExitReason::Unknown => write!(f, "exited (status unknown: not vtpmd's child)"),
        }
    }
}

impl ExitReason {
    fn from_status(status: ExitStatus) -> ExitReason {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitReason::Exited(code),
            (None, Some(n)) => Signal::try_from(n)
                .map(ExitReason::Signaled)
                .unwrap_or(ExitReason::SignaledNumber(n)),
            // waitpid reports either an exit or a signal for a dead child.
            (None, None) => ExitReason::SignaledNumber(0),
        }
    }
}

/// A running (or exited, not yet dropped) swtpm of one guest.
///
/// Only this guard reaps the child, so its pid cannot be reused while the
/// guard lives and signalling it by pid is safe. (Nothing in vtpmd may set
/// `SIGCHLD` to `SIG_IGN` or call `waitpid(-1)`.) Every way of observing the
/// exit — [`try_exit`](Swtpm::try_exit), [`wait_exit`](Swtpm::wait_exit),
/// [`stop`](Swtpm::stop), `Drop` — reaps the child and then removes the
/// control socket (if it is still the one vtpmd bound) and the state
/// directory's `.lock` (if no other process holds a lock on it).
/// Dropping a running guard stops swtpm with a 500 ms grace.
#[derive(Debug)]
pub struct Swtpm {
    guest: GuestId,
    /// `None` for a swtpm adopted from an earlier vtpmd: it is not our
    /// child, so its exit is seen on the pidfd only and never reaped here.
    child: Option<vfork::Process>,
    pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field
    /// 22): with the pid, what tells this process from a later one.
    start_time: u64,
    pidfd: OwnedFd,
    ctrl_path: PathBuf,
    /// (st_dev, st_ino) of the socket vtpmd bound, so cleanup never removes
    /// a socket somebody else has put at the path since.
    ctrl_id: (u64, u64),
    lock_path: PathBuf,
    /// swtpm's uid and gid when it is not vtpmd's: signals then go through
    /// [`signal_as`].
    other_user: Option<(Uid, Gid)>,
    /// The client connected before the socket changed owner
    /// ([`SpawnSpec::ready_probe`]).
    ready_probe: Option<UnixStream>,
    exit: Option<ExitReason>,
    cleaned: bool,
    /// `None` for an adopted swtpm: its log pipe died with the vtpmd that
    /// started it.
    log: Option<LogReader>,
    /// An adopted swtpm's lost write, as recorded by an earlier vtpmd.
    recorded_store_failure: Option<String>,
    /// Set by [`Swtpm::detach`]: `Drop` leaves the process running.
    detached: bool,
}

/// Starts swtpm as `spec` says; see the [module docs](super) for the steps.
///
/// Returns once the child runs and has not exited within
/// `spec.early_exit_window`; the control socket is connectable already.
/// An exit within that window is [`SpawnError::Exited`] with swtpm's log
/// tail. Failures that swtpm only detects on CMD_INIT (a wrong key, an
/// unlockable state directory) show later, as an exit or an INIT error.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Swtpm, SpawnError> {
    spec.validate()?;
    let args = spec.args();

    // 1. The control socket, bound by vtpmd: connectable from now on. The
    //    guard removes it again if any later step fails.
    let (listener, ctrl_id, ready_probe) = bind_ctrl(spec)?;
    let mut socket = SocketGuard {
        path: &spec.ctrl_socket,
        id: ctrl_id,
        armed: true,
    };

    // 2. The key pipe, filled and its write end closed before the child
    //    exists (64 bytes always fit in the pipe buffer), so swtpm reads
    //    the key to EOF and nothing of it stays in vtpmd but the SecretBuf.
    let key_read = key_pipe(spec.key)?;
    let migration_key_read = spec.migration_key.map(key_pipe).transpose()?;

    // 3. The log pipe. Its read end stays in vtpmd (CLOEXEC); the write end
    //    becomes swtpm's stdout and stderr, where swtpm logs (`--log
    //    level=` without `fd=`: see `SpawnSpec::args` for why). Its reader
    //    starts once swtpm runs (the pipe holds what comes before), so
    //    creating that thread does not delay the exec.
    let (log_read, log_write) = log_pipe()?;
    let stdout = log_write.try_clone().map_err(|e| SpawnError::Fd {
        what: "log pipe",
        source: io_to_nix(&e),
    })?;

    // 4. Copy the sources above the target numbers (CLOEXEC, so no other
    //    child inherits them), so the dup2s in the child cannot collide.
    let ctrl_src = dup_high(listener.as_fd(), "control socket")?;
    let key_src = dup_high(key_read.as_fd(), "key pipe")?;
    let migration_key_src = migration_key_read
        .as_ref()
        .map(|read| dup_high(read.as_fd(), "migration key pipe"))
        .transpose()?;
    // Without a migration key nothing goes to fd 5 (a source of -1).
    let fds = [
        (ctrl_src.as_raw_fd(), CTRL_FD),
        (key_src.as_raw_fd(), KEY_FD),
        (
            migration_key_src.as_ref().map_or(-1, |src| src.as_raw_fd()),
            MIGRATION_KEY_FD,
        ),
    ];
    let cloexec_flag = libc::c_int::try_from(libc::CLOSE_RANGE_CLOEXEC).unwrap_or(0);
    let other_user = spec
        .run_as
        .filter(|(uid, _)| *uid != nix::unistd::geteuid());

    // Its stdin /dev/null, its stdout and stderr the log pipe; these
    // sources too above the fixed numbers.
    let null = std::fs::File::open("/dev/null").map_err(|source| SpawnError::Fd {
        what: "/dev/null",
        source: io_to_nix(&source),
    })?;
    let stdin_src = dup_high(null.as_fd(), "/dev/null")?;
    let stdout_src = dup_high(stdout.as_fd(), "log pipe")?;
    let stderr_src = dup_high(log_write.as_fd(), "log pipe")?;
    drop((null, stdout, log_write));
    let exec = vfork::Exec::new(
        &spec.swtpm,
        &args,
        [
            stdin_src.as_raw_fd(),
            stdout_src.as_raw_fd(),
            stderr_src.as_raw_fd(),
        ],
        spec.run_as,
        child_setup,
        vfork::Setup { fds, cloexec_flag },
    )
    .map_err(|source| SpawnError::Exec {
        binary: spec.swtpm.clone(),
        source,
    })?;

    // The originals stay open until the child has exec'd.
    let spawned = vfork::spawn(&exec);
    // Now close every copy vtpmd holds: the log reader must see EOF when
    // swtpm exits, and once swtpm exits connections must be refused rather
    // than queue on a listener nobody accepts on.
    drop(exec);
    drop((stdin_src, stdout_src, stderr_src));
    drop((ctrl_src, key_src, listener, key_read));
    drop((migration_key_src, migration_key_read));
    let mut child = spawned.map_err(|source| SpawnError::Exec {
        binary: spec.swtpm.clone(),
        source,
    })?;
    let log = match LogReader::start(spec.guest, log_read, spec.log_rate) {
        Ok(log) => log,
        Err(source) => {
            let _ = send_signal(child.id(), Signal::SIGKILL, other_user);
            let _ = child.wait();
            return Err(SpawnError::LogThread {
                guest: spec.guest,
                source,
            });
        }
    };

    // 5. The pidfd, before anything else can happen to the child. Only we
    //    reap it, so the pid is still ours here.
    //    With it, the start time that tells this process from a later one
    //    of the same pid (for a vtpmd that adopts it after a restart).
    let identity = pidfd_open(child.id())
        .and_then(|pidfd| Ok((pidfd, super::procfs::start_time(child.id())?)));
    let (pidfd, start_time) = match identity {
        Ok(identity) => identity,
        Err(source) => {
            let _ = send_signal(child.id(), Signal::SIGKILL, other_user);
            let _ = child.wait();
            return Err(SpawnError::PidfdOpen {
                pid: child.id(),
                source,
            });
        }
    };

    // From here on the guard's Drop (stop, reap, clean up) owns the socket.
    socket.armed = false;
    let mut swtpm = Swtpm {
        guest: spec.guest,
        pid: child.id(),
        child: Some(child),
        start_time,
        pidfd,
        ctrl_path: spec.ctrl_socket.clone(),
        ctrl_id,
        lock_path: spec.state_dir.join(".lock"),
        other_user,
        ready_probe,
        exit: None,
        cleaned: false,
        log: Some(log),
        recorded_store_failure: None,
        detached: false,
    };

    // 6. An immediate exit (bad option, key unreadable, state directory
    //    unusable) becomes an error carrying swtpm's own words.
    if let Some(reason) = swtpm.wait_exit(spec.early_exit_window)? {
        return Err(SpawnError::Exited {
            guest: swtpm.guest,
            reason,
            log_tail: swtpm.log_tail(),
        });
    }
    tracing::debug!(guest = %swtpm.guest, pid = swtpm.pid(), "swtpm started");
    Ok(swtpm)
}

impl Swtpm {
    /// The guard of an adopted swtpm (see [`adopt`](super::adopt)).
    pub(super) fn adopted(
        a: &super::Adoption,
        pidfd: OwnedFd,
        other_user: Option<(Uid, Gid)>,
    ) -> Swtpm {
        Swtpm {
            guest: a.guest,
            child: None,
            pid: a.pid,
            start_time: a.start_time,
            pidfd,
            ctrl_path: a.ctrl_socket.clone(),
            ctrl_id: a.ctrl_id,
            lock_path: a.state_dir.join(".lock"),
            other_user,
            ready_probe: None,
            exit: None,
            cleaned: false,
            log: None,
            recorded_store_failure: a.store_failure.clone(),
            detached: false,
        }
    }

    pub fn guest(&self) -> GuestId {
        self.guest
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Clock ticks since boot when the process started (`/proc/PID/stat`).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// (st_dev, st_ino) of the control socket vtpmd bound.
    pub fn ctrl_id(&self) -> (u64, u64) {
        self.ctrl_id
    }

    /// Whether this swtpm was adopted from an earlier vtpmd (not our child).
    pub fn is_adopted(&self) -> bool {
        self.child.is_none()
    }

    /// Lets the process go on running when this guard is dropped: vtpmd is
    /// exiting and a later vtpmd adopts it. Nothing is cleaned up.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Readable (POLLIN) once the child has exited; register it with an
    /// event loop, then call [`try_exit`](Swtpm::try_exit) to reap.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn ctrl_path(&self) -> &Path {
        &self.ctrl_path
    }

    /// swtpm's last log lines (stderr included), oldest first.
    pub fn log_tail(&self) -> Vec<String> {
        self.log.as_ref().map(LogReader::tail).unwrap_or_default()
    }

    /// swtpm's line saying it could not store its state (it lost a write
    /// and answers TPM_RC_FAILURE since), if its log said so; for an
    /// adopted swtpm, whose log went with the vtpmd that started it, what
    /// that vtpmd recorded.
    pub fn store_failure(&self) -> Option<String> {
        self.log
            .as_ref()
            .and_then(LogReader::store_failure)
            .or_else(|| self.recorded_store_failure.clone())
    }

    /// Calls `hook` (once, from the log reader's thread) when swtpm says
    /// it could not store its state; at once if it has said so already.
    pub fn on_store_failure(&self, hook: super::log::StoreFailureHook) {
        if let Some(log) = &self.log {
            log.on_store_failure(hook);
        }
    }

    /// The control connection made before swtpm started, if
    /// [`SpawnSpec::ready_probe`] asked for one (once).
    pub fn take_ready_probe(&mut self) -> Option<UnixStream> {
        self.ready_probe.take()
    }

    /// How it ended, if that has been observed already.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit
    }

    /// Reaps the child if it has exited, without blocking, and cleans up
    /// after it. An error is about reaping or cleanup; the exit itself is
    /// then still recorded ([`exit_reason`](Swtpm::exit_reason)).
    pub fn try_exit(&mut self) -> Result<Option<ExitReason>, SpawnError> {
        if self.exit.is_none() {
            let reason = match self.child.as_mut() {
                Some(child) => {
                    let status = child.try_wait().map_err(|source| SpawnError::Wait {
                        pid: self.pid,
                        source,
                    })?;
                    let Some(status) = status else {
                        return Ok(None);
                    };
                    ExitReason::from_status(status)
                }
                None => {
                    if !pidfd_exited(self.pidfd.as_fd()).map_err(|source| SpawnError::Wait {
                        pid: self.pid,
                        source,
                    })? {
                        return Ok(None);
                    }
                    ExitReason::Unknown
                }
            };
            self.exit = Some(reason);
            if let Some(log) = self.log.as_mut() {
                log.wait_eof(LOG_EOF_WAIT);
            }
            tracing::debug!(guest = %self.guest, pid = self.pid, "swtpm {reason}");
        }
        self.cleanup()?;
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the child to exit, sleeping in `poll(2)` on
    /// the pidfd; `Ok(None)` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitReason>, SpawnError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reason) = self.try_exit()? {
                return Ok(Some(reason));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Round up: a sub-millisecond rest must not become a busy loop.
            let millis = left.as_micros().div_ceil(1000);
            let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(SpawnError::Wait {
                        pid: self.pid,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// Stops swtpm: SIGTERM, up to `grace` for it to exit (swtpm exits 0,
    /// saving nothing it has not saved already), then SIGKILL. Reaps it and
    /// removes the control socket and `.lock`. A swtpm that has already
    /// exited just gets reaped and cleaned up.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitReason, SpawnError> {
        if let Some(reason) = self.try_exit()? {
            return Ok(reason);
        }
        self.signal(Signal::SIGTERM)?;
        if let Some(reason) = self.wait_exit(grace)? {
            return Ok(reason);
        }
        tracing::warn!(guest = %self.guest, pid = self.pid(),
            "swtpm ignored SIGTERM for {grace:?}; sending SIGKILL");
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(KILL_WAIT)?
            .ok_or(SpawnError::Unkillable { pid: self.pid() })
    }

    fn signal(&self, signal: Signal) -> Result<(), SpawnError> {
        if self.child.is_some() {
            // The child is not reaped yet (only this guard reaps), so the
            // pid still names it, even as a zombie.
            return send_signal(self.pid, signal, self.other_user);
        }
        // Adopted: someone else reaps it, so its pid could be reused once
        // it exits. Through the pidfd when it runs as vtpmd's uid; as its
        // own uid otherwise, after checking it still runs (a reused pid
        // would need a process of that uid, which is this guest's alone).
        match self.other_user {
            None => {
                pidfd_send_signal(self.pidfd.as_fd(), signal).map_err(|source| SpawnError::Signal {
                    pid: self.pid,
                    signal,
                    source,
                })
            }
            Some(_) => {
                if pidfd_exited(self.pidfd.as_fd()).unwrap_or(false) {
                    return Ok(());
                }
                send_signal(self.pid, signal, self.other_user)
            }
        }
    }

    fn cleanup(&mut self) -> Result<(), SpawnError> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        remove_own_socket(&self.ctrl_path, self.ctrl_id)?;
        remove_lock(&self.lock_path)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        // Never leave a zombie: stop a running child, reap an exited one.
        if let Err(e) = self.stop(DROP_GRACE) {
            tracing::warn!(guest = %self.guest, pid = self.pid(),
                "stopping swtpm on drop: {}", crate::error_chain::chain(&e));
        }
        // The log thread, if still running, ends by itself at EOF.
    }
}

/// Signals our child `pid`: directly when it runs as vtpmd's uid, else
/// through a helper that takes on its uid (`as_user`), as vtpmd has no
/// `CAP_KILL`. A zombie takes signals silently; ESRCH cannot happen before
/// the reap.
fn send_signal(pid: u32, signal: Signal, other_user: Option<(Uid, Gid)>) -> Result<(), SpawnError> {
    if let Some((uid, gid)) = other_user {
        return signal_as(uid, gid, pid, signal).map_err(|source| SpawnError::SignalAs {
            pid,
            signal,
            source,
        });
    }
    let raw = libc::pid_t::try_from(pid).map_err(|_| SpawnError::Signal {
        pid,
        signal,
        source: Errno::ESRCH,
    })?;
    kill(Pid::from_raw(raw), signal).map_err(|source| SpawnError::Signal {
        pid,
        signal,
        source,
    })
}

/// Binds the control socket, replacing a stale socket (never another kind
/// of file), and sets mode and owner on the path; with
/// [`SpawnSpec::ready_probe`], connects a client in between.
#[allow(clippy::type_complexity)]
fn bind_ctrl(
    spec: &SpawnSpec<'_>,
) -> Result<(UnixListener, (u64, u64), Option<UnixStream>), SpawnError> {
    let path = &spec.ctrl_socket;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| SpawnError::RemoveStaleSocket {
                path: path.clone(),
                source,
            })?;
        }
        Ok(_) => return Err(SpawnError::CtrlPathOccupied { path: path.clone() }),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SpawnError::BindCtrl {
                path: path.clone(),
                source,
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| SpawnError::BindCtrl {
        path: path.clone(),
        source,
    })?;
    // From here on a failure must not leave the fresh socket behind.
    let finish = || -> Result<((u64, u64), Option<UnixStream>), SpawnError> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(spec.socket_mode)).map_err(
            |source| SpawnError::ChmodCtrl {
                path: path.clone(),
                source,
            },
        )?;
        // While vtpmd still owns the socket: once it belongs to the guest's
        // uid and the VMM's group, vtpmd (without CAP_DAC_OVERRIDE) may not
        // connect any more. The connection waits in the backlog.
        let probe = if spec.ready_probe {
            Some(
                UnixStream::connect(path).map_err(|source| SpawnError::BindCtrl {
                    path: path.clone(),
                    source,
                })?,
            )
        } else {
            None
        };
        if let Some((uid, gid)) = spec.socket_owner {
            std::os::unix::fs::lchown(path, Some(uid.as_raw()), Some(gid.as_raw())).map_err(
                |e| SpawnError::ChownCtrl {
                    path: path.clone(),
                    source: io_to_nix(&e),
                },
            )?;
        }
        let meta = std::fs::symlink_metadata(path).map_err(|source| SpawnError::BindCtrl {
            path: path.clone(),
            source,
        })?;
        Ok(((meta.dev(), meta.ino()), probe))
    };
    match finish() {
        Ok((id, probe)) => Ok((listener, id, probe)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// A pipe holding the key as lowercase hex, write end already closed.
fn key_pipe(key: &SecretBuf) -> Result<OwnedFd, SpawnError> {
    let hex = hex_secret(key)?;
    let (read, write) = pipe("key pipe")?;
    let mut write = File::from(write);
    write
        .write_all(hex.expose_secret())
        .map_err(SpawnError::WriteKey)?;
    Ok(read)
}

/// Lowercase hex of `key`, encoded straight into locked memory with no
/// data-dependent branch or table lookup.
fn hex_secret(key: &SecretBuf) -> Result<SecretBuf, SpawnError> {
    let bytes = key.expose_secret();
    let mut hex = SecretBuf::zeroed(bytes.len() * 2)?;
    for (pair, byte) in hex.expose_secret_mut().chunks_exact_mut(2).zip(bytes) {
        pair[0] = hex_digit(byte >> 4);
        pair[1] = hex_digit(byte & 0x0f);
    }
    Ok(hex)
}

fn hex_digit(nibble: u8) -> u8 {
    // 1 if nibble > 9 (9 - nibble wraps to >= 0xf6), else 0.
    let letter = 9u8.wrapping_sub(nibble) >> 7;
    b'0' + nibble + letter * (b'a' - b'0' - 10)
}

fn pipe(what: &'static str) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|source| SpawnError::Fd { what, source })
}

fn dup_high(fd: BorrowedFd<'_>, what: &'static str) -> Result<OwnedFd, SpawnError> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD))
        .map_err(|source| SpawnError::Fd { what, source })?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn io_to_nix(e: &std::io::Error) -> nix::Error {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// The child's own set-up between the clone and exec, after its uid and
/// gid are switched: its fixed fds, then its restrictions.
fn child_setup(setup: &vfork::Setup) -> std::io::Result<()> {
    place_fds(&setup.fds, setup.cloexec_flag)?;
    restrict_child()
}

/// Runs in the child between the clone and exec: places each source fd at its
/// target number (dup2 leaves the copy without CLOEXEC, so it survives exec)
/// and marks every higher fd CLOEXEC, in case vtpmd inherited some fd
/// without the flag. Async-signal-safe: two syscalls, no allocation.
fn place_fds(fds: &[(RawFd, RawFd); 3], cloexec_flag: libc::c_int) -> std::io::Result<()> {
    let mut above = CTRL_FD;
    for &(src, dst) in fds {
        if src < 0 {
            continue;
        }
        above = above.max(dst);
        // SAFETY: dup2 on two plain integers; `src` is open in the child
        // (inherited from vtpmd) and `dst` is overwritten by design.
        if unsafe { libc::dup2(src, dst) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Best effort: without close_range (Linux < 5.11) every fd vtpmd opens
    // itself is CLOEXEC anyway.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on fds
    // above the last one placed; it closes nothing, so the exec-error
    // pipe stays open.
    let _ = unsafe { libc::close_range(above.unsigned_abs() + 1, libc::c_uint::MAX, cloexec_flag) };
    Ok(())
}

/// Runs in the child after `place_fds`: umask 022 (vtpmd's own is 077), so
/// swtpm's state files get exactly `--tpmstate mode=`; no new privileges,
/// so nothing swtpm could exec gains any (setuid bits and file
/// capabilities are ignored); and detached from vtpmd, whose restart or
/// crash must not end a guest's TPM: its own session (no signal for
/// vtpmd's process group or terminal reaches it) and SIGPIPE ignored
/// (the child's handlers were reset to the default before this runs; a log pipe without a
/// reader must not kill it). Async-signal-safe: four syscalls, no
/// allocation.
fn restrict_child() -> std::io::Result<()> {
    // SAFETY: umask(2) takes an integer and cannot fail.
    unsafe { libc::umask(0o022) };
    // SAFETY: setsid(2) takes nothing; a fresh child is never a group
    // leader, so it cannot fail with EPERM.
    if unsafe { libc::setsid() } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signal(2) with SIG_IGN installs no handler code.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the process behind `pidfd` has exited (the pidfd is readable),
/// without waiting.
fn pidfd_exited(pidfd: BorrowedFd<'_>) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: Signal) -> nix::Result<()> {
    let sig = signal as libc::c_int;
    let null: *const libc::siginfo_t = std::ptr::null();
    let flags: libc::c_uint = 0;
    // SAFETY: pidfd_send_signal(2) with a pidfd we hold open, a signal
    // number, a null siginfo (the kernel fills in a default) and no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            null,
            flags,
        )
    };
    if ret < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// The log pipe, its write end (swtpm's) non-blocking: swtpm outlives
/// vtpmd, and with nobody reading a full pipe must cost swtpm a log line,
/// never a blocked TPM command. (It also ignores SIGPIPE, so a pipe whose
/// reader is gone is an error for its write, not its death.)
fn log_pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let (read, write) = pipe("log pipe")?;
    let flags = fcntl(write.as_fd(), FcntlArg::F_GETFL).map_err(|source| SpawnError::Fd {
        what: "log pipe",
        source,
    })?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(write.as_fd(), FcntlArg::F_SETFL(flags)).map_err(|source| SpawnError::Fd {
        what: "log pipe",
        source,
    })?;
    Ok((read, write))
}

pub(super) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))?;
    let flags: libc::c_uint = 0;
    // SAFETY: pidfd_open(2) takes a pid and flags, no pointers; it returns
    // a new CLOEXEC fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| std::io::Error::from(ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes the freshly bound control socket when `spawn` fails part-way.
struct SocketGuard<'p> {
    path: &'p Path,
    id: (u64, u64),
    armed: bool,
}

impl Drop for SocketGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove_own_socket(self.path, self.id);
        }
    }
}

/// Removes the control socket if it is still the inode vtpmd bound.
fn remove_own_socket(path: &Path, id: (u64, u64)) -> Result<(), SpawnError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == id => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SpawnError::Cleanup {
                path: path.to_owned(),
                source,
            });
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(SpawnError::Cleanup {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes swtpm's `.lock` unless another process holds a lock on it.
///
/// swtpm holds a POSIX write lock on `.lock` while it runs (taken at
/// CMD_INIT) and never unlinks it. vtpmd takes an open-file-description
/// write lock first, which conflicts with swtpm's: if it is granted nobody
/// uses the directory, and a new swtpm opening the file before the unlink
/// would fail on the lock we hold; after the unlink it makes a fresh file.
/// If vtpmd may not open the file (another uid, mode 0660), it is removed
/// without that check: the supervisor runs one swtpm per guest anyway.
fn remove_lock(path: &Path) -> Result<(), SpawnError> {
    let cleanup_err = |source| SpawnError::Cleanup {
        path: path.to_owned(),
        source,
    };
    let file = match crate::regular::open(path, crate::regular::Access::Write) {
        Ok(Some(file)) => Some(file),
        Ok(None) => return Ok(()),
        // Not vtpmd's to open (another uid, 0660), or not a regular file
        // (a guest may have put a FIFO there, which an open would wait on
        // forever): nothing can hold a lock on it that matters; remove it.
        Err(e) if e.kind() == ErrorKind::PermissionDenied => None,
        Err(e) if e.kind() == ErrorKind::InvalidData => None,
        Err(e) => return Err(cleanup_err(e)),
    };
    if let Some(file) = &file {
        let l_type = libc::c_short::try_from(libc::F_WRLCK)
            .map_err(|_| cleanup_err(std::io::Error::from(ErrorKind::InvalidInput)))?;
        let l_whence = libc::c_short::try_from(libc::SEEK_SET)
            .map_err(|_| cleanup_err(std::io::Error::from(ErrorKind::InvalidInput)))?;
        let lock = libc::flock {
            l_type,
            l_whence,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        match fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&lock)) {
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EACCES) => {
                tracing::debug!(path = %path.display(), "another process holds the swtpm lock; left in place");
                return Ok(());
            }
            Err(e) => return Err(cleanup_err(e.into())),
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(cleanup_err(e)),
        _ => Ok(()),
    }
    // `file` (and our lock) is closed here, after the unlink.
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hex_digits_cover_all_nibbles() {
        let digits: Vec<u8> = (0..16).map(hex_digit).collect();
        assert_eq!(digits, b"0123456789abcdef");
    }

    #[test]
    fn hex_secret_encodes_every_byte() {
        let mut key = SecretBuf::zeroed(4).unwrap();
        key.expose_secret_mut()
            .copy_from_slice(&[0x00, 0x9f, 0xa0, 0xff]);
        let hex = hex_secret(&key).unwrap();
        assert_eq!(hex.expose_secret(), b"009fa0ff");
    }

    #[test]
    fn exit_reason_from_status() {
        assert_eq!(
            ExitReason::from_status(ExitStatus::from_raw(1 << 8)),
            ExitReason::Exited(1)
        );
        assert_eq!(
            ExitReason::from_status(ExitStatus::from_raw(9)),
            ExitReason::Signaled(Signal::SIGKILL)
        );
    }
}
