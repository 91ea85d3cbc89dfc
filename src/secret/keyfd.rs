//! A secret held by a file descriptor instead of by this process's memory,
//! so it can outlive the process: vtpmd hands each running guest's data key
//! to systemd's file-descriptor store and takes it back after a restart.
//!
//! The file is a `memfd_secret(2)` file where the kernel offers one (its
//! pages are locked, never swapped, and unmapped from the kernel's direct
//! map, so not even systemd, which holds the fd, can read them without
//! mapping the file itself), otherwise a sealed `memfd_create(2)` file (its
//! pages are ordinary shmem: the unit's `MemorySwapMax=0` is what keeps them
//! out of swap). Either way the bytes go from the [`SecretBuf`]'s locked
//! pages straight into the file and back, never through an ordinary buffer.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::libc;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{self, MapFlags, ProtFlags};
use nix::sys::resource::{Resource, getrlimit};
use nix::sys::stat::{SFlag, fstat};
use nix::sys::statfs::{FsType, TMPFS_MAGIC, fstatfs};
use nix::unistd::{ftruncate, write};
use secrecy::{ExposeSecret, ExposeSecretMut};

use super::region::memfd_secret;
use super::{Backing, SecretBuf, SecretError, backing};

/// `SECRETMEM_MAGIC` from `<linux/magic.h>` ("SECM"); libc does not
/// export it.
const SECRETMEM_MAGIC: FsType = FsType(0x5345_434d);

/// What makes a memfd's content immutable, so a mapping of it can neither
/// change under the reader nor shrink into a SIGBUS.
const SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_WRITE);

/// Why a secret could not be put into, or taken out of, a file descriptor.
/// None of them carries secret content.
#[derive(Debug, thiserror::Error)]
pub enum KeyFdError {
    /// An empty secret has no file form: a zero-sized file cannot be told
    /// from one that was never written.
    #[error("an empty secret cannot be sealed into a file descriptor")]
    Empty,
    /// Creating, sizing, mapping, writing or sealing the file failed.
    #[error("cannot seal a secret into a memory file: {step}")]
    Seal {
        /// The call that failed.
        step: &'static str,
        /// What the kernel said.
        #[source]
        source: Errno,
    },
    /// The descriptor is not a secret-memory file or a sealed memfd (for
    /// instance a socket, a pipe or a file on disk).
    #[error("the descriptor does not hold a secret: {why}")]
    NotASecretFile {
        /// What it is, or what it lacks.
        why: String,
    },
    /// The file is empty or larger than the caller allows.
    #[error("the secret file holds {size} bytes; expected 1 to {max}")]
    Size {
        /// The file's size.
        size: i64,
        /// The largest size the caller accepts.
        max: usize,
    },
    /// Inspecting or mapping the file failed.
    #[error("cannot read a secret from its file descriptor: {step}")]
    Read {
        /// The call that failed.
        step: &'static str,
        /// What the kernel said.
        #[source]
        source: Errno,
    },
    /// No locked memory for the secret (see [`SecretError::Lock`]).
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The two kinds of file a secret can live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    SecretMem,
    Memfd,
}

/// A new close-on-exec descriptor holding exactly the bytes of `secret`.
///
/// It is a `memfd_secret(2)` file when this process's secrets use
/// secretmem ([`backing`]) and the call is allowed, otherwise a memfd
/// sealed against writing, growing and shrinking. Reading it back needs
/// [`read_from_fd`]: a secretmem file cannot be `read(2)`.
pub fn seal_into_fd(secret: &SecretBuf) -> Result<OwnedFd, KeyFdError> {
    let kind = match backing() {
        Backing::SecretMem => Kind::SecretMem,
        Backing::Mlock => Kind::Memfd,
    };
    seal_as(kind, secret)
}

fn seal_as(kind: Kind, secret: &SecretBuf) -> Result<OwnedFd, KeyFdError> {
    let bytes = secret.expose_secret();
    let len = NonZeroUsize::new(bytes.len()).ok_or(KeyFdError::Empty)?;
    if kind == Kind::SecretMem {
        match memfd_secret() {
            Ok(fd) => return seal_secretmem(fd, bytes, len),
            // Not built or not enabled (ENOSYS), or a seccomp filter without
            // memfd_secret (EPERM): the same reasons `backing` falls back.
            Err(Errno::ENOSYS | Errno::EPERM) => {}
            Err(source) => {
                return Err(KeyFdError::Seal {
                    step: "memfd_secret",
                    source,
                });
            }
        }
    }
    seal_memfd(bytes)
}

