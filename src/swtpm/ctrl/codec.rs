//! Byte layout of swtpm's control protocol (`include/swtpm/tpm_ioctl.h`,
//! the `CMD_*` commands of the non-CUSE TPMs).
//!
//! Pure encoding and decoding: no I/O. "All messages contain big-endian
//! data": a request is `be32 cmd || body`, a response is the `resp` part of
//! the command's union, with no length prefix. So the length of a response
//! is known from the command alone (plus a declared length for the two
//! variable ones); decoders accept exactly that length and nothing else.
//!
//! Error responses are shorter than success responses: swtpm answers a
//! command it refuses (TPM not running, malformed body, unknown command)
//! with the 4-byte result alone. Two commands can also fail with their full
//! header: `GET_TPMESTABLISHED` (8 bytes) and `GET_STATEBLOB` (16 bytes, no
//! data), so their decoders accept both forms when the result is non-zero.

use std::fmt;

use zeroize::Zeroize;

use crate::be::Reader;

/// The largest state blob (or chunk of one) a decoder accepts. A TPM 2.0
/// permanent state is a few KiB; the volatile state about 9 KiB.
pub const MAX_STATE_BLOB: u32 = 1024 * 1024;
/// The largest `GET_INFO` string a decoder accepts (swtpm sends ≤ 3 KiB per
/// response).
pub const MAX_INFO: u32 = 64 * 1024;

/// `PTM_INIT_FLAG_DELETE_VOLATILE`: "delete volatile state file after
/// reading it".
const INIT_FLAG_DELETE_VOLATILE: u32 = 1;
/// `PTM_STATE_FLAG_DECRYPTED`, on input to `GET_STATEBLOB`.
const STATE_FLAG_DECRYPTED: u32 = 1;
/// `PTM_STATE_FLAG_ENCRYPTED`, on output of `GET_STATEBLOB` and input of
/// `SET_STATEBLOB`.
const STATE_FLAG_ENCRYPTED: u32 = 2;

/// Capability bits of `CMD_GET_CAPABILITY` (`PTM_CAP_*`).
pub mod cap {
    pub const INIT: u64 = 1;
    pub const SHUTDOWN: u64 = 1 << 1;
    pub const GET_TPMESTABLISHED: u64 = 1 << 2;
    pub const SET_LOCALITY: u64 = 1 << 3;
    pub const HASHING: u64 = 1 << 4;
    pub const CANCEL_TPM_CMD: u64 = 1 << 5;
    pub const STORE_VOLATILE: u64 = 1 << 6;
    pub const RESET_TPMESTABLISHED: u64 = 1 << 7;
    pub const GET_STATEBLOB: u64 = 1 << 8;
    pub const SET_STATEBLOB: u64 = 1 << 9;
    pub const STOP: u64 = 1 << 10;
    pub const GET_CONFIG: u64 = 1 << 11;
    pub const SET_DATAFD: u64 = 1 << 12;
    pub const SET_BUFFERSIZE: u64 = 1 << 13;
    pub const GET_INFO: u64 = 1 << 14;
    /// TPM 2.0 only: data commands may carry swtpm's 9-byte header.
    pub const SEND_COMMAND_HEADER: u64 = 1 << 15;
}

/// `PTM_CONFIG_FLAG_*` of `CMD_GET_CONFIG`.
pub mod config {
    pub const FILE_KEY: u32 = 1;
    pub const MIGRATION_KEY: u32 = 2;
}

/// `GET_INFO` flags (`SWTPM_INFO_*` of libtpms).
pub mod info {
    pub const TPM_SPECIFICATION: u64 = 1;
    pub const TPM_ATTRIBUTES: u64 = 2;
}

/// A control command code (`CMD_*`). The hashing commands (`0x06..=0x08`)
/// are not implemented: no VMM on our path sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmd {
    GetCapability,
    Init,
    Shutdown,
    GetTpmEstablished,
    SetLocality,
    Cancel,
    StoreVolatile,
    ResetTpmEstablished,
    GetStateBlob,
    SetStateBlob,
    Stop,
    GetConfig,
    SetDataFd,
    SetBufferSize,
    GetInfo,
}

