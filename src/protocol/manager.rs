//! The `io.vtpmd.Manager` interface: requests as validated values, replies
//! and errors as they go on the wire. The interface description shipped
//! with vtpmd is `io.vtpmd.Manager.varlink` beside this file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use base64ct::{Base64, Encoding};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{GuestId, TpmModel, TpmSpec, TpmSpecError, TpmVersion};

pub const INTERFACE: &str = "io.vtpmd.Manager";
pub const INTERFACE_DESCRIPTION: &str = include_str!("io.vtpmd.Manager.varlink");

/// Base64 text of the longest passphrase the vault accepts (4096 bytes).
pub const MAX_PASSPHRASE_BASE64: usize = 4096_usize.div_ceil(3) * 4;

/// A passphrase as base64 text, borrowed from the receive buffer (which is
/// locked memory in the daemon). Never printed.
#[derive(Clone, Copy)]
pub struct Passphrase<'a>(&'a str);

impl<'a> Passphrase<'a> {
    /// The base64 text, to be decoded straight into locked memory.
    pub fn base64(&self) -> &'a [u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Passphrase<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Base64 text of a `key` slot's key: exactly 32 bytes.
pub const KEY_BASE64_LEN: usize = 44;

/// What opens a guest's state in a call: a passphrase, a key (both base64
/// text borrowed from the receive buffer), or nothing (this host's key).
#[derive(Debug, Clone, Copy)]
pub enum Secret<'a> {
    Passphrase(Passphrase<'a>),
    Key(Passphrase<'a>),
    None,
}

impl<'a> Secret<'a> {
    /// The base64 text, if any, for the fuzzer's checks.
    pub fn base64(&self) -> Option<Passphrase<'a>> {
        match self {
            Self::Passphrase(p) | Self::Key(p) => Some(*p),
            Self::None => None,
        }
    }
}

/// Which slots Create adds besides the passphrase slot (Nova's vTPM secret
/// security policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The passphrase only: only the owner can start the guest.
    User,
    /// Also a host slot for this host: it starts the guest unattended.
    Host,
    /// Also a key slot for the caller's key (a deployment's key manager).
    Deployment,
}

/// A validated call of `io.vtpmd.Manager`.
#[derive(Debug)]
pub enum Request<'a> {
    GetCapabilities,
    GetHostKey,
    /// `openmetrics`: OpenMetrics 1.0 text; otherwise Prometheus text 0.0.4.
    GetMetrics {
        openmetrics: bool,
    },
    Create {
        guest: GuestId,
        spec: TpmSpec,
        passphrase: Passphrase<'a>,
        ek_certificate: bool,
        policy: Policy,
        /// With `Policy::Deployment` only.
        key: Option<Passphrase<'a>>,
    },
    Start {
        guest: GuestId,
        secret: Secret<'a>,
    },
    /// Start's parameters; cluster mode only.
    Evacuate {
        guest: GuestId,
        secret: Secret<'a>,
    },
    Grant {
        guest: GuestId,
        /// A passphrase or a key; never `Secret::None`.
        secret: Secret<'a>,
        /// Standard base64 of 32 bytes, shape checked (decoded later).
        host_public_key: &'a str,
    },
    Revoke {
        guest: GuestId,
        slot: usize,
        secret: Secret<'a>,
    },
    Stop {
        guest: GuestId,
    },
    Status {
        guest: GuestId,
    },
    List,
    Drain,
    Delete {
        guest: GuestId,
    },
    Rekey {
        guest: GuestId,
        passphrase: Passphrase<'a>,
        new_passphrase: Passphrase<'a>,
    },
    Export {
        guest: GuestId,
    },
    Import {
        guest: GuestId,
        /// The sealed file, decoded. Ciphertext, so ordinary memory.
        sealed: Vec<u8>,
    },
    Monitor,
    MigrateOut {
        guest: GuestId,
        /// The destination's host public key (GetHostKey's), base64.
        destination: &'a str,
        ttl_seconds: Option<u64>,
    },
    MigrateIn {
        guest: GuestId,
        /// base64 of the ticket MigrateOut answered.
        ticket: &'a str,
        /// base64 of the sealed file MigrateOut answered.
        sealed: &'a str,
    },
    AbortMigration {
        guest: GuestId,
    },
}

impl Request<'_> {
    /// The method's name, for logs and authorization.
    pub fn method(&self) -> &'static str {
        match self {
            Self::GetCapabilities => "GetCapabilities",
            Self::GetHostKey => "GetHostKey",
            Self::GetMetrics { .. } => "GetMetrics",
            Self::Create { .. } => "Create",
            Self::Start { .. } => "Start",
            Self::Evacuate { .. } => "Evacuate",
            Self::Stop { .. } => "Stop",
            Self::Status { .. } => "Status",
            Self::List => "List",
            Self::Drain => "Drain",
            Self::Delete { .. } => "Delete",
            Self::Rekey { .. } => "Rekey",
            Self::Export { .. } => "Export",
            Self::Import { .. } => "Import",
            Self::Grant { .. } => "Grant",
            Self::Revoke { .. } => "Revoke",
            Self::Monitor => "Monitor",
            Self::MigrateOut { .. } => "MigrateOut",
            Self::MigrateIn { .. } => "MigrateIn",
            Self::AbortMigration { .. } => "AbortMigration",
        }
    }

    /// Whether the method only reads (what a read-only group may call).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::GetCapabilities
                | Self::GetHostKey
                | Self::GetMetrics { .. }
                | Self::Status { .. }
                | Self::List
                | Self::Monitor
        )
    }
}

