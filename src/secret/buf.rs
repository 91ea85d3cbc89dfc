//! [`SecretBuf`]: a fixed-capacity byte buffer in locked memory.

use std::fmt;
use std::io::{ErrorKind, Read};

use base64ct::{Base64, Encoding};
use secrecy::{ExposeSecret, ExposeSecretMut};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::SecretError;
use super::region::Region;
use super::scrub::on_scrubbed_stack;

/// Secret bytes in their own locked, undumpable, non-forkable pages.
///
/// The capacity is fixed when the buffer is made and the memory is never
/// reallocated, so no stale copy is ever left behind. The bytes are only
/// reachable through [`ExposeSecret`] / [`ExposeSecretMut`], which makes
/// every use greppable. Dropping the buffer zeroizes the whole mapping and
/// then unmaps it. There is no `Clone` (use [`SecretBuf::try_clone`], which
/// can fail like any allocation of locked memory), no `Display`, and `Debug`
/// prints neither content nor length.
pub struct SecretBuf {
    region: Region,
    len: usize,
    capacity: usize,
}

impl SecretBuf {
    /// An empty buffer that can hold `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Result<SecretBuf, SecretError> {
        Ok(SecretBuf {
            region: Region::new(capacity)?,
            len: 0,
            capacity,
        })
    }

    /// `len` zero bytes (capacity `len`), to be filled in place through
    /// [`ExposeSecretMut::expose_secret_mut`].
    pub fn zeroed(len: usize) -> Result<SecretBuf, SecretError> {
        let mut buf = SecretBuf::with_capacity(len)?;
        buf.len = len;
        Ok(buf)
    }

    /// `len` bytes from the OS random number generator, written straight
    /// into locked memory.
    pub fn random(len: usize) -> Result<SecretBuf, SecretError> {
        let mut buf = SecretBuf::zeroed(len)?;
        getrandom::fill(buf.expose_secret_mut()).map_err(|e| SecretError::Random {
            reason: e.to_string(),
        })?;
        Ok(buf)
    }

    /// Decodes standard, padded, canonical base64 (RFC 4648 §4; no
    /// whitespace, no line breaks) straight into locked memory, in constant
    /// time with respect to the content.
    ///
    /// A decoded length above `max_len` is [`SecretError::TooLong`], decided
    /// from the length of `text` before anything is allocated. Any other
    /// problem is [`SecretError::InvalidBase64`], which says nothing about
    /// where or what: that would reveal part of the secret.
    pub fn from_base64(text: &[u8], max_len: usize) -> Result<SecretBuf, SecretError> {
        if !text.len().is_multiple_of(4) {
            return Err(SecretError::InvalidBase64);
        }
        // Padding is at most two '=' and its amount follows from the decoded
        // length anyway, so looking at it leaks nothing new.
        let padding = text.iter().rev().take(2).filter(|&&b| b == b'=').count();
        let decoded_len = (text.len() / 4) * 3 - padding;
        if decoded_len > max_len {
            return Err(SecretError::TooLong { max: max_len });
        }
        let mut buf = SecretBuf::zeroed(decoded_len)?;
        // base64ct decodes the final group through a stack buffer.
        let written = on_scrubbed_stack(|| {
            Base64::decode(text, buf.expose_secret_mut()).map(|decoded| decoded.len())
        })
        .map_err(|_| SecretError::InvalidBase64)?;
        if written != decoded_len {
            // e.g. "A===": rejected by the decoder already, but never trust
            // a length computed by hand over the decoder's.
            return Err(SecretError::InvalidBase64);
        }
        Ok(buf)
    }

    /// Reads `reader` to EOF straight into locked memory (no intermediate
    /// `Vec`). More than `max_len` bytes is [`SecretError::TooLong`]; the
    /// bytes read so far are zeroized with the buffer.
    pub fn read_from(reader: &mut impl Read, max_len: usize) -> Result<SecretBuf, SecretError> {
        let too_long = SecretError::TooLong { max: max_len };
        // One spare byte tells "exactly max_len" from "more than max_len"
        // without reading into a scratch byte outside locked memory.
        let window = max_len
            .checked_add(1)
            .ok_or(SecretError::TooLong { max: max_len })?;
        let mut buf = SecretBuf {
            region: Region::new(window)?,
            len: 0,
            capacity: max_len,
        };
        let mut filled = 0;
        loop {
            if filled == window {
                return Err(too_long);
            }
            let dst = &mut buf.region.as_mut_slice()[filled..window];
            match reader.read(dst) {
                Ok(0) => break,
                Ok(n) => filled += n.min(dst.len()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => return Err(SecretError::Read { source }),
            }
        }
        buf.len = filled;
        Ok(buf)
    }

    /// Appends `bytes`, or fails with [`SecretError::CapacityExceeded`]
    /// leaving the buffer unchanged; never reallocates.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> Result<(), SecretError> {
        let capacity = self.capacity;
        let end = self
            .len
            .checked_add(bytes.len())
            .filter(|&end| end <= capacity)
            .ok_or(SecretError::CapacityExceeded { capacity })?;
        self.region.as_mut_slice()[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// Shortens the buffer to `len` bytes and zeroizes the removed tail;
    /// does nothing if `len` is not shorter.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.region.as_mut_slice()[len..self.len].zeroize();
            self.len = len;
        }
    }

    /// Number of secret bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no secret bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fixed maximum length (the mapping itself is whole pages).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A copy in its own locked memory, with the same capacity.
    pub fn try_clone(&self) -> Result<SecretBuf, SecretError> {
        let mut copy = SecretBuf::with_capacity(self.capacity)?;
        copy.extend_from_slice(self.expose_secret())?;
        Ok(copy)
    }

    /// Compares contents in time that depends only on the lengths (which
    /// are not treated as secret): different lengths are simply unequal.
    pub fn ct_eq(&self, other: &SecretBuf) -> bool {
        let (a, b) = (self.expose_secret(), other.expose_secret());
        if a.len() != b.len() {
            return false;
        }
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        // black_box keeps the optimiser from turning the fold into an
        // early-exit comparison.
        std::hint::black_box(diff) == 0
    }
}

