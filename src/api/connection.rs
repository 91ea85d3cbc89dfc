//! One client connection: receive, authorize, dispatch, answer; or stream
//! events for Monitor. Every wait is bounded, so a client that stalls holds
//! only its own connection.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError as EventRecvError;
use tokio::time::timeout;

use crate::protocol::manager::{
    self, INTERFACE, INTERFACE_DESCRIPTION, ManagerError, MonitorReply, RequestError,
};
use crate::protocol::varlink::{Call, SERVICE_INTERFACE, ServiceError, ServiceInfo, encode_reply};

use super::auth::{Access, Peer};
use super::dispatch;
use super::recv::{Receiver, RecvError};
use super::{Context, LogGate};

/// What to do after a message.
enum Next {
    Reply(Vec<u8>),
    /// Reply, then close: the stream can no longer be trusted to be in step.
    Close(Vec<u8>),
    Monitor,
    Silent,
}

/// Serves one admitted connection of `peer`. A caller who may do nothing
/// but introspection gets a fixed lifetime: the idle timeout restarts with
/// every message, so without it a stranger could hold its connections for
/// ever with a GetInfo now and then. Cutting such a connection short
/// interrupts nothing that matters: it never reaches the supervisor.
pub(super) async fn serve(stream: UnixStream, peer: Peer, access: Access, ctx: Arc<Context>) {
    if access == Access::Denied {
        let lifetime = ctx.limits.stranger_lifetime;
        if timeout(lifetime, converse(stream, peer, access, &ctx))
            .await
            .is_err()
        {
            ctx.supervisor.metrics().connection_idle_closed();
            tracing::debug!(
                uid = peer.uid.as_raw(),
                "a stranger's connection reached its lifetime; closing"
            );
        }
    } else {
        converse(stream, peer, access, &ctx).await;
    }
}

async fn converse(mut stream: UnixStream, peer: Peer, access: Access, ctx: &Arc<Context>) {
    let log = LogGate {
        source: super::PeerSource(peer.uid.as_raw()),
        limited: access != Access::Admin,
        limiter: &ctx.log_limit,
    };
    let mut rx = match Receiver::new(ctx.limits.receive_limit(access)) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %crate::error_chain::chain(&e), "no locked memory for a client connection");
            return;
        }
    };
    loop {
        let (call, next) = match timeout(ctx.limits.idle, rx.next(&mut stream)).await {
            Err(_) => {
                ctx.supervisor.metrics().connection_idle_closed();
                tracing::debug!(uid = peer.uid.as_raw(), "client idle too long; closing");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(RecvError::TooLarge { limit })) => {
                if log.allows(tracing::enabled!(tracing::Level::INFO)) {
                    tracing::info!(
                        uid = peer.uid.as_raw(),
                        limit,
                        "client message too large; closing"
                    );
                }
                (ctx.inflight.enter(), Next::Close(invalid("message")))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "client connection ended");
                return;
            }
            Ok(Ok(Some(message))) => {
                let call = ctx.inflight.enter();
                let next = handle(message, access, &peer, ctx, log).await;
                (call, next)
            }
        };
        match next {
            Next::Reply(bytes) => {
                if !send(&mut stream, &bytes, ctx).await {
                    return;
                }
            }
            Next::Close(bytes) => {
                send(&mut stream, &bytes, ctx).await;
                return;
            }
            Next::Monitor => {
                // A stream of events, not a call to wait for.
                drop(call);
                monitor(&mut stream, ctx).await;
                return;
            }
            Next::Silent => {}
        }
        drop(call);
    }
}

