//! Reading a passphrase from a file, stdin or the terminal straight into
//! locked memory. Never from argv or the environment: both are readable by
//! other users (`/proc/PID/cmdline`) or inherited by children.
//!
//! No buffered reader sits in between: stdin is read through a duplicate of
//! its file descriptor (std's `Stdin` would copy the bytes into its own
//! 8 KiB heap buffer first), and the terminal prompt reads byte by byte
//! with `read(2)` into the locked buffer.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};
use secrecy::{ExposeSecret, ExposeSecretMut};
use vtpmd::secret::{SecretBuf, SecretError};
use vtpmd::vault::MAX_PASSPHRASE_LEN;

#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    #[error("cannot open passphrase file {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the passphrase")]
    Read(#[source] SecretError),
    #[error("the passphrase is empty")]
    Empty,
    #[error("the passphrase in {path} is longer than {max} bytes")]
    TooLong { path: String, max: usize },
    #[error(
        "no passphrase given: use --{option} FILE (`-` for stdin), or run on a terminal to be prompted"
    )]
    NoSource { option: &'static str },
    #[error("cannot set up the terminal for the passphrase prompt")]
    Terminal(#[source] nix::Error),
    #[error("the passphrase prompt was cancelled")]
    Cancelled,
    #[error("the passphrases do not match")]
    Mismatch,
    #[error(
        "{path} holds {len} bytes: a key file holds the 32 raw bytes of the key, or their standard base64 (44 characters, one trailing newline allowed)"
    )]
    KeyFormat { path: String, len: usize },
}

/// A `key` slot's key from `path` (`-`: stdin), straight into locked
/// memory: either its 32 raw bytes or their standard base64 (44 characters,
/// as a key manager such as Barbican hands out a payload), one trailing
/// newline allowed. The lengths never overlap, so no guess is needed.
pub fn read_key(path: &Path) -> Result<SecretBuf, PassphraseError> {
    const MAX: usize = 64;
    let shown = path.display().to_string();
    let mut raw = if path == Path::new("-") {
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| PassphraseError::Open {
                path: "-".to_owned(),
                source,
            })?;
        SecretBuf::read_from(&mut File::from(fd), MAX)
    } else {
        let mut file = File::open(path).map_err(|source| PassphraseError::Open {
            path: shown.clone(),
            source,
        })?;
        SecretBuf::read_from(&mut file, MAX)
    }
    .map_err(|e| match e {
        SecretError::TooLong { .. } => PassphraseError::KeyFormat {
            path: shown.clone(),
            len: MAX + 1,
        },
        other => PassphraseError::Read(other),
    })?;
    if raw.len() == vtpmd::vault::KEY_LEN {
        return Ok(raw);
    }
    if raw.expose_secret().last() == Some(&b'\n') {
        raw.truncate(raw.len() - 1);
    }
    let len = raw.len();
    let bad = || PassphraseError::KeyFormat {
        path: shown.clone(),
        len,
    };
    if len != 44 {
        return Err(bad());
    }
    let key =
        SecretBuf::from_base64(raw.expose_secret(), vtpmd::vault::KEY_LEN).map_err(|_| bad())?;
    if key.len() != vtpmd::vault::KEY_LEN {
        return Err(bad());
    }
    Ok(key)
}

/// Reads the whole file (`-` is stdin) as the passphrase's bytes; one
/// trailing newline, as `echo` or an editor leaves it, is not part of it.
/// A passphrase of the longest length the format allows may carry that
/// newline too, so one byte more is read than a passphrase may have.
pub fn read(path: &Path) -> Result<SecretBuf, PassphraseError> {
    const WITH_NEWLINE: usize = MAX_PASSPHRASE_LEN + 1;
    let too_long = || PassphraseError::TooLong {
        path: path.display().to_string(),
        max: MAX_PASSPHRASE_LEN,
    };
    let mut buf = if path == Path::new("-") {
        // An unbuffered handle on fd 0: std's Stdin would copy the secret
        // into its own heap buffer before handing it over.
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| PassphraseError::Open {
                path: "-".to_owned(),
                source,
            })?;
        SecretBuf::read_from(&mut File::from(fd), WITH_NEWLINE)
    } else {
        let mut file = File::open(path).map_err(|source| PassphraseError::Open {
            path: path.display().to_string(),
            source,
        })?;
        SecretBuf::read_from(&mut file, WITH_NEWLINE)
    }
    .map_err(|e| match e {
        SecretError::TooLong { .. } => too_long(),
        other => PassphraseError::Read(other),
    })?;
    if buf.expose_secret().last() == Some(&b'\n') {
        buf.truncate(buf.len() - 1);
    }
    if buf.len() > MAX_PASSPHRASE_LEN {
        return Err(too_long());
    }
    Ok(buf)
}