impl Cmd {
    pub const ALL: [Cmd; 15] = [
        Cmd::GetCapability,
        Cmd::Init,
        Cmd::Shutdown,
        Cmd::GetTpmEstablished,
        Cmd::SetLocality,
        Cmd::Cancel,
        Cmd::StoreVolatile,
        Cmd::ResetTpmEstablished,
        Cmd::GetStateBlob,
        Cmd::SetStateBlob,
        Cmd::Stop,
        Cmd::GetConfig,
        Cmd::SetDataFd,
        Cmd::SetBufferSize,
        Cmd::GetInfo,
    ];

    /// The wire code.
    pub fn code(self) -> u32 {
        match self {
            Cmd::GetCapability => 0x01,
            Cmd::Init => 0x02,
            Cmd::Shutdown => 0x03,
            Cmd::GetTpmEstablished => 0x04,
            Cmd::SetLocality => 0x05,
            Cmd::Cancel => 0x09,
            Cmd::StoreVolatile => 0x0a,
            Cmd::ResetTpmEstablished => 0x0b,
            Cmd::GetStateBlob => 0x0c,
            Cmd::SetStateBlob => 0x0d,
            Cmd::Stop => 0x0e,
            Cmd::GetConfig => 0x0f,
            Cmd::SetDataFd => 0x10,
            Cmd::SetBufferSize => 0x11,
            Cmd::GetInfo => 0x12,
        }
    }

    /// The name in `tpm_ioctl.h`.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::GetCapability => "CMD_GET_CAPABILITY",
            Cmd::Init => "CMD_INIT",
            Cmd::Shutdown => "CMD_SHUTDOWN",
            Cmd::GetTpmEstablished => "CMD_GET_TPMESTABLISHED",
            Cmd::SetLocality => "CMD_SET_LOCALITY",
            Cmd::Cancel => "CMD_CANCEL_TPM_CMD",
            Cmd::StoreVolatile => "CMD_STORE_VOLATILE",
            Cmd::ResetTpmEstablished => "CMD_RESET_TPMESTABLISHED",
            Cmd::GetStateBlob => "CMD_GET_STATEBLOB",
            Cmd::SetStateBlob => "CMD_SET_STATEBLOB",
            Cmd::Stop => "CMD_STOP",
            Cmd::GetConfig => "CMD_GET_CONFIG",
            Cmd::SetDataFd => "CMD_SET_DATAFD",
            Cmd::SetBufferSize => "CMD_SET_BUFFERSIZE",
            Cmd::GetInfo => "CMD_GET_INFO",
        }
    }

    /// Length of the fixed part of a successful response: all of it, or
    /// the header before the declared payload (`GET_STATEBLOB`,
    /// `GET_INFO`).
    pub fn response_header_len(self) -> usize {
        match self {
            Cmd::GetCapability | Cmd::GetTpmEstablished | Cmd::GetConfig => 8,
            Cmd::SetBufferSize | Cmd::GetStateBlob => 16,
            Cmd::GetInfo => 12,
            Cmd::Init
            | Cmd::Shutdown
            | Cmd::SetLocality
            | Cmd::Cancel
            | Cmd::StoreVolatile
            | Cmd::ResetTpmEstablished
            | Cmd::SetStateBlob
            | Cmd::Stop
            | Cmd::SetDataFd => 4,
        }
    }

    /// Whether the response starts with a `be32` result code. Only
    /// `GET_CAPABILITY`'s does not: it is the 8-byte capability set alone.
    pub fn has_result(self) -> bool {
        self != Cmd::GetCapability
    }

    /// The lengths a response carrying a non-zero result may have: the
    /// result alone, or (for two commands) the whole header.
    fn error_lens(self) -> &'static [usize] {
        match self {
            Cmd::GetTpmEstablished => &[4, 8],
            Cmd::GetStateBlob => &[4, 16],
            _ => &[4],
        }
    }

    /// The longest error response: how much a client should take from the
    /// socket after a non-zero result to stay in step.
    pub fn max_error_len(self) -> usize {
        self.error_lens().iter().copied().max().unwrap_or(4)
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A TPM result code (`TPM_RESULT`, TPM 1.2 numbering, which swtpm uses on
/// the control channel for both TPM families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResultCode(pub u32);

impl ResultCode {
    pub const SUCCESS: Self = Self(0);
    /// A malformed request body.
    pub const BAD_PARAMETER: Self = Self(0x03);
    pub const FAIL: Self = Self(0x09);
    /// An unknown command, or one not allowed in the TPM's current state
    /// (e.g. `GET_TPMESTABLISHED` before `INIT`, `SET_STATEBLOB` while
    /// running).
    pub const BAD_ORDINAL: Self = Self(0x0a);
    pub const SIZE: Self = Self(0x17);
    /// E.g. `SET_DATAFD` when swtpm already has a data channel.
    pub const IOERROR: Self = Self(0x1f);
    pub const BAD_LOCALITY: Self = Self(0x3d);
    /// `TPM_RETRY`: e.g. a state blob that does not exist.
    pub const RETRY: Self = Self(0x800);

    /// The `tpm_error.h` name, where known.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::SUCCESS => "TPM_SUCCESS",
            Self::BAD_PARAMETER => "TPM_BAD_PARAMETER",
            Self::FAIL => "TPM_FAIL",
            Self::BAD_ORDINAL => "TPM_BAD_ORDINAL",
            Self::SIZE => "TPM_SIZE",
            Self::IOERROR => "TPM_IOERROR",
            Self::BAD_LOCALITY => "TPM_BAD_LOCALITY",
            Self::RETRY => "TPM_RETRY",
            _ => return None,
        })
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} (0x{:x})", self.0),
            None => write!(f, "0x{:x}", self.0),
        }
    }
}

