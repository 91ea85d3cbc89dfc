//! The body's plaintext: a flat archive of a guest's state directory.
//!
//! Only regular files directly in the directory, each with a plain name, in
//! name order. Decoding accepts only that canonical form, so an archive read
//! from disk can never name a path outside the directory it is written to.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// "An archive holds at most 64 entries."
pub const MAX_ENTRIES: usize = 64;
/// "Names are 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, not starting with a dot."
pub const MAX_NAME_LEN: usize = 64;
/// "The encoded archive is at most 16 MiB." (swtpm's state is tens of KiB.)
pub const MAX_ARCHIVE_LEN: usize = 16 * 1024 * 1024;

/// One state file.
#[derive(Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    name: String,
    data: Vec<u8>,
}

/// A guest's state directory as bytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct StateArchive {
    entries: Vec<ArchiveEntry>,
}

/// A directory entry [`StateArchive::scan_dir`] left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The entry's name (lossily, if it is not UTF-8).
    pub name: String,
    pub why: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("file name {name:?} is not allowed in a state archive")]
    BadName { name: String },
    #[error("more than {MAX_ENTRIES} files")]
    TooManyEntries,
    #[error("{path} would be file {} of the archive, which holds at most {MAX_ENTRIES}", MAX_ENTRIES + 1)]
    TooManyFiles { path: PathBuf },
    #[error(
        "{path} is {size} bytes; with the files before it only {room} fit in an archive of at most {MAX_ARCHIVE_LEN} bytes"
    )]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        room: usize,
    },
    #[error("{path} changed while it was read ({size} bytes at open, {read} read)")]
    Changed {
        path: PathBuf,
        size: u64,
        read: usize,
    },
    #[error("archive would exceed {MAX_ARCHIVE_LEN} bytes")]
    TooLarge,
    #[error("malformed archive: {what}")]
    Malformed { what: &'static str },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl std::fmt::Debug for ArchiveEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes)", self.name, self.data.len())
    }
}

impl std::fmt::Debug for StateArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.entries).finish()
    }
}

impl ArchiveEntry {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Dot-files (swtpm's `.lock`) are runtime artefacts, not state, so a valid
/// name never starts with a dot; that also rules out `.` and `..`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl StateArchive {
    /// Builds an archive from `(name, bytes)` pairs, enforcing every rule of
    /// the format.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<Self, ArchiveError> {
        let mut entries: Vec<ArchiveEntry> = entries
            .into_iter()
            .map(|(name, data)| ArchiveEntry { name, data })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let archive = Self { entries };
        archive.check()?;
        Ok(archive)
    }

    /// Reads every regular file directly in `dir` (see
    /// [`scan_dir`](Self::scan_dir)), dropping the list of what was skipped.
    pub fn from_dir(dir: &Path) -> Result<Self, ArchiveError> {
        Self::from_dir_matching(dir, |_| true)
    }

