//! A blocking client for swtpm's control channel, and the data channel a
//! VMM hands over with `CMD_SET_DATAFD`.
//!
//! Every operation has a deadline: each read and write is given the time
//! that is left, so a peer that stops answering costs at most the timeout.
//! Async callers run this on a blocking thread.
//!
//! swtpm serves one control client at a time: while one is connected,
//! another's `connect` succeeds (the backlog) but its requests go
//! unanswered until the first disconnects.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use zeroize::Zeroize;

use super::codec::{
    self, BlobData, BlobType, Cmd, CodecError, MAX_INFO, MAX_STATE_BLOB, Request, Response,
    ResultCode,
};
use super::tpm::{self, TpmError, TpmResponse};

/// Which exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A control-channel command.
    Ctrl(Cmd),
    /// A TPM command on the data channel.
    TpmCommand,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Ctrl(cmd) => write!(f, "{cmd}"),
            Op::TpmCommand => f.write_str("TPM command"),
        }
    }
}

/// Everything that can go wrong talking to swtpm.
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    #[error("cannot connect to swtpm control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no connection to swtpm control socket {path} within {timeout:?}")]
    ConnectTimeout { path: PathBuf, timeout: Duration },
    #[error("cannot create the {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot send {op}")]
    Send {
        op: Op,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive the response to {op}")]
    Receive {
        op: Op,
        #[source]
        source: io::Error,
    },
    #[error("swtpm closed the channel during {op}")]
    Closed { op: Op },
    #[error("no response to {op} within {timeout:?}")]
    Timeout { op: Op, timeout: Duration },
    #[error("malformed response to {cmd}")]
    Codec {
        cmd: Cmd,
        #[source]
        source: CodecError,
    },
    #[error("swtpm refused {cmd}: {code}")]
    Result { cmd: Cmd, code: ResultCode },
    #[error("response to {cmd} does not answer it")]
    Unexpected { cmd: Cmd },
    #[error("{cmd}: {what}")]
    Transfer { cmd: Cmd, what: &'static str },
    #[error("{cmd}: {len} bytes exceed the bound of {max}")]
    TooLarge { cmd: Cmd, len: usize, max: u32 },
    #[error("malformed TPM response")]
    Tpm(#[source] TpmError),
}

impl CtrlError {
    /// The result code swtpm refused a command with, if that is what
    /// happened.
    pub fn result_code(&self) -> Option<ResultCode> {
        match self {
            CtrlError::Result { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// `CMD_SET_BUFFERSIZE`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    /// The buffer size in use.
    pub size: u32,
    pub min: u32,
    pub max: u32,
}

/// A whole state blob, as `CMD_GET_STATEBLOB` returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBlob {
    /// swtpm encrypted it (a `--migration-key`, or `--key` without the
    /// decrypt flag).
    pub encrypted: bool,
    pub data: BlobData,
}

/// A connection to one swtpm's control socket.
#[derive(Debug)]
pub struct CtrlClient {
    stream: UnixStream,
    timeout: Duration,
}

impl CtrlClient {
    /// Connects; `timeout` bounds the connect and then each call.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, CtrlError> {
        let connect_err = |source: io::Error| CtrlError::Connect {
            path: path.to_owned(),
            source,
        };
        let addr = UnixAddr::new(path).map_err(|e| connect_err(e.into()))?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| connect_err(e.into()))?;
        let stream = UnixStream::from(fd);
        // SO_SNDTIMEO also bounds connect() on a Unix socket whose backlog
        // is full.
        stream
            .set_write_timeout(Some(nonzero(timeout)))
            .map_err(connect_err)?;
        loop {
            match socket::connect(stream.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    return Err(CtrlError::ConnectTimeout {
                        path: path.to_owned(),
                        timeout,
                    });
                }
                Err(e) => return Err(connect_err(e.into())),
            }
        }
        Ok(Self { stream, timeout })
    }

    /// A client on a stream that is connected already; `timeout` bounds
    /// each call.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self, CtrlError> {
        stream
            .set_write_timeout(Some(nonzero(timeout)))
            .map_err(|source| CtrlError::Setup {
                what: "control connection",
                source,
            })?;
        Ok(Self { stream, timeout })
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `req` and reads exactly its response. A non-zero result
    /// becomes [`CtrlError::Result`].
    ///
    /// `Request::SetDataFd` sent this way carries no fd (swtpm answers
    /// `TPM_BAD_PARAMETER`); use [`CtrlClient::set_data_fd`].
    pub fn call(&mut self, req: &Request) -> Result<Response, CtrlError> {
        let cmd = req.cmd();
        if let Request::SetStateBlob { data, .. } = req {
            if data.len() > usize::try_from(MAX_STATE_BLOB).unwrap_or(usize::MAX) {
                return Err(CtrlError::TooLarge {
                    cmd,
                    len: data.len(),
                    max: MAX_STATE_BLOB,
                });
            }
        }
        let deadline = Deadline::new(self.timeout);
        let mut bytes = req.encode();
        let sent = write_all(&mut self.stream, &bytes, deadline, Op::Ctrl(cmd));
        bytes.zeroize();
        sent?;
        self.receive(cmd, deadline)
    }

    fn receive(&mut self, cmd: Cmd, deadline: Deadline) -> Result<Response, CtrlError> {
        let mut buf = read_response(&mut self.stream, cmd, deadline)?;
        let decoded = codec::decode(cmd, &buf);
        buf.zeroize();
        match decoded {
            Ok(Response::Error(code)) => Err(CtrlError::Result { cmd, code }),
            Ok(response) => Ok(response),
            Err(source) => Err(CtrlError::Codec { cmd, source }),
        }
    }

    /// `CMD_GET_CAPABILITY`: the [`codec::cap`] bits.
    pub fn get_capability(&mut self) -> Result<u64, CtrlError> {
        match self.call(&Request::GetCapability)? {
            Response::Capabilities(caps) => Ok(caps),
            _ => Err(CtrlError::Unexpected {
                cmd: Cmd::GetCapability,
            }),
        }
    }

    /// `CMD_INIT`: (re)starts the TPM from its stored state.
    pub fn init(&mut self, delete_volatile: bool) -> Result<(), CtrlError> {
        self.expect_ok(&Request::Init { delete_volatile })
    }

    /// `CMD_STOP`: stops the TPM; swtpm keeps running.
    pub fn stop(&mut self) -> Result<(), CtrlError> {
        self.expect_ok(&Request::Stop)
    }

    /// `CMD_SHUTDOWN`: swtpm answers, then exits.
    pub fn shutdown(&mut self) -> Result<(), CtrlError> {
        self.expect_ok(&Request::Shutdown)
    }

    /// `CMD_STORE_VOLATILE`: writes the volatile state file.
    pub fn store_volatile(&mut self) -> Result<(), CtrlError> {
        self.expect_ok(&Request::StoreVolatile)
    }

    /// `CMD_SET_LOCALITY`.
    pub fn set_locality(&mut self, locality: u8) -> Result<(), CtrlError> {
        self.expect_ok(&Request::SetLocality(locality))
    }

    /// `CMD_RESET_TPMESTABLISHED` at `locality` (3 or 4 for TPM 2.0).
    pub fn reset_tpm_established(&mut self, locality: u8) -> Result<(), CtrlError> {
        self.expect_ok(&Request::ResetTpmEstablished(locality))
    }

    /// `CMD_SET_BUFFERSIZE`; 0 only queries (and is the only value allowed
    /// while the TPM runs).
    pub fn set_buffer_size(&mut self, size: u32) -> Result<BufferSizes, CtrlError> {
        match self.call(&Request::SetBufferSize(size))? {
            Response::BufferSize { size, min, max } => Ok(BufferSizes { size, min, max }),
            _ => Err(CtrlError::Unexpected {
                cmd: Cmd::SetBufferSize,
            }),
        }
    }

    /// `CMD_GET_TPMESTABLISHED` (TPM running only).
    pub fn get_tpm_established(&mut self) -> Result<bool, CtrlError> {
        match self.call(&Request::GetTpmEstablished)? {
            Response::TpmEstablished(bit) => Ok(bit),
            _ => Err(CtrlError::Unexpected {
                cmd: Cmd::GetTpmEstablished,
            }),
        }
    }

    /// `CMD_GET_CONFIG`: the [`codec::config`] bits.
    pub fn get_config(&mut self) -> Result<u32, CtrlError> {
        match self.call(&Request::GetConfig)? {
            Response::Config(flags) => Ok(flags),
            _ => Err(CtrlError::Unexpected {
                cmd: Cmd::GetConfig,
            }),
        }
    }

    /// `CMD_GET_INFO`: libtpms's JSON for the [`codec::info`] `flags`,
    /// collected over as many offsets as it takes.
    pub fn get_info(&mut self, flags: u64) -> Result<String, CtrlError> {
        let cmd = Cmd::GetInfo;
        let mut text = Vec::new();
        let mut expected = None;
        loop {
            let offset = u32::try_from(text.len()).unwrap_or(u32::MAX);
            let (total, data) = match self.call(&Request::GetInfo { flags, offset })? {
                Response::Info { total, data } => (total, data),
                _ => return Err(CtrlError::Unexpected { cmd }),
            };
            if total > MAX_INFO {
                return Err(CtrlError::TooLarge {
                    cmd,
                    len: usize::try_from(total).unwrap_or(usize::MAX),
                    max: MAX_INFO,
                });
            }
            let total = usize::try_from(total).unwrap_or(usize::MAX);
            if *expected.get_or_insert(total) != total {
                return Err(CtrlError::Transfer {
                    cmd,
                    what: "total length changed between chunks",
                });
            }
            if data.is_empty() || text.len() + data.len() > total {
                return Err(CtrlError::Transfer {
                    cmd,
                    what: "chunk does not fit the total length",
                });
            }
            text.extend_from_slice(&data);
            if text.len() == total {
                break;
            }
        }
        codec::info_text(&text).map_err(|source| CtrlError::Codec { cmd, source })
    }

    /// `CMD_GET_STATEBLOB` (TPM running only), all of it. swtpm 0.7.1
    /// sends a whole blob in one response; the loop follows offsets in
    /// case one comes in parts.
    pub fn get_state_blob(
        &mut self,
        blob: BlobType,
        decrypt: bool,
    ) -> Result<StateBlob, CtrlError> {
        let cmd = Cmd::GetStateBlob;
        let mut collected = BlobData::default();
        let mut target = None;
        let mut encrypted = false;
        loop {
            let offset = u32::try_from(collected.len()).unwrap_or(u32::MAX);
            let request = Request::GetStateBlob {
                decrypt,
                blob,
                offset,
            };
            let (chunk_encrypted, total, data) = match self.call(&request)? {
                Response::StateBlob {
                    encrypted,
                    total,
                    data,
                } => (encrypted, total, data),
                _ => return Err(CtrlError::Unexpected { cmd }),
            };
            // `total` counts from the requested offset.
            let total = usize::try_from(total).unwrap_or(usize::MAX);
            let whole = *target.get_or_insert(collected.len().saturating_add(total));
            if collected.len().saturating_add(total) != whole {
                return Err(CtrlError::Transfer {
                    cmd,
                    what: "total length changed between chunks",
                });
            }
            if collected.is_empty() {
                collected.reserve_exact(whole);
                encrypted = chunk_encrypted;
            }
            if data.is_empty() && collected.len() < whole {
                return Err(CtrlError::Transfer {
                    cmd,
                    what: "chunk made no progress",
                });
            }
            collected.extend(data.as_bytes());
            if collected.len() >= whole {
                break;
            }
        }
        Ok(StateBlob {
            encrypted,
            data: collected,
        })
    }

    /// `CMD_SET_STATEBLOB` (TPM stopped only): replaces one blob.
    pub fn set_state_blob(
        &mut self,
        blob: BlobType,
        encrypted: bool,
        data: BlobData,
    ) -> Result<(), CtrlError> {
        self.expect_ok(&Request::SetStateBlob {
            encrypted,
            blob,
            data,
        })
    }

    /// `CMD_SET_DATAFD`: hands swtpm `fd` (one end of a stream socket) as
    /// its data channel, in an `SCM_RIGHTS` message on the 4-byte command.
    /// swtpm refuses a second one with `TPM_IOERROR`.
    pub fn set_data_fd(&mut self, fd: BorrowedFd<'_>) -> Result<(), CtrlError> {
        let cmd = Cmd::SetDataFd;
        let op = Op::Ctrl(cmd);
        let deadline = Deadline::new(self.timeout);
        let bytes = Request::SetDataFd.encode();
        let fds = [fd.as_raw_fd()];
        let cmsgs = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(&bytes)];
        loop {
            let left = deadline.left(op)?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|source| CtrlError::Send { op, source })?;
            match socket::sendmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) if n == bytes.len() => break,
                // The fd went with the first byte; a partial send of 4
                // bytes to a Unix socket does not happen, but say so.
                Ok(_) => {
                    return Err(CtrlError::Send {
                        op,
                        source: io::Error::new(io::ErrorKind::WriteZero, "partial send"),
                    });
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(deadline.timeout(op)),
                Err(e) => {
                    return Err(CtrlError::Send {
                        op,
                        source: e.into(),
                    });
                }
            }
        }
        match self.receive(cmd, deadline)? {
            Response::Ok => Ok(()),
            _ => Err(CtrlError::Unexpected { cmd }),
        }
    }

    fn expect_ok(&mut self, req: &Request) -> Result<(), CtrlError> {
        match self.call(req)? {
            Response::Ok => Ok(()),
            _ => Err(CtrlError::Unexpected { cmd: req.cmd() }),
        }
    }
}

