//! `vtpmctl state …`: inspect and verify sealed files offline, like
//! `cryptsetup luksDump` and `cryptsetup open --test-passphrase`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use vtpmd::error_chain::chain;
use vtpmd::protocol::GuestId;
use vtpmd::vault::{
    self, Credential, HeaderInfo, HostKey, KdfPolicy, SealedPaths, SealedState, VaultError,
};

use crate::passphrase;

/// Exit codes of `state verify` and `state inspect` (documented in the
/// README): scripts act on them, so they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The current generation opens.
    Ok = 0,
    /// Only the previous generation opens (the current one is damaged or gone).
    FellBack = 1,
    /// No keyslot opens with the passphrase (or key, or host key).
    WrongPassphrase = 3,
    /// No generation is usable: restore from backup.
    Corrupt = 4,
    /// Refused on principle: newer format, another guest's file, weak KDF.
    Refused = 5,
    /// I/O or another local problem.
    Failed = 6,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::FellBack => "fell-back",
            Self::WrongPassphrase => "wrong-passphrase",
            Self::Corrupt => "corrupt",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }

    fn of(error: &VaultError) -> Self {
        match error {
            VaultError::WrongPassphrase { .. }
            | VaultError::WrongKey { .. }
            | VaultError::NoKeyslot { .. } => Self::WrongPassphrase,
            VaultError::Corrupt { .. } | VaultError::Missing { .. } => Self::Corrupt,
            VaultError::UnsupportedVersion { .. }
            | VaultError::GuestMismatch { .. }
            | VaultError::WeakKdf { .. } => Self::Refused,
            _ => Self::Failed,
        }
    }

    fn exit(self) -> ExitCode {
        ExitCode::from(self as u8)
    }
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print a sealed file's header: format, guest, generation, keyslots.
    /// Reads no secret and prints none.
    Inspect {
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Open a sealed file with a passphrase, a key or a host key and say
    /// whether it is usable. FILE.prev, if present, stands in for a damaged
    /// FILE.
    Verify {
        file: PathBuf,
        /// The guest the file must belong to.
        #[arg(long)]
        guest: GuestId,
        /// File holding the passphrase (`-` for stdin); one trailing
        /// newline is ignored.
        #[arg(long, value_name = "FILE", required_unless_present_any = ["key_file", "host_key_file"], conflicts_with_all = ["key_file", "host_key_file"])]
        passphrase_file: Option<PathBuf>,
        /// File holding a `key` slot's key: 32 raw bytes or their base64.
        #[arg(long, value_name = "FILE", conflicts_with = "host_key_file")]
        key_file: Option<PathBuf>,
        /// A vtpmd host key file (`<state_dir>/host.key`): opens the host
        /// slot of that host.
        #[arg(long, value_name = "FILE")]
        host_key_file: Option<PathBuf>,
        /// Accept Argon2id parameters below OWASP's floor.
        #[arg(long)]
        allow_weak_kdf: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: StateCommand) -> ExitCode {
    match command {
        StateCommand::Inspect { file, json } => inspect(&file, json),
        StateCommand::Verify {
            file,
            guest,
            passphrase_file,
            key_file,
            host_key_file,
            allow_weak_kdf,
            json,
        } => {
            let source = match (passphrase_file, key_file, host_key_file) {
                (_, Some(k), _) => Source::Key(k),
                (_, _, Some(h)) => Source::Host(h),
                (Some(p), _, _) => Source::Passphrase(p),
                (None, None, None) => {
                    return report(
                        Outcome::Failed,
                        "passphrase",
                        "give --passphrase-file, --key-file or --host-key-file",
                        json,
                    );
                }
            };
            verify(file, guest, &source, allow_weak_kdf, json)
        }
    }
}

fn inspect(file: &std::path::Path, json: bool) -> ExitCode {
    match vault::inspect(file) {
        Ok(info) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_default()
            );
            Outcome::Ok.exit()
        }
        Ok(info) => {
            print!("{}", render(file, &info));
            Outcome::Ok.exit()
        }
        Err(e) => report_error(&e, json),
    }
}

