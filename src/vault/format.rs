//! Byte layout of a sealed file, versions 1 and 2 (`docs/sealed-format.md`).
//!
//! Pure encoding and decoding: no I/O, no keys. Decoding accepts exactly one
//! encoding of each header and rejects everything else, so this is what the
//! fuzzer drives.

use crate::be::Reader;
use crate::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};

use super::kdf::KdfParams;

/// "The file MUST begin with the 8 bytes `VTPMSEAL`."
pub(crate) const MAGIC: &[u8; 8] = b"VTPMSEAL";
/// The version of a file whose keyslots are all passphrase slots: what
/// every vtpmd so far reads.
pub(crate) const VERSION: u16 = 1;
/// The version of a file that holds a `key` or `host` slot. Older readers
/// refuse such a file as a newer version (not as corruption), and a file
/// whose last such slot is removed is readable by them again.
pub(crate) const VERSION_KINDS: u16 = 2;
/// Bytes of a host slot's fingerprint of the host's public key.
pub(crate) const FINGERPRINT_LEN: usize = 16;
/// An X25519 public key, and HPKE's encapsulated key (Nenc).
pub(crate) const X25519_LEN: usize = 32;

pub(crate) const SALT_LEN: usize = 32;
pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;
pub(crate) const DATA_KEY_LEN: usize = 32;
pub(crate) const WRAPPED_KEY_LEN: usize = DATA_KEY_LEN + TAG_LEN;
const CHECKSUM_LEN: usize = 32;

/// Bytes 0..84: everything the body is bound to.
pub(crate) const BOUND_LEN: usize = 8 + 2 + 16 + 8 + 1 + 1 + SALT_LEN + NONCE_LEN + 4;
/// One keyslot record.
pub(crate) const KEYSLOT_LEN: usize = 1 + 1 + 4 + 4 + 4 + SALT_LEN + NONCE_LEN + WRAPPED_KEY_LEN;
/// The part of a keyslot that its wrapped key is bound to (kind .. salt).
pub(crate) const KEYSLOT_BOUND_LEN: usize = KEYSLOT_LEN - NONCE_LEN - WRAPPED_KEY_LEN;
pub(crate) const MAX_KEYSLOTS: usize = 8;
/// "Decoders MUST reject a body longer than 16 MiB plus the tag."
pub(crate) const MAX_BODY_LEN: usize = 16 * 1024 * 1024 + TAG_LEN;
/// The largest a whole sealed file can be.
pub(crate) const MAX_FILE_LEN: usize = header_len(MAX_KEYSLOTS) + MAX_BODY_LEN;

const KEYSLOT_KIND_ARGON2ID: u8 = 1;
const KEYSLOT_KIND_KEY: u8 = 2;
const KEYSLOT_KIND_HOST: u8 = 3;
const ARGON2_VERSION_0X13: u8 = 0x13;
/// Where each field of a record starts; the wrapped key ends every kind.
const KEY_SALT_AT: usize = 14;
const HOST_FINGERPRINT_AT: usize = 10;
const HOST_ENC_AT: usize = HOST_FINGERPRINT_AT + FINGERPRINT_LEN;
const WRAPPED_AT: usize = KEYSLOT_LEN - WRAPPED_KEY_LEN;
/// A host slot authenticates kind, reserved bytes and fingerprint.
pub(crate) const HOST_BOUND_LEN: usize = HOST_ENC_AT;
const _: () = assert!(HOST_ENC_AT + X25519_LEN == WRAPPED_AT);
const _: () = assert!(KEY_SALT_AT + SALT_LEN + NONCE_LEN == WRAPPED_AT);

/// The header fields the body is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bound {
    pub guest: GuestId,
    pub generation: u64,
    pub spec: TpmSpec,
    pub body_salt: [u8; SALT_LEN],
    pub body_nonce: [u8; NONCE_LEN],
    /// Ciphertext length including the GCM tag.
    pub body_len: u32,
}

