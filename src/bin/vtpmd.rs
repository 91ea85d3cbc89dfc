//! vtpmd, the daemon.
//!
//! Today it loads and validates its configuration (`--check-config`); the
//! Varlink service that attaches TPMs to VMs builds on the vault and the
//! swtpm driver as they land.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vtpmd::config::Config;
use vtpmd::error_chain::chain;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Gives every VM its own swtpm, with TPM state encrypted at rest"
)]
struct Args {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long, required = true)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let loaded = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    match loaded {
        Ok(config) if args.check_config => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vtpmd: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}
