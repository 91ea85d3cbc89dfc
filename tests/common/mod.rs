//! A real vtpmd for tests: the binary started on private directories, and
//! a plain Varlink client that speaks to its socket the way any client
//! would (raw NUL-terminated JSON).

#![allow(clippy::unwrap_used, dead_code)] // shared by several test files; each uses a part

pub mod cgroup;
pub mod etcd;
pub mod guest;
pub mod live;
pub mod nspawn;
pub mod nv;
pub mod qemu;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64ct::{Base64, Encoding};
use serde_json::{Value, json};

/// Argon2 parameters cheap enough for tests, allowed explicitly.
pub const TEST_CONFIG: &str = "[vault]\nargon2_memory_kib = 64\nargon2_iterations = 1\nargon2_lanes = 1\nallow_weak_kdf = true\n";

pub struct Daemon {
    pub child: Option<Child>,
    pub root: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// vtpmd's `RUST_LOG` ("warn" unless a test wants more).
    pub rust_log: String,
    /// Where vtpmd's stderr (its log) goes, appended; `None`: the test's.
    pub stderr_to: Option<PathBuf>,
}

impl Daemon {
    /// Starts vtpmd on fresh directories and waits until it answers.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Like [`start`](Self::start), with more TOML appended to the config.
    pub fn start_with(extra_config: &str) -> Self {
        Self::start_with_config(&format!("{TEST_CONFIG}{extra_config}"))
    }

    /// Starts vtpmd with exactly `config` (no test defaults: the real
    /// Argon2 parameters unless `config` says otherwise).
    pub fn start_with_config(config_text: &str) -> Self {
        Self::start_on(config_text, None)
    }

    /// Like [`start_with_config`](Self::start_with_config), with the
    /// runtime directory (swtpm's plaintext state, the control sockets) at
    /// `runtime_dir` rather than beside the state directory: production
    /// keeps it on tmpfs (`/run`).
    pub fn start_on(config_text: &str, runtime_dir: Option<PathBuf>) -> Self {
        let mut daemon = Self::unstarted(config_text, runtime_dir);
        daemon.restart();
        daemon
    }

    /// The fixture's directories and config, vtpmd not started yet (a test
    /// mounts a file system on `state_dir` or `runtime_dir` first, then
    /// calls [`restart`](Self::restart)).
    pub fn unstarted(config_text: &str, runtime_dir: Option<PathBuf>) -> Self {
        let root = tempfile::Builder::new()
            .prefix("vt")
            .tempdir_in("/tmp")
            .unwrap();
        // As root each guest's swtpm runs as its own uid, which must pass
        // through this directory to reach its runtime directory (vtpmd
        // refuses to start otherwise); /run is 0755 in production.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let config = root.path().join("vtpmd.toml");
        std::fs::write(&config, config_text).unwrap();
        Self {
            child: None,
            state_dir: root.path().join("state"),
            runtime_dir: runtime_dir.unwrap_or_else(|| root.path().join("run")),
            socket: root.path().join("api.sock"),
            config,
            rust_log: "warn".to_owned(),
            stderr_to: None,
            root,
        }
    }

