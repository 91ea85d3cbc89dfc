//! A real QEMU for tests: started with the caller's arguments (e.g. what
//! `vtpmctl attach-args --for qemu` prints), a QMP client on a unix socket,
//! and the guest's consoles captured through unix sockets that the
//! harness reads in the background.
//!
//! ```ignore
//! let mut vm = Qemu::builder().args(attach_args).debugcon(true).start();
//! vm.debugcon().wait_for("Press ESC", Duration::from_secs(30)).unwrap();
//! let tpms = vm.qmp.query_tpm().unwrap();
//! vm.qmp.system_reset().unwrap();
//! vm.qmp.wait_event("RESET", Duration::from_secs(5)).unwrap();
//! vm.quit(Duration::from_secs(10)); // or vm.kill()
//! ```
//!
//! - Consoles are QEMU `socket` chardevs in server mode with `wait=on`:
//!   QEMU does not run the guest before the harness has connected, so no
//!   early output is lost. Everything read is also written to
//!   `serial.log` / `debugcon.log` in [`Qemu::dir`].
//! - [`Console::wait_for`] matches a substring anywhere in the output after
//!   the console's cursor (SeaBIOS writes escape codes before lines, and a
//!   prompt has no newline yet), then moves the cursor past the match, so
//!   the next wait only sees newer output.
//! - The debug console (`isa-debugcon` on port 0x402) is where SeaBIOS
//!   writes its log *and* everything it prints on the screen (menus, "No
//!   bootable device."); with `-nodefaults` and no display, SeaBIOS prints
//!   nothing on the serial port.
//! - No KVM here: the machine is `q35,accel=tcg` unless changed.
//! - Dropping a [`Qemu`] SIGKILLs and reaps it (by its pid only).

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// How long QEMU may take to create its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one QMP command may take to answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The QEMU binary: `$VTPMD_TEST_QEMU`, else `qemu-system-x86_64` on
/// `PATH`. Panics with what to install when there is none.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VTPMD_TEST_QEMU") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("qemu-system-x86_64");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "qemu-system-x86_64 not found on PATH: install Debian's qemu-system-x86 \
         (or set VTPMD_TEST_QEMU)"
    );
}

/// What to start.
#[derive(Debug, Clone)]
pub struct QemuBuilder {
    binary: PathBuf,
    machine: String,
    memory_mib: u32,
    args: Vec<String>,
    debugcon: bool,
    paused: bool,
}

impl QemuBuilder {
    /// `-machine q35,accel=tcg -m 128`, no defaults, no display, no user
    /// config, QMP and a captured serial console.
    pub fn new() -> Self {
        Self {
            binary: binary(),
            machine: "q35,accel=tcg".to_owned(),
            memory_mib: 128,
            args: Vec::new(),
            debugcon: false,
            paused: false,
        }
    }

