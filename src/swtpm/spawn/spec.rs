//! [`SpawnSpec`]: what to spawn, checked before anything is touched.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Gid, Uid};

use super::{CTRL_FD, KEY_FD, MIGRATION_KEY_FD};
use crate::protocol::{GuestId, TpmVersion};
use crate::secret::SecretBuf;

/// Length of the AES-256 state key in bytes.
pub const KEY_LEN: usize = 32;

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// One swtpm to start: the input of [`spawn`](super::spawn).
///
/// Build it with [`SpawnSpec::new`] (secure defaults) and adjust the public
/// fields; [`SpawnSpec::validate`] (called by `spawn` first) checks it.
pub struct SpawnSpec<'k> {
    /// The swtpm binary, absolute (the child's environment is empty, so
    /// there is no `PATH` to search).
    pub swtpm: PathBuf,
    pub version: TpmVersion,
    /// Only used to label log lines and errors.
    pub guest: GuestId,
    /// The plaintext-state directory (`--tpmstate dir=`): absolute, no
    /// comma, must exist and be writable by `run_as`.
    pub state_dir: PathBuf,
    /// Where vtpmd binds the control socket: absolute, no comma, at most
    /// [`MAX_SOCKET_PATH`] bytes. A stale *socket* there is replaced; any
    /// other file is refused.
    pub ctrl_socket: PathBuf,
    /// Permission bits of the control socket (default `0o660`).
    pub socket_mode: u32,
    /// Owner and group of the control socket; `None` leaves vtpmd's.
    pub socket_owner: Option<(Uid, Gid)>,
    /// The user and group swtpm runs as; `None` runs it as vtpmd's. Setting
    /// it also drops all supplementary groups (std does `setgroups(0)`).
    /// A swtpm of another uid is signalled through
    /// [`signal_as`](super::signal_as).
    pub run_as: Option<(Uid, Gid)>,
    /// The mode swtpm creates its state files with (`--tpmstate mode=`,
    /// default `0o600`); `0o644` lets vtpmd read them when swtpm runs as
    /// another uid in a directory (0770, vtpmd and the guest's group) that
    /// keeps everyone else out. swtpm's umask is 022.
    pub state_mode: u32,
    /// Connect one client to the control socket before its owner is
    /// changed and before swtpm exists (the connection waits in the
    /// backlog and swtpm accepts it first); take it with
    /// [`Swtpm::take_ready_probe`](super::Swtpm::take_ready_probe). This is
    /// how vtpmd checks that swtpm serves a socket it may no longer connect
    /// to itself (owned by the guest's uid and the VMM's group).
    pub ready_probe: bool,
    /// Pass `--seccomp action=kill`. Set it only when the probe saw
    /// `cmdarg-seccomp`; a swtpm built with seccomp applies its default
    /// profile (kill) even without the option.
    pub seccomp: bool,
    /// swtpm's `--log level=` (1 = errors and notices, 20 = hex dumps).
    pub log_level: u8,
    /// Pass `--terminate`: swtpm exits when the VMM's data channel closes.
    pub terminate: bool,
    /// How many of swtpm's output lines go to vtpmd's log; the guest
    /// drives what swtpm says, so unlimited it could flood the journal.
    pub log_rate: crate::log_limit::Rate,
    /// The 32-byte state key; handed over as hex through a pipe.
    pub key: &'k SecretBuf,
    /// The 32-byte key swtpm encrypts the state blobs it hands out with
    /// (`--migration-key`), so that a VMM's migration stream never carries
    /// TPM state in plaintext; the destination's swtpm needs the same key.
    /// Handed over like `key`. `None`: the blobs are plaintext.
    pub migration_key: Option<&'k SecretBuf>,
    /// How long `spawn` waits on the pidfd for an immediate exit (bad
    /// option, missing directory) before returning. Success costs this
    /// whole time; failures are usually seen within a few milliseconds.
    pub early_exit_window: Duration,
}

