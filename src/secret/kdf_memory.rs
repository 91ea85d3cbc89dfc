//! Argon2's working memory.

use nix::errno::Errno;

use super::SecretError;
use super::region::Region;

/// The memory blocks of one Argon2 derivation, in pages of their own.
///
/// The blocks are a function of the passphrase (the last ones give the KEK
/// at the cost of one Blake2b), and the argon2 crate frees its own without
/// wiping them, so the derivation is handed these instead. At 64 MiB by
/// default they are far beyond a sane `RLIMIT_MEMLOCK` and are not locked:
/// the unit's `MemorySwapMax=0` keeps them out of swap. Everything else a
/// secret region has, they have: no neighbour on the heap, guard pages,
/// `MADV_DONTDUMP`, `MADV_DONTFORK` (a swtpm forked meanwhile gets no copy)
/// and a wipe before they are unmapped, on every path.
pub(crate) struct KdfMemory {
    region: Region,
    blocks: usize,
}

impl KdfMemory {
    /// Room for `blocks` Argon2 blocks of 1 KiB.
    pub(crate) fn new(blocks: usize) -> Result<KdfMemory, SecretError> {
        let bytes = blocks
            .checked_mul(argon2::Block::SIZE)
            .ok_or(SecretError::Map {
                requested: usize::MAX,
                source: Errno::ENOMEM,
            })?;
        Ok(KdfMemory {
            region: Region::new_unlocked(bytes)?,
            blocks,
        })
    }

    /// The blocks, for `Argon2::hash_password_into_with_memory`.
    pub(crate) fn blocks(&mut self) -> &mut [argon2::Block] {
        // SAFETY: `Block` is a `[u64; 128]` (64-byte aligned, below the
        // page alignment `as_mut_slice_of` checks), valid for every bit
        // pattern and without drop glue. Should the blocks not fit (they
        // do: the region was sized for them), the empty slice makes
        // argon2 answer `MemoryTooLittle`.
        unsafe { self.region.as_mut_slice_of::<argon2::Block>(self.blocks) }.unwrap_or_default()
    }
}

impl std::fmt::Debug for KdfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KdfMemory({} blocks)", self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::region::test_hook;
    use crate::secret::test_support::mapping_at;

    #[test]
    fn blocks_are_undumpable_not_forked_and_wiped_before_unmapping() {
        // Arrange
        let mut memory = KdfMemory::new(64).unwrap();
        let blocks = memory.blocks();
        assert_eq!(blocks.len(), 64);
        for block in blocks.iter_mut() {
            block.as_mut().fill(0x5a5a_5a5a_5a5a_5a5a);
        }
        let mapping = mapping_at(blocks.as_ptr().addr()).unwrap();
        let _ = test_hook::take_last_drop_was_zero();

        // Act
        drop(memory);

        // Assert
        assert!(mapping.flags.iter().any(|f| f == "dd"), "{mapping:?}");
        assert!(mapping.flags.iter().any(|f| f == "dc"), "{mapping:?}");
        assert!(!mapping.flags.iter().any(|f| f == "lo"), "{mapping:?}");
        assert_eq!(mapping.locked_kb, 0, "{mapping:?}");
        assert_eq!(test_hook::take_last_drop_was_zero(), Some(true));
    }

    #[test]
    fn a_derivation_in_it_matches_the_crates_own() {
        let params = argon2::Params::new(64, 1, 1, Some(32)).unwrap();
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut memory = KdfMemory::new(argon.params().block_count()).unwrap();
        let (mut ours, mut theirs) = ([0u8; 32], [0u8; 32]);
        argon
            .hash_password_into_with_memory(b"password", &[7; 32], &mut ours, memory.blocks())
            .unwrap();
        argon
            .hash_password_into(b"password", &[7; 32], &mut theirs)
            .unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn an_impossible_size_is_an_error_not_a_panic() {
        assert!(KdfMemory::new(usize::MAX).is_err());
    }
}