/// One keyslot: the data key wrapped for one way of opening the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Keyslot {
    /// Under Argon2id(passphrase): a person's secret.
    Passphrase {
        kdf: KdfParams,
        salt: [u8; SALT_LEN],
        nonce: [u8; NONCE_LEN],
        wrapped_key: [u8; WRAPPED_KEY_LEN],
    },
    /// Under HKDF(a random 256-bit key from a key manager): no stretching,
    /// since a random key cannot be guessed.
    Key {
        salt: [u8; SALT_LEN],
        nonce: [u8; NONCE_LEN],
        wrapped_key: [u8; WRAPPED_KEY_LEN],
    },
    /// HPKE (RFC 9180, base mode) to one host's X25519 key.
    Host {
        fingerprint: [u8; FINGERPRINT_LEN],
        enc: [u8; X25519_LEN],
        wrapped_key: [u8; WRAPPED_KEY_LEN],
    },
}

/// A keyslot's kind, as `inspect`, `Status` and errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SlotKind {
    #[serde(rename = "argon2id-passphrase")]
    Passphrase,
    #[serde(rename = "key")]
    Key,
    #[serde(rename = "host")]
    Host,
}

impl SlotKind {
    /// The kind [`as_str`](Self::as_str) names.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Passphrase, Self::Key, Self::Host]
            .into_iter()
            .find(|k| k.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passphrase => "argon2id-passphrase",
            Self::Key => "key",
            Self::Host => "host",
        }
    }
}

impl std::fmt::Display for SlotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub bound: Bound,
    pub keyslots: Vec<Keyslot>,
}

/// What a decoder found wrong, before any key is involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FormatError {
    #[error("not a vtpmd sealed file (bad magic)")]
    BadMagic,
    #[error("sealed-format version {0}")]
    UnsupportedVersion(u16),
    #[error("format version 2 with passphrase keyslots only (such a file is version 1)")]
    NeedlessVersion,
    #[error("file ends inside the header ({len} bytes)")]
    TruncatedHeader { len: usize },
    #[error("header checksum mismatch")]
    Checksum,
    #[error("keyslot count {0} is outside 1..=8")]
    KeyslotCount(u8),
    #[error("keyslot {index}: {what}")]
    Keyslot { index: usize, what: String },
    #[error("generation 0 (generations start at 1)")]
    Generation,
    #[error("unknown TPM version code {0}")]
    TpmVersion(u8),
    #[error("unknown TPM model code {0}")]
    TpmModel(u8),
    #[error("TPM model and version do not go together")]
    TpmSpec,
    #[error("body length {0} is outside 16..=16 MiB+16")]
    BodyLength(u32),
    #[error("file is {actual} bytes, header says {expected}")]
    FileLength { expected: usize, actual: usize },
}

impl Header {
    /// "Decoders MUST check the magic, then the version, before anything
    /// else."
    pub(crate) fn check_magic_and_version(file: &[u8]) -> Result<u16, FormatError> {
        let mut r = Reader::new(file);
        if r.take(MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(FormatError::BadMagic);
        }
        let version = r
            .u16()
            .ok_or(FormatError::TruncatedHeader { len: file.len() })?;
        if version != VERSION && version != VERSION_KINDS {
            return Err(FormatError::UnsupportedVersion(version));
        }
        Ok(version)
    }

    /// Version 2 exactly when a slot needs it: one encoding per header, and
    /// a file old readers can open stays one they can open.
    pub(crate) fn version(&self) -> u16 {
        if self
            .keyslots
            .iter()
            .all(|s| s.kind() == SlotKind::Passphrase)
        {
            VERSION
        } else {
            VERSION_KINDS
        }
    }

    pub(crate) fn encoded_len(&self) -> usize {
        header_len(self.keyslots.len())
    }