/// Why a call is refused before anything is done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no method {method} in io.vtpmd.Manager")]
    MethodNotFound { method: String },
    #[error("invalid parameter {parameter}")]
    InvalidParameter { parameter: String },
    #[error("invalid TPM spec: {reason}")]
    InvalidTpmSpec { reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    #[serde(borrow, default)]
    passphrase: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    #[serde(borrow, default)]
    passphrase: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
    #[serde(borrow)]
    host_public_key: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    slot: u64,
    #[serde(borrow, default)]
    passphrase: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateOutParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    #[serde(borrow)]
    destination: &'a str,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateInParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    #[serde(borrow)]
    ticket: &'a str,
    #[serde(borrow)]
    sealed: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RekeyParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    #[serde(borrow)]
    passphrase: &'a RawValue,
    #[serde(borrow)]
    new_passphrase: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    /// Borrowed unless it has an escape (`\/` from PHP's json_encode):
    /// not a secret, so unescaping it into the heap is harmless.
    #[serde(borrow)]
    sealed: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams<'a> {
    #[serde(borrow)]
    guest: &'a str,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    flavor_extra_specs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    image_properties: Option<BTreeMap<String, String>>,
    #[serde(borrow)]
    passphrase: &'a RawValue,
    #[serde(default)]
    ek_certificate: Option<bool>,
    #[serde(default)]
    policy: Option<&'a str>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
}

/// Decodes and validates the parameters of `member` (the part after
/// `io.vtpmd.Manager.`).
pub fn parse_request<'a>(member: &str, parameters: &'a str) -> Result<Request<'a>, RequestError> {
    Ok(match member {
        "GetCapabilities" => {
            decode::<NoParams>(parameters)?;
            Request::GetCapabilities
        }
        "GetHostKey" => {
            decode::<NoParams>(parameters)?;
            Request::GetHostKey
        }
        "GetMetrics" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct P<'a> {
                #[serde(default, borrow)]
                format: Option<&'a str>,
            }
            let p = decode::<P<'_>>(parameters)?;
            let openmetrics = match p.format {
                None | Some("prometheus") => false,
                Some("openmetrics") => true,
                Some(_) => {
                    return Err(RequestError::InvalidParameter {
                        parameter: "format".to_owned(),
                    });
                }
            };
            Request::GetMetrics { openmetrics }
        }
        "List" => {
            decode::<NoParams>(parameters)?;
            Request::List
        }
        "Drain" => {
            decode::<NoParams>(parameters)?;
            Request::Drain
        }
        "Monitor" => {
            decode::<NoParams>(parameters)?;
            Request::Monitor
        }
        "MigrateOut" => {
            let p: MigrateOutParams<'a> = decode(parameters)?;
            Request::MigrateOut {
                guest: guest_id(p.guest)?,
                destination: p.destination,
                ttl_seconds: p.ttl_seconds,
            }
        }
        "MigrateIn" => {
            let p: MigrateInParams<'a> = decode(parameters)?;
            Request::MigrateIn {
                guest: guest_id(p.guest)?,
                ticket: p.ticket,
                sealed: p.sealed,
            }
        }
        "AbortMigration" => {
            let p: GuestParams<'a> = decode(parameters)?;
            Request::AbortMigration {
                guest: guest_id(p.guest)?,
            }
        }
        "Stop" | "Status" | "Delete" | "Export" => {
            let p: GuestParams<'a> = decode(parameters)?;
            let guest = guest_id(p.guest)?;
            match member {
                "Stop" => Request::Stop { guest },
                "Status" => Request::Status { guest },
                "Export" => Request::Export { guest },
                _ => Request::Delete { guest },
            }
        }
        "Import" => {
            let p: ImportParams<'a> = decode(parameters)?;
            Request::Import {
                guest: guest_id(p.guest)?,
                sealed: Base64::decode_vec(&p.sealed).map_err(|_| {
                    RequestError::InvalidParameter {
                        parameter: "sealed".to_owned(),
                    }
                })?,
            }
        }
        "Start" => {
            let p: StartParams<'a> = decode(parameters)?;
            Request::Start {
                guest: guest_id(p.guest)?,
                secret: secret(p.passphrase, p.key)?,
            }
        }
        "Evacuate" => {
            let p: StartParams<'a> = decode(parameters)?;
            Request::Evacuate {
                guest: guest_id(p.guest)?,
                secret: secret(p.passphrase, p.key)?,
            }
        }
        "Grant" => {
            let p: GrantParams<'a> = decode(parameters)?;
            let guest = guest_id(p.guest)?;
            let secret = secret(p.passphrase, p.key)?;
            if matches!(secret, Secret::None) {
                // Handing the state to another host takes the owner's
                // secret (or the deployment's key), not merely this host's.
                return Err(RequestError::InvalidParameter {
                    parameter: "passphrase".to_owned(),
                });
            }
            let host_public_key = p.host_public_key;
            let shaped = host_public_key.len() == KEY_BASE64_LEN
                && host_public_key.ends_with('=')
                && host_public_key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
            if !shaped {
                return Err(RequestError::InvalidParameter {
                    parameter: "host_public_key".to_owned(),
                });
            }
            Request::Grant {
                guest,
                secret,
                host_public_key,
            }
        }
        "Revoke" => {
            let p: RevokeParams<'a> = decode(parameters)?;
            let guest = guest_id(p.guest)?;
            let slot = usize::try_from(p.slot)
                .ok()
                .filter(|s| *s < MAX_KEYSLOTS)
                .ok_or_else(|| RequestError::InvalidParameter {
                    parameter: "slot".to_owned(),
                })?;
            Request::Revoke {
                guest,
                slot,
                secret: secret(p.passphrase, p.key)?,
            }
        }
        "Rekey" => {
            let p: RekeyParams<'a> = decode(parameters)?;
            Request::Rekey {
                guest: guest_id(p.guest)?,
                passphrase: passphrase("passphrase", p.passphrase)?,
                new_passphrase: passphrase("new_passphrase", p.new_passphrase)?,
            }
        }
        "Create" => {
            let p: CreateParams<'a> = decode(parameters)?;
            let spec = resolve_spec(
                p.version.as_deref(),
                p.model.as_deref(),
                p.flavor_extra_specs.as_ref(),
                p.image_properties.as_ref(),
            )
            .map_err(|reason| RequestError::InvalidTpmSpec { reason })?;
            let policy = match p.policy {
                None | Some("user") => Policy::User,
                Some("host") => Policy::Host,
                Some("deployment") => Policy::Deployment,
                Some(_) => {
                    return Err(RequestError::InvalidParameter {
                        parameter: "policy".to_owned(),
                    });
                }
            };
            let key = p.key.map(|raw| key("key", raw)).transpose()?;
            // A key is the deployment policy's, and that policy needs one.
            if key.is_some() != (policy == Policy::Deployment) {
                return Err(RequestError::InvalidParameter {
                    parameter: "key".to_owned(),
                });
            }
            Request::Create {
                guest: guest_id(p.guest)?,
                spec,
                passphrase: passphrase("passphrase", p.passphrase)?,
                ek_certificate: p.ek_certificate.unwrap_or(false),
                policy,
                key,
            }
        }
        other => {
            return Err(RequestError::MethodNotFound {
                method: format!("{INTERFACE}.{other}"),
            });
        }
    })
}

