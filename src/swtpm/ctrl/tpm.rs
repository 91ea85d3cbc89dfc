//! Just enough raw TPM command framing for health probes and tests: the
//! start-up, random-number and NV-index commands of TPM 2.0 (Part 3 of the
//! TPM 2.0 library specification) and two TPM 1.2 commands. Pure.
//!
//! Every TPM command and response starts with the same 10 bytes:
//! `be16 tag || be32 size (of the whole message) || be32 code`, where the
//! code is the command code in a command and the response code in a
//! response.

/// The length of a TPM command or response header.
pub const HEADER_LEN: usize = 10;
/// The largest response a reader accepts: swtpm's buffer is at most 4096
/// bytes (`SET_BUFFERSIZE`'s maximum), so this leaves room.
pub const MAX_RESPONSE: usize = 8192;

/// `TPM_ST_NO_SESSIONS`.
pub const TPM2_ST_NO_SESSIONS: u16 = 0x8001;
/// `TPM_ST_SESSIONS`.
pub const TPM2_ST_SESSIONS: u16 = 0x8002;
/// TPM 1.2 `TPM_TAG_RQU_COMMAND`.
pub const TPM12_TAG_RQU_COMMAND: u16 = 0x00c1;
/// TPM 1.2 `TPM_TAG_RSP_COMMAND`.
pub const TPM12_TAG_RSP_COMMAND: u16 = 0x00c4;

/// `TPM_RC_SUCCESS` (and TPM 1.2 `TPM_SUCCESS`).
pub const RC_SUCCESS: u32 = 0;
/// `TPM_RC_INITIALIZE`: TPM2_Startup has not run.
pub const TPM2_RC_INITIALIZE: u32 = 0x100;
/// `TPM_RC_FAILURE`: what swtpm answers before `CMD_INIT`.
pub const TPM2_RC_FAILURE: u32 = 0x101;

const TPM2_CC_NV_DEFINE_SPACE: u32 = 0x12a;
const TPM2_CC_NV_WRITE: u32 = 0x137;
const TPM2_CC_STARTUP: u32 = 0x144;
const TPM2_CC_SHUTDOWN: u32 = 0x145;
const TPM2_CC_NV_READ: u32 = 0x14e;
const TPM2_CC_GET_RANDOM: u32 = 0x17b;
const TPM2_SU_CLEAR: u16 = 0x0000;
const TPM2_RH_OWNER: u32 = 0x4000_0001;
/// The password authorization session.
const TPM2_RS_PW: u32 = 0x4000_0009;
const TPM2_ALG_SHA256: u16 = 0x000b;

const TPM12_ORD_GET_RANDOM: u32 = 0x46;
const TPM12_ORD_STARTUP: u32 = 0x99;
const TPM12_ST_CLEAR: u16 = 0x0001;

/// `TPMA_NV` bits.
pub mod nv_attr {
    pub const OWNERWRITE: u32 = 1 << 1;
    pub const AUTHWRITE: u32 = 1 << 2;
    pub const OWNERREAD: u32 = 1 << 17;
    pub const AUTHREAD: u32 = 1 << 18;
}

/// What is wrong with a TPM message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    #[error("TPM response is {len} bytes, shorter than its 10-byte header")]
    ShortHeader { len: usize },
    #[error("TPM response header says {declared} bytes, {actual} received")]
    SizeMismatch { declared: u32, actual: usize },
    #[error("TPM response of {declared} bytes exceeds the bound of {max}")]
    TooLong { declared: u32, max: usize },
    #[error("TPM response body is malformed: {what}")]
    Body { what: &'static str },
    #[error("{what} of {len} bytes does not fit a TPM command")]
    CommandTooLong { what: &'static str, len: usize },
}

/// A TPM response, its header checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmResponse {
    pub tag: u16,
    /// The response code; 0 is success.
    pub rc: u32,
    /// Everything after the header.
    pub body: Vec<u8>,
}

impl TpmResponse {
    /// Parses a whole response; its size field must match `bytes.len()`.
    pub fn parse(bytes: &[u8]) -> Result<Self, TpmError> {
        let declared = declared_size(bytes)?;
        if usize::try_from(declared).ok() != Some(bytes.len()) {
            return Err(TpmError::SizeMismatch {
                declared,
                actual: bytes.len(),
            });
        }
        let tag = u16::from_be_bytes([bytes[0], bytes[1]]);
        let rc = u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
        Ok(Self {
            tag,
            rc,
            body: bytes[HEADER_LEN..].to_vec(),
        })
    }

    /// TPM2_GetRandom's `randomBytes` (a TPM2B_DIGEST).
    pub fn tpm2_random_bytes(&self) -> Result<&[u8], TpmError> {
        let mut r = Body::new(&self.body);
        let bytes = r.sized_u16("randomBytes")?;
        r.finish()?;
        Ok(bytes)
    }

