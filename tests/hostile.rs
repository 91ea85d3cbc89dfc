#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

//! Hostile clients against the real daemon over its real socket: malformed
//! and malicious messages, a connection flood, and many clients fighting over
//! one guest. After each, the daemon must be alive, back to its resource
//! level, and no guest's state may have changed behind its owner's back.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Client, Daemon, b64};
use serde_json::{Value, json};

const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASS: &str = "correct horse battery staple";

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Every child of every thread of `pid` (tokio spawns from worker threads).
fn children(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(text.split_whitespace().map(str::to_owned));
        }
    }
    out
}

/// Polls `f` until it is true or `timeout` passes; returns the last value.
fn settle(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What came back on a connection within a few seconds.
#[derive(Debug)]
enum Answer {
    Reply(Value),
    Closed,
    /// Not read: a oneway call must get none.
    NoReply,
}

/// Reads one NUL-terminated reply, or the close; panics on a hang.
fn read_answer(stream: &mut UnixStream) -> Answer {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                assert!(bytes.is_empty(), "closed mid-reply: {bytes:?}");
                return Answer::Closed;
            }
            Ok(_) if byte[0] == 0 => return Answer::Reply(serde_json::from_slice(&bytes).unwrap()),
            Ok(_) => bytes.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Answer::Closed,
            Err(e) => panic!("no answer (hang?): {e}"),
        }
    }
}

fn alive(d: &Daemon) {
    let mut c = d.client();
    c.call("org.varlink.service.GetInfo", json!({})).unwrap();
    c.manager("List", json!({})).unwrap();
}

/// The guest as the daemon reports it, and its sealed file's bytes.
fn snapshot(d: &Daemon, guest: &str) -> (Value, Value, Vec<u8>) {
    let s = d
        .client()
        .manager("Status", json!({"guest": guest}))
        .unwrap()["guest"]
        .clone();
    (
        s["generation"].clone(),
        s["state"].clone(),
        std::fs::read(d.sealed_file(guest)).unwrap(),
    )
}

fn msg(v: &Value) -> Vec<u8> {
    let mut m = serde_json::to_vec(v).unwrap();
    m.push(0);
    m
}

/// A hostile message and what the daemon must answer to it: an error (full
/// name, and the `parameter` it names if any) or nothing at all (oneway);
/// then whether it closes the connection.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    error: Option<(&'static str, Option<&'static str>)>,
    closes: bool,
}

const INVALID: &str = "org.varlink.service.InvalidParameter";