    /// The `-machine` value (default `q35,accel=tcg`).
    pub fn machine(mut self, machine: &str) -> Self {
        machine.clone_into(&mut self.machine);
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// One more argument, as QEMU gets it (no shell).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Capture the `isa-debugcon` port 0x402 (SeaBIOS's log and screen).
    pub fn debugcon(mut self, on: bool) -> Self {
        self.debugcon = on;
        self
    }

    /// Start with `-S` (CPUs stopped until [`Qmp::cont`]).
    pub fn paused(mut self, on: bool) -> Self {
        self.paused = on;
        self
    }

    /// The full command line [`start`](Self::start) runs, for files in `dir`.
    pub fn command_line(&self, dir: &Path) -> Vec<String> {
        let path = |name: &str| dir.join(name).to_str().unwrap().replace(',', ",,");
        let mut args = vec![
            "-machine".to_owned(),
            self.machine.clone(),
            "-m".to_owned(),
            self.memory_mib.to_string(),
            "-nodefaults".to_owned(),
            "-no-user-config".to_owned(),
            "-display".to_owned(),
            "none".to_owned(),
            "-chardev".to_owned(),
            format!(
                "socket,id=vtserial,path={},server=on,wait=on",
                path("serial.sock")
            ),
            "-serial".to_owned(),
            "chardev:vtserial".to_owned(),
        ];
        if self.debugcon {
            args.extend([
                "-chardev".to_owned(),
                format!(
                    "socket,id=vtdebugcon,path={},server=on,wait=on",
                    path("debugcon.sock")
                ),
                "-device".to_owned(),
                "isa-debugcon,iobase=0x402,chardev=vtdebugcon".to_owned(),
            ]);
        }
        args.extend([
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", path("qmp.sock")),
        ]);
        if self.paused {
            args.push("-S".to_owned());
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// Spawns QEMU, connects the consoles and QMP (capabilities negotiated).
    pub fn start(self) -> Qemu {
        let dir = tempfile::Builder::new()
            .prefix("vq")
            .tempdir_in("/tmp")
            .unwrap();
        let args = self.command_line(dir.path());
        let stderr = File::create(dir.path().join("qemu.stderr")).unwrap();
        let child = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        let started = Instant::now();
        let mut qemu = Qemu {
            child,
            started,
            exited: None,
            args,
            serial: None,
            debugcon: None,
            qmp: None,
            dir,
        };
        // In command-line order: QEMU waits on each console before it
        // creates the next socket.
        let serial = qemu.connect("serial.sock");
        qemu.serial = Some(Console::spawn(
            "serial",
            serial,
            qemu.dir.path().join("serial.log"),
        ));
        if self.debugcon {
            let debugcon = qemu.connect("debugcon.sock");
            qemu.debugcon = Some(Console::spawn(
                "debugcon",
                debugcon,
                qemu.dir.path().join("debugcon.log"),
            ));
        }
        let qmp = qemu.connect("qmp.sock");
        match Qmp::negotiate(qmp) {
            Ok(qmp) => qemu.qmp = Some(qmp),
            Err(e) => panic!("QMP: {e}\n{}", qemu.diagnostics()),
        }
        qemu
    }
}

impl Default for QemuBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A running (or exited) QEMU. Dropping it kills and reaps it.
pub struct Qemu {
    child: Child,
    /// When the process was spawned.
    pub started: Instant,
    exited: Option<(ExitStatus, Instant)>,
    args: Vec<String>,
    serial: Option<Console>,
    debugcon: Option<Console>,
    qmp: Option<Qmp>,
    /// Sockets, console logs and QEMU's stderr (`qemu.stderr`).
    pub dir: tempfile::TempDir,
}

impl fmt::Debug for Qemu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qemu")
            .field("pid", &self.child.id())
            .field("dir", &self.dir.path())
            .field("exited", &self.exited)
            .finish_non_exhaustive()
    }
}

impl Qemu {
    pub fn builder() -> QemuBuilder {
        QemuBuilder::new()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// The arguments QEMU was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().unwrap()
    }

    pub fn serial(&mut self) -> &mut Console {
        self.serial.as_mut().unwrap()
    }

    /// Panics unless started with [`QemuBuilder::debugcon`].
    pub fn debugcon(&mut self) -> &mut Console {
        self.debugcon
            .as_mut()
            .expect("started without debugcon(true)")
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default()
    }

    /// The command line, exit status, stderr and console tails: for panic
    /// messages.
    pub fn diagnostics(&self) -> String {
        let tail = |c: &Option<Console>| {
            c.as_ref().map_or_else(String::new, |c| {
                let all = c.contents();
                let start = all.len().saturating_sub(1500);
                all[start..].to_owned()
            })
        };
        format!(
            "qemu {:?}\nexit: {:?}\n--- stderr\n{}\n--- serial (tail)\n{}\n--- debugcon (tail)\n{}",
            self.args,
            self.exited.map(|(s, _)| s),
            self.stderr(),
            tail(&self.serial),
            tail(&self.debugcon),
        )
    }