fn seal_secretmem(fd: OwnedFd, bytes: &[u8], len: NonZeroUsize) -> Result<OwnedFd, KeyFdError> {
    let seal = |step| move |source| KeyFdError::Seal { step, source };
    let size = libc::off_t::try_from(len.get())
        .map_err(|_| Errno::EFBIG)
        .map_err(seal("ftruncate"))?;
    // secretmem takes its size once and refuses any later change, which is
    // what the seals do for a memfd.
    ftruncate(&fd, size).map_err(seal("ftruncate"))?;
    let map = Mapping::new(&fd, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE)
        .map_err(|e| limit_or(e, len.get(), seal("mmap")))?;
    // The pages are allocated on this first touch; a kernel that cannot
    // provide one raises SIGBUS here, as for every secretmem `SecretBuf`.
    // SAFETY: one copy of `len` bytes from the secret's locked pages into a
    // fresh writable mapping of exactly `len` bytes (mmap rounds up to
    // whole pages); the two cannot overlap, and the file was created just
    // above, so no other process can map it yet.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.ptr.as_ptr(), len.get()) };
    drop(map);
    Ok(fd)
}

fn seal_memfd(bytes: &[u8]) -> Result<OwnedFd, KeyFdError> {
    let seal = |step| move |source| KeyFdError::Seal { step, source };
    let fd = memfd_create(
        c"vtpmd-secret",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(seal("memfd_create"))?;
    let mut rest = bytes;
    while !rest.is_empty() {
        match write(&fd, rest) {
            Ok(0) => return Err(seal("write")(Errno::EIO)),
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(source) => return Err(seal("write")(source)),
        }
    }
    fcntl(&fd, FcntlArg::F_ADD_SEALS(SEALS | SealFlag::F_SEAL_SEAL))
        .map_err(seal("F_ADD_SEALS"))?;
    Ok(fd)
}

/// The secret held by `fd` (made by [`seal_into_fd`]), copied into a fresh
/// [`SecretBuf`].
///
/// Only a secretmem file or a memfd sealed against writing, growing and
/// shrinking is accepted, from 1 to `max_len` bytes long: anything else (a
/// socket, a pipe, a file on disk, an unsealed memfd) is
/// [`KeyFdError::NotASecretFile`] without being read, so a wrong descriptor
/// can neither block the caller nor change or vanish while it is mapped.
pub fn read_from_fd(fd: BorrowedFd<'_>, max_len: usize) -> Result<SecretBuf, KeyFdError> {
    let read = |step| move |source| KeyFdError::Read { step, source };
    let not = |why: String| KeyFdError::NotASecretFile { why };
    let stat = fstat(fd).map_err(read("fstat"))?;
    let file_type = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    if file_type != SFlag::S_IFREG {
        return Err(not(format!(
            "not a regular file ({})",
            type_name(file_type)
        )));
    }
    let fs = fstatfs(fd).map_err(read("fstatfs"))?.filesystem_type();
    if fs == TMPFS_MAGIC {
        let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(read("F_GET_SEALS"))?;
        if !SealFlag::from_bits_truncate(seals).contains(SEALS) {
            return Err(not("a memory file that is not sealed against writes".into()));
        }
    } else if fs != SECRETMEM_MAGIC {
        return Err(not(format!(
            "a file on a disk or other file system (magic {:#x})",
            fs.0
        )));
    }
    let size_error = KeyFdError::Size {
        size: stat.st_size,
        max: max_len,
    };
    let len = usize::try_from(stat.st_size)
        .ok()
        .filter(|&len| len <= max_len)
        .and_then(NonZeroUsize::new)
        .ok_or(size_error)?;
    let mut secret = SecretBuf::zeroed(len.get())?;
    let map = Mapping::new(&fd, len, ProtFlags::PROT_READ)
        .map_err(|e| limit_or(e, len.get(), read("mmap")))?;
    let dst = secret.expose_secret_mut();
    // SAFETY: one copy of `len` bytes out of a read-only mapping of exactly
    // `len` bytes of a file whose size cannot shrink (sealed, or secretmem)
    // into the fresh locked buffer of the same length; the two are distinct
    // mappings. Raw pointers rather than a `&[u8]` of the mapping, because
    // another holder of a secretmem fd could in principle write to it.
    unsafe { std::ptr::copy_nonoverlapping(map.ptr.as_ptr(), dst.as_mut_ptr(), len.get()) };
    drop(map);
    Ok(secret)
}

fn type_name(file_type: SFlag) -> &'static str {
    [
        (SFlag::S_IFSOCK, "a socket"),
        (SFlag::S_IFIFO, "a pipe"),
        (SFlag::S_IFDIR, "a directory"),
        (SFlag::S_IFCHR, "a character device"),
        (SFlag::S_IFBLK, "a block device"),
        (SFlag::S_IFLNK, "a symbolic link"),
    ]
    .iter()
    .find(|(t, _)| *t == file_type)
    .map_or("an unknown file type", |(_, name)| name)
}

