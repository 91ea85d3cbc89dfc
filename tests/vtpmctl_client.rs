//! The real `vtpmctl` binary against a fake vtpmd: a Unix socket served by
//! a thread that reads each NUL-terminated call, checks it, and answers a
//! canned reply or error.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

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

// --- Whose socket is it? -------------------------------------------------
//
// An impostor (another uid) listening where vtpmctl looks must get nothing,
// least of all the passphrase. The impostor is this test binary re-run under
// setpriv as IMPOSTOR_UID (see `impostor_listener`), vtpmctl runs as a third
// uid, a caller without a passwd entry (setpriv needs none).

/// The impostor: nobody.
const IMPOSTOR_UID: u32 = 65534;
/// The operator running vtpmctl, unless a test needs a uid of its own.
const CALLER_UID: u32 = 64123;
const IMPOSTOR_SOCKET_ENV: &str = "VTPMCTL_TEST_IMPOSTOR_SOCKET";
const IMPOSTOR_LOG_ENV: &str = "VTPMCTL_TEST_IMPOSTOR_LOG";
const SENTINEL: &[u8] = b"test-sentinel";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Not a test on its own: the impostor's body when this binary is re-run
/// with its environment (does nothing otherwise). It listens on the socket
/// (connectable by anyone, as an impostor wants), then for every connection
/// appends one hex line of what it read up to a NUL or the end.
#[test]
fn impostor_listener() {
    let (Some(socket), Some(log)) = (
        std::env::var_os(IMPOSTOR_SOCKET_ENV),
        std::env::var_os(IMPOSTOR_LOG_ENV),
    ) else {
        return;
    };
    let listener = UnixListener::bind(&socket).unwrap();
    chmod(Path::new(&socket), 0o777);
    // Created once listening: the test waits for it.
    let mut log = std::fs::File::create(&log).unwrap();
    for conn in listener.incoming() {
        let mut conn = conn.unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8];
        while let Ok(1) = conn.read(&mut byte) {
            if byte[0] == 0 {
                break;
            }
            got.push(byte[0]);
        }
        log.write_all(format!("{}\n", hex(&got)).as_bytes())
            .unwrap();
    }
}

