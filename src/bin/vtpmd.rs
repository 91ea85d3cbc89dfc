//! vtpmd, the daemon: one swtpm per guest, TPM state sealed at rest, the
//! `io.vtpmd.Manager` Varlink API on a Unix socket.
//!
//! Start-up, in order: configuration (file, then flags), process hardening
//! (before any secret exists), the supervisor (probe swtpm, directories,
//! registry rebuilt from disk), then the socket (bound here, or passed by
//! systemd's socket activation), then `READY=1` to systemd when it asked
//! (see `vtpmd::systemd`). SIGTERM or SIGINT: `STOPPING=1`, stop accepting,
//! reseal every running guest once and leave its swtpm serving its VM (the
//! next vtpmd adopts it; its key waits in systemd's fd store), remove the
//! socket unless systemd passed it or another vtpmd bound it since, exit 0.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use nix::unistd::{Gid, Group};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::MissedTickBehavior;
use vtpmd::api::{self, Groups, Limits};
use vtpmd::config::{Config, MetricsSection};
use vtpmd::error_chain::chain;
use vtpmd::log_limit::Rate;
use vtpmd::supervisor::{GuestState, KeyStore, Supervisor, SupervisorConfig};
use vtpmd::systemd::{self, Activated, Notifier};

#[derive(Debug, Parser)]
#[command(
    name = "vtpmd",
    version,
    about = "Gives every VM its own swtpm, with TPM state encrypted at rest"
)]
struct Args {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where sealed state lives (overrides [supervisor] state_dir).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where swtpm's runtime files live, ideally RAM (overrides
    /// [supervisor] runtime_dir).
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// The API socket (overrides [api] socket).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    check_config: bool,
    /// Run even if capabilities beyond CAP_SETUID, CAP_SETGID and CAP_CHOWN
    /// remain after dropping (logged as a warning); without it vtpmd
    /// refuses to start.
    #[arg(long)]
    allow_extra_caps: bool,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] vtpmd::config::ConfigError),
    #[error("[api] {key}: no group named {name:?}")]
    UnknownGroup { key: &'static str, name: String },
    #[error("cannot harden the process")]
    Harden(#[from] vtpmd::secret::HardenError),
    #[error(transparent)]
    Privileges(#[from] vtpmd::privileges::PrivilegeError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Supervisor(#[from] vtpmd::supervisor::SupervisorError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("cannot install the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("systemd service protocol")]
    Systemd(#[source] std::io::Error),
    #[error(transparent)]
    MetricsHttp(#[from] vtpmd::metrics::http::HttpError),
}

fn main() -> ExitCode {
    if let Some(code) = vtpmd::cli_docs::generate_if_asked(Args::command, "8") {
        return code;
    }
    let args = Args::parse();
    init_logging();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The log goes to stderr: one line says it all.
            tracing::error!("{}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Under systemd (stderr is the journal's stream) every line goes to the
/// journal natively, its fields as journal fields (`GUEST=`,
/// `OPERATION=`, `MESSAGE_ID=`, `GENERATION=` …); elsewhere plain text on
/// stderr. `RUST_LOG` filters both.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    if stderr_is_the_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                let journal = journal
                    .with_field_prefix(None)
                    .with_syslog_identifier("vtpmd".to_owned());
                tracing_subscriber::registry()
                    .with(filter())
                    .with(journal)
                    .init();
                return;
            }
            Err(e) => eprintln!("vtpmd: cannot reach the journal ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// `$JOURNAL_STREAM` names the device and inode of the stream systemd
/// connected to stdout/stderr; it is the journal only if stderr is still
/// that stream (a child of a service with its stderr redirected is not).
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let stderr = std::fs::metadata("/proc/self/fd/2");
    matches!(
        (dev.parse::<u64>(), ino.parse::<u64>(), stderr),
        (Ok(dev), Ok(ino), Ok(m)) if m.dev() == dev && m.ino() == ino
    )
}

fn run(args: Args) -> Result<(), MainError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.state_dir {
        config.supervisor.state_dir = dir;
    }
    if let Some(dir) = args.runtime_dir {
        config.supervisor.runtime_dir = dir;
    }
    if let Some(path) = args.socket {
        config.api.socket = Some(path);
    }
    let socket = config
        .api
        .socket
        .clone()
        .unwrap_or_else(|| vtpmd::paths::socket_in(&config.supervisor.runtime_dir));
    let groups = Groups {
        admin: group("admin_group", config.api.admin_group.as_deref())?,
        read_only: group("readonly_group", config.api.readonly_group.as_deref())?,
    };
    let limits = Limits {
        max_message: config.api.max_message_bytes,
        max_sealed: config.api.max_sealed_bytes,
        max_connections: config.api.max_connections,
        reserved_connections: config.api.reserved_connections,
        max_connections_per_uid: config.api.max_connections_per_uid,
        stranger_lifetime: Duration::from_millis(config.api.stranger_lifetime_ms),
        idle: Duration::from_millis(config.api.idle_timeout_ms),
        request: Duration::from_millis(config.api.request_timeout_ms),
    };
    let supervisor_config = SupervisorConfig::from_config(&config)?;
    if args.check_config {
        config.api.socket = Some(socket);
        // The host name in effect (the hostname when none is set).
        if let Some(cluster) = &supervisor_config.cluster {
            config.cluster.host = Some(cluster.host.clone());
        }
        print!("{}", config.to_toml());
        return Ok(());
    }

    // Before the first secret: no core dumps, no ptrace by same-uid
    // processes, nothing created readable by others unless chmod'ed.
    vtpmd::secret::harden_process()?;
    // Still single-threaded: capabilities are per thread.
    vtpmd::privileges::restrict(args.allow_extra_caps)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    raise_open_files_limit();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    let log_rate = config.log.rate();
    let metrics = config.metrics.clone();
    runtime.block_on(serve(
        supervisor_config,
        socket,
        groups,
        limits,
        log_rate,
        metrics,
    ))
}

/// Each running guest holds four fds and each connection one, so the usual
/// soft limit of 1024 would cap a host near 250 guests. The hard limit
/// (systemd's 512Ki, or the unit's `LimitNOFILE`) is what the administrator
/// allows; swtpm gets fds 0-4 only, so nothing inherits a use for more.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::debug!(from = soft, to = hard, "open files limit raised"),
                Err(e) => tracing::warn!(soft, hard, "cannot raise the open files limit: {e}"),
            }
        }
    }
}

