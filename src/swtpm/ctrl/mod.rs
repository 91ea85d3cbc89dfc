//! swtpm's control channel: the protocol of `include/swtpm/tpm_ioctl.h`
//! (`codec`, pure and fuzzed), a blocking client with timeouts for it and
//! for the TPM data channel (`client`), and the few raw TPM commands that
//! health probes and tests send (`tpm`).
//!
//! vtpmd uses the client for health probes; the integration tests use
//! [`Vmm`] to play the part of QEMU.

#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod tpm;

pub use client::{BufferSizes, CtrlClient, CtrlError, DataChannel, Op, StateBlob, Vmm};
pub use codec::{BlobData, BlobType, Cmd, CodecError, Request, Response, ResultCode};
pub use tpm::{TpmError, TpmResponse};

/// Bytes from hex text (white space ignored), for the codec's tests.
#[cfg(test)]
fn test_hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
