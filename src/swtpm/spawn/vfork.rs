//! Starting swtpm without copying vtpmd's address space.
//!
//! `fork(2)` copies the page tables of every mapping vtpmd has, and the
//! child's `execve` then tears that copy down again; in between, every page
//! either side writes is copied. vtpmd's mappings grow with its guests
//! (each running guest keeps a log thread's stack and its secret regions),
//! so with 256 running a fork cost several milliseconds of CPU, paid again
//! for every Start: a host reboot's mass start paid it n times over.
//!
//! This is what `posix_spawn` does instead: `clone(CLONE_VM | CLONE_VFORK)`
//! runs the child in vtpmd's memory, on a stack of its own, while the
//! calling thread waits until the child has called `execve` (or exited).
//! `posix_spawn` itself cannot be used: it cannot switch uid and gid, set
//! the umask or `PR_SET_NO_NEW_PRIVS`, or place fds by `dup2` on fds that
//! are already open in the parent without races against other spawns.
//!
//! The child shares vtpmd's memory, so until `execve` it may only make
//! system calls on data prepared before the clone: no allocation, no lock,
//! no write to anything the parent uses. In particular:
//! - uid, gid and groups change through the raw system calls: glibc's
//!   wrappers would signal every thread of the process sharing the memory
//!   (its `setxid` broadcast), that is vtpmd's threads;
//! - every signal is blocked in the calling thread across the clone, and
//!   the child resets each handler vtpmd installed to the default before
//!   it unblocks them: a handler of vtpmd's must not run in the child;
//! - what fails is reported as an errno through a close-on-exec pipe, and
//!   the child ends with `_exit`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use nix::libc;
use nix::unistd::{Gid, Uid};

/// The child's stack until `execve`: a handful of system calls need far
/// less. A guard page below it turns an overflow into a fault rather than
/// a write into vtpmd's heap.
const STACK_LEN: usize = 64 * 1024;
const GUARD_LEN: usize = 4096;
/// Signals 1 to 64 (Linux's `_NSIG` on every architecture vtpmd runs on).
const LAST_SIGNAL: libc::c_int = 64;

/// What the child does between the clone and `execve`, prepared in full
/// before the clone.
pub(super) struct Exec {
    program: CString,
    /// Keeps the strings `argv` points into.
    _args: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: [*const libc::c_char; 1],
    /// Placed on 0, 1 and 2.
    stdio: [RawFd; 3],
    /// Switched to (gid, groups cleared, uid), if any.
    ids: Option<(Uid, Gid)>,
    /// The rest of the child's set-up, run after the switch (async-signal-
    /// safe: system calls on its own values only).
    setup: fn(&Setup) -> io::Result<()>,
    setup_arg: Setup,
}

/// The argument of [`Exec`]'s set-up function.
#[derive(Clone, Copy)]
pub(super) struct Setup {
    pub(super) fds: [(RawFd, RawFd); 3],
    pub(super) cloexec_flag: libc::c_int,
}

impl Exec {
    /// `program` run with `args`, an empty environment, `/` as its working
    /// directory and `stdio` on fds 0-2.
    pub(super) fn new(
        program: &Path,
        args: &[std::ffi::OsString],
        stdio: [RawFd; 3],
        ids: Option<(Uid, Gid)>,
        setup: fn(&Setup) -> io::Result<()>,
        setup_arg: Setup,
    ) -> io::Result<Exec> {
        let nul = |_| io::Error::from(io::ErrorKind::InvalidInput);
        let program = CString::new(program.as_os_str().as_bytes()).map_err(nul)?;
        let mut owned = Vec::with_capacity(args.len() + 1);
        owned.push(program.clone());
        for arg in args {
            owned.push(CString::new(arg.as_bytes()).map_err(nul)?);
        }
        let mut argv: Vec<*const libc::c_char> = owned.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        Ok(Exec {
            program,
            _args: owned,
            argv,
            envp: [std::ptr::null()],
            stdio,
            ids,
            setup,
            setup_arg,
        })
    }
}

/// What the child runs on, and where it reports a failure.
struct Launch<'a> {
    exec: &'a Exec,
    error_fd: RawFd,
}

/// A child process started by [`spawn`]: only this handle reaps it.
#[derive(Debug)]
pub(super) struct Process {
    pid: libc::pid_t,
    status: Option<ExitStatus>,
}