    /// Like [`from_dir`](Self::from_dir), leaving out the files `keep`
    /// refuses (e.g. swtpm's half-written `TMP*` files, which it renames
    /// into place when complete).
    pub fn from_dir_matching(
        dir: &Path,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Self, ArchiveError> {
        Self::scan_dir(dir, keep).map(|(archive, _)| archive)
    }

    /// The archive of `dir` as the format's "which entries" rules say: every
    /// regular file directly in it whose name is a valid entry name and that
    /// `keep` accepts. Dot-files are left out silently; anything else that
    /// cannot be an entry (a name the format cannot encode, a directory, a
    /// symlink, a FIFO, a socket, a device) is left out and returned in the
    /// second list, so that whoever can write in `dir` (a guest's uid) cannot
    /// make the archive fail by planting one.
    ///
    /// Every file is opened and its size taken from `fstat` before a byte is
    /// read, and the archive is refused as soon as the sizes so far exceed
    /// what an archive may hold: what is read is bounded by
    /// [`MAX_ARCHIVE_LEN`] in total, whatever the directory holds.
    pub fn scan_dir(
        dir: &Path,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(Self, Vec<Skipped>), ArchiveError> {
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| ArchiveError::Io { op, path, source }
        };
        let mut skipped = Vec::new();
        let mut opened: Vec<(String, PathBuf, fs::File, u64)> = Vec::new();
        // The encoded length so far: the entry count, then each entry.
        let mut encoded = 2usize;
        for item in fs::read_dir(dir).map_err(io("read directory", dir))? {
            let item = item.map_err(io("read directory", dir))?;
            let path = item.path();
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                skipped.push(Skipped {
                    name: name.to_string_lossy().into_owned(),
                    why: "its name is not UTF-8",
                });
                continue;
            };
            if name.starts_with('.') || !keep(name) {
                continue;
            }
            if !is_valid_name(name) {
                skipped.push(Skipped {
                    name: name.to_owned(),
                    why: "its name cannot be an archive entry's",
                });
                continue;
            }
            // d_type, or lstat where the file system gives none: a symlink
            // is a symlink here, never its target.
            let file_type = item.file_type().map_err(io("stat", &path))?;
            if !file_type.is_file() {
                skipped.push(Skipped {
                    name: name.to_owned(),
                    why: kind_of(file_type),
                });
                continue;
            }
            let file = match crate::regular::open(&path, crate::regular::Access::Read) {
                Ok(Some(file)) => file,
                // Gone since it was listed (swtpm removes `*.volatilestate`
                // after CMD_INIT): the caller reads the directory again.
                Ok(None) => {
                    return Err(ArchiveError::Io {
                        op: "open",
                        path,
                        source: std::io::ErrorKind::NotFound.into(),
                    });
                }
                // Replaced by something else since it was listed.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    skipped.push(Skipped {
                        name: name.to_owned(),
                        why: "it is no longer a regular file",
                    });
                    continue;
                }
                Err(e) => return Err(io("open", &path)(e)),
            };
            if opened.len() == MAX_ENTRIES {
                return Err(ArchiveError::TooManyFiles { path });
            }
            let size = file.metadata().map_err(io("stat", &path))?.len();
            let framing = 1 + name.len() + 4;
            let room = MAX_ARCHIVE_LEN.saturating_sub(encoded + framing);
            if size > room as u64 {
                return Err(ArchiveError::FileTooLarge { path, size, room });
            }
            // `size <= room < MAX_ARCHIVE_LEN`, so it fits a usize.
            encoded += framing + usize::try_from(size).unwrap_or(room);
            opened.push((name.to_owned(), path, file, size));
        }
        // Only now is anything read: every size is known to fit.
        let mut entries = Vec::with_capacity(opened.len());
        for (name, path, file, size) in opened {
            use std::io::Read;
            let expected = usize::try_from(size).unwrap_or(MAX_ARCHIVE_LEN);
            let mut data = Vec::with_capacity(expected);
            file.take(size.saturating_add(1))
                .read_to_end(&mut data)
                .map_err(io("read", &path))?;
            if data.len() != expected {
                // Written in place while being read: not a state swtpm
                // would leave; the caller reads the directory again.
                return Err(ArchiveError::Changed {
                    path,
                    size,
                    read: data.len(),
                });
            }
            entries.push((name, data));
        }
        Ok((Self::from_entries(entries)?, skipped))
    }

    /// Writes every entry into `dir`, which must exist; each file is created
    /// new (never overwriting, never following a link), mode 0600.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), ArchiveError> {
        for entry in &self.entries {
            let path = dir.join(&entry.name);
            let io = |op| {
                let path = path.clone();
                move |source| ArchiveError::Io { op, path, source }
            };
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io("create"))?;
            file.write_all(&entry.data).map_err(io("write"))?;
        }
        Ok(())
    }

    pub fn entries(&self) -> &[ArchiveEntry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.data.as_slice())
    }

    /// `u16 count`, then per entry `u8 name_len, name, u32 data_len, data`,
    /// big-endian.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// [`encode`](Self::encode), appended to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        self.each_piece(|piece| out.extend_from_slice(piece));
    }

    /// SHA-256 of [`encode`](Self::encode)'s bytes, without making them.
    pub(crate) fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        self.each_piece(|piece| hasher.update(piece));
        hasher.finalize().into()
    }

    /// The encoding, piece by piece, for every consumer of it alike.
    fn each_piece(&self, mut put: impl FnMut(&[u8])) {
        let count = u16::try_from(self.entries.len()).unwrap_or(u16::MAX);
        put(&count.to_be_bytes());
        for entry in &self.entries {
            put(&[u8::try_from(entry.name.len()).unwrap_or(u8::MAX)]);
            put(entry.name.as_bytes());
            let len = u32::try_from(entry.data.len()).unwrap_or(u32::MAX);
            put(&len.to_be_bytes());
            put(&entry.data);
        }
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, ArchiveError> {
        let malformed = |what| ArchiveError::Malformed { what };
        if bytes.len() > MAX_ARCHIVE_LEN {
            return Err(ArchiveError::TooLarge);
        }
        let (count, mut rest) = split_be::<2>(bytes).ok_or(malformed("no entry count"))?;
        let count = usize::from(u16::from_be_bytes(count));
        if count > MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries);
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let (&name_len, tail) = rest.split_first().ok_or(malformed("truncated entry"))?;
            let name_len = usize::from(name_len);
            let name = tail.get(..name_len).ok_or(malformed("truncated name"))?;
            let name = std::str::from_utf8(name).map_err(|_| malformed("name is not UTF-8"))?;
            let (data_len, tail) =
                split_be::<4>(&tail[name_len..]).ok_or(malformed("truncated length"))?;
            let data_len = usize::try_from(u32::from_be_bytes(data_len))
                .map_err(|_| malformed("length overflows"))?;
            let data = tail.get(..data_len).ok_or(malformed("truncated data"))?;
            entries.push(ArchiveEntry {
                name: name.to_owned(),
                data: data.to_vec(),
            });
            rest = &tail[data_len..];
        }
        if !rest.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        let archive = Self { entries };
        archive.check()?;
        Ok(archive)
    }

    /// Names valid, strictly ascending (so unique), count and size bounded.
    fn check(&self) -> Result<(), ArchiveError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(ArchiveError::TooManyEntries);
        }
        for entry in &self.entries {
            if !is_valid_name(&entry.name) {
                return Err(ArchiveError::BadName {
                    name: entry.name.clone(),
                });
            }
        }
        if self.entries.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err(ArchiveError::Malformed {
                what: "names not unique and ascending",
            });
        }
        if self.encoded_len() > MAX_ARCHIVE_LEN {
            return Err(ArchiveError::TooLarge);
        }
        Ok(())
    }

    pub(crate) fn encoded_len(&self) -> usize {
        2 + self
            .entries
            .iter()
            .map(|e| 1 + e.name.len() + 4 + e.data.len())
            .sum::<usize>()
    }
}

