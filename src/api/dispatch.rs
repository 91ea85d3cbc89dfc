//! One validated request → one supervisor action → one reply. The only
//! place that maps the supervisor's errors to the wire.

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::manager::{
    CapabilitiesReply, ExportReply, GuestReply, GuestView, HostKeyReply, KeyslotView, ListReply,
    ManagerError, MetricsReply, MigrateOutReply, MonitorReply, Passphrase, Policy, Request, Secret,
    StartTimingsView,
};
use crate::protocol::varlink::{ServiceError, encode_reply};
use crate::secret::{SecretBuf, SecretError};
use crate::supervisor::{
    CreatePolicy, Event, EventKind, GuestInfo, Supervisor, SupervisorError, Unlock,
};
use crate::vault::{HostPublicKey, KEY_LEN, MAX_PASSPHRASE_LEN, SlotSummary};
use base64ct::{Base64, Encoding};

use super::{Limits, LogGate};

/// How long a Drain may take before its caller gets `Busy` (the drain
/// itself goes on to the end).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs a request that is not Monitor. Operations run in their own task:
/// a client that goes away or times out never cancels one halfway. `log`
/// says whether a refusal may be logged (a caller other than an admin can
/// make Status fail as often as it likes).
pub(super) async fn run(
    supervisor: &Arc<Supervisor>,
    request: Request<'_>,
    limits: &Limits,
    log: LogGate<'_>,
) -> Vec<u8> {
    let timeout = limits.request;
    let guest_reply = |result| guest_reply(result, log);
    let empty_reply = |result| empty_reply(result, log);
    match request {
        Request::GetCapabilities => {
            let caps = supervisor.capabilities();
            encode_reply(
                &CapabilitiesReply {
                    versions: caps
                        .versions
                        .iter()
                        .map(|v| v.as_str().to_owned())
                        .collect(),
                    models: caps.models.iter().map(|m| m.as_str().to_owned()).collect(),
                    traits: caps.traits.clone(),
                    swtpm_version: caps.swtpm_version.clone(),
                    max_sealed_bytes: Some(wide(limits.max_sealed)),
                },
                false,
            )
        }
        Request::GetHostKey => {
            let public = supervisor.host_public_key();
            encode_reply(
                &HostKeyReply {
                    public_key: public.to_base64(),
                    fingerprint: public.fingerprint_hex(),
                },
                false,
            )
        }
        Request::GetMetrics { openmetrics } => {
            let format = if openmetrics {
                crate::metrics::Format::OpenMetrics
            } else {
                crate::metrics::Format::Prometheus
            };
            encode_reply(
                &MetricsReply {
                    text: supervisor.render_metrics(format),
                    content_type: format.content_type().to_owned(),
                },
                false,
            )
        }
        Request::Status { guest } => guest_reply(supervisor.status(guest)),
        Request::List => encode_reply(
            &ListReply {
                guests: supervisor.list().iter().map(view).collect(),
            },
            false,
        ),
        Request::Create {
            guest,
            spec,
            passphrase,
            ek_certificate,
            policy,
            key,
        } => {
            let passphrase = match decode(passphrase, "passphrase") {
                Ok(p) => p,
                Err(reply) => return reply,
            };
            let slots = match (policy, key) {
                (Policy::Deployment, Some(key)) => match decode_key(key) {
                    Ok(key) => CreatePolicy::Deployment(key),
                    Err(reply) => return reply,
                },
                (Policy::Host, _) => CreatePolicy::Host,
                // The protocol pairs a key with Deployment and nothing else.
                (Policy::User | Policy::Deployment, _) => CreatePolicy::User,
            };
            let sup = Arc::clone(supervisor);
            detached(timeout, async move {
                sup.create_with_policy(guest, spec, passphrase, slots, ek_certificate)
                    .await
            })
            .await
            .map_or_else(|reply| reply, guest_reply)
        }
        Request::Start { guest, secret } => {
            let unlock = match unlock(secret) {
                Ok(u) => u,
                Err(reply) => return reply,
            };
            let sup = Arc::clone(supervisor);
            detached(
                timeout,
                async move { sup.start_guest_with(guest, unlock).await },
            )
            .await
            .map_or_else(|reply| reply, guest_reply)
        }
        Request::Evacuate { guest, secret } => {
            let unlock = match unlock(secret) {
                Ok(u) => u,
                Err(reply) => return reply,
            };
            let sup = Arc::clone(supervisor);
            detached(timeout, async move { sup.evacuate(guest, unlock).await })
                .await
                .map_or_else(|reply| reply, guest_reply)
        }
        Request::Grant {
            guest,
            secret,
            host_public_key,
        } => {
            let Ok(host) = HostPublicKey::parse_base64(host_public_key) else {
                return ServiceError::InvalidParameter {
                    parameter: "host_public_key".to_owned(),
                }
                .encode();
            };
            let unlock = match unlock(secret) {
                Ok(u) => u,
                Err(reply) => return reply,
            };
            let sup = Arc::clone(supervisor);
            detached(timeout, async move { sup.grant(guest, unlock, host).await })
                .await
                .map_or_else(|reply| reply, |result| keyslots_reply(result, log))
        }
        Request::Revoke {
            guest,
            slot,
            secret,
        } => {
            let unlock = match unlock(secret) {
                Ok(u) => u,
                Err(reply) => return reply,
            };
            let sup = Arc::clone(supervisor);
            detached(
                timeout,
                async move { sup.revoke(guest, unlock, slot).await },
            )
            .await
            .map_or_else(|reply| reply, |result| keyslots_reply(result, log))
        }
        Request::Stop { guest } => {
            let sup = Arc::clone(supervisor);
            detached(timeout, async move { sup.stop_guest(guest).await })
                .await
                .map_or_else(|reply| reply, guest_reply)
        }
        Request::Drain => {
            let sup = Arc::clone(supervisor);
            // Every guest's final reseal and stop: longer than one call's
            // timeout on a full host, and it completes regardless.
            detached(timeout.max(DRAIN_TIMEOUT), async move { sup.drain().await })
                .await
                .map_or_else(
                    |reply| reply,
                    |stopped| match stopped {
                        Ok(stopped) => encode_reply(
                            &ListReply {
                                guests: stopped.iter().map(view).collect(),
                            },
                            false,
                        ),
                        Err(e) => error(&e, log),
                    },
                )
        }
        Request::MigrateOut {
            guest,
            destination,
            ttl_seconds,
        } => {
            let Ok(destination) = crate::vault::HostPublicKey::parse_base64(destination) else {
                return invalid("destination");
            };
            let ttl =
                ttl_seconds.map_or(crate::supervisor::DEFAULT_TICKET_TTL, Duration::from_secs);
            let sup = Arc::clone(supervisor);
            detached(timeout, async move {
                sup.migrate_out(guest, destination, ttl).await
            })
            .await
            .map_or_else(
                |reply| reply,
                |result| match result {
                    Ok(out) => encode_reply(
                        &MigrateOutReply {
                            ticket: Base64::encode_string(&out.ticket),
                            sealed: Base64::encode_string(&out.sealed),
                            generation: out.generation,
                            expires: out
                                .expires
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                        },
                        false,
                    ),
                    Err(e) => error(&e, log),
                },
            )
        }
        Request::MigrateIn {
            guest,
            ticket,
            sealed,
        } => {
            let Ok(ticket) = Base64::decode_vec(ticket) else {
                return invalid("ticket");
            };
            let Ok(sealed) = Base64::decode_vec(sealed) else {
                return invalid("sealed");
            };
            let sup = Arc::clone(supervisor);
            detached(timeout, async move {
                sup.migrate_in(guest, ticket, sealed).await
            })
            .await
            .map_or_else(|reply| reply, guest_reply)
        }
        Request::AbortMigration { guest } => {
            let sup = Arc::clone(supervisor);
            detached(timeout, async move { sup.abort_migration(guest).await })
                .await
                .map_or_else(|reply| reply, guest_reply)
        }
        Request::Delete { guest } => {
            let sup = Arc::clone(supervisor);
            detached(timeout, async move { sup.delete(guest).await })
                .await
                .map_or_else(|reply| reply, empty_reply)
        }
        Request::Rekey {
            guest,
            passphrase,
            new_passphrase,
        } => {
            let (old, new) = match (
                decode(passphrase, "passphrase"),
                decode(new_passphrase, "new_passphrase"),
            ) {
                (Ok(old), Ok(new)) => (old, new),
                (Err(reply), _) | (_, Err(reply)) => return reply,
            };
            let sup = Arc::clone(supervisor);
            detached(timeout, async move { sup.rekey(guest, old, new).await })
                .await
                .map_or_else(|reply| reply, |result| rekey_reply(result, log))
        }
        Request::Export { guest } => {
            let sup = Arc::clone(supervisor);
            let limit = limits.max_sealed;
            detached(timeout, async move { sup.export(guest).await })
                .await
                .map_or_else(
                    |reply| reply,
                    |exported| match exported {
                        // Refused here rather than in the supervisor: the
                        // limit is the wire's, not the state's. A reseal
                        // for it changed nothing the guest would notice.
                        Ok(e) if e.sealed.len() > limit => {
                            too_large(guest, e.sealed.len(), limit, log)
                        }
                        Ok(e) => encode_reply(&ExportReply::new(&e.sealed, e.generation), false),
                        Err(e) => error(&e, log),
                    },
                )
        }
        Request::Import { guest, sealed } => {
            if sealed.len() > limits.max_sealed {
                return too_large(guest, sealed.len(), limits.max_sealed, log);
            }
            let sup = Arc::clone(supervisor);
            detached(timeout, async move { sup.import(guest, sealed).await })
                .await
                .map_or_else(|reply| reply, guest_reply)
        }
        Request::Monitor => ServiceError::ExpectedMore.encode(),
    }
}

