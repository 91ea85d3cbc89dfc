//! Spawns `sleep 1000` and moves it into a guest's transient scope with
//! `vtpmd::systemd::scope`, the way vtpmd moves each swtpm, then exits and
//! leaves the sleep behind. Run it as a service with vtpmd.service's
//! sandbox to see that the process outlives `systemctl stop`.
//!
//! `scope_probe move GUEST_ID [--system-bus] [--slice S] [--after U]... [--before U]... [--timeout SECS] [--slow-stop]`
//! `scope_probe query PID [--system-bus] [--times N]`
//!
//! Prints `key=value` lines; exits 1 with the error chain on failure.

use std::error::Error;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::{Parser, Subcommand};
use vtpmd::systemd::scope::{ScopeSpec, Systemd, UnitName};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    action: Action,
    /// Skip systemd's private socket.
    #[arg(long, global = true)]
    system_bus: bool,
}

#[derive(Subcommand)]
enum Action {
    Move {
        guest: String,
        #[arg(long)]
        slice: Option<String>,
        /// Replaces the default `After=vtpmd.service` when given.
        #[arg(long)]
        after: Vec<String>,
        #[arg(long)]
        before: Vec<String>,
        #[arg(long)]
        timeout: Option<u64>,
        /// Spawn a shell that takes 3 s to exit on SIGTERM instead of
        /// `sleep`, so that shutdown ordering shows in the journal.
        #[arg(long)]
        slow_stop: bool,
    },
    Query {
        pid: u32,
        /// Ask this many times, a second apart, on one connection.
        #[arg(long, default_value_t = 1)]
        times: u32,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // RUST_LOG=zbus=trace shows every D-Bus message.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("error={}", vtpmd::error_chain::chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let systemd = if args.system_bus {
        Systemd::connect_system_bus().await?
    } else {
        Systemd::connect()
            .await?
            .ok_or("systemd does not run this host")?
    };
    println!("route={:?}", systemd.route());
    match args.action {
        Action::Query { pid, times } => {
            for i in 1..=times {
                if i > 1 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let unit = systemd.scope_of_pid(pid).await?;
                println!("unit={}", unit.unwrap_or_default());
            }
        }
        Action::Move {
            guest,
            slice,
            after,
            before,
            timeout,
            slow_stop,
        } => {
            let systemd = match timeout {
                Some(secs) => systemd.with_timeout(Duration::from_secs(secs)),
                None => systemd,
            };
            let mut command = if slow_stop {
                let mut sh = Command::new("sh");
                sh.args(["-c", "trap 'sleep 3; exit 0' TERM; sleep 1000 & wait"]);
                sh
            } else {
                let mut sleep = Command::new("sleep");
                sleep.arg("1000");
                sleep
            };
            let child = command.stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
            let pid = child.id();
            println!("pid={pid}");
            println!(
                "before_move={}",
                systemd.scope_of_pid(pid).await?.unwrap_or_default()
            );
            let mut spec = ScopeSpec::for_guest(&guest, pid)?;
            if let Some(slice) = slice {
                spec.slice = UnitName::slice(&slice)?;
            }
            if !after.is_empty() {
                spec.after = after
                    .iter()
                    .map(|u| UnitName::unit(u))
                    .collect::<Result<_, _>>()?;
            }
            spec.before = before
                .iter()
                .map(|u| UnitName::unit(u))
                .collect::<Result<_, _>>()?;
            let started = std::time::Instant::now();
            let moved = systemd.move_into_scope(&spec).await;
            println!("move_ms={}", started.elapsed().as_millis());
            moved?;
            println!(
                "after_move={}",
                systemd.scope_of_pid(pid).await?.unwrap_or_default()
            );
            // The child is deliberately neither waited for nor killed: it is
            // the stand-in for a swtpm that must outlive this process.
            drop(child);
        }
    }
    Ok(())
}