/// Deserializes parameters, naming the offending field on failure
/// (unknown, missing, wrong type). Secrets are taken as raw JSON text
/// (`RawValue`), which serde_json skips over without unescaping, so that
/// [`passphrase`] can refuse an escape from the bytes as received.
fn decode<'a, T: Deserialize<'a>>(parameters: &'a str) -> Result<T, RequestError> {
    // The spec's parameters are an object; serde would also fill a struct
    // from an array of its fields in order.
    if !parameters
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(RequestError::InvalidParameter {
            parameter: "parameters".to_owned(),
        });
    }
    let mut de = serde_json::Deserializer::from_str(parameters);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // The top-level field is the path's first segment, taken as a
        // segment: a field name may itself contain dots (found by fuzzing:
        // `{".guest": …}` was reported as parameter "").
        let parameter = match e.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) => key.clone(),
            _ => quoted_name(&e.inner().to_string()).unwrap_or_else(|| "parameters".to_owned()),
        };
        RequestError::InvalidParameter { parameter }
    })?;
    de.end().map_err(|_| RequestError::InvalidParameter {
        parameter: "parameters".to_owned(),
    })?;
    Ok(value)
}

/// The field serde names in "missing field `guest`" / "unknown field `x`".
/// Only those two messages: others quote the value received ("invalid
/// type: string \"…\"" for parameters that are not an object), and a
/// backtick in a value must not become a field's name.
fn quoted_name(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("unknown field `"))?;
    let len = rest.find('`')?;
    Some(rest[..len].to_owned())
}

fn guest_id(text: &str) -> Result<GuestId, RequestError> {
    GuestId::parse(text).map_err(|_| RequestError::InvalidParameter {
        parameter: "guest".to_owned(),
    })
}

/// A JSON string token with no escape in it, whose content is non-empty,
/// bounded, and base64's alphabet; decoding (and the canonical form check)
/// happens straight into locked memory later.
///
/// `raw` is the value's text exactly as received, in the locked receive
/// buffer. Borrowing it as a `&str` instead would make serde_json unescape
/// a string with an escape (`\/`, which PHP's json_encode writes for every
/// `/` of base64) into its heap scratch buffer, and put it in its error
/// message, before the value could be refused. The error names the
/// parameter only, never the value.
fn passphrase<'a>(name: &str, raw: &'a RawValue) -> Result<Passphrase<'a>, RequestError> {
    let text = raw
        .get()
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_default();
    let valid = !text.is_empty()
        && text.len() <= MAX_PASSPHRASE_BASE64
        && text.len().is_multiple_of(4)
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !valid {
        return Err(RequestError::InvalidParameter {
            parameter: name.to_owned(),
        });
    }
    Ok(Passphrase(text))
}

/// The most keyslots a sealed file holds (docs/sealed-format.md).
const MAX_KEYSLOTS: usize = 8;

