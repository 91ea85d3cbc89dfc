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
mod quota;
mod recv;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

pub use auth::{Access, Groups, Peer};

use crate::log_limit::{Limiter, Rate};
use crate::supervisor::Supervisor;

/// Bounds on what one client may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message accepted, in bytes.
    pub max_message: usize,
    /// The largest sealed file Export and Import carry, in bytes. An
    /// admin's connection may receive an Import this much larger (as
    /// base64) than `max_message`.
    pub max_sealed: usize,
    /// Connections served at once; more are refused at accept.
    pub max_connections: usize,
    /// Of those, how many only root and the admin group may use.
    pub reserved_connections: usize,
    /// Connections one uid other than an admin's may hold at once.
    pub max_connections_per_uid: usize,
    /// How long a connection of a caller who may do nothing but
    /// introspection lives, however busy.
    pub stranger_lifetime: Duration,
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
            max_sealed: 1024 * 1024,
            max_connections: 128,
            reserved_connections: 16,
            max_connections_per_uid: 16,
            stranger_lifetime: Duration::from_secs(5),
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

impl Limits {
    /// The largest message a connection of `access` may send: only an
    /// admin may Import or MigrateIn, so only an admin's buffer may grow to
    /// hold a sealed file. Every other call of an admin is still held to
    /// `max_message` once it has arrived.
    pub fn receive_limit(&self, access: Access) -> usize {
        match access {
            Access::Admin => self
                .max_message
                .saturating_add(self.max_sealed.div_ceil(3).saturating_mul(4)),
            Access::ReadOnly | Access::Denied => self.max_message,
        }
    }
}

struct Context {
    supervisor: Arc<Supervisor>,
    limits: Limits,
    inflight: Arc<inflight::InFlight>,
    /// The log lines of callers other than admins, per uid.
    log_limit: Limiter<PeerSource>,
}

/// A caller as a source of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PeerSource(u32);

impl std::fmt::Display for PeerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {}", self.0)
    }
}

/// Whether one connection's log lines go out: an admin's always, anyone
/// else's within their uid's rate.
#[derive(Clone, Copy)]
struct LogGate<'a> {
    source: PeerSource,
    limited: bool,
    limiter: &'a Limiter<PeerSource>,
}

impl LogGate<'_> {
    /// `enabled`: whether the line's level is logged at all (a filtered
    /// line must not use up the caller's rate).
    fn allows(&self, enabled: bool) -> bool {
        enabled && (!self.limited || self.limiter.allow(&self.source))
    }
}

/// The listen queue: a flood of connects must not fill it before root's
/// connect gets in (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

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
    widen_backlog(&listener).map_err(sock_err("listen on", path))?;
    Ok(listener)
}

/// Sets the listen queue to [`LISTEN_BACKLOG`], on a socket bound here or
/// passed by systemd (whose `Backlog=` may be smaller): `listen` again on a
/// listening socket only changes its queue.
pub fn widen_backlog(listener: &UnixListener) -> io::Result<()> {
    let backlog = nix::sys::socket::Backlog::new(LISTEN_BACKLOG).map_err(io::Error::from)?;
    nix::sys::socket::listen(listener, backlog).map_err(io::Error::from)
}

/// Serves clients until `shutdown` resolves; then stops accepting. Calls in
/// progress finish on their own tasks; the returned [`Answering`] lets the
/// caller wait for their replies before the process exits. `log_rate`
/// bounds what callers other than admins can make vtpmd log.
pub async fn serve(
    listener: UnixListener,
    supervisor: Arc<Supervisor>,
    groups: Groups,
    limits: Limits,
    log_rate: Rate,
    shutdown: impl Future<Output = ()>,
) -> Answering {
    let inflight = Arc::new(inflight::InFlight::default());
    let ctx = Arc::new(Context {
        supervisor,
        limits,
        inflight: Arc::clone(&inflight),
        log_limit: Limiter::new(log_rate),
    });
    let quotas = quota::Quotas::new(quota::Quota {
        total: limits.max_connections,
        reserved: limits.reserved_connections,
        per_uid: limits.max_connections_per_uid,
    });
    let mut flush = tokio::time::interval(ctx.log_limit.flush_every());
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Answering(inflight),
            _ = flush.tick() => ctx.log_limit.flush(),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => admit(stream, &groups, &quotas, &ctx),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Classifies a new connection by its peer's credentials and serves it on
/// its own task, or refuses it with a typed error. Runs on the accept
/// loop, so it never waits: the refusal fits in the empty send buffer of
/// a fresh socket (a peer that cannot take it gets the close alone).
fn admit(stream: UnixStream, groups: &Groups, quotas: &Arc<quota::Quotas>, ctx: &Arc<Context>) {
    let Some(peer) = connection::peer_of(&stream) else {
        return;
    };
    let access = groups.access(&peer);
    match quotas.admit(peer.uid.as_raw(), access) {
        Ok(admitted) => {
            let ctx = Arc::clone(ctx);
            tokio::spawn(async move {
                let open = ctx.supervisor.metrics().connection_open();
                connection::serve(stream, peer, access, ctx).await;
                drop(open);
                drop(admitted);
            });
        }
        Err(refusal) => {
            ctx.supervisor
                .metrics()
                .connection_refused(refusal.scope(access));
            let source = PeerSource(peer.uid.as_raw());
            if ctx.log_limit.allow(&source) {
                tracing::warn!(
                    uid = peer.uid.as_raw(),
                    pid = ?peer.pid,
                    ?refusal,
                    "connection refused: too many connections"
                );
            }
            // Written on the socket itself: tokio's try_write would see no
            // readiness yet on a stream just accepted and write nothing.
            // The socket is non-blocking, so this never waits.
            if let Ok(mut stream) = stream.into_std() {
                let _ = std::io::Write::write_all(&mut stream, &refusal.to_wire().encode());
            }
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
