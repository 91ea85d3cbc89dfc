//! Running code that leaves copies of secrets on the stack, then wiping
//! them.
//!
//! The crypto crates compute on the stack and return by value: an AES key
//! schedule is built in `Aes256Gcm::new`'s frame and moved to its caller,
//! HKDF's PRK and each HMAC output are stack arrays, Argon2's initial hash
//! and its last Blake2b state (which is the KEK) live in frames of their
//! own. Zeroize-on-drop clears the value that is dropped, not the copies
//! that moves left behind, and those copies stayed on tokio's thread
//! stacks until some later call happened to overwrite them (the review of
//! issue 12 found KEKs and body keys there seconds after the calls).
//! [`on_scrubbed_stack`] runs such code one frame down and then overwrites
//! the stack it could have used.

use zeroize::Zeroize;

/// How far below its caller [`on_scrubbed_stack`] wipes. In an unoptimised
/// build the deepest user (Argon2: a handful of 1 KiB blocks per
/// compression, a 1 KiB hash buffer) leaves key bytes between 4 and 16 KiB
/// down (tests/daemon_secrets.rs finds them with a 4 KiB scrub, not with
/// 16 KiB); optimised builds use less. Wiping costs microseconds per call,
/// so the margin is wide.
const SCRUB_BYTES: usize = 128 * 1024;

/// Runs `f`, then overwrites with zeros the `SCRUB_BYTES` of stack below
/// this call's frame: everything `f` and whatever it called could have
/// left there. `f` must return no secret by value (return a `SecretBuf`,
/// which is a handle to locked memory), or the copy in the return slot
/// would be all that survives.
pub(crate) fn on_scrubbed_stack<R>(f: impl FnOnce() -> R) -> R {
    let result = call(f);
    scrub();
    result
}

/// `f` in a frame of its own, so that nothing it computes lands in the
/// frame of [`on_scrubbed_stack`]'s caller, above the wiped range.
#[inline(never)]
fn call<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// A frame of `SCRUB_BYTES` at the depth where `call`'s frame was, wiped
/// with volatile writes, which the compiler may not remove.
#[inline(never)]
fn scrub() {
    let mut words = [0u64; SCRUB_BYTES / 8];
    words.zeroize();
    std::hint::black_box(&mut words);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_comes_back() {
        assert_eq!(on_scrubbed_stack(|| 6 * 7), 42);
        let r: Result<u8, &str> = on_scrubbed_stack(|| Err("no"));
        assert_eq!(r, Err("no"));
    }
}