/// How a command gets one passphrase.
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    /// The file option, if given (`-` for stdin).
    pub file: Option<&'a Path>,
    /// Its name, for the error that says how to give one.
    pub option: &'static str,
    /// The prompt shown on a terminal.
    pub prompt: &'static str,
    /// Ask twice on a terminal (a new passphrase must not have a typo).
    pub confirm: bool,
}

/// The passphrase from the file if one is given, else from an interactive
/// prompt if stdin is a terminal, else an error. Empty passphrases are
/// refused here rather than by the daemon.
pub fn obtain(want: Want<'_>) -> Result<SecretBuf, PassphraseError> {
    let pass = match want.file {
        Some(path) => read(path)?,
        None => {
            let stdin = std::io::stdin();
            let fd = stdin.as_fd();
            if !nix::unistd::isatty(fd).unwrap_or(false) {
                return Err(PassphraseError::NoSource {
                    option: want.option,
                });
            }
            let mut stderr = std::io::stderr();
            let first = prompt(fd, &mut stderr, want.prompt)?;
            if want.confirm {
                let again = prompt(fd, &mut stderr, "Repeat it: ")?;
                if !first.ct_eq(&again) {
                    return Err(PassphraseError::Mismatch);
                }
            }
            first
        }
    };
    if pass.is_empty() {
        return Err(PassphraseError::Empty);
    }
    Ok(pass)
}

/// Restores the terminal's settings when dropped, whatever path leaves the
/// prompt (success, error, cancel, panic).
struct RestoreTerminal<'fd> {
    fd: BorrowedFd<'fd>,
    saved: Termios,
}

impl Drop for RestoreTerminal<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Shows `text` on `out`, then reads one line from the terminal `fd` with
/// echo off, straight into locked memory.
///
/// The terminal is put in non-canonical mode without signals, so line
/// editing (backspace, Ctrl-U) is done here on the locked buffer and Ctrl-C
/// cancels the prompt through this function instead of killing the process
/// with echo still off. The settings are restored on every path.
pub fn prompt(
    fd: BorrowedFd<'_>,
    out: &mut impl Write,
    text: &str,
) -> Result<SecretBuf, PassphraseError> {
    let saved = termios::tcgetattr(fd).map_err(PassphraseError::Terminal)?;
    let mut raw = saved.clone();
    raw.local_flags
        .remove(LocalFlags::ECHO | LocalFlags::ECHONL | LocalFlags::ICANON | LocalFlags::ISIG);
    raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    termios::tcsetattr(fd, SetArg::TCSAFLUSH, &raw).map_err(PassphraseError::Terminal)?;
    let guard = RestoreTerminal { fd, saved };
    let result = read_line(&mut FdReader(fd));
    drop(guard);
    // The Enter key was not echoed either.
    let _ = out.write_all(b"\n");
    let _ = out.flush();
    result
}

/// `read(2)` on a borrowed descriptor, without any buffer of its own.
struct FdReader<'fd>(BorrowedFd<'fd>);

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        nix::unistd::read(self.0, buf).map_err(std::io::Error::from)
    }
}

const CTRL_C: u8 = 0x03;
const CTRL_D: u8 = 0x04;
const BACKSPACE: u8 = 0x08;
const CTRL_U: u8 = 0x15;
const DELETE: u8 = 0x7f;

