//! On-disk and runtime layout: where every file of vtpmd lives, with which
//! mode and owner, and how plaintext runtime directories are wiped.
//!
//! ```text
//! <state_dir>/                      0700  vtpmd           persistent (disk)
//! <state_dir>/guests/               0700  vtpmd
//! <state_dir>/guests/<uuid>/        0700  vtpmd
//! <state_dir>/guests/<uuid>/tpm.sealed       0600  current generation
//! <state_dir>/guests/<uuid>/tpm.sealed.prev  0600  previous generation
//! <state_dir>/guests/<uuid>/owner            0600  `uid=N`: the guest's swtpm uid (gid = uid)
//! <state_dir>/ca/                   0700  vtpmd           local CA (swtpm::provision::LocalCa)
//! <state_dir>/host.key               0600  vtpmd           this host's X25519 key (vault::HostKey)
//! <state_dir>/tickets.used          0600  vtpmd           nonces of the migration tickets taken, until they expire
//! <runtime_dir>/                    0711  vtpmd           RAM (/run/vtpmd): search only
//! <runtime_dir>/<uuid>/             0770  vtpmd:guest gid       swtpm's state dir while running
//! <runtime_dir>/<uuid>/<file>       0644  guest uid:guest gid   swtpm's (encrypted) state files
//! <runtime_dir>/<uuid>/.lock        0660  vtpmd:guest gid       swtpm's lock, laid by vtpmd
//! <runtime_dir>/<uuid>.sock         socket_mode (0660), guest uid:socket_group: ctrl socket
//! <runtime_dir>/<uuid>.create/      0700  vtpmd           swtpm_setup's target during Create
//! ```
//!
//! The runtime directory is 0711 so that the VMM (another user, in the
//! socket's group) and swtpm (another user) can reach their one entry
//! without being able to list the others; each of its ancestors must be
//! searchable by others too ([`Store::check_reachable`]).
//!
//! A guest's runtime directory belongs to vtpmd and to the guest's gid,
//! 0770: its swtpm works in it through the group bits, nobody else (other
//! guests' swtpm included) may even pass through it, and vtpmd as its owner
//! watches it with inotify, reads the state for resealing and unlinks it
//! when wiping, with no `CAP_DAC_OVERRIDE` or `CAP_DAC_READ_SEARCH`. Behind
//! that gate the state files may be 0644 (`--tpmstate mode=0644`, swtpm's
//! umask 022): vtpmd reads the files swtpm writes through the "other" bits.
//! vtpmd lays `.lock` itself (its own, group-writable), so it can still take
//! the lock to tell whether a swtpm is alive. No setgid bit is needed, so
//! systemd's `RestrictSUIDSGID=yes` can stay on. When swtpm runs as vtpmd's
//! own user (vtpmd is not root), the directory is 0700 and the files 0600.
//!
//! The store holds no key: it only knows paths, modes and owners. Guest
//! ids are canonical UUIDs ([`GuestId`]), so every path built here is free
//! of `/`, `,` and `..`.

#![forbid(unsafe_code)]

mod daemon_lock;
mod lock;
mod run_record;
mod wipe;

use std::fs::{self, DirBuilder};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::Gid;

use crate::protocol::GuestId;
use crate::vault::SealedPaths;

pub use daemon_lock::DaemonLock;
pub use lock::{InUse, in_use};
pub use run_record::RunRecord;
pub use wipe::{hand_over_entries, is_mount_point, lay_lock, remove_socket, wipe_dir};

