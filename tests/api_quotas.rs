#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

//! Connection quotas against real local users: other uids (switched with
//! setpriv) flood the API socket with connect/close loops and hold as many
//! connections as they can, each kept alive by a GetInfo well within the
//! idle timeout, while root goes on calling. Root must be served every
//! time; the flooders are told why they are refused.
//!
//! The flooding processes are this test binary itself, re-run under
//! setpriv with [`HELPER`] set: only then does the `helper` test act.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::{Value, json};

/// Set (to `flood` or `hold`) in the helper processes only.
const HELPER: &str = "VTPMD_QUOTA_HELPER";
/// A stranger: in no group the daemon knows.
const STRANGER: (&str, &str) = ("daemon", "daemon");
/// A guest of the read-only group (the tests configure `nogroup` as it).
const GUEST: (&str, &str) = ("nobody", "nogroup");

fn msg(v: &Value) -> Vec<u8> {
    let mut m = serde_json::to_vec(v).unwrap();
    m.push(0);
    m
}

/// What came back for one call.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Served,
    /// An error reply: its name and parameters.
    Error(String, Value),
    /// Closed (or reset) without a reply, or the connect failed.
    Closed,
    /// No answer within the (generous) read timeout.
    Hung,
}

fn read_reply(stream: &mut UnixStream) -> Outcome {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Outcome::Closed,
            Ok(_) if byte[0] == 0 => break,
            Ok(_) => bytes.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Outcome::Closed,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Outcome::Hung;
            }
            Err(_) => return Outcome::Closed,
        }
    }
    let reply: Value = serde_json::from_slice(&bytes).unwrap();
    match reply.get("error") {
        Some(name) => Outcome::Error(
            name.as_str().unwrap_or_default().to_owned(),
            reply["parameters"].clone(),
        ),
        None => Outcome::Served,
    }
}

fn call(stream: &mut UnixStream, method: &str) -> Outcome {
    if stream
        .write_all(&msg(&json!({"method": method, "parameters": {}})))
        .is_err()
    {
        // Refused at accept: the typed error may still be waiting to be read.
        return match read_reply(stream) {
            Outcome::Hung => Outcome::Closed,
            other => other,
        };
    }
    read_reply(stream)
}

fn connect(socket: &Path) -> Option<UnixStream> {
    let s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Some(s)
}