/// Reads one line byte by byte into a locked buffer, with the editing a
/// terminal's canonical mode would do. Every byte lands in the locked
/// buffer first; control bytes are then wiped from it.
fn read_line(reader: &mut impl Read) -> Result<SecretBuf, PassphraseError> {
    // One spare slot holds the byte being looked at.
    let mut buf = SecretBuf::zeroed(MAX_PASSPHRASE_LEN + 1).map_err(PassphraseError::Read)?;
    let mut len = 0;
    loop {
        let slot = &mut buf.expose_secret_mut()[len..=len];
        match reader.read(slot) {
            Ok(0) => {
                if len == 0 {
                    return Err(PassphraseError::Cancelled);
                }
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(PassphraseError::Read(SecretError::Read { source: e })),
        }
        let secret = buf.expose_secret_mut();
        match secret[len] {
            b'\n' | b'\r' => {
                secret[len] = 0;
                break;
            }
            CTRL_C => {
                secret[len] = 0;
                return Err(PassphraseError::Cancelled);
            }
            CTRL_D if len == 0 => {
                secret[len] = 0;
                return Err(PassphraseError::Cancelled);
            }
            CTRL_D => {
                secret[len] = 0;
                break;
            }
            BACKSPACE | DELETE => {
                secret[len] = 0;
                if len > 0 {
                    len -= 1;
                    secret[len] = 0;
                }
            }
            CTRL_U => {
                secret[..=len].fill(0);
                len = 0;
            }
            _ => {
                len += 1;
                if len > MAX_PASSPHRASE_LEN {
                    return Err(PassphraseError::Read(SecretError::TooLong {
                        max: MAX_PASSPHRASE_LEN,
                    }));
                }
            }
        }
    }
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn line(input: &[u8]) -> Result<Vec<u8>, PassphraseError> {
        read_line(&mut &input[..]).map(|b| b.expose_secret().to_vec())
    }

    #[test]
    fn a_line_is_read_with_terminal_editing() {
        assert_eq!(line(b"secret\n").unwrap(), b"secret");
        assert_eq!(line(b"secret\r").unwrap(), b"secret");
        assert_eq!(line(b"secx\x7fret\n").unwrap(), b"secret");
        assert_eq!(line(b"\x08\x08ab\x08c\n").unwrap(), b"ac");
        assert_eq!(line(b"wrong\x15right\n").unwrap(), b"right");
        assert_eq!(line(b"no newline").unwrap(), b"no newline");
        assert_eq!(line(b"\n").unwrap(), b"");
        assert_eq!(line(b"p\xc3\xa4ss\n").unwrap(), "päss".as_bytes());
    }

    #[test]
    fn ctrl_c_and_eof_cancel() {
        assert!(matches!(line(b"abc\x03"), Err(PassphraseError::Cancelled)));
        assert!(matches!(line(b"\x04"), Err(PassphraseError::Cancelled)));
        assert!(matches!(line(b""), Err(PassphraseError::Cancelled)));
        assert_eq!(line(b"ab\x04").unwrap(), b"ab");
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let long = vec![b'a'; MAX_PASSPHRASE_LEN + 1];
        assert!(matches!(
            line(&long),
            Err(PassphraseError::Read(SecretError::TooLong { .. }))
        ));
        let exact = vec![b'a'; MAX_PASSPHRASE_LEN];
        assert_eq!(line(&exact).unwrap().len(), MAX_PASSPHRASE_LEN);
    }

    /// Writes `keys` to the pty's master once its slave has echo off.
    fn type_when_echo_is_off(
        pty: &nix::pty::OpenptyResult,
        keys: &'static [u8],
    ) -> std::thread::JoinHandle<()> {
        let slave = pty.slave.try_clone().unwrap();
        let mut master = File::from(pty.master.try_clone().unwrap());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while termios::tcgetattr(slave.as_fd())
                .unwrap()
                .local_flags
                .contains(LocalFlags::ECHO)
            {
                assert!(std::time::Instant::now() < deadline, "no prompt");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            master.write_all(keys).unwrap();
        })
    }

    #[test]
    fn the_prompt_turns_echo_off_and_restores_the_terminal() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(before.local_flags.contains(LocalFlags::ECHO));
        // Typed on the master side, as a user would, once the prompt is up
        // (TCSAFLUSH discards what was typed before).
        let typist = type_when_echo_is_off(&pty, b"hunter2\r");
        let mut shown = Vec::new();
        let pass = prompt(pty.slave.as_fd(), &mut shown, "Passphrase: ").unwrap();
        typist.join().unwrap();
        assert_eq!(pass.expose_secret(), b"hunter2");
        assert_eq!(shown, b"Passphrase: \n");
        let after = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert_eq!(after.local_flags, before.local_flags);
    }

    #[test]
    fn the_terminal_is_restored_when_the_prompt_is_cancelled() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        let typist = type_when_echo_is_off(&pty, b"abc\x03");
        let err = prompt(pty.slave.as_fd(), &mut Vec::new(), "P: ").unwrap_err();
        typist.join().unwrap();
        assert!(matches!(err, PassphraseError::Cancelled));
        let after = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert_eq!(after.local_flags, before.local_flags);
    }

    #[test]
    fn a_file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, b"correct horse\n\n").unwrap();
        let pass = read(&path).unwrap();
        assert_eq!(pass.expose_secret(), b"correct horse\n");
    }

    #[test]
    fn the_longest_passphrase_may_end_in_a_newline_and_one_byte_more_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        let mut longest = vec![b'a'; MAX_PASSPHRASE_LEN];
        longest.push(b'\n');
        std::fs::write(&path, &longest).unwrap();
        assert_eq!(read(&path).unwrap().len(), MAX_PASSPHRASE_LEN);
        std::fs::write(&path, vec![b'a'; MAX_PASSPHRASE_LEN + 1]).unwrap();
        assert!(matches!(read(&path), Err(PassphraseError::TooLong { .. })));
    }

    #[test]
    fn an_empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, b"\n").unwrap();
        let err = obtain(Want {
            file: Some(&path),
            option: "passphrase-file",
            prompt: "",
            confirm: false,
        })
        .unwrap_err();
        assert!(matches!(err, PassphraseError::Empty), "{err:?}");
    }
}
