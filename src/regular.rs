//! Opening a file in a directory that someone else can write (a guest's
//! runtime directory, and by extension every path vtpmd reads): never
//! following a symlink, never blocking in `open` (a FIFO planted in place
//! of a file would otherwise hang the caller until a writer comes), and
//! refusing anything but a regular file before a byte is read.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::libc;

/// How a file is to be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
    ReadWrite,
}

/// `path` opened with `O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`, if it is a
/// regular file; `Ok(None)` if there is none. Anything else (a FIFO, a
/// socket, a device, a directory, a symlink) is an `InvalidData` error
/// naming what it is. `O_NONBLOCK` has no effect on a regular file's reads
/// and writes, so the file is used as opened.
pub(crate) fn open(path: &Path, access: Access) -> io::Result<Option<File>> {
    let mut options = OpenOptions::new();
    match access {
        Access::Read => options.read(true),
        Access::Write => options.write(true),
        Access::ReadWrite => options.read(true).write(true),
    };
    let file = match options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a symlink; O_NONBLOCK|O_WRONLY on a FIFO with no reader.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => {
            return Err(not_regular(path, "a symlink or a FIFO"));
        }
        Err(e) => return Err(e),
    };
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(not_regular(path, what));
    }
    Ok(Some(file))
}

fn not_regular(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is {what}, not a regular file", path.display()),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_fifo_or_a_symlink_is_refused_at_once_for_every_access() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        let link = dir.path().join("link");
        std::fs::write(dir.path().join("target"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        let began = Instant::now();
        for path in [&fifo, &link, &dir.path().to_path_buf()] {
            for access in [Access::Read, Access::Write, Access::ReadWrite] {
                let err = open(path, access).err();
                assert!(err.is_some(), "{} {access:?} was opened", path.display());
            }
        }
        assert!(began.elapsed() < Duration::from_secs(5), "an open blocked");
    }

    #[test]
    fn a_regular_file_opens_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"data").unwrap();
        assert!(open(&file, Access::Read).unwrap().is_some());
        assert!(
            open(&dir.path().join("none"), Access::Read)
                .unwrap()
                .is_none()
        );
    }
}