fn wide(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn too_large(
    guest: crate::protocol::GuestId,
    size: usize,
    limit: usize,
    log: LogGate<'_>,
) -> Vec<u8> {
    if log.allows(tracing::enabled!(tracing::Level::INFO)) {
        tracing::info!(%guest, size, limit, "sealed file above max_sealed_bytes refused");
    }
    ManagerError::SealedTooLarge {
        guest: guest.to_string(),
        size: wide(size),
        limit: wide(limit),
    }
    .encode()
}

/// Base64 text (still in the locked receive buffer) → locked memory.
fn decode(passphrase: Passphrase<'_>, parameter: &str) -> Result<SecretBuf, Vec<u8>> {
    SecretBuf::from_base64(passphrase.base64(), MAX_PASSPHRASE_LEN)
        .map_err(|e| decode_error(&e, parameter))
}

/// A key's base64 (already shaped as 32 bytes' worth) → locked memory.
fn decode_key(key: Passphrase<'_>) -> Result<SecretBuf, Vec<u8>> {
    let buf = SecretBuf::from_base64(key.base64(), KEY_LEN).map_err(|e| decode_error(&e, "key"))?;
    if buf.len() != KEY_LEN {
        return Err(ServiceError::InvalidParameter {
            parameter: "key".to_owned(),
        }
        .encode());
    }
    Ok(buf)
}

/// The call's secret as the supervisor takes it.
fn unlock(secret: Secret<'_>) -> Result<Unlock, Vec<u8>> {
    Ok(match secret {
        Secret::Passphrase(p) => Unlock::Passphrase(decode(p, "passphrase")?),
        Secret::Key(k) => Unlock::Key(decode_key(k)?),
        Secret::None => Unlock::ThisHost,
    })
}

/// Grant's and Revoke's reply: the slot concerned and the keyslots now.
fn keyslots_reply(
    result: Result<(usize, Vec<SlotSummary>), SupervisorError>,
    log: LogGate<'_>,
) -> Vec<u8> {
    match result {
        Err(e) => error(&e, log),
        Ok((slot, keyslots)) => encode_reply(
            &serde_json::json!({ "slot": slot, "keyslots": keyslot_views(&keyslots) }),
            false,
        ),
    }
}

fn keyslot_views(keyslots: &[SlotSummary]) -> Vec<KeyslotView> {
    keyslots
        .iter()
        .map(|s| KeyslotView {
            index: s.index as u64,
            kind: s.kind.as_str().to_owned(),
            host_fingerprint: s.host_fingerprint.clone(),
        })
        .collect()
}

/// A bad passphrase is the caller's fault; no locked memory left for it is
/// the host's (RLIMIT_MEMLOCK too small for the calls and guests at hand),
/// and the caller must not be told its passphrase was wrong.
fn decode_error(e: &SecretError, parameter: &str) -> Vec<u8> {
    match e {
        SecretError::Lock { .. } | SecretError::Map { .. } => {
            tracing::error!(parameter, "no locked memory for a passphrase: {e}");
            ManagerError::Internal {
                reason: e.to_string(),
            }
            .encode()
        }
        _ => ServiceError::InvalidParameter {
            parameter: parameter.to_owned(),
        }
        .encode(),
    }
}

/// Runs `op` on its own task and waits up to `timeout` for it; the error
/// is the reply to send instead.
async fn detached<T: Send + 'static>(
    timeout: Duration,
    op: impl Future<Output = T> + Send + 'static,
) -> Result<T, Vec<u8>> {
    let task = tokio::spawn(op);
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(join)) => Err(ManagerError::Internal {
            reason: format!("the operation's task failed: {join}"),
        }
        .encode()),
        Err(_) => Err(ManagerError::Internal {
            reason: format!(
                "no answer within {} s; the operation goes on",
                timeout.as_secs()
            ),
        }
        .encode()),
    }
}

