//! A migration ticket: one guest's data key, sealed for one destination
//! host, for one generation, for a short time. The source of a live
//! migration hands it (with the sealed file) to the orchestrator, which
//! passes it to the destination; nobody on the way, the orchestrator
//! included, can read the key, and no passphrase is needed on either host.
//! The layout, the MUST rules and a vector are in docs/sealed-format.md
//! ("Migration tickets").
//!
//! ```text
//! offset size
//!      0    8  magic "VTPMTICK"
//!      8    2  version, u16 big-endian, 1
//!     10   16  guest id
//!     26    8  generation of the sealed file it goes with, u64
//!     34    8  expiry, Unix seconds, u64
//!     42   16  nonce (random; the destination takes each once)
//!     58   16  fingerprint of the destination's host public key
//!     74   32  HPKE encapsulated key
//!    106   48  the data key sealed with HPKE (32) and its tag (16)
//! ```
//!
//! HPKE: base mode, the host slots' suite, info = "vtpmd migration ticket
//! v1" || guest id, aad = bytes 0..74. Every field is authenticated, so a
//! ticket cannot be bent to another guest, generation, expiry or host.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::GuestId;
use crate::secret::SecretBuf;

use super::VaultError;
use super::crypto::{self, DataKey};
use super::format::{FINGERPRINT_LEN, WRAPPED_KEY_LEN, X25519_LEN};
use super::host_key::{HostKey, HostPublicKey};

const MAGIC: &[u8; 8] = b"VTPMTICK";
const VERSION: u16 = 1;
const INFO_LABEL: &[u8] = b"vtpmd migration ticket v1";
const NONCE_LEN: usize = 16;
/// Bytes 0..74: what the HPKE seal authenticates.
const BOUND_LEN: usize = 74;
/// The whole ticket.
pub const TICKET_LEN: usize = BOUND_LEN + X25519_LEN + WRAPPED_KEY_LEN;

/// The longest a ticket may live: a migration is started at once after
/// the ticket is made.
pub const MAX_TICKET_TTL: Duration = Duration::from_secs(3600);

/// Why a ticket is refused. None carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is {len} bytes, not {TICKET_LEN}, or not a vtpmd migration ticket")]
    Malformed { len: usize },
    #[error("the ticket is version {version}; this vtpmd reads version {VERSION}")]
    UnsupportedVersion { version: u16 },
    #[error("the ticket is for guest {found}, not {expected}")]
    OtherGuest { expected: GuestId, found: GuestId },
    #[error("the ticket is for the host with fingerprint {found}, not this one ({ours})")]
    OtherHost { ours: String, found: String },
    #[error("the ticket expired {ago:?} ago")]
    Expired { ago: Duration },
    #[error("the ticket does not open with this host's key (altered)")]
    DoesNotOpen,
    #[error("the ticket was used before: each is taken once")]
    Used,
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// What an opened ticket says, with the key as a handover
/// ([`super::SealedState::resume`]'s input).
#[derive(Debug)]
pub struct OpenedTicket {
    pub guest: GuestId,
    pub generation: u64,
    pub expires: SystemTime,
    pub nonce: [u8; NONCE_LEN],
    pub handover: SecretBuf,
}

/// Seals `data_key` of `guest` at `generation` for `destination`, valid
/// for `ttl` (at most [`MAX_TICKET_TTL`]).
pub(crate) fn seal(
    data_key: &DataKey,
    guest: &GuestId,
    generation: u64,
    destination: &HostPublicKey,
    ttl: Duration,
) -> Result<Vec<u8>, VaultError> {
    let expires = SystemTime::now()
        .checked_add(ttl.min(MAX_TICKET_TTL))
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| d.as_secs());
    let nonce: [u8; NONCE_LEN] = crypto::random_array()?;
    let mut out = Vec::with_capacity(TICKET_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(guest.as_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&destination.fingerprint());
    let (enc, wrapped) = crypto::seal_key_to_host(data_key, destination, &info(guest), &out)?;
    out.extend_from_slice(&enc);
    out.extend_from_slice(&wrapped);
    Ok(out)
}

/// Opens `bytes` for `expected` guest with this host's key, refusing a
/// ticket for another guest or host, an expired one or an altered one.
/// Whether its nonce was used before is the caller's to check.
pub fn open(
    bytes: &[u8],
    expected: GuestId,
    host: &HostKey,
    now: SystemTime,
) -> Result<OpenedTicket, TicketError> {
    if bytes.len() != TICKET_LEN || &bytes[..8] != MAGIC {
        return Err(TicketError::Malformed { len: bytes.len() });
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(TicketError::UnsupportedVersion { version });
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[10..26]);
    let found = GuestId::from_bytes(id);
    if found != expected {
        return Err(TicketError::OtherGuest { expected, found });
    }
    let generation = u64::from_be_bytes(array(&bytes[26..34]));
    let expires_secs = u64::from_be_bytes(array(&bytes[34..42]));
    let nonce: [u8; NONCE_LEN] = array(&bytes[42..58]);
    let fingerprint: [u8; FINGERPRINT_LEN] = array(&bytes[58..74]);
    let ours = host.public().fingerprint();
    if fingerprint != ours {
        return Err(TicketError::OtherHost {
            ours: hex(&ours),
            found: hex(&fingerprint),
        });
    }
    let expires = UNIX_EPOCH + Duration::from_secs(expires_secs);
    if let Ok(ago) = now.duration_since(expires) {
        return Err(TicketError::Expired { ago });
    }
    let enc: [u8; X25519_LEN] = array(&bytes[BOUND_LEN..BOUND_LEN + X25519_LEN]);
    let wrapped: [u8; WRAPPED_KEY_LEN] = array(&bytes[BOUND_LEN + X25519_LEN..]);
    let data_key =
        crypto::open_key_from_host(host, &info(&found), &bytes[..BOUND_LEN], &enc, &wrapped)?
            .ok_or(TicketError::DoesNotOpen)?;
    Ok(OpenedTicket {
        guest: found,
        generation,
        expires,
        nonce,
        handover: super::sealed::handover_of(&data_key)?,
    })
}

