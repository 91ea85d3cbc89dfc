//! swtpm's answers on the control channel, through every command's decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vtpmd::swtpm::ctrl::codec::fuzz_decode(data);
});