pub(super) fn peer_of(stream: &UnixStream) -> Option<Peer> {
    match stream.peer_cred() {
        Ok(cred) => Some(Peer {
            uid: nix::unistd::Uid::from_raw(cred.uid()),
            gid: nix::unistd::Gid::from_raw(cred.gid()),
            pid: cred.pid(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer's credentials; closing");
            None
        }
    }
}

async fn handle(
    message: &[u8],
    access: Access,
    peer: &Peer,
    ctx: &Arc<Context>,
    log: LogGate<'_>,
) -> Next {
    let call = match Call::parse(message) {
        Ok(call) => call,
        Err(e) => {
            if log.allows(tracing::enabled!(tracing::Level::DEBUG)) {
                tracing::debug!(error = %crate::error_chain::chain(&e), "malformed call");
            }
            return Next::Close(invalid("message"));
        }
    };
    // "oneway instructs the server to suppress its reply. The server must
    // adhere to the instruction": with `more` too, and for Monitor (whose
    // every reply would be one), nothing is sent.
    let reply = |bytes| {
        if call.oneway {
            Next::Silent
        } else {
            Next::Reply(bytes)
        }
    };
    // Only the calls that carry a sealed file in (Import, MigrateIn) may use
    // the room an admin's connection has beyond max_message: any other
    // call that long is refused as it would have been on arrival.
    let carries_sealed_file = call.method == format!("{INTERFACE}.Import")
        || call.method == format!("{INTERFACE}.MigrateIn");
    if message.len() >= ctx.limits.max_message && !carries_sealed_file {
        if log.allows(tracing::enabled!(tracing::Level::INFO)) {
            tracing::info!(
                uid = peer.uid.as_raw(),
                limit = ctx.limits.max_message,
                method = call.method,
                "client message too large; closing"
            );
        }
        return Next::Close(invalid("message"));
    }
    // No method of vtpmd hands its connection over to another protocol.
    // Refused, not run, with the error every Varlink client knows, naming
    // the header; the connection stays in Varlink.
    if call.upgrade {
        return reply(invalid("upgrade"));
    }
    let Some((interface, member)) = call.split_method() else {
        return reply(invalid("method"));
    };
    if interface == SERVICE_INTERFACE {
        return reply(service(member, call.parameters_json()));
    }
    if interface != INTERFACE {
        return reply(
            ServiceError::InterfaceNotFound {
                interface: interface.to_owned(),
            }
            .encode(),
        );
    }
    let request = match manager::parse_request(member, call.parameters_json()) {
        Ok(request) => request,
        Err(RequestError::MethodNotFound { method }) => {
            return reply(ServiceError::MethodNotFound { method }.encode());
        }
        Err(RequestError::InvalidParameter { parameter }) => return reply(invalid(&parameter)),
        Err(RequestError::InvalidTpmSpec { reason }) => {
            return reply(ManagerError::InvalidTpmSpec { reason }.encode());
        }
    };
    let allowed = match access {
        Access::Admin => true,
        Access::ReadOnly => request.is_read_only(),
        Access::Denied => false,
    };
    // Every call that changes something is on record; reads are not worth
    // the noise. Within the caller's rate: others than admins can call as
    // often as they like.
    if request.is_read_only() {
        if log.allows(tracing::enabled!(tracing::Level::DEBUG)) {
            tracing::debug!(operation = request.method(), uid = peer.uid.as_raw(), pid = ?peer.pid, allowed, "call");
        }
    } else if log.allows(tracing::enabled!(tracing::Level::INFO)) {
        tracing::info!(operation = request.method(), uid = peer.uid.as_raw(), pid = ?peer.pid, allowed, "call");
    }
    let metrics = ctx.supervisor.metrics();
    if !allowed {
        metrics.api_call(request.method(), "io.vtpmd.Manager.PermissionDenied");
        return reply(
            ManagerError::PermissionDenied {
                method: format!("{INTERFACE}.{}", request.method()),
            }
            .encode(),
        );
    }
    if matches!(request, manager::Request::Monitor) {
        return if call.oneway {
            // Accepted, and nothing to send.
            metrics.api_call("Monitor", "ok");
            Next::Silent
        } else if call.more {
            metrics.api_call("Monitor", "ok");
            Next::Monitor
        } else {
            metrics.api_call("Monitor", "org.varlink.service.ExpectedMore");
            reply(ServiceError::ExpectedMore.encode())
        };
    }
    let method = request.method();
    let answer = dispatch::run(&ctx.supervisor, request, &ctx.limits, log).await;
    metrics.api_call(method, error_name(&answer).unwrap_or("ok"));
    reply(answer)
}

/// The error a reply this module encoded carries, if it is one. A string
/// value's quotes are escaped in JSON, so `"error":"` appears only as the
/// reply's own key (no parameters of this interface have a key `error`).
fn error_name(reply: &[u8]) -> Option<&str> {
    const KEY: &[u8] = br#""error":""#;
    let at = reply.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let len = reply[at..].iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&reply[at..at + len]).ok()
}

/// `org.varlink.service`: introspection, open to every peer.
fn service(member: &str, parameters: &str) -> Vec<u8> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct DescriptionParams {
        interface: String,
    }
    match member {
        "GetInfo" => encode_reply(
            &ServiceInfo {
                vendor: "vtpmd".to_owned(),
                product: "vtpmd".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                url: PRODUCT_URL.to_owned(),
                interfaces: vec![SERVICE_INTERFACE.to_owned(), INTERFACE.to_owned()],
            },
            false,
        ),
        "GetInterfaceDescription" => match serde_json::from_str::<DescriptionParams>(parameters) {
            Ok(p) if p.interface == INTERFACE => encode_reply(
                &serde_json::json!({ "description": INTERFACE_DESCRIPTION }),
                false,
            ),
            Ok(p) if p.interface == SERVICE_INTERFACE => encode_reply(
                &serde_json::json!({ "description": SERVICE_DESCRIPTION }),
                false,
            ),
            Ok(p) => ServiceError::InterfaceNotFound {
                interface: p.interface,
            }
            .encode(),
            Err(_) => invalid("interface"),
        },
        other => ServiceError::MethodNotFound {
            method: format!("{SERVICE_INTERFACE}.{other}"),
        }
        .encode(),
    }
}

