//! Each guest's swtpm in a transient scope unit of its own
//! (`vtpmd-guest-<id>.scope`), through systemd's D-Bus API.
//!
//! A child spawned by vtpmd starts in vtpmd.service's cgroup, so stopping or
//! restarting the service (`KillMode=mixed`) would kill every guest's TPM.
//! Moved into its own scope right after the spawn, swtpm outlives the
//! service, and systemd accounts its memory and tasks per guest, the way
//! libvirt places its helpers in `machine-*.scope` units.
//!
//! vtpmd talks to the manager over its private peer-to-peer socket when it
//! can: that needs no dbus-daemon (minimal hosts and containers have none)
//! and is what `systemctl` uses as root. The system bus is the fallback.
//! Two quirks of that socket are worked around here, each where it is
//! handled: systemd's messages carry a well-known name as their sender,
//! which zbus cannot read (`PrivateSocketRead`), and systemd 252 can
//! leave the first call after the handshake unanswered (`wake`).
//!
//! A connection does not survive `systemctl daemon-reexec` (systemd closes
//! its private connections then); a caller whose call fails connects
//! again.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use std::os::fd::OwnedFd;

use zbus::connection::socket::{ReadHalf, Split, WriteHalf};
use zbus::export::futures_core::Stream;
use zbus::fdo::ConnectionCredentials;
use zbus::message::Type;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::{Connection, MatchRule, Message, MessageStream};

/// systemd's own socket for root clients (`systemctl` uses it), documented
/// in `org.freedesktop.systemd1(5)`.
pub const PRIVATE_SOCKET: &str = "/run/systemd/private";

/// Exists exactly when systemd is PID 1 (`sd_booted(3)`).
const BOOTED_MARKER: &str = "/run/systemd/system";

/// The slice guests' scopes go into unless the caller picks another. It
/// needs no unit file: systemd creates a slice on first reference, as a
/// child of `system.slice`, so every guest TPM is accounted under one node.
pub const DEFAULT_SLICE: &str = "system-vtpmd.slice";

/// The unit the scopes are ordered after, so that at shutdown systemd stops
/// each guest's swtpm before vtpmd itself, and vtpmd can still reseal the
/// state swtpm wrote last.
///
/// The same ordering holds at start: a scope's start job waits while
/// vtpmd.service's own start job runs, i.e. until vtpmd sends `READY=1`.
/// So vtpmd moves (or re-homes adopted) processes only after READY=1;
/// before it, [`Systemd::move_into_scope`] times out.
pub const DEFAULT_AFTER: &str = "vtpmd.service";

/// How long a move into a scope (the call and its job) may take. A scope's
/// start job runs at once unless it is queued behind others, e.g. during
/// boot; this bounds how long a Start can hang on a stuck manager.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(25);

/// How long connecting (socket and SASL handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const JOB: &str = "org.freedesktop.systemd1.Job";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// `UNIT_NAME_MAX` in systemd, less the terminating NUL.
const UNIT_NAME_MAX: usize = 255;

const SCOPE_PREFIX: &str = "vtpmd-guest-";

