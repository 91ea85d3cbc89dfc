//! The online subcommands: one per method of `io.vtpmd.Manager`, plus
//! `attach-args`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Map, Value, json};
use vtpmd::protocol::GuestId;
use vtpmd::protocol::manager::{CapabilitiesReply, GuestView, KeyslotView, MonitorReply};

use crate::attach::{self, Vmm};
use crate::client::{self, Carries, Client, ClientError};
use crate::output;
use crate::passphrase::{self, Want};

/// How Start and Evacuate open the guest's state.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UnlockArgs {
    /// File holding the passphrase (`-`: stdin) [default: prompt on a
    /// terminal].
    #[arg(long, value_name = "FILE", conflicts_with_all = ["key_file", "host_key"])]
    pub passphrase_file: Option<PathBuf>,
    /// File holding a key slot's key (32 raw bytes or their base64).
    #[arg(long, value_name = "FILE", conflicts_with = "host_key")]
    pub key_file: Option<PathBuf>,
    /// No secret: this host's key opens the guest's host slot.
    #[arg(long)]
    pub host_key: bool,
}

/// How to reach vtpmd and how to print; accepted before or after the
/// subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Conn {
    /// vtpmd's socket [default: /run/vtpmd/vtpmd.sock as root, else
    /// $XDG_RUNTIME_DIR/vtpmd/vtpmd.sock, else /tmp/vtpmd-UID/vtpmd.sock].
    /// A passphrase goes only to a socket root or you own, in a directory
    /// only its owner can write, served by root or you.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Machine output: the reply's parameters as JSON (errors as
    /// {"error": NAME, "parameters": {…}} on stdout).
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for an answer (0: no limit) [default: 120].
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

impl Conn {
    /// These options, completed by the ones given before the subcommand.
    pub fn or(self, outer: &Conn) -> Conn {
        Conn {
            socket: self.socket.or_else(|| outer.socket.clone()),
            json: self.json || outer.json,
            timeout: self.timeout.or(outer.timeout),
        }
    }

    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(client::default_socket_path)
    }

    fn timeout(&self) -> Option<Duration> {
        match self.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS) {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        }
    }

    fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.socket(), self.timeout(), Carries::NoSecrets)
    }

    /// For a call carrying a passphrase, before it is read: no one should
    /// type a passphrase for a socket that will be refused.
    /// [`connect_for_secrets`](Self::connect_for_secrets) checks again.
    /// A socket that cannot be looked at (missing: vtpmd not running) is
    /// left to the connection to report, after the passphrase's problems.
    fn check_for_secrets(&self) -> Result<(), ClientError> {
        match client::check_socket_path(&self.socket(), Carries::Secrets) {
            Err(e @ ClientError::Untrusted { .. }) => Err(e),
            _ => Ok(()),
        }
    }

    fn connect_for_secrets(&self) -> Result<Client, ClientError> {
        Client::connect(&self.socket(), self.timeout(), Carries::Secrets)
    }
}

/// Create runs swtpm_setup and Argon2; a queue of them can take a while.
const DEFAULT_TIMEOUT_SECS: u64 = 120;

