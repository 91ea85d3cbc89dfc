//! One client's byte stream on the API socket: the first byte picks the
//! message limit, the rest is framed by the daemon's receiver (over a real
//! socket pair, into locked memory), and every message is decoded as a
//! Varlink call and validated field by field; passphrases are decoded into
//! locked memory as the dispatcher does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vtpmd::api::fuzz_messages(data);
});