/// What went wrong talking to systemd, and with which input.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("{name:?} is not a valid systemd unit name: {why}")]
    InvalidUnitName { name: String, why: &'static str },
    #[error("{id:?} cannot name a guest's scope: {why}")]
    InvalidGuestId { id: String, why: &'static str },
    #[error("pid {pid} cannot be moved into a scope")]
    InvalidPid { pid: u32 },
    #[error("cannot check whether systemd runs this host ({path})")]
    BootedCheck {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot reach systemd, neither through {private_socket} ({private_error}) nor through the system bus"
    )]
    Connect {
        private_socket: &'static str,
        private_error: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd did not accept a connection within {after:?}")]
    ConnectTimeout { after: Duration },
    #[error("cannot subscribe to systemd's JobRemoved signal (for {unit})")]
    Subscribe {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("{unit} already exists, so {subject} was not placed in it")]
    UnitExists { unit: String, subject: String },
    #[error("systemd refused to start {unit} for {subject}")]
    StartTransientUnit {
        unit: String,
        subject: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd's job {job} for {unit} ({subject}) ended with {result:?}, not \"done\"")]
    JobFailed {
        unit: String,
        subject: String,
        job: String,
        result: String,
    },
    #[error("systemd did not finish its job for {unit} ({subject}) within {after:?}")]
    JobTimeout {
        unit: String,
        subject: String,
        after: Duration,
    },
    #[error("the connection to systemd closed during its job for {unit} ({subject})")]
    Disconnected { unit: String, subject: String },
    #[error("systemd refused to stop {unit} ({subject})")]
    StopUnit {
        unit: String,
        subject: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot read a JobRemoved signal from systemd (during a job for {unit})")]
    JobSignal {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot ask systemd which unit pid {pid} belongs to")]
    GetUnitByPid {
        pid: u32,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot read the name of unit {path} (holding pid {pid})")]
    UnitId {
        path: String,
        pid: u32,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd did not answer within {after:?} which unit pid {pid} belongs to")]
    QueryTimeout { pid: u32, after: Duration },
}

/// A systemd unit name that systemd will accept as is: no escaping, no
/// template instance, within `UNIT_NAME_MAX`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnitName(String);

impl UnitName {
    /// Checks `name` against a subset of `unit_name_is_valid()`: one of
    /// `[A-Za-z0-9:_.-]`, a suffix among `suffixes`. Escapes (`\`) and
    /// templates (`@`) are refused, since no name vtpmd uses needs them.
    fn parse(name: &str, suffixes: &[&str]) -> Result<Self, ScopeError> {
        let invalid = |why| ScopeError::InvalidUnitName {
            name: name.to_owned(),
            why,
        };
        if name.len() > UNIT_NAME_MAX {
            return Err(invalid("longer than 255 bytes"));
        }
        if let Some(bad) = name.bytes().find(|b| !is_unit_name_byte(*b)) {
            return Err(invalid(if bad == b'@' || bad == b'\\' {
                "templates and escapes are not supported"
            } else {
                "only ASCII letters, digits and \":_.-\" are allowed"
            }));
        }
        let Some(suffix) = suffixes.iter().find(|s| name.ends_with(*s)) else {
            return Err(invalid("it does not end in an expected unit type"));
        };
        let stem = &name[..name.len() - suffix.len()];
        if stem.is_empty() {
            return Err(invalid("the part before the unit type is empty"));
        }
        if *suffix == ".slice"
            && stem != "-"
            && (stem.starts_with('-') || stem.ends_with('-') || stem.contains("--"))
        {
            // systemd reads a slice name's dashes as its path in the tree.
            return Err(invalid("a slice name's dashes must separate parent names"));
        }
        Ok(Self(name.to_owned()))
    }

    /// Any unit, e.g. for `After=` and `Before=`.
    pub fn unit(name: &str) -> Result<Self, ScopeError> {
        Self::parse(name, UNIT_SUFFIXES)
    }

    /// A slice (`*.slice`).
    pub fn slice(name: &str) -> Result<Self, ScopeError> {
        Self::parse(name, &[".slice"])
    }

    /// `vtpmd-guest-<id>.scope`. `id` is normally a `GuestId`'s canonical
    /// text; anything that could change the name's meaning is refused.
    pub fn guest_scope(id: &str) -> Result<Self, ScopeError> {
        let invalid = |why| ScopeError::InvalidGuestId {
            id: id.to_owned(),
            why,
        };
        if id.is_empty() {
            return Err(invalid("it is empty"));
        }
        // A dot would let an id end in something that looks like a suffix.
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "only ASCII letters, digits, \"-\" and \"_\" are allowed",
            ));
        }
        Self::parse(&format!("{SCOPE_PREFIX}{id}.scope"), &[".scope"])
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UnitName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".target",
    ".device",
    ".mount",
    ".automount",
    ".swap",
    ".timer",
    ".path",
    ".slice",
    ".scope",
];

fn is_unit_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-')
}

/// One process to move into a new transient scope, and how to set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeSpec {
    pub name: UnitName,
    pub pid: u32,
    pub description: String,
    pub slice: UnitName,
    /// Ordering only (no requirement): at shutdown a scope is stopped
    /// before the units it is ordered after.
    pub after: Vec<UnitName>,
    pub before: Vec<UnitName>,
}

impl ScopeSpec {
    /// The scope for guest `id`'s swtpm, `pid`: in [`DEFAULT_SLICE`], after
    /// [`DEFAULT_AFTER`].
    pub fn for_guest(id: &str, pid: u32) -> Result<Self, ScopeError> {
        Ok(Self {
            name: UnitName::guest_scope(id)?,
            pid: checked_pid(pid)?,
            description: format!("vtpmd: swtpm of guest {id}"),
            slice: UnitName::slice(DEFAULT_SLICE)?,
            after: vec![UnitName::unit(DEFAULT_AFTER)?],
            before: Vec::new(),
        })
    }

    /// `StartTransientUnit`'s `a(sv)`.
    fn properties(&self) -> Vec<(&'static str, Value<'_>)> {
        fn names(units: &[UnitName]) -> Value<'_> {
            Value::from(units.iter().map(UnitName::as_str).collect::<Vec<_>>())
        }
        vec![
            ("PIDs", Value::from(vec![self.pid])),
            ("Description", Value::from(self.description.as_str())),
            ("Slice", Value::from(self.slice.as_str())),
            // Without it a scope whose swtpm failed stays loaded until
            // `systemctl reset-failed`, and its name cannot be reused.
            ("CollectMode", Value::from("inactive-or-failed")),
            // Per-guest accounting is half the point, even on hosts whose
            // DefaultMemoryAccounting= is off.
            ("MemoryAccounting", Value::from(true)),
            ("After", names(&self.after)),
            ("Before", names(&self.before)),
        ]
    }
}

/// Refuses what can never be a freshly spawned child: 0 (which systemd
/// would read as "the caller") and PID 1.
fn checked_pid(pid: u32) -> Result<u32, ScopeError> {
    if pid <= 1 || i32::try_from(pid).is_err() {
        return Err(ScopeError::InvalidPid { pid });
    }
    Ok(pid)
}

/// How a [`Systemd`] reaches the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// [`PRIVATE_SOCKET`], peer to peer.
    PrivateSocket,
    /// The system bus (dbus-daemon or dbus-broker).
    SystemBus,
}

