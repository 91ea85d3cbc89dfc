//! A sealed file as read from disk: header, keyslots and (behind a fixed-up
//! checksum and a body re-sealed under a known key) the state archive.
//! A header that decodes must re-encode to exactly its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vtpmd::vault::fuzz_sealed_file(data);
});