/// For the fuzzer: decodes `bytes` as an archive. Never panics; an archive
/// that decodes encodes back to exactly `bytes` and passes
/// [`StateArchive::from_entries`] unchanged.
#[doc(hidden)]
pub fn fuzz_archive(bytes: &[u8]) -> bool {
    let Ok(archive) = StateArchive::decode(bytes) else {
        return false;
    };
    assert_eq!(archive.encode(), bytes, "decode/encode is not canonical");
    let pairs = archive
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.data.clone()));
    let rebuilt = StateArchive::from_entries(pairs).expect("a decoded archive is valid");
    assert_eq!(rebuilt, archive);
    true
}

fn split_be<const N: usize>(bytes: &[u8]) -> Option<([u8; N], &[u8])> {
    let head = bytes.get(..N)?;
    Some((head.try_into().ok()?, &bytes[N..]))
}

fn kind_of(file_type: fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "it is a directory"
    } else if file_type.is_symlink() {
        "it is a symlink"
    } else if file_type.is_fifo() {
        "it is a FIFO"
    } else if file_type.is_socket() {
        "it is a socket"
    } else {
        "it is a device"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateArchive {
        StateArchive::from_entries([
            ("tpm2-00.permall".to_owned(), vec![1, 2, 3]),
            ("tpm2-00.volatilestate".to_owned(), vec![]),
        ])
        .unwrap()
    }

    #[test]
    fn encoding_round_trips() {
        let archive = sample();
        assert_eq!(StateArchive::decode(&archive.encode()).unwrap(), archive);
        assert_eq!(archive.encode().len(), archive.encoded_len());
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(archive.encode()).into();
        assert_eq!(archive.digest(), digest);
    }

    #[test]
    fn names_that_could_escape_the_directory_are_refused() {
        for name in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".lock",
            "a b",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_name(name), "{name:?} accepted");
            let result = StateArchive::from_entries([(name.to_owned(), vec![])]);
            assert!(
                matches!(result, Err(ArchiveError::BadName { .. })),
                "{name:?}"
            );
        }
        assert!(is_valid_name("tpm2-00.permall"));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let result =
            StateArchive::from_entries([("a".to_owned(), vec![]), ("a".to_owned(), vec![1])]);
        assert!(matches!(result, Err(ArchiveError::Malformed { .. })));
    }

    #[test]
    fn a_decoded_path_traversal_is_refused() {
        let mut bytes = vec![0, 1, 5];
        bytes.extend_from_slice(b"../ab");
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(
            StateArchive::decode(&bytes),
            Err(ArchiveError::BadName { .. })
        ));
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(StateArchive::decode(&bytes[..len]).is_err(), "length {len}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(StateArchive::decode(&long).is_err());
    }

    #[test]
    fn directory_round_trip_skips_dot_files_and_what_cannot_be_an_entry() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("tpm2-00.permall"), b"perm").unwrap();
        fs::write(src.path().join(".lock"), b"").unwrap();
        let archive = StateArchive::from_dir(src.path()).unwrap();
        assert_eq!(archive.entries().len(), 1);

        let dst = tempfile::tempdir().unwrap();
        archive.write_to_dir(dst.path()).unwrap();
        assert_eq!(
            fs::read(dst.path().join("tpm2-00.permall")).unwrap(),
            b"perm"
        );
        assert!(
            archive.write_to_dir(dst.path()).is_err(),
            "overwrote an existing file"
        );

        std::os::unix::fs::symlink("/etc/passwd", src.path().join("link")).unwrap();
        fs::create_dir(src.path().join("sub")).unwrap();
        fs::write(src.path().join("a b"), b"x").unwrap();
        nix::unistd::mkfifo(
            &src.path().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let (again, mut skipped) = StateArchive::scan_dir(src.path(), |_| true).unwrap();
        assert_eq!(again, archive);
        skipped.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<&str> = skipped.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a b", "fifo", "link", "sub"]);
    }

    #[test]
    fn sizes_are_checked_before_anything_is_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("small"), b"s").unwrap();
        // Sparse: costs nothing on disk, 16 MiB if it were read.
        let big = fs::File::create(dir.path().join("big")).unwrap();
        big.set_len(MAX_ARCHIVE_LEN as u64).unwrap();
        match StateArchive::scan_dir(dir.path(), |_| true) {
            Err(ArchiveError::FileTooLarge { path, size, .. }) => {
                assert_eq!(size, MAX_ARCHIVE_LEN as u64);
                assert!(path.ends_with("big") || path.ends_with("small"), "{path:?}");
            }
            other => panic!("{other:?}"),
        }
        // Exactly the largest archive there can be is still accepted.
        big.set_len((MAX_ARCHIVE_LEN - 2 - (1 + 3 + 4)) as u64)
            .unwrap();
        fs::remove_file(dir.path().join("small")).unwrap();
        let archive = StateArchive::from_dir(dir.path()).unwrap();
        assert_eq!(archive.encode().len(), MAX_ARCHIVE_LEN);
    }

    #[test]
    fn the_sixty_fifth_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..=MAX_ENTRIES {
            fs::write(dir.path().join(format!("f{i:02}")), b"").unwrap();
        }
        assert!(matches!(
            StateArchive::scan_dir(dir.path(), |_| true),
            Err(ArchiveError::TooManyFiles { .. })
        ));
    }
}
