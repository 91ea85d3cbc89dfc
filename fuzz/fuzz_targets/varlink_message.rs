//! One Varlink message as the daemon decodes it once framed: the envelope,
//! then the method's parameters with every field validated. The same
//! decoding as `varlink_call` without the socket and the locked receive
//! buffer, so it runs two orders of magnitude faster.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vtpmd::protocol::fuzz_call(data);
});
