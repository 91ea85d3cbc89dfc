//! The AEAD and KDF steps of the format, each a small function over keys
//! held in `SecretBuf`s. Every cipher and HKDF runs inside
//! [`on_scrubbed_stack`]: no key, key schedule or PRK is left on a thread's
//! stack once a function here has returned.

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use secrecy::{ExposeSecret, ExposeSecretMut};
use sha2::Sha256;

use crate::protocol::GuestId;
use crate::secret::SecretBuf;
use crate::secret::scrub::on_scrubbed_stack;

use super::VaultError;
use super::format::{
    DATA_KEY_LEN, Keyslot, NONCE_LEN, SALT_LEN, TAG_LEN, WRAPPED_KEY_LEN, X25519_LEN,
};
use super::host_key::{HostKey, HostPublicKey};

/// HKDF labels: each derived key has its own, so no two uses share a key.
const BODY_KEY_LABEL: &[u8] = b"vtpmd sealed body key v1";
const SWTPM_STATE_KEY_LABEL: &[u8] = b"vtpmd swtpm state key v1";
const SWTPM_MIGRATION_KEY_LABEL: &[u8] = b"vtpmd swtpm migration key v1";
const KEYSLOT_AAD_LABEL: &[u8] = b"vtpmd keyslot v1";
/// HKDF info of a `key` slot's KEK (followed by the guest id).
const KEY_SLOT_LABEL: &[u8] = b"vtpmd key keyslot v2";
/// HPKE info of a `host` slot (followed by the guest id).
const HOST_SLOT_LABEL: &[u8] = b"vtpmd host keyslot v2";

/// The HPKE suite of host slots: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
/// AES-256-GCM (RFC 9180 ids 0x0020, 0x0001, 0x0002), base mode.
type HostKem = hpke::kem::X25519HkdfSha256;
type HostKdf = hpke::kdf::HkdfSha256;
type HostAead = hpke::aead::AesGcm256;

/// The guest's 256-bit data key: it encrypts every generation of the body
/// (through a per-generation subkey) and is what keyslots wrap.
pub struct DataKey(SecretBuf);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    pub(crate) fn generate() -> Result<Self, VaultError> {
        Ok(Self(SecretBuf::random(DATA_KEY_LEN)?))
    }

    /// The key's bytes copied into `out` (locked memory), for a handover.
    pub(crate) fn copy_into(&self, out: &mut [u8]) {
        out.copy_from_slice(self.0.expose_secret());
    }

    /// A data key from its bytes (a handover); `None` for a wrong length.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Option<Self>, VaultError> {
        if bytes.len() != DATA_KEY_LEN {
            return Ok(None);
        }
        let mut key = SecretBuf::zeroed(DATA_KEY_LEN)?;
        key.expose_secret_mut().copy_from_slice(bytes);
        Ok(Some(Self(key)))
    }

    /// The key swtpm encrypts its state files with (`--key fd=…,
    /// format=hex,mode=aes-256-cbc`; the spawner writes it as hex):
    /// derived, so the data key itself never leaves vtpmd, and bound to
    /// the guest.
    pub fn swtpm_state_key(&self, guest: &GuestId) -> Result<SecretBuf, VaultError> {
        let mut info = Vec::with_capacity(SWTPM_STATE_KEY_LABEL.len() + 16);
        info.extend_from_slice(SWTPM_STATE_KEY_LABEL);
        info.extend_from_slice(guest.as_bytes());
        self.expand(None, &info)
    }

    /// The key swtpm encrypts its outgoing state blobs with
    /// (`--migration-key`): its own label, so neither key reveals the other,
    /// and the same on every host that holds the data key, so a migration's
    /// destination swtpm reads what the source's wrote.
    pub fn swtpm_migration_key(&self, guest: &GuestId) -> Result<SecretBuf, VaultError> {
        let mut info = Vec::with_capacity(SWTPM_MIGRATION_KEY_LABEL.len() + 16);
        info.extend_from_slice(SWTPM_MIGRATION_KEY_LABEL);
        info.extend_from_slice(guest.as_bytes());
        self.expand(None, &info)
    }

    /// The key of one generation's body: a fresh salt per seal means a fresh
    /// key per seal, so GCM's nonce limit never comes into play however
    /// often a guest's state is resealed.
    pub(crate) fn body_key(&self, body_salt: &[u8; SALT_LEN]) -> Result<SecretBuf, VaultError> {
        self.expand(Some(body_salt), BODY_KEY_LABEL)
    }

    /// HKDF-SHA256 of the data key into locked memory. The hkdf crate keeps
    /// the PRK and each HMAC output in stack arrays of its own, and its
    /// HMAC states (key-equivalent) are moved by value: all of that is
    /// wiped with the stack it used.
    fn expand(&self, salt: Option<&[u8]>, info: &[u8]) -> Result<SecretBuf, VaultError> {
        let mut out = SecretBuf::zeroed(DATA_KEY_LEN)?;
        on_scrubbed_stack(|| {
            Hkdf::<Sha256>::new(salt, self.0.expose_secret()).expand(info, out.expose_secret_mut())
        })
        .map_err(|_| VaultError::Crypto {
            what: "HKDF expand",
        })?;
        Ok(out)
    }
}

