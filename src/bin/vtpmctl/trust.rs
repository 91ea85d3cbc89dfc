//! Whether the socket vtpmctl is about to talk to is vtpmd's.
//!
//! A default socket path can be taken by someone else first: without
//! `XDG_RUNTIME_DIR` a user's default is `/tmp/vtpmd-<uid>/vtpmd.sock`, and
//! any other user can create that directory and listen there. Whoever
//! listens would be handed the passphrase of the next `start`. Two checks
//! stop that, with root and the caller's own uid as the only trusted
//! owners (vtpmd as a service runs as root, by hand as its user):
//!
//! - the path: the socket's directory belongs to a trusted uid and nobody
//!   else can write to it (else its owner, or anyone who can write there,
//!   can put or swap in a socket of their own), and the socket belongs to
//!   a trusted uid. This alone also refuses a redirection to some other
//!   root service's stream socket (e.g. a symbolic link planted in an
//!   attacker's directory pointing at journald's stdout socket, which would
//!   log the passphrase), which the peer check would let through.
//! - the peer: the process that listens on the connected socket
//!   (`SO_PEERCRED`, as the kernel recorded it at `listen`) runs as a
//!   trusted uid. This is what a race between the path check and
//!   `connect` cannot get around, and it is checked before any byte is
//!   written.
//!
//! Directories above the socket's are not checked: swapping one of them
//! leads only to another trusted directory or fails the peer check.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{Value, json};

/// Symbolic links followed to reach the socket; a socket path needs one
/// or two at most, and a loop must end.
const MAX_LINKS: usize = 8;

/// The uids trusted to run vtpmd: root and the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trusted {
    caller: u32,
}

impl Trusted {
    /// Root and this process's effective uid (the one the kernel checks,
    /// and the one the default socket path is computed from).
    pub fn current() -> Self {
        Self {
            caller: nix::unistd::geteuid().as_raw(),
        }
    }

    #[cfg(test)]
    pub fn caller(caller: u32) -> Self {
        Self { caller }
    }

    fn allows(self, uid: u32) -> bool {
        uid == 0 || uid == self.caller
    }

    fn uids(self) -> Vec<u32> {
        if self.caller == 0 {
            vec![0]
        } else {
            vec![0, self.caller]
        }
    }
}

impl std::fmt::Display for Trusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.caller == 0 {
            write!(f, "root (uid 0)")
        } else {
            write!(f, "root (uid 0) or you (uid {})", self.caller)
        }
    }
}

/// Why a socket is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "its directory {} belongs to uid {uid}, expected {expected}",
        dir.display()
    )]
    DirectoryOwner {
        dir: PathBuf,
        uid: u32,
        expected: Trusted,
    },
    #[error(
        "its directory {} is writable by {} (mode {mode:04o}), expected writable by its owner only",
        dir.display(),
        if mode & 0o002 != 0 { "others" } else { "its group" }
    )]
    DirectoryWritable { dir: PathBuf, mode: u32 },
    #[error("{} is not a directory", dir.display())]
    NotDirectory { dir: PathBuf },
    #[error("{} belongs to uid {uid}, expected {expected}", socket.display())]
    SocketOwner {
        socket: PathBuf,
        uid: u32,
        expected: Trusted,
    },
    #[error("{} is not a socket", path.display())]
    NotSocket { path: PathBuf },
    #[error("{} leads through more than {MAX_LINKS} symbolic links", path.display())]
    TooManyLinks { path: PathBuf },
    #[error("the process listening on it runs as uid {uid} (pid {pid}), expected {expected}")]
    Peer {
        uid: u32,
        pid: i32,
        expected: Trusted,
    },
}