/// A rule a [`SpawnSpec`] breaks. Comparable, so tests can assert the
/// exact variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the {field} {path:?} is not an absolute path")]
    NotAbsolute { field: &'static str, path: PathBuf },
    #[error("the {field} {path:?} contains a comma, which swtpm's option syntax cannot carry")]
    Comma { field: &'static str, path: PathBuf },
    #[error("the control socket path {path:?} is {len} bytes; at most {MAX_SOCKET_PATH} fit")]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("the state directory {path:?} does not exist or is not a directory")]
    StateDirMissing { path: PathBuf },
    #[error("a key for swtpm is {len} bytes; AES-256 needs {KEY_LEN}")]
    KeyLength { len: usize },
    #[error("socket mode {mode:#o} has bits outside 0o777")]
    SocketMode { mode: u32 },
    #[error("state file mode {mode:#o} has bits outside 0o666")]
    StateMode { mode: u32 },
}

impl<'k> SpawnSpec<'k> {
    /// A spec with the defaults: socket mode 0660 owned by vtpmd, swtpm run
    /// as vtpmd's user, `--seccomp action=kill`, log level 1,
    /// `--terminate`, a 50 ms early-exit window.
    pub fn new(
        swtpm: impl Into<PathBuf>,
        version: TpmVersion,
        guest: GuestId,
        state_dir: impl Into<PathBuf>,
        ctrl_socket: impl Into<PathBuf>,
        key: &'k SecretBuf,
    ) -> Self {
        SpawnSpec {
            swtpm: swtpm.into(),
            version,
            guest,
            state_dir: state_dir.into(),
            ctrl_socket: ctrl_socket.into(),
            socket_mode: 0o660,
            socket_owner: None,
            run_as: None,
            state_mode: 0o600,
            ready_probe: false,
            seccomp: true,
            log_level: 1,
            terminate: true,
            log_rate: crate::log_limit::Rate::default(),
            key,
            migration_key: None,
            early_exit_window: Duration::from_millis(50),
        }
    }

    /// Checks every rule; the only I/O is a `stat` of the state directory.
    pub fn validate(&self) -> Result<(), SpecError> {
        absolute("swtpm binary", &self.swtpm)?;
        absolute("state directory", &self.state_dir)?;
        no_comma("state directory", &self.state_dir)?;
        absolute("control socket", &self.ctrl_socket)?;
        no_comma("control socket", &self.ctrl_socket)?;
        let len = self.ctrl_socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(SpecError::SocketPathTooLong {
                path: self.ctrl_socket.clone(),
                len,
            });
        }
        if self.socket_mode & !0o777 != 0 {
            return Err(SpecError::SocketMode {
                mode: self.socket_mode,
            });
        }
        if self.state_mode & !0o666 != 0 {
            return Err(SpecError::StateMode {
                mode: self.state_mode,
            });
        }
        for key in std::iter::once(self.key).chain(self.migration_key) {
            if key.len() != KEY_LEN {
                return Err(SpecError::KeyLength { len: key.len() });
            }
        }
        if !self.state_dir.is_dir() {
            return Err(SpecError::StateDirMissing {
                path: self.state_dir.clone(),
            });
        }
        Ok(())
    }

    /// swtpm's arguments (after the binary), for fds placed at
    /// [`CTRL_FD`] and [`KEY_FD`]. Contains no secret: the key is only
    /// named by its fd. No `--server` (the VMM hands the data channel over
    /// with CMD_SET_DATAFD), no `--flags` (the VMM sends INIT), no
    /// `--daemon`, `--pid` or `--runas` (vtpmd tracks and sets those).
    ///
    /// The log goes to stderr (`--log level=N`, no `fd=`): swtpm 0.7.1's
    /// `log_init_fd` first does `close(2)` (its "console" log fd), so with
    /// `--log fd=N` fd 2 is free and swtpm's next pipe or socket lands on
    /// it, where any stray write to stderr would end up. (That is likely
    /// the cause of the `--daemon` + `--log fd=` failure in the notes:
    /// daemonizing points 0–2 at /dev/null, over whatever sits on fd 2.)
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["socket".into()];
        if self.version == TpmVersion::V2_0 {
            args.push("--tpm2".into());
        }
        let mut state = b"dir=".to_vec();
        state.extend_from_slice(self.state_dir.as_os_str().as_bytes());
        state.extend_from_slice(format!(",mode={:04o}", self.state_mode).as_bytes());
        args.push("--tpmstate".into());
        args.push(OsString::from_vec(state));
        args.push("--ctrl".into());
        args.push(format!("type=unixio,fd={CTRL_FD}").into());
        args.push("--key".into());
        args.push(format!("fd={KEY_FD},format=hex,mode=aes-256-cbc").into());
        if self.migration_key.is_some() {
            args.push("--migration-key".into());
            args.push(format!("fd={MIGRATION_KEY_FD},format=hex,mode=aes-256-cbc").into());
        }
        args.push("--log".into());
        args.push(format!("level={}", self.log_level).into());
        if self.seccomp {
            args.push("--seccomp".into());
            args.push("action=kill".into());
        }
        if self.terminate {
            args.push("--terminate".into());
        }
        args
    }
}

