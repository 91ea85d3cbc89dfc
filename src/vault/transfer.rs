//! Moving a guest's sealed file between hosts (Export, Import) without any
//! key: what can be checked of a file without its passphrase is its
//! structure (`docs/sealed-format.md`, decoding steps 1 to 9) and whose it
//! is (step 10). The body stays ciphertext end to end; whether it opens is
//! only known at the next Start.

use std::path::Path;

use crate::protocol::GuestId;

use super::VaultError;
use super::durable::{self, SealedPaths};
use super::format::MAX_FILE_LEN;
use super::inspect::{HeaderInfo, inspect_bytes};

/// One sealed file as read from disk, with its checked header.
#[derive(Debug, Clone)]
pub struct SealedFile {
    pub bytes: Vec<u8>,
    pub header: HeaderInfo,
}

/// Steps 1 to 10 on `bytes` for guest `guest`; `path` names the file in
/// errors.
pub fn check_sealed(path: &Path, bytes: &[u8], guest: GuestId) -> Result<HeaderInfo, VaultError> {
    let header = inspect_bytes(path, bytes)?;
    if header.guest != guest {
        return Err(VaultError::GuestMismatch {
            path: path.to_owned(),
            expected: guest,
            found: header.guest,
        });
    }
    Ok(header)
}

/// Reads `path` (never following a symlink, never blocking on a FIFO) and
/// checks it as [`check_sealed`] does.
pub fn read_sealed(path: &Path, guest: GuestId) -> Result<SealedFile, VaultError> {
    let bytes = durable::read(path, MAX_FILE_LEN)?.ok_or_else(|| VaultError::Missing {
        path: path.to_owned(),
    })?;
    let header = check_sealed(path, &bytes, guest)?;
    Ok(SealedFile { bytes, header })
}

/// Where an imported file goes, decided by what the guest's files on this
/// host say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// No file of the guest here: the import is its first.
    New,
    /// The current file checks out: it becomes `<name>.prev`, as at every
    /// seal.
    Rotate,
    /// The current file is damaged, missing or not the guest's: it is
    /// replaced in place, so a damaged file never becomes `<name>.prev`
    /// and a sound `<name>.prev` is kept (the spec's rule after a
    /// fallback).
    ReplaceCurrent,
}

/// What the guest's files on this host hold, by header alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDisk {
    /// The current file's generation, if it passes steps 1 to 10.
    pub current: Option<u64>,
    /// The previous generation's, likewise.
    pub previous: Option<u64>,
    /// Whether anything at all is at either path.
    pub any_file: bool,
}

impl OnDisk {
    /// The newest generation this host holds of the guest that passes the
    /// header checks: what an import must exceed (no silent rollback, even
    /// to behind a damaged current file's sound `.prev`).
    pub fn newest(&self) -> Option<u64> {
        self.current.max(self.previous)
    }

    pub fn placement(&self) -> Placement {
        match (self.current, self.any_file) {
            (Some(_), _) => Placement::Rotate,
            (None, true) => Placement::ReplaceCurrent,
            (None, false) => Placement::New,
        }
    }
}

/// Reads the headers of both of the guest's files. An I/O error other
/// than a missing file (a FIFO planted at the path, EIO) is an error: an
/// import must not go ahead on a guess.
pub fn on_disk(paths: &SealedPaths, guest: GuestId) -> Result<OnDisk, VaultError> {
    let mut any_file = false;
    let mut generation = |path: &Path| match read_sealed(path, guest) {
        Ok(file) => {
            any_file = true;
            Ok(Some(file.header.generation))
        }
        Err(VaultError::Missing { .. }) => Ok(None),
        Err(e @ VaultError::Io { .. }) => Err(e),
        Err(_) => {
            any_file = true;
            Ok(None)
        }
    };
    let current = generation(paths.current())?;
    let previous = generation(paths.previous())?;
    Ok(OnDisk {
        current,
        previous,
        any_file,
    })
}

/// Writes `bytes` (already checked) as the guest's current file,
/// durably: temp file, fsync, rename, fsync of the directory, rotating
/// the current file to `<name>.prev` or not as `placement` says.
pub fn install(paths: &SealedPaths, bytes: &[u8], placement: Placement) -> Result<(), VaultError> {
    match placement {
        Placement::New | Placement::Rotate => durable::write_new_generation(paths, bytes),
        Placement::ReplaceCurrent => durable::replace(paths.current(), bytes),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::{TpmModel, TpmSpec, TpmVersion};
    use crate::secret::SecretBuf;
    use crate::vault::{KdfParams, KdfPolicy, SealedState, StateArchive};

    fn guest(n: u8) -> GuestId {
        GuestId::from_bytes([n; 16])
    }

    fn policy() -> KdfPolicy {
        KdfPolicy {
            params: KdfParams::new(64, 1, 1).unwrap(),
            allow_weak: true,
        }
    }

    fn pass() -> SecretBuf {
        let mut p = SecretBuf::with_capacity(4).unwrap();
        p.extend_from_slice(b"pass").unwrap();
        p
    }

    fn sealed(dir: &Path, id: GuestId, generations: u32) -> SealedPaths {
        let paths = SealedPaths::new(dir.join("tpm.sealed"));
        let spec = TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).unwrap();
        let archive =
            StateArchive::from_entries([("tpm2-00.permall".to_owned(), vec![1; 8])]).unwrap();
        let mut state =
            SealedState::create(paths.clone(), id, spec, &pass(), &policy(), &archive).unwrap();
        for _ in 1..generations {
            state.seal(&archive).unwrap();
        }
        paths
    }

    #[test]
    fn a_sound_file_is_read_with_its_generation_and_another_guests_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = sealed(dir.path(), guest(1), 3);
        let file = read_sealed(paths.current(), guest(1)).unwrap();
        assert_eq!(file.header.generation, 3);
        assert!(matches!(
            read_sealed(paths.current(), guest(2)),
            Err(VaultError::GuestMismatch { .. })
        ));
        let mut damaged = file.bytes.clone();
        damaged[30] ^= 1;
        assert!(matches!(
            check_sealed(paths.current(), &damaged, guest(1)),
            Err(VaultError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_damaged_current_file_is_replaced_in_place_and_the_newest_sound_one_counts() {
        let dir = tempfile::tempdir().unwrap();
        let paths = sealed(dir.path(), guest(1), 4);
        assert_eq!(
            on_disk(&paths, guest(1)).unwrap(),
            OnDisk {
                current: Some(4),
                previous: Some(3),
                any_file: true
            }
        );
        std::fs::write(paths.current(), b"VTPMSEAL garbage").unwrap();
        let seen = on_disk(&paths, guest(1)).unwrap();
        assert_eq!(seen.newest(), Some(3));
        assert_eq!(seen.placement(), Placement::ReplaceCurrent);
        let empty = tempfile::tempdir().unwrap();
        let none = on_disk(&SealedPaths::new(empty.path().join("x")), guest(1)).unwrap();
        assert_eq!((none.newest(), none.placement()), (None, Placement::New));
    }
}
