//! The real `vtpmctl` binary against a fake vtpmd: a Unix socket served by
//! a thread that reads each NUL-terminated call, checks it, and answers a
//! canned reply or error.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64ct::{Base64, Encoding};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{Value, json};

const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASSPHRASE: &str = "correct horse battery staple";

/// What the fake daemon saw of one call.
#[derive(Debug)]
struct Seen {
    call: Value,
    raw: Vec<u8>,
    /// The caller's argv and environment, read while it was connected.
    cmdline: Vec<u8>,
    environ: Vec<u8>,
}

struct FakeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    thread: JoinHandle<Vec<Seen>>,
}

impl FakeDaemon {
    /// Serves `connections` connections, one call each, answering with the
    /// messages `answer` returns (each NUL-terminated here).
    fn start(connections: usize, answer: fn(&Value) -> Vec<Value>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vtpmd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..connections {
                let conn = accept_within(&listener, Duration::from_secs(20));
                seen.push(serve_one(conn, answer));
            }
            seen
        });
        Self {
            _dir: dir,
            socket,
            thread,
        }
    }

    fn seen(self) -> Vec<Seen> {
        self.thread.join().unwrap()
    }
}

fn accept_within(listener: &UnixListener, limit: Duration) -> UnixStream {
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                return conn;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no client connected: {e}"),
        }
    }
}

fn serve_one(mut conn: UnixStream, answer: fn(&Value) -> Vec<Value>) -> Seen {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let pid = getsockopt(&conn, PeerCredentials).unwrap().pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let mut raw = Vec::new();
    let mut byte = [0u8];
    loop {
        conn.read_exact(&mut byte).unwrap();
        if byte[0] == 0 {
            break;
        }
        raw.push(byte[0]);
    }
    let call: Value = serde_json::from_slice(&raw).unwrap();
    for reply in answer(&call) {
        let mut bytes = serde_json::to_vec(&reply).unwrap();
        bytes.push(0);
        if conn.write_all(&bytes).is_err() {
            break;
        }
    }
    Seen {
        call,
        raw,
        cmdline,
        environ,
    }
}

fn running_guest() -> Value {
    json!({
        "guest": GUEST,
        "version": "2.0",
        "model": "tpm-crb",
        "state": "running",
        "pid": 4242,
        "ctrl_socket": format!("/run/vtpmd/guests/{GUEST}/ctrl.sock"),
        "generation": 7
    })
}