/// Our end of a TPM data channel.
#[derive(Debug)]
pub struct DataChannel {
    stream: UnixStream,
}

impl DataChannel {
    /// A connected pair: our end, and the fd to hand swtpm with
    /// [`CtrlClient::set_data_fd`] (then drop it).
    pub fn new_pair() -> Result<(Self, OwnedFd), CtrlError> {
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| CtrlError::Setup {
            what: "data channel socket pair",
            source: e.into(),
        })?;
        Ok((
            Self {
                stream: UnixStream::from(ours),
            },
            theirs,
        ))
    }

    /// Sends one TPM command and reads its whole response (header, then
    /// the size it declares, at most [`tpm::MAX_RESPONSE`]).
    pub fn transact(&mut self, command: &[u8], timeout: Duration) -> Result<Vec<u8>, CtrlError> {
        let op = Op::TpmCommand;
        let deadline = Deadline::new(timeout);
        write_all(&mut self.stream, command, deadline, op)?;
        let mut response = vec![0; tpm::HEADER_LEN];
        read_exact(&mut self.stream, &mut response, deadline, op)?;
        let size = tpm::declared_size(&response).map_err(CtrlError::Tpm)?;
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        response.resize(size, 0);
        read_exact(
            &mut self.stream,
            &mut response[tpm::HEADER_LEN..],
            deadline,
            op,
        )?;
        Ok(response)
    }
}

