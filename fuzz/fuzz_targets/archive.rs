//! The body's plaintext: a state archive. One that decodes must encode back
//! to exactly its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vtpmd::vault::fuzz_archive(data);
});