/// Which state blob (`PTM_BLOB_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobType {
    Permanent,
    Volatile,
    SaveState,
}

impl BlobType {
    pub fn code(self) -> u32 {
        match self {
            BlobType::Permanent => 1,
            BlobType::Volatile => 2,
            BlobType::SaveState => 3,
        }
    }
}

/// Bytes of TPM state. They may be plaintext TPM secrets, so they are
/// never printed and are wiped on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BlobData(Vec<u8>);

impl BlobData {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends without reallocating when `reserve` sized it beforehand.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        if self.0.capacity() - self.0.len() < bytes.len() {
            // Move to a larger buffer by hand so the old one is wiped.
            let mut bigger = Vec::with_capacity(self.0.len() + bytes.len());
            bigger.extend_from_slice(&self.0);
            self.0.zeroize();
            self.0 = bigger;
        }
        self.0.extend_from_slice(bytes);
    }

    pub(crate) fn reserve_exact(&mut self, total: usize) {
        if total > self.0.len() {
            let mut sized = Vec::with_capacity(total);
            sized.extend_from_slice(&self.0);
            self.0.zeroize();
            self.0 = sized;
        }
    }
}

impl Drop for BlobData {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for BlobData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobData({} bytes)", self.0.len())
    }
}

/// A control-channel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    GetCapability,
    Init {
        delete_volatile: bool,
    },
    /// Terminates the TPM, answers, then the process exits.
    Shutdown,
    GetTpmEstablished,
    SetLocality(u8),
    Cancel,
    StoreVolatile,
    ResetTpmEstablished(u8),
    GetStateBlob {
        decrypt: bool,
        blob: BlobType,
        offset: u32,
    },
    /// Only while the TPM is stopped.
    SetStateBlob {
        encrypted: bool,
        blob: BlobType,
        data: BlobData,
    },
    Stop,
    GetConfig,
    /// The 4-byte message must carry one fd in an `SCM_RIGHTS` message.
    SetDataFd,
    /// 0 queries.
    SetBufferSize(u32),
    GetInfo {
        flags: u64,
        offset: u32,
    },
}