/// Associated data of a keyslot's wrapped key: the label, the guest and the
/// slot's own bound bytes (kind, parameters, salt or fingerprint).
fn keyslot_aad(guest: &GuestId, slot: &Keyslot) -> Vec<u8> {
    let mut aad = Vec::new();
    aad.extend_from_slice(KEYSLOT_AAD_LABEL);
    aad.extend_from_slice(guest.as_bytes());
    aad.extend_from_slice(&slot.bound_bytes());
    aad
}

/// Wraps `data_key` under `kek` into `slot` (a passphrase or key slot
/// whose parameters and salt are already set), with a fresh nonce. The
/// data key is read from its locked pages and only its ciphertext is
/// written into the slot: no plaintext copy of it exists outside locked
/// memory, not even for an instant.
pub(crate) fn wrap_key(
    kek: &SecretBuf,
    data_key: &DataKey,
    guest: &GuestId,
    slot: &mut Keyslot,
) -> Result<(), VaultError> {
    let aad = keyslot_aad(guest, slot);
    let (nonce_field, wrapped_key) = match slot {
        Keyslot::Passphrase {
            nonce, wrapped_key, ..
        }
        | Keyslot::Key {
            nonce, wrapped_key, ..
        } => (nonce, wrapped_key),
        Keyslot::Host { .. } => {
            return Err(VaultError::Crypto {
                what: "a host slot is wrapped with HPKE, not a KEK",
            });
        }
    };
    *nonce_field = random_array()?;
    let nonce = Nonce::from(*nonce_field);
    let (body, tag) = wrapped_key.split_at_mut(DATA_KEY_LEN);
    let produced = on_scrubbed_stack(|| {
        let buffer =
            InOutBuf::new(data_key.0.expose_secret(), body).map_err(|_| VaultError::Crypto {
                what: "wrapped key length",
            })?;
        let tag = cipher(kek)?
            .encrypt_inout_detached(&nonce, &aad, buffer)
            .map_err(|_| VaultError::Crypto {
                what: "wrap data key",
            })?;
        Ok::<_, VaultError>(tag)
    })?;
    tag.copy_from_slice(&produced);
    Ok(())
}

/// Unwraps a passphrase or key slot; `None` when the tag does not verify,
/// which (the header checksum having passed) means the secret was wrong.
/// The ciphertext is decrypted in place in the data key's locked pages.
pub(crate) fn unwrap_key(
    kek: &SecretBuf,
    guest: &GuestId,
    slot: &Keyslot,
) -> Result<Option<DataKey>, VaultError> {
    let aad = keyslot_aad(guest, slot);
    let nonce = match slot {
        Keyslot::Passphrase { nonce, .. } | Keyslot::Key { nonce, .. } => Nonce::from(*nonce),
        Keyslot::Host { .. } => return Ok(None),
    };
    let mut key = SecretBuf::zeroed(DATA_KEY_LEN)?;
    let (ciphertext, tag) = slot.wrapped_key().split_at(DATA_KEY_LEN);
    key.expose_secret_mut().copy_from_slice(ciphertext);
    let tag = tag_from(tag)?;
    let ok = on_scrubbed_stack(|| {
        Ok::<_, VaultError>(
            cipher(kek)?
                .decrypt_inout_detached(&nonce, &aad, key.expose_secret_mut().into(), &tag)
                .is_ok(),
        )
    })?;
    // On failure `key` holds garbage; it is zeroized on drop like any other.
    Ok(ok.then_some(DataKey(key)))
}