impl TrustError {
    /// The `parameters` of the `--json` error: what was checked, what was
    /// found, what was expected.
    pub fn parameters(&self) -> Value {
        match self {
            Self::DirectoryOwner { dir, uid, expected } => json!({
                "check": "directory-owner",
                "path": text(dir),
                "uid": uid,
                "expected_uids": expected.uids(),
            }),
            Self::DirectoryWritable { dir, mode } => json!({
                "check": "directory-mode",
                "path": text(dir),
                "mode": format!("{mode:04o}"),
                "expected": "not writable by group or others",
            }),
            Self::NotDirectory { dir } => json!({"check": "directory-type", "path": text(dir)}),
            Self::SocketOwner {
                socket,
                uid,
                expected,
            } => json!({
                "check": "socket-owner",
                "path": text(socket),
                "uid": uid,
                "expected_uids": expected.uids(),
            }),
            Self::NotSocket { path } => json!({"check": "socket-type", "path": text(path)}),
            Self::TooManyLinks { path } => json!({"check": "symbolic-links", "path": text(path)}),
            Self::Peer { uid, pid, expected } => json!({
                "check": "peer-uid",
                "uid": uid,
                "pid": pid,
                "expected_uids": expected.uids(),
            }),
        }
    }
}

/// A path for JSON: serde refuses one that is not UTF-8, and a refusal
/// must still be reported.
fn text(path: &Path) -> String {
    path.display().to_string()
}

/// The path check failed, or the path could not be looked at.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error("cannot inspect {}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks `socket`'s directory and the socket itself, following symbolic
/// links one at a time so each link is judged by the directory it sits
/// in (a link is only as trustworthy as whoever could have placed it).
pub fn check_path(socket: &Path, trusted: Trusted) -> Result<(), PathError> {
    let mut path = socket.to_owned();
    for _ in 0..=MAX_LINKS {
        let dir = match path.parent() {
            Some(p) if p.as_os_str().is_empty() => Path::new("."),
            Some(p) => p,
            None => return Err(TrustError::NotSocket { path }.into()),
        };
        check_directory(dir, trusted)?;
        let meta = std::fs::symlink_metadata(&path).map_err(|source| PathError::Inspect {
            path: path.clone(),
            source,
        })?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|source| PathError::Inspect {
                path: path.clone(),
                source,
            })?;
            path = dir.join(target);
            continue;
        }
        if !kind.is_socket() {
            return Err(TrustError::NotSocket { path }.into());
        }
        if !trusted.allows(meta.uid()) {
            return Err(TrustError::SocketOwner {
                socket: path,
                uid: meta.uid(),
                expected: trusted,
            }
            .into());
        }
        return Ok(());
    }
    Err(TrustError::TooManyLinks {
        path: socket.to_owned(),
    }
    .into())
}

fn check_directory(dir: &Path, trusted: Trusted) -> Result<(), PathError> {
    // Followed: the directory the socket's name is looked up in is the
    // one whose owner and mode decide who can place that name.
    let meta = std::fs::metadata(dir).map_err(|source| PathError::Inspect {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(TrustError::NotDirectory {
            dir: dir.to_owned(),
        }
        .into());
    }
    if !trusted.allows(meta.uid()) {
        return Err(TrustError::DirectoryOwner {
            dir: dir.to_owned(),
            uid: meta.uid(),
            expected: trusted,
        }
        .into());
    }
    // The sticky bit does not help: it keeps others from removing the
    // socket, not from binding one under a name not taken yet.
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TrustError::DirectoryWritable {
            dir: dir.to_owned(),
            mode,
        }
        .into());
    }
    Ok(())
}

/// Why the peer check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error("cannot read the credentials of the process listening on the socket")]
    Credentials(#[source] nix::Error),
}