    /// Encodes the header, checksum included. The caller appends the body.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len() + self.bound.body_len as usize);
        out.extend_from_slice(&self.bound.encode());
        // The bound bytes say version 1 (what the body authenticates); the
        // file says which version its keyslots need.
        out[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&self.version().to_be_bytes());
        let count = u8::try_from(self.keyslots.len()).unwrap_or(u8::MAX);
        out.push(count);
        for slot in &self.keyslots {
            out.extend_from_slice(&slot.encode());
        }
        let checksum = sha256(&out);
        out.extend_from_slice(&checksum);
        out
    }

    /// Decodes a whole sealed file into its header and the body bytes.
    ///
    /// Order matters: magic and version first, so that a file of a newer
    /// format says so instead of failing its checksum.
    pub(crate) fn decode(file: &[u8]) -> Result<(Header, &[u8]), FormatError> {
        let version = Self::check_magic_and_version(file)?;
        let mut r = Reader::new(file);
        r.take(MAGIC.len() + 2);
        let count = *file
            .get(BOUND_LEN)
            .ok_or(FormatError::TruncatedHeader { len: file.len() })?;
        if count == 0 || usize::from(count) > MAX_KEYSLOTS {
            return Err(FormatError::KeyslotCount(count));
        }
        let header_len = header_len(usize::from(count));
        let header_bytes = file
            .get(..header_len)
            .ok_or(FormatError::TruncatedHeader { len: file.len() })?;
        let (covered, checksum) = header_bytes.split_at(header_len - CHECKSUM_LEN);
        if sha256(covered) != checksum {
            return Err(FormatError::Checksum);
        }

        let bound = Bound::decode(&mut r)?;
        r.take(1); // keyslot count, read above
        let keyslots = (0..usize::from(count))
            .map(|index| Keyslot::decode(&mut r, index, version))
            .collect::<Result<Vec<_>, _>>()?;
        let header = Header { bound, keyslots };
        if header.version() != version {
            return Err(FormatError::NeedlessVersion);
        }
        let Header { bound, keyslots } = header;
        let body = file.get(header_len..).unwrap_or_default();
        let expected = header_len + bound.body_len as usize;
        if body.len() != bound.body_len as usize {
            return Err(FormatError::FileLength {
                expected,
                actual: file.len(),
            });
        }
        Ok((Header { bound, keyslots }, body))
    }
}

pub(crate) const fn header_len(keyslots: usize) -> usize {
    BOUND_LEN + 1 + keyslots * KEYSLOT_LEN + CHECKSUM_LEN
}

impl Bound {
    /// The 84 bound bytes as the body authenticates them: with version 1
    /// whatever the file's version, so adding or removing a `key` or
    /// `host` slot (which changes the file's version) leaves the body's
    /// bytes as they are.
    pub(crate) fn encode(&self) -> [u8; BOUND_LEN] {
        let mut out = [0u8; BOUND_LEN];
        let mut w = Writer::new(&mut out);
        w.put(MAGIC);
        w.put(&VERSION.to_be_bytes());
        w.put(self.guest.as_bytes());
        w.put(&self.generation.to_be_bytes());
        w.put(&[
            version_code(self.spec.version()),
            model_code(self.spec.model()),
        ]);
        w.put(&self.body_salt);
        w.put(&self.body_nonce);
        w.put(&self.body_len.to_be_bytes());
        out
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        // Magic and version were checked by the caller; the checksum passed,
        // so every read below is within the header.
        let truncated = FormatError::TruncatedHeader { len: 0 };
        let guest = GuestId::from_bytes(r.array().ok_or(truncated.clone())?);
        let generation = r.u64().ok_or(truncated.clone())?;
        if generation == 0 {
            return Err(FormatError::Generation);
        }
        let version = match r.u8().ok_or(truncated.clone())? {
            1 => TpmVersion::V1_2,
            2 => TpmVersion::V2_0,
            other => return Err(FormatError::TpmVersion(other)),
        };
        let model = match r.u8().ok_or(truncated.clone())? {
            1 => TpmModel::Tis,
            2 => TpmModel::Crb,
            other => return Err(FormatError::TpmModel(other)),
        };
        let spec = TpmSpec::new(version, model).map_err(|_| FormatError::TpmSpec)?;
        let body_salt = r.array().ok_or(truncated.clone())?;
        let body_nonce = r.array().ok_or(truncated.clone())?;
        let body_len = r.u32().ok_or(truncated)?;
        if (body_len as usize) < TAG_LEN || body_len as usize > MAX_BODY_LEN {
            return Err(FormatError::BodyLength(body_len));
        }
        Ok(Self {
            guest,
            generation,
            spec,
            body_salt,
            body_nonce,
            body_len,
        })
    }
}