    /// (Re)starts the binary on the same directories.
    pub fn restart(&mut self) {
        self.stop();
        let stderr = match &self.stderr_to {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::inherit(),
        };
        let child = self.command(&self.socket).stderr(stderr).spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Client::try_connect(&self.socket) {
                if c.call("org.varlink.service.GetInfo", json!({})).is_ok() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vtpmd exited during start-up: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "vtpmd did not answer within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    /// The vtpmd command line on this fixture's directories and `socket`.
    fn command(&self, socket: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vtpmd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--socket")
            .arg(socket)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null());
        cmd
    }

    /// SIGKILL and reap (a crash); guests' swtpms keep running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the binary on the same directories, where it must fail;
    /// returns its exit code and stderr.
    pub fn start_expecting_failure(&self, socket: &Path) -> (Option<i32>, String) {
        let out = self.command(socket).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// SIGTERM and wait; returns the exit status code. Guests' swtpms keep
    /// running (Drain stops them).
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vtpmd did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn client(&self) -> Client {
        Client::try_connect(&self.socket).unwrap()
    }

    /// Create of a TPM 2.0 guest under `passphrase`; the guest reply.
    pub fn create_guest(&self, guest: &str, passphrase: &str) -> Value {
        self.client()
            .manager(
                "Create",
                json!({"guest": guest, "version": "2.0", "passphrase": b64(passphrase)}),
            )
            .unwrap_or_else(|e| panic!("Create {guest}: {e:?}"))["guest"]
            .clone()
    }

    /// Start over a fresh connection; panics unless it succeeds.
    pub fn start_guest(&self, guest: &str, passphrase: &str) -> Value {
        self.client()
            .manager(
                "Start",
                json!({"guest": guest, "passphrase": b64(passphrase)}),
            )
            .unwrap()["guest"]
            .clone()
    }

    /// Status over a fresh connection.
    pub fn guest_status(&self, guest: &str) -> Value {
        self.client()
            .manager("Status", json!({"guest": guest}))
            .unwrap()["guest"]
            .clone()
    }

    /// Waits (on Status, briefly) until the guest reaches `state`.
    pub fn wait_state(&self, guest: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.guest_status(guest);
            if s["state"] == state {
                return s;
            }
            assert!(Instant::now() < deadline, "{guest} stuck in {s}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the daemon no longer knows the guest (NoSuchGuest).
    pub fn wait_gone(&self, guest: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.client().manager("Status", json!({ "guest": guest })) {
                Err(e) if e.name == "io.vtpmd.Manager.NoSuchGuest" => return,
                other => assert!(Instant::now() < deadline, "{guest} still there: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the guest was resealed past `generation`; the new one.
    pub fn wait_generation_above(&self, guest: &str, generation: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.guest_status(guest)["generation"].as_u64().unwrap();
            if now > generation {
                return now;
            }
            assert!(Instant::now() < deadline, "no reseal");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn sealed_file(&self, guest: &str) -> PathBuf {
        self.state_dir.join("guests").join(guest).join("tpm.sealed")
    }

    /// Runs the real vtpmctl against this daemon; panics unless it exits 0.
    pub fn vtpmctl(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vtpmctl {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The `args` array of `vtpmctl attach-args GUEST --for qemu --json`.
    pub fn qemu_attach_args(&self, guest: &str) -> Vec<String> {
        let out = self.vtpmctl(&["attach-args", guest, "--for", "qemu", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["for"], "qemu", "{v}");
        serde_json::from_value(v["args"].clone()).unwrap()
    }

    /// A `Monitor` stream read in the background.
    pub fn events(&self) -> Events {
        Events::subscribe(&self.socket)
    }
}

/// vtpmd's `Monitor` events, each with the instant the test read it.
pub struct Events {
    rx: std::sync::mpsc::Receiver<(Instant, Value)>,
    seen: Vec<(Instant, Value)>,
}

impl Events {
    /// Subscribes and returns once the "existing" events of the guests
    /// that `List` reports are read (vtpmd sends them before any change,
    /// so with at least one guest nothing later is missed).
    pub fn subscribe(socket: &Path) -> Self {
        let existing = Client::try_connect(socket)
            .unwrap()
            .manager("List", json!({}))
            .unwrap()["guests"]
            .as_array()
            .map_or(0, Vec::len);
        let mut stream = UnixStream::connect(socket).unwrap();
        let mut msg =
            serde_json::to_vec(&json!({"method": "io.vtpmd.Manager.Monitor", "more": true}))
                .unwrap();
        msg.push(0);
        stream.write_all(&msg).unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let read_one = |reader: &mut std::io::BufReader<UnixStream>| -> Option<Value> {
            let mut bytes = Vec::new();
            match std::io::BufRead::read_until(reader, 0, &mut bytes) {
                Ok(n) if n > 0 && bytes.ends_with(&[0]) => {}
                _ => return None, // vtpmd closed the stream
            }
            bytes.pop();
            let reply: Value = serde_json::from_slice(&bytes).ok()?;
            Some(reply["parameters"].clone())
        };
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..existing {
            let event = read_one(&mut reader).unwrap();
            tx.send((Instant::now(), event)).unwrap();
        }
        std::thread::spawn(move || {
            while let Some(event) = read_one(&mut reader) {
                if tx.send((Instant::now(), event)).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for the next event (after those already returned) for which
    /// `pred` holds; the skipped ones are kept in [`seen`](Self::seen).
    pub fn wait(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<(Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, event) = self.rx.recv_timeout(left).ok()?;
            self.seen.push((at, event.clone()));
            if pred(&event) {
                return Some((at, event));
            }
        }
    }

    /// The next event named `name` for `guest`.
    pub fn wait_for(
        &mut self,
        guest: &str,
        name: &str,
        timeout: Duration,
    ) -> Option<(Instant, Value)> {
        self.wait(timeout, |e| {
            e["event"] == name && e["guest"]["guest"] == guest
        })
    }

    /// Every event read so far, in order.
    pub fn seen(&self) -> &[(Instant, Value)] {
        &self.seen
    }

    /// Reads what has arrived without waiting; returns the events read now.
    pub fn drain(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok((at, event)) = self.rx.try_recv() {
            self.seen.push((at, event.clone()));
            out.push(event);
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A SIGTERM leaves guests running (they outlive vtpmd): stop them
        // first, then make sure no swtpm of this test outlives it.
        if self.child.is_some() {
            if let Ok(mut c) = Client::try_connect(&self.socket) {
                let _ = c.manager("Drain", json!({}));
            }
        }
        self.stop();
        kill_swtpms_under(&self.runtime_dir);
    }
}

/// Runs `cmd` (no stdin) and fails the test unless it succeeded.
pub fn run_ok(cmd: &mut Command) {
    let status = cmd.stdin(Stdio::null()).status().unwrap();
    assert!(status.success(), "{cmd:?}: {status}");
}

/// SIGKILLs every swtpm whose command line names `runtime_dir` (what a
/// test that fails half-way would otherwise leave behind).
pub fn kill_swtpms_under(runtime_dir: &Path) {
    for pid in swtpms_under(runtime_dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The live (not zombie) swtpm processes whose command line names
/// `runtime_dir`.
pub fn swtpms_under(runtime_dir: &Path) -> Vec<i32> {
    let needle = format!("dir={}/", runtime_dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("swtpm") && cmdline.contains(&needle) && is_alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

pub struct Client {
    stream: UnixStream,
}

/// An error reply: its Varlink name and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Remote {
    pub name: String,
    pub parameters: Value,
}

impl Client {
    pub fn try_connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self { stream })
    }

    /// How long a reply may take (60 s unless changed).
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
    }

    /// The connection itself, for tests that read or write around the
    /// protocol.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one NUL-terminated reply.
    pub fn read_reply(&mut self) -> Value {
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            let n = self.stream.read(&mut byte).unwrap();
            assert!(n == 1, "connection closed before a reply");
            if byte[0] == 0 {
                break;
            }
            bytes.push(byte[0]);
        }
        serde_json::from_slice(&bytes).unwrap()
    }

    pub fn call_with(
        &mut self,
        method: &str,
        parameters: Value,
        more: bool,
    ) -> Result<Value, Remote> {
        let mut msg = serde_json::to_vec(
            &json!({ "method": method, "parameters": parameters, "more": more }),
        )
        .unwrap();
        msg.push(0);
        self.send_raw(&msg);
        let reply = self.read_reply();
        // `parameters` is left out when empty, as the spec allows.
        let parameters = reply.get("parameters").cloned().unwrap_or(json!({}));
        match reply.get("error") {
            Some(name) => Err(Remote {
                name: name.as_str().unwrap().to_owned(),
                parameters,
            }),
            None => Ok(parameters),
        }
    }

    pub fn call(&mut self, method: &str, parameters: Value) -> Result<Value, Remote> {
        self.call_with(method, parameters, false)
    }

    pub fn manager(&mut self, member: &str, parameters: Value) -> Result<Value, Remote> {
        self.call(&format!("io.vtpmd.Manager.{member}"), parameters)
    }
}

pub fn b64(secret: &str) -> String {
    Base64::encode_string(secret.as_bytes())
}

pub fn b64_bytes(bytes: &[u8]) -> String {
    Base64::encode_string(bytes)
}

/// Asserts an error reply's name (short form, e.g. "NoSuchGuest").
pub fn assert_error(result: Result<Value, Remote>, name: &str) -> Remote {
    match result {
        Err(remote) => {
            assert!(
                remote.name.ends_with(&format!(".{name}")),
                "expected {name}, got {} {}",
                remote.name,
                remote.parameters
            );
            remote
        }
        Ok(v) => panic!("expected {name}, got success {v}"),
    }
}
