//! The only home of secret bytes (passphrases, keys) in vtpmd.
//!
//! A secret must never sit in memory that can be swapped out, written into
//! a core dump, inherited by a forked child, or silently copied by a growing
//! container. [`SecretBuf`] is the one type that holds such bytes, and it
//! gets that from how its memory is obtained rather than from discipline at
//! every call site:
//!
//! - **Own pages, never reallocated.** Each buffer maps its own whole pages
//!   once, with a fixed capacity. A `Vec` that grows leaves stale copies of
//!   its old contents in freed heap memory; a buffer that can only fail with
//!   [`SecretError::CapacityExceeded`] cannot. Constructors decode or read
//!   *straight into* the locked pages (`from_base64`, `read_from`, `random`)
//!   so no intermediate heap copy exists either.
//! - **`memfd_secret` where the kernel offers it, `mlock` otherwise.**
//!   secretmem pages are locked and excluded from core dumps by the kernel,
//!   and are also removed from the kernel's direct map, so even kernel code
//!   (or an exploit reading through the direct map) cannot see them. Kernels
//!   built without secretmem, or booted without `secretmem.enable=1`, answer
//!   `ENOSYS`; then the pages are `mlock`ed and marked `MADV_DONTDUMP`. The
//!   choice is made once per process ([`backing`]) and logged once.
//! - **No silent fallback.** If the pages cannot be locked (typically
//!   `RLIMIT_MEMLOCK`, which both backings count against) construction fails
//!   with [`SecretError::Lock`] naming the limit to raise. Falling back to
//!   ordinary memory would make the invariant untrue without anybody
//!   noticing.
//! - **Guard pages.** A `PROT_NONE` page on each side turns a linear overrun
//!   into or out of a secret into a crash instead of a silent read or write.
//! - **`MADV_DONTFORK`.** vtpmd forks to exec swtpm; the child must not get
//!   a copy-on-write view of the daemon's keys, even for the instant before
//!   `exec`.
//! - **Zeroized on drop, no `Clone`, no `Display`, redacted `Debug`.** Copies
//!   are explicit ([`SecretBuf::try_clone`]) and land in locked memory too;
//!   nothing formats the bytes, not even their length, into a log line.
//!
//! Two helpers keep what the crypto crates compute out of ordinary memory
//! too: [`on_scrubbed_stack`](scrub::on_scrubbed_stack) runs a derivation or
//! cipher one frame down and wipes the stack it used (the crates move key
//! schedules and digests around by value), and `KdfMemory` holds Argon2's
//! blocks in pages of their own that are wiped before they are unmapped
//! (too large to lock, but never left in the heap).
//!
//! [`harden_process`] complements this at the process level: non-dumpable
//! (which also blocks same-uid `ptrace` and `/proc/<pid>/mem`) and no core
//! files.

mod buf;
mod error;
mod harden;
mod kdf_memory;
mod keyfd;
mod region;
pub(crate) mod scrub;
#[cfg(test)]
mod test_support;

pub use buf::SecretBuf;
pub use error::SecretError;
pub use harden::{HardenError, harden_process};
pub(crate) use kdf_memory::KdfMemory;
pub use keyfd::{KeyFdError, read_from_fd, seal_into_fd};

/// Where the pages of every [`SecretBuf`] in this process come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `memfd_secret(2)`: locked, undumpable and unmapped from the kernel's
    /// direct map by the kernel itself.
    SecretMem,
    /// Anonymous pages, `mlock(2)`ed and `MADV_DONTDUMP`.
    Mlock,
}

/// The backing used for secrets in this process.
///
/// Probed on first use (by calling `memfd_secret`), cached for the life of
/// the process, and logged once at `info` level with the reason.
pub fn backing() -> Backing {
    region::backing()
}
