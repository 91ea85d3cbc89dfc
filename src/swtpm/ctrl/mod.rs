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
