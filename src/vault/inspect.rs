//! What an operator may see of a sealed file without any secret, like
//! `cryptsetup luksDump`.

use std::path::Path;

use crate::protocol::GuestId;

use super::VaultError;
use super::durable;
use super::format::{FormatError, Header, Keyslot, MAX_FILE_LEN, header_len};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderInfo {
    pub format_version: u16,
    pub guest: GuestId,
    pub generation: u64,
    pub tpm_version: &'static str,
    pub tpm_model: &'static str,
    pub header_bytes: usize,
    pub body_bytes: usize,
    pub keyslots: Vec<KeyslotInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyslotInfo {
    pub index: usize,
    pub kind: &'static str,
    /// Argon2id parameters, of a passphrase slot only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argon2_memory_kib: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argon2_iterations: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argon2_lanes: Option<u32>,
    /// A host slot's host: the fingerprint of its public key (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_fingerprint: Option<String>,
}

impl HeaderInfo {
    /// Each keyslot's kind and host, as the supervisor reports them.
    pub fn slot_summaries(&self) -> Vec<super::SlotSummary> {
        self.keyslots
            .iter()
            .filter_map(|slot| {
                Some(super::SlotSummary {
                    index: slot.index,
                    kind: super::SlotKind::parse(slot.kind)?,
                    host_fingerprint: slot.host_fingerprint.clone(),
                })
            })
            .collect()
    }
}

/// Reads and describes a sealed file's header.
pub fn inspect(path: &Path) -> Result<HeaderInfo, VaultError> {
    let bytes = durable::read(path, MAX_FILE_LEN)?.ok_or_else(|| VaultError::Missing {
        path: path.to_owned(),
    })?;
    inspect_bytes(path, &bytes)
}

/// Describes a sealed file already in memory; `path` names it in errors.
pub fn inspect_bytes(path: &Path, bytes: &[u8]) -> Result<HeaderInfo, VaultError> {
    let (header, body) = decode(path, bytes)?;
    Ok(HeaderInfo {
        format_version: header.version(),
        guest: header.bound.guest,
        generation: header.bound.generation,
        tpm_version: header.bound.spec.version().as_str(),
        tpm_model: header.bound.spec.model().as_str(),
        header_bytes: header_len(header.keyslots.len()),
        body_bytes: body.len(),
        keyslots: header
            .keyslots
            .iter()
            .enumerate()
            .map(|(index, slot)| {
                let kdf = match slot {
                    Keyslot::Passphrase { kdf, .. } => Some(*kdf),
                    _ => None,
                };
                KeyslotInfo {
                    index,
                    kind: slot.kind().as_str(),
                    argon2_memory_kib: kdf.map(|k| k.memory_kib()),
                    argon2_iterations: kdf.map(|k| k.iterations()),
                    argon2_lanes: kdf.map(|k| k.lanes()),
                    host_fingerprint: match slot {
                        Keyslot::Host { fingerprint, .. } => {
                            Some(super::host_key::hex(fingerprint))
                        }
                        _ => None,
                    },
                }
            })
            .collect(),
    })
}

/// Decodes a sealed file, mapping format errors to the vault's: a newer
/// version is reported as such, everything else as corruption.
pub(crate) fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<(Header, &'a [u8]), VaultError> {
    let to_vault = |e| match e {
        FormatError::UnsupportedVersion(found) => VaultError::UnsupportedVersion {
            path: path.to_owned(),
            found,
        },
        other => VaultError::Corrupt {
            path: path.to_owned(),
            what: other.to_string(),
        },
    };
    // Magic and version before anything else, size included, so that a
    // file of a newer format says so whatever its length.
    Header::check_magic_and_version(bytes).map_err(to_vault)?;
    if bytes.len() > MAX_FILE_LEN {
        return Err(VaultError::Corrupt {
            path: path.to_owned(),
            what: format!("larger than the {MAX_FILE_LEN} bytes a sealed file can be"),
        });
    }
    Header::decode(bytes).map_err(to_vault)
}