    /// TPM2_NV_Read's `data` (a TPM2B_MAX_NV_BUFFER after the parameter
    /// size; the password session's response area follows).
    pub fn tpm2_nv_data(&self) -> Result<&[u8], TpmError> {
        let mut r = Body::new(&self.body);
        let param_size = r.u32("parameterSize")?;
        let params = r.take(param_size, "parameters")?;
        let mut p = Body::new(params);
        let data = p.sized_u16("data")?;
        p.finish()?;
        Ok(data)
    }

    /// TPM 1.2 TPM_GetRandom's `randomBytes` (be32 size, bytes).
    pub fn tpm12_random_bytes(&self) -> Result<&[u8], TpmError> {
        let mut r = Body::new(&self.body);
        let size = r.u32("randomBytesSize")?;
        let bytes = r.take(size, "randomBytes")?;
        r.finish()?;
        Ok(bytes)
    }
}

/// The size field of a TPM message header, bounded by [`MAX_RESPONSE`]
/// and at least the header. `bytes` needs only the header.
pub fn declared_size(bytes: &[u8]) -> Result<u32, TpmError> {
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or(TpmError::ShortHeader { len: bytes.len() })?;
    let declared = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    match usize::try_from(declared) {
        Ok(size) if size < HEADER_LEN => Err(TpmError::SizeMismatch {
            declared,
            actual: bytes.len(),
        }),
        Ok(size) if size <= MAX_RESPONSE => Ok(declared),
        _ => Err(TpmError::TooLong {
            declared,
            max: MAX_RESPONSE,
        }),
    }
}

/// TPM2_Startup(TPM_SU_CLEAR).
pub fn tpm2_startup_clear() -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_STARTUP)
        .u16(TPM2_SU_CLEAR)
        .finish()
}

/// TPM2_Shutdown(TPM_SU_CLEAR).
pub fn tpm2_shutdown_clear() -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_SHUTDOWN)
        .u16(TPM2_SU_CLEAR)
        .finish()
}

/// TPM2_GetRandom(bytesRequested).
pub fn tpm2_get_random(bytes_requested: u16) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_GET_RANDOM)
        .u16(bytes_requested)
        .finish()
}

/// TPM2_NV_DefineSpace under the owner hierarchy (empty owner password),
/// with an empty index password, SHA-256 name, no policy.
pub fn tpm2_nv_define_space(index: u32, attributes: u32, data_size: u16) -> Vec<u8> {
    // TPMS_NV_PUBLIC: nvIndex, nameAlg, attributes, authPolicy, dataSize.
    const NV_PUBLIC_LEN: u16 = 4 + 2 + 4 + 2 + 2;
    Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_DEFINE_SPACE)
        .u32(TPM2_RH_OWNER)
        .password_session()
        .u16(0) // auth: empty TPM2B_AUTH
        .u16(NV_PUBLIC_LEN)
        .u32(index)
        .u16(TPM2_ALG_SHA256)
        .u32(attributes)
        .u16(0) // authPolicy: empty
        .u16(data_size)
        .finish()
}

/// TPM2_NV_Write of `data` at `offset`, authorized by the owner.
pub fn tpm2_nv_write(index: u32, data: &[u8], offset: u16) -> Result<Vec<u8>, TpmError> {
    let len = u16::try_from(data.len()).map_err(|_| TpmError::CommandTooLong {
        what: "NV data",
        len: data.len(),
    })?;
    Ok(Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_WRITE)
        .u32(TPM2_RH_OWNER)
        .u32(index)
        .password_session()
        .u16(len)
        .bytes(data)
        .u16(offset)
        .finish())
}

/// TPM2_NV_Read of `size` bytes at `offset`, authorized by the owner.
pub fn tpm2_nv_read(index: u32, size: u16, offset: u16) -> Vec<u8> {
    Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_READ)
        .u32(TPM2_RH_OWNER)
        .u32(index)
        .password_session()
        .u16(size)
        .u16(offset)
        .finish()
}

/// TPM 1.2 TPM_Startup(TPM_ST_CLEAR).
pub fn tpm12_startup_clear() -> Vec<u8> {
    Command::new(TPM12_TAG_RQU_COMMAND, TPM12_ORD_STARTUP)
        .u16(TPM12_ST_CLEAR)
        .finish()
}

/// TPM 1.2 TPM_GetRandom(bytesRequested).
pub fn tpm12_get_random(bytes_requested: u32) -> Vec<u8> {
    Command::new(TPM12_TAG_RQU_COMMAND, TPM12_ORD_GET_RANDOM)
        .u32(bytes_requested)
        .finish()
}

/// Builds a command; `finish` fills in the size.
struct Command(Vec<u8>);

impl Command {
    fn new(tag: u16, code: u32) -> Self {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&code.to_be_bytes());
        Self(out)
    }

    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }

    /// The authorization area with one TPMS_AUTH_COMMAND for TPM_RS_PW:
    /// empty nonce, no attributes, empty password.
    fn password_session(self) -> Self {
        const AUTH_LEN: u32 = 4 + 2 + 1 + 2;
        self.u32(AUTH_LEN).u32(TPM2_RS_PW).u16(0).bytes(&[0]).u16(0)
    }

    fn finish(mut self) -> Vec<u8> {
        // Commands built here are at most a few KiB (NV data is u16-sized).
        let size = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[2..6].copy_from_slice(&size.to_be_bytes());
        self.0
    }
}