/// secretmem mappings count against `RLIMIT_MEMLOCK` (mmap answers EAGAIN),
/// and then the operator needs the limit's name, as everywhere else.
fn limit_or(errno: Errno, requested: usize, other: impl FnOnce(Errno) -> KeyFdError) -> KeyFdError {
    if errno == Errno::EAGAIN {
        KeyFdError::Secret(SecretError::Lock {
            requested,
            limit: getrlimit(Resource::RLIMIT_MEMLOCK)
                .ok()
                .map(|(soft, _)| soft),
            source: errno,
        })
    } else {
        other(errno)
    }
}

/// A shared mapping of the start of a file, unmapped on every return path.
struct Mapping {
    ptr: NonNull<u8>,
    len: NonZeroUsize,
}

impl Mapping {
    fn new(fd: &impl AsFd, len: NonZeroUsize, prot: ProtFlags) -> Result<Mapping, Errno> {
        // SAFETY: a new shared mapping at an address of the kernel's choosing
        // cannot alias any Rust object; the callers only map files whose size
        // is at least `len` and cannot shrink, so no access within `len`
        // faults for lack of backing.
        let ptr = unsafe { mman::mmap(None, len, prot, MapFlags::MAP_SHARED, fd, 0) }?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mapped in `Mapping::new`, owned by this
        // value alone; the copies into and out of it are finished.
        let result = unsafe { mman::munmap(self.ptr.cast::<c_void>(), self.len.get()) };
        if let Err(errno) = result {
            tracing::error!(%errno, "munmap of a secret file's mapping failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;

    fn key() -> SecretBuf {
        let mut key = SecretBuf::zeroed(32).unwrap();
        for (i, b) in key.expose_secret_mut().iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap() ^ 0xA5;
        }
        key
    }

    fn kind_of(fd: &OwnedFd) -> Kind {
        match fstatfs(fd).unwrap().filesystem_type() {
            SECRETMEM_MAGIC => Kind::SecretMem,
            TMPFS_MAGIC => Kind::Memfd,
            other => panic!("unexpected file system {:#x}", other.0),
        }
    }

    fn assert_round_trip(kind: Kind) {
        // Arrange
        let key = key();

        // Act
        let fd = seal_as(kind, &key).unwrap();
        let back = read_from_fd(fd.as_fd(), 64).unwrap();

        // Assert
        assert!(back.ct_eq(&key), "{kind:?}");
        assert_eq!(fstat(&fd).unwrap().st_size, 32);
        let flags = fcntl(&fd, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
    }

    #[test]
    fn a_key_comes_back_from_a_sealed_memfd() {
        assert_round_trip(Kind::Memfd);
        let fd = seal_as(Kind::Memfd, &key()).unwrap();
        assert_eq!(kind_of(&fd), Kind::Memfd);
        let seals = SealFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap());
        assert!(seals.contains(SEALS | SealFlag::F_SEAL_SEAL), "{seals:?}");
        // Sealed: the holder cannot change the key behind our back.
        assert_eq!(write(&fd, b"x"), Err(Errno::EPERM));
        assert_eq!(ftruncate(&fd, 1), Err(Errno::EPERM));
    }

    #[test]
    fn a_key_comes_back_from_a_secretmem_file() {
        if backing() != Backing::SecretMem {
            eprintln!("memfd_secret unavailable on this kernel; nothing to check");
            return;
        }
        assert_round_trip(Kind::SecretMem);
        let fd = seal_into_fd(&key()).unwrap();
        assert_eq!(kind_of(&fd), Kind::SecretMem);
        // Neither read(2) nor a resize can reach it.
        let mut buf = [0u8; 32];
        assert!(nix::unistd::read(&fd, &mut buf).is_err());
        assert!(ftruncate(&fd, 64).is_err());
    }

    #[test]
    fn the_default_kind_follows_the_process_backing() {
        let fd = seal_into_fd(&key()).unwrap();
        let expected = match backing() {
            Backing::SecretMem => Kind::SecretMem,
            Backing::Mlock => Kind::Memfd,
        };
        assert_eq!(kind_of(&fd), expected);
    }

    #[test]
    fn an_empty_secret_is_refused() {
        let empty = SecretBuf::with_capacity(8).unwrap();
        for kind in [Kind::Memfd, Kind::SecretMem] {
            let err = seal_as(kind, &empty).unwrap_err();
            assert!(matches!(err, KeyFdError::Empty), "{err:?}");
        }
    }

    #[test]
    fn a_key_longer_than_the_maximum_is_refused() {
        let fd = seal_into_fd(&key()).unwrap();
        let err = read_from_fd(fd.as_fd(), 31).unwrap_err();
        assert!(
            matches!(err, KeyFdError::Size { size: 32, max: 31 }),
            "{err:?}"
        );
        assert!(read_from_fd(fd.as_fd(), 32).is_ok());
    }

    #[test]
    fn an_empty_memfd_is_refused() {
        let fd = memfd_create(c"empty", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SEALS)).unwrap();
        let err = read_from_fd(fd.as_fd(), 32).unwrap_err();
        assert!(matches!(err, KeyFdError::Size { size: 0, .. }), "{err:?}");
    }

    fn assert_not_a_secret(fd: BorrowedFd<'_>, expected: &str) {
        let err = read_from_fd(fd, 32).unwrap_err();
        match &err {
            KeyFdError::NotASecretFile { why } => assert!(why.contains(expected), "{err}"),
            other => panic!("expected NotASecretFile, got {other:?}"),
        }
    }

    #[test]
    fn sockets_and_pipes_are_refused_without_blocking() {
        // Arrange: a pipe and a connected socket with nothing to read, which
        // a read(2) would block on forever.
        let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
        let (sock, _peer) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();

        // Act + Assert
        assert_not_a_secret(pipe_r.as_fd(), "pipe");
        assert_not_a_secret(sock.as_fd(), "socket");
        assert_not_a_secret(listener.as_fd(), "socket");
        let dir_fd = std::fs::File::open(dir.path()).unwrap();
        assert_not_a_secret(dir_fd.as_fd(), "directory");
    }

    #[test]
    fn files_that_are_not_sealed_memory_are_refused() {
        // A file on disk (or on a tmpfs, unsealed): its size could change
        // under the mapping.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7; 32]).unwrap();
        if fstatfs(&file).unwrap().filesystem_type() == TMPFS_MAGIC {
            assert_not_a_secret(file.as_fd(), "not sealed");
        } else {
            assert_not_a_secret(file.as_fd(), "file system");
        }
        // A memfd without seals: whoever else holds it could rewrite or
        // truncate it.
        let fd = memfd_create(c"unsealed", MFdFlags::MFD_CLOEXEC).unwrap();
        write(&fd, &[7; 32]).unwrap();
        assert_not_a_secret(fd.as_fd(), "not sealed");
        // Sealed against shrinking only: still writable.
        let fd = memfd_create(c"half", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        write(&fd, &[7; 32]).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        assert_not_a_secret(fd.as_fd(), "not sealed");
    }
}
