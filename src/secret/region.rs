//! The one place in the crate that maps memory for secrets.
//!
//! Every `unsafe` block below is a single call with its own `SAFETY:` note;
//! the rest of the module only sees the safe [`Region`] type (and one
//! `unsafe fn` giving typed access to its bytes, for Argon2's blocks).

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::libc;
use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};
use nix::sys::resource::{Resource, getrlimit};
use nix::unistd::{SysconfVar, ftruncate, sysconf};
use zeroize::Zeroize;

use super::{Backing, SecretError};

/// The page size, read once. Linux always reports one; should `sysconf`
/// ever fail, 4 KiB is safe for rounding because every architecture's page
/// size is a multiple of it, and `mmap` rounds the length up anyway.
fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        sysconf(SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// Decides the backing once per process and logs the decision once.
pub(super) fn backing() -> Backing {
    static BACKING: OnceLock<Backing> = OnceLock::new();
    *BACKING.get_or_init(|| match memfd_secret() {
        Ok(fd) => {
            drop(fd);
            tracing::info!(
                backing = "memfd_secret",
                "secret memory: using memfd_secret (pages locked, not dumpable, \
                 removed from the kernel direct map)"
            );
            Backing::SecretMem
        }
        Err(errno) => {
            tracing::info!(
                backing = "mlock",
                probe_error = %errno,
                "secret memory: memfd_secret unavailable ({errno}; ENOSYS means a kernel \
                 without secretmem or booted without secretmem.enable=1, EPERM usually \
                 a seccomp filter), using mlock + MADV_DONTDUMP"
            );
            Backing::Mlock
        }
    })
}

/// A new close-on-exec `memfd_secret(2)` file (also what `keyfd` seals
/// a key into).
pub(super) fn memfd_secret() -> Result<OwnedFd, Errno> {
    let flags = libc::c_uint::try_from(libc::O_CLOEXEC).map_err(|_| Errno::EINVAL)?;
    // SAFETY: memfd_secret takes one integer flags argument and touches no
    // memory of ours; it returns a new fd or -1 with errno set.
    let ret = unsafe { libc::syscall(libc::SYS_memfd_secret, flags) };
    if ret < 0 {
        return Err(Errno::last());
    }
    let raw = libc::c_int::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: `raw` was just returned by the kernel as a new descriptor that
    // nothing else owns, so OwnedFd may take ownership and close it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Errors from making memory resident and locked are about limits, and the
/// operator needs to know which one to raise.
fn lock_error(requested: usize, source: Errno) -> SecretError {
    let limit = getrlimit(Resource::RLIMIT_MEMLOCK)
        .ok()
        .map(|(soft, _hard)| soft);
    SecretError::Lock {
        requested,
        limit,
        source,
    }
}

fn is_limit_errno(errno: Errno) -> bool {
    matches!(errno, Errno::ENOMEM | Errno::EAGAIN | Errno::EPERM)
}

/// An address range reserved with `mmap`; unmapping it is its only job, so
/// a half-built [`Region`] is released on every early return.
struct Reservation {
    base: NonNull<c_void>,
    len: NonZeroUsize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` is exactly the range mapped in
        // `Region::new_with`, owned by this value alone; no reference into it
        // outlives `self` (the slices handed out borrow the owning Region).
        let result = unsafe { mman::munmap(self.base, self.len.get()) };
        if let Err(errno) = result {
            tracing::error!(%errno, "munmap of a secret region failed");
        }
    }
}

/// What a region's pages are: locked secret memory of the process-wide
/// backing, or working memory that is everything else but locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pages {
    Locked(Backing),
    Unlocked,
}

/// Whole pages of locked (unless made with [`Region::new_unlocked`]),
/// non-dumpable, non-forkable memory, fenced by a `PROT_NONE` guard page on
/// each side, zeroized before they are unmapped.
pub(super) struct Region {
    // Field order matters only for clarity: Drop below wipes `usable`
    // before `_reservation` is dropped (and unmapped).
    usable: NonNull<u8>,
    usable_len: usize,
    // Held only for its Drop, which unmaps the whole range.
    _reservation: Reservation,
}

// SAFETY: Region exclusively owns its mapping (like a Box<[u8]>); the raw
// pointers are not shared with anything else, and shared access only reads.
unsafe impl Send for Region {}
// SAFETY: `&Region` only gives out `&[u8]`; mutation requires `&mut Region`.
unsafe impl Sync for Region {}

impl Region {
    /// Maps at least `len` usable bytes (at least one page) with the
    /// process-wide backing.
    pub(super) fn new(len: usize) -> Result<Region, SecretError> {
        Region::new_with(backing(), len)
    }

    /// Maps at least `len` usable bytes with the given backing; tests use it
    /// to exercise the mlock path on kernels that have secretmem.
    pub(super) fn new_with(backing: Backing, len: usize) -> Result<Region, SecretError> {
        Region::map(Pages::Locked(backing), len)
    }

    /// Maps at least `len` usable bytes that are *not* locked: working
    /// memory too large for `RLIMIT_MEMLOCK` (Argon2's blocks). Everything
    /// else holds: own pages, guard pages, `MADV_DONTDUMP`,
    /// `MADV_DONTFORK`, wiped before unmapping. The pages are not touched
    /// here; their first write faults them in.
    pub(super) fn new_unlocked(len: usize) -> Result<Region, SecretError> {
        Region::map(Pages::Unlocked, len)
    }

    fn map(kind: Pages, len: usize) -> Result<Region, SecretError> {
        #[cfg(test)]
        test_hook::count_new();
        let page = page_size();
        let too_big = |_| SecretError::Map {
            requested: len,
            source: Errno::ENOMEM,
        };
        let pages = len.div_ceil(page).max(1);
        let usable_len = pages.checked_mul(page).ok_or(()).map_err(too_big)?;
        let total = usable_len
            .checked_add(2 * page)
            .and_then(NonZeroUsize::new)
            .ok_or(())
            .map_err(too_big)?;
        let usable_nz = NonZeroUsize::new(usable_len).ok_or(()).map_err(too_big)?;
        let map_err = |source| SecretError::Map {
            requested: len,
            source,
        };

        // SAFETY: a fresh anonymous PROT_NONE mapping at an address of the
        // kernel's choosing cannot alias any existing Rust object.
        let base = unsafe {
            mman::mmap_anonymous(
                None,
                total,
                ProtFlags::PROT_NONE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(map_err)?;
        let reservation = Reservation { base, len: total };
        let usable_ptr = base.cast::<u8>().map_addr(|a| {
            // `page` > 0 and the reservation is `page + usable_len + page`
            // long, so this stays inside it.
            a.saturating_add(page)
        });
        let usable_void = usable_ptr.cast::<c_void>();

        match kind {
            Pages::Locked(Backing::SecretMem) => {
                let fd = memfd_secret().map_err(map_err)?;
                let size = libc::off_t::try_from(usable_len)
                    .map_err(|_| Errno::EFBIG)
                    .map_err(map_err)?;
                ftruncate(&fd, size).map_err(map_err)?;
                let addr = NonZeroUsize::new(usable_void.addr().get());
                // SAFETY: MAP_FIXED replaces only the middle pages of our own
                // reservation, which nothing references yet.
                let mapped = unsafe {
                    mman::mmap(
                        addr,
                        usable_nz,
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                        MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                        &fd,
                        0,
                    )
                };
                // secretmem checks RLIMIT_MEMLOCK in mmap (EAGAIN).
                mapped.map_err(|e| {
                    if is_limit_errno(e) {
                        lock_error(len, e)
                    } else {
                        map_err(e)
                    }
                })?;
                // The mapping keeps the memory alive; the fd is not needed.
                drop(fd);
                // secretmem pages are allocated on first touch, and
                // MADV_POPULATE_WRITE is refused for them (EINVAL: GUP does
                // not work on secretmem), so they are faulted in when first
                // written; see `Region::prefault`.
            }
            Pages::Locked(Backing::Mlock) | Pages::Unlocked => {
                // SAFETY: changes protection of the middle pages of our own
                // reservation only; nothing references them yet.
                unsafe {
                    mman::mprotect(
                        usable_void,
                        usable_len,
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    )
                }
                .map_err(map_err)?;
                if kind == Pages::Locked(Backing::Mlock) {
                    // SAFETY: locks pages of our own mapping; no memory is
                    // written.
                    unsafe { mman::mlock(usable_void, usable_len) }.map_err(|e| {
                        if is_limit_errno(e) {
                            lock_error(len, e)
                        } else {
                            map_err(e)
                        }
                    })?;
                }
                // SAFETY: advice on our own mapping; only affects core dumps.
                unsafe { mman::madvise(usable_void, usable_len, MmapAdvise::MADV_DONTDUMP) }
                    .map_err(map_err)?;
            }
        }

        // SAFETY: advice on our own whole reservation; only affects fork().
        unsafe { mman::madvise(base, total.get(), MmapAdvise::MADV_DONTFORK) }.map_err(map_err)?;

        let mut region = Region {
            usable: usable_ptr,
            usable_len,
            _reservation: reservation,
        };
        if let Pages::Locked(_) = kind {
            region.prefault();
        }
        Ok(region)
    }

    /// Touches every page now, so a page the kernel cannot provide fails
    /// here, at construction, rather than at some later first write of a
    /// secret (for secretmem that failure is a SIGBUS; the mlock path has
    /// its pages already).
    fn prefault(&mut self) {
        self.wipe();
    }

    /// Zeroes every usable byte with volatile writes, which the compiler may
    /// not drop as dead stores even when the memory is unmapped right
    /// after. A word at a time: Argon2's blocks are tens of MiB, and a
    /// volatile write cannot be merged into wider ones.
    fn wipe(&mut self) {
        self.as_mut_words().zeroize();
    }

    /// All usable bytes as 64-bit words.
    fn as_mut_words(&mut self) -> &mut [u64] {
        // SAFETY: `usable` is page-aligned (so aligned for u64) and points to
        // `usable_len` bytes, a whole number of pages and so of words, mapped
        // read-write for the lifetime of `self`; every bit pattern is a valid
        // u64; `&mut self` makes this borrow unique.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.usable.as_ptr().cast::<u64>(),
                self.usable_len / std::mem::size_of::<u64>(),
            )
        }
    }

    /// The first `count` elements of the usable bytes as `T`s, for working
    /// memory that a crate wants as its own type (Argon2's `Block`); `None`
    /// if they do not fit or `T` needs more than page alignment.
    ///
    /// # Safety
    ///
    /// Every bit pattern must be a valid `T` (plain integers and arrays of
    /// them), and `T` must not need dropping: the caller gets typed access
    /// to memory that was zero or held bytes of any earlier use.
    pub(super) unsafe fn as_mut_slice_of<T>(&mut self, count: usize) -> Option<&mut [T]> {
        let fits = count
            .checked_mul(std::mem::size_of::<T>())
            .is_some_and(|bytes| bytes <= self.usable_len);
        if !fits || std::mem::align_of::<T>() > page_size() {
            return None;
        }
        // SAFETY: `usable` is page-aligned, hence aligned for `T` (checked
        // above); `count` `T`s fit in the mapping (checked above), which is
        // read-write for the lifetime of `self`; the caller guarantees any
        // bit pattern is a valid `T`; `&mut self` makes this borrow unique.
        Some(unsafe { std::slice::from_raw_parts_mut(self.usable.as_ptr().cast::<T>(), count) })
    }

    /// All usable bytes (a whole number of pages).
    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: `usable` points to `usable_len` readable bytes mapped for
        // the lifetime of `self` (initialised: fresh pages read as zero), and
        // mutation needs `&mut self`, so no `&mut` alias exists.
        unsafe { std::slice::from_raw_parts(self.usable.as_ptr(), self.usable_len) }
    }

    /// All usable bytes (a whole number of pages), writable.
    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.usable.as_ptr(), self.usable_len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.wipe();
        #[cfg(test)]
        test_hook::record_drop(self.as_slice());
        // `self._reservation` is dropped (unmapped) after this body returns.
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Region(<redacted>)")
    }
}

#[cfg(test)]
pub(super) mod test_hook {
    use std::cell::Cell;

    thread_local! {
        static LAST_DROP_WAS_ZERO: Cell<Option<bool>> = const { Cell::new(None) };
        static NEW_CALLS: Cell<u64> = const { Cell::new(0) };
    }

    /// Called by `Region::new_with` on entry.
    pub(crate) fn count_new() {
        NEW_CALLS.with(|c| c.set(c.get() + 1));
    }

    /// How many regions this thread has asked for so far.
    pub(crate) fn new_calls() -> u64 {
        NEW_CALLS.with(Cell::get)
    }

    /// Called by `Region::drop` after wiping and before unmapping.
    pub(crate) fn record_drop(bytes: &[u8]) {
        let zero = bytes.iter().all(|b| *b == 0);
        LAST_DROP_WAS_ZERO.with(|c| c.set(Some(zero)));
    }

    /// Whether the last region dropped on this thread was all zero just
    /// before it was unmapped; `None` if none was dropped since last asked.
    pub(crate) fn take_last_drop_was_zero() -> Option<bool> {
        LAST_DROP_WAS_ZERO.with(Cell::take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::test_support::{mapping_at, mappings};

    fn touch(region: &mut Region) {
        region.as_mut_slice()[0] = 1;
    }

    fn assert_locked_and_guarded(backing: Backing) {
        // Arrange
        let mut region = Region::new_with(backing, 100).unwrap();
        touch(&mut region);
        let addr = region.as_slice().as_ptr().addr();
        let page_kb = u64::try_from(page_size() / 1024).unwrap();

        // Act
        let mapping = mapping_at(addr).expect("region is in /proc/self/smaps");

        // Assert
        assert!(
            mapping.locked_kb >= page_kb,
            "{backing:?}: Locked: {} kB < page {page_kb} kB in {mapping:?}",
            mapping.locked_kb
        );
        assert!(mapping.flags.iter().any(|f| f == "dd"), "{mapping:?}");
        assert!(mapping.flags.iter().any(|f| f == "dc"), "{mapping:?}"); // DONTFORK
        assert!(mapping.flags.iter().any(|f| f == "lo"), "{mapping:?}");
    }

    #[test]
    fn pages_of_an_mlock_region_are_locked_undumpable_and_not_forked() {
        assert_locked_and_guarded(Backing::Mlock);
    }

    #[test]
    fn pages_of_a_secretmem_region_are_locked_undumpable_and_not_forked() {
        if backing() != Backing::SecretMem {
            eprintln!("memfd_secret unavailable on this kernel; nothing to check");
            return;
        }
        assert_locked_and_guarded(Backing::SecretMem);
    }

    fn assert_guard_pages(backing: Backing) {
        // Arrange
        let region = Region::new_with(backing, 5000).unwrap();
        let start = region.as_slice().as_ptr().addr();
        let end = start + region.as_slice().len();
        let page = page_size();

        // Act
        let maps = mappings();

        // Assert
        let perms_at = |addr: usize| {
            maps.iter()
                .find(|m| m.start <= addr && addr < m.end)
                .map(|m| m.perms.clone())
        };
        assert_eq!(perms_at(start - 1).as_deref(), Some("---p"), "{backing:?}");
        assert_eq!(perms_at(end).as_deref(), Some("---p"), "{backing:?}");
        assert_eq!(perms_at(start - page).as_deref(), Some("---p"));
        assert_eq!(perms_at(end + page - 1).as_deref(), Some("---p"));
        assert!(perms_at(start).is_some_and(|p| p.starts_with("rw")));
    }

    #[test]
    fn region_is_fenced_by_guard_pages() {
        assert_guard_pages(Backing::Mlock);
        if backing() == Backing::SecretMem {
            assert_guard_pages(Backing::SecretMem);
        }
    }

    #[test]
    fn region_is_zeroed_before_it_is_unmapped() {
        for b in [Backing::Mlock, backing()] {
            // Arrange
            let mut region = Region::new_with(b, 10).unwrap();
            region.as_mut_slice().fill(0xA5);
            let _ = test_hook::take_last_drop_was_zero();

            // Act
            drop(region);

            // Assert
            assert_eq!(test_hook::take_last_drop_was_zero(), Some(true), "{b:?}");
        }
    }

    #[test]
    fn zero_length_region_still_gets_a_page() {
        let region = Region::new_with(Backing::Mlock, 0).unwrap();
        assert_eq!(region.as_slice().len(), page_size());
    }

    #[test]
    fn huge_region_is_a_map_error_not_a_panic() {
        let err = Region::new_with(Backing::Mlock, usize::MAX).unwrap_err();
        assert!(matches!(err, SecretError::Map { .. }), "{err:?}");
    }
}