impl Request {
    pub fn cmd(&self) -> Cmd {
        match self {
            Request::GetCapability => Cmd::GetCapability,
            Request::Init { .. } => Cmd::Init,
            Request::Shutdown => Cmd::Shutdown,
            Request::GetTpmEstablished => Cmd::GetTpmEstablished,
            Request::SetLocality(_) => Cmd::SetLocality,
            Request::Cancel => Cmd::Cancel,
            Request::StoreVolatile => Cmd::StoreVolatile,
            Request::ResetTpmEstablished(_) => Cmd::ResetTpmEstablished,
            Request::GetStateBlob { .. } => Cmd::GetStateBlob,
            Request::SetStateBlob { .. } => Cmd::SetStateBlob,
            Request::Stop => Cmd::Stop,
            Request::GetConfig => Cmd::GetConfig,
            Request::SetDataFd => Cmd::SetDataFd,
            Request::SetBufferSize(_) => Cmd::SetBufferSize,
            Request::GetInfo { .. } => Cmd::GetInfo,
        }
    }

    /// The bytes to send, in one write: swtpm reads a request with one
    /// `recvmsg` and, for `SET_BUFFERSIZE` and `GET_INFO`, does not wait
    /// for the rest of a body that arrives split.
    ///
    /// A `SET_STATEBLOB` blob longer than `u32::MAX` bytes cannot be
    /// described; its length field saturates and swtpm will refuse it.
    /// The client refuses blobs above [`MAX_STATE_BLOB`] before encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.extend_from_slice(&self.cmd().code().to_be_bytes());
        match self {
            Request::GetCapability
            | Request::Shutdown
            | Request::GetTpmEstablished
            | Request::Cancel
            | Request::StoreVolatile
            | Request::Stop
            | Request::GetConfig
            | Request::SetDataFd => {}
            Request::Init { delete_volatile } => {
                let flags = if *delete_volatile {
                    INIT_FLAG_DELETE_VOLATILE
                } else {
                    0
                };
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Request::SetLocality(loc) | Request::ResetTpmEstablished(loc) => out.push(*loc),
            Request::GetStateBlob {
                decrypt,
                blob,
                offset,
            } => {
                let flags = if *decrypt { STATE_FLAG_DECRYPTED } else { 0 };
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&blob.code().to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
            }
            Request::SetStateBlob {
                encrypted,
                blob,
                data,
            } => {
                let flags = if *encrypted { STATE_FLAG_ENCRYPTED } else { 0 };
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                out.reserve_exact(12 + data.len());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&blob.code().to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(data.as_bytes());
            }
            Request::SetBufferSize(size) => out.extend_from_slice(&size.to_be_bytes()),
            Request::GetInfo { flags, offset } => {
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes()); // pad
            }
        }
        out
    }
}

/// A decoded control-channel response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `GET_CAPABILITY`: the `PTM_CAP_*` bits ([`cap`]).
    Capabilities(u64),
    /// Result 0, no further fields.
    Ok,
    /// A non-zero result.
    Error(ResultCode),
    TpmEstablished(bool),
    /// `GET_CONFIG`: [`config`] bits.
    Config(u32),
    BufferSize {
        size: u32,
        min: u32,
        max: u32,
    },
    /// One response to `GET_STATEBLOB`. swtpm 0.7.1 sends the whole blob
    /// from the requested offset at once, with `total == data.len()`;
    /// `total` counts the bytes from the requested offset on.
    StateBlob {
        encrypted: bool,
        total: u32,
        data: BlobData,
    },
    /// One response to `GET_INFO`: `total` is the length of the whole
    /// string including its NUL, `data` the part from the requested offset.
    Info {
        total: u32,
        data: Vec<u8>,
    },
}

/// What is wrong with a response, before any meaning is given to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("response is {len} bytes, {expected} expected")]
    Truncated { len: usize, expected: usize },
    #[error("response is {len} bytes, only {expected} expected")]
    TrailingBytes { len: usize, expected: usize },
    #[error("declared length {declared} exceeds the bound of {max}")]
    LengthBound { declared: u32, max: u32 },
    #[error("chunk length {length} exceeds the declared total {total}")]
    LengthExceedsTotal { length: u32, total: u32 },
    #[error("error response carries {length} bytes of data")]
    ErrorWithData { length: u32 },
    #[error("GET_TPMESTABLISHED bit is {0}, not 0 or 1")]
    EstablishedBit(u8),
    #[error("info string is not NUL-terminated UTF-8 without inner NULs")]
    InfoText,
}

