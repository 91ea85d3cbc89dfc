//! The local API: the `io.vtpmd.Manager` Varlink interface on a Unix
//! socket.
//!
//! Decode, authorize (SO_PEERCRED), run the action on the supervisor,
//! encode. This module knows nothing of swtpm or sealing. The framing is
//! written here rather than taken from the zlink crate because zlink reads
//! into its own growable buffers, and a call may carry a passphrase that
//! must be in locked memory from the first byte received.

#![forbid(unsafe_code)]

mod auth;
mod connection;
mod dispatch;
mod inflight;
mod recv;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;

pub use auth::{Access, Groups, Peer};

use crate::supervisor::Supervisor;

/// Bounds on what one client may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message accepted, in bytes.
    pub max_message: usize,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// How long a connection may be silent (or not read our reply).
    pub idle: Duration,
    /// How long a call waits for its operation before answering that it
    /// is still going on.
    pub request: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message: 64 * 1024,
            max_connections: 128,
            idle: Duration::from_secs(30),
            request: Duration::from_secs(120),
        }
    }
}

/// For the fuzzer: `bytes` as one client's stream, after a first byte that
/// picks the message limit: framed by the real receiver (over a socket
/// pair, into locked memory), each message decoded and validated as
/// [`crate::protocol::fuzz_call`] does, and each passphrase decoded into
/// locked memory as the dispatcher does. Never panics.
#[doc(hidden)]
pub fn fuzz_messages(bytes: &[u8]) {
    use crate::secret::SecretBuf;
    use crate::vault::MAX_PASSPHRASE_LEN;
    use secrecy::ExposeSecret;

    const LIMITS: [usize; 8] = [1, 2, 16, 100, 4096, 4097, 9000, 65536];
    let Some((&pick, stream)) = bytes.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(pick) % LIMITS.len()];
    recv::fuzz_frames(limit, stream, |message| {
        for passphrase in crate::protocol::fuzz_call(message) {
            if let Ok(secret) = SecretBuf::from_base64(passphrase.base64(), MAX_PASSPHRASE_LEN) {
                assert!(secret.len() <= MAX_PASSPHRASE_LEN);
                assert_eq!(secret.expose_secret().len(), secret.len());
            }
        }
    });
}

struct Context {
    supervisor: Arc<Supervisor>,
    groups: Groups,
    limits: Limits,
    inflight: Arc<inflight::InFlight>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    PathOccupied { path: PathBuf },
    #[error("another vtpmd already serves {path}")]
    AlreadyServed { path: PathBuf },
    #[error("cannot {op} the API socket {path}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the API socket at `path`: a stale socket left by a crash is
/// replaced, a live one (another vtpmd answering) or any other file is not.
///
/// Mode 0666: anyone may connect, and every call is authorized from the
/// peer's kernel credentials ([`Groups`]), so a stranger gets a clear
/// PermissionDenied rather than a bare EACCES, and the read-only and admin
/// groups need no common group on the file.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let sock_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| ApiError::Socket { op, path, source }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ApiError::PathOccupied {
                    path: path.to_owned(),
                });
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ApiError::AlreadyServed {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(sock_err("remove the stale", path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err("inspect", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(sock_err("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(sock_err("chmod", path))?;
    Ok(listener)
}

/// Serves clients until `shutdown` resolves; then stops accepting. Calls in
/// progress finish on their own tasks; the returned [`Answering`] lets the
/// caller wait for their replies before the process exits.
pub async fn serve(
    listener: UnixListener,
    supervisor: Arc<Supervisor>,
    groups: Groups,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Answering {
    let inflight = Arc::new(inflight::InFlight::default());
    let ctx = Arc::new(Context {
        supervisor,
        groups,
        limits,
        inflight: Arc::clone(&inflight),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused = RefusedLog::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Answering(inflight),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        refused.note(limits.max_connections);
                        continue;
                    };
                    let ctx = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        connection::serve(stream, ctx).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The calls still being answered after [`serve`] returned.
#[derive(Debug)]
pub struct Answering(Arc<inflight::InFlight>);

impl Answering {
    /// Waits until every call in progress has written its reply, at most
    /// `limit` (a client that does not read its reply must not hold the
    /// exit).
    pub async fn settle(&self, limit: Duration) {
        self.0.settle(limit).await;
    }
}

/// Connections closed at the limit are logged at most once every ten
/// seconds, with their count: a client flooding the socket must not flood
/// the journal too.
#[derive(Debug, Default)]
struct RefusedLog {
    since_last: u64,
    last: Option<std::time::Instant>,
}

impl RefusedLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, limit: usize) {
        self.since_last += 1;
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        tracing::warn!(
            limit,
            refused = self.since_last,
            "connection limit reached; new connections are being closed"
        );
        self.since_last = 0;
        self.last = Some(std::time::Instant::now());
    }
}
