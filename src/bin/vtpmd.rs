//! vtpmd, the daemon: one swtpm per guest, TPM state sealed at rest, the
//! `io.vtpmd.Manager` Varlink API on a Unix socket.
//!
//! Start-up, in order: configuration (file, then flags), process hardening
//! (before any secret exists), the supervisor (probe swtpm, directories,
//! registry rebuilt from disk), then the socket. SIGTERM or SIGINT: stop
//! accepting, stop every guest with a final reseal, remove the socket,
//! exit 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::unistd::{Gid, Group};
use tokio::signal::unix::{SignalKind, signal};
use vtpmd::api::{self, Groups, Limits};
use vtpmd::config::Config;
use vtpmd::error_chain::chain;
use vtpmd::supervisor::{Supervisor, SupervisorConfig};

#[derive(Debug, Parser)]
#[command(
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
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] vtpmd::config::ConfigError),
    #[error("[api] {key}: no group named {name:?}")]
    UnknownGroup { key: &'static str, name: String },
    #[error("cannot harden the process")]
    Harden(#[from] vtpmd::secret::HardenError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Supervisor(#[from] vtpmd::supervisor::SupervisorError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("cannot install the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
}

fn main() -> ExitCode {
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
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
        max_connections: config.api.max_connections,
        idle: Duration::from_millis(config.api.idle_timeout_ms),
        request: Duration::from_millis(config.api.request_timeout_ms),
    };
    let supervisor_config = SupervisorConfig::from_config(&config)?;
    if args.check_config {
        config.api.socket = Some(socket);
        print!("{}", config.to_toml());
        return Ok(());
    }

    // Before the first secret: no core dumps, no ptrace by same-uid
    // processes, nothing created readable by others unless chmod'ed.
    vtpmd::secret::harden_process()?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    runtime.block_on(serve(supervisor_config, socket, groups, limits))
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
) -> Result<(), MainError> {
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| MainError::Signal("SIGTERM", e))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| MainError::Signal("SIGINT", e))?;
    let supervisor: Arc<Supervisor> = Supervisor::start(config).await?;
    let listener = match api::bind(&socket) {
        Ok(listener) => listener,
        Err(e) => {
            supervisor.shutdown().await;
            return Err(e.into());
        }
    };
    tracing::info!(socket = %socket.display(), guests = supervisor.list().len(), "vtpmd ready");
    let stop = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    api::serve(listener, Arc::clone(&supervisor), groups, limits, stop).await;
    supervisor.shutdown().await;
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the API socket");
    }
    tracing::info!("vtpmd stopped");
    Ok(())
}
