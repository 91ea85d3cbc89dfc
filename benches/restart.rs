//! A restart of vtpmd under running guests: how long until every guest is
//! adopted and resealed, and what the VMMs notice (their TPM command
//! latency during the restart against the same load with no restart).
//! Prints figures, asserts nothing.
//!
//! `cargo bench --bench restart -- [--guests N] [--seconds S]` (256, 5: the
//! length of each window compared)
//!
//! Real parts: the vtpmd binary, real swtpm, one VMM thread per guest
//! attached as QEMU is, sending TPM2_GetRandom every 20 ms and an NV write
//! every second. The bench plays systemd's part in a restart: it is the
//! `NOTIFY_SOCKET` (READY=1, and the fd store: FDSTORE=1 / FDNAME= with
//! the key fds vtpmd pushes, FDSTOREREMOVE=1) and hands the stored fds to
//! the next vtpmd as `LISTEN_FDS`/`LISTEN_FDNAMES`, as systemd 252 does on
//! `systemctl restart` and on a crash with `Restart=`. Three restarts are
//! measured: SIGTERM (restart, upgrade), SIGKILL (crash) and SIGTERM
//! without the fd store (vtpmd run by hand: the guests are adopted, and
//! resealed only once the orchestrator's Start brings each passphrase).

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up should stop

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64ct::{Base64, Encoding};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde_json::{Value, json};
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};

const PASS: &str = "correct horse battery staple";
/// Cheap Argon2 for the set-up and the by-hand re-attach (a restart with
/// the fd store runs no KDF at all; with the defaults each re-attaching
/// Start costs one Argon2id of ~200 ms, see `cargo bench --bench vault`).
const CONFIG: &str = "[vault]\nargon2_memory_kib = 64\nargon2_iterations = 1\nargon2_lanes = 1\nallow_weak_kdf = true\n[api]\nmax_connections = 4096\nrequest_timeout_ms = 600000\n";
const NV_INDEX: u32 = 0x0150_0030;
const COMMAND_EVERY: Duration = Duration::from_millis(20);
const NV_EVERY: usize = 50;
const TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let mut guests = 256;
    let mut seconds = 5u64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--guests" => guests = it.next().and_then(|n| n.parse().ok()).unwrap(),
            "--seconds" => seconds = it.next().and_then(|n| n.parse().ok()).unwrap(),
            _ => {}
        }
    }
    raise_nofile();
    let root = tempfile::Builder::new()
        .prefix("vtr")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let mut m = Manager::new(root.path());
    m.spawn(true);
    m.wait_ready();
    let ids: Vec<String> = (0..guests)
        .map(|i| format!("7e570000-0000-4000-8000-{i:012x}"))
        .collect();
    let began = Instant::now();
    parallel(&ids, 8, |id| {
        m.call(
            "Create",
            json!({"guest": id, "version": "2.0", "model": "tpm-crb", "passphrase": b64(PASS)}),
        );
    });
    let ctrls: Vec<PathBuf> = parallel(&ids, 8, |id| {
        let g = m.call("Start", json!({"guest": id, "passphrase": b64(PASS)}));
        PathBuf::from(g["guest"]["ctrl_socket"].as_str().unwrap())
    });
    eprintln!(
        "{guests} guests created and started in {:?}",
        began.elapsed()
    );
    let load = Load::start(&ctrls);

    // Each restart is compared with the same load just before it, over
    // windows of the same length: the machine is shared and noisy, so
    // only adjacent windows compare fairly.
    let window = Duration::from_secs(seconds);
    println!(
        "{guests} guests, each VMM sending TPM2_GetRandom every {} ms (an NV write every {NV_EVERY}th); windows of {seconds} s",
        COMMAND_EVERY.as_millis()
    );
    println!(
        "| restart | stop (s) | to READY (s) | all adopted (s) | all resealed (s) | VMM p99 before / during (ms) | p99 ratio | VMM max before / during (ms) | commands | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, kill, keys) in [
        ("SIGTERM, fd store", false, true),
        ("SIGKILL, fd store", true, true),
        ("SIGTERM, by hand (Start re-attaches)", false, false),
    ] {
        load.window();
        std::thread::sleep(window);
        let quiet = load.window();
        eprintln!(
            "{name}: before, {} commands, p50 {:.2} ms",
            quiet.count, quiet.p50
        );
        let before = generations(&m, &ids);
        let r = m.restart(kill, keys);
        let adopted = m.wait_all(&ids, |g| g["state"] == "running");
        if !keys {
            parallel(&ids, 8, |id| {
                m.call("Start", json!({"guest": id, "passphrase": b64(PASS)}));
            });
        }
        // Resealing again: the key is back (no reason), and what the guest
        // wrote meanwhile is sealed (caught up at adoption or re-attach).
        let resealed = m.wait_all(&ids, |g| g.get("reason").is_none());
        let end = r.signalled + window;
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        let w = load.window();
        let after = generations(&m, &ids);
        let sealed_since: u64 = after
            .iter()
            .map(|(g, n)| n.saturating_sub(before.get(g).copied().unwrap_or(0)))
            .sum();
        let since = |t: Instant| t.duration_since(r.signalled).as_secs_f64();
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2} | {:.1} / {:.1} | {} | {} |",
            since(r.exited),
            since(r.ready),
            since(adopted),
            since(resealed),
            quiet.p99,
            w.p99,
            w.p99 / quiet.p99,
            quiet.max,
            w.max,
            w.count,
            w.failed + quiet.failed
        );
        eprintln!("{name}: {sealed_since} generations sealed during the window");
    }
    load.stop();
    m.call("Drain", json!({}));
    m.stop();
}