fn cases() -> Vec<Case> {
    let mgr = |member: &str, params: Value| {
        msg(&json!({"method": format!("io.vtpmd.Manager.{member}"), "parameters": params}))
    };
    let invalid = |name, bytes, parameter, closes| Case {
        name,
        bytes,
        error: Some((INVALID, Some(parameter))),
        closes,
    };
    let mut nested = b"{\"method\":\"io.vtpmd.Manager.List\",\"parameters\":".to_vec();
    nested.extend(std::iter::repeat_n(b'[', 100_000));
    nested.push(0);
    let mut utf8 = b"{\"method\":\"io.vtpmd.Manager.Status\",\"parameters\":{\"guest\":\"".to_vec();
    utf8.extend([0xff, 0xfe, 0xc3, 0x28]);
    utf8.extend(b"\"}}\0");
    let huge = "A".repeat(1 << 20);
    let escaped = format!(
        "{{\"method\":\"io.vtpmd.Manager.Start\",\"parameters\":{{\"guest\":\"{G1}\",\"passphrase\":\"\\u0041\\u0042\\u0043\\u0044\"}}}}\0"
    );
    let upper = G1.to_uppercase();
    vec![
        invalid("invalid UTF-8", utf8, "message", true),
        invalid("nested JSON", nested, "message", true),
        invalid("array", b"[1,2,3]\0".to_vec(), "message", true),
        invalid("empty message", b"\0".to_vec(), "message", true),
        // An unknown header key is skipped, as the spec wants
        // (tests/varlink_conformance.rs); a known one of the wrong type is
        // no call.
        invalid(
            "mistyped header flag",
            msg(&json!({"method": "io.vtpmd.Manager.List", "more": "yes"})),
            "message",
            true,
        ),
        Case {
            name: "unknown method",
            bytes: mgr("Explode", json!({})),
            error: Some(("org.varlink.service.MethodNotFound", None)),
            closes: false,
        },
        Case {
            name: "unknown interface",
            bytes: msg(&json!({"method": "com.example.Nope.Do", "parameters": {}})),
            error: Some(("org.varlink.service.InterfaceNotFound", None)),
            closes: false,
        },
        invalid(
            "unknown parameter",
            mgr("Status", json!({"guest": G1, "extra": 1})),
            "extra",
            false,
        ),
        invalid(
            "guest as number",
            mgr("Status", json!({"guest": 42})),
            "guest",
            false,
        ),
        invalid(
            "passphrase as object",
            mgr("Start", json!({"guest": G1, "passphrase": {"a": 1}})),
            "passphrase",
            false,
        ),
        invalid(
            "guest ../../etc",
            mgr(
                "Create",
                json!({"guest": "../../etc", "version": "2.0", "passphrase": b64(PASS)}),
            ),
            "guest",
            false,
        ),
        invalid(
            "guest /etc/passwd",
            mgr(
                "Create",
                json!({"guest": "/etc/passwd", "version": "2.0", "passphrase": b64(PASS)}),
            ),
            "guest",
            false,
        ),
        invalid(
            "upper-case guest",
            mgr(
                "Create",
                json!({"guest": upper, "version": "2.0", "passphrase": b64(PASS)}),
            ),
            "guest",
            false,
        ),
        invalid(
            "empty passphrase",
            mgr("Start", json!({"guest": G1, "passphrase": ""})),
            "passphrase",
            false,
        ),
        invalid(
            "1 MiB passphrase",
            mgr("Start", json!({"guest": G1, "passphrase": huge})),
            "message",
            true,
        ),
        invalid(
            "escaped passphrase",
            escaped.into_bytes(),
            "passphrase",
            false,
        ),
        Case {
            name: "Monitor without more",
            bytes: mgr("Monitor", json!({})),
            error: Some(("org.varlink.service.ExpectedMore", None)),
            closes: false,
        },
        Case {
            name: "oneway",
            bytes: msg(
                &json!({"method": "io.vtpmd.Manager.Stop", "parameters": {"guest": G1}, "oneway": true}),
            ),
            error: None,
            closes: false,
        },
    ]
}

