//! Running a short-lived helper (`swtpm --print-capabilities`, `swtpm_setup`)
//! with a deadline.
//!
//! The helper gets its own process group, so that whatever it spawns (for
//! swtpm_setup: an swtpm and swtpm_localca) is killed with it: on timeout,
//! and also after a normal exit, so that a crashed swtpm_setup cannot leave
//! an swtpm behind holding the state directory's lock. The group is killed
//! while the leader is still an unreaped zombie, so its id cannot have been
//! reused by then.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

/// At most this much of a helper's stdout or stderr is kept; the rest is
/// read and dropped so that the helper never blocks on a full pipe.
const OUTPUT_CAP: u64 = 1 << 20;

/// How the helper ended.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: ExitStatus,
    /// Empty unless stdout was captured.
    pub stdout: Vec<u8>,
    /// Empty unless stderr was captured.
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error("cannot start it")]
    Spawn(#[source] io::Error),
    #[error("cannot wait for it")]
    Wait(#[source] io::Error),
    #[error("it did not finish within {0:?} and was killed")]
    TimedOut(Duration),
}

/// Runs `cmd` to completion or until `timeout`, whichever comes first.
///
/// With `capture`, stdout and stderr are piped and returned (each capped at
/// 1 MiB); otherwise they are whatever `cmd` already says.
pub(crate) fn run(
    cmd: &mut Command,
    timeout: Duration,
    capture: bool,
) -> Result<Finished, RunError> {
    let started = Instant::now();
    let deadline = started + timeout;
    cmd.process_group(0);
    if capture {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let pgid = child_pgid(&child);

    let (tx, rx) = mpsc::channel();
    let mut readers = 0;
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, true, tx.clone());
        readers += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, false, tx);
        readers += 1;
    }

    let exited = wait_until(&child, deadline);
    // Leader exited (or is to be killed): take its whole group down before
    // reaping it. ESRCH only means nobody is left.
    let _ = killpg(pgid, Signal::SIGKILL);
    let status = child.wait().map_err(RunError::Wait)?;
    match exited {
        Ok(true) => {}
        Ok(false) => return Err(RunError::TimedOut(timeout)),
        Err(err) => return Err(RunError::Wait(err)),
    }

    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    for _ in 0..readers {
        // The group is dead, so the pipes are at EOF; the deadline is only
        // a guard against a descendant that left the group.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match rx.recv_timeout(left) {
            Ok((true, bytes)) => stdout = bytes,
            Ok((false, bytes)) => stderr = bytes,
            Err(_) => break,
        }
    }
    Ok(Finished {
        status,
        stdout,
        stderr,
        elapsed: started.elapsed(),
    })
}

fn child_pgid(child: &Child) -> Pid {
    // process_group(0) makes the child the leader of a group named after
    // its pid. Pids fit in i32 on Linux; the fallback is never used.
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// Whether the child exited before `deadline`, without reaping it.
fn wait_until(child: &Child, deadline: Instant) -> io::Result<bool> {
    let pid = child_pgid(child);
    let mut pause = Duration::from_millis(1);
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(io::Error::from(errno)),
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    is_stdout: bool,
    tx: mpsc::Sender<(bool, Vec<u8>)>,
) {
    thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = (&mut pipe).take(OUTPUT_CAP).read_to_end(&mut kept);
        let _ = io::copy(&mut pipe, &mut io::sink());
        let _ = tx.send((is_stdout, kept));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_are_returned() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let done = run(&mut cmd, Duration::from_secs(10), true).expect("runs");
        assert_eq!(done.status.code(), Some(3));
        assert_eq!(done.stdout, b"out\n");
        assert_eq!(done.stderr, b"err\n");
    }

    #[test]
    fn a_hung_child_and_its_children_are_killed_at_the_deadline() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let started = Instant::now();
        let err = run(&mut cmd, Duration::from_millis(200), true).expect_err("times out");
        assert!(matches!(err, RunError::TimedOut(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let mut cmd = Command::new("/nonexistent/vtpmd-test-binary");
        let err = run(&mut cmd, Duration::from_secs(1), true).expect_err("fails");
        assert!(matches!(err, RunError::Spawn(_)), "{err:?}");
    }
}
