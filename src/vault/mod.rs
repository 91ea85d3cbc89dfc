//! The sealed-state vault: a guest's TPM state at rest.
//!
//! Envelope encryption (`docs/sealed-format.md`): a random 256-bit data key
//! encrypts an archive of the guest's state directory with AES-256-GCM;
//! each keyslot wraps that data key under Argon2id(passphrase). Changing a
//! passphrase rewraps a keyslot and leaves the body's bytes alone; resealing
//! a new generation needs only the data key held in memory, no KDF.
//!
//! Every write is durable and atomic, and the previous generation is kept
//! beside the current one as a fallback for a damaged file.
//!
//! The vault knows nothing of processes; callers serialize the operations
//! on one guest's files (the supervisor does, per guest).

#![forbid(unsafe_code)]

mod archive;
mod crypto;
mod durable;
mod error;
mod format;
mod host_key;
mod inspect;
mod kdf;
mod sealed;
#[cfg(test)]
mod spec_vectors;
mod ticket;
mod transfer;
mod used_tickets;

pub use archive::{ArchiveEntry, ArchiveError, Skipped, StateArchive};
pub use crypto::DataKey;
pub use durable::SealedPaths;
pub use error::VaultError;
pub use format::SlotKind;
pub use host_key::{HOST_KEY_FILE_LEN, HostKey, HostKeyError, HostPublicKey, HostPublicKeyError};
pub use inspect::{HeaderInfo, KeyslotInfo, inspect, inspect_bytes};
pub use kdf::{KdfParams, KdfParamsError, KdfPolicy};
pub use sealed::{Credential, Fallback, FreshKey, LeftAsIs, Opened, SealedState, SlotSummary};
pub use ticket::{MAX_TICKET_TTL, OpenedTicket, TICKET_LEN, TicketError, open as open_ticket};
pub use transfer::{OnDisk, Placement, SealedFile, check_sealed, install, on_disk, read_sealed};
pub use used_tickets::UsedTickets;

#[doc(hidden)]
pub use archive::fuzz_archive;
#[doc(hidden)]
pub use sealed::{FuzzSealCase, fuzz_seal_open, fuzz_sealed_file};

/// Size of the per-guest swtpm state key, in bytes (AES-256).
pub const SWTPM_STATE_KEY_LEN: usize = format::DATA_KEY_LEN;

/// The largest a sealed file can be, in bytes (`docs/sealed-format.md`,
/// Limits).
pub const MAX_SEALED_FILE_LEN: usize = format::MAX_FILE_LEN;
/// The length of a `key` slot's key, in bytes.
pub const KEY_LEN: usize = format::DATA_KEY_LEN;

/// The longest passphrase accepted, in bytes.
pub const MAX_PASSPHRASE_LEN: usize = 4096;

/// Entry point for the fuzzer: decode a whole sealed file's header, with no
/// key and no I/O. Never panics; returns whether the header is well formed.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8]) -> bool {
    let decoded = format::Header::decode(bytes);
    if let Ok((header, body)) = &decoded {
        // The encoder must reproduce exactly the bytes it accepted.
        let mut again = header.encode();
        again.extend_from_slice(body);
        assert_eq!(again, bytes, "decode/encode is not canonical");
    }
    decoded.is_ok()
}