/// One call on a fresh connection.
fn fresh_call(socket: &Path, method: &str) -> Outcome {
    match connect(socket) {
        Some(mut s) => call(&mut s, method),
        None => Outcome::Closed,
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

/// The body of the helper processes; a no-op in a normal test run.
#[test]
fn helper() {
    let Ok(mode) = std::env::var(HELPER) else {
        return;
    };
    let socket = PathBuf::from(env("VTPMD_QUOTA_SOCKET"));
    let run_for = Duration::from_millis(env("VTPMD_QUOTA_MS").parse().unwrap());
    let count: usize = env("VTPMD_QUOTA_COUNT").parse().unwrap();
    match mode.as_str() {
        "flood" => flood(&socket, count, run_for),
        "hold" => hold(&socket, count, run_for),
        other => panic!("unknown helper mode {other}"),
    }
}

/// `threads` threads connecting and closing as fast as they can.
fn flood(socket: &Path, threads: usize, run_for: Duration) {
    let deadline = Instant::now() + run_for;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let socket = socket.to_owned();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match UnixStream::connect(&socket) {
                        Ok(s) => {
                            ok += 1;
                            drop(s);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (ok, failed) = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    println!(
        "QUOTA {}",
        json!({"connects": ok, "connect_errors": failed})
    );
}

/// Opens up to `count` connections, each confirmed by a GetInfo, says
/// `ready`, then keeps every one alive with a GetInfo a second until
/// `run_for` is over; a connection the daemon closes is reopened, as an
/// attacker would. Reports what the daemon answered.
fn hold(socket: &Path, count: usize, run_for: Duration) {
    const GET_INFO: &str = "org.varlink.service.GetInfo";
    let started = Instant::now();
    let deadline = started + run_for;
    let mut refusals: Vec<Value> = Vec::new();
    let open = |refusals: &mut Vec<Value>| -> Option<(UnixStream, Instant)> {
        let mut s = connect(socket)?;
        match call(&mut s, GET_INFO) {
            Outcome::Served => Some((s, Instant::now())),
            Outcome::Error(name, parameters) => {
                refusals.push(json!({"error": name, "parameters": parameters}));
                None
            }
            Outcome::Closed | Outcome::Hung => None,
        }
    };
    let mut held: Vec<(UnixStream, Instant)> =
        (0..count).filter_map(|_| open(&mut refusals)).collect();
    let initially_held = held.len();
    println!("QUOTA ready");
    std::io::stdout().flush().unwrap();
    let mut closed_after_ms: Vec<u128> = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        let mut kept = Vec::new();
        for (mut s, opened) in held.drain(..) {
            if call(&mut s, GET_INFO) == Outcome::Served {
                kept.push((s, opened));
            } else {
                closed_after_ms.push(opened.elapsed().as_millis());
            }
        }
        while kept.len() < count && Instant::now() < deadline {
            match open(&mut refusals) {
                Some(c) => kept.push(c),
                None => break,
            }
        }
        held = kept;
    }
    refusals.dedup();
    println!(
        "QUOTA {}",
        json!({
            "initially_held": initially_held,
            "closed_by_daemon": closed_after_ms.len(),
            "first_closed_after_ms": closed_after_ms.iter().min(),
            "refusals": refusals,
        })
    );
}

/// A helper process as `who`, its stdout read line by line.
struct Helper {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: String,
}

impl Helper {
    fn spawn(
        who: (&str, &str),
        mode: &str,
        socket: &Path,
        count: usize,
        run_for: Duration,
    ) -> Self {
        let mut child = Command::new("setpriv")
            .args(["--reuid", who.0, "--regid", who.1, "--clear-groups", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "helper", "--nocapture", "--test-threads=1"])
            .env(HELPER, mode)
            .env("VTPMD_QUOTA_SOCKET", socket)
            .env("VTPMD_QUOTA_MS", run_for.as_millis().to_string())
            .env("VTPMD_QUOTA_COUNT", count.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                // The harness may have printed the test's name before it.
                if let Some((_, rest)) = line.split_once("QUOTA ") {
                    if tx.send(rest.to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            child,
            lines,
            name: format!("{mode} as {}", who.0),
        }
    }

    fn wait_ready(&self) {
        let line = self.lines.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(line, "ready", "{}", self.name);
    }

    /// Its report, once it has exited.
    fn report(mut self) -> Value {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}: {status}", self.name);
        let line = self.lines.recv_timeout(Duration::from_secs(5)).unwrap();
        let report: Value = serde_json::from_str(&line).unwrap();
        eprintln!("{}: {report}", self.name);
        report
    }
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: switching users needs root");
    false
}

/// The fixture's daemon, reachable by the other uids, `nogroup` read-only.
fn daemon(extra: &str) -> Daemon {
    let d = Daemon::start_with(&format!("[api]\nreadonly_group = \"nogroup\"\n{extra}"));
    std::fs::set_permissions(
        d.root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    d
}

fn refused_with(report: &Value, scope: &str, limit: u64) -> bool {
    report["refusals"].as_array().unwrap().iter().any(|r| {
        r["error"] == "io.vtpmd.Manager.TooManyConnections"
            && r["parameters"]["scope"] == scope
            && r["parameters"]["limit"] == limit
    })
}

/// The default quotas (so that the same test shows what unchanged code
/// does): 128 connections, 16 reserved for root and the admin group, 16 per
/// other uid, 5 s for a stranger's connection.
#[test]
fn root_is_served_while_a_stranger_and_a_guest_flood_and_hold() {
    if !is_root() {
        return;
    }
    let d = daemon("");
    let run_for = Duration::from_secs(10);
    // More than the whole pool between them.
    let holders = [
        Helper::spawn(STRANGER, "hold", &d.socket, 70, run_for),
        Helper::spawn(GUEST, "hold", &d.socket, 70, run_for),
    ];
    for h in &holders {
        h.wait_ready();
    }
    let floods: Vec<Helper> = [STRANGER, GUEST]
        .into_iter()
        .flat_map(|who| (0..3).map(move |_| who))
        .map(|who| Helper::spawn(who, "flood", &d.socket, 3, Duration::from_secs(6)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut outcomes = Vec::new();
    for _ in 0..20 {
        outcomes.push(fresh_call(&d.socket, "io.vtpmd.Manager.List"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let served = outcomes.iter().filter(|o| **o == Outcome::Served).count();
    eprintln!("root: {served} of 20 calls served under the flood; {outcomes:?}");
    for f in floods {
        let report = f.report();
        assert!(report["connects"].as_u64().unwrap() > 0, "{report}");
    }
    let [stranger, guest] = holders.map(Helper::report);
    assert_eq!(served, 20, "root was locked out: {outcomes:?}");
    // Per uid, not per process or in all: each was capped at 16.
    assert!(refused_with(&stranger, "uid", 16), "{stranger}");
    assert!(refused_with(&guest, "uid", 16), "{guest}");
    // A stranger's connection ends after its lifetime however busy it is;
    // a guest's lives on while it is used.
    assert!(
        stranger["closed_by_daemon"].as_u64().unwrap() > 0,
        "{stranger}"
    );
    assert_eq!(guest["closed_by_daemon"], 0, "{guest}");
    assert!(fresh_call(&d.socket, "io.vtpmd.Manager.List") == Outcome::Served);
}

/// A connect/close flood alone, from three processes of one stranger.
#[test]
fn root_is_served_during_a_strangers_connect_close_flood() {
    if !is_root() {
        return;
    }
    let d = daemon("");
    let floods: Vec<Helper> = (0..3)
        .map(|_| Helper::spawn(STRANGER, "flood", &d.socket, 4, Duration::from_secs(6)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut outcomes = Vec::new();
    for _ in 0..20 {
        outcomes.push(fresh_call(&d.socket, "io.vtpmd.Manager.List"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let served = outcomes.iter().filter(|o| **o == Outcome::Served).count();
    eprintln!("root: {served} of 20 calls served under a connect/close flood; {outcomes:?}");
    for f in floods {
        let report = f.report();
        assert!(report["connects"].as_u64().unwrap() > 0, "{report}");
    }
    assert_eq!(served, 20, "root was refused: {outcomes:?}");
}

/// Small quotas, counted exactly: who is refused at which limit, and
/// that a refusal is a typed error before the close.
#[test]
fn each_quota_answers_too_many_connections_with_its_scope_and_limit() {
    if !is_root() {
        return;
    }
    let d = daemon(
        "max_connections = 8\nreserved_connections = 4\nmax_connections_per_uid = 3\nstranger_lifetime_ms = 60000\n",
    );
    let run_for = Duration::from_secs(4);
    // The stranger gets its 3 and is refused the 4th for its uid.
    let stranger = Helper::spawn(STRANGER, "hold", &d.socket, 4, run_for);
    stranger.wait_ready();
    // The guest gets the last of the 8 - 4 unreserved slots, then is
    // refused for all.
    let guest = Helper::spawn(GUEST, "hold", &d.socket, 3, run_for);
    guest.wait_ready();
    // Root still has the reserved 4; the 5th is refused for all at 8.
    let mut mine: Vec<UnixStream> = Vec::new();
    for _ in 0..4 {
        let mut s = connect(&d.socket).unwrap();
        assert_eq!(call(&mut s, "io.vtpmd.Manager.List"), Outcome::Served);
        mine.push(s);
    }
    let over = fresh_call(&d.socket, "io.vtpmd.Manager.List");
    assert_eq!(
        over,
        Outcome::Error(
            "io.vtpmd.Manager.TooManyConnections".to_owned(),
            json!({"scope": "all", "limit": 8})
        )
    );
    drop(mine);
    let stranger = stranger.report();
    let guest = guest.report();
    assert_eq!(stranger["initially_held"], 3, "{stranger}");
    assert!(refused_with(&stranger, "uid", 3), "{stranger}");
    assert_eq!(guest["initially_held"], 1, "{guest}");
    assert!(refused_with(&guest, "all", 4), "{guest}");
}