fn guest_reply(result: Result<GuestInfo, SupervisorError>, log: LogGate<'_>) -> Vec<u8> {
    result.map_or_else(|e| error(&e, log), |info| guest_ok(&info))
}

fn guest_ok(info: &GuestInfo) -> Vec<u8> {
    encode_reply(&GuestReply { guest: view(info) }, false)
}

fn empty_reply(result: Result<(), SupervisorError>, log: LogGate<'_>) -> Vec<u8> {
    result.map_or_else(
        |e| error(&e, log),
        |()| encode_reply(&serde_json::json!({}), false),
    )
}

/// `left_as_is` only when a file was (the field is optional).
fn rekey_reply(result: Result<Vec<String>, SupervisorError>, log: LogGate<'_>) -> Vec<u8> {
    match result {
        Err(e) => error(&e, log),
        Ok(left) if left.is_empty() => encode_reply(&serde_json::json!({}), false),
        Ok(left) => encode_reply(&serde_json::json!({ "left_as_is": left }), false),
    }
}

/// The wire form of a guest.
pub fn view(info: &GuestInfo) -> GuestView {
    GuestView {
        guest: info.guest.to_string(),
        version: info.spec.version().as_str().to_owned(),
        model: info.spec.model().as_str().to_owned(),
        state: info.state.as_str().to_owned(),
        pid: info.pid,
        ctrl_socket: info.ctrl_socket.as_ref().map(|p| p.display().to_string()),
        generation: info.generation,
        failure: info.failure.clone(),
        reason: info.reason.clone(),
        keyslots: (!info.keyslots.is_empty()).then(|| keyslot_views(&info.keyslots)),
        replication: info
            .replication
            .as_ref()
            .map(|r| crate::protocol::manager::ReplicationView {
                generation: r.generation,
                pending: r.pending,
                error: r.error.clone(),
            }),
    }
}

