//! vtpmd's metrics, as an operator's Prometheus would read them: a
//! scripted sequence of calls on a real daemon (real swtpm, a VMM writing
//! NV), then the counters the sequence predicts, read three ways —
//! `GetMetrics` (and `vtpmctl metrics`), the HTTP `/metrics` listener and
//! the node_exporter textfile — each checked by `promtool check metrics`
//! (Debian's `prometheus` package; .ci/run installs it).

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, assert_error, b64};
use serde_json::json;

const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const G2: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASS: &str = "correct horse battery staple";

/// The value of one series (`name{labels}` exactly as rendered).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn calls(text: &str, method: &str, outcome: &str) -> f64 {
    value(
        text,
        &format!(r#"vtpmd_api_calls_total{{method="{method}",outcome="{outcome}"}}"#),
    )
}

/// `promtool check metrics` on `text`: clean means exit 0 and no finding.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): apt-get install prometheus (.ci/run installs it)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A GET of `/metrics` with `accept`: status line, headers, body.
fn http_get(port: u16, path: &str, accept: &str) -> (String, String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_owned(), headers.to_lowercase(), body.to_owned())
}

/// Create, a second Create, a Start with the wrong passphrase, a Start, a
/// VMM writing NV (reseals), Status, Stop, a Start of an unknown guest,
/// Delete: then every counter says exactly that.
#[test]
fn counters_move_as_a_scripted_sequence_of_calls_predicts_and_promtool_finds_nothing() {
    let port = free_port();
    let textfile_dir = tempfile::tempdir().unwrap();
    let textfile = textfile_dir.path().join("vtpmd.prom");
    let d = Daemon::start_with(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\ntextfile = \"{}\"\ntextfile_interval_s = 1\n",
        textfile.display()
    ));
    let mut c = d.client();
    c.manager(
        "Create",
        json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
    )
    .unwrap();
    assert_error(
        c.manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
        ),
        "GuestExists",
    );
    assert_error(
        c.manager("Start", json!({"guest": G1, "passphrase": b64("wrong")})),
        "WrongPassphrase",
    );
    let running = d.start_guest(G1, PASS);
    let ctrl = Path::new(running["ctrl_socket"].as_str().unwrap()).to_owned();
    let generation = running["generation"].as_u64().unwrap();
    let vmm = common::nv::attach_and_write_nv(&ctrl, b"metrics-nv-data");
    d.wait_generation_above(G1, generation, Duration::from_secs(20));
    c.manager("Status", json!({"guest": G1})).unwrap();
    c.manager("Stop", json!({"guest": G1})).unwrap();
    drop(vmm);
    assert_error(
        c.manager("Start", json!({"guest": G2, "passphrase": b64(PASS)})),
        "NoSuchGuest",
    );
    let before_delete = c.manager("GetMetrics", json!({})).unwrap();
    c.manager("Delete", json!({"guest": G1})).unwrap();

    let reply = c.manager("GetMetrics", json!({})).unwrap();
    assert_eq!(
        reply["content_type"], "text/plain; version=0.0.4; charset=utf-8",
        "{reply}"
    );
    let text = reply["text"].as_str().unwrap();
    eprintln!("{text}");
    assert_eq!(calls(text, "Create", "ok"), 1.0);
    assert_eq!(calls(text, "Create", "io.vtpmd.Manager.GuestExists"), 1.0);
    assert_eq!(
        calls(text, "Start", "io.vtpmd.Manager.WrongPassphrase"),
        1.0
    );
    // The harness's own Start, and no other.
    assert_eq!(calls(text, "Start", "ok"), 1.0);
    assert_eq!(calls(text, "Start", "io.vtpmd.Manager.NoSuchGuest"), 1.0);
    assert_eq!(calls(text, "Stop", "ok"), 1.0);
    assert_eq!(calls(text, "Delete", "ok"), 1.0);
    assert_eq!(
        calls(text, "GetMetrics", "ok"),
        1.0,
        "the one before Delete"
    );
    assert!(
        calls(text, "Status", "ok") >= 2.0,
        "the test's and the harness's"
    );
    assert_eq!(value(text, r#"vtpmd_events_total{kind="created"}"#), 1.0);
    assert_eq!(value(text, r#"vtpmd_events_total{kind="deleted"}"#), 1.0);
    // Both Starts that found the guest went through `starting`; the one
    // with the wrong passphrase fell back to `stopped`, as Stop did later.
    assert_eq!(value(text, r#"vtpmd_events_total{kind="starting"}"#), 2.0);
    assert_eq!(value(text, r#"vtpmd_events_total{kind="running"}"#), 1.0);
    assert_eq!(value(text, r#"vtpmd_events_total{kind="stopping"}"#), 1.0);
    assert_eq!(value(text, r#"vtpmd_events_total{kind="stopped"}"#), 2.0);
    let reseals = value(text, r#"vtpmd_events_total{kind="resealed"}"#);
    assert!(reseals >= 1.0, "{reseals}");
    assert_eq!(value(text, "vtpmd_reseal_latency_seconds_count"), reseals);
    assert!(value(text, "vtpmd_reseal_bytes_total") > 1000.0);
    assert_eq!(value(text, "vtpmd_reseal_failures_total"), 0.0);
    assert_eq!(value(text, "vtpmd_start_duration_seconds_count"), 1.0);
    assert_eq!(
        value(
            text,
            r#"vtpmd_start_phase_duration_seconds_count{phase="kdf"}"#
        ),
        1.0
    );
    assert_eq!(
        value(text, r#"vtpmd_swtpm_exits_total{cause="stopped"}"#),
        1.0
    );
    assert_eq!(value(text, r#"vtpmd_guests{state="stopped"}"#), 0.0);
    let before = before_delete["text"].as_str().unwrap();
    assert_eq!(value(before, r#"vtpmd_guests{state="stopped"}"#), 1.0);
    assert_eq!(value(text, "vtpmd_kdf_permits_in_use"), 0.0);
    assert_eq!(value(text, "vtpmd_kdf_queued"), 0.0);
    assert!(value(text, "vtpmd_api_connections_open") >= 1.0);
    assert!(text.contains("vtpmd_build_info{version=\""), "{text}");
    assert!(!text.contains(G1), "a guest id in a label");
    promtool_check(text);

    // OpenMetrics on request, over the API and over HTTP.
    let open = c
        .manager("GetMetrics", json!({"format": "openmetrics"}))
        .unwrap();
    assert!(open["text"].as_str().unwrap().ends_with("# EOF\n"));
    assert_error(
        c.manager("GetMetrics", json!({"format": "json"})),
        "InvalidParameter",
    );
    let (status, headers, body) = http_get(port, "/metrics", "text/plain");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    assert_eq!(
        value(
            &body,
            r#"vtpmd_api_calls_total{method="Delete",outcome="ok"}"#
        ),
        1.0
    );
    promtool_check(&body);
    let (_, headers, body) = http_get(
        port,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    );
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (status, _, _) = http_get(port, "/other", "*/*");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // The textfile, rewritten every second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let written = loop {
        let text = std::fs::read_to_string(&textfile).unwrap_or_default();
        if text.contains(r#"vtpmd_api_calls_total{method="Delete",outcome="ok"} 1"#) {
            break text;
        }
        assert!(Instant::now() < deadline, "textfile: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&written);
    let names: Vec<_> = std::fs::read_dir(textfile_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("vtpmd.prom")]);

    // vtpmctl prints the text.
    let printed = d.vtpmctl(&["metrics"]);
    assert!(printed.contains("vtpmd_build_info{"), "{printed}");
}

/// Only a loopback address may serve metrics; the config check says so.
#[test]
fn a_metrics_listener_off_loopback_is_refused_at_start() {
    for (bad, why) in [
        ("listen = \"0.0.0.0:9464\"", "not a loopback address"),
        ("listen = \"localhost\"", "not an address:port"),
        (
            "textfile = \"relative.prom\"",
            "absolute path ending in .prom",
        ),
        (
            "textfile = \"/tmp/vtpmd.txt\"",
            "absolute path ending in .prom",
        ),
        ("textfile_interval_s = 0", "at least 1"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("vtpmd.toml");
        std::fs::write(&config, format!("[metrics]\n{bad}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_vtpmd"))
            .arg("--config")
            .arg(&config)
            .arg("--check-config")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: accepted");
        assert!(stderr.contains(why), "{bad}: {stderr}");
    }
}
