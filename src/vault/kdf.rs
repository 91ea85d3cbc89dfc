//! Argon2id: from a passphrase to the key that wraps a keyslot.

use std::fmt;

use secrecy::{ExposeSecret, ExposeSecretMut};

use crate::secret::scrub::on_scrubbed_stack;
use crate::secret::{KdfMemory, SecretBuf};

use super::format::{DATA_KEY_LEN, SALT_LEN};

/// Argon2id cost parameters, bounded so that a file cannot make vtpmd
/// allocate or compute without limit ("excessive work" in age's terms).
#[derive(Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KdfParams {
    memory_kib: u32,
    iterations: u32,
    lanes: u32,
}

/// Why a set of Argon2id parameters is refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KdfParamsError {
    #[error("Argon2 memory {memory_kib} KiB is outside {min}..={max} KiB")]
    Memory { memory_kib: u32, min: u32, max: u32 },
    #[error("Argon2 iterations {0} is outside 1..={MAX_ITERATIONS}")]
    Iterations(u32),
    #[error("Argon2 lanes {0} is outside 1..={MAX_LANES}")]
    Lanes(u32),
}

/// 4 GiB: above this a single derivation could take the host down.
pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
pub const MAX_ITERATIONS: u32 = 64;
pub const MAX_LANES: u32 = 64;

/// OWASP's floor for Argon2id (m = 19 MiB, t = 2): anything cheaper needs
/// `allow_weak_kdf`.
const FLOOR_MEMORY_KIB: u32 = 19 * 1024;
const FLOOR_ITERATIONS: u32 = 2;

impl KdfParams {
    /// RFC 9106's second recommended option: m = 64 MiB, t = 3, p = 4.
    pub const RFC9106_SECOND: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        lanes: 4,
    };

    pub fn new(memory_kib: u32, iterations: u32, lanes: u32) -> Result<Self, KdfParamsError> {
        if lanes == 0 || lanes > MAX_LANES {
            return Err(KdfParamsError::Lanes(lanes));
        }
        // Argon2 needs 8 blocks of 1 KiB per lane.
        let min = 8 * lanes;
        if memory_kib < min || memory_kib > MAX_MEMORY_KIB {
            return Err(KdfParamsError::Memory {
                memory_kib,
                min,
                max: MAX_MEMORY_KIB,
            });
        }
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(KdfParamsError::Iterations(iterations));
        }
        Ok(Self {
            memory_kib,
            iterations,
            lanes,
        })
    }

    pub fn memory_kib(self) -> u32 {
        self.memory_kib
    }

    pub fn iterations(self) -> u32 {
        self.iterations
    }

    pub fn lanes(self) -> u32 {
        self.lanes
    }

    pub fn is_weak(self) -> bool {
        self.memory_kib < FLOOR_MEMORY_KIB || self.iterations < FLOOR_ITERATIONS
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::RFC9106_SECOND
    }
}

impl fmt::Display for KdfParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Argon2id m={} KiB t={} p={}",
            self.memory_kib, self.iterations, self.lanes
        )
    }
}

impl fmt::Debug for KdfParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the vault may use and accept: the parameters for new keyslots, and
/// whether parameters below the floor are allowed (tests, slow machines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KdfPolicy {
    pub params: KdfParams,
    pub allow_weak: bool,
}

impl KdfPolicy {
    /// Refuses weak parameters unless allowed; warns once per use when
    /// they are allowed, so a weak setting never goes unnoticed in logs.
    pub(crate) fn check(&self, params: KdfParams) -> Result<(), super::VaultError> {
        if !params.is_weak() {
            return Ok(());
        }
        if !self.allow_weak {
            return Err(super::VaultError::WeakKdf { params });
        }
        tracing::warn!(%params, "Argon2id parameters below OWASP's floor accepted (allow_weak_kdf)");
        Ok(())
    }
}

/// Argon2id(passphrase, salt) into locked memory.
///
/// The KEK is written straight into a `SecretBuf`; nothing else of it
/// outlives the call. Argon2's blocks (a function of the passphrase) are
/// a `KdfMemory`, wiped before it is unmapped, and the copies the argon2
/// and blake2 crates leave in their own frames (the initial hash, the last
/// Blake2b state, which is the KEK, the final block) are wiped with the
/// stack they used.
pub(crate) fn derive(
    passphrase: &SecretBuf,
    salt: &[u8; SALT_LEN],
    params: KdfParams,
) -> Result<SecretBuf, super::VaultError> {
    let argon_params = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.lanes,
        Some(DATA_KEY_LEN),
    )
    .map_err(|e| super::VaultError::InvalidKdf {
        what: e.to_string(),
    })?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut memory = KdfMemory::new(argon.params().block_count())?;
    let mut key = SecretBuf::zeroed(DATA_KEY_LEN)?;
    on_scrubbed_stack(|| {
        argon.hash_password_into_with_memory(
            passphrase.expose_secret(),
            salt,
            key.expose_secret_mut(),
            memory.blocks(),
        )
    })
    .map_err(|e| super::VaultError::InvalidKdf {
        what: e.to_string(),
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_rfc9106_second_option_and_not_weak() {
        let p = KdfParams::default();
        assert_eq!((p.memory_kib(), p.iterations(), p.lanes()), (65536, 3, 4));
        assert!(!p.is_weak());
    }

    #[test]
    fn owasp_floor_separates_weak_from_strong() {
        assert!(!KdfParams::new(19 * 1024, 2, 1).unwrap().is_weak());
        assert!(KdfParams::new(19 * 1024 - 1, 2, 1).unwrap().is_weak());
        assert!(KdfParams::new(19 * 1024, 1, 1).unwrap().is_weak());
    }

    #[test]
    fn weak_parameters_need_the_switch() {
        let weak = KdfParams::new(64, 1, 1).unwrap();
        let strict = KdfPolicy::default();
        assert!(matches!(
            strict.check(weak),
            Err(super::super::VaultError::WeakKdf { .. })
        ));
        let lax = KdfPolicy {
            allow_weak: true,
            ..strict
        };
        assert!(lax.check(weak).is_ok());
    }

    #[test]
    fn out_of_bounds_parameters_are_refused() {
        assert!(matches!(
            KdfParams::new(MAX_MEMORY_KIB + 1, 3, 4),
            Err(KdfParamsError::Memory { .. })
        ));
        assert!(matches!(
            KdfParams::new(31, 3, 4),
            Err(KdfParamsError::Memory { .. })
        ));
        assert_eq!(
            KdfParams::new(65536, 0, 4),
            Err(KdfParamsError::Iterations(0))
        );
        assert_eq!(
            KdfParams::new(65536, 65, 4),
            Err(KdfParamsError::Iterations(65))
        );
        assert_eq!(KdfParams::new(65536, 3, 0), Err(KdfParamsError::Lanes(0)));
    }

    #[test]
    fn derivation_matches_the_argon2_crate() {
        let pass = SecretBuf::from_base64(b"cGFzc3dvcmQ=", 64).unwrap();
        let salt = [7u8; SALT_LEN];
        let params = KdfParams::new(64, 1, 1).unwrap();
        let key = derive(&pass, &salt, params).unwrap();
        let mut expected = [0u8; 32];
        argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(64, 1, 1, Some(32)).unwrap(),
        )
        .hash_password_into(b"password", &salt, &mut expected)
        .unwrap();
        assert_eq!(key.expose_secret(), &expected);
    }
}