/// The length of the payload that follows a successful response header
/// (`header` holds at least [`Cmd::response_header_len`] bytes and result
/// 0). Bounded, so a client can read it without trusting the peer.
pub fn payload_len(cmd: Cmd, header: &[u8]) -> Result<usize, CodecError> {
    let (at, max) = match cmd {
        Cmd::GetStateBlob => (12, MAX_STATE_BLOB),
        Cmd::GetInfo => (8, MAX_INFO),
        _ => return Ok(0),
    };
    let expected = cmd.response_header_len();
    let declared = Reader::new(header.get(at..).unwrap_or_default())
        .u32()
        .ok_or(CodecError::Truncated {
            len: header.len(),
            expected,
        })?;
    if declared > max {
        return Err(CodecError::LengthBound { declared, max });
    }
    usize::try_from(declared).map_err(|_| CodecError::LengthBound { declared, max })
}

/// The result code at the start of a response, if the command has one and
/// enough bytes are there.
pub fn result_of(cmd: Cmd, bytes: &[u8]) -> Option<ResultCode> {
    if !cmd.has_result() {
        return None;
    }
    Reader::new(bytes).u32().map(ResultCode)
}

/// Decodes the complete response to `cmd`: exactly its bytes, no more.
pub fn decode(cmd: Cmd, bytes: &[u8]) -> Result<Response, CodecError> {
    let mut r = Reader::new(bytes);
    if cmd.has_result() {
        let result = ResultCode(r.u32().ok_or(truncated(bytes, 4))?);
        if result != ResultCode::SUCCESS {
            return decode_error(cmd, result, bytes);
        }
    }

    let header_len = cmd.response_header_len();
    let response = match cmd {
        Cmd::GetCapability => Response::Capabilities(r.u64().ok_or(truncated(bytes, header_len))?),
        Cmd::Init
        | Cmd::Shutdown
        | Cmd::SetLocality
        | Cmd::Cancel
        | Cmd::StoreVolatile
        | Cmd::ResetTpmEstablished
        | Cmd::SetStateBlob
        | Cmd::Stop
        | Cmd::SetDataFd => Response::Ok,
        Cmd::GetTpmEstablished => {
            // `struct { ptm_res tpm_result; unsigned char bit; }`, padded
            // to 8 bytes; swtpm zeroes the padding.
            let [bit, _, _, _] = r.array().ok_or(truncated(bytes, header_len))?;
            match bit {
                0 => Response::TpmEstablished(false),
                1 => Response::TpmEstablished(true),
                other => return Err(CodecError::EstablishedBit(other)),
            }
        }
        Cmd::GetConfig => Response::Config(r.u32().ok_or(truncated(bytes, header_len))?),
        Cmd::SetBufferSize => {
            let mut field = || r.u32().ok_or(truncated(bytes, header_len));
            Response::BufferSize {
                size: field()?,
                min: field()?,
                max: field()?,
            }
        }
        Cmd::GetStateBlob => {
            let mut field = || r.u32().ok_or(truncated(bytes, header_len));
            let flags = field()?;
            let total = field()?;
            let length = field()?;
            let data = take_payload(&mut r, bytes, header_len, length, total, MAX_STATE_BLOB)?;
            Response::StateBlob {
                encrypted: flags & STATE_FLAG_ENCRYPTED != 0,
                total,
                data: BlobData::new(data.to_vec()),
            }
        }
        Cmd::GetInfo => {
            let mut field = || r.u32().ok_or(truncated(bytes, header_len));
            let total = field()?;
            let length = field()?;
            let data = take_payload(&mut r, bytes, header_len, length, total, MAX_INFO)?;
            Response::Info {
                total,
                data: data.to_vec(),
            }
        }
    };
    let expected = bytes.len() - r.remaining();
    finish(&r, expected)?;
    Ok(response)
}

fn decode_error(cmd: Cmd, result: ResultCode, bytes: &[u8]) -> Result<Response, CodecError> {
    let lens = cmd.error_lens();
    if !lens.contains(&bytes.len()) {
        let max = cmd.max_error_len();
        return Err(if bytes.len() > max {
            CodecError::TrailingBytes {
                len: bytes.len(),
                expected: max,
            }
        } else {
            // Between two valid lengths, or below the header.
            CodecError::Truncated {
                len: bytes.len(),
                expected: lens
                    .iter()
                    .copied()
                    .find(|&l| l > bytes.len())
                    .unwrap_or(max),
            }
        });
    }
    if cmd == Cmd::GetStateBlob && bytes.len() == 16 {
        // A failed GET_STATEBLOB still sends its header; it must not
        // announce data it did not send.
        let length = Reader::new(&bytes[12..]).u32().unwrap_or_default();
        if length != 0 {
            return Err(CodecError::ErrorWithData { length });
        }
    }
    Ok(Response::Error(result))
}

