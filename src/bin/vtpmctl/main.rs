//! vtpmctl, the operator's client for vtpmd.
//!
//! One subcommand per method of `io.vtpmd.Manager` (capabilities, host-key,
//! create, start, stop, status, list, drain, delete, rekey, grant, revoke,
//! export, import, migrate-out, migrate-in, abort-migration, monitor),
//! `attach-args` for the VMM side, and the offline `state inspect|verify`.
//! Passphrases come
//! from `--passphrase-file FILE` (`-`: stdin) or, on a terminal, from a
//! prompt with echo off; never from argv or the environment.
//!
//! Exit codes of the online subcommands (scripts act on them, so they never
//! change meaning):
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | vtpmd answered with an error: its Varlink name and a sentence go to stderr (with `--json`, also `{"error": NAME, "parameters": {…}}` on stdout); also `attach-args` refusing a guest that does not run, or a TPM the VMM cannot take (named `io.vtpmd.Manager.GuestNotRunning` / `InvalidTpmSpec` the same way); `import` refusing a file above the daemon's `max_sealed_bytes` before sending it (`io.vtpmd.Manager.SealedTooLarge`); and vtpmctl refusing a socket that may not be vtpmd's (`io.vtpmd.vtpmctl.UntrustedSocket`, see below) |
//! | 2 | usage error (bad arguments, e.g. a guest id that is not a canonical UUID) |
//! | 6 | local failure: cannot connect to the socket, permission denied on it, I/O error or timeout, an unreadable, empty, too long or mismatched passphrase, a cancelled prompt, `export --out FILE` finding FILE without `--force` (nothing written), an import file that cannot be read or is larger than a sealed file can be (with `--json`, `{"error": "vtpmctl.Passphrase" or "vtpmctl.LocalFailure", "parameters": {"reason": …}}` on stdout; a usage error found after parsing, `vtpmctl.Usage`) |
//!
//! Before a call carrying a passphrase or a key (create, start, rekey,
//! grant, revoke) vtpmctl
//! checks that the socket's directory belongs to root or the caller and
//! nobody else can write to it, that the socket belongs to root or the
//! caller, and, once connected and before writing anything, that the
//! process listening runs as root or the caller (`SO_PEERCRED`). Every
//! other call checks the listener too and only warns about the path. A
//! refusal exits 1 naming what was found and what was expected; nothing
//! was written to the socket. See `trust.rs`.
//!
//! `state inspect|verify` keep their own codes (0, 1, 3, 4, 5, 6; 2 for
//! usage), documented in `state.rs` and the README.

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use vtpmd::error_chain::chain;

mod attach;
mod client;
mod commands;
mod message;
mod migration;
mod output;
mod passphrase;
mod state;
mod transfer;
mod trust;

use client::ClientError;
use commands::{Conn, Online};

/// The error name of a socket vtpmctl will not talk to (`--json`).
const UNTRUSTED_SOCKET: &str = "io.vtpmd.vtpmctl.UntrustedSocket";

/// Exit code: vtpmd (or attach-args, or vtpmctl's socket check) refused.
const EXIT_REMOTE: u8 = 1;
/// Exit code: bad arguments (clap uses it too).
const EXIT_USAGE: u8 = 2;
/// Exit code: a local failure.
const EXIT_LOCAL: u8 = 6;

#[derive(Debug, Parser)]
#[command(
    name = "vtpmctl",
    version,
    about = "Operate vtpmd and its sealed TPM state files"
)]
struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Online(Online),
    /// Offline tools for sealed state files (no daemon needed).
    #[command(subcommand)]
    State(state::StateCommand),
}

fn main() -> ExitCode {
    if let Some(code) = vtpmd::cli_docs::generate_if_asked(Args::command, "1") {
        return code;
    }
    let args = Args::parse();
    match args.command {
        Command::State(mut command) => {
            // `vtpmctl --json state …` means what `state … --json` means.
            if args.conn.json {
                match &mut command {
                    state::StateCommand::Inspect { json, .. }
                    | state::StateCommand::Verify { json, .. } => *json = true,
                }
            }
            state::run(command)
        }
        Command::Online(mut command) => {
            let conn = std::mem::take(command.conn_mut()).or(&args.conn);
            let json = conn.json;
            *command.conn_mut() = conn;
            match commands::run(command) {
                Ok(Some(printed)) => {
                    let text = if json {
                        format!(
                            "{}\n",
                            serde_json::to_string_pretty(&printed.json).unwrap_or_default()
                        )
                    } else {
                        printed.human
                    };
                    let _ = std::io::stdout().lock().write_all(text.as_bytes());
                    ExitCode::SUCCESS
                }
                Ok(None) => ExitCode::SUCCESS,
                Err(e) => report(&e, json),
            }
        }
    }
}

/// Prints the error and picks the exit code.
fn local_json(json: bool, name: &str, reason: &str) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "error": name, "parameters": { "reason": reason } })
        );
    }
}

