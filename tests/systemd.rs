//! The systemd integration: the unit files as systemd-analyze judges them,
//! the sysusers.d/tmpfiles.d snippets and scripts/install, and the real
//! vtpmd binary speaking the service protocol (sd_notify with READY,
//! STATUS, WATCHDOG and STOPPING; socket activation through
//! systemd-socket-activate). PID 1 here is not systemd, so the units are
//! checked offline and the protocol against what systemd would see.

#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::nspawn::{Container, Probed, bind_ro};
use common::{Client, TEST_CONFIG, b64};
use serde_json::json;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VTPMD: &str = env!("CARGO_BIN_EXE_vtpmd");
/// The exposure target of issue 6, in systemd-analyze's tenths.
const EXPOSURE_THRESHOLD: u32 = 15;
const GUEST: &str = "5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f";
const PASS: &str = "correct horse battery staple";

/// The systemd tool `name`, or `None` (with the reason printed) when it is
/// not installed: CI installs the `systemd` package.
fn tool(name: &str) -> Option<PathBuf> {
    let path = ["/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists());
    if path.is_none() {
        eprintln!("SKIPPED: {name} is not installed (Debian package `systemd`)");
    }
    path
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    eprintln!(
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn unit(name: &str) -> PathBuf {
    Path::new(REPO).join("systemd").join(name)
}

// ---------------------------------------------------------------- the unit

#[test]
fn the_unit_exposure_stays_at_or_below_1_5() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let out = run(Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={EXPOSURE_THRESHOLD}"))
        .arg(unit("vtpmd.service")));
    let text = String::from_utf8_lossy(&out.stdout);
    let score = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for vtpmd.service: "))
        .map(|(_, rest)| rest.split_whitespace().next().unwrap().to_owned())
        .expect("no overall exposure line");
    let score: f64 = score.parse().unwrap();
    eprintln!("vtpmd.service exposure: {score}");
    assert!(
        out.status.success() && score <= 1.5,
        "exposure {score} is above 1.5: see the ✗ lines above"
    );
}

#[test]
fn the_units_verify_clean() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    // verify wants ExecStart's binary to exist: point it at the one cargo
    // built, exactly as scripts/install rewrites it for another PREFIX.
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(unit("vtpmd.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/vtpmd "));
    std::fs::write(
        dir.path().join("vtpmd.service"),
        service.replace("/usr/local/bin/vtpmd", VTPMD),
    )
    .unwrap();
    std::fs::copy(unit("vtpmd.socket"), dir.path().join("vtpmd.socket")).unwrap();
    let out = run(Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.path().join("vtpmd.service"))
        .arg(dir.path().join("vtpmd.socket")));
    assert!(out.status.success(), "systemd-analyze verify failed");
    // Unknown keys and bad values are only warnings: none may appear.
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify reported something"
    );
}

#[test]
fn the_unit_keeps_the_settings_the_daemon_relies_on() {
    let service = std::fs::read_to_string(unit("vtpmd.service")).unwrap();
    let socket = std::fs::read_to_string(unit("vtpmd.socket")).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=mixed",
        "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_CHOWN",
        "SystemCallFilter=@system-service memfd_secret",
        "RuntimeDirectory=vtpmd",
        "RuntimeDirectoryMode=0711",
        "RuntimeDirectoryPreserve=yes",
        "StateDirectoryMode=0700",
        "PrivateTmp=yes",
        "MemorySwapMax=0",
        "LimitCORE=0",
    ] {
        assert!(service.lines().any(|l| l == line), "missing {line}");
    }
    assert!(service.lines().any(|l| l.starts_with("WatchdogSec=")));
    for line in [
        "ListenStream=/run/vtpmd/vtpmd.sock",
        "SocketMode=0666",
        "DirectoryMode=0711",
    ] {
        assert!(socket.lines().any(|l| l == line), "missing {line}");
    }
}

#[test]
fn sysusers_and_tmpfiles_snippets_create_groups_and_directories() {
    let (Some(sysusers), Some(tmpfiles)) = (tool("systemd-sysusers"), tool("systemd-tmpfiles"))
    else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    for file in ["passwd", "group"] {
        std::fs::copy(
            Path::new("/etc").join(file),
            root.path().join("etc").join(file),
        )
        .unwrap();
    }
    let out = run(Command::new(sysusers)
        .arg(format!("--root={}", root.path().display()))
        .arg(unit("sysusers.d/vtpmd.conf")));
    assert!(out.status.success());
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    for name in ["vtpmd", "vtpmd-ro"] {
        assert!(
            group.lines().any(|l| l.starts_with(&format!("{name}:"))),
            "no group {name}"
        );
    }
    let out = run(Command::new(tmpfiles)
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(unit("tmpfiles.d/vtpmd.conf")));
    assert!(out.status.success());
    for (dir, mode) in [("var/lib/vtpmd", 0o700), ("run/vtpmd", 0o711)] {
        let meta = std::fs::metadata(root.path().join(dir)).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir}");
    }
}