/// A key slot's key: base64 text of exactly 32 bytes, checked like a
/// passphrase (borrowed, never unescaped).
fn key<'a>(name: &str, raw: &'a RawValue) -> Result<Passphrase<'a>, RequestError> {
    let text = passphrase(name, raw)?;
    if text.0.len() != KEY_BASE64_LEN || !text.0.ends_with('=') || text.0.ends_with("==") {
        return Err(RequestError::InvalidParameter {
            parameter: name.to_owned(),
        });
    }
    Ok(text)
}

/// At most one of a passphrase and a key; neither means this host's key.
fn secret<'a>(
    passphrase_raw: Option<&'a RawValue>,
    key_raw: Option<&'a RawValue>,
) -> Result<Secret<'a>, RequestError> {
    match (passphrase_raw, key_raw) {
        (Some(_), Some(_)) => Err(RequestError::InvalidParameter {
            parameter: "key".to_owned(),
        }),
        (Some(raw), None) => Ok(Secret::Passphrase(passphrase("passphrase", raw)?)),
        (None, Some(raw)) => Ok(Secret::Key(key("key", raw)?)),
        (None, None) => Ok(Secret::None),
    }
}

/// Nova's seed rules: the version and model may come from the call itself,
/// from flavor extra specs (`hw:tpm_version`, `hw:tpm_model`) and from image
/// properties (`hw_tpm_version`, `hw_tpm_model`); all that are given must
/// agree. A version is required; the model defaults to tpm-tis; CRB needs
/// 2.0. Unrelated extra specs and properties are ignored.
pub fn resolve_spec(
    version: Option<&str>,
    model: Option<&str>,
    flavor_extra_specs: Option<&BTreeMap<String, String>>,
    image_properties: Option<&BTreeMap<String, String>>,
) -> Result<TpmSpec, String> {
    let from = lookup;
    let versions: Vec<(&str, &str)> = [
        version.map(|v| ("version", v)),
        from(flavor_extra_specs, "hw:tpm_version"),
        from(image_properties, "hw_tpm_version"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let models: Vec<(&str, &str)> = [
        model.map(|m| ("model", m)),
        from(flavor_extra_specs, "hw:tpm_model"),
        from(image_properties, "hw_tpm_model"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let version = agreed("version", &versions)?
        .ok_or("no TPM version requested (version, hw:tpm_version or hw_tpm_version)")?;
    let version = TpmVersion::parse(version).map_err(|e| e.to_string())?;
    let model = match agreed("model", &models)? {
        Some(m) => TpmModel::parse(m).map_err(|e| e.to_string())?,
        None => TpmModel::default(),
    };
    TpmSpec::new(version, model).map_err(|e: TpmSpecError| e.to_string())
}

fn lookup<'m>(
    map: Option<&'m BTreeMap<String, String>>,
    key: &'static str,
) -> Option<(&'static str, &'m str)> {
    map.and_then(|m| m.get(key)).map(|v| (key, v.as_str()))
}

fn agreed<'v>(what: &str, values: &[(&str, &'v str)]) -> Result<Option<&'v str>, String> {
    let Some(&(_, first)) = values.first() else {
        return Ok(None);
    };
    if values.iter().any(|&(_, v)| v != first) {
        let listed: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(format!("conflicting TPM {what}s: {}", listed.join(", ")));
    }
    Ok(Some(first))
}

/// A guest as it goes on the wire (`type Guest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestView {
    pub guest: String,
    pub version: String,
    pub model: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ctrl_socket: Option<String>,
    pub generation: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The sealed file's keyslots (`type Keyslot`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub keyslots: Option<Vec<KeyslotView>>,
    /// Cluster mode (`type Replication`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub replication: Option<ReplicationView>,
}

/// What etcd has of a guest from this host (`type Replication`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationView {
    pub generation: u64,
    pub pending: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// One keyslot as it goes on the wire (`type Keyslot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyslotView {
    pub index: u64,
    /// "argon2id-passphrase", "key" or "host".
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host_fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilitiesReply {
    pub versions: Vec<String>,
    pub models: Vec<String>,
    pub traits: Vec<String>,
    pub swtpm_version: String,
    /// The largest sealed file Export hands out and Import takes (absent
    /// from a vtpmd older than Export).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_sealed_bytes: Option<u64>,
}

/// Export's reply: the sealed file as standard base64, and the generation
/// in its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReply {
    pub sealed: String,
    pub generation: u64,
}

impl ExportReply {
    pub fn new(sealed: &[u8], generation: u64) -> Self {
        Self {
            sealed: Base64::encode_string(sealed),
            generation,
        }
    }
}

/// `MigrateOut`'s reply: what the orchestrator hands the destination's
/// MigrateIn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOutReply {
    /// base64 of the ticket (docs/sealed-format.md, "Migration tickets").
    pub ticket: String,
    /// base64 of the sealed file, sealed durably just now.
    pub sealed: String,
    pub generation: u64,
    /// When the ticket stops opening, Unix seconds.
    pub expires: u64,
}

/// `GetMetrics`' reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReply {
    /// The exposition text.
    pub text: String,
    /// Its HTTP content type (what a scraper would be told).
    pub content_type: String,
}

