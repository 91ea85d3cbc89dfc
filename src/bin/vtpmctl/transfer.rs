//! `export` and `import`: a guest's sealed file out of one vtpmd and into
//! another. The file is ciphertext; no passphrase is read or sent.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64ct::{Base64, Encoding};
use serde_json::{Map, Value, json};
use vtpmd::protocol::GuestId;
use vtpmd::protocol::manager::{CapabilitiesReply, ExportReply};
use vtpmd::vault::{self, MAX_SEALED_FILE_LEN};

use crate::client::{Client, ClientError};
use crate::commands::Printed;
use crate::output;

/// Why a file could not be read or written here.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{} exists; give --force to replace it", path.display())]
    OutputExists { path: PathBuf },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is larger than a sealed file can be ({MAX_SEALED_FILE_LEN} bytes)",
        path.display()
    )]
    TooLarge { path: PathBuf },
    #[error("vtpmd's export does not check out")]
    BadExport(#[source] vault::VaultError),
    #[error("vtpmd's export says generation {said}, its header {found}")]
    GenerationDiffers { said: u64, found: u64 },
    #[error("vtpmd's export is not valid base64")]
    Base64,
}

/// `export GUEST [--out FILE [--force]]`.
pub fn export(
    client: Client,
    guest: GuestId,
    out: Option<&Path>,
    force: bool,
    json: bool,
) -> Result<Option<Printed>, ClientError> {
    // Before the call, so a refusal costs the daemon nothing; the write
    // itself refuses again, atomically.
    if let Some(path) = out.filter(|_| !force) {
        if fs::symlink_metadata(path).is_ok() {
            return Err(TransferError::OutputExists {
                path: path.to_owned(),
            }
            .into());
        }
    }
    if out.is_none() && !json && io::stdout().is_terminal() {
        return Err(ClientError::Usage(
            "refusing to write a sealed file (binary) to a terminal; give --out FILE, or redirect stdout".to_owned(),
        ));
    }
    let mut client = client;
    let mut params = Map::new();
    params.insert("guest".into(), guest.to_string().into());
    let reply = client.call("Export", &params)?;
    let exported: ExportReply =
        serde_json::from_value(reply.clone()).map_err(ClientError::UnexpectedReply)?;
    let sealed = Base64::decode_vec(&exported.sealed).map_err(|_| TransferError::Base64)?;
    // What the daemon sent must be what it says: a sealed file of this
    // guest, of that generation.
    let header = vault::check_sealed(Path::new("the exported file"), &sealed, guest)
        .map_err(TransferError::BadExport)?;
    if header.generation != exported.generation {
        return Err(TransferError::GenerationDiffers {
            said: exported.generation,
            found: header.generation,
        }
        .into());
    }
    match out {
        Some(path) => {
            write_file(path, &sealed, force)?;
            Ok(Some(Printed {
                human: format!(
                    "exported {guest}: generation {}, {} bytes, to {}\n",
                    exported.generation,
                    sealed.len(),
                    path.display()
                ),
                json: json!({
                    "guest": guest.to_string(),
                    "generation": exported.generation,
                    "size": sealed.len(),
                    "out": path.display().to_string(),
                }),
            }))
        }
        None if json => Ok(Some(Printed {
            human: String::new(),
            json: reply,
        })),
        None => {
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(&sealed)
                .and_then(|()| stdout.flush())
                .map_err(|source| TransferError::Write {
                    path: PathBuf::from("stdout"),
                    source,
                })?;
            Ok(None)
        }
    }
}

/// `import GUEST FILE` (`-`: stdin).
pub fn import(client: Client, guest: GuestId, file: &Path) -> Result<Option<Printed>, ClientError> {
    let sealed = read_file(file)?;
    let mut client = client;
    // A destination that takes less than this file says so before the file
    // is sent (an older vtpmd does not say: then it decides itself).
    let caps = client.call("GetCapabilities", &Map::new())?;
    if let Some(limit) = serde_json::from_value::<CapabilitiesReply>(caps)
        .ok()
        .and_then(|c| c.max_sealed_bytes)
    {
        let size = u64::try_from(sealed.len()).unwrap_or(u64::MAX);
        if size > limit {
            let name = "io.vtpmd.Manager.SealedTooLarge";
            let parameters = json!({"guest": guest.to_string(), "size": size, "limit": limit});
            return Err(ClientError::Refused {
                name,
                message: output::describe_remote(name, &parameters),
                parameters,
            });
        }
    }
    let mut params = Map::new();
    params.insert("guest".into(), guest.to_string().into());
    params.insert(
        "sealed".into(),
        Value::String(Base64::encode_string(&sealed)),
    );
    drop(sealed);
    crate::commands::guest_reply(client.call("Import", &params)?)
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TransferError> {
    let read_err = |source| TransferError::Read {
        path: path.to_owned(),
        source,
    };
    let limit = u64::try_from(MAX_SEALED_FILE_LEN).unwrap_or(u64::MAX) + 1;
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
    } else {
        File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .map_err(read_err)?;
    }
    if bytes.len() > MAX_SEALED_FILE_LEN {
        return Err(TransferError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` so that it appears whole or not at all: a
/// temporary file (0600, created new) beside it, fsynced, then linked to
/// `path` (which fails if `path` exists) or, with `force`, renamed over
/// it; then the directory is fsynced.
pub(crate) fn write_file(path: &Path, bytes: &[u8], force: bool) -> Result<(), TransferError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| TransferError::Write { path, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| TransferError::Write {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })()
    .map_err(write_err(&tmp));
    let placed = written.and_then(|()| {
        if force {
            fs::rename(&tmp, path).map_err(write_err(path))
        } else {
            match fs::hard_link(&tmp, path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(TransferError::OutputExists {
                        path: path.to_owned(),
                    })
                }
                Err(e) => Err(write_err(path)(e)),
            }
        }
    });
    // Gone after a rename; after a link (or a failure) the temporary name
    // must not stay behind.
    let _ = fs::remove_file(&tmp);
    placed?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_is_written_0600_and_not_replaced_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sealed");
        write_file(&path, b"one", false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_file(&path, b"two", false),
            Err(TransferError::OutputExists { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_file(&path, b"two", true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
    }
}