impl Keyslot {
    pub(crate) fn kind(&self) -> SlotKind {
        match self {
            Self::Passphrase { .. } => SlotKind::Passphrase,
            Self::Key { .. } => SlotKind::Key,
            Self::Host { .. } => SlotKind::Host,
        }
    }

    /// The bytes the wrapped key is bound to (`S` in the spec): bytes
    /// 0..46 of a passphrase or key slot (kind through salt), 0..26 of a
    /// host slot (kind, reserved bytes, fingerprint).
    pub(crate) fn bound_bytes(&self) -> Vec<u8> {
        let record = self.encode();
        let len = match self {
            Self::Passphrase { .. } | Self::Key { .. } => KEYSLOT_BOUND_LEN,
            Self::Host { .. } => HOST_BOUND_LEN,
        };
        record[..len].to_vec()
    }

    pub(crate) fn wrapped_key(&self) -> &[u8; WRAPPED_KEY_LEN] {
        match self {
            Self::Passphrase { wrapped_key, .. }
            | Self::Key { wrapped_key, .. }
            | Self::Host { wrapped_key, .. } => wrapped_key,
        }
    }

    fn encode(&self) -> [u8; KEYSLOT_LEN] {
        let mut out = [0u8; KEYSLOT_LEN];
        let mut w = Writer::new(&mut out);
        match self {
            Self::Passphrase {
                kdf,
                salt,
                nonce,
                wrapped_key,
            } => {
                w.put(&[KEYSLOT_KIND_ARGON2ID, ARGON2_VERSION_0X13]);
                w.put(&kdf.memory_kib().to_be_bytes());
                w.put(&kdf.iterations().to_be_bytes());
                w.put(&kdf.lanes().to_be_bytes());
                w.put(salt);
                w.put(nonce);
                w.put(wrapped_key);
            }
            Self::Key {
                salt,
                nonce,
                wrapped_key,
            } => {
                w.put(&[KEYSLOT_KIND_KEY]);
                w.put(&[0; KEY_SALT_AT - 1]);
                w.put(salt);
                w.put(nonce);
                w.put(wrapped_key);
            }
            Self::Host {
                fingerprint,
                enc,
                wrapped_key,
            } => {
                w.put(&[KEYSLOT_KIND_HOST]);
                w.put(&[0; HOST_FINGERPRINT_AT - 1]);
                w.put(fingerprint);
                w.put(enc);
                w.put(wrapped_key);
            }
        }
        out
    }