impl AsFd for DataChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// What QEMU 7.2 does with a swtpm at VM start, as a test harness or a
/// health probe needs it: a control connection plus a data channel, with
/// the TPM initialized.
#[derive(Debug)]
pub struct Vmm {
    ctrl: CtrlClient,
    data: DataChannel,
    capabilities: u64,
    buffer: BufferSizes,
}

impl Vmm {
    /// Connects to `ctrl_path` and runs QEMU's prologue: `SET_DATAFD` with
    /// a fresh socket pair, `GET_CAPABILITY`, `STOP`, `SET_BUFFERSIZE(0)`,
    /// `INIT(0)`. The TPM is then initialized but not started: the first
    /// TPM command is the guest's `TPM2_Startup`/`TPM_Startup`.
    pub fn attach(ctrl_path: &Path, timeout: Duration) -> Result<Self, CtrlError> {
        let mut ctrl = CtrlClient::connect(ctrl_path, timeout)?;
        let (data, theirs) = DataChannel::new_pair()?;
        ctrl.set_data_fd(theirs.as_fd())?;
        // swtpm holds its own copy now.
        drop(theirs);
        let capabilities = ctrl.get_capability()?;
        ctrl.stop()?;
        let buffer = ctrl.set_buffer_size(0)?;
        ctrl.init(false)?;
        Ok(Self {
            ctrl,
            data,
            capabilities,
            buffer,
        })
    }

