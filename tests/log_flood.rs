#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

//! What others can make vtpmd log is bounded: the real daemon, its log
//! (stderr at RUST_LOG=info) captured to a file, flooded by a stranger's
//! denied calls (a real other uid, through setpriv) and by a swtpm that
//! writes a hundred thousand lines. Each source gets its burst and then its
//! rate, and what was dropped is counted in a "suppressed N messages from
//! SOURCE" line; swtpm's lost-write line is still caught after the flood.
//!
//! The stranger is this test binary, re-run under setpriv with [`HELPER`]
//! set: only then does the `helper` test act.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, TEST_CONFIG, b64};
use serde_json::{Value, json};

const HELPER: &str = "VTPMD_LOG_FLOOD_HELPER";
const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASS: &str = "correct horse battery staple";
/// The default `[log]` rate.
const BURST: u64 = 20;
const PER_MINUTE: u64 = 60;
const FLOOD_LINES: u64 = 100_000;

fn msg(v: &Value) -> Vec<u8> {
    let mut m = serde_json::to_vec(v).unwrap();
    m.push(0);
    m
}

/// One reply; `None` if the daemon closed the connection.
fn read_reply(stream: &mut UnixStream) -> Option<Value> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        if let Some(end) = bytes.iter().position(|&b| b == 0) {
            assert_eq!(end + 1, bytes.len(), "more than one reply at once");
            bytes.pop();
            return Some(serde_json::from_slice(&bytes).unwrap());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("no reply: {e}"),
        }
    }
}

/// The body of the stranger's process: `calls` Stop calls over a few
/// connections (reopened when the daemon ends one), each denied.
#[test]
fn helper() {
    if std::env::var(HELPER).is_err() {
        return;
    }
    let socket = PathBuf::from(std::env::var("VTPMD_LOG_FLOOD_SOCKET").unwrap());
    let calls: u64 = std::env::var("VTPMD_LOG_FLOOD_CALLS")
        .unwrap()
        .parse()
        .unwrap();
    const THREADS: u64 = 4;
    let call = msg(&json!({"method": "io.vtpmd.Manager.Stop", "parameters": {"guest": G1}}));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let socket = socket.clone();
            let call = call.clone();
            std::thread::spawn(move || {
                let mut denied = 0u64;
                let mut stream: Option<UnixStream> = None;
                while denied < calls / THREADS {
                    let s = stream.get_or_insert_with(|| {
                        let s = UnixStream::connect(&socket).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        s
                    });
                    let reply = if s.write_all(&call).is_ok() {
                        read_reply(s)
                    } else {
                        None
                    };
                    match reply {
                        Some(r) => {
                            assert_eq!(r["error"], "io.vtpmd.Manager.PermissionDenied", "{r}");
                            denied += 1;
                        }
                        // Its lifetime is over: a new one.
                        None => stream = None,
                    }
                }
                denied
            })
        })
        .collect();
    let denied: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    println!("FLOOD {}", json!({"denied": denied}));
}

/// A daemon logging at info into a file of its own.
fn logging_daemon(extra_config: &str) -> (Daemon, PathBuf) {
    let mut d = Daemon::unstarted(&format!("{TEST_CONFIG}{extra_config}"), None);
    let log = d.root.path().join("vtpmd.log");
    d.rust_log = "info".to_owned();
    d.stderr_to = Some(log.clone());
    (d, log)
}

fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
}

/// The N of every "suppressed N messages from `source`" line.
fn suppressed_from(log: &str, source: &str) -> Vec<u64> {
    let tail = format!(" messages from {source}");
    log.lines()
        .filter_map(|l| {
            let (before, _) = l.split_once(&tail)?;
            let (_, n) = before.rsplit_once("suppressed ")?;
            n.parse().ok()
        })
        .collect()
}

/// At most what the bucket lets through in `elapsed`: the burst, one line
/// per refill, and two for rounding.
fn bound(elapsed: Duration) -> u64 {
    let refills = u64::try_from(elapsed.as_millis()).unwrap() * PER_MINUTE / 60_000;
    BURST + refills + 2
}