impl Process {
    pub(super) fn id(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Reaps the child if it has exited, without blocking.
    pub(super) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    /// Waits for the child to exit and reaps it.
    pub(super) fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.wait_with(0)? {
                return Ok(status);
            }
        }
    }

    fn wait_with(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid status pointer.
            let ret = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
            if ret == self.pid {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                return Ok(Some(status));
            }
            if ret == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Starts `exec`'s program; returns once it runs (its `execve` succeeded),
/// or the errno of the step that failed (the child is reaped then).
pub(super) fn spawn(exec: &Exec) -> io::Result<Process> {
    // The child's error pipe, above the fds the child places (so no dup2
    // overwrites it) and close-on-exec (so a successful exec closes it).
    let (read, low) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let high = nix::fcntl::fcntl(
        &low,
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(super::child::HIGH_FD),
    )
    .map_err(io::Error::from)?;
    // Only the high copy may stay open: the read below sees EOF once the
    // child has exec'd only if no other write end is left.
    drop(low);
    // SAFETY: F_DUPFD_CLOEXEC just returned this fd; nothing else owns it.
    let write = unsafe { OwnedFd::from_raw_fd(high) };
    let launch = Launch {
        exec,
        error_fd: write.as_raw_fd(),
    };
    let stack = Stack::new()?;

    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut before = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset fills the set it is given; pthread_sigmask takes
    // two valid set pointers.
    let masked = unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), before.as_mut_ptr())
    };
    if masked != 0 {
        return Err(io::Error::from_raw_os_error(masked));
    }
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // SAFETY: the child runs `child_main` on its own stack (`stack`, which
    // outlives the clone: this thread is suspended until the child has
    // exec'd or exited) with a pointer to `launch`, alive as long; it makes
    // only system calls on data prepared above (see the module docs).
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.top(),
            flags,
            std::ptr::from_ref(&launch).cast_mut().cast(),
        )
    };
    let clone_error = (pid < 0).then(io::Error::last_os_error);
    // SAFETY: `before` was filled by pthread_sigmask above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, before.as_ptr(), std::ptr::null_mut()) };
    drop(stack);
    drop(write);
    if let Some(e) = clone_error {
        return Err(e);
    }
    let mut process = Process { pid, status: None };
    let mut errno = [0u8; 4];
    let got = read_full(&read, &mut errno)?;
    if got == errno.len() {
        // It failed before exec and has exited (or is about to): reap it.
        let _ = process.wait();
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok(process)
}

/// Reads until `buf` is full or EOF; the number of bytes read.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// The child's stack: an anonymous mapping with a guard page below it.
struct Stack {
    base: *mut libc::c_void,
}