    /// Sends one TPM command on the data channel; the response header is
    /// checked, its code is not.
    pub fn transact(&mut self, command: &[u8]) -> Result<TpmResponse, CtrlError> {
        let bytes = self.data.transact(command, self.ctrl.timeout())?;
        TpmResponse::parse(&bytes).map_err(CtrlError::Tpm)
    }

    /// The control connection, for further commands (swtpm serves only
    /// this one while it is open).
    pub fn ctrl(&mut self) -> &mut CtrlClient {
        &mut self.ctrl
    }

    /// `GET_CAPABILITY`'s answer during attach.
    pub fn capabilities(&self) -> u64 {
        self.capabilities
    }

    /// `SET_BUFFERSIZE(0)`'s answer during attach.
    pub fn buffer_sizes(&self) -> BufferSizes {
        self.buffer
    }

    /// `CMD_SHUTDOWN`: swtpm answers and exits.
    pub fn shutdown(mut self) -> Result<(), CtrlError> {
        self.ctrl.shutdown()
    }
}

/// When the current exchange must be over.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    fn new(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    /// The time left, or `Timeout` when none is.
    fn left(&self, op: Op) -> Result<Duration, CtrlError> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.timeout(op))
        } else {
            Ok(left)
        }
    }

    fn timeout(&self, op: Op) -> CtrlError {
        CtrlError::Timeout {
            op,
            timeout: self.timeout,
        }
    }
}