#[test]
fn a_strangers_denied_calls_are_logged_within_a_rate_with_the_count_dropped() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let (mut d, log_path) = logging_daemon("");
    d.restart();
    std::fs::set_permissions(
        d.root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let lines_before = read_log(&log_path).lines().count();
    let began = Instant::now();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "daemon",
            "--regid",
            "daemon",
            "--clear-groups",
            "--",
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "helper", "--nocapture", "--test-threads=1"])
        .env(HELPER, "1")
        .env("VTPMD_LOG_FLOOD_SOCKET", &d.socket)
        .env("VTPMD_LOG_FLOOD_CALLS", "40000")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .split_once("FLOOD ")
        .and_then(|(_, rest)| serde_json::from_str(rest.lines().next()?).ok())
        .unwrap_or_else(|| panic!("no report: {stdout}"));
    let denied = report["denied"].as_u64().unwrap();
    // One denied call more once a token is back, to carry the count of
    // the last ones dropped.
    std::thread::sleep(Duration::from_millis(1500));
    let mut c = d.client();
    // Root's calls are never limited, and this one is not the stranger's.
    c.manager("List", json!({})).unwrap();
    let last = Command::new("setpriv")
        .args([
            "--reuid",
            "daemon",
            "--regid",
            "daemon",
            "--clear-groups",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_vtpmctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["stop", G1])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&last.stderr).contains("PermissionDenied"),
        "{last:?}"
    );
    let elapsed = began.elapsed();
    // Its line is written before the reply: in the file by now.
    d.stop();
    let log = read_log(&log_path);
    let all: Vec<&str> = log.lines().skip(lines_before).collect();
    let calls_logged = all
        .iter()
        .filter(|l| l.contains(" uid=1 ") && l.contains("allowed=false"))
        .count() as u64;
    let suppressed = suppressed_from(&log, "uid 1");
    let dropped: u64 = suppressed.iter().sum();
    eprintln!(
        "{} denied calls in {elapsed:?}: {} log lines in all, {calls_logged} of the calls, {} 'suppressed' lines counting {dropped}",
        denied + 1,
        all.len(),
        suppressed.len()
    );
    assert!(denied >= 40_000, "{report}");
    assert!(
        calls_logged <= bound(elapsed),
        "{calls_logged} lines in {elapsed:?}"
    );
    assert!(!suppressed.is_empty(), "no suppressed count");
    // Every call answered is on record, as a line or in a count (a call
    // cut off by the stranger's lifetime may be in neither of the replies).
    assert!(
        calls_logged + dropped > denied,
        "{calls_logged} + {dropped} < {}",
        denied + 1
    );
    assert!(
        (all.len() as u64) < bound(elapsed) * 3,
        "{} lines",
        all.len()
    );
}

/// The real swtpm from `PATH` (the test's, not the daemon's empty one).
fn real_swtpm() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("swtpm"))
                .find(|p| p.is_file())
        })
        .expect("swtpm on PATH")
}

#[test]
fn a_swtpm_flooding_its_output_is_logged_within_a_rate_and_its_lost_write_is_still_seen() {
    let (mut d, log_path) = logging_daemon("");
    // swtpm itself, with a companion that writes a hundred thousand lines
    // to the same stderr and then the line of a lost write; it lets go of
    // swtpm's control socket and key pipe first. vtpmd gives swtpm a
    // non-blocking pipe (swtpm must never wait for the log): the companion
    // retries a line the full pipe refused, so that none is lost however
    // busy the machine.
    let wrapper = d.root.path().join("noisy-tpm");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nsay() {{ while ! echo \"$1\" >&2 2>/dev/null; do :; done; }}\ncase \" $* \" in *\" --tpmstate \"*)\n  ( exec 3<&- 4<&-; i=0; while [ $i -lt {FLOOD_LINES} ]; do say \"flood line $i\"; i=$((i+1)); done; say 'SWTPM_NVRAM_StoreData: Error (fatal), data write of 1468 only wrote 4294967295' ) &\nesac\nexec {} \"$@\"\n",
            real_swtpm().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        &d.config,
        format!("{TEST_CONFIG}[swtpm]\nswtpm = \"{}\"\n", wrapper.display()),
    )
    .unwrap();
    d.restart();
    d.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let mut events = d.events();
    let began = Instant::now();
    d.start_guest(G1, PASS);
    let (_, event) = events
        .wait_for(G1, "store-failed", Duration::from_secs(60))
        .expect("the lost write after the flood was not seen");
    eprintln!("{event}");
    // Refused or not, the run ends and swtpm's output with it.
    let _ = d.client().manager("Stop", json!({"guest": G1}));
    let source = format!("swtpm of guest {G1}");
    // At its output's end the reader says what it dropped since.
    // Without one (as before the limit) the figures are still printed
    // below, and the asserts then say what is wrong.
    d.wait_state(G1, "failed", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = read_log(&log_path);
        if !suppressed_from(&log, &source).is_empty() || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = began.elapsed();
    let swtpm_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("swtpm: ") && l.contains(G1))
        .collect();
    let flood_logged = swtpm_lines
        .iter()
        .filter(|l| l.contains("flood line"))
        .count() as u64;
    let dropped: u64 = suppressed_from(&log, &source).iter().sum();
    eprintln!(
        "swtpm wrote {FLOOD_LINES}+ lines in {elapsed:?}: {} logged ({flood_logged} of the flood), {dropped} counted as suppressed; {} daemon log lines in all",
        swtpm_lines.len(),
        log.lines().count()
    );
    assert!(dropped > 0, "no suppressed count");
    assert!(
        swtpm_lines
            .iter()
            .any(|l| l.contains("SWTPM_NVRAM_StoreData")),
        "the lost write was not logged"
    );
    // The lost write is told beyond the rate.
    assert!(
        swtpm_lines.len() as u64 <= bound(elapsed) + 1,
        "{} lines",
        swtpm_lines.len()
    );
    assert!(
        flood_logged + dropped >= FLOOD_LINES,
        "{flood_logged} + {dropped} < {FLOOD_LINES}"
    );
    assert!(
        (log.lines().count() as u64) < 500,
        "the daemon's log is long"
    );
}