fn vtpmctl(socket: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
        .arg("--socket")
        .arg(socket)
        // A fake daemon that panics does not answer: fail fast.
        .args(["--timeout", "20"])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        // A child that fails before reading closes the pipe: not our error.
        let _ = child.stdin.take().unwrap().write_all(input);
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn status_prints_key_values_or_the_reply_as_json() {
    let daemon = FakeDaemon::start(2, |call| {
        assert_eq!(call["method"], "io.vtpmd.Manager.Status");
        assert_eq!(call["parameters"], json!({ "guest": GUEST }));
        vec![json!({ "parameters": { "guest": running_guest() } })]
    });
    let human = vtpmctl(&daemon.socket, &["status", GUEST], None);
    let json_out = vtpmctl(&daemon.socket, &["status", GUEST, "--json"], None);
    daemon.seen();

    assert_eq!(human.status.code(), Some(0), "{}", text(&human.stderr));
    let out = text(&human.stdout);
    assert!(out.contains(&format!("guest:       {GUEST}\n")), "{out}");
    assert!(out.contains("state:       running\n"), "{out}");
    assert!(out.contains("model:       tpm-crb\n"), "{out}");

    assert_eq!(json_out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(v, json!({ "guest": running_guest() }));
}

#[test]
fn start_sends_the_file_as_base64_and_never_puts_it_in_argv_or_env() {
    let daemon = FakeDaemon::start(2, |call| {
        assert_eq!(call["method"], "io.vtpmd.Manager.Start");
        let expected = Base64::encode_string(PASSPHRASE.as_bytes());
        assert_eq!(call["parameters"]["passphrase"], expected.as_str());
        assert_eq!(call["parameters"]["guest"], GUEST);
        vec![json!({ "parameters": { "guest": running_guest() } })]
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pass");
    std::fs::write(&file, format!("{PASSPHRASE}\n")).unwrap();
    let from_file = vtpmctl(
        &daemon.socket,
        &["start", GUEST, "--passphrase-file", file.to_str().unwrap()],
        None,
    );
    let from_stdin = vtpmctl(
        &daemon.socket,
        &["start", GUEST, "--passphrase-file", "-"],
        Some(PASSPHRASE.as_bytes()),
    );
    let seen = daemon.seen();

    for out in [&from_file, &from_stdin] {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("state:       running"));
    }
    for s in &seen {
        assert_eq!(s.call["method"], "io.vtpmd.Manager.Start");
        assert!(!s.cmdline.is_empty(), "the caller's argv was read");
        assert!(contains(&s.cmdline, b"--passphrase-file"));
        assert!(!contains(&s.cmdline, PASSPHRASE.as_bytes()));
        assert!(!contains(&s.environ, PASSPHRASE.as_bytes()));
        // The raw call: the base64 appears, the plain text does not.
        assert!(!contains(&s.raw, PASSPHRASE.as_bytes()));
    }
}

#[test]
fn an_error_reply_exits_1_with_a_readable_message() {
    let daemon = FakeDaemon::start(2, |_| {
        vec![json!({
            "error": "io.vtpmd.Manager.WrongPassphrase",
            "parameters": { "guest": GUEST }
        })]
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pass");
    std::fs::write(&file, "wrong").unwrap();
    let file = file.to_str().unwrap();
    let human = vtpmctl(
        &daemon.socket,
        &["start", GUEST, "--passphrase-file", file],
        None,
    );
    let json_out = vtpmctl(
        &daemon.socket,
        &["--json", "start", GUEST, "--passphrase-file", file],
        None,
    );
    daemon.seen();

    assert_eq!(human.status.code(), Some(1));
    assert_eq!(
        text(&human.stderr),
        format!("vtpmctl: io.vtpmd.Manager.WrongPassphrase: guest {GUEST}: wrong passphrase\n")
    );
    assert!(human.stdout.is_empty());

    assert_eq!(json_out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(
        v,
        json!({ "error": "io.vtpmd.Manager.WrongPassphrase", "parameters": { "guest": GUEST } })
    );
}

#[test]
fn swtpm_failures_print_the_log_tail() {
    let daemon = FakeDaemon::start(1, |_| {
        vec![json!({
            "error": "io.vtpmd.Manager.SwtpmFailed",
            "parameters": { "guest": GUEST, "message": "swtpm exited with status 1",
                            "log_tail": ["Verification of HMAC failed"] }
        })]
    });
    let out = vtpmctl(&daemon.socket, &["stop", GUEST], None);
    daemon.seen();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("swtpm failed: swtpm exited with status 1"),
        "{err}"
    );
    assert!(err.contains("\n  Verification of HMAC failed"), "{err}");
}

#[test]
fn attach_args_for_qemu_uses_the_running_guest_socket_and_model() {
    let daemon = FakeDaemon::start(2, |call| {
        assert_eq!(call["method"], "io.vtpmd.Manager.Status");
        vec![json!({ "parameters": { "guest": running_guest() } })]
    });
    let human = vtpmctl(
        &daemon.socket,
        &["attach-args", GUEST, "--for", "qemu"],
        None,
    );
    let json_out = vtpmctl(
        &daemon.socket,
        &[
            "attach-args",
            GUEST,
            "--for",
            "qemu",
            "--json",
            "--id",
            "vtpm",
        ],
        None,
    );
    daemon.seen();

    assert_eq!(human.status.code(), Some(0), "{}", text(&human.stderr));
    assert_eq!(
        text(&human.stdout),
        format!(
            "-chardev socket,id=chrtpm0,path=/run/vtpmd/guests/{GUEST}/ctrl.sock \
             -tpmdev emulator,id=tpm0,chardev=chrtpm0 -device tpm-crb,tpmdev=tpm0\n"
        )
    );
    let v: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(v["for"], "qemu");
    assert_eq!(v["args"][3], "emulator,id=vtpm,chardev=chrvtpm");
}

#[test]
fn attach_args_refuses_a_stopped_guest() {
    let daemon = FakeDaemon::start(1, |_| {
        let mut g = running_guest();
        g["state"] = "stopped".into();
        let g = g.as_object_mut().map(|m| {
            m.remove("pid");
            m.remove("ctrl_socket");
            Value::Object(m.clone())
        });
        vec![json!({ "parameters": { "guest": g } })]
    });
    let out = vtpmctl(
        &daemon.socket,
        &["attach-args", GUEST, "--for", "libvirt"],
        None,
    );
    daemon.seen();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("not running (state: stopped)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn monitor_stops_after_count_events() {
    let daemon = FakeDaemon::start(1, |call| {
        assert_eq!(call["method"], "io.vtpmd.Manager.Monitor");
        assert_eq!(call["more"], true);
        ["existing", "stopped", "running"]
            .iter()
            .map(|e| json!({ "parameters": { "event": e, "guest": running_guest() }, "continues": true }))
            .collect()
    });
    let out = vtpmctl(&daemon.socket, &["monitor", "--count", "2", "--json"], None);
    daemon.seen();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["event"], "existing");
    assert_eq!(lines[1]["event"], "stopped");
}

#[test]
fn a_missing_socket_exits_6_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-daemon.sock");
    let out = vtpmctl(&socket, &["list"], None);
    assert_eq!(out.status.code(), Some(6));
    let err = text(&out.stderr);
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(err.contains("is the daemon running"), "{err}");
}

#[test]
fn no_passphrase_source_is_a_local_failure() {
    // stdin is not a terminal and no file is given: nothing to prompt on.
    let daemon_less = tempfile::tempdir().unwrap();
    let out = vtpmctl(
        &daemon_less.path().join("unused.sock"),
        &["start", GUEST],
        None,
    );
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("--passphrase-file"),
        "{}",
        text(&out.stderr)
    );
}
