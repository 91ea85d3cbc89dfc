//! A blocking Varlink client for vtpmd's socket: one call at a time, each
//! reply read up to its NUL terminator within a bounded buffer.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use vtpmd::protocol::varlink::Reply;
use vtpmd::secret::{SecretBuf, SecretError};

use crate::message;
use crate::output;
use crate::passphrase::PassphraseError;
use crate::trust::{self, PathError, PeerError, TrustError, Trusted};

/// The largest reply accepted: an Export of the largest sealed file the
/// format allows (16,778,197 bytes, as base64), and a List of many guests.
pub const MAX_REPLY: usize = 24 * 1024 * 1024;

/// How long a write may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket vtpmd listens on when nothing else is configured: the rule
/// of [`vtpmd::paths`], which the daemon applies too.
pub fn default_socket_path() -> PathBuf {
    vtpmd::paths::Env::current().socket()
}

/// Everything that can go wrong talking to vtpmd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with a Varlink error.
    #[error("{}", output::describe_remote(name, parameters))]
    Remote { name: String, parameters: Value },
    #[error("permission denied on {}: are you in vtpmd's group?", path.display())]
    PermissionDenied { path: PathBuf },
    #[error(
        "cannot connect to vtpmd at {}: is the daemon running? (or give --socket PATH)",
        path.display()
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to vtpmd at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vtpmd did not answer within {} s (give a longer --timeout?)", timeout.as_secs())]
    Timeout { timeout: Duration },
    #[error("vtpmd closed the connection before answering")]
    Closed,
    #[error("vtpmd's reply exceeds {} MiB", MAX_REPLY / (1024 * 1024))]
    ReplyTooLarge,
    #[error("vtpmd's reply is not a Varlink reply")]
    BadReply(#[source] serde_json::Error),
    #[error("vtpmd's reply has unexpected parameters")]
    UnexpectedReply(#[source] serde_json::Error),
    #[error("cannot hold the request in locked memory")]
    Secret(#[source] SecretError),
    #[error(transparent)]
    Passphrase(#[from] PassphraseError),
    /// A refusal decided locally, phrased like the daemon's errors (e.g.
    /// attach-args for a guest that does not run).
    #[error("{message}")]
    Refused {
        name: &'static str,
        parameters: Value,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Transfer(#[from] crate::transfer::TransferError),
    /// The socket may not be vtpmd's: nothing was written to it.
    #[error(
        "refusing to {} {}: {reason} (whoever runs that may not be vtpmd; give --socket PATH for the real one)",
        if *secrets { "send a passphrase to" } else { "talk to" },
        socket.display()
    )]
    Untrusted {
        socket: PathBuf,
        secrets: bool,
        reason: TrustError,
    },
    #[error("cannot tell who listens on {}", socket.display())]
    PeerCredentials {
        socket: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// What the call about to be made carries, which decides how much of the
/// socket must be trusted before it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// A passphrase: the path and the peer must both pass, or nothing is
    /// sent.
    Secrets,
    /// Nothing secret: the peer must pass (an impostor's answers are not
    /// harmless: attach-args hands a VMM the control socket a Status reply
    /// names), the path only draws a warning (a socket in a shared
    /// directory is a common test set-up, and what it could leak is a
    /// guest id).
    NoSecrets,
}

/// The path check for a call carrying `carries`, before anything secret
/// is read or the connection is made.
pub fn check_socket_path(path: &Path, carries: Carries) -> Result<(), ClientError> {
    match (trust::check_path(path, Trusted::current()), carries) {
        (Ok(()), _) => Ok(()),
        (Err(PathError::Untrusted(reason)), Carries::Secrets) => Err(ClientError::Untrusted {
            socket: path.to_owned(),
            secrets: true,
            reason,
        }),
        (Err(PathError::Untrusted(reason)), Carries::NoSecrets) => {
            eprintln!(
                "vtpmctl: warning: {}: {reason}; a passphrase would not be sent there",
                path.display()
            );
            Ok(())
        }
        (Err(PathError::Inspect { source, .. }), Carries::Secrets) => Err(match source.kind() {
            ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: path.to_owned(),
            },
            _ => ClientError::Connect {
                path: path.to_owned(),
                source,
            },
        }),
        // connect() reports the same problem in its own words.
        (Err(PathError::Inspect { .. }), Carries::NoSecrets) => Ok(()),
    }
}

/// One connection to vtpmd.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    timeout: Option<Duration>,
    /// The checks the socket passed on connecting.
    carries: Carries,
    /// Bytes received beyond the last reply's NUL (the next replies of a
    /// stream). Replies carry no secrets.
    pending: Vec<u8>,
}

impl Client {
    /// Connects to `path` once it passes the checks for `carries`;
    /// `timeout` bounds the wait for each reply (`None`: wait as long as
    /// it takes, for Monitor).
    pub fn connect(
        path: &Path,
        timeout: Option<Duration>,
        carries: Carries,
    ) -> Result<Self, ClientError> {
        check_socket_path(path, carries)?;
        let stream = UnixStream::connect(path).map_err(|source| {
            if source.kind() == ErrorKind::PermissionDenied {
                ClientError::PermissionDenied {
                    path: path.to_owned(),
                }
            } else {
                ClientError::Connect {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        // Before any byte, so an impostor learns not even the method.
        trust::check_peer(&stream, Trusted::current()).map_err(|e| match e {
            PeerError::Untrusted(reason) => ClientError::Untrusted {
                socket: path.to_owned(),
                secrets: carries == Carries::Secrets,
                reason,
            },
            PeerError::Credentials(source) => ClientError::PeerCredentials {
                socket: path.to_owned(),
                source,
            },
        })?;
        let io = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io)?;
        stream.set_read_timeout(timeout).map_err(io)?;
        Ok(Self {
            stream,
            path: path.to_owned(),
            timeout,
            carries,
            pending: Vec::new(),
        })
    }

    /// Calls `member` without secrets and returns its reply's parameters.
    pub fn call(
        &mut self,
        member: &str,
        parameters: &Map<String, Value>,
    ) -> Result<Value, ClientError> {
        self.send(&message::plain(member, parameters, false))?;
        self.receive().map(|(params, _)| params)
    }

    /// Calls `member` with `secrets` added to `parameters`; the message is
    /// assembled and written from locked memory.
    pub fn call_with_secrets(
        &mut self,
        member: &str,
        parameters: &Map<String, Value>,
        secrets: &[(&str, &SecretBuf)],
    ) -> Result<Value, ClientError> {
        // The peer passed on connecting; a connection made for a call
        // without secrets has yet to pass the path check too.
        if self.carries != Carries::Secrets {
            check_socket_path(&self.path, Carries::Secrets)?;
        }
        let msg =
            message::with_secrets(member, parameters, secrets).map_err(ClientError::Secret)?;
        self.send(msg.expose_secret())?;
        drop(msg);
        self.receive().map(|(params, _)| params)
    }

    /// Starts a streaming call (`"more": true`); read its replies with
    /// [`Client::next_reply`].
    pub fn start_stream(
        &mut self,
        member: &str,
        parameters: &Map<String, Value>,
    ) -> Result<(), ClientError> {
        self.send(&message::plain(member, parameters, true))
    }

    /// The next reply of a stream: its parameters and whether more follow.
    pub fn next_reply(&mut self) -> Result<(Value, bool), ClientError> {
        self.receive()
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(bytes)
            .map_err(|source| self.io(source))
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        match source.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout {
                timeout: self.timeout.unwrap_or(WRITE_TIMEOUT),
            },
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => ClientError::Closed,
            _ => ClientError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Reads one NUL-terminated reply (bounded) and turns an error reply
    /// into [`ClientError::Remote`].
    fn receive(&mut self) -> Result<(Value, bool), ClientError> {
        let mut scanned = 0;
        let end = loop {
            if let Some(pos) = self.pending[scanned..].iter().position(|&b| b == 0) {
                break scanned + pos;
            }
            scanned = self.pending.len();
            if self.pending.len() > MAX_REPLY {
                return Err(ClientError::ReplyTooLarge);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io(e)),
            };
            self.pending.extend_from_slice(&chunk[..n]);
        };
        if end > MAX_REPLY {
            return Err(ClientError::ReplyTooLarge);
        }
        let parsed = parse_reply(&self.pending[..end]);
        self.pending.drain(..=end);
        parsed
    }
}

/// Decodes one reply (without its NUL): parameters and `continues`, or the
/// error it carries.
pub fn parse_reply(bytes: &[u8]) -> Result<(Value, bool), ClientError> {
    let reply: Reply<Value> = serde_json::from_slice(bytes).map_err(ClientError::BadReply)?;
    let parameters = reply
        .parameters
        .unwrap_or_else(|| Value::Object(Map::new()));
    if let Some(name) = reply.error {
        return Err(ClientError::Remote { name, parameters });
    }
    Ok((parameters, reply.continues))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn replies_and_errors_are_told_apart() {
        let (v, more) = parse_reply(br#"{"parameters":{"a":1},"continues":true}"#).unwrap();
        assert_eq!(v["a"], 1);
        assert!(more);
        let (v, more) = parse_reply(b"{}").unwrap();
        assert_eq!(v, serde_json::json!({}));
        assert!(!more);
        match parse_reply(br#"{"error":"io.vtpmd.Manager.Busy","parameters":{"guest":"g"}}"#) {
            Err(ClientError::Remote { name, parameters }) => {
                assert_eq!(name, "io.vtpmd.Manager.Busy");
                assert_eq!(parameters["guest"], "g");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_reply(b"nonsense"),
            Err(ClientError::BadReply(_))
        ));
    }

    #[test]
    fn a_missing_socket_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing.sock");
        let err = Client::connect(&path, None, Carries::NoSecrets).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("is the daemon running"), "{text}");
    }

    #[test]
    fn replies_split_and_batched_arrive_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut call = Vec::new();
            let mut byte = [0u8];
            while conn.read(&mut byte).unwrap() == 1 && byte[0] != 0 {
                call.push(byte[0]);
            }
            conn.write_all(br#"{"parameters":{"n":1},"continues":true}"#)
                .unwrap();
            conn.write_all(b"\0{\"parameters\":{\"n\":2},\"conti")
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            conn.write_all(b"nues\":true}\0{\"parameters\":{\"n\":3}}\0")
                .unwrap();
            call
        });
        let mut client =
            Client::connect(&path, Some(Duration::from_secs(5)), Carries::NoSecrets).unwrap();
        client.start_stream("Monitor", &Map::new()).unwrap();
        let got: Vec<(Value, bool)> = (0..3).map(|_| client.next_reply().unwrap()).collect();
        assert_eq!(got[0], (serde_json::json!({"n": 1}), true));
        assert_eq!(got[1], (serde_json::json!({"n": 2}), true));
        assert_eq!(got[2], (serde_json::json!({"n": 3}), false));
        let call = server.join().unwrap();
        let v: Value = serde_json::from_slice(&call).unwrap();
        assert_eq!(v["more"], true);
        assert!(matches!(client.next_reply(), Err(ClientError::Closed)));
    }

    #[test]
    fn an_endless_reply_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let junk = vec![b' '; 1024 * 1024];
            for _ in 0..MAX_REPLY / junk.len() + 4 {
                if conn.write_all(&junk).is_err() {
                    break;
                }
            }
        });
        let mut client =
            Client::connect(&path, Some(Duration::from_secs(5)), Carries::NoSecrets).unwrap();
        assert!(matches!(
            client.next_reply(),
            Err(ClientError::ReplyTooLarge)
        ));
    }
}