/// The impostor's process, listening on `socket` as IMPOSTOR_UID.
struct Impostor {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Impostor {
    /// Listens in `dir`, which must be writable by IMPOSTOR_UID.
    fn start(dir: &Path) -> Self {
        let socket = dir.join("vtpmd.sock");
        let log = dir.join("impostor.log");
        let uid = IMPOSTOR_UID.to_string();
        let child = Command::new("setpriv")
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["impostor_listener", "--exact", "--nocapture"])
            .env(IMPOSTOR_SOCKET_ENV, &socket)
            .env(IMPOSTOR_LOG_ENV, &log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut impostor = Self { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !impostor.log.exists() {
            if let Some(status) = impostor.child.try_wait().unwrap() {
                panic!("the impostor exited: {status}");
            }
            assert!(Instant::now() < deadline, "the impostor does not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        impostor
    }

    /// What each connection made to the impostor so far wrote, in order.
    fn received(&self) -> Vec<Vec<u8>> {
        // The connections are served one by one: once the sentinel's is
        // logged, every earlier one is.
        let mut marker = UnixStream::connect(&self.socket).unwrap();
        marker.write_all(SENTINEL).unwrap();
        marker.write_all(&[0]).unwrap();
        drop(marker);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines: Vec<Vec<u8>> = std::fs::read_to_string(&self.log)
                .unwrap()
                .lines()
                .map(unhex)
                .collect();
            if let Some(pos) = lines.iter().position(|l| l == SENTINEL) {
                return lines[..pos].to_vec();
            }
            assert!(Instant::now() < deadline, "the impostor logs nothing");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asserts that no passphrase, plain or base64, reached the impostor,
    /// and that nothing at all did: vtpmctl checks before writing.
    fn assert_got_nothing(&self) {
        let received = self.received();
        let all: Vec<u8> = received.concat();
        for secret in [PASSPHRASE, NEW_PASSPHRASE] {
            let b64 = Base64::encode_string(secret.as_bytes());
            for leaked in [secret.as_bytes(), b64.as_bytes()] {
                assert!(
                    !contains(&all, leaked),
                    "the impostor received a passphrase: {}",
                    text(&all)
                );
            }
        }
        assert!(
            received.iter().all(Vec::is_empty),
            "the impostor read {:?}",
            text(&all)
        );
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NEW_PASSPHRASE: &str = "tr0ub4dor&3";

/// A directory the caller can pass through, with passphrase files only the
/// caller can read.
struct CallerFiles {
    dir: tempfile::TempDir,
    pass: PathBuf,
    new_pass: PathBuf,
}

impl CallerFiles {
    fn new(caller: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vtpmctl-trust")
            .tempdir_in("/tmp")
            .unwrap();
        chmod(dir.path(), 0o711);
        let pass = dir.path().join("pass");
        let new_pass = dir.path().join("new-pass");
        for (file, secret) in [(&pass, PASSPHRASE), (&new_pass, NEW_PASSPHRASE)] {
            std::fs::write(file, format!("{secret}\n")).unwrap();
            chown(file, caller);
            chmod(file, 0o600);
        }
        Self {
            dir,
            pass,
            new_pass,
        }
    }

    /// Every subcommand that sends a passphrase, with these files.
    fn secret_calls(&self) -> Vec<Vec<String>> {
        let pass = self.pass.display().to_string();
        let new_pass = self.new_pass.display().to_string();
        let s = |v: &[&str]| v.iter().map(|&a| a.to_owned()).collect::<Vec<_>>();
        vec![
            s(&["start", GUEST, "--passphrase-file", &pass]),
            s(&["create", GUEST, "--passphrase-file", &pass]),
            s(&[
                "rekey",
                GUEST,
                "--passphrase-file",
                &pass,
                "--new-passphrase-file",
                &new_pass,
            ]),
            s(&["--json", "start", GUEST, "--passphrase-file", &pass]),
        ]
    }
}

/// vtpmctl as `caller`, with `socket` or (None) its default one, and no
/// XDG_RUNTIME_DIR (the case where the default lies in /tmp).
fn vtpmctl_as(caller: u32, socket: Option<&Path>, args: &[String]) -> Output {
    let uid = caller.to_string();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid, "--regid", &uid, "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vtpmctl"))
        .args(["--timeout", "20"])
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null());
    if let Some(socket) = socket {
        cmd.arg("--socket").arg(socket);
    }
    cmd.args(args).output().unwrap()
}

/// Asserts a refusal: exit 1, the reason on stderr, and with `--json` the
/// error's name and `check` on stdout.
fn assert_refused(out: &Output, args: &[String], check: &str, needles: &[String]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains("refusing to"), "{args:?}: {err}");
    for needle in needles {
        assert!(
            err.contains(needle.as_str()),
            "{args:?}: {needle:?} in {err}"
        );
    }
    if args.iter().any(|a| a == "--json") {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"], "io.vtpmd.vtpmctl.UntrustedSocket", "{v}");
        assert_eq!(v["parameters"]["check"], check, "{v}");
    } else {
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
    }
}

/// Removes a directory this test created at a fixed path when the test
/// ends, however.
struct RemoveOnDrop(PathBuf);

/// A uid without a passwd entry whose default socket directory,
/// `/tmp/vtpmd-<uid>`, did not exist and is now created here (so runs in
/// parallel, e.g. from several checkouts, never share one, and nobody's
/// real directory is touched).
fn claim_default_dir() -> (u32, RemoveOnDrop) {
    let start = std::process::id() % 1000;
    for i in 0..1000 {
        let uid = 64000 + (start + i) % 1000;
        if nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .unwrap()
            .is_some()
        {
            continue;
        }
        let dir = PathBuf::from(format!("/tmp/vtpmd-{uid}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return (uid, RemoveOnDrop(dir)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    }
    panic!("no free /tmp/vtpmd-<uid> for uids 64000-64999");
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn an_impostor_that_took_the_default_socket_directory_gets_no_passphrase() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    // What the impostor does before the caller's first vtpmctl: take the
    // caller's default directory in /tmp.
    let (caller, claimed) = claim_default_dir();
    let dir = claimed.0.clone();
    let files = CallerFiles::new(caller);
    chown(&dir, IMPOSTOR_UID);
    chmod(&dir, 0o755);
    let impostor = Impostor::start(&dir);

    let outs: Vec<(Vec<String>, Output)> = files
        .secret_calls()
        .into_iter()
        .map(|args| {
            let out = vtpmctl_as(caller, None, &args);
            (args, out)
        })
        .collect();
    // What matters most first: the impostor learnt nothing.
    impostor.assert_got_nothing();
    for (args, out) in &outs {
        assert_refused(
            out,
            args,
            "directory-owner",
            &[
                dir.display().to_string(),
                format!("uid {IMPOSTOR_UID}"),
                format!("expected root (uid 0) or you (uid {caller})"),
            ],
        );
        if args.iter().any(|a| a == "--json") {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let p = &v["parameters"];
            assert_eq!(p["uid"], IMPOSTOR_UID, "{v}");
            assert_eq!(p["expected_uids"], json!([0, caller]), "{v}");
            assert_eq!(p["socket"], impostor.socket.display().to_string(), "{v}");
            assert_eq!(p["passphrase"], true, "{v}");
        }
    }
}

#[test]
fn an_impostor_behind_a_trusted_looking_path_is_caught_by_its_credentials() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let files = CallerFiles::new(CALLER_UID);
    let dir = files.dir.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    chown(&dir, IMPOSTOR_UID);
    let impostor = Impostor::start(&dir);
    // The path now passes (root's directory, root's socket): only the
    // listener's uid gives it away, as after a swap between check and
    // connect.
    chown(&dir, 0);
    chmod(&dir, 0o755);
    chown(&impostor.socket, 0);

    let mut calls = files.secret_calls();
    calls.push(vec!["status".to_owned(), GUEST.to_owned()]);
    calls.push(vec!["--json".to_owned(), "list".to_owned()]);
    let outs: Vec<Output> = calls
        .iter()
        .map(|args| vtpmctl_as(CALLER_UID, Some(&impostor.socket), args))
        .collect();
    // Root trusts root alone.
    let as_root = vtpmctl(
        &impostor.socket,
        &[
            "--json",
            "start",
            GUEST,
            "--passphrase-file",
            files.pass.to_str().unwrap(),
        ],
        None,
    );
    // What matters most first: the impostor learnt nothing, though each
    // call connected (that is how its uid was seen).
    impostor.assert_got_nothing();
    assert_eq!(impostor.received().len(), calls.len() + 1);

    for (args, out) in calls.iter().zip(&outs) {
        assert_refused(
            out,
            args,
            "peer-uid",
            &[
                impostor.socket.display().to_string(),
                format!("runs as uid {IMPOSTOR_UID}"),
                format!("expected root (uid 0) or you (uid {CALLER_UID})"),
            ],
        );
    }
    let args = vec!["--json".to_owned()];
    assert_refused(
        &as_root,
        &args,
        "peer-uid",
        &["expected root (uid 0)".to_owned()],
    );
    let v: Value = serde_json::from_slice(&as_root.stdout).unwrap();
    assert_eq!(v["parameters"]["uid"], IMPOSTOR_UID, "{v}");
    assert_eq!(v["parameters"]["expected_uids"], json!([0]), "{v}");
}

#[test]
fn a_socket_directory_others_can_write_to_gets_no_passphrase() {
    // The listener is genuine (this process's uid): only the directory is
    // wrong, so a call without secrets goes through, with a warning.
    let daemon = FakeDaemon::start(1, |call| {
        assert_eq!(call["method"], "io.vtpmd.Manager.Status");
        vec![json!({ "parameters": { "guest": running_guest() } })]
    });
    let dir = daemon.socket.parent().unwrap().to_owned();
    let pass_dir = tempfile::tempdir().unwrap();
    let pass = pass_dir.path().join("pass");
    std::fs::write(&pass, PASSPHRASE).unwrap();
    let pass = pass.to_str().unwrap();
    for mode in [0o777, 0o1777, 0o770] {
        chmod(&dir, mode);
        for json in [false, true] {
            let mut args = vec!["start", GUEST, "--passphrase-file", pass];
            if json {
                args.push("--json");
            }
            let out = vtpmctl(&daemon.socket, &args, None);
            let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
            assert_refused(
                &out,
                &args,
                "directory-mode",
                &[dir.display().to_string(), format!("mode {mode:04o}")],
            );
            if json {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(v["parameters"]["mode"], format!("{mode:04o}"), "{v}");
            }
        }
    }
    let status = vtpmctl(&daemon.socket, &["status", GUEST], None);
    let seen = daemon.seen();
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    assert!(
        text(&status.stderr).contains("warning"),
        "{}",
        text(&status.stderr)
    );
    // The fake daemon saw that one call and nothing else.
    assert_eq!(seen.len(), 1);
    assert!(!contains(&seen[0].raw, b"passphrase"));
}

#[test]
fn the_real_daemon_is_trusted_by_root_and_by_other_users() {
    let d = common::Daemon::start();
    let files_dir = tempfile::tempdir().unwrap();
    let pass = files_dir.path().join("pass");
    std::fs::write(&pass, PASSPHRASE).unwrap();
    let pass = pass.to_str().unwrap();
    d.vtpmctl(&["create", GUEST, "--passphrase-file", pass]);
    let out = d.vtpmctl(&["start", GUEST, "--passphrase-file", pass]);
    assert!(out.contains("state:       running"), "{out}");
    d.vtpmctl(&["stop", GUEST]);
    if !is_root() {
        return;
    }
    // Another user passes vtpmctl's checks (vtpmd runs as root) and is
    // told no by vtpmd itself: it is in none of vtpmd's groups.
    let files = CallerFiles::new(CALLER_UID);
    let args: Vec<String> = ["--json", "start", GUEST, "--passphrase-file"]
        .iter()
        .map(|&a| a.to_owned())
        .chain([files.pass.display().to_string()])
        .collect();
    let out = vtpmctl_as(CALLER_UID, Some(&d.socket), &args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"], "io.vtpmd.Manager.PermissionDenied", "{v}");
}
