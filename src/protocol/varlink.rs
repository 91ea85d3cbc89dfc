//! Varlink framing and envelopes (<https://varlink.org>): each message is
//! one JSON object followed by a NUL byte, over a Unix stream socket.
//!
//! Decoding borrows from the caller's buffer and never copies a string:
//! the daemon receives into locked memory, and a passphrase must stay
//! there until it is decoded into its own locked buffer. The parameters
//! stay raw JSON text here (serde_json skips over them without unescaping
//! anything), and the Manager takes each secret as raw text too, refusing
//! one with an escape instead of letting serde_json unescape it into
//! ordinary memory.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The interface every Varlink service implements.
pub const SERVICE_INTERFACE: &str = "org.varlink.service";

/// A call as received: `{"method": …, "parameters": {…}, "more": …}`.
///
/// The spec's call is `(method: string, parameters: ?object, oneway: ?bool,
/// more: ?bool, upgrade: ?bool)`: each but `method` may be absent or
/// `null`, both meaning "not set". Call headers are "conceptually similar
/// to HTTP headers" and vendor extensions travel as keys of their own, so
/// keys not named here are skipped (serde_json skips their values without
/// unescaping or copying anything). The keys named here keep their types:
/// `"more": "yes"` is not a call.
#[derive(Debug, Deserialize)]
pub struct Call<'a> {
    #[serde(borrow)]
    pub method: &'a str,
    #[serde(borrow, default)]
    pub parameters: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "flag")]
    pub oneway: bool,
    #[serde(default, deserialize_with = "flag")]
    pub more: bool,
    #[serde(default, deserialize_with = "flag")]
    pub upgrade: bool,
}

/// A `?bool` header flag: `null` is `false`, as absent is.
fn flag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(deserializer)?.unwrap_or(false))
}

/// Why a message is not a call at all.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("message is not valid UTF-8 JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("message is not a Varlink call")]
    NotACall(#[source] serde_json::Error),
}

impl<'a> Call<'a> {
    /// Parses one message (without its NUL terminator).
    pub fn parse(message: &'a [u8]) -> Result<Self, FramingError> {
        let text = std::str::from_utf8(message)
            .map_err(|_| FramingError::NotJson(serde::de::Error::custom("invalid UTF-8")))?;
        serde_json::from_str(text).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                FramingError::NotJson(e)
            } else {
                FramingError::NotACall(e)
            }
        })
    }

    /// `(interface, member)` of `interface.Member`.
    pub fn split_method(&self) -> Option<(&'a str, &'a str)> {
        self.method.rsplit_once('.')
    }

    /// The parameters' JSON text; `{}` when absent.
    pub fn parameters_json(&self) -> &'a str {
        self.parameters.map_or("{}", RawValue::get)
    }
}

/// A reply: parameters, or an error name with its parameters.
///
/// The spec's reply is `(parameters: ?object, continues: ?bool, error:
/// ?string)`. vtpmd leaves `parameters` out when it would be `{}` (a method
/// without output, an error without fields), as sd-varlink does: clients
/// that map such a reply to a unit value (zlink) refuse `{}`, and every
/// client reads an absent `parameters` as empty.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply<P> {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parameters: Option<P>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub continues: bool,
}

/// Encodes a successful reply, NUL-terminated.
pub fn encode_reply(parameters: &impl Serialize, continues: bool) -> Vec<u8> {
    encode(parameters, None, continues)
}

/// Encodes an error reply, NUL-terminated.
pub fn encode_error(name: &str, parameters: &impl Serialize) -> Vec<u8> {
    encode(parameters, Some(name), false)
}

fn encode(parameters: &impl Serialize, error: Option<&str>, continues: bool) -> Vec<u8> {
    // Serializing plain data structures cannot fail; an empty object keeps
    // the stream in step if it ever did.
    let parameters = serde_json::value::to_raw_value(parameters).ok();
    let reply = Reply {
        parameters: parameters.as_deref().filter(|p| p.get() != "{}"),
        error: error.map(str::to_owned),
        continues,
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{}".to_vec());
    out.push(0);
    out
}

/// `org.varlink.service.GetInfo`'s answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceInfo {
    pub vendor: String,
    pub product: String,
    pub version: String,
    pub url: String,
    pub interfaces: Vec<String>,
}

/// The errors of `org.varlink.service`, with their parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceError {
    InterfaceNotFound { interface: String },
    MethodNotFound { method: String },
    MethodNotImplemented { method: String },
    InvalidParameter { parameter: String },
    ExpectedMore,
}