#[derive(Debug, Subcommand)]
pub enum Online {
    /// What this host can serve: TPM versions, models, Nova traits.
    Capabilities {
        #[command(flatten)]
        conn: Conn,
    },
    /// This host's public key (base64) and its fingerprint: what `grant`
    /// on another host takes to let this one open a guest.
    HostKey {
        #[command(flatten)]
        conn: Conn,
    },
    /// vtpmd's metrics as a Prometheus scrape would read them (text format
    /// 0.0.4; `--openmetrics` for OpenMetrics 1.0).
    Metrics {
        #[arg(long)]
        openmetrics: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Provision a new TPM for a guest and seal it under a passphrase.
    Create {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// TPM version [default: 2.0 unless a flavor extra spec or image
        /// property names one].
        #[arg(long = "version", value_name = "VERSION", value_parser = ["1.2", "2.0"])]
        tpm_version: Option<String>,
        /// TPM interface [default: tpm-tis].
        #[arg(long, value_parser = ["tpm-tis", "tpm-crb"])]
        model: Option<String>,
        /// A Nova flavor extra spec (hw:tpm_version, hw:tpm_model);
        /// repeatable.
        #[arg(long = "flavor-extra-spec", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        flavor_extra_specs: Vec<(String, String)>,
        /// A Nova image property (hw_tpm_version, hw_tpm_model); repeatable.
        #[arg(long = "image-property", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        image_properties: Vec<(String, String)>,
        /// Provision an EK certificate (and a platform certificate).
        #[arg(long)]
        ek_certificate: bool,
        /// File holding the new passphrase (`-`: stdin; one trailing
        /// newline is ignored) [default: prompt twice on a terminal].
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Who else can open the state: `user` (the passphrase only),
        /// `host` (also this host, with no secret), `deployment` (also the
        /// key in --key-file).
        #[arg(long, value_parser = ["user", "host", "deployment"], default_value = "user")]
        policy: String,
        /// With --policy deployment: the key manager's key (32 raw bytes or
        /// their base64).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Unseal a guest's TPM and start its swtpm.
    Start {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        #[command(flatten)]
        unlock: UnlockArgs,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cluster mode: take over a guest whose host is gone (its etcd lease
    /// expired) with the newest state in etcd, and start it here.
    Evacuate {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        #[command(flatten)]
        unlock: UnlockArgs,
        #[command(flatten)]
        conn: Conn,
    },
    /// Let another host (its `vtpmctl host-key`) open a guest: adds a host
    /// slot for it. The passphrase or the key must open the state.
    Grant {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// The other host's public key (base64, from its `host-key`).
        #[arg(long, value_name = "BASE64")]
        host_public_key: String,
        /// File holding the passphrase (`-`: stdin) [default: prompt on a
        /// terminal].
        #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
        passphrase_file: Option<PathBuf>,
        /// File holding a key slot's key (32 raw bytes or their base64).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove one keyslot of a guest (`status` lists them); never the last.
    Revoke {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// The keyslot's index.
        #[arg(value_parser = clap::value_parser!(u64).range(0..8))]
        slot: u64,
        /// File holding the passphrase (`-`: stdin).
        #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
        passphrase_file: Option<PathBuf>,
        /// File holding a key slot's key. With neither option, this host's
        /// key must open the state (its host slot).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop a guest's swtpm, reseal its state, wipe the plaintext.
    Stop {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        #[command(flatten)]
        conn: Conn,
    },
    /// One guest's state.
    Status {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        #[command(flatten)]
        conn: Conn,
    },
    /// All guests.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop every running guest (final reseal, plaintext wiped), for host
    /// maintenance; restarting vtpmd stops none.
    Drain {
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a guest's sealed state for good (refused while it runs).
    Delete {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change a guest's passphrase.
    Rekey {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// File holding the current passphrase (`-`: stdin) [default:
        /// prompt on a terminal].
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// File holding the new passphrase (`-`: stdin) [default: prompt
        /// twice on a terminal].
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a guest's sealed file (ciphertext: no passphrase) for another
    /// host's import; a running guest is resealed first.
    Export {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// Where to write it: mode 0600, complete or not at all [default:
        /// stdout, unless it is a terminal; with --json, the reply as JSON,
        /// the file as base64 in it].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace FILE if it exists.
        #[arg(long, requires = "out")]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register a sealed file another host exported; the guest is then
    /// stopped, ready for start with its passphrase.
    Import {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// The sealed file (`-`: stdin).
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// The source of a live migration: seal the running guest and write a
    /// bundle (ticket + sealed file) for the destination's migrate-in.
    MigrateOut {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// The destination's host key (its `vtpmctl host-key`).
        #[arg(long = "to", value_name = "PUBLIC_KEY")]
        to: String,
        /// How long the ticket opens, seconds [default: 300, at most 3600].
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Where to write the bundle (0600, whole or not at all) [default:
        /// stdout].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace FILE if it exists.
        #[arg(long, requires = "out")]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// The destination of a live migration: take the guest in from a
    /// migrate-out bundle; prints its control socket for QEMU -incoming.
    MigrateIn {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// The bundle migrate-out wrote (`-`: stdin).
        bundle: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Call a migration off on this host (source: the guest goes on here;
    /// destination: the guest taken in is removed).
    AbortMigration {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print guest events as they happen (first one "existing" event per
    /// guest), until interrupted or vtpmd ends the stream.
    Monitor {
        /// Stop after this many events.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print what to give a VMM to attach it to a running guest's TPM.
    AttachArgs {
        /// The guest's id: a canonical lowercase UUID.
        guest: GuestId,
        /// The VMM.
        #[arg(long = "for", value_name = "VMM", value_enum)]
        vmm: Vmm,
        /// QEMU's tpmdev id (the chardev is "chr" + ID); ignored for the
        /// others.
        #[arg(long, default_value = "tpm0", value_parser = attach::parse_id)]
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `KEY=VALUE`, split at the first `=`; the key must not be empty.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// What a finished command prints.
#[derive(Debug)]
pub struct Printed {
    pub json: Value,
    pub human: String,
}

impl Online {
    pub fn conn_mut(&mut self) -> &mut Conn {
        match self {
            Self::Capabilities { conn }
            | Self::HostKey { conn }
            | Self::Metrics { conn, .. }
            | Self::Create { conn, .. }
            | Self::Start { conn, .. }
            | Self::Evacuate { conn, .. }
            | Self::Grant { conn, .. }
            | Self::Revoke { conn, .. }
            | Self::Stop { conn, .. }
            | Self::Status { conn, .. }
            | Self::List { conn }
            | Self::Drain { conn }
            | Self::Delete { conn, .. }
            | Self::Rekey { conn, .. }
            | Self::Export { conn, .. }
            | Self::Import { conn, .. }
            | Self::MigrateOut { conn, .. }
            | Self::MigrateIn { conn, .. }
            | Self::AbortMigration { conn, .. }
            | Self::Monitor { conn, .. }
            | Self::AttachArgs { conn, .. } => conn,
        }
    }
}

/// Runs one online command; `conn` is already merged with the outer
/// options. Monitor prints as it goes and returns `None`.
pub fn run(command: Online) -> Result<Option<Printed>, ClientError> {
    match command {
        Online::Capabilities { conn } => {
            let reply = conn.connect()?.call("GetCapabilities", &Map::new())?;
            let caps: CapabilitiesReply = decode(&reply)?;
            Ok(Some(Printed {
                human: output::capabilities(&caps),
                json: reply,
            }))
        }
        Online::HostKey { conn } => {
            let reply = conn.connect()?.call("GetHostKey", &Map::new())?;
            let field = |name: &str| {
                reply
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| unexpected(name))
            };
            let human = format!(
                "public key   {}\nfingerprint  {}\n",
                field("public_key")?,
                field("fingerprint")?
            );
            Ok(Some(Printed { human, json: reply }))
        }
        Online::Metrics { openmetrics, conn } => {
            let mut params = Map::new();
            if openmetrics {
                params.insert("format".to_owned(), Value::from("openmetrics"));
            }
            let reply = conn.connect()?.call("GetMetrics", &params)?;
            let human = reply
                .get("text")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| unexpected("text"))?;
            Ok(Some(Printed { human, json: reply }))
        }
        Online::Create {
            guest,
            tpm_version,
            model,
            flavor_extra_specs,
            image_properties,
            ek_certificate,
            passphrase_file,
            policy,
            key_file,
            conn,
        } => {
            if key_file.is_some() != (policy == "deployment") {
                return Err(ClientError::Usage(
                    "--key-file goes with --policy deployment, and that policy needs it".to_owned(),
                ));
            }
            let flavor: BTreeMap<String, String> = flavor_extra_specs.into_iter().collect();
            let image: BTreeMap<String, String> = image_properties.into_iter().collect();
            let mut params = guest_params(guest);
            let version_elsewhere =
                flavor.contains_key("hw:tpm_version") || image.contains_key("hw_tpm_version");
            match tpm_version {
                Some(v) => _ = params.insert("version".into(), v.into()),
                None if !version_elsewhere => _ = params.insert("version".into(), "2.0".into()),
                None => {}
            }
            if let Some(m) = model {
                params.insert("model".into(), m.into());
            }
            if !flavor.is_empty() {
                params.insert("flavor_extra_specs".into(), json!(flavor));
            }
            if !image.is_empty() {
                params.insert("image_properties".into(), json!(image));
            }
            params.insert("ek_certificate".into(), ek_certificate.into());
            params.insert("policy".into(), policy.into());
            conn.check_for_secrets()?;
            let key = key_file.as_deref().map(passphrase::read_key).transpose()?;
            let pass = passphrase::obtain(Want {
                file: passphrase_file.as_deref(),
                option: "passphrase-file",
                prompt: "New passphrase: ",
                confirm: true,
            })?;
            let mut secrets = vec![("passphrase", &pass)];
            if let Some(key) = &key {
                secrets.push(("key", key));
            }
            let reply = conn
                .connect_for_secrets()?
                .call_with_secrets("Create", &params, &secrets)?;
            drop((pass, key));
            guest_reply(reply)
        }
        Online::Start {
            guest,
            unlock,
            conn,
        } => start_with("Start", guest, unlock, &conn),
        Online::Evacuate {
            guest,
            unlock,
            conn,
        } => start_with("Evacuate", guest, unlock, &conn),
        Online::Grant {
            guest,
            host_public_key,
            passphrase_file,
            key_file,
            conn,
        } => {
            let mut params = guest_params(guest);
            params.insert("host_public_key".into(), host_public_key.into());
            let (name, secret) = secret_of(&conn, passphrase_file, key_file, false)?;
            let reply = conn.connect_for_secrets()?.call_with_secrets(
                "Grant",
                &params,
                &[(name, &secret)],
            )?;
            drop(secret);
            keyslots_printed(reply, &format!("granted {guest}"))
        }
        Online::Revoke {
            guest,
            slot,
            passphrase_file,
            key_file,
            conn,
        } => {
            let mut params = guest_params(guest);
            params.insert("slot".into(), slot.into());
            let reply = if passphrase_file.is_none() && key_file.is_none() {
                conn.connect()?.call("Revoke", &params)?
            } else {
                let (name, secret) = secret_of(&conn, passphrase_file, key_file, false)?;
                let reply = conn.connect_for_secrets()?.call_with_secrets(
                    "Revoke",
                    &params,
                    &[(name, &secret)],
                )?;
                drop(secret);
                reply
            };
            keyslots_printed(reply, &format!("revoked keyslot {slot} of {guest}"))
        }
        Online::Stop { guest, conn } => {
            guest_reply(conn.connect()?.call("Stop", &guest_params(guest))?)
        }
        Online::Status { guest, conn } => {
            guest_reply(conn.connect()?.call("Status", &guest_params(guest))?)
        }
        Online::List { conn } => list_like(conn, "List"),
        Online::Drain { conn } => list_like(conn, "Drain"),
        Online::Delete { guest, conn } => {
            let reply = conn.connect()?.call("Delete", &guest_params(guest))?;
            Ok(Some(Printed {
                human: format!("deleted {guest}\n"),
                json: reply,
            }))
        }
        Online::Rekey {
            guest,
            passphrase_file,
            new_passphrase_file,
            conn,
        } => {
            let stdin = Path::new("-");
            if passphrase_file.as_deref() == Some(stdin)
                && new_passphrase_file.as_deref() == Some(stdin)
            {
                return Err(ClientError::Usage(
                    "only one of --passphrase-file and --new-passphrase-file can be `-` (stdin)"
                        .to_owned(),
                ));
            }
            conn.check_for_secrets()?;
            let old = passphrase::obtain(Want {
                file: passphrase_file.as_deref(),
                option: "passphrase-file",
                prompt: "Current passphrase: ",
                confirm: false,
            })?;
            let new = passphrase::obtain(Want {
                file: new_passphrase_file.as_deref(),
                option: "new-passphrase-file",
                prompt: "New passphrase: ",
                confirm: true,
            })?;
            let reply = conn.connect_for_secrets()?.call_with_secrets(
                "Rekey",
                &guest_params(guest),
                &[("passphrase", &old), ("new_passphrase", &new)],
            )?;
            drop((old, new));
            let mut human = format!("rekeyed {guest}\n");
            for left in reply
                .get("left_as_is")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str)
            {
                human.push_str(&format!("warning: {left}\n"));
            }
            Ok(Some(Printed { human, json: reply }))
        }
        Online::Export {
            guest,
            out,
            force,
            conn,
        } => crate::transfer::export(conn.connect()?, guest, out.as_deref(), force, conn.json),
        Online::Import { guest, file, conn } => {
            crate::transfer::import(conn.connect()?, guest, &file)
        }
        Online::MigrateOut {
            guest,
            to,
            ttl,
            out,
            force,
            conn,
        } => crate::migration::migrate_out(conn.connect()?, guest, &to, ttl, out.as_deref(), force),
        Online::MigrateIn {
            guest,
            bundle,
            conn,
        } => crate::migration::migrate_in(conn.connect()?, guest, &bundle),
        Online::AbortMigration { guest, conn } => crate::migration::abort(conn.connect()?, guest),
        Online::Monitor { count, conn } => {
            monitor(&conn, count)?;
            Ok(None)
        }
        Online::AttachArgs {
            guest,
            vmm,
            id,
            conn,
        } => {
            let reply = conn.connect()?.call("Status", &guest_params(guest))?;
            let view = reply
                .get("guest")
                .ok_or_else(|| unexpected("no guest"))
                .and_then(guest_view)?;
            let attach =
                attach::attach_args(&view, vmm, &id).map_err(|r| ClientError::Refused {
                    name: r.name,
                    parameters: r.parameters,
                    message: r.message,
                })?;
            Ok(Some(Printed {
                human: attach.human(),
                json: attach.json(),
            }))
        }
    }
}

fn monitor(conn: &Conn, count: Option<u64>) -> Result<(), ClientError> {
    // Events come whenever they happen: no reply timeout.
    let mut client = Client::connect(&conn.socket(), None, Carries::NoSecrets)?;
    client.start_stream("Monitor", &Map::new())?;
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    loop {
        if count.is_some_and(|n| seen >= n) {
            return Ok(());
        }
        let (reply, more) = match client.next_reply() {
            Ok(r) => r,
            Err(ClientError::Closed) if count.is_none() => {
                eprintln!("vtpmctl: vtpmd ended the event stream");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let line = if conn.json {
            reply.to_string()
        } else {
            let event = reply
                .get("event")
                .and_then(Value::as_str)
                .ok_or_else(|| unexpected("no event"))?
                .to_owned();
            let guest = reply
                .get("guest")
                .ok_or_else(|| unexpected("no guest"))
                .and_then(guest_view)?;
            output::event(&MonitorReply {
                event,
                guest,
                detail: reply
                    .get("detail")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                reseal_ms: reply.get("reseal_ms").and_then(Value::as_f64),
                // Timings this vtpmctl cannot read are left out, not fatal.
                start: reply
                    .get("start")
                    .and_then(|s| serde_json::from_value(s.clone()).ok()),
            })
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (e.g. `| head -1`): nothing to report.
            return Ok(());
        }
        seen += 1;
        if !more {
            return Ok(());
        }
    }
}

/// The call's secret: the key from `key_file`, else the passphrase (from
/// its file or a prompt); checked against the socket before it is read.
/// Start or Evacuate: with a passphrase, a key, or this host's key.
fn start_with(
    method: &str,
    guest: GuestId,
    unlock: UnlockArgs,
    conn: &Conn,
) -> Result<Option<Printed>, ClientError> {
    if unlock.host_key {
        return guest_reply(conn.connect()?.call(method, &guest_params(guest))?);
    }
    let (name, secret) = secret_of(conn, unlock.passphrase_file, unlock.key_file, false)?;
    let reply = conn.connect_for_secrets()?.call_with_secrets(
        method,
        &guest_params(guest),
        &[(name, &secret)],
    )?;
    drop(secret);
    guest_reply(reply)
}

fn secret_of(
    conn: &Conn,
    passphrase_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    confirm: bool,
) -> Result<(&'static str, vtpmd::secret::SecretBuf), ClientError> {
    conn.check_for_secrets()?;
    if let Some(path) = key_file {
        return Ok(("key", passphrase::read_key(&path)?));
    }
    let pass = passphrase::obtain(Want {
        file: passphrase_file.as_deref(),
        option: "passphrase-file",
        prompt: "Passphrase: ",
        confirm,
    })?;
    Ok(("passphrase", pass))
}

/// Grant's and Revoke's answer: a line, then the keyslots now.
fn keyslots_printed(reply: Value, headline: &str) -> Result<Option<Printed>, ClientError> {
    let slots: Vec<KeyslotView> = reply
        .get("keyslots")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(ClientError::UnexpectedReply)?
        .unwrap_or_default();
    let slot = reply
        .get("slot")
        .and_then(Value::as_u64)
        .unwrap_or_default();
    let human = format!("{headline} (slot {slot})\n{}", output::keyslots(&slots));
    Ok(Some(Printed { human, json: reply }))
}

fn guest_params(guest: GuestId) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("guest".into(), guest.to_string().into());
    m
}

pub fn guest_reply(reply: Value) -> Result<Option<Printed>, ClientError> {
    let view = reply
        .get("guest")
        .ok_or_else(|| unexpected("no guest"))
        .and_then(guest_view)?;
    Ok(Some(Printed {
        human: output::guest(&view),
        json: reply,
    }))
}

/// The fields of `type Guest` this client knows; a newer daemon may add
/// more (the interface only grows), which are kept in `--json` output and
/// left out of the human one.
const GUEST_FIELDS: [&str; 10] = [
    "guest",
    "version",
    "model",
    "state",
    "pid",
    "ctrl_socket",
    "generation",
    "failure",
    "reason",
    "keyslots",
];

pub fn guest_view(value: &Value) -> Result<GuestView, ClientError> {
    let Value::Object(fields) = value else {
        return Err(unexpected("guest is not an object"));
    };
    let known: Map<String, Value> = fields
        .iter()
        .filter(|(k, v)| GUEST_FIELDS.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::from_value(Value::Object(known)).map_err(ClientError::UnexpectedReply)
}

fn decode<T: serde::de::DeserializeOwned>(reply: &Value) -> Result<T, ClientError> {
    serde_json::from_value(reply.clone()).map_err(ClientError::UnexpectedReply)
}

fn unexpected(what: &str) -> ClientError {
    ClientError::UnexpectedReply(serde::de::Error::custom(what))
}

/// List and Drain: a call that answers with guests, shown as a table.
fn list_like(conn: Conn, method: &str) -> Result<Option<Printed>, ClientError> {
    let reply = conn.connect()?.call(method, &Map::new())?;
    let guests = reply
        .get("guests")
        .and_then(Value::as_array)
        .ok_or_else(|| unexpected("no guests array"))?
        .iter()
        .map(guest_view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Printed {
        human: output::guest_table(&guests),
        json: reply,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_key_value("hw:tpm_version=2.0").unwrap(),
            ("hw:tpm_version".to_owned(), "2.0".to_owned())
        );
        assert_eq!(
            parse_key_value("k=a=b").unwrap(),
            ("k".to_owned(), "a=b".to_owned())
        );
        assert_eq!(
            parse_key_value("k=").unwrap(),
            ("k".to_owned(), String::new())
        );
        assert!(parse_key_value("=v").is_err());
        assert!(parse_key_value("novalue").is_err());
    }

    #[test]
    fn guests_from_a_newer_daemon_still_parse() {
        let v = json!({"guest": "g", "version": "2.0", "model": "tpm-tis", "state": "stopped",
                       "generation": 1, "pid": null, "shiny_new_field": [1, 2]});
        let g = guest_view(&v).unwrap();
        assert_eq!(g.state, "stopped");
        assert_eq!(g.pid, None);
        assert!(guest_view(&json!({"guest": "g"})).is_err());
        assert!(guest_view(&json!("g")).is_err());
    }

    #[test]
    fn outer_options_fill_in_missing_inner_ones() {
        let outer = Conn {
            socket: Some("/outer.sock".into()),
            json: true,
            timeout: Some(5),
        };
        let merged = Conn::default().or(&outer);
        assert_eq!(merged.socket(), Path::new("/outer.sock"));
        assert!(merged.json);
        assert_eq!(merged.timeout(), Some(Duration::from_secs(5)));
        let inner = Conn {
            socket: Some("/inner.sock".into()),
            json: false,
            timeout: Some(0),
        };
        let merged = inner.or(&outer);
        assert_eq!(merged.socket(), Path::new("/inner.sock"));
        assert_eq!(merged.timeout(), None, "0 means no limit");
        assert_eq!(
            Conn::default().timeout(),
            Some(Duration::from_secs(DEFAULT_TIMEOUT_SECS))
        );
    }
}