/// Name of the sealed file in a guest's directory.
pub const SEALED_FILE: &str = "tpm.sealed";
/// Name of the file recording a guest's swtpm uid, in its guest directory.
pub const OWNER_FILE: &str = "owner";
/// Mode of private directories.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a guest's runtime directory (vtpmd's, the guest's group): rwx
/// for both, nothing for anyone else.
pub const GUEST_RUNTIME_DIR_MODE: u32 = 0o770;
/// Mode of a guest's state files (the guest's uid and gid): vtpmd reads
/// them as "other"; the directory keeps everyone else out.
pub const GUEST_STATE_FILE_MODE: u32 = 0o644;
/// Mode of the `.lock` vtpmd lays for a guest's swtpm.
pub const GUEST_LOCK_MODE: u32 = 0o660;
/// The longest owner record read (`uid=4294967294\n` is 15 bytes).
const MAX_OWNER_RECORD: u64 = 64;
/// Mode of the runtime root: search for all, listing and writing for vtpmd.
pub const RUNTIME_ROOT_MODE: u32 = 0o711;
/// `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// Length of a canonical guest id.
const GUEST_ID_LEN: usize = 36;
const SOCKET_SUFFIX: &str = ".sock";
const RUN_SUFFIX: &str = ".run";
/// The daemon's lock, in the state directory.
const DAEMON_LOCK_FILE: &str = "vtpmd.lock";
const CREATE_SUFFIX: &str = ".create";

/// Everything that can go wrong laying out or cleaning vtpmd's files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{field} {path:?} must be an absolute path")]
    NotAbsolute { field: &'static str, path: PathBuf },
    #[error("{field} {path:?} contains a comma, which swtpm's option syntax cannot carry")]
    Comma { field: &'static str, path: PathBuf },
    #[error(
        "control sockets under {path:?} would be {len} bytes long; at most {MAX_SOCKET_PATH} fit: choose a shorter runtime directory"
    )]
    RuntimeDirTooLong { path: PathBuf, len: usize },
    #[error("cannot fsync directory {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory owned by uid {expected} (owner {owner})")]
    NotOurs {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("cannot set the mode of {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot change the owner of {path}")]
    Chown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has {links} hard links; refusing to hand it over")]
    HardLinked { path: PathBuf, links: u64 },
    #[error("cannot read directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a {expected}; refusing to touch it")]
    Unexpected {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{path} is in use by a live swtpm{}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { path: PathBuf, holder: Option<i32> },
    #[error(
        "{path} (mode {mode:#o}) is not searchable by others: swtpm, running as a guest's own uid, could not reach the runtime directory below it"
    )]
    NotSearchable { path: PathBuf, mode: u32 },
    #[error("cannot read the owner record {path}")]
    ReadOwner {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the owner record {path} is not `uid=N`")]
    BadOwnerRecord { path: PathBuf },
    #[error("cannot write the owner record {path}")]
    WriteOwner {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the run record {path}")]
    WriteRunRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the run record {path}")]
    ReadRunRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the run record {path} is not a vtpmd run record")]
    BadRunRecord { path: PathBuf },
    #[error("cannot lock the state directory through {path}")]
    LockStateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another vtpmd{} runs on this state directory (it holds {path})",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    StateDirLocked { path: PathBuf, holder: Option<i32> },
}

/// What the scan of the runtime directory found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEntry {
    /// `<uuid>/`: a guest's plaintext-state directory.
    StateDir(GuestId),
    /// `<uuid>.sock`: a control socket.
    Socket(GuestId),
    /// `<uuid>.create/`: a provisioning directory.
    CreateDir(GuestId),
    /// `<uuid>.run`: the record of a swtpm vtpmd started.
    RunRecord(GuestId),
    /// Anything else: left alone.
    Unknown(PathBuf),
}

/// vtpmd's two roots and the paths under them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    state_dir: PathBuf,
    runtime_dir: PathBuf,
}