#[test]
fn install_stages_everything_and_is_idempotent() {
    let dest = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(VTPMD).parent().unwrap();
    let install = || {
        run(Command::new("bash")
            .arg(Path::new(REPO).join("scripts/install"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .env("DESTDIR", dest.path())
            .env("PREFIX", "/usr"))
    };
    assert!(install().status.success());
    let d = |p: &str| dest.path().join(p.trim_start_matches('/'));
    for (path, mode) in [
        ("/usr/bin/vtpmd", 0o755),
        ("/usr/bin/vtpmctl", 0o755),
        ("/usr/lib/systemd/system/vtpmd.service", 0o644),
        ("/usr/lib/systemd/system/vtpmd.socket", 0o644),
        ("/usr/lib/sysusers.d/vtpmd.conf", 0o644),
        ("/usr/lib/tmpfiles.d/vtpmd.conf", 0o644),
        ("/usr/share/doc/vtpmd/README.md", 0o644),
        ("/etc/vtpmd/vtpmd.toml", 0o644),
    ] {
        let meta = std::fs::metadata(d(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
    }
    let service = std::fs::read_to_string(d("/usr/lib/systemd/system/vtpmd.service")).unwrap();
    assert!(service.contains("\nExecStart=/usr/bin/vtpmd --config /etc/vtpmd/vtpmd.toml\n"));
    assert!(!service.contains("/usr/local/"), "PREFIX not applied");
    // The config it writes is valid and names the sysusers.d groups.
    let config_path = d("/etc/vtpmd/vtpmd.toml");
    let config = vtpmd::config::Config::load(&config_path).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(config.api.admin_group.as_deref(), Some("vtpmd"));
    assert_eq!(config.api.readonly_group.as_deref(), Some("vtpmd-ro"));

    // Again: the same tree, and an administrator's config is kept.
    std::fs::write(&config_path, "# mine\n").unwrap();
    assert!(install().status.success());
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), "# mine\n");
    assert!(d("/usr/bin/vtpmd").exists());
}

// ------------------------------------------------------- the protocol, live

/// Private directories and a config for one vtpmd.
struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("vt")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(root.path().join("vtpmd.toml"), TEST_CONFIG).unwrap();
        Self { root }
    }

    fn socket(&self) -> PathBuf {
        self.root.path().join("api.sock")
    }

    fn vtpmd_args(&self) -> Vec<OsString> {
        let p = self.root.path();
        [
            "--config".into(),
            p.join("vtpmd.toml").into(),
            "--state-dir".into(),
            p.join("state").into(),
            "--runtime-dir".into(),
            p.join("run").into(),
            "--socket".into(),
            self.socket().into(),
        ]
        .into()
    }
}

impl Drop for Dirs {
    /// A SIGTERM leaves guests running (they outlive vtpmd): no swtpm of a
    /// test may outlive it.
    fn drop(&mut self) {
        common::kill_swtpms_under(&self.root.path().join("run"));
    }
}

