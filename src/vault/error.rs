use std::path::PathBuf;

use crate::protocol::GuestId;
use crate::secret::SecretError;

use super::archive::ArchiveError;
use super::format::SlotKind;
use super::kdf::KdfParams;

/// Everything that can go wrong with a sealed file.
///
/// `WrongPassphrase` and `Corrupt` are kept apart on purpose: an operator
/// must know whether to ask the guest's owner again or restore a backup.
/// Neither carries anything derived from a secret.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("wrong passphrase: no keyslot of {path} opens with it")]
    WrongPassphrase { path: PathBuf },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path} is in sealed-format version {found}; this vtpmd reads versions 1 and 2")]
    UnsupportedVersion { path: PathBuf, found: u16 },
    #[error("{params} is below OWASP's floor (m = 19 MiB, t = 2); set allow_weak_kdf to accept it")]
    WeakKdf { params: KdfParams },
    #[error("{path} belongs to guest {found}, not to guest {expected}")]
    GuestMismatch {
        path: PathBuf,
        expected: GuestId,
        found: GuestId,
    },
    #[error("the {kind} does not open any {kind} slot of {path}")]
    WrongKey { path: PathBuf, kind: SlotKind },
    #[error("{path} has no {kind} slot{}", for_host.as_ref().map(|f| format!(" for this host (fingerprint {f})")).unwrap_or_default())]
    NoKeyslot {
        path: PathBuf,
        kind: SlotKind,
        /// The host's fingerprint, for a host slot.
        for_host: Option<String>,
    },
    #[error("a key is exactly 32 bytes; this one is {len}")]
    InvalidKey { len: usize },
    #[error("keyslot {index} is a {kind} slot, not a passphrase slot")]
    NotAPassphraseSlot { index: usize, kind: SlotKind },
    #[error("keyslot {index} is the last one; add another before removing it")]
    LastKeyslot { index: usize },
    #[error("there is no keyslot {index}")]
    NoSuchKeyslot { index: usize },
    #[error("the keyslot this state was unlocked with has been removed; open it again")]
    UnlockingSlotRemoved,
    #[error("the generation counter is exhausted")]
    GenerationsExhausted,
    #[error("all {max} keyslots are in use")]
    KeyslotsFull { max: usize },
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    #[error("sealed state {path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("no sealed state at {path}")]
    Missing { path: PathBuf },
    #[error("invalid Argon2id parameters: {what}")]
    InvalidKdf { what: String },
    #[error("TPM state cannot be archived")]
    Archive(#[source] ArchiveError),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret memory")]
    Secret(#[from] SecretError),
    #[error("cryptographic failure: {what}")]
    Crypto { what: &'static str },
    #[error("the key handed across the restart does not open {path}")]
    WrongHandover { path: PathBuf },
    #[error("the key handed across the restart is not a vtpmd handover")]
    BadHandover,
    #[error("the system's random number generator failed: {what}")]
    Random { what: String },
}

impl VaultError {
    /// Whether the previous generation may stand in for the current file:
    /// only when the current one is damaged or gone. A wrong passphrase, a
    /// newer format or a file of another guest are answers, not damage.
    pub(crate) fn is_damage(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::Missing { .. })
    }
}