fn take_payload<'a>(
    r: &mut Reader<'a>,
    bytes: &[u8],
    header_len: usize,
    length: u32,
    total: u32,
    max: u32,
) -> Result<&'a [u8], CodecError> {
    if length > max {
        return Err(CodecError::LengthBound {
            declared: length,
            max,
        });
    }
    if length > total {
        return Err(CodecError::LengthExceedsTotal { length, total });
    }
    let want = usize::try_from(length).map_err(|_| CodecError::LengthBound {
        declared: length,
        max,
    })?;
    r.take(want).ok_or(truncated(bytes, header_len + want))
}

/// The text of a complete `GET_INFO` string: swtpm sends it with its NUL.
pub fn info_text(bytes: &[u8]) -> Result<String, CodecError> {
    let (&last, text) = bytes.split_last().ok_or(CodecError::InfoText)?;
    if last != 0 || text.contains(&0) {
        return Err(CodecError::InfoText);
    }
    String::from_utf8(text.to_vec()).map_err(|_| CodecError::InfoText)
}

fn truncated(bytes: &[u8], expected: usize) -> CodecError {
    CodecError::Truncated {
        len: bytes.len(),
        expected,
    }
}

/// Runs every decoder on `bytes`. For the fuzzer: it must never panic.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8]) {
    for cmd in Cmd::ALL {
        let _ = result_of(cmd, bytes);
        if let Ok(len) = payload_len(cmd, bytes) {
            // The bound holds whatever the bytes say.
            assert!(len <= 1024 * 1024);
        }
        if let Ok(Response::Info { data, .. }) = decode(cmd, bytes) {
            let _ = info_text(&data);
        }
    }
    let _ = info_text(bytes);
}