/// A connection to the system's service manager.
#[derive(Debug)]
pub struct Systemd {
    conn: Connection,
    route: Route,
    timeout: Duration,
}

impl Systemd {
    /// `None` when systemd does not manage this host (no
    /// `/run/systemd/system`), so vtpmd runs the same without it.
    pub async fn connect() -> Result<Option<Self>, ScopeError> {
        match std::fs::symlink_metadata(BOOTED_MARKER) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ScopeError::BootedCheck {
                    path: BOOTED_MARKER,
                    source,
                });
            }
        }
        let connecting = async {
            let private_error = match connect_private(Path::new(PRIVATE_SOCKET)).await {
                Ok(conn) => return Ok((conn, Route::PrivateSocket)),
                Err(e) => e,
            };
            let bus = async {
                zbus::connection::Builder::system()?
                    .method_timeout(DEFAULT_TIMEOUT)
                    .build()
                    .await
            };
            match bus.await {
                Ok(conn) => Ok((conn, Route::SystemBus)),
                Err(source) => Err(ScopeError::Connect {
                    private_socket: PRIVATE_SOCKET,
                    private_error,
                    source,
                }),
            }
        };
        let (conn, route) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ScopeError::ConnectTimeout {
                after: CONNECT_TIMEOUT,
            })??;
        Ok(Some(Self {
            conn,
            route,
            timeout: DEFAULT_TIMEOUT,
        }))
    }

    /// Only the system bus, skipping [`PRIVATE_SOCKET`] (for a non-root
    /// caller, or to test that route).
    pub async fn connect_system_bus() -> Result<Self, ScopeError> {
        let bus = async {
            zbus::connection::Builder::system()?
                .method_timeout(DEFAULT_TIMEOUT)
                .build()
                .await
        };
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, bus)
            .await
            .map_err(|_| ScopeError::ConnectTimeout {
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|source| ScopeError::Connect {
                private_socket: PRIVATE_SOCKET,
                private_error: "not tried".to_owned(),
                source,
            })?;
        Ok(Self {
            conn,
            route: Route::SystemBus,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    pub fn route(&self) -> Route {
        self.route
    }

    /// Replaces [`DEFAULT_TIMEOUT`] for the calls below.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Creates the scope `spec` names with `spec.pid` in it, and returns
    /// once systemd's start job is done, i.e. the process really sits in the
    /// scope's cgroup. A timed-out job is cancelled, so systemd cannot move
    /// the process later behind the caller's back.
    pub async fn move_into_scope(&self, spec: &ScopeSpec) -> Result<(), ScopeError> {
        let pid = checked_pid(spec.pid)?;
        self.start_transient(spec.name.as_str(), spec.properties(), &format!("pid {pid}"))
            .await
    }

    /// Starts the transient unit `unit` with `properties` and waits for its
    /// job (cancelled on timeout). `subject` names what the unit is for, in
    /// errors.
    pub(crate) async fn start_transient(
        &self,
        unit: &str,
        properties: Vec<(&'static str, Value<'_>)>,
        subject: &str,
    ) -> Result<(), ScopeError> {
        let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
        let body = (unit, "fail", properties, aux);
        let call = self.conn.call_method(
            Some(SYSTEMD),
            MANAGER_PATH,
            Some(MANAGER),
            "StartTransientUnit",
            &body,
        );
        self.run_job(call, JobKind::Start, unit, subject).await
    }

    /// Stops `unit` and waits for its job; a unit systemd does not know
    /// is already stopped.
    pub(crate) async fn stop_unit(&self, unit: &str, subject: &str) -> Result<(), ScopeError> {
        let body = (unit, "replace");
        let call = self.conn.call_method(
            Some(SYSTEMD),
            MANAGER_PATH,
            Some(MANAGER),
            "StopUnit",
            &body,
        );
        match self.run_job(call, JobKind::Stop, unit, subject).await {
            Err(ScopeError::StopUnit {
                source: zbus::Error::MethodError(name, _, _),
                ..
            }) if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" => Ok(()),
            result => result,
        }
    }

    /// Makes `call` (which answers with a job's path) and waits until that
    /// job is removed, for at most the timeout.
    async fn run_job(
        &self,
        call: impl Future<Output = zbus::Result<Message>>,
        kind: JobKind,
        unit: &str,
        subject: &str,
    ) -> Result<(), ScopeError> {
        // Subscribed before the call is made (the future is lazy): the job
        // may end before its reply is read.
        let rule = MatchRule::builder()
            .msg_type(Type::Signal)
            .sender(SYSTEMD)
            .and_then(|b| b.path(MANAGER_PATH))
            .and_then(|b| b.interface(MANAGER))
            .and_then(|b| b.member("JobRemoved"))
            .map(|b| b.build())
            .map_err(|source| ScopeError::Subscribe {
                unit: unit.to_owned(),
                source,
            })?;
        let mut removed = MessageStream::for_match_rule(rule, &self.conn, None)
            .await
            .map_err(|source| ScopeError::Subscribe {
                unit: unit.to_owned(),
                source,
            })?;
        let mut job = None;
        let waited = tokio::time::timeout(self.timeout, async {
            let result = start_and_wait(call, &mut removed, kind, unit, subject, &mut job).await?;
            let job = job.as_ref().map_or("", |j| j.as_str());
            job_outcome(job, result, unit, subject)
        })
        .await;
        match waited {
            Ok(outcome) => outcome,
            Err(_) => {
                if let Some(job) = job {
                    self.cancel_job(&job).await;
                }
                Err(ScopeError::JobTimeout {
                    unit: unit.to_owned(),
                    subject: subject.to_owned(),
                    after: self.timeout,
                })
            }
        }
    }

    async fn cancel_job(&self, job: &OwnedObjectPath) {
        let cancel = self
            .conn
            .call_method(Some(SYSTEMD), job.as_str(), Some(JOB), "Cancel", &());
        // Best effort: the job may have finished in the meantime, and the
        // caller reports the timeout either way.
        match tokio::time::timeout(CONNECT_TIMEOUT, cancel).await {
            Ok(Ok(_)) => tracing::debug!(job = job.as_str(), "cancelled a timed-out scope job"),
            Ok(Err(e)) => {
                tracing::debug!(job = job.as_str(), error = %e, "cannot cancel a scope job")
            }
            Err(_) => tracing::debug!(job = job.as_str(), "cancelling a scope job timed out"),
        }
    }

    /// The name of the unit `pid` belongs to (e.g. `vtpmd-guest-….scope`,
    /// or `vtpmd.service` for a child not moved yet); `None` when systemd
    /// knows no unit for it, which includes a pid that no longer exists.
    pub async fn scope_of_pid(&self, pid: u32) -> Result<Option<String>, ScopeError> {
        let pid = checked_pid(pid)?;
        let query = async {
            let reply = match self
                .conn
                .call_method(
                    Some(SYSTEMD),
                    MANAGER_PATH,
                    Some(MANAGER),
                    "GetUnitByPID",
                    &(pid,),
                )
                .await
            {
                Ok(reply) => reply,
                Err(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.freedesktop.systemd1.NoUnitForPID" =>
                {
                    return Ok(None);
                }
                Err(source) => return Err(ScopeError::GetUnitByPid { pid, source }),
            };
            let path: OwnedObjectPath = reply
                .body()
                .deserialize()
                .map_err(|source| ScopeError::GetUnitByPid { pid, source })?;
            let id_error = |source| ScopeError::UnitId {
                path: path.as_str().to_owned(),
                pid,
                source,
            };
            let reply = self
                .conn
                .call_method(
                    Some(SYSTEMD),
                    path.as_str(),
                    Some(PROPERTIES),
                    "Get",
                    &(UNIT, "Id"),
                )
                .await
                .map_err(id_error)?;
            let id: zbus::zvariant::OwnedValue = reply.body().deserialize().map_err(id_error)?;
            String::try_from(id)
                .map(Some)
                .map_err(|e| id_error(zbus::Error::Variant(e)))
        };
        tokio::time::timeout(self.timeout, query)
            .await
            .map_err(|_| ScopeError::QueryTimeout {
                pid,
                after: self.timeout,
            })?
    }
}

async fn connect_private(path: &Path) -> Result<Connection, String> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| e.to_string())?;
    let (read, write) = stream.into_split();
    let read: Box<dyn ReadHalf> = Box::new(PrivateSocketRead::new(read));
    let write: Box<dyn WriteHalf> = Box::new(write);
    // p2p: the manager itself is the peer, so there is no bus to say Hello
    // to and no name to own.
    let conn = zbus::connection::Builder::socket(Split::new(read, write))
        .p2p()
        .method_timeout(DEFAULT_TIMEOUT)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    wake(&conn).await?;
    Ok(conn)
}

/// How often, and how far apart, [`wake`] pings.
const WAKE_PINGS: u32 = 20;
const WAKE_INTERVAL: Duration = Duration::from_millis(100);

/// Pings systemd until it answers, so that the first real call cannot be
/// lost. systemd 252 leaves a message that arrives in the same read as
/// the client's SASL `BEGIN` in its input buffer, undispatched, until the
/// socket becomes readable again (seen with `systemd-analyze log-level
/// debug`: such a call was processed only when the client hung up, 25 s
/// later). Each further ping makes the socket readable, and systemd then
/// answers the stuck one too.
async fn wake(conn: &Connection) -> Result<(), String> {
    for ping in 1..=WAKE_PINGS {
        let call = conn.call_method(
            Some(SYSTEMD),
            MANAGER_PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        );
        match tokio::time::timeout(WAKE_INTERVAL, call).await {
            Ok(Ok(_)) => {
                tracing::debug!(ping, "systemd's private socket answered");
                return Ok(());
            }
            Ok(Err(e)) => return Err(format!("Ping failed: {e}")),
            Err(_) => continue,
        }
    }
    Err(format!(
        "no answer to {WAKE_PINGS} Pings, {WAKE_INTERVAL:?} apart"
    ))
}

/// The read half of a connection to [`PRIVATE_SOCKET`], which hands zbus
/// systemd's messages with their Sender field made valid.
///
/// systemd stamps every message on that socket with the sender
/// `org.freedesktop.systemd1` (`sd_bus_set_sender()` in its
/// `bus_on_connection()`), a well-known name where D-Bus has a unique one
/// (`:…`). zbus 5 reads the field as a unique name, and its socket reader
/// task panics on the first reply, so every call would hang until its
/// timeout. Here each message's Sender is overwritten in place by a unique
/// name of the same length; no other byte changes, and no length or
/// padding moves. Nothing else reads the sender: on a p2p connection the
/// peer is the manager.
#[derive(Debug)]
struct PrivateSocketRead {
    inner: tokio::net::unix::OwnedReadHalf,
    /// Bytes from the socket not yet handed to zbus; the first `ready` of
    /// them are whole (already fixed) messages or handshake lines.
    pending: Vec<u8>,
    ready: usize,
    framing: Framing,
}

impl PrivateSocketRead {
    fn new(inner: tokio::net::unix::OwnedReadHalf) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            ready: 0,
            framing: Framing::Handshake,
        }
    }
}