    pub(super) fn decode(
        r: &mut Reader<'_>,
        index: usize,
        version: u16,
    ) -> Result<Self, FormatError> {
        let bad = |what: String| FormatError::Keyslot { index, what };
        let truncated = || bad("truncated".to_owned());
        let record: [u8; KEYSLOT_LEN] = r.array().ok_or_else(truncated)?;
        let mut r = Reader::new(&record);
        let kind = r.u8().ok_or_else(truncated)?;
        let reserved_zero = |from: usize, to: usize| {
            if record[from..to].iter().any(|&b| b != 0) {
                Err(bad(format!(
                    "reserved bytes {from}..{to} of a kind {kind} slot are not zero"
                )))
            } else {
                Ok(())
            }
        };
        match kind {
            KEYSLOT_KIND_ARGON2ID => {
                let argon2_version = r.u8().ok_or_else(truncated)?;
                if argon2_version != ARGON2_VERSION_0X13 {
                    return Err(bad(format!("unknown Argon2 version {argon2_version:#x}")));
                }
                let memory_kib = r.u32().ok_or_else(truncated)?;
                let iterations = r.u32().ok_or_else(truncated)?;
                let lanes = r.u32().ok_or_else(truncated)?;
                let kdf = KdfParams::new(memory_kib, iterations, lanes)
                    .map_err(|e| bad(e.to_string()))?;
                Ok(Self::Passphrase {
                    kdf,
                    salt: r.array().ok_or_else(truncated)?,
                    nonce: r.array().ok_or_else(truncated)?,
                    wrapped_key: r.array().ok_or_else(truncated)?,
                })
            }
            KEYSLOT_KIND_KEY | KEYSLOT_KIND_HOST if version == VERSION => Err(bad(format!(
                "keyslot kind {kind} in a version 1 file (it needs version 2)"
            ))),
            KEYSLOT_KIND_KEY => {
                reserved_zero(1, KEY_SALT_AT)?;
                r.take(KEY_SALT_AT - 1);
                Ok(Self::Key {
                    salt: r.array().ok_or_else(truncated)?,
                    nonce: r.array().ok_or_else(truncated)?,
                    wrapped_key: r.array().ok_or_else(truncated)?,
                })
            }
            KEYSLOT_KIND_HOST => {
                reserved_zero(1, HOST_FINGERPRINT_AT)?;
                r.take(HOST_FINGERPRINT_AT - 1);
                Ok(Self::Host {
                    fingerprint: r.array().ok_or_else(truncated)?,
                    enc: r.array().ok_or_else(truncated)?,
                    wrapped_key: r.array().ok_or_else(truncated)?,
                })
            }
            other => Err(bad(format!("unknown keyslot kind {other}"))),
        }
    }
}

/// For the fuzzer: `file` with the header checksum its keyslot count calls
/// for made right, so that mutated inputs get past it to the field checks.
/// `None` when the file is too short to have a checksum.
pub(crate) fn with_valid_checksum(file: &[u8]) -> Option<Vec<u8>> {
    let count = usize::from(*file.get(BOUND_LEN)?);
    if count == 0 || count > MAX_KEYSLOTS {
        return None;
    }
    let end = header_len(count);
    let mut fixed = file.to_vec();
    let checksum = sha256(fixed.get(..end - CHECKSUM_LEN)?);
    fixed
        .get_mut(end - CHECKSUM_LEN..end)?
        .copy_from_slice(&checksum);
    Some(fixed)
}

fn version_code(version: TpmVersion) -> u8 {
    match version {
        TpmVersion::V1_2 => 1,
        TpmVersion::V2_0 => 2,
    }
}

