//! Spawning and tracking one `swtpm socket` per guest.
//!
//! The order is fixed and each step is commented where it matters:
//!
//! 1. [`SpawnSpec::validate`] checks every path and value before anything
//!    touches the system (absolute, no comma, socket path < 108 bytes, state
//!    directory present, 32-byte key).
//! 2. vtpmd binds the control socket itself, sets its mode and owner, and
//!    hands swtpm the listening fd (`--ctrl type=unixio,fd=3`): the socket is
//!    connectable the moment [`spawn`] returns, with no polling, and nobody
//!    else can take the path over.
//! 3. The state key travels as hex through a pipe (`--key fd=4`), the only
//!    copy outside swtpm living in a [`SecretBuf`](crate::secret::SecretBuf);
//!    swtpm's stdout and stderr, where it logs, go to one pipe that a thread
//!    reads into `tracing`, keeping a tail for error reports.
//! 4. The child starts with an empty environment, `/dev/null` on stdin, only
//!    fds 0–4, the requested uid/gid (no supplementary groups; switching
//!    from root to another uid clears every capability), umask 022 and
//!    `PR_SET_NO_NEW_PRIVS`; a pidfd is opened for it at once. It is
//!    started without copying vtpmd's address space (`vfork`-style, as
//!    `posix_spawn` does): a fork's cost grows with vtpmd's mappings,
//!    and so with its running guests.
//! 5. A short wait on the pidfd catches swtpm exiting straight away (bad
//!    option, missing state directory) and turns it into
//!    [`SpawnError::Exited`] carrying swtpm's own message.
//!
//! [`Swtpm`] then tracks the process: exit is seen through the pidfd without
//! polling, [`Swtpm::stop`] is SIGTERM, a grace period, SIGKILL, and every
//! way out reaps the child and removes the control socket and the state
//! directory's `.lock`. A swtpm running as another uid is signalled through
//! a short-lived helper that takes on its uid ([`signal_as`]), so vtpmd
//! needs no `CAP_KILL`.

mod adopt;
mod as_user;
mod child;
mod log;
pub(crate) mod procfs;
mod spec;
mod vfork;

pub use adopt::{AdoptError, Adoption, adopt};
pub use as_user::{AsUserError, listening_as, signal_as};
pub use child::{ExitReason, Swtpm};
pub use log::StoreFailureHook;
pub use spec::{SpawnSpec, SpecError};

use std::path::PathBuf;

use crate::protocol::GuestId;
use crate::secret::SecretError;

/// The fd number swtpm finds its listening control socket on.
pub const CTRL_FD: i32 = 3;
/// The fd number swtpm reads the hex state key from (to EOF; swtpm closes
/// it after reading).
pub const KEY_FD: i32 = 4;
/// The fd number swtpm reads the hex migration key from, the same way.
pub const MIGRATION_KEY_FD: i32 = 5;

/// Everything that can go wrong starting or stopping swtpm.
///
/// Variants are named for the operation that failed and carry the path or
/// pid it failed on; the cause is a `#[source]`. None carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("invalid swtpm spawn request")]
    InvalidSpec(#[from] SpecError),
    #[error("{path} exists and is not a socket; refusing to replace it")]
    CtrlPathOccupied { path: PathBuf },
    #[error("cannot remove the stale control socket {path}")]
    RemoveStaleSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the control socket {path}")]
    BindCtrl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the mode of the control socket {path}")]
    ChmodCtrl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot change the owner of the control socket {path}")]
    ChownCtrl {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot set up the {what} for swtpm")]
    Fd {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot hand the state key to swtpm")]
    WriteKey(#[source] std::io::Error),
    #[error("secret memory for the hex state key")]
    Secret(#[from] SecretError),
    #[error("cannot execute {binary}")]
    Exec {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a pidfd for swtpm (pid {pid})")]
    PidfdOpen {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the log reader thread for swtpm of guest {guest}")]
    LogThread {
        guest: GuestId,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "swtpm of guest {guest} {reason} right after start{}",
        last_line(log_tail)
    )]
    Exited {
        guest: GuestId,
        reason: ExitReason,
        /// swtpm's last log lines (stderr included), oldest first.
        log_tail: Vec<String>,
    },
    #[error("cannot wait for swtpm (pid {pid})")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send {signal} to swtpm (pid {pid})")]
    Signal {
        pid: u32,
        signal: nix::sys::signal::Signal,
        #[source]
        source: nix::Error,
    },
    #[error("cannot send {signal} to swtpm (pid {pid})")]
    SignalAs {
        pid: u32,
        signal: nix::sys::signal::Signal,
        #[source]
        source: AsUserError,
    },
    #[error("swtpm (pid {pid}) is still running after SIGKILL")]
    Unkillable { pid: u32 },
    #[error("cannot remove {path} after swtpm exited")]
    Cleanup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn last_line(tail: &[String]) -> String {
    tail.last().map(|l| format!(": {l}")).unwrap_or_default()
}

pub use child::spawn;
