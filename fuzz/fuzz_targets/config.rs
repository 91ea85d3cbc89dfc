//! The TOML config file. One that parses must render (as `--check-config`
//! prints it) to a file that parses back to the same config.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vtpmd::config::fuzz_config(data);
});