/// `GetHostKey`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeyReply {
    /// Standard base64 (RFC 4648, padded) of the 32-byte X25519 public key.
    pub public_key: String,
    /// Hex of the first 16 bytes of SHA-256(public key).
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReply {
    pub guest: GuestView,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    pub guests: Vec<GuestView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorReply {
    pub event: String,
    pub guest: GuestView,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reseal_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start: Option<StartTimingsView>,
}

/// `StartTimings` of the interface, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StartTimingsView {
    pub queued_ms: f64,
    pub kdf_ms: f64,
    pub unseal_ms: f64,
    pub spawn_ms: f64,
    pub ready_ms: f64,
    pub total_ms: f64,
}

/// The errors of `io.vtpmd.Manager`, each with the parameters the
/// interface description gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ManagerError {
    NoSuchGuest {
        guest: String,
    },
    GuestExists {
        guest: String,
    },
    GuestRunning {
        guest: String,
        state: String,
    },
    GuestNotRunning {
        guest: String,
        state: String,
    },
    InvalidTpmSpec {
        reason: String,
    },
    WrongPassphrase {
        guest: String,
    },
    StateCorrupt {
        guest: String,
        reason: String,
    },
    GuestMismatch {
        guest: String,
        found: String,
    },
    SwtpmFailed {
        guest: String,
        message: String,
        log_tail: Vec<String>,
    },
    StaleGeneration {
        guest: String,
        generation: u64,
        current: u64,
    },
    OwnedElsewhere {
        guest: String,
        owner: String,
    },
    ClusterUnavailable {
        guest: String,
        reason: String,
    },
    NotInClusterMode {
        reason: String,
    },
    UnsealedWrites {
        guest: String,
        reason: String,
    },
    SealedTooLarge {
        guest: String,
        size: u64,
        limit: u64,
    },
    PermissionDenied {
        method: String,
    },
    Busy {
        guest: String,
    },
    Internal {
        reason: String,
    },
    TooManyConnections {
        scope: String,
        limit: u64,
    },
    MigratedOut {
        guest: String,
    },
    MigrationRefused {
        guest: String,
        reason: String,
    },
    WrongKey {
        guest: String,
        kind: String,
    },
    NoKeyslot {
        guest: String,
        kind: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        host_fingerprint: Option<String>,
    },
    LastKeyslot {
        guest: String,
        slot: u64,
    },
    NoSuchKeyslot {
        guest: String,
        slot: u64,
    },
    KeyslotsFull {
        guest: String,
        max: u64,
    },
}