fn render(file: &std::path::Path, info: &HeaderInfo) -> String {
    let mut out = format!(
        "{}\n  format version  {}\n  guest           {}\n  generation      {}\n  TPM             {} ({})\n  header          {} bytes\n  body            {} bytes (encrypted)\n  keyslots        {}\n",
        file.display(),
        info.format_version,
        info.guest,
        info.generation,
        info.tpm_version,
        info.tpm_model,
        info.header_bytes,
        info.body_bytes,
        info.keyslots.len(),
    );
    for slot in &info.keyslots {
        let detail = match (
            slot.argon2_memory_kib,
            slot.argon2_iterations,
            slot.argon2_lanes,
            &slot.host_fingerprint,
        ) {
            (Some(m), Some(t), Some(p), _) => format!(", m={m} KiB t={t} p={p}"),
            (_, _, _, Some(fingerprint)) => format!(", host {fingerprint}"),
            _ => String::new(),
        };
        out.push_str(&format!("    {}: {}{detail}\n", slot.index, slot.kind));
    }
    out
}

/// Where `verify`'s credential comes from.
enum Source {
    Passphrase(PathBuf),
    Key(PathBuf),
    Host(PathBuf),
}

fn verify(
    file: PathBuf,
    guest: GuestId,
    source: &Source,
    allow_weak: bool,
    json: bool,
) -> ExitCode {
    let policy = KdfPolicy {
        allow_weak,
        ..KdfPolicy::default()
    };
    let paths = SealedPaths::new(&file);
    // Like every other failure: a script reading --json must get an
    // answer, not an empty stdout.
    let opened = match source {
        Source::Passphrase(path) => match passphrase::read(path) {
            Ok(pass) => {
                SealedState::open_with(paths, guest, Credential::Passphrase(&pass), &policy)
            }
            Err(e) => return report(Outcome::Failed, "passphrase", &chain(&e), json),
        },
        Source::Key(path) => match passphrase::read_key(path) {
            Ok(key) => SealedState::open_with(paths, guest, Credential::Key(&key), &policy),
            Err(e) => return report(Outcome::Failed, "key", &chain(&e), json),
        },
        Source::Host(path) => match HostKey::load(path) {
            Ok(Some(host)) => {
                SealedState::open_with(paths, guest, Credential::Host(&host), &policy)
            }
            Ok(None) => {
                return report(
                    Outcome::Failed,
                    "host-key",
                    &format!("no host key file at {}", path.display()),
                    json,
                );
            }
            Err(e) => return report(Outcome::Failed, "host-key", &chain(&e), json),
        },
    };
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) => return report_error(&e, json),
    };
    let generation = opened.state.generation();
    let (outcome, detail) = match &opened.fell_back {
        None => (Outcome::Ok, format!("generation {generation} opens")),
        Some(f) => (
            Outcome::FellBack,
            format!(
                "the current file is unusable ({}); the previous generation {generation} opens",
                f.current_problem
            ),
        ),
    };
    if json {
        let value = serde_json::json!({
            "result": outcome.name(),
            "generation": generation,
            "files": opened.archive.entries().len(),
            "detail": detail,
        });
        println!("{value}");
    } else {
        println!("{}: {detail}", outcome.name());
    }
    outcome.exit()
}

fn report_error(error: &VaultError, json: bool) -> ExitCode {
    report(Outcome::of(error), error_name(error), &chain(error), json)
}

/// `{"result", "error", "detail"}` with `--json`, a line on stderr
/// without. `error` tells apart what `result` groups (a guest mismatch and
/// a newer format are both "refused").
fn report(outcome: Outcome, error: &str, detail: &str, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({ "result": outcome.name(), "error": error, "detail": detail })
        );
    } else {
        eprintln!("vtpmctl: {}: {detail}", outcome.name());
    }
    outcome.exit()
}

/// The vault's error, in the spec's words (docs/sealed-format.md).
fn error_name(error: &VaultError) -> &'static str {
    match error {
        VaultError::WrongPassphrase { .. } => "wrong-passphrase",
        VaultError::Corrupt { .. } => "corrupt",
        VaultError::Missing { .. } => "missing",
        VaultError::UnsupportedVersion { .. } => "unsupported-version",
        VaultError::GuestMismatch { .. } => "guest-mismatch",
        VaultError::WeakKdf { .. } => "weak-kdf",
        VaultError::EmptyPassphrase | VaultError::InvalidKdf { .. } => "passphrase",
        VaultError::WrongKey { .. } => "wrong-key",
        VaultError::NoKeyslot { .. } => "no-keyslot",
        VaultError::InvalidKey { .. } => "key",
        VaultError::Io { .. } => "io",
        _ => "other",
    }
}
