//! This host's identity: an X25519 key pair that `host` keyslots are
//! wrapped to (HPKE, RFC 9180). The private half lives in one root-only
//! file under the state directory and, in vtpmd, only in a `SecretBuf`;
//! the public half is what other hosts (and the orchestrator) are given.
//!
//! The file is `"VTPMHKEY" || u16 version (1) || 32-byte X25519 private
//! key`, 42 bytes, mode 0600, owned by vtpmd's user. It is made once, on
//! first start, and never replaced: a damaged one stops vtpmd, naming it,
//! since every guest with a host slot for this host would silently stop
//! opening under a new key.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hpke::kem::{Kem as _, X25519HkdfSha256};
use hpke::{Deserializable, Serializable};
use secrecy::{ExposeSecret, ExposeSecretMut};

use crate::regular::{self, Access};
use crate::secret::scrub::on_scrubbed_stack;
use crate::secret::{SecretBuf, SecretError};

use super::format::{FINGERPRINT_LEN, X25519_LEN};

const MAGIC: &[u8; 8] = b"VTPMHKEY";
const FILE_VERSION: u16 = 1;
/// The whole file.
pub const HOST_KEY_FILE_LEN: usize = MAGIC.len() + 2 + X25519_LEN;

/// Why the host key file cannot be used. Each names the file; none
/// carries a byte of the key.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("I/O on the host key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the host key file {path} is {len} bytes, not {HOST_KEY_FILE_LEN}: damaged; restore it from a backup (vtpmd never replaces it)"
    )]
    Size { path: PathBuf, len: u64 },
    #[error(
        "the host key file {path} does not start with VTPMHKEY: damaged or not a host key; restore it from a backup (vtpmd never replaces it)"
    )]
    Magic { path: PathBuf },
    #[error("the host key file {path} is version {found}; this vtpmd reads version 1")]
    Version { path: PathBuf, found: u16 },
    #[error(
        "the host key file {path} has mode {mode:#o} and owner uid {uid}: it must be 0600 and vtpmd's (uid {expected_uid})"
    )]
    Permissions {
        path: PathBuf,
        mode: u32,
        uid: u32,
        expected_uid: u32,
    },
    #[error("locked memory for the host key")]
    Secret(#[from] SecretError),
    #[error("the X25519 library refused a 32-byte private key")]
    Crypto,
}

/// A host's X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostPublicKey([u8; X25519_LEN]);

/// Why a public key given by a caller is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPublicKeyError {
    #[error(
        "a host public key is the standard base64 of 32 bytes (44 characters); got {len} characters"
    )]
    Encoding { len: usize },
}

impl HostPublicKey {
    pub fn from_bytes(bytes: [u8; X25519_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; X25519_LEN] {
        &self.0
    }

    /// Standard base64 (RFC 4648, padded) of the 32 bytes: 44 characters.
    pub fn to_base64(&self) -> String {
        use base64ct::Encoding;
        base64ct::Base64::encode_string(&self.0)
    }

    pub fn parse_base64(text: &str) -> Result<Self, HostPublicKeyError> {
        use base64ct::Encoding;
        let mut out = [0u8; X25519_LEN];
        match base64ct::Base64::decode(text.as_bytes(), &mut out) {
            Ok(decoded) if decoded.len() == X25519_LEN => Ok(Self(out)),
            _ => Err(HostPublicKeyError::Encoding { len: text.len() }),
        }
    }

    /// What a host slot records to be found by its host without trying
    /// every slot: SHA-256 of the public key, first 16 bytes. Not a
    /// security boundary (the HPKE open is); 128 bits keep two hosts from
    /// ever colliding by accident.
    pub fn fingerprint(&self) -> [u8; FINGERPRINT_LEN] {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0);
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&digest[..FINGERPRINT_LEN]);
        out
    }

    /// The fingerprint as 32 lowercase hex digits.
    pub fn fingerprint_hex(&self) -> String {
        hex(&self.fingerprint())
    }
}