/// Nothing may follow the last field.
fn finish(r: &Reader<'_>, expected: usize) -> Result<(), CodecError> {
    match r.remaining() {
        0 => Ok(()),
        extra => Err(CodecError::TrailingBytes {
            len: expected + extra,
            expected,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_hex as hex;

    #[test]
    fn requests_encode_to_the_documented_layout() {
        let cases: Vec<(Request, &str)> = vec![
            (Request::GetCapability, "00000001"),
            (
                Request::Init {
                    delete_volatile: false,
                },
                "00000002 00000000",
            ),
            (
                Request::Init {
                    delete_volatile: true,
                },
                "00000002 00000001",
            ),
            (Request::Shutdown, "00000003"),
            (Request::GetTpmEstablished, "00000004"),
            (Request::SetLocality(3), "00000005 03"),
            (Request::Cancel, "00000009"),
            (Request::StoreVolatile, "0000000a"),
            (Request::ResetTpmEstablished(4), "0000000b 04"),
            (
                Request::GetStateBlob {
                    decrypt: true,
                    blob: BlobType::Volatile,
                    offset: 0x0102,
                },
                "0000000c 00000001 00000002 00000102",
            ),
            (
                Request::GetStateBlob {
                    decrypt: false,
                    blob: BlobType::SaveState,
                    offset: 0,
                },
                "0000000c 00000000 00000003 00000000",
            ),
            (
                Request::SetStateBlob {
                    encrypted: true,
                    blob: BlobType::Permanent,
                    data: BlobData::new(vec![0xaa, 0xbb, 0xcc]),
                },
                "0000000d 00000002 00000001 00000003 aabbcc",
            ),
            (Request::Stop, "0000000e"),
            (Request::GetConfig, "0000000f"),
            (Request::SetDataFd, "00000010"),
            (Request::SetBufferSize(3968), "00000011 00000f80"),
            (
                Request::GetInfo {
                    flags: info::TPM_SPECIFICATION | info::TPM_ATTRIBUTES,
                    offset: 5,
                },
                "00000012 0000000000000003 00000005 00000000",
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(request.encode(), hex(expected), "{request:?}");
        }
    }

    #[test]
    fn every_command_code_matches_tpm_ioctl_h() {
        let codes: Vec<u32> = Cmd::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(
            codes,
            [1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
        );
    }

    /// One valid successful response per command, with what it decodes to.
    fn valid_responses() -> Vec<(Cmd, Vec<u8>, Response)> {
        let mut blob = hex("00000000 00000002 00000003 00000003");
        blob.extend_from_slice(b"abc");
        let mut info_bytes = hex("00000000 00000004 00000004");
        info_bytes.extend_from_slice(b"{}x\0");
        vec![
            (
                Cmd::GetCapability,
                hex("000000000000ffff"),
                Response::Capabilities(0xffff),
            ),
            (Cmd::Init, hex("00000000"), Response::Ok),
            (Cmd::Shutdown, hex("00000000"), Response::Ok),
            (
                Cmd::GetTpmEstablished,
                hex("00000000 01000000"),
                Response::TpmEstablished(true),
            ),
            (Cmd::SetLocality, hex("00000000"), Response::Ok),
            (Cmd::Cancel, hex("00000000"), Response::Ok),
            (Cmd::StoreVolatile, hex("00000000"), Response::Ok),
            (Cmd::ResetTpmEstablished, hex("00000000"), Response::Ok),
            (
                Cmd::GetStateBlob,
                blob,
                Response::StateBlob {
                    encrypted: true,
                    total: 3,
                    data: BlobData::new(b"abc".to_vec()),
                },
            ),
            (Cmd::SetStateBlob, hex("00000000"), Response::Ok),
            (Cmd::Stop, hex("00000000"), Response::Ok),
            (
                Cmd::GetConfig,
                hex("00000000 00000003"),
                Response::Config(3),
            ),
            (Cmd::SetDataFd, hex("00000000"), Response::Ok),
            (
                Cmd::SetBufferSize,
                hex("00000000 00001000 00000af8 00001000"),
                Response::BufferSize {
                    size: 4096,
                    min: 2808,
                    max: 4096,
                },
            ),
            (
                Cmd::GetInfo,
                info_bytes,
                Response::Info {
                    total: 4,
                    data: b"{}x\0".to_vec(),
                },
            ),
        ]
    }

    #[test]
    fn valid_responses_decode() {
        let responses = valid_responses();
        assert_eq!(responses.len(), Cmd::ALL.len());
        for (cmd, bytes, expected) in responses {
            assert_eq!(decode(cmd, &bytes), Ok(expected), "{cmd}");
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        for (cmd, bytes, _) in valid_responses() {
            for len in 0..bytes.len() {
                let err = decode(cmd, &bytes[..len]).unwrap_err();
                assert!(
                    matches!(err, CodecError::Truncated { .. }),
                    "{cmd} at {len}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn a_trailing_byte_is_rejected() {
        for (cmd, mut bytes, _) in valid_responses() {
            bytes.push(0);
            let err = decode(cmd, &bytes).unwrap_err();
            assert!(
                matches!(err, CodecError::TrailingBytes { .. }),
                "{cmd}: {err:?}"
            );
        }
    }

    #[test]
    fn a_nonzero_result_decodes_to_its_code() {
        for cmd in Cmd::ALL.into_iter().filter(|c| c.has_result()) {
            assert_eq!(
                decode(cmd, &hex("0000000a")),
                Ok(Response::Error(ResultCode::BAD_ORDINAL)),
                "{cmd}"
            );
            assert!(decode(cmd, &hex("0000000a 00")).is_err(), "{cmd}");
        }
    }

    #[test]
    fn failed_stateblob_with_its_header_is_an_error_response() {
        let bytes = hex("00000800 00000000 00000000 00000000");

        assert_eq!(
            decode(Cmd::GetStateBlob, &bytes),
            Ok(Response::Error(ResultCode::RETRY))
        );
        assert_eq!(ResultCode::RETRY.to_string(), "TPM_RETRY (0x800)");
    }

    #[test]
    fn failed_stateblob_announcing_data_is_rejected() {
        let bytes = hex("00000800 00000000 00000001 00000001");

        assert_eq!(
            decode(Cmd::GetStateBlob, &bytes),
            Err(CodecError::ErrorWithData { length: 1 })
        );
    }

    #[test]
    fn failed_tpm_established_with_its_bit_is_an_error_response() {
        assert_eq!(
            decode(Cmd::GetTpmEstablished, &hex("00000009 00000000")),
            Ok(Response::Error(ResultCode::FAIL))
        );
    }

    #[test]
    fn lengths_above_the_bounds_are_rejected() {
        let blob = hex("00000000 00000000 00100001 00100001");
        let info_header = hex("00000000 00010001 00010001");

        assert_eq!(
            payload_len(Cmd::GetStateBlob, &blob),
            Err(CodecError::LengthBound {
                declared: 0x10_0001,
                max: MAX_STATE_BLOB
            })
        );
        assert_eq!(
            decode(Cmd::GetStateBlob, &blob),
            Err(CodecError::LengthBound {
                declared: 0x10_0001,
                max: MAX_STATE_BLOB
            })
        );
        assert_eq!(
            decode(Cmd::GetInfo, &info_header),
            Err(CodecError::LengthBound {
                declared: 0x1_0001,
                max: MAX_INFO
            })
        );
    }

    #[test]
    fn a_chunk_longer_than_its_total_is_rejected() {
        let mut bytes = hex("00000000 00000000 00000001 00000002");
        bytes.extend_from_slice(b"ab");

        assert_eq!(
            decode(Cmd::GetStateBlob, &bytes),
            Err(CodecError::LengthExceedsTotal {
                length: 2,
                total: 1
            })
        );
    }

    #[test]
    fn an_established_bit_other_than_0_or_1_is_rejected() {
        assert_eq!(
            decode(Cmd::GetTpmEstablished, &hex("00000000 02000000")),
            Err(CodecError::EstablishedBit(2))
        );
    }

    #[test]
    fn payload_len_reads_the_declared_length() {
        let (_, blob, _) = valid_responses().remove(8);

        assert_eq!(payload_len(Cmd::GetStateBlob, &blob[..16]), Ok(3));
        assert_eq!(payload_len(Cmd::Init, &[]), Ok(0));
        assert!(matches!(
            payload_len(Cmd::GetInfo, &[0; 11]),
            Err(CodecError::Truncated { .. })
        ));
    }

    #[test]
    fn info_text_needs_exactly_one_trailing_nul() {
        assert_eq!(info_text(b"{\"a\":1}\0"), Ok("{\"a\":1}".to_owned()));
        assert_eq!(info_text(b"{}"), Err(CodecError::InfoText));
        assert_eq!(info_text(b"{\0}\0"), Err(CodecError::InfoText));
        assert_eq!(info_text(b""), Err(CodecError::InfoText));
        assert_eq!(info_text(b"\xff\0"), Err(CodecError::InfoText));
    }

    #[test]
    fn state_blob_round_trips_through_set_and_get_layouts() {
        let data = BlobData::new((0..=255u8).collect());
        let request = Request::SetStateBlob {
            encrypted: false,
            blob: BlobType::Volatile,
            data: data.clone(),
        };
        let encoded = request.encode();
        // Answer the way swtpm would: the same bytes behind a GET header.
        let mut response = hex("00000000 00000000 00000100 00000100");
        response.extend_from_slice(&encoded[16..]);

        assert_eq!(
            decode(Cmd::GetStateBlob, &response),
            Ok(Response::StateBlob {
                encrypted: false,
                total: 256,
                data
            })
        );
    }

    #[test]
    fn blob_data_is_not_printed() {
        assert_eq!(
            format!("{:?}", BlobData::new(b"secret".to_vec())),
            "BlobData(6 bytes)"
        );
    }

    #[test]
    fn fuzz_decode_survives_arbitrary_bytes() {
        let mut seed = 0x1234_5678_u32;
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    seed.to_be_bytes()[0]
                })
                .collect();
            fuzz_decode(&bytes);
        }
        for (_, bytes, _) in valid_responses() {
            fuzz_decode(&bytes);
        }
    }
}