#[test]
fn hostile_messages_get_typed_errors_and_change_nothing() {
    // Room for the nested JSON inside the limit, so the parser meets it.
    let d = Daemon::start_with("[api]\nidle_timeout_ms = 500\nmax_message_bytes = 131072\n");
    let pid = d.pid();
    d.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let before = snapshot(&d, G1);
    alive(&d);
    // Let the daemon finish with the set-up connections first.
    std::thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));
    let mut wrong = Vec::new();
    for case in cases() {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        // The daemon may stop reading (and close) before the whole message
        // is written; that is its answer, not a test failure.
        let _ = s.write_all(&case.bytes);
        let answer = if case.error.is_some() {
            read_answer(&mut s)
        } else {
            Answer::NoReply // checked below
        };
        let ok = match (&answer, case.error) {
            (Answer::Reply(r), Some((name, param))) => {
                r["error"] == name && param.is_none_or(|p| r["parameters"]["parameter"] == p)
            }
            (_, None) => true, // oneway: checked below
            (_, Some(_)) => false,
        };
        let still_open = if case.error.is_none() {
            // No reply to the oneway call: the first reply is GetInfo's.
            let _ = s.write_all(&msg(&json!({"method": "org.varlink.service.GetInfo"})));
            matches!(read_answer(&mut s), Answer::Reply(r) if r["parameters"]["interfaces"].is_array())
        } else if case.closes {
            matches!(read_answer(&mut s), Answer::Reply(_))
        } else {
            let _ = s.write_all(&msg(&json!({"method": "org.varlink.service.GetInfo"})));
            matches!(read_answer(&mut s), Answer::Reply(r) if r.get("error").is_none())
        };
        eprintln!("{:24} -> {answer:?}, open after: {still_open}", case.name);
        if !ok || still_open == case.closes {
            wrong.push(format!(
                "{}: {answer:?}, open after: {still_open}",
                case.name
            ));
        }
        alive(&d);
        assert_eq!(snapshot(&d, G1), before, "after {}", case.name);
    }
    assert!(wrong.is_empty(), "wrong answers: {wrong:#?}");
    // Nothing was created by the path-like ids.
    let guests: Vec<_> = std::fs::read_dir(d.state_dir.join("guests"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(guests, [G1], "{guests:?}");
    let fds_equal = settle(Duration::from_secs(3), || fd_count(pid) == fds0);
    let (fds1, rss1) = (fd_count(pid), rss_kib(pid));
    eprintln!("daemon fds {fds0} -> {fds1}, VmRSS {rss0} KiB -> {rss1} KiB");
    assert!(fds_equal, "fd count {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 8 * 1024, "VmRSS {rss0} KiB -> {rss1} KiB");
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// Whether the daemon has refused and closed `s` (without waiting if it
/// has not): a refusal is a TooManyConnections error, then the close.
fn is_closed(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut bytes = [0u8; 512];
    let closed = match (&*s).read(&mut bytes) {
        Ok(0) => true,
        Ok(n) => {
            let text = String::from_utf8_lossy(&bytes[..n]);
            assert!(
                text.contains("io.vtpmd.Manager.TooManyConnections"),
                "unexpected data on a held connection: {text}"
            );
            true
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("{e}"),
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// A GetInfo on a fresh connection; `None` if the daemon closed it.
fn try_get_info(socket: &Path) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.write_all(&msg(&json!({"method": "org.varlink.service.GetInfo"})))
        .ok()?;
    match read_answer(&mut s) {
        Answer::Reply(r) if r["error"] == "io.vtpmd.Manager.TooManyConnections" => None,
        Answer::Reply(r) => Some(r),
        Answer::Closed | Answer::NoReply => None,
    }
}

#[test]
fn a_thousand_held_connections_stay_within_the_limit() {
    const LIMIT: usize = 64;
    raise_nofile();
    let d = Daemon::start_with("[api]\nmax_connections = 64\nidle_timeout_ms = 20000\n");
    let pid = d.pid();
    alive(&d);
    // Let the daemon finish with the set-up connections first.
    std::thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));
    let started = Instant::now();
    let conns: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    eprintln!("1000 connections opened in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let (fds1, rss1) = (fd_count(pid), rss_kib(pid));
    let (mut kept, closed): (Vec<_>, Vec<_>) = conns.into_iter().partition(|s| !is_closed(s));
    eprintln!(
        "kept {}, closed {}; daemon fds {fds0} -> {fds1}, VmRSS {rss0} -> {rss1} KiB",
        kept.len(),
        closed.len()
    );
    drop(closed);
    assert!(
        !kept.is_empty() && kept.len() <= LIMIT,
        "kept {}",
        kept.len()
    );
    assert!(fds1 <= fds0 + LIMIT + 8, "fds {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 32 * 1024, "VmRSS {rss0} -> {rss1} KiB");
    // By design nobody else gets in while every slot is held.
    if kept.len() == LIMIT {
        assert!(try_get_info(&d.socket).is_none(), "served over the cap");
    }
    // Half of the slots freed: a well-behaved client is answered at once.
    kept.truncate(kept.len() / 2);
    let freed = Instant::now();
    assert!(
        settle(Duration::from_secs(1), || try_get_info(&d.socket).is_some()),
        "no answer within 1 s of freeing slots"
    );
    eprintln!("served {:?} after freeing half", freed.elapsed());
    // The held ones are still served too.
    let mut held = kept.pop().unwrap();
    held.write_all(&msg(&json!({"method": "org.varlink.service.GetInfo"})))
        .unwrap();
    assert!(matches!(read_answer(&mut held), Answer::Reply(r) if r.get("error").is_none()));
    drop(held);
    drop(kept);
    let back = settle(Duration::from_secs(3), || fd_count(pid) == fds0);
    let (fds2, rss2) = (fd_count(pid), rss_kib(pid));
    eprintln!("after dropping all: fds {fds2} (baseline {fds0}), VmRSS {rss2} KiB");
    assert!(back, "fd count {fds0} -> {fds2}");
    alive(&d);
}

/// xorshift64: enough randomness to shuffle operations, reproducible by seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn one_guest_fought_over_by_many_clients_ends_consistent() {
    const TYPED: [&str; 5] = [
        "Busy",
        "GuestRunning",
        "GuestNotRunning",
        "NoSuchGuest",
        "GuestExists",
    ];
    let d = Daemon::start();
    let pid = d.pid();
    let seed = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % u128::from(u64::MAX),
    )
    .unwrap()
        | 1;
    eprintln!("seed {seed}");
    let socket = d.socket.clone();
    let started = Instant::now();
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut rng = seed.wrapping_add(t.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
                let mut c = Client::try_connect(&socket).unwrap();
                let mut seen = Vec::new();
                for _ in 0..10 {
                    let (member, params) = match next(&mut rng) % 5 {
                        0 => (
                            "Create",
                            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
                        ),
                        1 => ("Start", json!({"guest": G1, "passphrase": b64(PASS)})),
                        2 => ("Stop", json!({"guest": G1})),
                        3 => ("Status", json!({"guest": G1})),
                        _ => ("Delete", json!({"guest": G1})),
                    };
                    let outcome = match c.manager(member, params) {
                        Ok(_) => "ok".to_owned(),
                        Err(e) => e.name,
                    };
                    seen.push((member, outcome));
                }
                seen
            })
        })
        .collect();
    let mut tally = std::collections::BTreeMap::<(&str, String), usize>::new();
    for t in threads {
        for op in t
            .join()
            .expect("a client thread failed (closed connection?)")
        {
            *tally.entry(op).or_default() += 1;
        }
    }
    eprintln!("160 operations in {:?}: {tally:?}", started.elapsed());
    for (member, outcome) in tally.keys() {
        assert!(
            outcome == "ok"
                || TYPED
                    .iter()
                    .any(|n| *outcome == format!("io.vtpmd.Manager.{n}")),
            "{member} answered {outcome}"
        );
    }
    alive(&d);
    let mut c = d.client();
    let state = match c.manager("Status", json!({"guest": G1})) {
        Ok(s) => Some(s["guest"]["state"].as_str().unwrap().to_owned()),
        Err(e) => {
            assert_eq!(e.name, "io.vtpmd.Manager.NoSuchGuest", "{e:?}");
            None
        }
    };
    eprintln!("final state before the clean-up Stop: {state:?}");
    if state.as_deref() == Some("running") {
        c.manager("Stop", json!({"guest": G1})).unwrap();
    }
    let listed = c.manager("List", json!({})).unwrap()["guests"].clone();
    let listed = listed.as_array().unwrap();
    let exists = state.is_some();
    assert_eq!(listed.len(), usize::from(exists), "{listed:?}");
    assert_eq!(d.sealed_file(G1).exists(), exists, "sealed file vs Status");
    if exists {
        let s = c.manager("Status", json!({"guest": G1})).unwrap()["guest"].clone();
        assert_eq!(s["state"], "stopped", "{s}");
        assert_eq!(listed[0]["state"], "stopped", "{listed:?}");
        // The registry still opens with the passphrase.
        c.manager("Start", json!({"guest": G1, "passphrase": b64(PASS)}))
            .unwrap();
        c.manager("Stop", json!({"guest": G1})).unwrap();
    }
    assert!(
        settle(Duration::from_secs(5), || children(pid).is_empty()),
        "swtpm left behind: {:?}",
        children(pid)
    );
}
