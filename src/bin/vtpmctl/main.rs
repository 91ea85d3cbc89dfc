//! vtpmctl, the operator's client for vtpmd.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod passphrase;
mod state;

#[derive(Debug, Parser)]
#[command(version, about = "Operate vtpmd and its sealed TPM state files")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline tools for sealed state files (no daemon needed).
    #[command(subcommand)]
    State(state::StateCommand),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::State(command) => state::run(command),
    }
}