impl Store {
    /// Checks the roots (absolute, no comma, sockets short enough); touches
    /// nothing.
    pub fn new(state_dir: &Path, runtime_dir: &Path) -> Result<Self, StoreError> {
        for (field, path) in [("state_dir", state_dir), ("runtime_dir", runtime_dir)] {
            if !path.is_absolute() {
                return Err(StoreError::NotAbsolute {
                    field,
                    path: path.to_owned(),
                });
            }
        }
        if runtime_dir.as_os_str().as_encoded_bytes().contains(&b',') {
            return Err(StoreError::Comma {
                field: "runtime_dir",
                path: runtime_dir.to_owned(),
            });
        }
        let len = runtime_dir.as_os_str().len() + 1 + GUEST_ID_LEN + CREATE_SUFFIX.len();
        if len > MAX_SOCKET_PATH {
            return Err(StoreError::RuntimeDirTooLong {
                path: runtime_dir.to_owned(),
                len,
            });
        }
        Ok(Self {
            state_dir: state_dir.to_owned(),
            runtime_dir: runtime_dir.to_owned(),
        })
    }

    /// Creates the roots with their modes (parents too), tightening the
    /// mode of an existing root that is vtpmd's, refusing one that is not.
    pub fn init(&self) -> Result<(), StoreError> {
        ensure_dir(&self.state_dir, PRIVATE_DIR_MODE, true)?;
        ensure_dir(&self.guests_dir(), PRIVATE_DIR_MODE, false)?;
        ensure_dir(&self.runtime_dir, RUNTIME_ROOT_MODE, true)
    }