fn group(key: &'static str, name: Option<&str>) -> Result<Option<Gid>, MainError> {
    let Some(name) = name else {
        return Ok(None);
    };
    match Group::from_name(name) {
        Ok(Some(g)) => Ok(Some(g.gid)),
        _ => Err(MainError::UnknownGroup {
            key,
            name: name.to_owned(),
        }),
    }
}

async fn serve(
    config: SupervisorConfig,
    socket: PathBuf,
    groups: Groups,
    limits: Limits,
    log_rate: Rate,
    metrics: MetricsSection,
) -> Result<(), MainError> {
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| MainError::Signal("SIGTERM", e))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| MainError::Signal("SIGINT", e))?;
    // systemd: adopt the activated socket and the keys its fd store kept
    // across our restart before the supervisor can spawn a child (they
    // are inheritable until then).
    let passed = systemd::passed_fds().map_err(MainError::Systemd)?;
    let activated = passed.listener;
    let notifier = systemd::Notifier::from_env()
        .map_err(MainError::Systemd)?
        .map(Arc::new);
    let keys = KeyStore {
        notifier: notifier.clone(),
        stored: passed.stored,
    };
    let supervisor: Arc<Supervisor> = Supervisor::start_with(config, keys).await?;
    let (listener, owned_socket) = match listener(activated, &socket) {
        Ok(listener) => listener,
        Err(e) => {
            supervisor.shutdown().await;
            return Err(e);
        }
    };
    let exporters = match exporters(&metrics, &supervisor).await {
        Ok(tasks) => tasks,
        Err(e) => {
            supervisor.shutdown().await;
            return Err(e);
        }
    };
    tracing::info!(socket = %socket.display(), guests = supervisor.list().len(), "vtpmd ready");
    // systemd: READY=1 now that the socket listens, STATUS= on every
    // change, WATCHDOG=1 pings; STOPPING=1 below.
    let stopping = Arc::new(AtomicBool::new(false));
    let notify_task = notifier.as_ref().map(|n| {
        tokio::spawn(notify(
            Arc::clone(n),
            Arc::clone(&supervisor),
            Arc::clone(&stopping),
        ))
    });
    let stop = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let answering = api::serve(
        listener,
        Arc::clone(&supervisor),
        groups,
        limits,
        log_rate,
        stop,
    )
    .await;
    stopping.store(true, Ordering::SeqCst);
    if let Some(n) = &notifier {
        let running = running_guests(&supervisor);
        let status = format!(
            "STOPPING=1\nSTATUS=stopping, {}",
            systemd::running_status(running)
        );
        if let Err(e) = n.notify(&status) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
    supervisor.shutdown().await;
    // Calls the shutdown refused or that finished meanwhile still owe
    // their callers a reply.
    answering.settle(Duration::from_secs(2)).await;
    if let Some(task) = notify_task {
        task.abort();
    }
    for task in exporters {
        task.abort();
    }
    // An activated socket belongs to vtpmd.socket, which keeps listening
    // (and restarts vtpmd on the next connection): leave it in place. A
    // socket bound here is removed only if it is still the one bound: a
    // vtpmd started meanwhile may have put its own there.
    if let Some(bound) = owned_socket {
        remove_if_ours(&socket, bound);
    }
    tracing::info!("vtpmd stopped");
    Ok(())
}