#[zbus::export::async_trait::async_trait]
impl ReadHalf for PrivateSocketRead {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        loop {
            if self.ready > 0 {
                let n = self.ready.min(buf.len());
                buf[..n].copy_from_slice(&self.pending[..n]);
                self.pending.drain(..n);
                self.ready -= n;
                return Ok((n, Vec::new()));
            }
            let mut chunk = vec![0u8; 64 * 1024];
            // Any descriptors are dropped: this half tells zbus it cannot
            // pass them, so none is negotiated and systemd sends none.
            let (n, _fds) = self.inner.recvmsg(&mut chunk).await?;
            if n == 0 {
                if self.pending.is_empty() {
                    return Ok((0, Vec::new()));
                }
                // A truncated message: zbus reports it, not this shim.
                self.ready = self.pending.len();
                continue;
            }
            self.pending.extend_from_slice(&chunk[..n]);
            self.ready = self.framing.fix_ready(&mut self.pending);
        }
    }

    fn can_pass_unix_fd(&self) -> bool {
        false
    }

    async fn peer_credentials(&mut self) -> io::Result<ConnectionCredentials> {
        self.inner.peer_credentials().await
    }
}

/// Where in systemd's byte stream a [`PrivateSocketRead`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// SASL lines (`OK <guid>`, `AGREE_UNIX_FD`…), each ending in CRLF.
    Handshake,
    /// Binary messages, each starting with its endianness byte.
    Messages,
}

