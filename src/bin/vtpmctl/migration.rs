//! `migrate-out`, `migrate-in` and `abort-migration`: a live migration
//! driven by hand (an orchestrator calls the same methods). What goes from
//! the source to the destination is a *bundle*, one JSON object with the
//! ticket and the sealed file MigrateOut answered: the ticket opens only
//! with the destination's host key, the file only with the guest's key,
//! so the bundle may travel like the disks.

use std::io::{self, Write};
use std::path::Path;

use serde_json::{Map, Value, json};
use vtpmd::protocol::GuestId;
use vtpmd::protocol::manager::MigrateOutReply;

use crate::client::{Client, ClientError};
use crate::commands::Printed;
use crate::transfer::{read_file, write_file};

/// `migrate-out GUEST --to KEY [--ttl SECONDS] [--out FILE [--force]]`.
pub fn migrate_out(
    mut client: Client,
    guest: GuestId,
    destination: &str,
    ttl: Option<u64>,
    out: Option<&Path>,
    force: bool,
) -> Result<Option<Printed>, ClientError> {
    let mut params = Map::new();
    params.insert("guest".into(), guest.to_string().into());
    params.insert("destination".into(), destination.into());
    if let Some(ttl) = ttl {
        params.insert("ttl_seconds".into(), ttl.into());
    }
    let reply = client.call("MigrateOut", &params)?;
    let out_reply: MigrateOutReply =
        serde_json::from_value(reply.clone()).map_err(ClientError::UnexpectedReply)?;
    let bundle = json!({
        "guest": guest.to_string(),
        "generation": out_reply.generation,
        "expires": out_reply.expires,
        "ticket": out_reply.ticket,
        "sealed": out_reply.sealed,
    });
    let text = format!("{bundle}\n");
    match out {
        Some(path) => {
            write_file(path, text.as_bytes(), force)?;
            Ok(Some(Printed {
                human: format!(
                    "{guest}: ticket for generation {}, valid until {} (Unix time), in {}\n",
                    out_reply.generation,
                    out_reply.expires,
                    path.display()
                ),
                json: json!({
                    "guest": guest.to_string(),
                    "generation": out_reply.generation,
                    "expires": out_reply.expires,
                    "out": path.display().to_string(),
                }),
            }))
        }
        None => {
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|source| crate::transfer::TransferError::Write {
                    path: "stdout".into(),
                    source,
                })?;
            Ok(None)
        }
    }
}

/// `migrate-in GUEST BUNDLE` (`-`: stdin).
pub fn migrate_in(
    mut client: Client,
    guest: GuestId,
    bundle: &Path,
) -> Result<Option<Printed>, ClientError> {
    let bytes = read_file(bundle)?;
    let bundle: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ClientError::Usage(format!(
            "{} is not a bundle migrate-out wrote: {e}",
            bundle.display()
        ))
    })?;
    let field = |name: &str| {
        bundle
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Usage(format!("the bundle has no {name:?}")))
    };
    let mut params = Map::new();
    params.insert("guest".into(), guest.to_string().into());
    params.insert("ticket".into(), field("ticket")?.into());
    params.insert("sealed".into(), field("sealed")?.into());
    crate::commands::guest_reply(client.call("MigrateIn", &params)?)
}

/// `abort-migration GUEST`.
pub fn abort(mut client: Client, guest: GuestId) -> Result<Option<Printed>, ClientError> {
    let mut params = Map::new();
    params.insert("guest".into(), guest.to_string().into());
    crate::commands::guest_reply(client.call("AbortMigration", &params)?)
}