fn info(guest: &GuestId) -> Vec<u8> {
    let mut info = INFO_LABEL.to_vec();
    info.extend_from_slice(guest.as_bytes());
    info
}

/// `N` bytes of a slice whose length the caller has checked.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(n: u8) -> GuestId {
        GuestId::from_bytes([n; 16])
    }

    fn ticket(host: &HostKey, ttl: Duration) -> (DataKey, Vec<u8>) {
        let key = DataKey::generate().unwrap();
        let bytes = seal(&key, &guest(1), 7, &host.public(), ttl).unwrap();
        (key, bytes)
    }

    use crate::vault::spec_vectors::vector;

    /// The ticket was sealed by the outside reader's own HPKE (Python,
    /// cryptography), from the spec alone: the independent check.
    #[test]
    fn the_specs_ticket_vector_opens_here_and_only_for_its_guest_and_host() {
        use secrecy::ExposeSecret;
        let private = vector("host_private_key");
        let mut secret = SecretBuf::with_capacity(private.len()).unwrap();
        secret.extend_from_slice(&private).unwrap();
        let host = HostKey::from_private_for_test(secret);
        let bytes = vector("ticket");
        let g = GuestId::parse("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40").unwrap();
        let opened = open(&bytes, g, &host, SystemTime::now()).unwrap();
        assert_eq!(opened.generation, 7);
        assert_eq!(
            opened.expires,
            UNIX_EPOCH + Duration::from_secs(4_102_444_800)
        );
        let nonce: Vec<u8> = (0xe0..=0xef).collect();
        assert_eq!(opened.nonce.as_slice(), nonce.as_slice());
        // The handover: a version byte, "no slot", the data key.
        let handover = opened.handover.expose_secret();
        assert_eq!(&handover[2..], vector("data_key").as_slice());
        assert!(matches!(
            open(&bytes, guest(9), &host, SystemTime::now()),
            Err(TicketError::OtherGuest { .. })
        ));
        let other = HostKey::generate().unwrap();
        assert!(matches!(
            open(&bytes, g, &other, SystemTime::now()),
            Err(TicketError::OtherHost { .. })
        ));
    }

    #[test]
    fn a_ticket_opens_on_its_host_for_its_guest_with_the_key() {
        let host = HostKey::generate().unwrap();
        let (key, bytes) = ticket(&host, Duration::from_secs(60));
        assert_eq!(bytes.len(), TICKET_LEN);
        let opened = open(&bytes, guest(1), &host, SystemTime::now()).unwrap();
        assert_eq!(opened.generation, 7);
        let expected = super::super::sealed::handover_of(&key).unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(
            opened.handover.expose_secret(),
            expected.expose_secret(),
            "not the data key"
        );
    }

    #[test]
    fn every_misuse_is_its_own_refusal() {
        let host = HostKey::generate().unwrap();
        let other = HostKey::generate().unwrap();
        let (_, bytes) = ticket(&host, Duration::from_secs(60));
        let now = SystemTime::now();
        assert!(matches!(
            open(&bytes, guest(2), &host, now),
            Err(TicketError::OtherGuest { .. })
        ));
        assert!(matches!(
            open(&bytes, guest(1), &other, now),
            Err(TicketError::OtherHost { .. })
        ));
        assert!(matches!(
            open(&bytes, guest(1), &host, now + Duration::from_secs(61)),
            Err(TicketError::Expired { .. })
        ));
        assert!(matches!(
            open(&bytes[..100], guest(1), &host, now),
            Err(TicketError::Malformed { len: 100 })
        ));
        // Every byte is authenticated: a flipped bit anywhere is refused,
        // by its own check or by the seal.
        for at in 0..bytes.len() {
            let mut bent = bytes.clone();
            bent[at] ^= 0x01;
            assert!(open(&bent, guest(1), &host, now).is_err(), "byte {at}");
        }
        // The expiry pushed back (a ticket made to last longer) no longer
        // opens: the seal covers it.
        let mut later = bytes.clone();
        later[41] = later[41].wrapping_add(1);
        assert!(matches!(
            open(&later, guest(1), &host, now),
            Err(TicketError::DoesNotOpen)
        ));
    }
}