/// D-Bus's limit on one message (2^27 bytes).
const MAX_MESSAGE: usize = 1 << 27;

/// A SASL line longer than this is not systemd's; it is handed on whole so
/// that zbus's handshake fails on it.
const MAX_SASL_LINE: usize = 4096;

impl Framing {
    /// Fixes every whole message at the start of `pending` and returns how
    /// many bytes are whole. Whatever cannot be framed (not D-Bus, or too
    /// large) is passed on unchanged, for zbus to refuse.
    fn fix_ready(&mut self, pending: &mut [u8]) -> usize {
        let mut pos = 0;
        while pos < pending.len() {
            let rest = &mut pending[pos..];
            match self {
                Framing::Handshake => {
                    // No server SASL command starts with a D-Bus endianness
                    // byte, and systemd speaks only after BEGIN.
                    if matches!(rest[0], b'l' | b'B') {
                        *self = Framing::Messages;
                        continue;
                    }
                    match rest.windows(2).position(|w| w == b"\r\n") {
                        Some(end) => pos += end + 2,
                        None if rest.len() > MAX_SASL_LINE => return pending.len(),
                        None => break,
                    }
                }
                Framing::Messages => {
                    let Some(total) = message_len(rest) else {
                        break;
                    };
                    if total > MAX_MESSAGE {
                        return pending.len();
                    }
                    if rest.len() < total {
                        break;
                    }
                    fix_sender(&mut rest[..total]);
                    pos += total;
                }
            }
        }
        pos
    }
}

/// The whole length of the message `bytes` starts with, once its 16-byte
/// fixed header is there; `usize::MAX` for what is not a D-Bus header.
fn message_len(bytes: &[u8]) -> Option<usize> {
    let header: &[u8; 16] = bytes.get(..16)?.try_into().ok()?;
    let Some(read) = endian(header[0]) else {
        return Some(usize::MAX);
    };
    let body = read([header[4], header[5], header[6], header[7]]) as usize;
    let fields = read([header[12], header[13], header[14], header[15]]) as usize;
    Some((16usize + fields).next_multiple_of(8).saturating_add(body))
}

fn endian(byte: u8) -> Option<fn([u8; 4]) -> u32> {
    match byte {
        b'l' => Some(u32::from_le_bytes),
        b'B' => Some(u32::from_be_bytes),
        _ => None,
    }
}

/// The header field code of SENDER.
const FIELD_SENDER: u8 = 7;