fn model_code(model: TpmModel) -> u8 {
    match model {
        TpmModel::Tis => 1,
        TpmModel::Crb => 2,
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Fills a fixed-size buffer front to back; the layouts above size the
/// buffers exactly, which the unit tests check.
struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Self { out, at: 0 }
    }

    fn put(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        self.out[self.at..end].copy_from_slice(bytes);
        self.at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_header(slots: usize) -> Header {
        let guest = GuestId::parse("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40").unwrap();
        Header {
            bound: Bound {
                guest,
                generation: 7,
                spec: TpmSpec::new(TpmVersion::V2_0, TpmModel::Crb).unwrap(),
                body_salt: [1; SALT_LEN],
                body_nonce: [2; NONCE_LEN],
                body_len: 20,
            },
            keyslots: (0..slots)
                .map(|i| Keyslot::Passphrase {
                    kdf: KdfParams::new(65536, 3, 4).unwrap(),
                    salt: [u8::try_from(i).unwrap(); SALT_LEN],
                    nonce: [4; NONCE_LEN],
                    wrapped_key: [5; WRAPPED_KEY_LEN],
                })
                .collect(),
        }
    }

    fn sample_file(slots: usize) -> Vec<u8> {
        let header = sample_header(slots);
        let mut file = header.encode();
        file.extend_from_slice(&[9u8; 20]);
        file
    }

    #[test]
    fn layout_constants_match_the_spec() {
        assert_eq!(BOUND_LEN, 84);
        assert_eq!(KEYSLOT_LEN, 106);
        assert_eq!(header_len(1), 223);
    }

    #[test]
    fn header_round_trips_with_every_keyslot_count() {
        for slots in 1..=MAX_KEYSLOTS {
            let header = sample_header(slots);
            let file = sample_file(slots);
            let (decoded, body) = Header::decode(&file).unwrap();
            assert_eq!(decoded, header);
            assert_eq!(body, &[9u8; 20]);
            assert_eq!(decoded.encode(), file[..header.encoded_len()]);
        }
    }

    #[test]
    fn a_newer_version_is_reported_as_such_not_as_corruption() {
        let mut file = sample_file(1);
        file[9] = 3;
        assert_eq!(
            Header::decode(&file).unwrap_err(),
            FormatError::UnsupportedVersion(3)
        );
    }

    fn mixed_header() -> Header {
        let mut header = sample_header(1);
        header.keyslots.push(Keyslot::Key {
            salt: [6; SALT_LEN],
            nonce: [7; NONCE_LEN],
            wrapped_key: [8; WRAPPED_KEY_LEN],
        });
        header.keyslots.push(Keyslot::Host {
            fingerprint: [9; FINGERPRINT_LEN],
            enc: [10; X25519_LEN],
            wrapped_key: [11; WRAPPED_KEY_LEN],
        });
        header
    }

    #[test]
    fn key_and_host_slots_round_trip_in_version_2_only() {
        let header = mixed_header();
        assert_eq!(header.version(), VERSION_KINDS);
        let mut file = header.encode();
        assert_eq!(&file[8..10], &[0, 2]);
        file.extend_from_slice(&[9u8; 20]);
        let (decoded, _) = Header::decode(&file).unwrap();
        assert_eq!(decoded, header);
        // The same slots under version 1 are refused, and so is version 2
        // with passphrase slots only.
        let mut as_v1 = file.clone();
        as_v1[9] = 1;
        let as_v1 = with_valid_checksum(&as_v1).unwrap();
        assert!(matches!(
            Header::decode(&as_v1),
            Err(FormatError::Keyslot { index: 1, .. })
        ));
        let mut plain = sample_file(2);
        plain[9] = 2;
        let plain = with_valid_checksum(&plain).unwrap();
        assert_eq!(
            Header::decode(&plain).unwrap_err(),
            FormatError::NeedlessVersion
        );
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        let header = mixed_header();
        let mut file = header.encode();
        file.extend_from_slice(&[9u8; 20]);
        for (slot, at) in [(1, 1), (1, 13), (2, 1), (2, 9)] {
            let mut bad = file.clone();
            bad[BOUND_LEN + 1 + slot * KEYSLOT_LEN + at] = 1;
            let bad = with_valid_checksum(&bad).unwrap();
            assert!(
                matches!(Header::decode(&bad), Err(FormatError::Keyslot { .. })),
                "slot {slot} byte {at}"
            );
        }
    }

    #[test]
    fn any_flipped_header_bit_is_rejected() {
        let file = sample_file(2);
        for bit in 0..header_len(2) * 8 {
            let mut bad = file.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::decode(&bad).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn trailing_or_missing_body_bytes_are_rejected() {
        let mut long = sample_file(1);
        long.push(0);
        assert!(matches!(
            Header::decode(&long),
            Err(FormatError::FileLength { .. })
        ));
        let short = &sample_file(1)[..header_len(1) + 19];
        assert!(matches!(
            Header::decode(short),
            Err(FormatError::FileLength { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let file = sample_file(3);
        for len in 0..file.len() {
            assert!(
                Header::decode(&file[..len]).is_err(),
                "length {len} accepted"
            );
        }
    }
}
