//! Varlink calls as bytes on the wire. A call that carries a secret is
//! assembled directly in locked memory: the non-secret part is ordinary
//! JSON, the secrets are base64-encoded straight into the locked buffer,
//! and the whole message is written from there with one `write_all`.

use base64ct::{Base64, Encoding};
use secrecy::ExposeSecretMut;
use serde_json::{Map, Value};
use vtpmd::protocol::manager::INTERFACE;
use vtpmd::secret::{SecretBuf, SecretError};

/// `io.vtpmd.Manager.<member>`.
pub fn method(member: &str) -> String {
    format!("{INTERFACE}.{member}")
}

/// A call without secrets, NUL-terminated.
pub fn plain(member: &str, parameters: &Map<String, Value>, more: bool) -> Vec<u8> {
    let mut call = serde_json::json!({
        "method": method(member),
        "parameters": parameters,
    });
    if more {
        call["more"] = Value::Bool(true);
    }
    // A `Value` built from strings always serializes.
    let mut bytes = serde_json::to_vec(&call).unwrap_or_default();
    bytes.push(0);
    bytes
}

/// A call whose parameters are `parameters` plus `secrets` (each sent as
/// standard padded base64 of its bytes), NUL-terminated, built in locked
/// memory of exactly the message's size.
///
/// Secret names must be plain identifiers (they are written unescaped).
pub fn with_secrets(
    member: &str,
    parameters: &Map<String, Value>,
    secrets: &[(&str, &SecretBuf)],
) -> Result<SecretBuf, SecretError> {
    use secrecy::ExposeSecret;

    // `{"method":"…","parameters":` + `{…` (the non-secret parameters
    // without their closing brace).
    let head = format!(
        "{{\"method\":{},\"parameters\":",
        Value::String(method(member))
    );
    let params = Value::Object(parameters.clone()).to_string();
    let open = params.strip_suffix('}').unwrap_or("{");
    let mut pieces_len = head.len() + open.len() + "}}\0".len();
    for (i, (name, secret)) in secrets.iter().enumerate() {
        debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        let comma = usize::from(i > 0 || !parameters.is_empty());
        // ,"name":"<base64>"
        pieces_len += comma + name.len() + 5 + Base64::encoded_len(secret.expose_secret());
    }

    let mut out = SecretBuf::zeroed(pieces_len)?;
    let mut w = Cursor {
        dst: out.expose_secret_mut(),
        at: 0,
    };
    w.put(head.as_bytes());
    w.put(open.as_bytes());
    for (i, (name, secret)) in secrets.iter().enumerate() {
        if i > 0 || !parameters.is_empty() {
            w.put(b",");
        }
        w.put(b"\"");
        w.put(name.as_bytes());
        w.put(b"\":\"");
        w.base64(secret.expose_secret())?;
        w.put(b"\"");
    }
    w.put(b"}}\0");
    debug_assert_eq!(w.at, pieces_len);
    Ok(out)
}