    /// Whether the process has exited (reaps it if so).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some((status, _)) = self.exited {
            return Some(status);
        }
        let status = self.child.try_wait().unwrap()?;
        self.exited = Some((status, Instant::now()));
        Some(status)
    }

    /// When the exit was noticed (within 2 ms of it, by polling).
    pub fn exited_at(&self) -> Option<Instant> {
        self.exited.map(|(_, at)| at)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// QMP `quit`, then waits for the exit; panics if QEMU outlives `timeout`.
    pub fn quit(&mut self, timeout: Duration) -> ExitStatus {
        if self.try_wait().is_none() {
            if let Err(e) = self.qmp().quit() {
                panic!("QMP quit: {e}\n{}", self.diagnostics());
            }
        }
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "QEMU still runs {timeout:?} after quit\n{}",
                self.diagnostics()
            ),
        }
    }

    /// SIGKILL (to this pid only) and reap; returns when it is gone.
    pub fn kill(&mut self) -> ExitStatus {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let status = self.child.wait().unwrap();
            self.exited = Some((status, Instant::now()));
        }
        self.exited.unwrap().0
    }

    /// Connects to one of QEMU's server sockets, waiting for it to appear.
    fn connect(&mut self, name: &str) -> UnixStream {
        let path = self.dir.path().join(name);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match UnixStream::connect(&path) {
                Ok(stream) => return stream,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {}
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
            if self.try_wait().is_some() {
                panic!("QEMU exited during start-up\n{}", self.diagnostics());
            }
            if Instant::now() >= deadline {
                let _ = self.kill();
                panic!(
                    "QEMU did not create {name} within {START_TIMEOUT:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

// ---------------------------------------------------------------- consoles

#[derive(Default)]
struct ConsoleBuf {
    data: Vec<u8>,
    closed: bool,
}

/// A guest console read in the background (see the module docs).
pub struct Console {
    name: &'static str,
    shared: Arc<(Mutex<ConsoleBuf>, Condvar)>,
    cursor: usize,
    writer: UnixStream,
    log: PathBuf,
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("name", &self.name)
            .field("cursor", &self.cursor)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// [`Console::wait_for`] gave up.
#[derive(Debug, Clone)]
pub struct NotSeen {
    pub console: &'static str,
    pub marker: String,
    /// The console ended (QEMU exited or closed it) before the marker.
    pub closed: bool,
    /// What the console printed after the cursor.
    pub unmatched: String,
}

impl fmt::Display for NotSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} not seen on {}{}; output after the cursor:\n{}",
            self.marker,
            self.console,
            if self.closed { " (console closed)" } else { "" },
            self.unmatched
        )
    }
}

impl Console {
    fn spawn(name: &'static str, stream: UnixStream, log: PathBuf) -> Self {
        let shared = Arc::new((Mutex::new(ConsoleBuf::default()), Condvar::new()));
        let writer = stream.try_clone().unwrap();
        let (shared2, log2) = (Arc::clone(&shared), log.clone());
        std::thread::Builder::new()
            .name(format!("qemu-{name}"))
            .spawn(move || {
                let mut stream = stream;
                let mut file = File::create(&log2).ok();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => 0,
                        Ok(n) => n,
                    };
                    let (lock, cond) = &*shared2;
                    let mut buf = lock.lock().unwrap();
                    if n == 0 {
                        buf.closed = true;
                        cond.notify_all();
                        return;
                    }
                    buf.data.extend_from_slice(&chunk[..n]);
                    cond.notify_all();
                    drop(buf);
                    if let Some(file) = file.as_mut() {
                        let _ = file.write_all(&chunk[..n]);
                    }
                }
            })
            .unwrap();
        Self {
            name,
            shared,
            cursor: 0,
            writer,
            log,
        }
    }

    /// Everything the console printed so far (lossy UTF-8).
    pub fn contents(&self) -> String {
        let buf = self.shared.0.lock().unwrap();
        String::from_utf8_lossy(&buf.data).into_owned()
    }

    /// What it printed after the cursor.
    pub fn unread(&self) -> String {
        let buf = self.shared.0.lock().unwrap();
        String::from_utf8_lossy(&buf.data[self.cursor.min(buf.data.len())..]).into_owned()
    }

    /// The byte offset up to which output has been consumed.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Moves the cursor to the end: later waits only see newer output.
    pub fn skip_to_end(&mut self) {
        self.cursor = self.shared.0.lock().unwrap().data.len();
    }

    /// Where the console is also logged.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends bytes to the guest (serial input).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Waits until `marker` appears after the cursor, anywhere in a line;
    /// returns that whole line as far as it is printed (without its
    /// newline) and moves the cursor just past the marker.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String, NotSeen> {
        self.wait(marker, false, timeout)
    }

    /// Like [`wait_for`](Self::wait_for), but also waits for the end of
    /// that line, and moves the cursor past its newline.
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> Result<String, NotSeen> {
        self.wait(marker, true, timeout)
    }

    fn wait(
        &mut self,
        marker: &str,
        whole_line: bool,
        timeout: Duration,
    ) -> Result<String, NotSeen> {
        let deadline = Instant::now() + timeout;
        let needle = marker.as_bytes();
        let (lock, cond) = &*self.shared;
        let mut buf = lock.lock().unwrap();
        loop {
            let from = self.cursor.min(buf.data.len());
            if let Some(pos) = find(&buf.data[from..], needle) {
                let at = from + pos;
                let start = buf.data[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                let newline = buf.data[at..].iter().position(|&b| b == b'\n');
                if newline.is_some() || !whole_line {
                    let end = newline.map_or(buf.data.len(), |i| at + i);
                    let line = String::from_utf8_lossy(&buf.data[start..end])
                        .trim_end_matches('\r')
                        .to_owned();
                    self.cursor = if whole_line {
                        end + 1
                    } else {
                        at + needle.len()
                    };
                    return Ok(line);
                }
            }
            let now = Instant::now();
            if buf.closed || now >= deadline {
                return Err(NotSeen {
                    console: self.name,
                    marker: marker.to_owned(),
                    closed: buf.closed,
                    unmatched: String::from_utf8_lossy(&buf.data[from..]).into_owned(),
                });
            }
            buf = cond.wait_timeout(buf, deadline - now).unwrap().0;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

// -------------------------------------------------------------------- QMP

/// A QMP failure.
#[derive(Debug)]
pub enum QmpError {
    Io(std::io::Error),
    /// QEMU answered `{"error": {"class", "desc"}}`.
    Command {
        class: String,
        desc: String,
    },
    /// Unparseable input, or a reply that does not fit the requested type.
    Protocol(String),
    /// The socket was closed (QEMU is gone).
    Closed,
    /// No such event within the timeout.
    Timeout(String),
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "QMP I/O: {e}"),
            Self::Command { class, desc } => write!(f, "QMP error {class}: {desc}"),
            Self::Protocol(m) => write!(f, "QMP protocol: {m}"),
            Self::Closed => write!(f, "QMP socket closed"),
            Self::Timeout(m) => write!(f, "QMP timeout: {m}"),
        }
    }
}