/// `program args` with a clean systemd environment plus `env`.
fn spawn(program: &Path, args: &[OsString], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(program);
    cmd.args(args).env("RUST_LOG", "warn");
    for var in [
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// Waits for `child` to exit; its exit code.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vtpmd did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the child if a test fails half-way.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The manager's end of NOTIFY_SOCKET: every datagram, in order.
struct Manager {
    socket: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Manager {
    fn bind(addr: &SocketAddr) -> Self {
        let socket = UnixDatagram::bind_addr(addr).unwrap();
        Self {
            socket,
            seen: Vec::new(),
        }
    }

    /// Reads datagrams until one has the line `line`; `None` on timeout.
    fn wait_for(&mut self, line: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = self.socket.recv(&mut buf) else {
                return None;
            };
            let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
            self.seen.push((Instant::now(), msg.clone()));
            if msg.lines().any(|l| l == line) {
                return Some(msg);
            }
        }
    }

    /// Every datagram read during `period`.
    fn collect(&mut self, period: Duration) -> Vec<String> {
        let start = self.seen.len();
        let _ = self.wait_for("\u{0}never", period);
        self.seen[start..].iter().map(|(_, m)| m.clone()).collect()
    }
}

fn get_info(socket: &Path) -> bool {
    Client::try_connect(socket)
        .ok()
        .is_some_and(|mut c| c.call("org.varlink.service.GetInfo", json!({})).is_ok())
}

fn create_and_start(socket: &Path) -> serde_json::Value {
    let mut c = Client::try_connect(socket).unwrap();
    c.manager(
        "Create",
        json!({"guest": GUEST, "version": "2.0", "model": "tpm-crb", "passphrase": b64(PASS)}),
    )
    .unwrap();
    c.manager("Start", json!({"guest": GUEST, "passphrase": b64(PASS)}))
        .unwrap()["guest"]
        .clone()
}

#[test]
fn notify_reports_ready_status_watchdog_and_stopping() {
    let dirs = Dirs::new();
    let notify = dirs.root.path().join("notify");
    let mut manager = Manager::bind(&SocketAddr::from_pathname(&notify).unwrap());
    let mut daemon = Reap(spawn(
        Path::new(VTPMD),
        &dirs.vtpmd_args(),
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    ));

    // READY=1, and by then the API answers.
    let ready = manager
        .wait_for("READY=1", Duration::from_secs(20))
        .expect("no READY=1 within 20 s");
    assert!(get_info(&dirs.socket()), "READY=1 before the API answers");
    assert!(
        ready.lines().any(|l| l == "STATUS=0 guests running"),
        "{ready:?}"
    );

    // WATCHDOG=1 at half of WATCHDOG_USEC (every 100 ms).
    let pings = manager
        .collect(Duration::from_millis(1000))
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(pings >= 4, "only {pings} WATCHDOG=1 in 1 s at 200 ms");

    // STATUS= follows the running guests.
    create_and_start(&dirs.socket());
    manager
        .wait_for("STATUS=1 guest running", Duration::from_secs(10))
        .expect("no STATUS= after Start");

    // SIGTERM: STOPPING=1 first, then exit 0.
    sigterm(&daemon.0);
    let stopping = manager
        .wait_for("STOPPING=1", Duration::from_secs(10))
        .expect("no STOPPING=1 after SIGTERM");
    assert!(
        stopping.contains("STATUS=stopping, 1 guest running"),
        "{stopping:?}"
    );
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(30)), Some(0));
    assert!(
        !dirs.socket().exists(),
        "a socket vtpmd bound itself is removed at exit"
    );
}

#[test]
fn notify_reaches_an_abstract_socket_and_the_watchdog_is_for_its_pid_only() {
    let dirs = Dirs::new();
    let name = format!(
        "vtpmd-test-{}-{}",
        std::process::id(),
        dirs.root.path().file_name().unwrap().to_string_lossy()
    );
    let mut manager = Manager::bind(&SocketAddr::from_abstract_name(&name).unwrap());
    let mut daemon = Reap(spawn(
        Path::new(VTPMD),
        &dirs.vtpmd_args(),
        &[
            ("NOTIFY_SOCKET", &format!("@{name}")),
            ("WATCHDOG_USEC", "100000"),
            // The watchdog belongs to another process (e.g. a wrapper).
            ("WATCHDOG_PID", "1"),
        ],
    ));
    manager
        .wait_for("READY=1", Duration::from_secs(20))
        .expect("no READY=1 on the abstract socket");
    let seen = manager.collect(Duration::from_millis(500));
    assert!(
        !seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "pinged a watchdog meant for pid 1: {seen:?}"
    );
    sigterm(&daemon.0);
    manager
        .wait_for("STOPPING=1", Duration::from_secs(10))
        .expect("no STOPPING=1");
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(30)), Some(0));
}