/// The KEK of a `key` slot: HKDF-SHA256 of the 256-bit key with the slot's
/// salt, bound to the guest. A random key needs no stretching, so this
/// costs microseconds where Argon2id costs a second.
pub(crate) fn key_slot_kek(
    key: &SecretBuf,
    salt: &[u8; SALT_LEN],
    guest: &GuestId,
) -> Result<SecretBuf, VaultError> {
    let mut info = Vec::with_capacity(KEY_SLOT_LABEL.len() + 16);
    info.extend_from_slice(KEY_SLOT_LABEL);
    info.extend_from_slice(guest.as_bytes());
    let mut out = SecretBuf::zeroed(DATA_KEY_LEN)?;
    on_scrubbed_stack(|| {
        Hkdf::<Sha256>::new(Some(salt), key.expose_secret()).expand(&info, out.expose_secret_mut())
    })
    .map_err(|_| VaultError::Crypto {
        what: "HKDF expand",
    })?;
    Ok(out)
}

fn host_info(guest: &GuestId) -> Vec<u8> {
    let mut info = Vec::with_capacity(HOST_SLOT_LABEL.len() + 16);
    info.extend_from_slice(HOST_SLOT_LABEL);
    info.extend_from_slice(guest.as_bytes());
    info
}

/// A `host` slot: the data key sealed to `host` ([`seal_key_to_host`]),
/// info = label || guest, aad = the slot's AAD.
pub(crate) fn wrap_for_host(
    data_key: &DataKey,
    guest: &GuestId,
    host: &HostPublicKey,
) -> Result<Keyslot, VaultError> {
    let fingerprint = host.fingerprint();
    // The AAD covers kind, reserved bytes and fingerprint only: known
    // before the seal.
    let aad = keyslot_aad(
        guest,
        &Keyslot::Host {
            fingerprint,
            enc: [0; X25519_LEN],
            wrapped_key: [0; WRAPPED_KEY_LEN],
        },
    );
    let (enc, wrapped_key) = seal_key_to_host(data_key, host, &host_info(guest), &aad)?;
    Ok(Keyslot::Host {
        fingerprint,
        enc,
        wrapped_key,
    })
}

/// Opens a `host` slot with this host's private key; `None` when it does
/// not open (another host's slot, or one edited since). Decrypted in place
/// in the data key's locked pages.
pub(crate) fn unwrap_for_host(
    host: &HostKey,
    guest: &GuestId,
    slot: &Keyslot,
) -> Result<Option<DataKey>, VaultError> {
    let Keyslot::Host {
        enc, wrapped_key, ..
    } = slot
    else {
        return Ok(None);
    };
    open_key_from_host(
        host,
        &host_info(guest),
        &keyslot_aad(guest, slot),
        enc,
        wrapped_key,
    )
}

/// Encrypts `plaintext` in place and appends the tag.
pub(crate) fn seal_body(
    data_key: &DataKey,
    body_salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    mut plaintext: Vec<u8>,
) -> Result<Vec<u8>, VaultError> {
    let tag = seal_in_place(data_key, body_salt, nonce, aad, &mut plaintext)?;
    plaintext.extend_from_slice(&tag);
    Ok(plaintext)
}

/// Encrypts `buf` in place as a body's ciphertext; returns the tag that
/// follows it in the file.
pub(crate) fn seal_in_place(
    data_key: &DataKey,
    body_salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], VaultError> {
    let body_key = data_key.body_key(body_salt)?;
    let nonce = Nonce::from(*nonce);
    let tag = on_scrubbed_stack(|| {
        cipher(&body_key)?
            .encrypt_inout_detached(&nonce, aad, buf.into())
            .map_err(|_| VaultError::Crypto { what: "seal body" })
    })?;
    Ok(tag.into())
}