impl ServiceError {
    pub fn name(&self) -> &'static str {
        match self {
            Self::InterfaceNotFound { .. } => "org.varlink.service.InterfaceNotFound",
            Self::MethodNotFound { .. } => "org.varlink.service.MethodNotFound",
            Self::MethodNotImplemented { .. } => "org.varlink.service.MethodNotImplemented",
            Self::InvalidParameter { .. } => "org.varlink.service.InvalidParameter",
            Self::ExpectedMore => "org.varlink.service.ExpectedMore",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let params = match self {
            Self::InterfaceNotFound { interface } => serde_json::json!({ "interface": interface }),
            Self::MethodNotFound { method } | Self::MethodNotImplemented { method } => {
                serde_json::json!({ "method": method })
            }
            Self::InvalidParameter { parameter } => serde_json::json!({ "parameter": parameter }),
            Self::ExpectedMore => serde_json::json!({}),
        };
        encode_error(self.name(), &params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_borrows_its_method_and_parameters() {
        let msg = br#"{"method":"io.vtpmd.Manager.Status","parameters":{"guest":"x"},"more":true}"#;
        let call = Call::parse(msg).unwrap();
        assert_eq!(call.split_method(), Some(("io.vtpmd.Manager", "Status")));
        assert_eq!(call.parameters_json(), r#"{"guest":"x"}"#);
        assert!(call.more && !call.oneway);
    }

    #[test]
    fn null_flags_are_unset_and_unknown_keys_are_skipped() {
        let call = Call::parse(
            br#"{"org.example.trace":{"id":[1,"\u0041"]},"method":"a.B","parameters":null,"oneway":null,"more":null,"upgrade":null,"x":1}"#,
        )
        .unwrap();
        assert_eq!(call.method, "a.B");
        assert_eq!(call.parameters_json(), "{}");
        assert!(!call.oneway && !call.more && !call.upgrade);
        let call =
            Call::parse(br#"{"method":"a.B","oneway":true,"more":true,"upgrade":true}"#).unwrap();
        assert!(call.oneway && call.more && call.upgrade);
    }

    #[test]
    fn mistyped_headers_and_garbage_are_refused() {
        for bad in [
            &br#"{"method":"a.B","more":"yes"}"#[..],
            br#"{"method":"a.B","oneway":0}"#,
            br#"{"method":"a.B","upgrade":[]}"#,
            br#"{"method":null}"#,
            br#"{"parameters":{}}"#,
            br#"{"method":"a.B","method":"a.C"}"#,
            b"[1,2]",
        ] {
            assert!(
                matches!(Call::parse(bad), Err(FramingError::NotACall(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            Call::parse(b"{\"method\":"),
            Err(FramingError::NotJson(_))
        ));
        assert!(matches!(
            Call::parse(b"\xff\xfe"),
            Err(FramingError::NotJson(_))
        ));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut msg = String::from(r#"{"method":"a.B","parameters":{"x":"#);
        msg.push_str(&"[".repeat(100_000));
        assert!(Call::parse(msg.as_bytes()).is_err());
    }

    #[test]
    fn replies_are_nul_terminated_json() {
        let ok = encode_reply(&serde_json::json!({"a": 1}), true);
        assert_eq!(ok.last(), Some(&0));
        assert_eq!(
            &ok[..ok.len() - 1],
            br#"{"parameters":{"a":1},"continues":true}"#
        );
        let err = ServiceError::InvalidParameter {
            parameter: "guest".into(),
        }
        .encode();
        assert_eq!(
            &err[..err.len() - 1],
            br#"{"parameters":{"parameter":"guest"},"error":"org.varlink.service.InvalidParameter"}"#
        );
    }

    #[test]
    fn empty_parameters_are_left_out() {
        let done = encode_reply(&serde_json::json!({}), false);
        assert_eq!(&done[..done.len() - 1], b"{}");
        let more = encode_reply(&serde_json::json!({}), true);
        assert_eq!(&more[..more.len() - 1], br#"{"continues":true}"#);
        let err = ServiceError::ExpectedMore.encode();
        assert_eq!(
            &err[..err.len() - 1],
            br#"{"error":"org.varlink.service.ExpectedMore"}"#
        );
        #[derive(Serialize)]
        struct Optional {
            #[serde(skip_serializing_if = "Option::is_none")]
            left_as_is: Option<Vec<String>>,
        }
        let none = encode_reply(&Optional { left_as_is: None }, false);
        assert_eq!(&none[..none.len() - 1], b"{}");
        let some = encode_reply(
            &Optional {
                left_as_is: Some(vec![]),
            },
            false,
        );
        assert_eq!(
            &some[..some.len() - 1],
            br#"{"parameters":{"left_as_is":[]}}"#
        );
    }
}