#[test]
fn socket_activation_serves_the_passed_socket_and_leaves_it_in_place() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let dirs = Dirs::new();
    let socket = dirs.socket();
    let mut args: Vec<OsString> = vec![
        "-l".into(),
        socket.clone().into(),
        "-E".into(),
        "RUST_LOG=warn".into(),
        VTPMD.into(),
    ];
    args.extend(dirs.vtpmd_args());
    // systemd-socket-activate binds, waits for the first connection, then
    // execs vtpmd in its own process with LISTEN_FDS=1 and LISTEN_PID.
    let mut daemon = Reap(spawn(&activate, &args, &[]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not bind"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let inode = std::fs::metadata(&socket).unwrap();
    assert!(inode.file_type().is_socket());
    // The first connection waits in the backlog until vtpmd accepts it.
    // The path exists from bind(); until listen() a connect is refused.
    let mut client = loop {
        match Client::try_connect(&socket) {
            Ok(client) => break client,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(
                    Instant::now() < deadline,
                    "systemd-socket-activate never listened"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    assert!(
        client
            .call("org.varlink.service.GetInfo", json!({}))
            .is_ok()
    );
    let pid = daemon.0.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "vtpmd", "vtpmd was not exec'ed in place");

    // swtpm inherits neither the listener nor the activation variables.
    let listener = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
    assert!(listener.to_string_lossy().starts_with("socket:"));
    let guest = create_and_start(&socket);
    let swtpm = guest["pid"].as_i64().expect("no swtpm pid");
    for fd in std::fs::read_dir(format!("/proc/{swtpm}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        assert_ne!(target, listener, "swtpm inherited the API listener");
    }
    let environ = std::fs::read(format!("/proc/{swtpm}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for var in ["LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"] {
        assert!(!environ.contains(var), "swtpm got {var}: {environ:?}");
    }

    sigterm(&daemon.0);
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(30)), Some(0));
    // The socket belongs to the socket unit: vtpmd must not remove it.
    let after = std::fs::symlink_metadata(&socket).expect("vtpmd removed the activated socket");
    assert!(after.file_type().is_socket());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(after.ino(), inode.ino());
}

#[test]
fn two_passed_sockets_are_refused() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let dirs = Dirs::new();
    let other = dirs.root.path().join("other.sock");
    let mut args: Vec<OsString> = vec![
        "-l".into(),
        dirs.socket().into(),
        "-l".into(),
        other.clone().into(),
        VTPMD.into(),
    ];
    args.extend(dirs.vtpmd_args());
    let mut daemon = Reap(spawn(&activate, &args, &[]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !other.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not bind"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _poke = std::os::unix::net::UnixStream::connect(&other).unwrap();
    assert_eq!(wait_exit(&mut daemon.0, Duration::from_secs(20)), Some(1));
}

// ------------------------------------------- the unit under a real systemd

/// What the guest side of the boot test runs, as a oneshot unit after
/// vtpmd.socket: drives vtpmd through the socket (activating it), then
/// writes `key=value` lines to /out/result and powers the container off.
const BOOT_PROBE: &str = r#"#!/bin/bash
exec 2>/out/probe.log
set -x
out=/out/result
G=5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f
ctl() { vtpmctl --socket /run/vtpmd/vtpmd.sock "$@"; }
printf 'correct horse' >/tmp/pass
ctl create $G --version 2.0 --model tpm-crb --passphrase-file /tmp/pass >&2
echo "create=$?" >>$out
ctl start $G --passphrase-file /tmp/pass >&2
echo "start=$?" >>$out
echo "status=$(systemctl show -p StatusText --value vtpmd.service)" >>$out
P=$(systemctl show -p MainPID --value vtpmd.service)
echo "vtpmd_capeff=$(awk '/^CapEff/{print $2}' /proc/$P/status)" >>$out
echo "vtpmd_seccomp=$(awk '/^Seccomp:/{print $2}' /proc/$P/status)" >>$out
S=$(pgrep -x swtpm | head -1)
if [ -n "$S" ]; then
    echo "swtpm_uid=$(awk '/^Uid/{print $2}' /proc/$S/status)" >>$out
    echo "swtpm_capeff=$(awk '/^CapEff/{print $2}' /proc/$S/status)" >>$out
    echo "swtpm_nonewprivs=$(awk '/^NoNewPrivs/{print $2}' /proc/$S/status)" >>$out
fi
ctl stop $G >&2
echo "stop=$?" >>$out
systemctl stop vtpmd.service
echo "service_result=$(systemctl show -p Result --value vtpmd.service)" >>$out
[ -S /run/vtpmd/vtpmd.sock ] && echo "socket_kept=yes" >>$out
journalctl -u vtpmd.service --no-pager >&2
journalctl -u vtpmd.service -o json --no-pager >/out/journal.json
echo "done=1" >>$out
systemctl poweroff
"#;

/// Boots systemd in a container (`common::nspawn`, this machine's /usr
/// read-only) with vtpmd.service and vtpmd.socket exactly as shipped,
/// vtpmd and vtpmctl (and the example VMM) in /usr/local/bin, the
/// repository read-only at /src and the binaries at /bins (for
/// scripts/install), and runs `probe` as a oneshot unit after
/// vtpmd.socket; it writes `key=value` lines to /out/result (and
/// `journalctl -u vtpmd.service -o json` to /out/journal.json) and powers
/// the container off. `None` (with the reason printed) where nspawn cannot
/// run.
fn boot_with_probe(probe: &str) -> Option<Probed> {
    let c = Container::new("vtpmd-boot", &["src", "bins"])?;
    std::fs::create_dir_all(c.path("local/bin")).unwrap();
    std::fs::create_dir_all(c.path("bins")).unwrap();
    for bin in ["vtpmd", "vtpmctl"] {
        let built = Path::new(VTPMD).with_file_name(bin);
        std::fs::copy(&built, c.path("local/bin").join(bin)).unwrap();
        std::fs::copy(&built, c.path("bins").join(bin)).unwrap();
    }
    // The example VMM, built beside the test binaries.
    let vmm = Path::new(VTPMD)
        .parent()
        .unwrap()
        .join("examples")
        .join("vmm");
    if vmm.exists() {
        std::fs::copy(&vmm, c.path("local/bin").join("vmm")).unwrap();
    }
    std::fs::write(c.path("vtpmd.toml"), TEST_CONFIG).unwrap();
    let args = [
        "--bind-ro=/usr".into(),
        // Writable: scripts/install puts the binaries here.
        format!("--bind={}:/usr/local", c.path("local").display()).into(),
        bind_ro(Path::new(REPO), "/src"),
        bind_ro(&c.path("bins"), "/bins"),
        bind_ro(&unit("vtpmd.service"), "/etc/systemd/system/vtpmd.service"),
        bind_ro(&unit("vtpmd.socket"), "/etc/systemd/system/vtpmd.socket"),
        bind_ro(&c.path("vtpmd.toml"), "/etc/vtpmd/vtpmd.toml"),
    ];
    Some(c.boot(probe, "After=vtpmd.socket\nWants=vtpmd.socket", &args, 240))
}

/// Boots systemd in a container (systemd-nspawn on this machine's /usr
/// and a copy of /etc) with vtpmd.service and vtpmd.socket exactly as
/// shipped, and walks Create, Start, Stop through the activated socket:
/// the proof that swtpm_setup and swtpm work under the unit's sandbox.
#[test]
fn the_shipped_unit_runs_guests_under_a_booted_systemd() {
    let Some(b) = boot_with_probe(BOOT_PROBE) else {
        return;
    };
    assert_eq!(b.get("done"), "1");
    assert_eq!(b.get("create"), "0", "Create failed under the unit");
    assert_eq!(b.get("start"), "0", "Start failed under the unit");
    assert_eq!(b.get("status"), "1 guest running");
    // CAP_CHOWN | CAP_SETGID | CAP_SETUID at most.
    let caps = u64::from_str_radix(&b.get("vtpmd_capeff"), 16).unwrap();
    assert_eq!(caps & !0xc1, 0, "vtpmd has more than its bounding set");
    assert_eq!(b.get("vtpmd_seccomp"), "2");
    assert_ne!(b.get("swtpm_uid"), "0");
    assert_eq!(b.get("swtpm_capeff"), "0000000000000000");
    assert_eq!(b.get("swtpm_nonewprivs"), "1");
    assert_eq!(b.get("stop"), "0");
    assert_eq!(b.get("service_result"), "success");
    assert_eq!(b.get("socket_kept"), "yes");

    // The journal has vtpmd's lines natively, with fields to filter on.
    let journal = b.file("journal.json");
    let records: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let field = |r: &serde_json::Value, name: &str| r[name].as_str().unwrap_or("").to_owned();
    let event = |kind: &str| {
        records
            .iter()
            .find(|r| field(r, "OPERATION") == kind && field(r, "GUEST") == BOOT_GUEST)
            .unwrap_or_else(|| {
                panic!(
                    "no {kind} event of {BOOT_GUEST} in the journal:\n{}",
                    journal
                )
            })
    };
    for (kind, id) in [
        ("created", "69332dcb0edf4de6b45a92a2b0e75d15"),
        ("running", "a0e55e4c445d49079043d9ac368e6861"),
        ("stopped", "a01348523b7a4c0ebcec544b8b0b360f"),
    ] {
        let r = event(kind);
        assert_eq!(field(r, "MESSAGE_ID"), id, "{r}");
        assert_eq!(field(r, "SYSLOG_IDENTIFIER"), "vtpmd", "{r}");
        assert!(
            field(r, "MESSAGE").starts_with(&format!("guest {kind}")),
            "{r}"
        );
        assert!(!field(r, "GENERATION").is_empty(), "{r}");
        assert_eq!(field(r, "PRIORITY"), "5", "info is notice: {r}");
    }
    // An API call, with its caller.
    let call = records
        .iter()
        .find(|r| field(r, "OPERATION") == "Create" && field(r, "MESSAGE") == "call")
        .unwrap_or_else(|| panic!("no Create call in the journal:\n{journal}"));
    assert_eq!(field(call, "UID"), "0", "{call}");
}

/// The guest BOOT_PROBE drives.
const BOOT_GUEST: &str = "5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f";

/// The guest side of the continuity boot test: a guest's VMM writes its
/// TPM in a loop while the service is restarted, its main process
/// SIGKILLed (Restart=on-failure brings it back), vtpmd reinstalled with
/// scripts/install and restarted, then stopped and started; after each,
/// Status and the unit's fd store say what vtpmd knows.
const CONTINUITY_PROBE: &str = r#"#!/bin/bash
exec 2>/out/probe.log
set -x
out=/out/result
G=5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f
ctl() { vtpmctl --socket /run/vtpmd/vtpmd.sock "$@"; }
field() { ctl status $G --json | tr -d '\n' | sed -n "s/.*\"$1\": *\"\{0,1\}\([^\",}]*\).*/\1/p"; }
say() { echo "$1=$2" >>$out; }
ready() { # the unit active again (a new main pid) and answering
    for _ in $(seq 100); do
        if [ "$(systemctl is-active vtpmd.service)" = active ] && ctl list >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}
printf 'correct horse' >/tmp/pass
ctl create $G --version 2.0 --passphrase-file /tmp/pass >&2
ctl start $G --passphrase-file /tmp/pass >&2
say start $?
S=$(field ctrl_socket)
P=$(field pid)
vmm $S loop /tmp/stop >/tmp/acked 2>/tmp/vmm.err &
V=$!
sleep 1
say scope "$(systemctl is-active vtpmd-guest-$G.scope)"
say swtpm_scope "$(grep -o 'vtpmd-guest-[^/]*\.scope' /proc/$P/cgroup | head -1)"
say scope_memory "$(systemctl show -p MemoryCurrent --value vtpmd-guest-$G.scope)"
say fdstore "$(systemctl show -p NFileDescriptorStore --value vtpmd.service)"
check() { # after an event: same swtpm, resealing (a key came back), writes go on
    ready; say "$1_ready" $?
    say "$1_pid" "$(field pid)"
    say "$1_state" "$(field state)"
    say "$1_reason" "$(field reason | cut -c1-20)"
    g1=$(field generation); sleep 1; g2=$(field generation)
    [ "$g2" -gt "$g1" ]; say "$1_resealing" $?
    kill -0 $V; say "$1_vmm_alive" $?
}
systemctl restart vtpmd.service
check restart
kill -9 "$(systemctl show -p MainPID --value vtpmd.service)"
sleep 2
check crash
/src/scripts/install --no-build --bin-dir /bins >&2
say install $?
systemctl restart vtpmd.service
check reinstall
say fdstore_after "$(systemctl show -p NFileDescriptorStore --value vtpmd.service)"
systemctl stop vtpmd.service
kill -0 $P; say stop_swtpm_alive $?
say stop_fdstore "$(systemctl show -p NFileDescriptorStore --value vtpmd.service)"
systemctl start vtpmd.service
ready
say stopped_state "$(field state)"
say stopped_reason "$(field reason | cut -c1-20)"
ctl start $G --passphrase-file /tmp/pass >&2
say reattach $?
say reattach_pid "$(field pid)"
say reattach_reason "$(field reason)"
touch /tmp/stop
wait $V
say vmm_exit $?
last=$(grep '^acked ' /tmp/acked | tail -1 | cut -d' ' -f2)
say acked "$last"
for _ in $(seq 50); do [ "$(field state)" = stopped ] && break; sleep 0.2; done
say final_state "$(field state)"
ctl start $G --passphrase-file /tmp/pass >&2
S=$(field ctrl_socket)
# A new swtpm right after the last one ended: its scope name is free again.
say next_scope "$(grep -o 'vtpmd-guest-[^/]*\.scope' /proc/$(field pid)/cgroup | head -1)"
say sealed "$(vmm $S read-counter - | sed -n 's/^counter //p')"
say swtpm_pid "$P"
journalctl -u vtpmd.service --no-pager >&2
echo "done=1" >>$out
systemctl poweroff
"#;

/// Continuity under a real systemd 252: a guest keeps its swtpm and its
/// key across `systemctl restart`, a SIGKILL of the main process with
/// `Restart=on-failure`, and a reinstall with scripts/install plus a
/// restart (each time the key comes back from the fd store, so vtpmd
/// goes on resealing with no passphrase); `systemctl stop` leaves the
/// swtpm serving but drops the fd store, so after `start` the guest runs
/// with "key needed to reseal" until a Start with the passphrase
/// re-attaches. No write the VMM saw acknowledged is lost.
#[test]
fn under_systemd_guests_keep_their_tpm_and_key_across_restart_crash_and_reinstall() {
    let Some(b) = boot_with_probe(CONTINUITY_PROBE) else {
        return;
    };
    assert_eq!(b.get("done"), "1");
    assert_eq!(b.get("start"), "0");
    let pid = b.get("swtpm_pid");
    assert_eq!(b.get("scope"), "active", "swtpm is not in its scope");
    assert_eq!(
        b.get("swtpm_scope"),
        "vtpmd-guest-5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f.scope"
    );
    assert_eq!(b.get("fdstore"), "1", "the key is not in the fd store");
    for event in ["restart", "crash", "reinstall"] {
        assert_eq!(b.get(&format!("{event}_ready")), "0", "{event}: not back");
        assert_eq!(
            b.get(&format!("{event}_pid")),
            pid,
            "{event}: another swtpm"
        );
        assert_eq!(b.get(&format!("{event}_state")), "running", "{event}");
        assert_eq!(
            b.get(&format!("{event}_reason")),
            "",
            "{event}: no key came back"
        );
        assert_eq!(
            b.get(&format!("{event}_resealing")),
            "0",
            "{event}: not resealing"
        );
        assert_eq!(
            b.get(&format!("{event}_vmm_alive")),
            "0",
            "{event}: the VMM failed"
        );
    }
    assert_eq!(b.get("install"), "0");
    assert_eq!(
        b.get("stop_swtpm_alive"),
        "0",
        "stop killed the guest's swtpm"
    );
    assert_eq!(b.get("stop_fdstore"), "0");
    assert_eq!(b.get("stopped_state"), "running");
    assert_eq!(b.get("stopped_reason"), "key needed to reseal");
    assert_eq!(b.get("reattach"), "0");
    assert_eq!(b.get("reattach_pid"), pid);
    assert_eq!(b.get("reattach_reason"), "");
    assert_eq!(b.get("vmm_exit"), "0", "a TPM write failed");
    assert_eq!(b.get("final_state"), "stopped");
    let acked: u64 = b.get("acked").parse().unwrap();
    assert!(acked > 100, "{acked}");
    assert_eq!(b.get("sealed"), b.get("acked"), "acknowledged writes lost");
    assert_eq!(
        b.get("next_scope"),
        b.get("swtpm_scope"),
        "a guest started again at once is not in its scope"
    );
}

/// The guest side of the isolation boot test: two guests run, a process
/// with guest A's swtpm uid fills A's runtime directory, guest B's VMM
/// writes all along; then A's VMM writes (and quits), vtpmd restarts, B
/// stops.
const ISOLATION_PROBE: &str = r#"#!/bin/bash
exec 2>/out/probe.log
set -x
out=/out/result
A=5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f
B=0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0
ctl() { vtpmctl --socket /run/vtpmd/vtpmd.sock "$@"; }
field() { ctl status $1 --json | tr -d '\n' | sed -n "s/.*\"$2\": *\"\{0,1\}\([^\",}]*\).*/\1/p"; }
say() { echo "$1=$2" >>$out; }
acked() { grep -c '^acked ' /tmp/acked_b; }
printf 'correct horse' >/tmp/pass
for G in $A $B; do
    ctl create $G --version 2.0 --passphrase-file /tmp/pass >&2
    ctl start $G --passphrase-file /tmp/pass >&2
    say start_$G $?
done
say fstype "$(findmnt -n -o FSTYPE --mountpoint /run/vtpmd/$A)"
say size "$(df -B1 --output=size /run/vtpmd/$A | tail -1 | tr -d ' ')"
say mode "$(stat -c %a:%u /run/vtpmd/$A)"
say unit "$(systemctl is-active "$(systemd-escape --path --suffix=mount /run/vtpmd/$A)")"
UA=$(awk '/^Uid/{print $2}' /proc/$(field $A pid)/status)
say group "$(stat -c %g /run/vtpmd/$A)"
say uid_a "$UA"
vmm "$(field $B ctrl_socket)" loop /tmp/stop_b >/tmp/acked_b 2>/tmp/vmm_b.err &
V=$!
sleep 1
# Guest A's uid (what a compromised swtpm runs as) fills what it can.
setpriv --reuid=$UA --regid=$UA --clear-groups \
    dd if=/dev/zero of=/run/vtpmd/$A/fill bs=1M count=64 2>/tmp/dd.err
say fill_exit $?
say filled "$(stat -c %s /run/vtpmd/$A/fill)"
say run_free "$(df -B1 --output=avail /run | tail -1 | tr -d ' ')"
b1=$(acked); g1=$(field $B generation)
sleep 2
b2=$(acked); g2=$(field $B generation)
[ "$b2" -gt "$b1" ]; say b_writing $?
[ "$g2" -gt "$g1" ]; say b_resealing $?
# A's own VMM: its swtpm cannot store the write and says so.
vmm "$(field $A ctrl_socket)" write hello >/tmp/vmm_a 2>&1
for _ in $(seq 50); do [ -n "$(field $A reason)" ] && break; sleep 0.1; done
say a_reason "$(field $A reason | cut -c1-29)"
say b_reason "$(field $B reason)"
# swtpm --terminate ends once its VMM hangs up: the run is over, and lost.
for _ in $(seq 50); do [ "$(field $A state)" != running ] && break; sleep 0.1; done
say a_state "$(field $A state)"
systemctl restart vtpmd.service
for _ in $(seq 100); do ctl list >/dev/null 2>&1 && break; sleep 0.2; done
say restart_fstype "$(findmnt -n -o FSTYPE --mountpoint /run/vtpmd/$B)"
b3=$(acked); sleep 1; b4=$(acked)
[ "$b4" -gt "$b3" ]; say restart_b_writing $?
touch /tmp/stop_b
wait $V
say vmm_b_exit $?
for _ in $(seq 50); do [ "$(field $B state)" = stopped ] && break; sleep 0.2; done
say b_state "$(field $B state)"
for _ in $(seq 50); do [ -z "$(findmnt -rn -o TARGET | grep '^/run/vtpmd/')" ] && break; sleep 0.1; done
say mounts_left "$(findmnt -rn -o TARGET | grep -c '^/run/vtpmd/')"
say mounts "$(findmnt -rn -o TARGET | grep '^/run/vtpmd/' | tr '\n' ' ')"
# A stopped unit is collected a moment after its mount is gone.
units() { systemctl list-units --all --plain --no-legend 'run-vtpmd-*.mount'; }
for _ in $(seq 50); do [ -z "$(units)" ] && break; sleep 0.1; done
say units_left "$(units | wc -l)"
say units "$(units | tr '\n' ' ')"
say dirs_left "$(find /run/vtpmd -mindepth 1 -maxdepth 1 -type d | wc -l)"
journalctl -u vtpmd.service --no-pager >&2
journalctl -u "$(systemd-escape --path --suffix=mount /run/vtpmd/$B)" -o verbose --no-pager >&2
echo "done=1" >>$out
systemctl poweroff
"#;

/// A guest that fills its runtime directory hurts only itself: under a
/// real systemd each guest's directory is a tmpfs of its own (8 MiB by
/// default, a transient mount unit), so a process with guest A's swtpm uid
/// writing 64 MiB stops at the bound, guest B's VMM goes on writing and B
/// goes on being resealed, A's swtpm, unable to store its next write, is
/// reported and its run ends `failed`; B's mount survives a restart of
/// vtpmd, and every mount, unit and directory is gone once both guests
/// have stopped.
#[test]
fn under_systemd_a_guest_that_fills_its_runtime_directory_hurts_only_itself() {
    let Some(b) = boot_with_probe(ISOLATION_PROBE) else {
        return;
    };
    assert_eq!(b.get("done"), "1");
    for g in [GUEST, "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"] {
        assert_eq!(b.get(&format!("start_{g}")), "0");
    }
    assert_eq!(b.get("fstype"), "tmpfs", "no tmpfs of its own");
    assert_eq!(b.get("size"), (8u64 << 20).to_string());
    assert_eq!(b.get("mode"), "770:0");
    assert_eq!(
        b.get("group"),
        b.get("uid_a"),
        "the tmpfs is not the guest's group's"
    );
    assert_eq!(b.get("unit"), "active");
    assert_ne!(
        b.get("fill_exit"),
        "0",
        "64 MiB fit in the guest's directory"
    );
    let filled: u64 = b.get("filled").parse().unwrap();
    assert!(filled <= 8 << 20, "{filled} bytes written");
    assert_eq!(b.get("b_writing"), "0", "guest B's writes stopped");
    assert_eq!(b.get("b_resealing"), "0", "guest B is not resealed");
    assert_eq!(b.get("a_reason"), "swtpm could not store its sta");
    assert_eq!(b.get("b_reason"), "");
    assert_eq!(b.get("restart_fstype"), "tmpfs");
    assert_eq!(b.get("restart_b_writing"), "0");
    assert_eq!(b.get("vmm_b_exit"), "0", "a write of B failed");
    assert_eq!(b.get("b_state"), "stopped");
    assert_eq!(b.get("a_state"), "failed", "a lost write ended as a stop");
    assert_eq!(b.get("mounts_left"), "0");
    assert_eq!(b.get("units_left"), "0", "units left: {}", b.get("units"));
    assert_eq!(b.get("dirs_left"), "0");
}
