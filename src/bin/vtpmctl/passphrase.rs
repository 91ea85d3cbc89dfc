//! Reading a passphrase from a file or stdin straight into locked memory.
//! Never from argv or the environment: both are readable by other users
//! (`/proc/PID/cmdline`) or inherited by children.

use std::fs::File;
use std::path::Path;

use secrecy::ExposeSecret;
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
}

/// Reads the whole file (`-` is stdin) as the passphrase's bytes; one
/// trailing newline, as `echo` or an editor leaves it, is not part of it.
pub fn read(path: &Path) -> Result<SecretBuf, PassphraseError> {
    let mut buf = if path == Path::new("-") {
        SecretBuf::read_from(&mut std::io::stdin().lock(), MAX_PASSPHRASE_LEN)
    } else {
        let mut file = File::open(path).map_err(|source| PassphraseError::Open {
            path: path.display().to_string(),
            source,
        })?;
        SecretBuf::read_from(&mut file, MAX_PASSPHRASE_LEN)
    }
    .map_err(PassphraseError::Read)?;
    if buf.expose_secret().last() == Some(&b'\n') {
        buf.truncate(buf.len() - 1);
    }
    Ok(buf)
}