/// Overwrites a Sender field that is not a unique name with `:1.000…` of
/// the same length. Walks the header's `a(yv)` as the D-Bus specification
/// lays it out (each entry 8-aligned: code, signature, value aligned to its
/// type); stops, changing nothing more, at anything it does not expect.
fn fix_sender(message: &mut [u8]) {
    let Some(read) = message.first().copied().and_then(endian) else {
        return;
    };
    let Some(fields_len) = message.get(12..16) else {
        return;
    };
    let fields_len = read([fields_len[0], fields_len[1], fields_len[2], fields_len[3]]) as usize;
    let end = 16 + fields_len;
    if end > message.len() {
        return;
    }
    let u32_at = |message: &[u8], at: usize| {
        message
            .get(at..at + 4)
            .map(|b| read([b[0], b[1], b[2], b[3]]) as usize)
    };
    let mut pos: usize = 16;
    while pos.next_multiple_of(8) < end {
        pos = pos.next_multiple_of(8);
        let (Some(&code), Some(&sig_len)) = (message.get(pos), message.get(pos + 1)) else {
            return;
        };
        let sig_end = pos + 2 + usize::from(sig_len);
        let Some(signature) = message.get(pos + 2..sig_end) else {
            return;
        };
        let value = sig_end + 1;
        pos = match signature {
            b"s" | b"o" => {
                let at = value.next_multiple_of(4);
                let Some(len) = u32_at(message, at) else {
                    return;
                };
                let text = at + 4..at + 4 + len;
                if text.end >= end {
                    return;
                }
                if code == FIELD_SENDER && signature == b"s" {
                    make_unique(&mut message[text.clone()]);
                }
                text.end + 1
            }
            b"g" => {
                let Some(&len) = message.get(value) else {
                    return;
                };
                value + 1 + usize::from(len) + 1
            }
            b"u" => value.next_multiple_of(4) + 4,
            _ => return,
        };
    }
}

fn make_unique(name: &mut [u8]) {
    // `org.freedesktop.DBus` is the one unique name without a colon.
    if name.first() == Some(&b':') || &*name == b"org.freedesktop.DBus" || name.len() < 4 {
        return;
    }
    name[..3].copy_from_slice(b":1.");
    name[3..].fill(b'0');
}

/// Calls StartTransientUnit while draining JobRemoved, and returns the
/// result of its job. The signal stream is read while the call is in
/// flight because zbus's reader task blocks on a full subscriber queue,
/// and a busy manager could fill it before the reply comes.
async fn start_and_wait(
    call: impl Future<Output = zbus::Result<Message>>,
    removed: &mut MessageStream,
    kind: JobKind,
    unit: &str,
    subject: &str,
    job: &mut Option<OwnedObjectPath>,
) -> Result<String, ScopeError> {
    let mut finished: HashMap<OwnedObjectPath, String> = HashMap::new();
    let mut call = std::pin::pin!(call);
    let reply = loop {
        tokio::select! {
            reply = &mut call => break reply,
            signal = next(removed) => {
                let (path, result) = job_removed(signal, unit, subject)?;
                finished.insert(path, result);
            }
        }
    };
    let refused = |source| kind.refused(unit, subject, source);
    let reply = reply.map_err(|source| match source {
        zbus::Error::MethodError(name, _, _)
            if kind == JobKind::Start && name.as_str() == "org.freedesktop.systemd1.UnitExists" =>
        {
            ScopeError::UnitExists {
                unit: unit.to_owned(),
                subject: subject.to_owned(),
            }
        }
        source => refused(source),
    })?;
    let path: OwnedObjectPath = reply.body().deserialize().map_err(refused)?;
    *job = Some(path.clone());
    if let Some(result) = finished.remove(&path) {
        return Ok(result);
    }
    loop {
        let (removed_path, result) = job_removed(next(removed).await, unit, subject)?;
        if removed_path == path {
            return Ok(result);
        }
    }
}

/// Which job a call queues, for the error of a refused call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Start,
    Stop,
}

impl JobKind {
    fn refused(self, unit: &str, subject: &str, source: zbus::Error) -> ScopeError {
        let (unit, subject) = (unit.to_owned(), subject.to_owned());
        match self {
            JobKind::Start => ScopeError::StartTransientUnit {
                unit,
                subject,
                source,
            },
            JobKind::Stop => ScopeError::StopUnit {
                unit,
                subject,
                source,
            },
        }
    }
}

fn job_outcome(job: &str, result: String, unit: &str, subject: &str) -> Result<(), ScopeError> {
    if result == "done" {
        Ok(())
    } else {
        Err(ScopeError::JobFailed {
            unit: unit.to_owned(),
            subject: subject.to_owned(),
            job: job.to_owned(),
            result,
        })
    }
}