impl std::fmt::Debug for HostPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostPublicKey({})", self.to_base64())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// This host's key pair; the private half in locked memory.
pub struct HostKey {
    private: SecretBuf,
    public: HostPublicKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl HostKey {
    /// A new random key pair, in memory only.
    pub fn generate() -> Result<Self, HostKeyError> {
        Self::from_private(SecretBuf::random(X25519_LEN)?)
    }

    fn from_private(private: SecretBuf) -> Result<Self, HostKeyError> {
        let public = on_scrubbed_stack(|| {
            <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(private.expose_secret())
                .map(|sk| X25519HkdfSha256::sk_to_pk(&sk).to_bytes())
        })
        .map_err(|_| HostKeyError::Crypto)?;
        let mut bytes = [0u8; X25519_LEN];
        bytes.copy_from_slice(&public);
        Ok(Self {
            private,
            public: HostPublicKey(bytes),
        })
    }

    #[cfg(test)]
    pub(crate) fn from_private_for_test(private: SecretBuf) -> Self {
        Self::from_private(private).expect("a 32-byte private key")
    }

    pub fn public(&self) -> HostPublicKey {
        self.public
    }

    pub(crate) fn private(&self) -> &SecretBuf {
        &self.private
    }

    /// Reads the host key at `path`, or makes one there if there is none.
    /// Making it: temp file (0600, exclusive, no symlink followed) →
    /// fsync → link into place (fails rather than replace a file that
    /// appeared meanwhile) → fsync the directory.
    pub fn load_or_create(path: &Path) -> Result<Self, HostKeyError> {
        if let Some(key) = Self::load(path)? {
            return Ok(key);
        }
        let key = Self::generate()?;
        key.write_new(path)?;
        tracing::info!(path = %path.display(), fingerprint = %key.public.fingerprint_hex(), "host key created");
        Ok(key)
    }

    /// The host key at `path`; `None` if there is no file there.
    pub fn load(path: &Path) -> Result<Option<Self>, HostKeyError> {
        let io_err = |source| HostKeyError::Io {
            path: path.to_owned(),
            source,
        };
        let Some(mut file) = regular::open(path, Access::Read).map_err(io_err)? else {
            return Ok(None);
        };
        let meta = file.metadata().map_err(io_err)?;
        let expected_uid = nix::unistd::geteuid().as_raw();
        if meta.mode() & 0o7777 != 0o600 || meta.uid() != expected_uid {
            return Err(HostKeyError::Permissions {
                path: path.to_owned(),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                expected_uid,
            });
        }
        if meta.len() != HOST_KEY_FILE_LEN as u64 {
            return Err(HostKeyError::Size {
                path: path.to_owned(),
                len: meta.len(),
            });
        }
        let content = SecretBuf::read_from(&mut file, HOST_KEY_FILE_LEN).map_err(|e| match e {
            SecretError::TooLong { .. } => HostKeyError::Size {
                path: path.to_owned(),
                len: meta.len(),
            },
            other => HostKeyError::Secret(other),
        })?;
        let bytes = content.expose_secret();
        if bytes.len() != HOST_KEY_FILE_LEN {
            return Err(HostKeyError::Size {
                path: path.to_owned(),
                len: bytes.len() as u64,
            });
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(HostKeyError::Magic {
                path: path.to_owned(),
            });
        }
        let found = u16::from_be_bytes([bytes[MAGIC.len()], bytes[MAGIC.len() + 1]]);
        if found != FILE_VERSION {
            return Err(HostKeyError::Version {
                path: path.to_owned(),
                found,
            });
        }
        let mut private = SecretBuf::zeroed(X25519_LEN)?;
        private
            .expose_secret_mut()
            .copy_from_slice(&bytes[MAGIC.len() + 2..]);
        Self::from_private(private).map(Some)
    }

    fn write_new(&self, path: &Path) -> Result<(), HostKeyError> {
        let io_err = |p: &Path| {
            let p = p.to_owned();
            move |source| HostKeyError::Io { path: p, source }
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp)(e)),
        }
        let mut content = SecretBuf::with_capacity(HOST_KEY_FILE_LEN)?;
        content.extend_from_slice(MAGIC)?;
        content.extend_from_slice(&FILE_VERSION.to_be_bytes())?;
        content.extend_from_slice(self.private.expose_secret())?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(content.expose_secret())
            .and_then(|()| file.sync_all())
            .map_err(io_err(&tmp))?;
        drop(file);
        let linked = fs::hard_link(&tmp, path).map_err(io_err(path));
        let _ = fs::remove_file(&tmp);
        linked?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.key");
        let made = HostKey::load_or_create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), HOST_KEY_FILE_LEN as u64);
        let again = HostKey::load_or_create(&path).unwrap();
        assert_eq!(made.public(), again.public());
        assert!(made.private().ct_eq(again.private()));
    }

    #[test]
    fn a_damaged_file_is_refused_naming_it_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.key");
        HostKey::load_or_create(&path).unwrap();
        let good = fs::read(&path).unwrap();

        let write = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(&good[..41]);
        let e = HostKey::load_or_create(&path).unwrap_err();
        assert!(matches!(e, HostKeyError::Size { len: 41, .. }), "{e}");
        assert!(e.to_string().contains("host.key"), "{e}");
        assert_eq!(fs::read(&path).unwrap().len(), 41, "replaced");

        let mut bad = good.clone();
        bad[0] ^= 1;
        write(&bad);
        assert!(matches!(
            HostKey::load_or_create(&path),
            Err(HostKeyError::Magic { .. })
        ));
        let mut newer = good.clone();
        newer[9] = 2;
        write(&newer);
        assert!(matches!(
            HostKey::load_or_create(&path),
            Err(HostKeyError::Version { found: 2, .. })
        ));

        write(&good);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            HostKey::load_or_create(&path),
            Err(HostKeyError::Permissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn a_symlink_or_fifo_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.key");
        std::os::unix::fs::symlink("/dev/null", &path).unwrap();
        assert!(matches!(
            HostKey::load_or_create(&path),
            Err(HostKeyError::Io { .. })
        ));
        fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            HostKey::load_or_create(&path),
            Err(HostKeyError::Io { .. })
        ));
    }

    #[test]
    fn public_key_text_round_trips_and_bad_text_is_refused() {
        let key = HostKey::generate().unwrap();
        let text = key.public().to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(HostPublicKey::parse_base64(&text).unwrap(), key.public());
        assert!(HostPublicKey::parse_base64("AAAA").is_err());
        assert!(HostPublicKey::parse_base64(&text[..43]).is_err());
        assert_eq!(key.public().fingerprint_hex().len(), 32);
    }
}