/// GetInfo's `url`: the product's (the spec's example has
/// `https://fidget.example.com` for its Fidget Service), from Cargo.toml's
/// `repository`.
const PRODUCT_URL: &str = env!("CARGO_PKG_REPOSITORY");
const _: () = assert!(!PRODUCT_URL.is_empty(), "Cargo.toml needs `repository`");

/// The standard description of `org.varlink.service` (varlink.org).
const SERVICE_DESCRIPTION: &str = "# The Varlink Service Interface is provided by every varlink service.
interface org.varlink.service

method GetInfo() -> (vendor: string, product: string, version: string, url: string, interfaces: []string)

method GetInterfaceDescription(interface: string) -> (description: string)

error InterfaceNotFound (interface: string)
error MethodNotFound (method: string)
error MethodNotImplemented (method: string)
error InvalidParameter (parameter: string)
error PermissionDenied ()
error ExpectedMore ()
";

fn invalid(parameter: &str) -> Vec<u8> {
    ServiceError::InvalidParameter {
        parameter: parameter.to_owned(),
    }
    .encode()
}

/// Writes a reply within the idle timeout; `false` when the client is gone
/// or not reading.
async fn send(stream: &mut UnixStream, bytes: &[u8], ctx: &Context) -> bool {
    matches!(
        timeout(ctx.limits.idle, stream.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Streams the existing guests, then every event, until the client leaves.
async fn monitor(stream: &mut UnixStream, ctx: &Context) {
    // Subscribe first, so no event falls between the snapshot and the stream.
    let mut events = ctx.supervisor.subscribe();
    for info in ctx.supervisor.list() {
        let reply = MonitorReply {
            event: "existing".to_owned(),
            guest: dispatch::view(&info),
            detail: None,
            reseal_ms: None,
            start: None,
        };
        if !send(stream, &encode_reply(&reply, true), ctx).await {
            return;
        }
    }
    let (mut reader, mut writer) = stream.split();
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    let bytes = encode_reply(&dispatch::event_reply(&event), true);
                    if !matches!(timeout(ctx.limits.idle, writer.write_all(&bytes)).await, Ok(Ok(()))) {
                        return;
                    }
                }
                Err(EventRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "a Monitor client fell behind; events were dropped for it");
                }
                Err(EventRecvError::Closed) => return,
            },
            // A streaming connection takes no further calls: input or EOF ends it.
            _ = reader.read(&mut probe) => return,
        }
    }
}