/// Checks who listens on the connected `stream`.
pub fn check_peer(stream: &UnixStream, trusted: Trusted) -> Result<(), PeerError> {
    let cred = getsockopt(stream, PeerCredentials).map_err(PeerError::Credentials)?;
    if trusted.allows(cred.uid()) {
        Ok(())
    } else {
        Err(TrustError::Peer {
            uid: cred.uid(),
            pid: cred.pid(),
            expected: trusted,
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn me() -> Trusted {
        Trusted::current()
    }

    #[test]
    fn a_private_directory_with_our_socket_passes_both_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        check_path(&path, me()).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        check_peer(&stream, me()).unwrap();
    }

    #[test]
    fn a_directory_others_or_the_group_can_write_is_refused_sticky_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        for mode in [0o777, 0o1777, 0o770, 0o730] {
            chmod(dir.path(), mode);
            match check_path(&path, me()) {
                Err(PathError::Untrusted(TrustError::DirectoryWritable { mode: m, .. })) => {
                    assert_eq!(m, mode);
                }
                other => panic!("{mode:o}: {other:?}"),
            }
        }
        chmod(dir.path(), 0o755);
        check_path(&path, me()).unwrap();

        // A name that is not UTF-8 is still reported, JSON included.
        use std::os::unix::ffi::OsStrExt;
        let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"\xff"));
        std::fs::create_dir(&odd).unwrap();
        let _odd_listener = UnixListener::bind(odd.join("s.sock")).unwrap();
        chmod(&odd, 0o777);
        match check_path(&odd.join("s.sock"), me()) {
            Err(PathError::Untrusted(e)) => {
                assert_eq!(e.parameters()["check"], "directory-mode");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn owners_other_than_root_and_the_caller_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let owner = nix::unistd::geteuid().as_raw();
        if owner != 0 {
            // Seen from another caller, a directory of ours is a stranger's.
            match check_path(&path, Trusted::caller(owner.wrapping_add(4242))) {
                Err(PathError::Untrusted(e @ TrustError::DirectoryOwner { .. })) => {
                    assert!(e.to_string().contains(&format!("uid {owner}")), "{e}");
                    assert_eq!(e.parameters()["uid"], owner);
                }
                other => panic!("{other:?}"),
            }
            return;
        }
        // As root: hand the socket, then the directory, to a stranger.
        let stranger = 65534;
        let give = |p: &Path| std::os::unix::fs::chown(p, Some(stranger), None).unwrap();
        give(&path);
        match check_path(&path, me()) {
            Err(PathError::Untrusted(e @ TrustError::SocketOwner { .. })) => {
                let text = e.to_string();
                assert!(text.contains("uid 65534, expected root (uid 0)"), "{text}");
                assert_eq!(e.parameters()["expected_uids"], json!([0]));
            }
            other => panic!("{other:?}"),
        }
        // The stranger's own call trusts its socket; root's directory too.
        check_path(&path, Trusted::caller(stranger)).unwrap();
        give(dir.path());
        assert!(matches!(
            check_path(&path, me()),
            Err(PathError::Untrusted(TrustError::DirectoryOwner {
                uid: 65534,
                ..
            }))
        ));
    }

    #[test]
    fn links_are_judged_by_the_directory_they_sit_in() {
        let trusted = tempfile::tempdir().unwrap();
        let real = trusted.path().join("s.sock");
        let _listener = UnixListener::bind(&real).unwrap();
        let link = trusted.path().join("link.sock");
        std::os::unix::fs::symlink("s.sock", &link).unwrap();
        check_path(&link, me()).unwrap();

        // The same link in a directory anyone may write to is anyone's.
        let open = tempfile::tempdir().unwrap();
        chmod(open.path(), 0o777);
        let planted = open.path().join("vtpmd.sock");
        std::os::unix::fs::symlink(&real, &planted).unwrap();
        assert!(matches!(
            check_path(&planted, me()),
            Err(PathError::Untrusted(TrustError::DirectoryWritable { .. }))
        ));

        let looped = trusted.path().join("loop.sock");
        std::os::unix::fs::symlink("loop.sock", &looped).unwrap();
        assert!(matches!(
            check_path(&looped, me()),
            Err(PathError::Untrusted(TrustError::TooManyLinks { .. }))
        ));
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_refused_and_a_missing_one_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            check_path(&file, me()),
            Err(PathError::Untrusted(TrustError::NotSocket { .. }))
        ));
        match check_path(&dir.path().join("missing.sock"), me()) {
            Err(PathError::Inspect { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peer_of_another_uid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let owner = nix::unistd::geteuid().as_raw();
        if owner == 0 {
            // Root's listener is trusted by every caller.
            check_peer(&stream, Trusted::caller(4242)).unwrap();
            return;
        }
        match check_peer(&stream, Trusted::caller(owner.wrapping_add(1))) {
            Err(PeerError::Untrusted(e @ TrustError::Peer { .. })) => {
                assert!(e.to_string().contains(&format!("uid {owner}")), "{e}");
                assert_eq!(e.parameters()["check"], "peer-uid");
            }
            other => panic!("{other:?}"),
        }
    }
}