    /// Checks that every ancestor of the runtime directory is searchable by
    /// others (`o+x`), as swtpm running under a guest's uid must pass
    /// through them (`/run` is 0755; a private temporary directory is
    /// not). The runtime directory itself is 0711 by [`init`](Self::init).
    pub fn check_reachable(&self) -> Result<(), StoreError> {
        for dir in self.runtime_dir.ancestors().skip(1) {
            let meta = fs::metadata(dir).map_err(|source| StoreError::ReadDir {
                path: dir.to_owned(),
                source,
            })?;
            if meta.mode() & 0o001 == 0 {
                return Err(StoreError::NotSearchable {
                    path: dir.to_owned(),
                    mode: meta.mode() & 0o7777,
                });
            }
        }
        Ok(())
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    pub fn guests_dir(&self) -> PathBuf {
        self.state_dir.join("guests")
    }

    /// Where the local CA lives.
    /// This host's identity (`vault::HostKey`): made on first start, never
    /// replaced.
    pub fn host_key_path(&self) -> PathBuf {
        self.state_dir.join("host.key")
    }

    /// The nonces of the migration tickets taken (`vault::UsedTickets`).
    pub fn used_tickets_path(&self) -> PathBuf {
        self.state_dir.join("tickets.used")
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    pub fn guest_dir(&self, guest: GuestId) -> PathBuf {
        self.guests_dir().join(guest.to_string())
    }

    /// Where the guest's swtpm uid is recorded.
    pub fn owner_file(&self, guest: GuestId) -> PathBuf {
        self.guest_dir(guest).join(OWNER_FILE)
    }

    /// The guest's recorded swtpm uid; `None` if there is no record (a
    /// guest created before per-guest uids, or by a vtpmd not running as
    /// root).
    pub fn read_owner(&self, guest: GuestId) -> Result<Option<u32>, StoreError> {
        use std::io::Read;
        let path = self.owner_file(guest);
        let read_err = |source| StoreError::ReadOwner {
            path: path.clone(),
            source,
        };
        let Some(file) =
            crate::regular::open(&path, crate::regular::Access::Read).map_err(read_err)?
        else {
            return Ok(None);
        };
        let mut text = String::new();
        file.take(MAX_OWNER_RECORD)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        parse_owner(&text)
            .map(Some)
            .ok_or(StoreError::BadOwnerRecord { path })
    }

    /// Records the guest's swtpm uid: `uid=N` in a temporary file, fsync,
    /// rename over `owner`, fsync of the directory.
    pub fn write_owner(&self, guest: GuestId, uid: u32) -> Result<(), StoreError> {
        use std::io::Write;
        let path = self.owner_file(guest);
        let tmp = self.guest_dir(guest).join(format!("{OWNER_FILE}.tmp"));
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::WriteOwner { path, source }
        };
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(write_err(&tmp)(e)),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(write_err(&tmp))?;
        file.write_all(format!("uid={uid}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(write_err(&path))?;
        fs::File::open(self.guest_dir(guest))
            .and_then(|d| d.sync_all())
            .map_err(write_err(&path))
    }

    /// Takes the daemon's exclusive lock on the state directory (call after
    /// [`init`](Self::init)); held until the returned guard is dropped.
    pub fn lock_daemon(&self) -> Result<DaemonLock, StoreError> {
        daemon_lock::lock(&self.state_dir.join(DAEMON_LOCK_FILE))
    }

    /// Where the run record of the guest's swtpm lives.
    pub fn run_record_path(&self, guest: GuestId) -> PathBuf {
        self.runtime_dir.join(format!("{guest}{RUN_SUFFIX}"))
    }

    /// Records the guest's running swtpm for a later vtpmd.
    pub fn write_run_record(&self, guest: GuestId, record: &RunRecord) -> Result<(), StoreError> {
        run_record::write(&self.run_record_path(guest), record)
    }

    /// Adds swtpm's lost write to the guest's run record, in place: the
    /// runtime file system may be the full one that made swtpm fail.
    pub fn record_lost_write(&self, guest: GuestId, line: &str) -> Result<(), StoreError> {
        run_record::append_lost_write(&self.run_record_path(guest), line)
    }

    /// The recorded swtpm of the guest, if any.
    pub fn read_run_record(&self, guest: GuestId) -> Result<Option<RunRecord>, StoreError> {
        run_record::read(&self.run_record_path(guest))
    }

    pub fn remove_run_record(&self, guest: GuestId) -> Result<(), StoreError> {
        run_record::remove(&self.run_record_path(guest))
    }

    pub fn sealed_paths(&self, guest: GuestId) -> SealedPaths {
        SealedPaths::new(self.guest_dir(guest).join(SEALED_FILE))
    }

    /// swtpm's plaintext-state directory while the guest runs.
    pub fn runtime_state_dir(&self, guest: GuestId) -> PathBuf {
        self.runtime_dir.join(guest.to_string())
    }

    pub fn ctrl_socket(&self, guest: GuestId) -> PathBuf {
        self.runtime_dir.join(format!("{guest}{SOCKET_SUFFIX}"))
    }

    /// swtpm_setup's target directory during Create.
    pub fn create_dir(&self, guest: GuestId) -> PathBuf {
        self.runtime_dir.join(format!("{guest}{CREATE_SUFFIX}"))
    }

    /// The guest directories under `guests/` (invalid names are logged and
    /// skipped: they are not vtpmd's).
    pub fn list_guests(&self) -> Result<Vec<GuestId>, StoreError> {
        let dir = self.guests_dir();
        let mut guests = Vec::new();
        for entry in read_dir(&dir)? {
            let (name, path) = entry;
            match GuestId::parse(&name) {
                Ok(id) if path.is_dir() && !is_symlink(&path) => guests.push(id),
                _ => tracing::warn!(path = %path.display(), "not a guest directory; ignored"),
            }
        }
        guests.sort();
        Ok(guests)
    }

    /// Creates `guests/<uuid>/` (0700), durably: `guests/` is fsynced, so
    /// the files fsynced in it later cannot be lost with a directory entry
    /// that never reached the disk. An existing empty directory (left by
    /// an interrupted Create or Delete) is reused; anything else is
    /// [`StoreError::Unexpected`].
    pub fn create_guest_dir(&self, guest: GuestId) -> Result<PathBuf, StoreError> {
        let path = self.guest_dir(guest);
        match DirBuilder::new().mode(PRIVATE_DIR_MODE).create(&path) {
            Ok(()) => {
                self.sync_guests_dir()?;
                Ok(path)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let empty = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir())
                    && read_dir(&path)?.is_empty();
                if empty {
                    Ok(path)
                } else {
                    Err(StoreError::Unexpected {
                        path,
                        expected: "empty directory",
                    })
                }
            }
            Err(source) => Err(StoreError::CreateDir { path, source }),
        }
    }

    fn sync_guests_dir(&self) -> Result<(), StoreError> {
        let path = self.guests_dir();
        fs::File::open(&path)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Sync { path, source })
    }

    /// Removes `guests/<uuid>/` with its owner record if nothing else is
    /// in it (the vault removed the sealed files); a directory with other
    /// files in it is left alone and logged.
    pub fn remove_guest_dir(&self, guest: GuestId) -> Result<(), StoreError> {
        let path = self.guest_dir(guest);
        for name in [OWNER_FILE, "owner.tmp"] {
            let file = path.join(name);
            match fs::remove_file(&file) {
                Err(e) if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                    return Err(StoreError::Remove {
                        path: file,
                        source: e,
                    });
                }
                _ => {}
            }
        }
        match fs::remove_dir(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
                tracing::warn!(path = %path.display(), "guest directory holds foreign files; left in place");
                Ok(())
            }
            Err(source) => Err(StoreError::Remove { path, source }),
        }
    }

    /// A fresh private directory at `path`: whatever was there is wiped
    /// first, unless a live swtpm uses it ([`StoreError::InUse`]). Without
    /// `group` it is vtpmd's, 0700; with `group` (a guest's gid) it is
    /// vtpmd's and that group's, [`GUEST_RUNTIME_DIR_MODE`] (0770; the
    /// group changed with `CAP_CHOWN`).
    pub fn fresh_private_dir(
        &self,
        path: &Path,
        socket: Option<&Path>,
        group: Option<Gid>,
    ) -> Result<(), StoreError> {
        if let InUse::Yes { holder } = in_use(path, socket) {
            return Err(StoreError::InUse {
                path: path.to_owned(),
                holder,
            });
        }
        wipe_dir(path)?;
        // A guest's own tmpfs from an earlier run stays (emptied), to be
        // used again.
        if !is_mount_point(path) {
            DirBuilder::new()
                .mode(PRIVATE_DIR_MODE)
                .create(path)
                .map_err(|source| StoreError::CreateDir {
                    path: path.to_owned(),
                    source,
                })?;
        }
        // The umask may have narrowed it; make it exact.
        let mode = match group {
            Some(_) => GUEST_RUNTIME_DIR_MODE,
            None => PRIVATE_DIR_MODE,
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
            StoreError::Chmod {
                path: path.to_owned(),
                source,
            }
        })?;
        if let Some(gid) = group {
            std::os::unix::fs::lchown(path, None, Some(gid.as_raw())).map_err(|source| {
                StoreError::Chown {
                    path: path.to_owned(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// What lies in the runtime directory (after a crash: leftovers).
    pub fn scan_runtime(&self) -> Result<Vec<RuntimeEntry>, StoreError> {
        let mut found = Vec::new();
        for (name, path) in read_dir(&self.runtime_dir)? {
            let meta = fs::symlink_metadata(&path).ok();
            let is_dir = meta.as_ref().is_some_and(|m| m.is_dir());
            let is_socket = meta.as_ref().is_some_and(|m| m.file_type().is_socket());
            let entry = if let Some(id) = name
                .strip_suffix(SOCKET_SUFFIX)
                .and_then(|n| GuestId::parse(n).ok())
                .filter(|_| is_socket)
            {
                RuntimeEntry::Socket(id)
            } else if let Some(id) = name
                .strip_suffix(CREATE_SUFFIX)
                .and_then(|n| GuestId::parse(n).ok())
                .filter(|_| is_dir)
            {
                RuntimeEntry::CreateDir(id)
            } else if let Some(id) = name
                .strip_suffix(RUN_SUFFIX)
                .and_then(|n| GuestId::parse(n).ok())
            {
                RuntimeEntry::RunRecord(id)
            } else if let Some(id) = GuestId::parse(&name).ok().filter(|_| is_dir) {
                RuntimeEntry::StateDir(id)
            } else {
                RuntimeEntry::Unknown(path)
            };
            found.push(entry);
        }
        Ok(found)
    }
}

/// `(name, path)` of every entry of `dir` whose name is UTF-8.
fn read_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let err = |source| StoreError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        match entry.file_name().into_string() {
            Ok(name) => out.push((name, entry.path())),
            Err(name) => {
                tracing::warn!(dir = %dir.display(), name = ?name, "entry with a non-UTF-8 name ignored");
            }
        }
    }
    Ok(out)
}

/// `uid=N` with an optional final newline, N a decimal uid other than 0
/// and `u32::MAX`.
fn parse_owner(text: &str) -> Option<u32> {
    let digits = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .strip_prefix("uid=")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u32>()
        .ok()
        .filter(|&uid| uid != 0 && uid != u32::MAX)
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Creates `path` with `mode` if missing; an existing one must be a
/// directory owned by vtpmd's effective uid and gets exactly `mode`.
fn ensure_dir(path: &Path, mode: u32, parents: bool) -> Result<(), StoreError> {
    match DirBuilder::new().recursive(parents).mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(StoreError::CreateDir {
                path: path.to_owned(),
                source,
            });
        }
    }
    let meta = fs::symlink_metadata(path).map_err(|source| StoreError::CreateDir {
        path: path.to_owned(),
        source,
    })?;
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != euid {
        return Err(StoreError::NotOurs {
            path: path.to_owned(),
            owner: meta.uid(),
            expected: euid,
        });
    }
    if meta.mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
            StoreError::Chmod {
                path: path.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn init_creates_the_roots_with_their_modes() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(&root.path().join("state"), &root.path().join("run")).unwrap();
        store.init().unwrap();
        assert_eq!(mode(store.state_dir()), 0o700);
        assert_eq!(mode(&store.guests_dir()), 0o700);
        assert_eq!(mode(store.runtime_dir()), 0o711);
        // An existing loose root is tightened.
        fs::set_permissions(store.state_dir(), fs::Permissions::from_mode(0o755)).unwrap();
        store.init().unwrap();
        assert_eq!(mode(store.state_dir()), 0o700);
    }

    #[test]
    fn bad_roots_are_refused_before_anything_is_touched() {
        assert!(matches!(
            Store::new(Path::new("state"), Path::new("/run/vtpmd")),
            Err(StoreError::NotAbsolute { .. })
        ));
        assert!(matches!(
            Store::new(Path::new("/var/lib/vtpmd"), Path::new("/run/a,b")),
            Err(StoreError::Comma { .. })
        ));
        let long = PathBuf::from(format!("/{}", "r".repeat(70)));
        assert!(matches!(
            Store::new(Path::new("/var/lib/vtpmd"), &long),
            Err(StoreError::RuntimeDirTooLong { .. })
        ));
    }

    #[test]
    fn paths_follow_the_layout() {
        let store = Store::new(Path::new("/var/lib/vtpmd"), Path::new("/run/vtpmd")).unwrap();
        let g = GuestId::parse(GUEST).unwrap();
        assert_eq!(
            store.sealed_paths(g).current(),
            Path::new(&format!("/var/lib/vtpmd/guests/{GUEST}/tpm.sealed"))
        );
        assert_eq!(
            store.ctrl_socket(g),
            Path::new(&format!("/run/vtpmd/{GUEST}.sock"))
        );
        assert_eq!(
            store.runtime_state_dir(g),
            Path::new(&format!("/run/vtpmd/{GUEST}"))
        );
        assert_eq!(store.ca_dir(), Path::new("/var/lib/vtpmd/ca"));
    }

    #[test]
    fn a_fresh_private_dir_replaces_leftovers_and_is_0700() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(&root.path().join("state"), &root.path().join("run")).unwrap();
        store.init().unwrap();
        let g = GuestId::parse(GUEST).unwrap();
        let dir = store.runtime_state_dir(g);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("tpm2-00.permall"), b"old").unwrap();
        store.fresh_private_dir(&dir, None, None).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn a_guest_runtime_dir_is_0770_with_its_lock() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(&root.path().join("state"), &root.path().join("run")).unwrap();
        store.init().unwrap();
        let g = GuestId::parse(GUEST).unwrap();
        let dir = store.runtime_state_dir(g);
        let gid = nix::unistd::getegid();
        store.fresh_private_dir(&dir, None, Some(gid)).unwrap();
        assert_eq!(mode(&dir), 0o770);
        lay_lock(&dir, gid).unwrap();
        assert_eq!(mode(&dir.join(".lock")), 0o660);
        assert!(lay_lock(&dir, gid).is_err(), "an existing .lock is refused");
    }

    #[test]
    fn the_owner_record_round_trips_and_bad_ones_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(&root.path().join("state"), &root.path().join("run")).unwrap();
        store.init().unwrap();
        let g = GuestId::parse(GUEST).unwrap();
        store.create_guest_dir(g).unwrap();
        assert_eq!(store.read_owner(g).unwrap(), None);
        store.write_owner(g, 1_879_048_193).unwrap();
        assert_eq!(store.read_owner(g).unwrap(), Some(1_879_048_193));
        assert_eq!(mode(&store.owner_file(g)), 0o600);
        for bad in [
            "",
            "uid=",
            "uid=0\n",
            "uid=-1",
            "uid=12x",
            "gid=5\n",
            "uid=99999999999",
        ] {
            fs::write(store.owner_file(g), bad).unwrap();
            assert!(
                matches!(store.read_owner(g), Err(StoreError::BadOwnerRecord { .. })),
                "{bad:?}"
            );
        }
        // Delete takes the record with the directory.
        store.remove_guest_dir(g).unwrap();
        assert!(!store.guest_dir(g).exists());
    }

    #[test]
    fn a_private_ancestor_of_the_runtime_dir_is_named() {
        let root = tempfile::tempdir().unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let store = Store::new(&root.path().join("state"), &root.path().join("run")).unwrap();
        store.init().unwrap();
        match store.check_reachable() {
            Err(StoreError::NotSearchable { path, mode }) => {
                assert_eq!(path, root.path());
                assert_eq!(mode, 0o700);
            }
            other => panic!("{other:?}"),
        }
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o711)).unwrap();
        store.check_reachable().unwrap();
    }

    #[test]
    fn the_runtime_scan_names_what_it_finds() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(&root.path().join("state"), &root.path().join("run")).unwrap();
        store.init().unwrap();
        let g = GuestId::parse(GUEST).unwrap();
        fs::create_dir(store.runtime_state_dir(g)).unwrap();
        fs::create_dir(store.create_dir(g)).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(store.ctrl_socket(g)).unwrap();
        fs::write(store.runtime_dir().join("other"), b"").unwrap();
        let mut found = store.scan_runtime().unwrap();
        found.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(found.len(), 4);
        assert!(found.contains(&RuntimeEntry::StateDir(g)));
        assert!(found.contains(&RuntimeEntry::CreateDir(g)));
        assert!(found.contains(&RuntimeEntry::Socket(g)));
        assert!(found.contains(&RuntimeEntry::Unknown(store.runtime_dir().join("other"))));
    }

    #[test]
    fn an_empty_guest_dir_is_reused_a_full_one_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(&root.path().join("state"), &root.path().join("run")).unwrap();
        store.init().unwrap();
        let g = GuestId::parse(GUEST).unwrap();
        let dir = store.create_guest_dir(g).unwrap();
        assert_eq!(mode(&dir), 0o700);
        store.create_guest_dir(g).unwrap();
        fs::write(dir.join(SEALED_FILE), b"x").unwrap();
        assert!(matches!(
            store.create_guest_dir(g),
            Err(StoreError::Unexpected { .. })
        ));
        assert_eq!(store.list_guests().unwrap(), [g]);
    }
}