/// The `[metrics]` listener and textfile writer, when configured.
async fn exporters(
    config: &MetricsSection,
    supervisor: &Arc<Supervisor>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, MainError> {
    let sup = Arc::clone(supervisor);
    let render: vtpmd::metrics::http::Render = Arc::new(move |format| sup.render_metrics(format));
    let mut tasks = Vec::new();
    if let Some(addr) = config.listen_addr()? {
        let (bound, task) = vtpmd::metrics::http::serve(addr, Arc::clone(&render)).await?;
        tracing::info!(%bound, "metrics served over HTTP at /metrics");
        tasks.push(task);
    }
    if let Some(path) = &config.textfile {
        let interval = Duration::from_secs(config.textfile_interval_s);
        tasks.push(vtpmd::metrics::textfile::spawn(
            path.clone(),
            interval,
            render,
        ));
        tracing::info!(path = %path.display(), every_s = config.textfile_interval_s, "metrics written for node_exporter's textfile collector");
    }
    Ok(tasks)
}

// systemd (src/systemd.rs): socket activation, notifications, watchdog.

/// The API listener: the socket systemd passed, when socket-activated, else
/// one bound at `socket`, with the (st_dev, st_ino) of the path it bound,
/// which it removes at exit.
fn listener(
    activated: Option<Activated>,
    socket: &Path,
) -> Result<(UnixListener, Option<(u64, u64)>), MainError> {
    let Some(activated) = activated else {
        let listener = api::bind(socket)?;
        let bound = std::fs::symlink_metadata(socket).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        return Ok((listener, bound));
    };
    let path = activated.path.unwrap_or_default();
    if path != socket {
        tracing::warn!(activated = %path.display(), configured = %socket.display(), "serving the socket-activated socket, not the configured path");
    }
    let adopt_err = |source| api::ApiError::Socket {
        op: "adopt the activated",
        path: path.clone(),
        source,
    };
    activated
        .listener
        .set_nonblocking(true)
        .map_err(adopt_err)?;
    let listener = UnixListener::from_std(activated.listener).map_err(adopt_err)?;
    api::widen_backlog(&listener).map_err(adopt_err)?;
    tracing::info!(socket = %path.display(), "socket-activated");
    Ok((listener, None))
}

/// Removes the API socket at `path` if it is still the inode `bound`.
fn remove_if_ours(path: &Path, bound: (u64, u64)) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == bound => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "cannot remove the API socket");
            }
        }
        Ok(_) => {
            tracing::info!(socket = %path.display(), "the API socket is another process's now; left in place")
        }
        Err(_) => {}
    }
}

fn running_guests(supervisor: &Supervisor) -> usize {
    supervisor
        .list()
        .iter()
        .filter(|g| g.state == GuestState::Running)
        .count()
}

/// Tells systemd: READY=1 with the first STATUS=, a new STATUS= whenever
/// the number of running guests changes, and WATCHDOG=1 at half the
/// watchdog timeout, from this runtime, so a wedged event loop stops the
/// pings. Runs until aborted.
async fn notify(notifier: Arc<Notifier>, supervisor: Arc<Supervisor>, stopping: Arc<AtomicBool>) {
    let send = |state: &str| {
        if let Err(e) = notifier.notify(state) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    };
    let status = |running| {
        let text = systemd::running_status(running);
        if stopping.load(Ordering::SeqCst) {
            format!("STATUS=stopping, {text}")
        } else {
            format!("STATUS={text}")
        }
    };
    // Subscribed before counting: no change is missed.
    let mut events = supervisor.subscribe();
    let mut running = running_guests(&supervisor);
    send(&format!("READY=1\n{}", status(running)));
    let mut watchdog = systemd::watchdog_timeout().map(|timeout| {
        let mut ticks = tokio::time::interval(timeout / 2);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks
    });
    let mut events_open = true;
    loop {
        let tick = async {
            match watchdog.as_mut() {
                Some(ticks) => ticks.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv(), if events_open => {
                if matches!(event, Err(RecvError::Closed)) {
                    events_open = false;
                }
                let now = running_guests(&supervisor);
                if now != running {
                    running = now;
                    send(&status(running));
                }
            }
            _ = tick => send("WATCHDOG=1"),
        }
    }
}
