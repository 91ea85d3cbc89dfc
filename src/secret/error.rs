//! Errors of the secret module. None of them carries secret content: an
//! invalid base64 input is reported without position or character, because
//! either would reveal part of the secret.

use std::fmt;

use nix::errno::Errno;

/// Why a [`SecretBuf`](super::SecretBuf) could not be made or filled.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The kernel refused to lock the pages (mlock, or the memfd_secret
    /// mapping); almost always `RLIMIT_MEMLOCK`.
    #[error(
        "cannot lock {requested} bytes of memory for secrets: RLIMIT_MEMLOCK is {shown}; \
         raise it (LimitMEMLOCK= in the systemd unit, or `ulimit -l`)",
        shown = MemlockLimit(*.limit)
    )]
    Lock {
        /// Bytes asked for (before rounding up to pages).
        requested: usize,
        /// The soft RLIMIT_MEMLOCK in bytes at the time, if it could be read.
        limit: Option<u64>,
        /// What the kernel said.
        #[source]
        source: Errno,
    },
    /// Mapping, protecting or advising the pages failed for another reason.
    #[error("cannot map {requested} bytes of memory for secrets")]
    Map {
        /// Bytes asked for (before rounding up to pages).
        requested: usize,
        /// What the kernel said.
        #[source]
        source: Errno,
    },
    /// The secret is longer than allowed.
    #[error("secret is longer than the maximum of {max} bytes")]
    TooLong {
        /// The maximum length in bytes.
        max: usize,
    },
    /// Appending would exceed the buffer's fixed capacity.
    #[error("secret buffer capacity of {capacity} bytes exceeded")]
    CapacityExceeded {
        /// The buffer's capacity in bytes.
        capacity: usize,
    },
    /// Not canonical, padded, standard base64 (RFC 4648 §4).
    #[error("secret is not valid canonical padded base64")]
    InvalidBase64,
    /// The OS random number generator failed.
    #[error("cannot read random bytes from the OS: {reason}")]
    Random {
        /// `getrandom::Error`'s description (that type is not `std::error::Error`
        /// on every version, so it is kept as text).
        reason: String,
    },
    /// Reading the secret from its source failed.
    #[error("cannot read secret")]
    Read {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

struct MemlockLimit(Option<u64>);

impl fmt::Display for MemlockLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("unknown (getrlimit failed)"),
            Some(nix::libc::RLIM_INFINITY) => f.write_str("unlimited"),
            Some(bytes) => write!(f, "{bytes} bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_error_names_the_limit_to_raise() {
        let err = SecretError::Lock {
            requested: 1 << 20,
            limit: Some(65536),
            source: Errno::ENOMEM,
        };
        let text = err.to_string();
        assert!(text.contains("RLIMIT_MEMLOCK is 65536 bytes"), "{text}");
        assert!(text.contains("LimitMEMLOCK="), "{text}");
        assert!(text.contains("1048576 bytes"), "{text}");
    }
}