fn report(error: &ClientError, json: bool) -> ExitCode {
    let (name, parameters) = match error {
        ClientError::Remote { name, parameters } => (name.as_str(), parameters.clone()),
        ClientError::Refused {
            name, parameters, ..
        } => (*name, parameters.clone()),
        ClientError::Untrusted {
            socket,
            secrets,
            reason,
        } => {
            let mut parameters = reason.parameters();
            parameters["socket"] = socket.display().to_string().into();
            parameters["passphrase"] = (*secrets).into();
            (UNTRUSTED_SOCKET, parameters)
        }
        // Local failures answer --json too, named like the daemon's
        // errors so that a script reads every failure the same way.
        ClientError::Usage(_) => {
            local_json(json, "vtpmctl.Usage", &error.to_string());
            eprintln!("vtpmctl: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
        ClientError::Passphrase(_) => {
            local_json(json, "vtpmctl.Passphrase", &chain(error));
            eprintln!("vtpmctl: {}", chain(error));
            return ExitCode::from(EXIT_LOCAL);
        }
        _ => {
            local_json(json, "vtpmctl.LocalFailure", &chain(error));
            eprintln!("vtpmctl: {}", chain(error));
            return ExitCode::from(EXIT_LOCAL);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "error": name, "parameters": parameters })
        );
    }
    eprintln!("vtpmctl: {error}");
    ExitCode::from(EXIT_REMOTE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use attach::Vmm;

    const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("vtpmctl").chain(args.iter().copied()))
    }

    fn online(args: &[&str]) -> Online {
        match parse(args).unwrap().command {
            Command::Online(o) => o,
            Command::State(s) => panic!("{s:?}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn every_method_has_a_subcommand() {
        assert!(matches!(
            online(&["capabilities"]),
            Online::Capabilities { .. }
        ));
        assert!(matches!(online(&["status", G]), Online::Status { .. }));
        assert!(matches!(online(&["stop", G]), Online::Stop { .. }));
        assert!(matches!(online(&["list"]), Online::List { .. }));
        assert!(matches!(online(&["delete", G]), Online::Delete { .. }));
        assert!(matches!(
            online(&["export", G, "--out", "/f", "--force"]),
            Online::Export { force: true, .. }
        ));
        assert!(matches!(
            online(&["export", G]),
            Online::Export { out: None, .. }
        ));
        assert!(
            parse(&["export", G, "--force"]).is_err(),
            "--force needs --out"
        );
        assert!(matches!(online(&["import", G, "-"]), Online::Import { .. }));
        assert!(matches!(
            online(&["start", G, "--passphrase-file", "-"]),
            Online::Start { .. }
        ));
        assert!(matches!(
            online(&["start", G]),
            Online::Start {
                unlock: commands::UnlockArgs {
                    passphrase_file: None,
                    ..
                },
                ..
            }
        ));
        assert!(matches!(
            online(&[
                "rekey",
                G,
                "--passphrase-file",
                "a",
                "--new-passphrase-file",
                "b"
            ]),
            Online::Rekey { .. }
        ));
        match online(&["monitor", "--count", "3"]) {
            Online::Monitor { count, .. } => assert_eq!(count, Some(3)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_takes_a_spec_nova_properties_and_a_passphrase_file() {
        match online(&[
            "create",
            G,
            "--version",
            "2.0",
            "--model",
            "tpm-crb",
            "--flavor-extra-spec",
            "hw:tpm_version=2.0",
            "--flavor-extra-spec",
            "hw:tpm_model=tpm-crb",
            "--image-property",
            "hw_tpm_model=tpm-crb",
            "--ek-certificate",
            "--passphrase-file",
            "/dev/null",
        ]) {
            Online::Create {
                guest,
                tpm_version,
                model,
                flavor_extra_specs,
                image_properties,
                ek_certificate,
                passphrase_file,
                ..
            } => {
                assert_eq!(guest.to_string(), G);
                assert_eq!(tpm_version.as_deref(), Some("2.0"));
                assert_eq!(model.as_deref(), Some("tpm-crb"));
                assert_eq!(flavor_extra_specs.len(), 2);
                assert_eq!(image_properties[0].0, "hw_tpm_model");
                assert!(ek_certificate);
                assert_eq!(passphrase_file.unwrap().to_str(), Some("/dev/null"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["create", G, "--version", "3.0"]).is_err());
        assert!(parse(&["create", G, "--model", "tpm-spapr"]).is_err());
        assert!(parse(&["create", G, "--flavor-extra-spec", "novalue"]).is_err());
    }

    #[test]
    fn bad_guest_ids_and_unknown_options_are_usage_errors() {
        for args in [
            &["status", "not-a-uuid"][..],
            &["status", "0F6A2D1E-8C4B-4E2A-9D3F-5B7C1A2E3F40"],
            &["status"],
            &["start", G, "--passphrase", "hunter2"],
            &["attach-args", G],
            &["attach-args", G, "--for", "xen"],
            &["attach-args", G, "--for", "qemu", "--id", "0bad"],
            &["monitor", "--count", "0"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn connection_options_go_before_or_after_the_subcommand() {
        let args = parse(&["--socket", "/x.sock", "--json", "status", G]).unwrap();
        assert_eq!(
            args.conn.socket.as_deref(),
            Some(std::path::Path::new("/x.sock"))
        );
        assert!(args.conn.json);
        match online(&[
            "status",
            G,
            "--socket",
            "/y.sock",
            "--json",
            "--timeout",
            "3",
        ]) {
            Online::Status { conn, .. } => {
                assert_eq!(
                    conn.socket.as_deref(),
                    Some(std::path::Path::new("/y.sock"))
                );
                assert!(conn.json);
                assert_eq!(conn.timeout, Some(3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attach_args_names_its_vmm() {
        for (name, vmm) in [
            ("qemu", Vmm::Qemu),
            ("libvirt", Vmm::Libvirt),
            ("cloud-hypervisor", Vmm::CloudHypervisor),
        ] {
            match online(&["attach-args", G, "--for", name]) {
                Online::AttachArgs { vmm: v, id, .. } => {
                    assert_eq!(v, vmm);
                    assert_eq!(id, "tpm0");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn state_commands_keep_their_own_json_flag() {
        let args = parse(&["state", "inspect", "/f", "--json"]).unwrap();
        assert!(matches!(
            args.command,
            Command::State(state::StateCommand::Inspect { json: true, .. })
        ));
        assert!(parse(&["--json", "state", "inspect", "/f"]).is_ok());
    }
}
