//! Wire-level vocabulary shared by the daemon and its clients.
//!
//! Pure: no I/O and nothing else of this crate, so it can be fuzzed and
//! used by `vtpmctl` without pulling in the daemon. Every type here is built
//! only through validation, so code that holds one may trust it (a
//! [`GuestId`] is safe in a path or a swtpm option).

mod guest_id;
pub mod manager;
mod tpm_spec;
pub mod varlink;

pub use guest_id::{GuestId, GuestIdError};
pub use tpm_spec::{TpmModel, TpmSpec, TpmSpecError, TpmVersion};

/// For the fuzzer: one received message (without its NUL) as the daemon
/// decodes it: the Varlink envelope, then, for `io.vtpmd.Manager`, the
/// method's parameters with every field validated. Never panics; returns
/// the passphrases of a valid call, which the caller decodes as the daemon
/// would.
///
/// What holds of a valid call: it names its own method, its guest id is
/// canonical and appears verbatim in the message, and its passphrases are
/// borrowed from the message itself (never copied out of the receive
/// buffer).
#[doc(hidden)]
pub fn fuzz_call(message: &[u8]) -> Vec<manager::Passphrase<'_>> {
    use manager::{Request, RequestError};

    let within = |inner: &[u8]| {
        let outer = message.as_ptr_range();
        let inner = inner.as_ptr_range();
        outer.start <= inner.start && inner.end <= outer.end
    };
    let Ok(call) = varlink::Call::parse(message) else {
        return Vec::new();
    };
    assert!(within(call.method.as_bytes()));
    assert!(within(call.parameters_json().as_bytes()) || call.parameters.is_none());
    let Some((interface, member)) = call.split_method() else {
        return Vec::new();
    };
    if interface != manager::INTERFACE {
        return Vec::new();
    }
    let request = match manager::parse_request(member, call.parameters_json()) {
        Ok(request) => request,
        Err(RequestError::InvalidParameter { parameter }) => {
            // Only a field named "" is named so.
            assert!(!parameter.is_empty() || message.windows(2).any(|w| w == b"\"\""));
            return Vec::new();
        }
        Err(RequestError::MethodNotFound { method }) => {
            assert!(method.ends_with(member));
            return Vec::new();
        }
        Err(RequestError::InvalidTpmSpec { .. }) => {
            assert_eq!(member, "Create");
            return Vec::new();
        }
    };
    assert_eq!(request.method(), member);
    let guest = match &request {
        Request::Create { guest, .. }
        | Request::Start { guest, .. }
        | Request::Evacuate { guest, .. }
        | Request::Stop { guest }
        | Request::Status { guest }
        | Request::Delete { guest }
        | Request::Export { guest }
        | Request::Import { guest, .. }
        | Request::MigrateOut { guest, .. }
        | Request::MigrateIn { guest, .. }
        | Request::AbortMigration { guest }
        | Request::Rekey { guest, .. }
        | Request::Grant { guest, .. }
        | Request::Revoke { guest, .. } => Some(*guest),
        Request::GetCapabilities
        | Request::GetHostKey
        | Request::GetMetrics { .. }
        | Request::List
        | Request::Drain
        | Request::Monitor => None,
    };
    if let Some(guest) = guest {
        let text = guest.to_string();
        assert_eq!(GuestId::parse(&text), Ok(guest));
        assert!(
            message.windows(text.len()).any(|w| w == text.as_bytes()),
            "guest id not verbatim in the message"
        );
    }
    let passphrases = match request {
        Request::Create {
            passphrase, key, ..
        } => std::iter::once(passphrase).chain(key).collect(),
        Request::Start { secret, .. }
        | Request::Grant { secret, .. }
        | Request::Revoke { secret, .. } => secret.base64().into_iter().collect(),
        Request::Rekey {
            passphrase,
            new_passphrase,
            ..
        } => vec![passphrase, new_passphrase],
        _ => Vec::new(),
    };
    for p in &passphrases {
        assert!(within(p.base64()), "a passphrase was copied");
        assert!(!p.base64().is_empty() && p.base64().len() <= manager::MAX_PASSPHRASE_BASE64);
    }
    passphrases
}