/// Decrypts a body; `None` when it does not authenticate.
pub(crate) fn open_body(
    data_key: &DataKey,
    body_salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    body: &[u8],
) -> Result<Option<Vec<u8>>, VaultError> {
    let Some(split) = body.len().checked_sub(TAG_LEN) else {
        return Ok(None);
    };
    let (ciphertext, tag) = body.split_at(split);
    let tag = tag_from(tag)?;
    let body_key = data_key.body_key(body_salt)?;
    let nonce = Nonce::from(*nonce);
    let mut plaintext = ciphertext.to_vec();
    let ok = on_scrubbed_stack(|| {
        Ok::<_, VaultError>(
            cipher(&body_key)?
                .decrypt_inout_detached(&nonce, aad, plaintext.as_mut_slice().into(), &tag)
                .is_ok(),
        )
    })?;
    Ok(ok.then_some(plaintext))
}

/// An AES-256-GCM instance keyed from locked memory. Its key schedule and
/// GHASH key are zeroized on drop (aes-gcm's `zeroize` feature), but it is
/// built on the stack and returned by value, leaving copies behind: call it
/// only inside [`on_scrubbed_stack`].
fn cipher(key: &SecretBuf) -> Result<Aes256Gcm, VaultError> {
    Aes256Gcm::new_from_slice(key.expose_secret()).map_err(|_| VaultError::Crypto {
        what: "AES key length",
    })
}

fn tag_from(bytes: &[u8]) -> Result<Tag, VaultError> {
    <[u8; TAG_LEN]>::try_from(bytes)
        .map(Tag::from)
        .map_err(|_| VaultError::Crypto { what: "tag length" })
}

pub(crate) fn random_array<const N: usize>() -> Result<[u8; N], VaultError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| VaultError::Random {
        what: e.to_string(),
    })?;
    Ok(out)
}

const _: () = assert!(WRAPPED_KEY_LEN == DATA_KEY_LEN + TAG_LEN);

/// Seals the data key to `host` with HPKE base mode (single shot, the host
/// slots' suite) under `info` and `aad`: the encapsulated key and the
/// wrapped key with its tag. A `host` slot and a migration ticket differ
/// only in their info and AAD. The ephemeral key and every secret of the
/// key schedule live on the scrubbed stack (hpke and x25519-dalek zeroize
/// them on drop too).
pub(crate) fn seal_key_to_host(
    data_key: &DataKey,
    host: &HostPublicKey,
    info: &[u8],
    aad: &[u8],
) -> Result<([u8; X25519_LEN], [u8; WRAPPED_KEY_LEN]), VaultError> {
    use hpke::{Deserializable, Serializable};
    let mut enc = [0u8; X25519_LEN];
    let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
    let (body, tag) = wrapped_key.split_at_mut(DATA_KEY_LEN);
    let (enc_bytes, tag_bytes) = on_scrubbed_stack(|| {
        let pk = <HostKem as hpke::Kem>::PublicKey::from_bytes(host.as_bytes()).map_err(|_| {
            VaultError::Crypto {
                what: "host public key",
            }
        })?;
        let buffer =
            InOutBuf::new(data_key.0.expose_secret(), body).map_err(|_| VaultError::Crypto {
                what: "wrapped key length",
            })?;
        let (encapped, tag) = hpke::single_shot_seal_inout_detached::<HostAead, HostKdf, HostKem>(
            &hpke::OpModeS::Base,
            &pk,
            info,
            buffer,
            aad,
        )
        .map_err(|_| VaultError::Crypto {
            what: "HPKE seal to the host key",
        })?;
        Ok::<_, VaultError>((encapped.to_bytes(), tag.to_bytes()))
    })?;
    enc.copy_from_slice(&enc_bytes);
    tag.copy_from_slice(&tag_bytes);
    Ok((enc, wrapped_key))
}