impl std::fmt::Debug for SpawnSpec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpawnSpec")
            .field("swtpm", &self.swtpm)
            .field("version", &self.version)
            .field("guest", &self.guest)
            .field("state_dir", &self.state_dir)
            .field("ctrl_socket", &self.ctrl_socket)
            .field("socket_mode", &format_args!("{:#o}", self.socket_mode))
            .field("socket_owner", &self.socket_owner)
            .field("run_as", &self.run_as)
            .field("state_mode", &format_args!("{:#o}", self.state_mode))
            .field("ready_probe", &self.ready_probe)
            .field("seccomp", &self.seccomp)
            .field("log_level", &self.log_level)
            .field("terminate", &self.terminate)
            .field("key", &self.key)
            .field("early_exit_window", &self.early_exit_window)
            .finish()
    }
}

fn absolute(field: &'static str, path: &Path) -> Result<(), SpecError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(SpecError::NotAbsolute {
            field,
            path: path.to_owned(),
        })
    }
}

fn no_comma(field: &'static str, path: &Path) -> Result<(), SpecError> {
    if OsStr::as_bytes(path.as_os_str()).contains(&b',') {
        Err(SpecError::Comma {
            field,
            path: path.to_owned(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn guest() -> GuestId {
        GuestId::parse("6f1c2e7a-1b2c-4d3e-8f90-0123456789ab").unwrap()
    }

    fn spec<'k>(key: &'k SecretBuf, dir: &Path) -> SpawnSpec<'k> {
        SpawnSpec::new(
            "/usr/bin/swtpm",
            TpmVersion::V2_0,
            guest(),
            dir,
            dir.join("ctrl.sock"),
            key,
        )
    }

    #[test]
    fn default_spec_is_valid_and_argv_names_only_fds() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s = spec(&key, dir.path());
        s.validate().unwrap();
        let args: Vec<String> = s
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let expected_state = format!("dir={},mode=0600", dir.path().display());
        assert_eq!(
            args,
            [
                "socket",
                "--tpm2",
                "--tpmstate",
                expected_state.as_str(),
                "--ctrl",
                "type=unixio,fd=3",
                "--key",
                "fd=4,format=hex,mode=aes-256-cbc",
                "--log",
                "level=1",
                "--seccomp",
                "action=kill",
                "--terminate",
            ]
        );
    }

    #[test]
    fn tpm12_without_seccomp_or_terminate_drops_those_flags() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&key, dir.path());
        s.version = TpmVersion::V1_2;
        s.seccomp = false;
        s.terminate = false;
        let args = s.args();
        for flag in ["--tpm2", "--seccomp", "--terminate"] {
            assert!(!args.iter().any(|a| a == flag), "{flag} present");
        }
    }

    #[test]
    fn comma_in_state_dir_is_refused() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("a,b");
        std::fs::create_dir(&bad).unwrap();
        let mut s = spec(&key, dir.path());
        s.state_dir = bad.clone();
        assert_eq!(
            s.validate(),
            Err(SpecError::Comma {
                field: "state directory",
                path: bad
            })
        );
    }

    #[test]
    fn comma_in_socket_path_is_refused() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&key, dir.path());
        s.ctrl_socket = PathBuf::from("/run/a,b.sock");
        assert!(matches!(s.validate(), Err(SpecError::Comma { .. })));
    }

    #[test]
    fn relative_paths_are_refused() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&key, dir.path());
        s.swtpm = PathBuf::from("swtpm");
        assert_eq!(
            s.validate(),
            Err(SpecError::NotAbsolute {
                field: "swtpm binary",
                path: PathBuf::from("swtpm")
            })
        );
        let mut s = spec(&key, dir.path());
        s.ctrl_socket = PathBuf::from("ctrl.sock");
        assert!(matches!(
            s.validate(),
            Err(SpecError::NotAbsolute {
                field: "control socket",
                ..
            })
        ));
    }

    #[test]
    fn socket_path_of_108_bytes_is_refused_107_accepted() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&key, dir.path());
        s.ctrl_socket = PathBuf::from(format!("/{}", "a".repeat(107)));
        assert_eq!(
            s.validate(),
            Err(SpecError::SocketPathTooLong {
                path: s.ctrl_socket.clone(),
                len: 108
            })
        );
        s.ctrl_socket = PathBuf::from(format!("/{}", "a".repeat(106)));
        s.validate().unwrap();
    }

    #[test]
    fn missing_state_dir_is_refused() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&key, dir.path());
        s.state_dir = dir.path().join("nope");
        assert!(matches!(
            s.validate(),
            Err(SpecError::StateDirMissing { .. })
        ));
    }

    #[test]
    fn short_key_is_refused() {
        let key = SecretBuf::random(16).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            spec(&key, dir.path()).validate(),
            Err(SpecError::KeyLength { len: 16 })
        );
    }

    #[test]
    fn socket_mode_beyond_permission_bits_is_refused() {
        let key = SecretBuf::random(KEY_LEN).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&key, dir.path());
        s.socket_mode = 0o4770;
        assert_eq!(s.validate(), Err(SpecError::SocketMode { mode: 0o4770 }));
    }
}