impl ManagerError {
    pub fn name(&self) -> &'static str {
        match self {
            Self::NoSuchGuest { .. } => "io.vtpmd.Manager.NoSuchGuest",
            Self::GuestExists { .. } => "io.vtpmd.Manager.GuestExists",
            Self::GuestRunning { .. } => "io.vtpmd.Manager.GuestRunning",
            Self::GuestNotRunning { .. } => "io.vtpmd.Manager.GuestNotRunning",
            Self::InvalidTpmSpec { .. } => "io.vtpmd.Manager.InvalidTpmSpec",
            Self::WrongPassphrase { .. } => "io.vtpmd.Manager.WrongPassphrase",
            Self::StateCorrupt { .. } => "io.vtpmd.Manager.StateCorrupt",
            Self::GuestMismatch { .. } => "io.vtpmd.Manager.GuestMismatch",
            Self::SwtpmFailed { .. } => "io.vtpmd.Manager.SwtpmFailed",
            Self::StaleGeneration { .. } => "io.vtpmd.Manager.StaleGeneration",
            Self::OwnedElsewhere { .. } => "io.vtpmd.Manager.OwnedElsewhere",
            Self::ClusterUnavailable { .. } => "io.vtpmd.Manager.ClusterUnavailable",
            Self::NotInClusterMode { .. } => "io.vtpmd.Manager.NotInClusterMode",
            Self::UnsealedWrites { .. } => "io.vtpmd.Manager.UnsealedWrites",
            Self::SealedTooLarge { .. } => "io.vtpmd.Manager.SealedTooLarge",
            Self::PermissionDenied { .. } => "io.vtpmd.Manager.PermissionDenied",
            Self::Busy { .. } => "io.vtpmd.Manager.Busy",
            Self::Internal { .. } => "io.vtpmd.Manager.Internal",
            Self::TooManyConnections { .. } => "io.vtpmd.Manager.TooManyConnections",
            Self::MigratedOut { .. } => "io.vtpmd.Manager.MigratedOut",
            Self::MigrationRefused { .. } => "io.vtpmd.Manager.MigrationRefused",
            Self::WrongKey { .. } => "io.vtpmd.Manager.WrongKey",
            Self::NoKeyslot { .. } => "io.vtpmd.Manager.NoKeyslot",
            Self::LastKeyslot { .. } => "io.vtpmd.Manager.LastKeyslot",
            Self::NoSuchKeyslot { .. } => "io.vtpmd.Manager.NoSuchKeyslot",
            Self::KeyslotsFull { .. } => "io.vtpmd.Manager.KeyslotsFull",
        }
    }

    /// The NUL-terminated error reply.
    pub fn encode(&self) -> Vec<u8> {
        super::varlink::encode_error(self.name(), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";

    fn parse(member: &str, json: &str) -> Result<Request<'static>, RequestError> {
        let leaked: &'static str = Box::leak(json.to_owned().into_boxed_str());
        parse_request(member, leaked)
    }

    fn invalid(parameter: &str) -> Result<(), RequestError> {
        Err(RequestError::InvalidParameter {
            parameter: parameter.to_owned(),
        })
    }

    /// Parameters that are not an object are refused as "parameters",
    /// whatever the value holds: serde's message quotes the value, and a
    /// backtick in it must not become a field name (found by fuzzing: a
    /// string of backticks was reported as parameter ""); an array of the
    /// fields in order is not an object either.
    #[test]
    fn parameters_that_are_not_an_object_are_named_as_such_never_by_their_value() {
        for (member, json) in [
            ("Revoke", r#""``````J""#),
            ("Status", r#""`guest`""#),
            ("Start", r#""a `passphrase` here""#),
            ("List", r#""`x`""#),
            ("Status", "[\"`guest`\"]"),
            ("Status", "17"),
            ("Status", &format!(r#"["{GUEST}"]"#)),
            ("List", "[]"),
        ] {
            assert_eq!(
                parse(member, json).map(drop),
                invalid("parameters"),
                "{member} {json}"
            );
        }
        // A missing or unknown field is still named by serde's quote.
        assert_eq!(parse("Status", "{}").map(drop), invalid("guest"));
        assert_eq!(parse("List", r#"{"x":1}"#).map(drop), invalid("x"));
    }

    #[test]
    fn every_method_parses_its_parameters() {
        let g = format!(r#"{{"guest":"{GUEST}"}}"#);
        assert!(matches!(
            parse("GetCapabilities", "{}"),
            Ok(Request::GetCapabilities)
        ));
        assert!(matches!(parse("List", "{}"), Ok(Request::List)));
        assert!(matches!(parse("GetHostKey", "{}"), Ok(Request::GetHostKey)));
        assert!(matches!(
            parse("GetMetrics", "{}"),
            Ok(Request::GetMetrics { openmetrics: false })
        ));
        assert!(matches!(
            parse("GetMetrics", r#"{"format": "openmetrics"}"#),
            Ok(Request::GetMetrics { openmetrics: true })
        ));
        assert!(parse("GetMetrics", r#"{"format": "json"}"#).is_err());
        assert!(matches!(parse("Drain", "{}"), Ok(Request::Drain)));
        assert!(matches!(parse("Monitor", "{}"), Ok(Request::Monitor)));
        assert!(matches!(parse("Status", &g), Ok(Request::Status { .. })));
        assert!(matches!(parse("Stop", &g), Ok(Request::Stop { .. })));
        assert!(matches!(parse("Delete", &g), Ok(Request::Delete { .. })));
        assert!(matches!(parse("Export", &g), Ok(Request::Export { .. })));
        let import = format!(r#"{{"guest":"{GUEST}","sealed":"VlRQTVNFQUw="}}"#);
        match parse("Import", &import).unwrap() {
            Request::Import { sealed, .. } => assert_eq!(sealed, b"VTPMSEAL"),
            other => panic!("{other:?}"),
        }
        // An escaped `/` is JSON, not damage.
        let escaped = format!(r#"{{"guest":"{GUEST}","sealed":"\/w=="}}"#);
        match parse("Import", &escaped).unwrap() {
            Request::Import { sealed, .. } => assert_eq!(sealed, [0xff]),
            other => panic!("{other:?}"),
        }
        let start = format!(r#"{{"guest":"{GUEST}","passphrase":"cGFzcw=="}}"#);
        match parse("Start", &start).unwrap() {
            Request::Start {
                secret: Secret::Passphrase(passphrase),
                ..
            } => assert_eq!(passphrase.base64(), b"cGFzcw=="),
            other => panic!("{other:?}"),
        }
        let key = "A".repeat(43) + "=";
        let with_key = format!(r#"{{"guest":"{GUEST}","key":"{key}"}}"#);
        assert!(matches!(
            parse("Start", &with_key),
            Ok(Request::Start {
                secret: Secret::Key(_),
                ..
            })
        ));
        assert!(matches!(
            parse("Start", &g),
            Ok(Request::Start {
                secret: Secret::None,
                ..
            })
        ));
        let both = format!(r#"{{"guest":"{GUEST}","key":"{key}","passphrase":"cGFzcw=="}}"#);
        assert_eq!(parse("Start", &both).map(|_| ()), invalid("key"));
        let short = format!(r#"{{"guest":"{GUEST}","key":"cGFzcw=="}}"#);
        assert_eq!(parse("Start", &short).map(|_| ()), invalid("key"));
        let grant =
            format!(r#"{{"guest":"{GUEST}","passphrase":"cGFzcw==","host_public_key":"{key}"}}"#);
        assert!(matches!(parse("Grant", &grant), Ok(Request::Grant { .. })));
        let grant_nothing = format!(r#"{{"guest":"{GUEST}","host_public_key":"{key}"}}"#);
        assert_eq!(
            parse("Grant", &grant_nothing).map(|_| ()),
            invalid("passphrase")
        );
        let grant_bad =
            format!(r#"{{"guest":"{GUEST}","passphrase":"cGFzcw==","host_public_key":"abc"}}"#);
        assert_eq!(
            parse("Grant", &grant_bad).map(|_| ()),
            invalid("host_public_key")
        );
        let revoke = format!(r#"{{"guest":"{GUEST}","slot":1}}"#);
        assert!(matches!(
            parse("Revoke", &revoke),
            Ok(Request::Revoke { slot: 1, .. })
        ));
        let revoke_far = format!(r#"{{"guest":"{GUEST}","slot":8}}"#);
        assert_eq!(parse("Revoke", &revoke_far).map(|_| ()), invalid("slot"));
        let deployment = format!(
            r#"{{"guest":"{GUEST}","version":"2.0","passphrase":"cGFzcw==","policy":"deployment","key":"{key}"}}"#
        );
        assert!(matches!(
            parse("Create", &deployment),
            Ok(Request::Create {
                policy: Policy::Deployment,
                key: Some(_),
                ..
            })
        ));
        let no_key = format!(
            r#"{{"guest":"{GUEST}","version":"2.0","passphrase":"cGFzcw==","policy":"deployment"}}"#
        );
        assert_eq!(parse("Create", &no_key).map(|_| ()), invalid("key"));
        let bad_policy = format!(
            r#"{{"guest":"{GUEST}","version":"2.0","passphrase":"cGFzcw==","policy":"admin"}}"#
        );
        assert_eq!(parse("Create", &bad_policy).map(|_| ()), invalid("policy"));
        let rekey =
            format!(r#"{{"guest":"{GUEST}","passphrase":"cGFzcw==","new_passphrase":"bmV3"}}"#);
        assert!(matches!(parse("Rekey", &rekey), Ok(Request::Rekey { .. })));
        let create = format!(
            r#"{{"guest":"{GUEST}","version":"2.0","model":"tpm-crb","passphrase":"cGFzcw=="}}"#
        );
        match parse("Create", &create).unwrap() {
            Request::Create {
                spec,
                ek_certificate,
                ..
            } => {
                assert_eq!(
                    (spec.version(), spec.model()),
                    (TpmVersion::V2_0, TpmModel::Crb)
                );
                assert!(!ek_certificate);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let check = |member: &str, json: &str, field: &str| {
            assert_eq!(
                parse(member, json).map(|_| ()),
                invalid(field),
                "{member} {json}"
            );
        };
        check("Status", r#"{"guest":"../../etc"}"#, "guest");
        check("Status", "{}", "guest");
        check("Status", r#"{"guest":1}"#, "guest");
        check(
            "Status",
            &format!(r#"{{"guest":"{GUEST}","extra":1}}"#),
            "extra",
        );
        check("List", r#"{"x":1}"#, "x");
        check(
            "Import",
            &format!(r#"{{"guest":"{GUEST}","sealed":"not base64!"}}"#),
            "sealed",
        );
        check("Import", &format!(r#"{{"guest":"{GUEST}"}}"#), "sealed");
        check("Import", r#"{"guest":"x","sealed":""}"#, "guest");
        check(
            "Start",
            &format!(r#"{{"guest":"{GUEST}","passphrase":""}}"#),
            "passphrase",
        );
        check(
            "Start",
            &format!(r#"{{"guest":"{GUEST}","passphrase":"not base64!"}}"#),
            "passphrase",
        );
        // An escaped secret is refused, not unescaped.
        check(
            "Start",
            &format!(r#"{{"guest":"{GUEST}","passphrase":"cGFz\u0063w=="}}"#),
            "passphrase",
        );
        check(
            "Start",
            &format!(r#"{{"guest":"{GUEST}","passphrase":1}}"#),
            "passphrase",
        );
        // `?string`: null is absent, which now means this host's key.
        assert!(matches!(
            parse(
                "Start",
                &format!(r#"{{"guest":"{GUEST}","passphrase":null}}"#)
            ),
            Ok(Request::Start {
                secret: Secret::None,
                ..
            })
        ));
        check(
            "Start",
            &format!(r#"{{"guest":"{GUEST}","passphrase":["cGFzcw=="]}}"#),
            "passphrase",
        );
        let huge = "A".repeat(MAX_PASSPHRASE_BASE64 + 4);
        check(
            "Start",
            &format!(r#"{{"guest":"{GUEST}","passphrase":"{huge}"}}"#),
            "passphrase",
        );
    }

    #[test]
    fn a_passphrase_with_any_escape_is_refused_without_being_unescaped() {
        // `\/` is what PHP's json_encode writes for the `/` of base64; the
        // others are every other escape JSON has.
        for escaped in [
            r"Pz8\/cGFzcw==",
            r"Pz8/\/cGFzcw==",
            r"\u0050z8/",
            r"Pz8\\",
            r#"Pz8\"Pz8="#,
            r"Pz8\n",
        ] {
            let start = format!(r#"{{"guest":"{GUEST}","passphrase":"{escaped}"}}"#);
            let rekey_old = format!(
                r#"{{"guest":"{GUEST}","passphrase":"{escaped}","new_passphrase":"bmV3"}}"#
            );
            let rekey_new = format!(
                r#"{{"guest":"{GUEST}","passphrase":"cGFzcw==","new_passphrase":"{escaped}"}}"#
            );
            let create =
                format!(r#"{{"guest":"{GUEST}","version":"2.0","passphrase":"{escaped}"}}"#);
            for (member, json, field) in [
                ("Start", &start, "passphrase"),
                ("Rekey", &rekey_old, "passphrase"),
                ("Rekey", &rekey_new, "new_passphrase"),
                ("Create", &create, "passphrase"),
            ] {
                let err = parse(member, json).map(|_| ()).unwrap_err();
                assert_eq!(
                    err,
                    RequestError::InvalidParameter {
                        parameter: field.to_owned()
                    },
                    "{member} {json}"
                );
                let shown = format!("{err} {err:?}");
                assert!(!shown.contains("z8"), "{shown}");
            }
        }
    }

    #[test]
    fn a_passphrase_is_its_text_as_received() {
        // Whitespace around the value is JSON's, not the passphrase's.
        let start = format!(r#"{{"guest":"{GUEST}","passphrase" :  "Pz8/cGFzcw=="  }}"#);
        match parse("Start", &start).unwrap() {
            Request::Start {
                secret: Secret::Passphrase(passphrase),
                ..
            } => assert_eq!(passphrase.base64(), b"Pz8/cGFzcw=="),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_field_name_with_dots_is_named_whole() {
        let check = |json: &str, field: &str| {
            assert_eq!(parse("Status", json).map(|_| ()), invalid(field), "{json}");
        };
        check(r#"{".guest":"x"}"#, ".guest");
        check(r#"{"a.b":1}"#, "a.b");
        check(&format!(r#"{{"guest":"{GUEST}","x.y":{{"z":1}}}}"#), "x.y");
        check(r#"{"guest":"x","":1}"#, "");
    }

    #[test]
    fn unknown_methods_are_not_found() {
        assert_eq!(
            parse("Explode", "{}").map(|_| ()),
            Err(RequestError::MethodNotFound {
                method: "io.vtpmd.Manager.Explode".into()
            })
        );
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn nova_properties_resolve_to_one_spec() {
        let flavor = map(&[("hw:tpm_version", "2.0"), ("hw:cpu_policy", "dedicated")]);
        let image = map(&[("hw_tpm_model", "tpm-crb")]);
        let spec = resolve_spec(None, None, Some(&flavor), Some(&image)).unwrap();
        assert_eq!(
            (spec.version(), spec.model()),
            (TpmVersion::V2_0, TpmModel::Crb)
        );
        let spec = resolve_spec(Some("1.2"), None, None, None).unwrap();
        assert_eq!(spec.model(), TpmModel::Tis, "tpm-tis is the default");
    }

    #[test]
    fn conflicting_missing_or_impossible_specs_are_refused() {
        let flavor = map(&[("hw:tpm_version", "2.0")]);
        let image = map(&[("hw_tpm_version", "1.2")]);
        let conflict = resolve_spec(None, None, Some(&flavor), Some(&image)).unwrap_err();
        assert!(
            conflict.contains("hw:tpm_version=2.0") && conflict.contains("hw_tpm_version=1.2"),
            "{conflict}"
        );
        assert!(resolve_spec(None, Some("tpm-tis"), None, None).is_err());
        assert!(
            resolve_spec(Some("1.2"), Some("tpm-crb"), None, None)
                .unwrap_err()
                .contains("2.0")
        );
        assert!(resolve_spec(Some("3.0"), None, None, None).is_err());
        assert!(resolve_spec(Some("2.0"), Some("tpm-spapr"), None, None).is_err());
        let create = format!(
            r#"{{"guest":"{GUEST}","version":"1.2","model":"tpm-crb","passphrase":"cGFzcw=="}}"#
        );
        assert!(matches!(
            parse("Create", &create),
            Err(RequestError::InvalidTpmSpec { .. })
        ));
    }

    #[test]
    fn errors_carry_their_interface_name_and_parameters() {
        let e = ManagerError::GuestRunning {
            guest: GUEST.into(),
            state: "running".into(),
        };
        let bytes = e.encode();
        let v: serde_json::Value = serde_json::from_slice(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(v["error"], "io.vtpmd.Manager.GuestRunning");
        assert_eq!(v["parameters"]["state"], "running");
    }

    #[test]
    fn the_interface_description_names_every_method_and_error() {
        for name in [
            "GetCapabilities",
            "Create",
            "Start",
            "Stop",
            "Status",
            "List",
            "Drain",
            "Delete",
            "Rekey",
            "Export",
            "Import",
            "Monitor",
            "GetHostKey",
            "GetMetrics",
            "Grant",
            "Revoke",
        ] {
            assert!(
                INTERFACE_DESCRIPTION.contains(&format!("method {name}(")),
                "{name}"
            );
        }
        for name in [
            "NoSuchGuest",
            "GuestExists",
            "GuestRunning",
            "GuestNotRunning",
            "InvalidTpmSpec",
            "WrongPassphrase",
            "StateCorrupt",
            "GuestMismatch",
            "SwtpmFailed",
            "StaleGeneration",
            "UnsealedWrites",
            "SealedTooLarge",
            "PermissionDenied",
            "Busy",
            "Internal",
            "TooManyConnections",
            "WrongKey",
            "NoKeyslot",
            "LastKeyslot",
            "NoSuchKeyslot",
            "KeyslotsFull",
        ] {
            assert!(
                INTERFACE_DESCRIPTION.contains(&format!("error {name} (")),
                "{name}"
            );
        }
    }
}