async fn next(stream: &mut MessageStream) -> Option<zbus::Result<Message>> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// `JobRemoved(u id, o job, s unit, s result)`: the job and its result.
fn job_removed(
    signal: Option<zbus::Result<Message>>,
    unit: &str,
    subject: &str,
) -> Result<(OwnedObjectPath, String), ScopeError> {
    let message = match signal {
        Some(Ok(message)) => message,
        Some(Err(source)) => {
            return Err(ScopeError::JobSignal {
                unit: unit.to_owned(),
                source,
            });
        }
        None => {
            return Err(ScopeError::Disconnected {
                unit: unit.to_owned(),
                subject: subject.to_owned(),
            });
        }
    };
    let (_, path, _, result): (u32, OwnedObjectPath, String, String) = message
        .body()
        .deserialize()
        .map_err(|source| ScopeError::JobSignal {
            unit: unit.to_owned(),
            source,
        })?;
    Ok((path, result))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f";

    #[test]
    fn a_guest_id_names_its_scope() {
        let name = UnitName::guest_scope(ID).expect("a UUID is a valid id");
        assert_eq!(
            name.as_str(),
            "vtpmd-guest-5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f.scope"
        );
    }

    #[test]
    fn guest_ids_that_could_change_the_name_are_refused() {
        for id in ["", "a.service", "a/b", "a b", "a@b", "a\\x2d", "ü", "a\n"] {
            assert!(
                matches!(
                    UnitName::guest_scope(id),
                    Err(ScopeError::InvalidGuestId { .. })
                ),
                "{id:?} was accepted"
            );
        }
    }

    #[test]
    fn a_guest_id_too_long_for_a_unit_name_is_refused() {
        let id = "a".repeat(UNIT_NAME_MAX);
        assert!(matches!(
            UnitName::guest_scope(&id),
            Err(ScopeError::InvalidUnitName {
                why: "longer than 255 bytes",
                ..
            })
        ));
        let longest = "a".repeat(UNIT_NAME_MAX - SCOPE_PREFIX.len() - ".scope".len());
        assert!(UnitName::guest_scope(&longest).is_ok());
    }

    #[test]
    fn unit_names_need_a_known_type_and_a_stem() {
        assert!(UnitName::unit("vtpmd.service").is_ok());
        assert!(UnitName::unit("machine.slice").is_ok());
        for bad in [
            "vtpmd",
            ".service",
            "vtpmd.servic",
            "a@b.service",
            "x y.target",
        ] {
            assert!(UnitName::unit(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn slice_names_must_be_a_path_of_parents() {
        for good in ["system-vtpmd.slice", "machine.slice", "-.slice"] {
            assert!(UnitName::slice(good).is_ok(), "{good:?} was refused");
        }
        for bad in [
            "vtpmd.service",
            "-vtpmd.slice",
            "vtpmd-.slice",
            "system--vtpmd.slice",
        ] {
            assert!(UnitName::slice(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn pids_that_cannot_be_a_child_are_refused() {
        for pid in [0, 1, u32::MAX] {
            assert!(matches!(
                ScopeSpec::for_guest(ID, pid),
                Err(ScopeError::InvalidPid { .. })
            ));
        }
    }

    #[test]
    fn properties_carry_the_types_systemd_expects() {
        let mut spec = ScopeSpec::for_guest(ID, 4242).expect("valid");
        spec.before
            .push(UnitName::unit("shutdown.target").expect("valid"));
        let props = spec.properties();
        let got: Vec<(&str, String)> = props
            .iter()
            .map(|(name, value)| (*name, value.value_signature().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("PIDs", "au"),
                ("Description", "s"),
                ("Slice", "s"),
                ("CollectMode", "s"),
                ("MemoryAccounting", "b"),
                ("After", "as"),
                ("Before", "as"),
            ]
            .map(|(n, s)| (n, s.to_owned()))
        );
        let value = |key: &str| {
            props
                .iter()
                .find(|(name, _)| *name == key)
                .map(|(_, v)| v.clone())
                .expect("present")
        };
        assert_eq!(value("PIDs"), Value::from(vec![4242u32]));
        assert_eq!(value("Slice"), Value::from("system-vtpmd.slice"));
        assert_eq!(value("CollectMode"), Value::from("inactive-or-failed"));
        assert_eq!(value("After"), Value::from(vec!["vtpmd.service"]));
        assert_eq!(value("Before"), Value::from(vec!["shutdown.target"]));
    }

    #[test]
    fn the_whole_call_body_has_start_transient_units_signature() {
        let spec = ScopeSpec::for_guest(ID, 4242).expect("valid");
        let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
        let body = (spec.name.as_str(), "fail", spec.properties(), aux);
        let signature = zbus::zvariant::DynamicType::signature(&body).to_string();
        assert_eq!(signature, "(ssa(sv)a(sa(sv)))");
    }

    const SYSTEMD_SENDER: &[u8] = b"org.freedesktop.systemd1";
    const BUS_SENDER: &[u8] = b":1.999999999999999999999";
    const FIXED_SENDER: &[u8] = b":1.000000000000000000000";

    fn replaced(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("the sender is in the header");
        let mut out = bytes.to_vec();
        out[at..at + to.len()].copy_from_slice(to);
        out
    }

    /// A JobRemoved signal as systemd sends it on its private socket, and
    /// the bytes zbus should get instead. The body names the sender too,
    /// which must stay as it is.
    fn job_removed_from_systemd() -> (Vec<u8>, Vec<u8>) {
        let job = OwnedObjectPath::try_from("/org/freedesktop/systemd1/job/42").expect("path");
        let message = Message::signal(MANAGER_PATH, MANAGER, "JobRemoved")
            .and_then(|b| b.sender(std::str::from_utf8(BUS_SENDER).expect("ascii")))
            .and_then(|b| b.build(&(42u32, job, "org.freedesktop.systemd1", "done")))
            .expect("a valid signal");
        let bytes = message.data().to_vec();
        (
            replaced(&bytes, BUS_SENDER, SYSTEMD_SENDER),
            replaced(&bytes, BUS_SENDER, FIXED_SENDER),
        )
    }

    #[test]
    fn systemds_sender_becomes_a_unique_name_and_nothing_else_changes() {
        let (mut from_systemd, expected) = job_removed_from_systemd();
        let mut framing = Framing::Messages;
        let ready = framing.fix_ready(&mut from_systemd);
        assert_eq!(ready, expected.len());
        assert_eq!(from_systemd, expected);
        assert!(
            from_systemd
                .windows(SYSTEMD_SENDER.len())
                .any(|w| w == SYSTEMD_SENDER),
            "the body's copy of the name was changed"
        );
    }

    #[test]
    fn handshake_lines_pass_and_split_messages_wait_for_their_end() {
        let (message, fixed) = job_removed_from_systemd();
        let mut stream = b"OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n".to_vec();
        let handshake_len = stream.len();
        stream.extend_from_slice(&message);
        stream.extend_from_slice(&message);
        let mut expected = stream[..handshake_len].to_vec();
        expected.extend_from_slice(&fixed);
        expected.extend_from_slice(&fixed);
        for chunk in [1, 7, 16, 100, stream.len()] {
            let mut framing = Framing::Handshake;
            let mut pending = Vec::new();
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                pending.extend_from_slice(piece);
                let ready = framing.fix_ready(&mut pending);
                out.extend(pending.drain(..ready));
            }
            assert!(pending.is_empty(), "chunks of {chunk}: bytes left over");
            assert_eq!(out, expected, "chunks of {chunk}");
        }
    }

    #[test]
    fn what_is_not_dbus_is_handed_on_unchanged() {
        let mut framing = Framing::Messages;
        let mut garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let copy = garbage.clone();
        assert_eq!(framing.fix_ready(&mut garbage), copy.len());
        assert_eq!(garbage, copy);

        let mut huge = job_removed_from_systemd().0;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let copy = huge.clone();
        assert_eq!(Framing::Messages.fix_ready(&mut huge), copy.len());
        assert_eq!(huge, copy);
    }

    #[test]
    fn unique_names_and_the_bus_name_are_left_alone() {
        for name in [&b":1.42"[..], b"org.freedesktop.DBus", b"a.b"] {
            let mut bytes = name.to_vec();
            make_unique(&mut bytes);
            assert_eq!(bytes, name);
        }
    }

    /// zbus, through [`PrivateSocketRead`], reads a signal that carries
    /// systemd's sender from a fake manager on a socket pair.
    #[tokio::test]
    async fn zbus_reads_systemds_messages_through_the_shim() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::net::UnixStream::pair().expect("socketpair");
        let (from_systemd, _) = job_removed_from_systemd();
        let manager = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                let Some(end) = seen.windows(2).position(|w| w == b"\r\n") else {
                    let n = server.read(&mut buf).await.expect("read");
                    assert_ne!(n, 0, "the client hung up during the handshake");
                    seen.extend_from_slice(&buf[..n]);
                    continue;
                };
                let line: Vec<u8> = seen.drain(..end + 2).collect();
                let line = line.strip_prefix(b"\0").unwrap_or(&line);
                if line.starts_with(b"AUTH ") {
                    let guid = b"OK 0123456789abcdef0123456789abcdef\r\n";
                    server.write_all(guid).await.expect("write");
                } else if line.starts_with(b"NEGOTIATE_UNIX_FD") {
                    server.write_all(b"AGREE_UNIX_FD\r\n").await.expect("write");
                } else if line.starts_with(b"BEGIN") {
                    break;
                }
            }
            server.write_all(&from_systemd).await.expect("write");
            server
        });
        let (read, write) = client.into_split();
        let read: Box<dyn ReadHalf> = Box::new(PrivateSocketRead::new(read));
        let write: Box<dyn WriteHalf> = Box::new(write);
        let conn = zbus::connection::Builder::socket(Split::new(read, write))
            .p2p()
            .build()
            .await
            .expect("handshake");
        let rule = MatchRule::builder()
            .msg_type(Type::Signal)
            .member("JobRemoved")
            .expect("member")
            .build();
        let mut stream = MessageStream::for_match_rule(rule, &conn, None)
            .await
            .expect("subscribe");
        let _server = manager.await.expect("the fake manager");
        let signal = tokio::time::timeout(Duration::from_secs(5), next(&mut stream))
            .await
            .expect("the signal arrived")
            .expect("stream open")
            .expect("a message");
        let header = signal.header();
        assert_eq!(
            header.sender().map(|s| s.as_str().as_bytes()),
            Some(FIXED_SENDER)
        );
        let (path, result) =
            job_removed(Some(Ok(signal.clone())), "u.scope", "pid 2").expect("body");
        assert_eq!(path.as_str(), "/org/freedesktop/systemd1/job/42");
        assert_eq!(result, "done");
    }

    #[test]
    fn only_a_done_job_is_success() {
        assert!(job_outcome("/j/1", "done".into(), "u.scope", "pid 2").is_ok());
        for result in ["failed", "canceled", "timeout", "dependency", "skipped"] {
            assert!(matches!(
                job_outcome("/j/1", result.into(), "u.scope", "pid 2"),
                Err(ScopeError::JobFailed { .. })
            ));
        }
    }
}