fn b64(s: &str) -> String {
    Base64::encode_string(s.as_bytes())
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// `f` over `items` from `threads` threads; results in order.
fn parallel<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    out.lock().unwrap()[i] = Some(r);
                }
            });
        }
    });
    out.into_inner()
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect()
}

fn generations(m: &Manager, ids: &[String]) -> BTreeMap<String, u64> {
    let list = m.call("List", json!({}));
    let _ = ids;
    list["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["guest"].as_str().unwrap().to_owned(),
                g["generation"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The service manager's part: the notify socket with its fd store, and
/// the vtpmd process.
struct Manager {
    dir: PathBuf,
    socket: PathBuf,
    notify: PathBuf,
    store: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    ready: Arc<Mutex<Option<Instant>>>,
    child: Option<Child>,
}

struct Restarted {
    signalled: Instant,
    exited: Instant,
    ready: Instant,
}

impl Manager {
    fn new(dir: &Path) -> Self {
        let notify = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&notify).unwrap();
        let store = Arc::new(Mutex::new(BTreeMap::new()));
        let ready = Arc::new(Mutex::new(None));
        let (s2, r2) = (Arc::clone(&store), Arc::clone(&ready));
        std::thread::spawn(move || receive(&rx, &s2, &r2));
        std::fs::write(dir.join("vtpmd.toml"), CONFIG).unwrap();
        Self {
            dir: dir.to_owned(),
            socket: dir.join("api.sock"),
            notify,
            store,
            ready,
            child: None,
        }
    }

    /// Starts vtpmd; with `keys`, the fd store's fds go to it at 3, 4, ...
    fn spawn(&mut self, keys: bool) -> Instant {
        *self.ready.lock().unwrap() = None;
        let stored: Vec<(String, RawFd)> = if keys {
            self.store
                .lock()
                .unwrap()
                .iter()
                .map(|(n, fd)| (n.clone(), fd.as_raw_fd()))
                .collect()
        } else {
            Vec::new()
        };
        let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
        // LISTEN_PID must be the daemon's own pid: a shell sets it to its
        // own and execs.
        let mut cmd = Command::new("/bin/sh");
        let script = if stored.is_empty() {
            "exec \"$0\" \"$@\""
        } else {
            "LISTEN_PID=$$ exec \"$0\" \"$@\""
        };
        cmd.arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_vtpmd"))
            .arg("--config")
            .arg(self.dir.join("vtpmd.toml"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--runtime-dir")
            .arg(self.dir.join("run"))
            .arg("--socket")
            .arg(&self.socket)
            .env("NOTIFY_SOCKET", &self.notify)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        if !stored.is_empty() {
            cmd.env("LISTEN_FDS", stored.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            let mut sources: Vec<RawFd> = stored.iter().map(|(_, fd)| *fd).collect();
            // SAFETY: only fcntl/dup2/close between fork and exec (async-
            // signal-safe), on a Vec allocated before the fork and changed
            // in place: every source is first copied above every target
            // (so no dup2 can overwrite a source not yet placed), then put
            // at 3, 4, ... without close-on-exec.
            unsafe {
                cmd.pre_exec(move || {
                    let above = 3 + i32::try_from(sources.len()).unwrap_or(i32::MAX) + 64;
                    for src in sources.iter_mut() {
                        let high = nix::libc::fcntl(*src, nix::libc::F_DUPFD_CLOEXEC, above);
                        if high < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        *src = high;
                    }
                    for (target, high) in (3..).zip(sources.iter()) {
                        if nix::libc::dup2(*high, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        nix::libc::close(*high);
                    }
                    Ok(())
                });
            }
        }
        let t = Instant::now();
        self.child = Some(cmd.spawn().unwrap());
        t
    }

    fn restart(&mut self, kill: bool, keys: bool) -> Restarted {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let signalled = Instant::now();
        let sig = if kill {
            nix::sys::signal::Signal::SIGKILL
        } else {
            nix::sys::signal::Signal::SIGTERM
        };
        nix::sys::signal::kill(pid, sig).unwrap();
        child.wait().unwrap();
        let exited = Instant::now();
        if !keys {
            // `systemctl stop` (or a vtpmd run by hand): no store.
            self.store.lock().unwrap().clear();
        }
        self.spawn(keys);
        let ready = self.wait_ready();
        Restarted {
            signalled,
            exited,
            ready,
        }
    }

    /// SIGTERM and reap (the guests were drained).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// When the daemon said READY=1.
    fn wait_ready(&self) -> Instant {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(t) = *self.ready.lock().unwrap() {
                return t;
            }
            assert!(Instant::now() < deadline, "no READY=1");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn call(&self, method: &str, params: Value) -> Value {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        let mut msg = serde_json::to_vec(
            &json!({"method": format!("io.vtpmd.Manager.{method}"), "parameters": params}),
        )
        .unwrap();
        msg.push(0);
        s.write_all(&msg).unwrap();
        let mut reply = Vec::new();
        let mut byte = [0u8; 4096];
        loop {
            let n = s.read(&mut byte).unwrap();
            assert!(n > 0, "connection closed");
            reply.extend_from_slice(&byte[..n]);
            if reply.last() == Some(&0) {
                break;
            }
        }
        reply.pop();
        let v: Value = serde_json::from_slice(&reply).unwrap();
        assert!(v.get("error").is_none(), "{method}: {v}");
        v["parameters"].clone()
    }

    /// When every guest of `ids` satisfied `pred` (polled on List).
    fn wait_all(&self, ids: &[String], pred: impl Fn(&Value) -> bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let list = self.call("List", json!({}));
            let guests = list["guests"].as_array().unwrap();
            if guests.len() == ids.len() && guests.iter().all(&pred) {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "guests did not settle");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The notify socket: READY=1 and the fd store.
fn receive(
    rx: &UnixDatagram,
    store: &Mutex<BTreeMap<String, OwnedFd>>,
    ready: &Mutex<Option<Instant>>,
) {
    let mut buf = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<()>(
            rx.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) else {
            return;
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel just installed these fds in this process.
                fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("stored")
            .to_owned();
        if text.lines().any(|l| l == "READY=1") {
            *ready.lock().unwrap() = Some(Instant::now());
        }
        if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            store.lock().unwrap().remove(&name);
        } else if text.lines().any(|l| l == "FDSTORE=1") {
            if let Some(fd) = fds.pop() {
                store.lock().unwrap().insert(name, fd);
            }
        }
    }
}

/// One VMM thread per guest, each recording its commands' latencies.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<f64>>>,
    failed: Arc<Mutex<usize>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Window {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
    failed: usize,
}

impl Load {
    fn start(ctrls: &[PathBuf]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0));
        let threads = ctrls
            .iter()
            .map(|ctrl| {
                let (ctrl, stop, samples, failed) = (
                    ctrl.clone(),
                    Arc::clone(&stop),
                    Arc::clone(&samples),
                    Arc::clone(&failed),
                );
                std::thread::spawn(move || {
                    let mut vmm = Vmm::attach(&ctrl, TIMEOUT).unwrap();
                    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
                    let attrs = nv_attr::OWNERREAD
                        | nv_attr::OWNERWRITE
                        | nv_attr::AUTHREAD
                        | nv_attr::AUTHWRITE;
                    let define = tpm::tpm2_nv_define_space(NV_INDEX, attrs, 8);
                    assert_eq!(vmm.transact(&define).unwrap().rc, 0);
                    let mut n: u64 = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let cmd = if n.is_multiple_of(NV_EVERY as u64) {
                            tpm::tpm2_nv_write(NV_INDEX, &n.to_be_bytes(), 0).unwrap()
                        } else {
                            tpm::tpm2_get_random(16)
                        };
                        let t = Instant::now();
                        let ok = vmm.transact(&cmd).map(|r| r.rc == 0).unwrap_or(false);
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        if ok {
                            samples.lock().unwrap().push(ms);
                        } else {
                            *failed.lock().unwrap() += 1;
                        }
                        std::thread::sleep(COMMAND_EVERY);
                    }
                    let _ = vmm.shutdown();
                })
            })
            .collect();
        Self {
            stop,
            samples,
            failed,
            threads,
        }
    }

    /// The latencies since the last window, and resets them.
    fn window(&self) -> Window {
        let mut s = std::mem::take(&mut *self.samples.lock().unwrap());
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        s.sort_by(f64::total_cmp);
        let pct = |p: usize| {
            s.get((s.len() * p / 100).min(s.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        Window {
            count: s.len(),
            p50: pct(50),
            p99: pct(99),
            max: s.last().copied().unwrap_or(0.0),
            failed,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