impl Stack {
    fn new() -> io::Result<Stack> {
        // SAFETY: an anonymous private mapping of our own; nothing is
        // aliased. MAP_STACK documents its use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUARD_LEN + STACK_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base };
        // SAFETY: the lowest page of the mapping made above.
        if unsafe { libc::mprotect(base, GUARD_LEN, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// Where the child's stack starts (it grows down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        self.base
            .cast::<u8>()
            .wrapping_add(GUARD_LEN + STACK_LEN)
            .cast()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the child no
        // longer runs on it (it has exec'd or exited).
        unsafe { libc::munmap(self.base, GUARD_LEN + STACK_LEN) };
    }
}

/// The child, from the clone to `execve`. Never returns on success; on a
/// failure writes the errno to the error pipe and exits with 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Launch` the parent passed; it lives until the
    // clone returns there, which is after this process execs or exits.
    let launch = unsafe { &*arg.cast::<Launch<'_>>() };
    let errno = match child_steps(launch.exec) {
        Ok(()) => libc::EINVAL, // not reached: execve does not return on success
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
    };
    let bytes = errno.to_ne_bytes();
    // SAFETY: a write of 4 bytes from a local to the error pipe, then
    // _exit, which runs no atexit handler and flushes no stdio buffer of
    // vtpmd's.
    unsafe {
        libc::write(launch.error_fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// The child's steps, in std's order for a forked child: signals reset,
/// stdio placed, gid / groups / uid switched, `/` as working directory;
/// then `exec.setup`; then the signal mask emptied and `execve`.
fn child_steps(exec: &Exec) -> io::Result<()> {
    reset_signal_handlers();
    for (target, &source) in (0..).zip(&exec.stdio) {
        // SAFETY: dup2 on two plain integers.
        if unsafe { libc::dup2(source, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if let Some((uid, gid)) = exec.ids {
        // Raw system calls: glibc's setgid, setgroups and setuid would
        // signal every thread sharing this memory (vtpmd's) to switch too.
        // SAFETY: setgid(2) takes an integer.
        if unsafe { libc::syscall(libc::SYS_setgid, gid.as_raw()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // As std does: clearing the groups needs root; a vtpmd that is not
        // root keeps none it could drop.
        // SAFETY: setgroups(2) with a count of 0 reads no list.
        if unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(e);
            }
        }
        // SAFETY: setuid(2) takes an integer.
        if unsafe { libc::syscall(libc::SYS_setuid, uid.as_raw()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: chdir(2) with a NUL-terminated literal.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    (exec.setup)(&exec.setup_arg)?;
    let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset fills the set it is given; sigprocmask takes a
    // valid set pointer and no old-set pointer.
    unsafe {
        libc::sigemptyset(empty.as_mut_ptr());
        if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::execve(
            exec.program.as_ptr(),
            exec.argv.as_ptr(),
            exec.envp.as_ptr(),
        );
    }
    Err(io::Error::last_os_error())
}

/// Every signal whose handler is vtpmd's (not the default, not ignored)
/// gets the default action in the child: the handlers are code and data
/// of vtpmd's, in memory the child shares until `execve`. Ignored signals
/// stay ignored, as across any fork and exec.
fn reset_signal_handlers() {
    for signal in 1..=LAST_SIGNAL {
        let mut old = std::mem::MaybeUninit::<libc::sigaction>::uninit();
        // SAFETY: sigaction(2) reading the current action into `old`; a
        // signal that cannot be caught (or that glibc keeps for itself)
        // answers EINVAL, and is left alone.
        if unsafe { libc::sigaction(signal, std::ptr::null(), old.as_mut_ptr()) } != 0 {
            continue;
        }
        // SAFETY: sigaction succeeded, so it filled `old`.
        let handler = unsafe { old.assume_init() }.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            continue;
        }
        // SAFETY: an all-zero sigaction is SIG_DFL with no flags and an
        // empty mask.
        let default: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: sigaction(2) installing the default action.
        unsafe { libc::sigaction(signal, &default, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn no_setup(_: &Setup) -> io::Result<()> {
        Ok(())
    }

    fn fail_setup(_: &Setup) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    const SETUP: Setup = Setup {
        fds: [(-1, 3), (-1, 4), (-1, 5)],
        cloexec_flag: 0,
    };

    fn null_stdio() -> (OwnedFd, [RawFd; 3]) {
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fd = null.as_raw_fd();
        (null, [fd, fd, fd])
    }

    #[test]
    fn the_program_runs_with_its_arguments_and_its_status_is_reaped() {
        let (_null, stdio) = null_stdio();
        let args = ["-c".into(), "exit 7".into()];
        let exec = Exec::new(Path::new("/bin/sh"), &args, stdio, None, no_setup, SETUP).unwrap();
        let mut child = spawn(&exec).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(7));
        // Reaped once; the status stays.
        assert_eq!(child.try_wait().unwrap().unwrap().code(), Some(7));
    }

    #[test]
    fn a_missing_program_is_its_execs_errno() {
        let (_null, stdio) = null_stdio();
        let exec = Exec::new(
            Path::new("/nonexistent/vtpmd-test-binary"),
            &[],
            stdio,
            None,
            no_setup,
            SETUP,
        )
        .unwrap();
        let e = spawn(&exec).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }

    #[test]
    fn a_failed_setup_step_is_reported_and_nothing_runs() {
        let (_null, stdio) = null_stdio();
        let exec = Exec::new(Path::new("/bin/true"), &[], stdio, None, fail_setup, SETUP).unwrap();
        let e = spawn(&exec).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSUP), "{e}");
    }

    #[test]
    fn the_environment_is_empty_and_the_working_directory_is_root() {
        let dir = tempfile::tempdir().unwrap();
        let out: OwnedFd = std::fs::File::create(dir.path().join("out"))
            .unwrap()
            .into();
        let (_null, mut stdio) = null_stdio();
        stdio[1] = out.as_raw_fd();
        let args = ["-c".into(), "pwd; env | wc -l".into()];
        let exec = Exec::new(Path::new("/bin/sh"), &args, stdio, None, no_setup, SETUP).unwrap();
        assert!(spawn(&exec).unwrap().wait().unwrap().success());
        let text = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("/"));
        // sh itself sets PWD (and maybe SHLVL, _); nothing of ours.
        let vars: usize = lines.next().unwrap().trim().parse().unwrap();
        assert!(vars <= 3, "{text}");
    }
}
