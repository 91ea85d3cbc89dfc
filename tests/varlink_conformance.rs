//! The Varlink protocol as the spec (varlink.org, "Method Call" and
//! "Service") defines it, checked byte for byte on the real daemon's
//! socket: what a call header may carry, what a reply leaves out, `oneway`
//! against `more`, a refused `upgrade`, and GetInfo.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Daemon, b64};
use serde_json::{Value, json};

const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const G2: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASS: &str = "correct horse battery staple";
const INVALID: &str = "org.varlink.service.InvalidParameter";

/// A connection that speaks raw bytes and reads raw replies.
struct Raw {
    stream: UnixStream,
}

/// What came back within `wait`.
#[derive(Debug, PartialEq)]
enum Answer {
    /// One reply's exact text (without its NUL).
    Reply(String),
    Closed,
    Nothing,
}

impl Raw {
    fn connect(d: &Daemon) -> Self {
        Self {
            stream: UnixStream::connect(&d.socket).unwrap(),
        }
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
        self.stream.write_all(&[0]).unwrap();
    }

    /// Reads one reply; `Nothing` if none began within `wait`.
    fn answer_within(&mut self, wait: Duration) -> Answer {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => {
                    assert!(bytes.is_empty(), "closed mid-reply: {bytes:?}");
                    return Answer::Closed;
                }
                Ok(_) if byte[0] == 0 => return Answer::Reply(String::from_utf8(bytes).unwrap()),
                Ok(_) => {
                    bytes.push(byte[0]);
                    // Once a reply has begun, the rest follows at once.
                    self.stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                }
                Err(e)
                    if bytes.is_empty()
                        && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Answer::Nothing;
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Answer::Closed,
                Err(e) => panic!("reading a reply: {e}"),
            }
        }
    }

    /// The next reply's exact text; panics on anything else.
    fn reply_text(&mut self) -> String {
        match self.answer_within(Duration::from_secs(30)) {
            Answer::Reply(text) => text,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// The next reply, parsed.
    fn reply(&mut self) -> Value {
        serde_json::from_str(&self.reply_text()).unwrap()
    }

    /// Sends `text` and parses the reply.
    fn call(&mut self, text: &str) -> Value {
        self.send(text);
        self.reply()
    }

    /// The connection still answers, in step: a GetInfo's reply is the
    /// next message.
    fn assert_in_step(&mut self) {
        let info = self.call(r#"{"method":"org.varlink.service.GetInfo"}"#);
        assert!(
            info["parameters"]["interfaces"].is_array(),
            "not GetInfo's reply: {info}"
        );
    }
}

/// The spec's call is `(method: string, parameters: ?object, oneway: ?bool,
/// more: ?bool, upgrade: ?bool)`: `null` is the same as absent. Call and
/// reply "are conceptually similar to HTTP headers" and vendor extensions
/// are keys of their own, so a key the daemon does not know is ignored.
#[test]
fn null_flags_and_unknown_header_keys_are_accepted() {
    let d = Daemon::start();
    let mut c = Raw::connect(&d);

    let info = c.call(
        r#"{"method":"org.varlink.service.GetInfo","parameters":null,"more":null,"oneway":null,"upgrade":null}"#,
    );
    assert!(info.get("error").is_none(), "{info}");
    assert!(info["parameters"]["interfaces"].is_array(), "{info}");

    let list =
        c.call(r#"{"method":"io.vtpmd.Manager.List","parameters":{},"more":null,"oneway":null}"#);
    assert_eq!(list, json!({"parameters": {"guests": []}}));

    // A vendor's extension object and a key no spec names.
    let list = c.call(
        r#"{"org.example.trace":{"id":"a1"},"method":"io.vtpmd.Manager.List","parameters":{},"x-hint":[1,2],"more":false}"#,
    );
    assert_eq!(list, json!({"parameters": {"guests": []}}));
    c.assert_in_step();

    // `more: null` on Monitor is no `more`.
    let monitor = c.call(r#"{"method":"io.vtpmd.Manager.Monitor","more":null}"#);
    assert_eq!(monitor["error"], "org.varlink.service.ExpectedMore");
    c.assert_in_step();

    // `oneway: null` is no `oneway`: the call is answered.
    c.send(r#"{"method":"io.vtpmd.Manager.List","oneway":null}"#);
    assert_eq!(c.reply(), json!({"parameters": {"guests": []}}));

    // What the spec types is still checked: a flag that is not a boolean,
    // a method that is not a string, a header that is not an object.
    for bad in [
        r#"{"method":"io.vtpmd.Manager.List","more":"yes"}"#,
        r#"{"method":"io.vtpmd.Manager.List","oneway":1}"#,
        r#"{"method":"io.vtpmd.Manager.List","upgrade":"no"}"#,
        r#"{"method":null}"#,
        r#"{"parameters":{}}"#,
        r#"{"method":"io.vtpmd.Manager.List","method":"io.vtpmd.Manager.List"}"#,
    ] {
        let mut c = Raw::connect(&d);
        let reply = c.call(bad);
        assert_eq!(reply["error"], INVALID, "{bad}: {reply}");
        assert_eq!(
            reply["parameters"]["parameter"], "message",
            "{bad}: {reply}"
        );
        assert_eq!(
            c.answer_within(Duration::from_secs(5)),
            Answer::Closed,
            "{bad}"
        );
    }
}

/// A reply's `parameters` is `?object` in the spec; with nothing to say it
/// is left out (as sd-varlink does), on errors too: a client that maps a
/// method without output, or an error without fields, to a unit value
/// (zlink) cannot take `{}` for it.
#[test]
fn empty_parameters_are_left_out_of_replies() {
    let d = Daemon::start();
    d.create_guest(G1, PASS);
    let mut c = Raw::connect(&d);

    // Rekey that changes every file: no left_as_is, nothing to say.
    c.send(
        &json!({"method": "io.vtpmd.Manager.Rekey", "parameters": {
            "guest": G1, "passphrase": b64(PASS), "new_passphrase": b64("new one")}})
        .to_string(),
    );
    assert_eq!(c.reply_text(), "{}");

    c.send(&json!({"method": "io.vtpmd.Manager.Delete", "parameters": {"guest": G1}}).to_string());
    assert_eq!(c.reply_text(), "{}");

    c.send(r#"{"method":"io.vtpmd.Manager.Monitor"}"#);
    assert_eq!(
        c.reply_text(),
        r#"{"error":"org.varlink.service.ExpectedMore"}"#
    );

    // Parameters that say something stay, on replies and errors alike.
    let list = c.call(r#"{"method":"io.vtpmd.Manager.List"}"#);
    assert_eq!(list, json!({"parameters": {"guests": []}}));
    let gone = c.call(
        &json!({"method": "io.vtpmd.Manager.Status", "parameters": {"guest": G1}}).to_string(),
    );
    assert_eq!(
        gone,
        json!({"error": "io.vtpmd.Manager.NoSuchGuest", "parameters": {"guest": G1}})
    );
}

/// "oneway instructs the server to suppress its reply. The server must
/// adhere to the instruction": with `more` as well there is still no reply
/// at all, no stream of them either.
#[test]
fn oneway_wins_over_more() {
    let d = Daemon::start();
    d.create_guest(G1, PASS);
    let mut c = Raw::connect(&d);

    c.send(r#"{"method":"io.vtpmd.Manager.Monitor","more":true,"oneway":true}"#);
    // Events that a stream would carry: an existing guest (sent at once),
    // then a new one.
    d.create_guest(G2, PASS);
    assert_eq!(c.answer_within(Duration::from_millis(500)), Answer::Nothing);
    c.assert_in_step();

    c.send(r#"{"method":"io.vtpmd.Manager.List","more":true,"oneway":true}"#);
    c.send(
        &json!({"method": "io.vtpmd.Manager.Status", "parameters": {"guest": G1}, "more": true, "oneway": true})
            .to_string(),
    );
    assert_eq!(c.answer_within(Duration::from_millis(500)), Answer::Nothing);
    c.assert_in_step();

    // A oneway call with `more` is still run (Delete is, and says nothing).
    c.send(
        &json!({"method": "io.vtpmd.Manager.Delete", "parameters": {"guest": G2}, "more": true, "oneway": true})
            .to_string(),
    );
    c.assert_in_step();
    let list = d.client().manager("List", json!({})).unwrap();
    let ids: Vec<&str> = list["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["guest"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [G1], "{list}");
}

/// vtpmd offers no protocol upgrade on any method. A call asking for one is
/// refused, not run, with `org.varlink.service.InvalidParameter` naming
/// `upgrade`, and the connection stays in Varlink, in step.
#[test]
fn upgrade_is_refused_with_a_typed_error() {
    let d = Daemon::start();
    d.create_guest(G1, PASS);
    let mut c = Raw::connect(&d);
    let refused = json!({"error": INVALID, "parameters": {"parameter": "upgrade"}});

    for call in [
        json!({"method": "org.varlink.service.GetInfo", "upgrade": true}),
        json!({"method": "io.vtpmd.Manager.List", "parameters": {}, "upgrade": true}),
        json!({"method": "io.vtpmd.Manager.Monitor", "more": true, "upgrade": true}),
        json!({"method": "io.vtpmd.Manager.Delete", "parameters": {"guest": G1}, "upgrade": true}),
    ] {
        assert_eq!(c.call(&call.to_string()), refused, "{call}");
        c.assert_in_step();
    }
    // The refused Delete did not run.
    let status = d.client().manager("Status", json!({"guest": G1})).unwrap();
    assert_eq!(status["guest"]["guest"], G1);

    // `upgrade: false` is no upgrade.
    let list = c.call(r#"{"method":"io.vtpmd.Manager.List","upgrade":false}"#);
    assert!(list["parameters"]["guests"].is_array(), "{list}");

    // oneway still means no reply, even to a refusal.
    c.send(r#"{"method":"io.vtpmd.Manager.List","upgrade":true,"oneway":true}"#);
    c.assert_in_step();
}

/// GetInfo's `url` is the product's, as in the spec's own example
/// (`url: https://fidget.example.com`), not the protocol's.
#[test]
fn get_info_names_the_product() {
    let d = Daemon::start();
    let info = Raw::connect(&d).call(r#"{"method":"org.varlink.service.GetInfo"}"#);
    let p = &info["parameters"];
    assert_eq!(p["vendor"], "vtpmd");
    assert_eq!(p["product"], "vtpmd");
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    let url = p["url"].as_str().unwrap();
    assert_eq!(url, env!("CARGO_PKG_REPOSITORY"), "{info}");
    assert!(
        url.starts_with("https://") && !url.contains("varlink.org"),
        "{url}"
    );
    assert_eq!(
        p["interfaces"],
        json!(["org.varlink.service", "io.vtpmd.Manager"])
    );
}

/// The interface description vtpmd serves is the shipped IDL file, under
/// the name GetInfo lists.
#[test]
fn the_interface_description_is_the_idl_file() {
    let d = Daemon::start();
    let mut c = Raw::connect(&d);
    let reply = c.call(
        r#"{"method":"org.varlink.service.GetInterfaceDescription","parameters":{"interface":"io.vtpmd.Manager"}}"#,
    );
    let text = reply["parameters"]["description"].as_str().unwrap();
    assert_eq!(
        text,
        include_str!("../src/protocol/io.vtpmd.Manager.varlink")
    );
    assert!(
        text.lines().any(|l| l == "interface io.vtpmd.Manager"),
        "{text}"
    );
}