struct Body<'a> {
    rest: &'a [u8],
}

impl<'a> Body<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: u32, what: &'static str) -> Result<&'a [u8], TpmError> {
        let n = usize::try_from(n).map_err(|_| TpmError::Body { what })?;
        if self.rest.len() < n {
            return Err(TpmError::Body { what });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, TpmError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn sized_u16(&mut self, what: &'static str) -> Result<&'a [u8], TpmError> {
        let b = self.take(2, what)?;
        let n = u16::from_be_bytes([b[0], b[1]]);
        self.take(u32::from(n), what)
    }

    fn finish(&self) -> Result<(), TpmError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(TpmError::Body {
                what: "trailing bytes",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_hex as hex;

    #[test]
    fn commands_match_known_byte_strings() {
        assert_eq!(tpm2_get_random(8), hex("80010000000c0000017b0008"));
        assert_eq!(tpm2_startup_clear(), hex("8001 0000000c 00000144 0000"));
        assert_eq!(tpm2_shutdown_clear(), hex("8001 0000000c 00000145 0000"));
        assert_eq!(tpm12_get_random(8), hex("00c1 0000000e 00000046 00000008"));
        assert_eq!(tpm12_startup_clear(), hex("00c1 0000000c 00000099 0001"));
    }

    #[test]
    fn nv_commands_carry_a_password_session_for_the_owner() {
        let attrs =
            nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;

        assert_eq!(attrs, 0x0006_0006);
        assert_eq!(
            tpm2_nv_define_space(0x0150_0016, attrs, 32),
            hex("8002 0000002d 0000012a 40000001
                 00000009 40000009 0000 00 0000
                 0000 000e 01500016 000b 00060006 0000 0020")
        );
        assert_eq!(
            tpm2_nv_write(0x0150_0016, b"hi", 0).unwrap(),
            hex("8002 00000025 00000137 40000001 01500016
                 00000009 40000009 0000 00 0000
                 0002 6869 0000")
        );
        assert_eq!(
            tpm2_nv_read(0x0150_0016, 2, 0),
            hex("8002 00000023 0000014e 40000001 01500016
                 00000009 40000009 0000 00 0000
                 0002 0000")
        );
    }

    #[test]
    fn nv_write_of_more_than_u16_bytes_is_refused() {
        assert_eq!(
            tpm2_nv_write(1, &vec![0; 70_000], 0),
            Err(TpmError::CommandTooLong {
                what: "NV data",
                len: 70_000
            })
        );
    }

    #[test]
    fn responses_parse_and_yield_their_payloads() {
        let random = TpmResponse::parse(&hex("8001 00000010 00000000 0004 01020304")).unwrap();
        let nv = TpmResponse::parse(&hex(
            "8002 00000017 00000000 00000004 0002 6869 0000 01 0000",
        ))
        .unwrap();
        let random12 = TpmResponse::parse(&hex("00c4 00000010 00000000 00000002 abcd")).unwrap();

        assert_eq!((random.tag, random.rc), (TPM2_ST_NO_SESSIONS, 0));
        assert_eq!(random.tpm2_random_bytes().unwrap(), [1, 2, 3, 4]);
        assert_eq!(nv.tpm2_nv_data().unwrap(), b"hi");
        assert_eq!(random12.tpm12_random_bytes().unwrap(), [0xab, 0xcd]);
    }

    #[test]
    fn an_error_response_has_its_code_and_no_body() {
        let rsp = TpmResponse::parse(&hex("8001 0000000a 00000101")).unwrap();

        assert_eq!(rsp.rc, TPM2_RC_FAILURE);
        assert!(rsp.body.is_empty());
        assert!(rsp.tpm2_random_bytes().is_err());
    }

    #[test]
    fn a_size_field_that_disagrees_with_the_length_is_rejected() {
        let mut bytes = hex("8001 00000010 00000000 0004 01020304");

        bytes.push(0);
        assert_eq!(
            TpmResponse::parse(&bytes),
            Err(TpmError::SizeMismatch {
                declared: 16,
                actual: 17
            })
        );
        for len in 0..16 {
            assert!(TpmResponse::parse(&bytes[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn declared_sizes_outside_the_bounds_are_rejected() {
        assert!(matches!(
            declared_size(&hex("8001 00000009 00000000")),
            Err(TpmError::SizeMismatch { declared: 9, .. })
        ));
        assert!(matches!(
            declared_size(&hex("8001 00002001 00000000")),
            Err(TpmError::TooLong {
                declared: 0x2001,
                ..
            })
        ));
        assert_eq!(declared_size(&hex("8001 00002000 00000000")), Ok(0x2000));
    }

    #[test]
    fn a_random_response_with_trailing_bytes_is_malformed() {
        let rsp = TpmResponse::parse(&hex("8001 00000011 00000000 0004 01020304 ff")).unwrap();

        assert!(rsp.tpm2_random_bytes().is_err());
    }
}