/// A socket timeout of zero means "none"; never pass one.
fn nonzero(timeout: Duration) -> Duration {
    timeout.max(Duration::from_millis(1))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn write_all(
    stream: &mut UnixStream,
    mut bytes: &[u8],
    deadline: Deadline,
    op: Op,
) -> Result<(), CtrlError> {
    while !bytes.is_empty() {
        let left = deadline.left(op)?;
        stream
            .set_write_timeout(Some(left))
            .map_err(|source| CtrlError::Send { op, source })?;
        match stream.write(bytes) {
            Ok(0) => return Err(CtrlError::Closed { op }),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(deadline.timeout(op)),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                return Err(CtrlError::Closed { op });
            }
            Err(source) => return Err(CtrlError::Send { op, source }),
        }
    }
    Ok(())
}

fn read_exact(
    stream: &mut UnixStream,
    mut buf: &mut [u8],
    deadline: Deadline,
    op: Op,
) -> Result<(), CtrlError> {
    while !buf.is_empty() {
        let left = deadline.left(op)?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|source| CtrlError::Receive { op, source })?;
        match stream.read(buf) {
            Ok(0) => return Err(CtrlError::Closed { op }),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(deadline.timeout(op)),
            Err(source) => return Err(CtrlError::Receive { op, source }),
        }
    }
    Ok(())
}

/// Reads exactly one response to `cmd`: the result (or capabilities), and
/// on success the rest of the header and the payload it declares.
fn read_response(
    stream: &mut UnixStream,
    cmd: Cmd,
    deadline: Deadline,
) -> Result<Vec<u8>, CtrlError> {
    let op = Op::Ctrl(cmd);
    let first = if cmd.has_result() {
        4
    } else {
        cmd.response_header_len()
    };
    let mut buf = vec![0; first];
    read_exact(stream, &mut buf, deadline, op)?;

    if codec::result_of(cmd, &buf).is_some_and(|code| code != ResultCode::SUCCESS) {
        // An error response is the result alone, or for some commands the
        // whole header. swtpm writes each response with one write, so
        // whatever belongs to it is already queued: take that, without
        // waiting for bytes that will never come.
        let extra = cmd.max_error_len() - first;
        if extra > 0 {
            let mut more = vec![0; extra];
            match socket::recv(stream.as_raw_fd(), &mut more, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => buf.extend_from_slice(&more[..n]),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => {
                    return Err(CtrlError::Receive {
                        op,
                        source: e.into(),
                    });
                }
            }
        }
        return Ok(buf);
    }

    let header_len = cmd.response_header_len();
    buf.resize(header_len, 0);
    read_exact(stream, &mut buf[first..], deadline, op)?;
    let payload =
        codec::payload_len(cmd, &buf).map_err(|source| CtrlError::Codec { cmd, source })?;
    buf.resize(header_len + payload, 0);
    read_exact(stream, &mut buf[header_len..], deadline, op)?;
    Ok(buf)
}