impl ExposeSecret<[u8]> for SecretBuf {
    fn expose_secret(&self) -> &[u8] {
        &self.region.as_slice()[..self.len]
    }
}

impl ExposeSecretMut<[u8]> for SecretBuf {
    fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.region.as_mut_slice()[..self.len]
    }
}

impl Zeroize for SecretBuf {
    /// Zeroizes the whole mapping (not only `len` bytes) and sets the length
    /// to 0; the capacity and the memory stay, ready for reuse.
    fn zeroize(&mut self) {
        self.region.as_mut_slice().zeroize();
        self.len = 0;
    }
}

/// Dropping zeroizes the whole mapping, then unmaps it (done by the
/// underlying region, so it holds even for buffers that fail half-built).
impl ZeroizeOnDrop for SecretBuf {}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        // The region wipes itself again before unmapping; doing it here too
        // keeps this type's contract independent of the region's.
        self.zeroize();
    }
}

impl fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBuf(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::region::test_hook;
    use crate::secret::test_support::{
        has_cap_ipc_lock, in_child, mapping_at, run_in_child_without_ipc_lock,
    };
    use crate::secret::{Backing, backing};

    const fn assert_send_sync<T: Send + Sync>() {}
    const _: () = assert_send_sync::<SecretBuf>();

    #[test]
    fn pages_of_a_secret_are_locked() {
        // Arrange
        let mut buf = SecretBuf::zeroed(32).unwrap();
        buf.expose_secret_mut()[0] = 7;
        let addr = buf.expose_secret().as_ptr().addr();

        // Act
        let mapping = mapping_at(addr).unwrap();

        // Assert
        assert!(mapping.locked_kb >= 4, "{mapping:?}");
        assert!(mapping.flags.iter().any(|f| f == "dd"), "{mapping:?}");
        assert!(mapping.flags.iter().any(|f| f == "dc"), "{mapping:?}");
    }

    #[test]
    fn zeroize_leaves_every_byte_of_the_capacity_zero() {
        // Arrange
        let mut buf = SecretBuf::random(64).unwrap();
        buf.truncate(10);

        // Act
        buf.zeroize();

        // Assert
        assert_eq!(buf.len(), 0);
        assert!(buf.region.as_slice().iter().all(|b| *b == 0));
    }

    #[test]
    fn dropping_a_secret_zeroes_it_before_unmapping() {
        // Arrange
        let mut buf = SecretBuf::zeroed(16).unwrap();
        buf.expose_secret_mut().fill(0x5A);
        let _ = test_hook::take_last_drop_was_zero();

        // Act
        drop(buf);

        // Assert
        assert_eq!(test_hook::take_last_drop_was_zero(), Some(true));
    }

    #[test]
    fn random_secrets_differ() {
        let a = SecretBuf::random(32).unwrap();
        let b = SecretBuf::random(32).unwrap();
        assert_eq!(a.len(), 32);
        assert!(!a.ct_eq(&b));
    }

    #[test]
    fn base64_decodes_known_vectors() {
        for (text, plain) in [
            (&b"cGFzc3dvcmQ="[..], &b"password"[..]),
            (b"", b""),
            (b"Zg==", b"f"),
            (b"Zm8=", b"fo"),
            (b"Zm9v", b"foo"),
            (b"Zm9vYmFy", b"foobar"),
        ] {
            let buf = SecretBuf::from_base64(text, 64).unwrap();
            assert_eq!(buf.expose_secret(), plain);
            assert_eq!(buf.capacity(), plain.len());
        }
    }

    #[test]
    fn base64_rejects_invalid_and_non_canonical_input() {
        for text in [
            &b"cGFzc3dvcmQ"[..], // missing padding
            b"cGFzc3dvcmR=",     // non-zero trailing bits
            b"Zh==",             // non-zero trailing bits
            b"Zm9v\n",
            b"Zm 9v",
            b"Zm9-", // URL-safe alphabet
            b"Zm9_",
            b"A===",
            b"====",
            b"Zg=a",
        ] {
            let err = SecretBuf::from_base64(text, 64).unwrap_err();
            assert!(
                matches!(err, SecretError::InvalidBase64),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn base64_too_long_is_refused_before_allocating() {
        // Arrange
        let text = vec![b'A'; 4 * 1024 * 1024];
        let regions_before = test_hook::new_calls();

        // Act
        let err = SecretBuf::from_base64(&text, 1024).unwrap_err();

        // Assert
        assert!(matches!(err, SecretError::TooLong { max: 1024 }), "{err:?}");
        assert_eq!(test_hook::new_calls(), regions_before, "no region mapped");
        let err = SecretBuf::from_base64(b"cGFzc3dvcmQ=", 7).unwrap_err();
        assert!(matches!(err, SecretError::TooLong { max: 7 }), "{err:?}");
        assert!(SecretBuf::from_base64(b"cGFzc3dvcmQ=", 8).is_ok());
    }

    #[test]
    fn read_from_takes_exactly_max_len() {
        let mut input: &[u8] = b"0123456789";
        let buf = SecretBuf::read_from(&mut input, 10).unwrap();
        assert_eq!(buf.expose_secret(), b"0123456789");
        assert_eq!(buf.capacity(), 10);
    }

    #[test]
    fn read_from_refuses_more_than_max_len() {
        let mut input: &[u8] = b"0123456789X";
        let err = SecretBuf::read_from(&mut input, 10).unwrap_err();
        assert!(matches!(err, SecretError::TooLong { max: 10 }), "{err:?}");
    }

    #[test]
    fn read_from_refuses_more_than_a_page_aligned_max_len() {
        let input = vec![1u8; 4097];
        let err = SecretBuf::read_from(&mut input.as_slice(), 4096).unwrap_err();
        assert!(matches!(err, SecretError::TooLong { max: 4096 }), "{err:?}");
        let buf = SecretBuf::read_from(&mut &input[..4096], 4096).unwrap();
        assert_eq!(buf.len(), 4096);
    }

    #[test]
    fn read_from_empty_input_gives_an_empty_secret() {
        let mut input: &[u8] = b"";
        let buf = SecretBuf::read_from(&mut input, 10).unwrap();
        assert!(buf.is_empty());
    }

    #[test]
    fn read_from_reports_io_errors() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("boom"))
            }
        }
        let err = SecretBuf::read_from(&mut Failing, 10).unwrap_err();
        assert!(matches!(err, SecretError::Read { .. }), "{err:?}");
    }

    #[test]
    fn extend_beyond_capacity_fails_and_leaves_content_unchanged() {
        // Arrange
        let mut buf = SecretBuf::with_capacity(8).unwrap();
        buf.extend_from_slice(b"abcde").unwrap();

        // Act
        let err = buf.extend_from_slice(b"fghi").unwrap_err();

        // Assert
        assert!(matches!(err, SecretError::CapacityExceeded { capacity: 8 }));
        assert_eq!(buf.expose_secret(), b"abcde");
        buf.extend_from_slice(b"fgh").unwrap();
        assert_eq!(buf.expose_secret(), b"abcdefgh");
    }

    #[test]
    fn truncate_zeroizes_the_removed_tail() {
        let mut buf = SecretBuf::with_capacity(8).unwrap();
        buf.extend_from_slice(b"abcdefgh").unwrap();

        buf.truncate(3);

        assert_eq!(buf.expose_secret(), b"abc");
        assert!(buf.region.as_slice()[3..8].iter().all(|b| *b == 0));
    }

    #[test]
    fn clone_is_an_equal_independent_copy() {
        let mut a = SecretBuf::with_capacity(4).unwrap();
        a.extend_from_slice(b"key").unwrap();

        let mut b = a.try_clone().unwrap();

        assert!(a.ct_eq(&b));
        assert_eq!(b.capacity(), 4);
        b.expose_secret_mut()[0] = b'K';
        assert!(!a.ct_eq(&b));
        assert_ne!(a.expose_secret().as_ptr(), b.expose_secret().as_ptr());
    }

    #[test]
    fn ct_eq_of_different_lengths_is_false() {
        let a = SecretBuf::from_base64(b"Zm9v", 8).unwrap();
        let b = SecretBuf::from_base64(b"Zm9vYmFy", 8).unwrap();
        assert!(!a.ct_eq(&b));
        assert!(a.ct_eq(&a.try_clone().unwrap()));
    }

    #[test]
    fn debug_shows_neither_bytes_nor_length() {
        let buf = SecretBuf::from_base64(b"cGFzc3dvcmQ=", 64).unwrap();
        assert_eq!(format!("{buf:?}"), "SecretBuf(<redacted>)");
        assert_eq!(format!("{buf:#?}"), "SecretBuf(<redacted>)");
    }

    #[test]
    fn over_the_memlock_limit_is_a_lock_error_naming_rlimit_memlock() {
        if !in_child() {
            run_in_child_without_ipc_lock(
                module_path!(),
                "over_the_memlock_limit_is_a_lock_error_naming_rlimit_memlock",
            );
            return;
        }
        // Arrange
        assert!(!has_cap_ipc_lock(), "child must not have CAP_IPC_LOCK");
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            64 * 1024,
            64 * 1024,
        )
        .unwrap();

        for b in [backing(), Backing::Mlock] {
            // Act
            let err = Region::new_with(b, 1024 * 1024).unwrap_err();

            // Assert
            assert!(matches!(err, SecretError::Lock { .. }), "{b:?}: {err:?}");
            let text = err.to_string();
            assert!(text.contains("RLIMIT_MEMLOCK is 65536 bytes"), "{text}");
        }
        let err = SecretBuf::with_capacity(1024 * 1024).unwrap_err();
        assert!(matches!(err, SecretError::Lock { .. }), "{err:?}");
        // Within the limit still works.
        assert!(SecretBuf::with_capacity(100).is_ok());
    }
}