/// The wire form of an event: the guest as it is after it, and what
/// the event measured.
pub fn event_reply(event: &Event) -> MonitorReply {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (reseal_ms, start) = match event.kind {
        EventKind::Resealed { latency } => (Some(ms(latency)), None),
        EventKind::Running { start: Some(t) } => (
            None,
            Some(StartTimingsView {
                queued_ms: ms(t.queued),
                kdf_ms: ms(t.kdf),
                unseal_ms: ms(t.unseal),
                spawn_ms: ms(t.spawn),
                ready_ms: ms(t.ready),
                total_ms: ms(t.total),
            }),
        ),
        _ => (None, None),
    };
    MonitorReply {
        event: event.kind.as_str().to_owned(),
        guest: view(&event.guest),
        detail: event.detail.clone(),
        reseal_ms,
        start,
    }
}

/// The one mapping from supervisor errors to Varlink errors.
fn error(e: &SupervisorError, log: LogGate<'_>) -> Vec<u8> {
    if log.allows(tracing::enabled!(tracing::Level::INFO)) {
        tracing::info!(error = %crate::error_chain::chain(e), "call refused or failed");
    }
    wire_error(e).encode()
}

fn wire_error(e: &SupervisorError) -> ManagerError {
    use SupervisorError as S;
    match e {
        S::NoSuchGuest { guest } => ManagerError::NoSuchGuest {
            guest: guest.to_string(),
        },
        S::GuestExists { guest } => ManagerError::GuestExists {
            guest: guest.to_string(),
        },
        S::GuestRunning { guest, state } => ManagerError::GuestRunning {
            guest: guest.to_string(),
            state: state.as_str().to_owned(),
        },
        S::GuestNotRunning { guest, state } => ManagerError::GuestNotRunning {
            guest: guest.to_string(),
            state: state.as_str().to_owned(),
        },
        // Only the transitional states refuse this way: another operation
        // is under way.
        S::NotAllowed { guest, .. } => ManagerError::Busy {
            guest: guest.to_string(),
        },
        S::Busy { guest } => ManagerError::Busy {
            guest: guest.to_string(),
        },
        S::ShuttingDown => ManagerError::Busy {
            guest: String::new(),
        },
        S::WrongPassphrase { guest } => ManagerError::WrongPassphrase {
            guest: guest.to_string(),
        },
        S::MigratedOut { guest } => ManagerError::MigratedOut {
            guest: guest.to_string(),
        },
        S::Ticket { guest, source } => ManagerError::MigrationRefused {
            guest: guest.to_string(),
            reason: source.to_string(),
        },
        S::Migration { guest, why } => ManagerError::MigrationRefused {
            guest: guest.to_string(),
            reason: why.clone(),
        },
        S::WrongKey { guest, kind } => ManagerError::WrongKey {
            guest: guest.to_string(),
            kind: kind.as_str().to_owned(),
        },
        S::NoKeyslot {
            guest,
            kind,
            for_host,
        } => ManagerError::NoKeyslot {
            guest: guest.to_string(),
            kind: kind.as_str().to_owned(),
            host_fingerprint: for_host.clone(),
        },
        S::LastKeyslot { guest, index } => ManagerError::LastKeyslot {
            guest: guest.to_string(),
            slot: *index as u64,
        },
        S::NoSuchKeyslot { guest, index } => ManagerError::NoSuchKeyslot {
            guest: guest.to_string(),
            slot: *index as u64,
        },
        S::KeyslotsFull { guest, max } => ManagerError::KeyslotsFull {
            guest: guest.to_string(),
            max: *max as u64,
        },
        S::StateCorrupt { guest, what } => ManagerError::StateCorrupt {
            guest: guest.to_string(),
            reason: what.clone(),
        },
        S::GuestMismatch { guest, found } => ManagerError::GuestMismatch {
            guest: guest.to_string(),
            found: found.to_string(),
        },
        S::SwtpmFailed {
            guest,
            message,
            log_tail,
        } => ManagerError::SwtpmFailed {
            guest: guest.to_string(),
            message: message.clone(),
            log_tail: log_tail.clone(),
        },
        S::StaleGeneration {
            guest,
            generation,
            current,
        }
        | S::RolledBack {
            guest,
            generation,
            current,
        } => ManagerError::StaleGeneration {
            guest: guest.to_string(),
            generation: *generation,
            current: *current,
        },
        S::OwnedElsewhere { guest, owner } => ManagerError::OwnedElsewhere {
            guest: guest.to_string(),
            owner: owner.clone(),
        },
        S::ClusterUnavailable { guest, source } => ManagerError::ClusterUnavailable {
            guest: guest.to_string(),
            reason: crate::error_chain::chain(&**source),
        },
        S::NotInClusterMode { .. } => ManagerError::NotInClusterMode {
            reason: e.to_string(),
        },
        S::UnsealedWrites { guest, reason } => ManagerError::UnsealedWrites {
            guest: guest.to_string(),
            reason: reason.clone(),
        },
        S::UnsupportedTpm { .. } | S::CertificatesUnavailable { .. } => {
            ManagerError::InvalidTpmSpec {
                reason: e.to_string(),
            }
        }
        other => ManagerError::Internal {
            reason: crate::error_chain::chain(other),
        },
    }
}