impl std::error::Error for QmpError {}

/// One asynchronous event, with the instant the harness read it.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    pub received: Instant,
    /// The whole message (with QEMU's timestamp).
    pub raw: Value,
}

/// `query-tpm`'s elements.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TpmInfo {
    pub id: String,
    pub model: String,
    pub options: TpmOptions,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TpmOptions {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
}

/// `query-status`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VmStatus {
    pub status: String,
    pub running: bool,
}

/// A minimal QMP client: commands in order, events queued as they arrive.
pub struct Qmp {
    stream: BufReader<UnixStream>,
    partial: Vec<u8>,
    events: VecDeque<QmpEvent>,
    /// The greeting's `QMP.version`.
    pub version: Value,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version)
            .field("queued_events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Reads the greeting and sends `qmp_capabilities`.
    pub fn negotiate(stream: UnixStream) -> Result<Self, QmpError> {
        let mut qmp = Self {
            stream: BufReader::new(stream),
            partial: Vec::new(),
            events: VecDeque::new(),
            version: Value::Null,
        };
        let greeting = qmp.read_message(Instant::now() + QMP_TIMEOUT)?;
        let Some(version) = greeting.get("QMP").map(|q| q["version"].clone()) else {
            return Err(QmpError::Protocol(format!(
                "not a QMP greeting: {greeting}"
            )));
        };
        qmp.version = version;
        qmp.execute_value("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs a command; `arguments` is an object or `None`. Events read
    /// meanwhile are queued.
    pub fn execute_value(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(arguments) = arguments {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).unwrap();
        line.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&line)
            .map_err(QmpError::Io)?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let reply = self.read_message(deadline)?;
            if reply.get("event").is_some() {
                self.queue_event(reply);
            } else if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            } else if let Some(error) = reply.get("error") {
                return Err(QmpError::Command {
                    class: error["class"].as_str().unwrap_or("?").to_owned(),
                    desc: error["desc"].as_str().unwrap_or("?").to_owned(),
                });
            } else {
                return Err(QmpError::Protocol(format!("unexpected message {reply}")));
            }
        }
    }

    /// Runs a command and deserializes its `return`.
    pub fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute_value(command, arguments)?;
        serde_json::from_value(value.clone())
            .map_err(|e| QmpError::Protocol(format!("{command} returned {value}: {e}")))
    }

    pub fn query_tpm(&mut self) -> Result<Vec<TpmInfo>, QmpError> {
        self.execute("query-tpm", None)
    }

    pub fn query_tpm_models(&mut self) -> Result<Vec<String>, QmpError> {
        self.execute("query-tpm-models", None)
    }

    pub fn query_tpm_types(&mut self) -> Result<Vec<String>, QmpError> {
        self.execute("query-tpm-types", None)
    }

    pub fn query_status(&mut self) -> Result<VmStatus, QmpError> {
        self.execute("query-status", None)
    }

    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute_value("cont", None).map(drop)
    }

    pub fn system_reset(&mut self) -> Result<(), QmpError> {
        self.execute_value("system_reset", None).map(drop)
    }

    /// ACPI power button (a guest OS may shut down; firmware ignores it).
    pub fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute_value("system_powerdown", None).map(drop)
    }

    /// A key press on the PS/2 keyboard, by QEMU `qcode` (`esc`, `t`, `1`…).
    pub fn send_key(&mut self, qcode: &str) -> Result<(), QmpError> {
        self.execute_value(
            "send-key",
            Some(json!({ "keys": [{ "type": "qcode", "data": qcode }] })),
        )
        .map(drop)
    }

    /// `quit`; the socket closing before the reply counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute_value("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits for the next event named `name` (queued ones first; the
    /// others stay queued).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e.name == name) {
                return Ok(self.events.remove(i).unwrap());
            }
            match self.read_message(deadline) {
                Ok(msg) if msg.get("event").is_some() => self.queue_event(msg),
                Ok(msg) => {
                    return Err(QmpError::Protocol(format!("unsolicited message {msg}")));
                }
                Err(QmpError::Timeout(_)) => {
                    return Err(QmpError::Timeout(format!(
                        "no {name} event within {timeout:?}"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what has arrived (without blocking) and returns all queued
    /// events.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        loop {
            match self.read_message(Instant::now() + Duration::from_millis(1)) {
                Ok(msg) if msg.get("event").is_some() => self.queue_event(msg),
                _ => break,
            }
        }
        self.events.drain(..).collect()
    }

    fn queue_event(&mut self, msg: Value) {
        self.events.push_back(QmpEvent {
            name: msg["event"].as_str().unwrap_or_default().to_owned(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            received: Instant::now(),
            raw: msg,
        });
    }

    /// One JSON line. A partial line survives a timeout.
    fn read_message(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout("no message".to_owned()));
            }
            self.stream
                .get_ref()
                .set_read_timeout(Some(deadline - now))
                .map_err(QmpError::Io)?;
            match self.stream.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    return serde_json::from_str(text.trim())
                        .map_err(|e| QmpError::Protocol(format!("{e}: {text}")));
                }
                Ok(_) => return Err(QmpError::Closed),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(QmpError::Closed),
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
    }
}