/// Opens what [`seal_key_to_host`] sealed, with this host's private key;
/// `None` when it does not open (sealed to another host, or edited).
/// Decrypted in place in the data key's locked pages.
pub(crate) fn open_key_from_host(
    host: &HostKey,
    info: &[u8],
    aad: &[u8],
    enc: &[u8; X25519_LEN],
    wrapped_key: &[u8; WRAPPED_KEY_LEN],
) -> Result<Option<DataKey>, VaultError> {
    use hpke::Deserializable;
    let mut key = SecretBuf::zeroed(DATA_KEY_LEN)?;
    let (ciphertext, tag) = wrapped_key.split_at(DATA_KEY_LEN);
    key.expose_secret_mut().copy_from_slice(ciphertext);
    let ok = on_scrubbed_stack(|| {
        let (Ok(sk), Ok(encapped), Ok(tag)) = (
            <HostKem as hpke::Kem>::PrivateKey::from_bytes(host.private().expose_secret()),
            <HostKem as hpke::Kem>::EncappedKey::from_bytes(enc),
            hpke::aead::AeadTag::<HostAead>::from_bytes(tag),
        ) else {
            return false;
        };
        hpke::single_shot_open_inout_detached::<HostAead, HostKdf, HostKem>(
            &hpke::OpModeR::Base,
            &sk,
            &encapped,
            info,
            key.expose_secret_mut().into(),
            aad,
            &tag,
        )
        .is_ok()
    });
    Ok(ok.then_some(DataKey(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::be::Reader;
    use crate::vault::format::{self, VERSION_KINDS};

    use crate::vault::spec_vectors::vector;

    fn secret(bytes: &[u8]) -> SecretBuf {
        let mut buf = SecretBuf::with_capacity(bytes.len()).unwrap();
        buf.extend_from_slice(bytes).unwrap();
        buf
    }

    fn record(name: &str) -> Keyslot {
        let bytes = vector(name);
        format::Keyslot::decode(&mut Reader::new(&bytes), 0, VERSION_KINDS).unwrap()
    }

    fn guest() -> GuestId {
        GuestId::parse("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40").unwrap()
    }

    fn data_key_bytes(key: &DataKey) -> Vec<u8> {
        key.0.expose_secret().to_vec()
    }

    #[test]
    fn the_specs_key_slot_vector_opens_here() {
        let slot = record("key_record");
        let Keyslot::Key { salt, .. } = &slot else {
            panic!("not a key slot: {slot:?}");
        };
        let kek = key_slot_kek(&secret(&vector("key")), salt, &guest()).unwrap();
        assert_eq!(kek.expose_secret(), vector("key_kek").as_slice());
        let key = unwrap_key(&kek, &guest(), &slot).unwrap().unwrap();
        assert_eq!(data_key_bytes(&key), vector("data_key"));
    }

    #[test]
    fn the_specs_host_slot_vector_opens_here_and_only_on_its_host() {
        // The record was sealed by the outside reader's own HPKE (Python,
        // cryptography): this is the independent check of both.
        let host = HostKey::from_private_for_test(secret(&vector("host_private_key")));
        assert_eq!(
            host.public().as_bytes().as_slice(),
            vector("host_public_key").as_slice()
        );
        assert_eq!(
            host.public().fingerprint().as_slice(),
            vector("host_fingerprint").as_slice()
        );
        let slot = record("host_record");
        let key = unwrap_for_host(&host, &guest(), &slot).unwrap().unwrap();
        assert_eq!(data_key_bytes(&key), vector("data_key"));
        let other = HostKey::generate().unwrap();
        assert!(unwrap_for_host(&other, &guest(), &slot).unwrap().is_none());
        let another_guest = GuestId::parse("7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa").unwrap();
        assert!(
            unwrap_for_host(&host, &another_guest, &slot)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_host_slot_written_here_opens_with_its_key() {
        let host = HostKey::generate().unwrap();
        let data_key = DataKey::generate().unwrap();
        let slot = wrap_for_host(&data_key, &guest(), &host.public()).unwrap();
        let opened = unwrap_for_host(&host, &guest(), &slot).unwrap().unwrap();
        assert_eq!(data_key_bytes(&opened), data_key_bytes(&data_key));
    }
}
