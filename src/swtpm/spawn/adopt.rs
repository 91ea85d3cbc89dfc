//! Adopting a swtpm that an earlier vtpmd started and that outlived it.
//!
//! The pid comes from the run record the earlier vtpmd wrote; pids are
//! reused, so the process behind it must prove it is that swtpm before it
//! is trusted: a pidfd is opened first (it then names one process for
//! good), and only after that are its start time, uid, executable and state
//! directory read from `/proc`. A process that took over the pid before
//! the pidfd was opened shows a different start time; one that took it
//! over after that cannot be what the pidfd names.

use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

use super::child::{Swtpm, pidfd_open};
use super::procfs;
use crate::protocol::GuestId;

/// What the earlier vtpmd recorded about a swtpm, and what it must match.
#[derive(Debug, Clone)]
pub struct Adoption {
    pub guest: GuestId,
    pub pid: u32,
    /// Clock ticks since boot, as recorded at spawn.
    pub start_time: u64,
    /// The swtpm binary vtpmd runs: the process's `argv[0]`.
    pub swtpm: PathBuf,
    /// The guest's runtime directory: named in its `--tpmstate dir=`.
    pub state_dir: PathBuf,
    pub ctrl_socket: PathBuf,
    /// (st_dev, st_ino) of the control socket as bound.
    pub ctrl_id: (u64, u64),
    /// The guest's uid and gid when swtpm does not run as vtpmd's user.
    pub run_as: Option<(Uid, Gid)>,
    /// The line in which this swtpm said it could not store its state, as
    /// the vtpmd that read its log recorded it.
    pub store_failure: Option<String>,
}

/// Why a recorded swtpm cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("swtpm (pid {pid}) of guest {guest} is gone")]
    Gone { guest: GuestId, pid: u32 },
    #[error("pid {pid} is no longer guest {guest}'s swtpm: its {what} differs")]
    NotTheSame {
        guest: GuestId,
        pid: u32,
        what: &'static str,
    },
    #[error("cannot inspect pid {pid} of guest {guest}")]
    Inspect {
        guest: GuestId,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The recorded swtpm as a [`Swtpm`] guard (not a child: its exit is seen
/// on the pidfd, it is never reaped here), once it has proven to be it.
pub fn adopt(a: &Adoption) -> Result<Swtpm, AdoptError> {
    let (guest, pid) = (a.guest, a.pid);
    let gone = || AdoptError::Gone { guest, pid };
    let inspect = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            gone()
        } else {
            AdoptError::Inspect { guest, pid, source }
        }
    };
    let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(nix::libc::ESRCH) => gone(),
        _ => inspect(e),
    })?;
    let differs = |what| AdoptError::NotTheSame { guest, pid, what };
    if procfs::start_time(pid).map_err(inspect)? != a.start_time {
        return Err(differs("start time"));
    }
    let expected_uid = a
        .run_as
        .map_or_else(nix::unistd::getuid, |(uid, _)| uid)
        .as_raw();
    if procfs::uid(pid).map_err(inspect)? != expected_uid {
        return Err(differs("uid"));
    }
    let argv = procfs::cmdline(pid).map_err(inspect)?;
    if argv.first().map(Path::new) != Some(a.swtpm.as_path()) {
        return Err(differs("executable"));
    }
    if !names_state_dir(&argv, &a.state_dir) {
        return Err(differs("state directory"));
    }
    let other_user = a.run_as.filter(|(uid, _)| *uid != nix::unistd::geteuid());
    Ok(Swtpm::adopted(a, pidfd, other_user))
}

/// Whether `--tpmstate dir=<dir>,...` is among the arguments.
fn names_state_dir(argv: &[String], dir: &Path) -> bool {
    let Some(dir) = dir.to_str() else {
        return false;
    };
    argv.windows(2).any(|w| {
        w[0] == "--tpmstate"
            && w[1]
                .split(',')
                .any(|opt| opt.strip_prefix("dir=") == Some(dir))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_dir_is_matched_as_a_whole_option() {
        let argv: Vec<String> = ["swtpm", "socket", "--tpmstate", "dir=/run/v/a,mode=0644"]
            .map(String::from)
            .to_vec();
        assert!(names_state_dir(&argv, Path::new("/run/v/a")));
        assert!(!names_state_dir(&argv, Path::new("/run/v")));
        assert!(!names_state_dir(&argv, Path::new("/run/v/a,mode=0644")));
    }

    #[test]
    fn a_process_that_is_not_the_recorded_one_is_refused() {
        let me = std::process::id();
        let a = Adoption {
            guest: GuestId::from_bytes([7; 16]),
            pid: me,
            start_time: 1,
            swtpm: PathBuf::from("/usr/bin/swtpm"),
            state_dir: PathBuf::from("/nonexistent"),
            ctrl_socket: PathBuf::from("/nonexistent.sock"),
            ctrl_id: (0, 0),
            run_as: None,
            store_failure: None,
        };
        let err = adopt(&a).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("start time"), "{err}");
    }
}