/// Writes pieces one after the other into a buffer sized for all of them.
struct Cursor<'a> {
    dst: &'a mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.dst[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }

    /// Base64 of `secret`, encoded in place (no intermediate copy).
    fn base64(&mut self, secret: &[u8]) -> Result<(), SecretError> {
        let capacity = self.dst.len();
        let written = Base64::encode(secret, &mut self.dst[self.at..])
            .map_err(|_| SecretError::CapacityExceeded { capacity })?
            .len();
        self.at += written;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use vtpmd::protocol::manager::{Request, parse_request};
    use vtpmd::protocol::varlink::Call;
    use vtpmd::protocol::{TpmModel, TpmVersion};

    const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";

    fn secret(bytes: &[u8]) -> SecretBuf {
        let mut buf = SecretBuf::with_capacity(bytes.len()).unwrap();
        buf.extend_from_slice(bytes).unwrap();
        buf
    }

    fn guest_params() -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("guest".into(), GUEST.into());
        m
    }

    fn body(msg: &SecretBuf) -> &[u8] {
        let bytes = msg.expose_secret();
        assert_eq!(bytes.last(), Some(&0), "NUL-terminated");
        assert_eq!(bytes.iter().filter(|&&b| b == 0).count(), 1, "one NUL only");
        &bytes[..bytes.len() - 1]
    }

    #[test]
    fn start_is_parsed_by_the_daemon_into_the_right_request() {
        let pass = secret(b"correct horse \"battery\" \\ staple\n\x00\xff");
        let msg = with_secrets("Start", &guest_params(), &[("passphrase", &pass)]).unwrap();
        assert_eq!(msg.capacity(), msg.len(), "exact capacity");
        let call = Call::parse(body(&msg)).unwrap();
        let (interface, member) = call.split_method().unwrap();
        assert_eq!(interface, INTERFACE);
        assert!(!call.more);
        match parse_request(member, call.parameters_json()).unwrap() {
            Request::Start {
                guest,
                secret: vtpmd::protocol::manager::Secret::Passphrase(passphrase),
            } => {
                assert_eq!(guest.to_string(), GUEST);
                let decoded = SecretBuf::from_base64(passphrase.base64(), 4096).unwrap();
                assert!(decoded.ct_eq(&pass));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rekey_carries_both_secrets() {
        let old = secret(b"old");
        let new = secret(b"a much longer new passphrase");
        let msg = with_secrets(
            "Rekey",
            &guest_params(),
            &[("passphrase", &old), ("new_passphrase", &new)],
        )
        .unwrap();
        let call = Call::parse(body(&msg)).unwrap();
        match parse_request("Rekey", call.parameters_json()).unwrap() {
            Request::Rekey {
                passphrase,
                new_passphrase,
                ..
            } => {
                assert_eq!(passphrase.base64(), b"b2xk");
                let decoded = SecretBuf::from_base64(new_passphrase.base64(), 4096).unwrap();
                assert!(decoded.ct_eq(&new));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_keeps_its_maps_and_flags() {
        let mut params = guest_params();
        params.insert("version".into(), "2.0".into());
        params.insert(
            "flavor_extra_specs".into(),
            serde_json::json!({"hw:tpm_model": "tpm-crb", "odd \"key\"": "v\u{e4}l"}),
        );
        params.insert("ek_certificate".into(), true.into());
        let pass = secret(b"p");
        let msg = with_secrets("Create", &params, &[("passphrase", &pass)]).unwrap();
        let call = Call::parse(body(&msg)).unwrap();
        match parse_request("Create", call.parameters_json()).unwrap() {
            Request::Create {
                spec,
                ek_certificate,
                passphrase,
                ..
            } => {
                assert_eq!(
                    (spec.version(), spec.model()),
                    (TpmVersion::V2_0, TpmModel::Crb)
                );
                assert!(ek_certificate);
                assert_eq!(passphrase.base64(), b"cA==");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn secrets_without_other_parameters_still_make_json() {
        let pass = secret(b"xyz");
        let msg = with_secrets("Start", &Map::new(), &[("passphrase", &pass)]).unwrap();
        let v: Value = serde_json::from_slice(body(&msg)).unwrap();
        assert_eq!(v["parameters"], serde_json::json!({"passphrase": "eHl6"}));
    }

    #[test]
    fn plain_calls_are_nul_terminated_and_stream_with_more() {
        let msg = plain("Monitor", &Map::new(), true);
        let call = Call::parse(&msg[..msg.len() - 1]).unwrap();
        assert_eq!(call.method, "io.vtpmd.Manager.Monitor");
        assert!(call.more);
        assert!(matches!(
            parse_request("Monitor", call.parameters_json()),
            Ok(Request::Monitor)
        ));
        let msg = plain("Status", &guest_params(), false);
        let call = Call::parse(&msg[..msg.len() - 1]).unwrap();
        assert!(!call.more);
        assert!(matches!(
            parse_request("Status", call.parameters_json()),
            Ok(Request::Status { .. })
        ));
    }
}