/// `InvalidParameter` for `parameter`.
fn invalid(parameter: &str) -> Vec<u8> {
    ServiceError::InvalidParameter {
        parameter: parameter.to_owned(),
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes.strip_suffix(&[0]).unwrap_or(bytes)).unwrap()
    }

    #[test]
    fn a_bad_passphrase_is_the_callers_fault() {
        for e in [
            SecretError::InvalidBase64,
            SecretError::TooLong { max: 1024 },
        ] {
            let r = reply(&decode_error(&e, "new_passphrase"));
            assert_eq!(r["error"], "org.varlink.service.InvalidParameter", "{r}");
            assert_eq!(r["parameters"]["parameter"], "new_passphrase");
        }
    }

    #[test]
    fn no_locked_memory_is_the_hosts_and_says_which_limit() {
        let e = SecretError::Lock {
            requested: 32,
            limit: Some(8 << 20),
            source: nix::errno::Errno::EAGAIN,
        };
        let r = reply(&decode_error(&e, "passphrase"));
        assert_eq!(r["error"], "io.vtpmd.Manager.Internal", "{r}");
        assert!(
            r["parameters"]["reason"]
                .as_str()
                .unwrap()
                .contains("RLIMIT_MEMLOCK"),
            "{r}"
        );
    }
}
