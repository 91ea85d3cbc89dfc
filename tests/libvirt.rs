//! libvirt (≥ 9.0) attaches a VM to vtpmd's TPM: the real vtpmd, the real
//! libvirtd and QEMU (TCG, SeaBIOS, no disk), and the `<tpm>` element
//! exactly as `vtpmctl attach-args --for libvirt` prints it, embedded in
//! `tests/libvirt/domain.xml` (the XML docs/integration.md documents).
//!
//! - Skipped, with the reason printed, when `virsh` or `libvirtd` is not
//!   installed (Debian: libvirt-clients, libvirt-daemon-system,
//!   libvirt-daemon-driver-qemu, qemu-system-x86).
//! - Uses the libvirtd behind `qemu:///system` when one answers; otherwise,
//!   as root, starts `virtlogd` and `libvirtd` itself for the test's length
//!   and stops them (by their pids) at the end.
//! - libvirt runs QEMU as the user/group of `/etc/libvirt/qemu.conf`
//!   (Debian: libvirt-qemu): vtpmd gets that group as `socket_group`, and the
//!   fixture's 0700 temp root is opened to 0755 so QEMU can reach the socket.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, b64};
use serde_json::{Value, json};

const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASS: &str = "correct horse battery staple";
const URI: &str = "qemu:///system";
const DOMAIN_TEMPLATE: &str = include_str!("libvirt/domain.xml");
/// One virsh call; starting a domain under TCG takes a second or two.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(90);

/// `name` on PATH or in the sbin directories (libvirtd lives in /usr/sbin).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `cmd` to completion, killing it (by its pid) after `timeout`.
/// Returns as soon as the child exits (a thread waits for it; no polling):
/// the benchmark times `virsh start` with it.
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    // Read both pipes on threads so a chatty child cannot block on them.
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        out_pipe.read_to_end(&mut buf).unwrap();
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        err_pipe.read_to_end(&mut buf).unwrap();
        buf
    });
    let (exited, waited) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait().unwrap();
        let _ = exited.send(());
        status
    });
    if waited.recv_timeout(timeout).is_err() {
        // Not reaped yet (the waiter has not returned): the pid is still
        // the child's.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waiter.join();
        panic!("{cmd:?} did not finish within {timeout:?}");
    }
    Output {
        status: waiter.join().unwrap(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// libvirt's `qemu:///system`: the daemon that was running, or one this
/// test started (and stops when dropped).
struct Libvirt {
    virsh: PathBuf,
    /// virtlogd and libvirtd when this test started them.
    started: Vec<Child>,
}

impl Libvirt {
    /// Connects, starting the daemons if needed. `Err` is the reason to skip.
    fn connect(log_dir: &Path) -> Result<Self, String> {
        const PACKAGES: &str = "libvirt-clients libvirt-daemon-system \
                                libvirt-daemon-driver-qemu qemu-system-x86";
        let virsh = find_program("virsh")
            .ok_or_else(|| format!("virsh not found (Debian packages: {PACKAGES})"))?;
        let mut libvirt = Self {
            virsh,
            started: Vec::new(),
        };
        if libvirt.answers() {
            return Ok(libvirt);
        }
        let libvirtd = find_program("libvirtd").ok_or_else(|| {
            format!(
                "no libvirtd answers on {URI} and none is installed (Debian packages: {PACKAGES})"
            )
        })?;
        if !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "no libvirtd answers on {URI}, and starting one needs root"
            ));
        }
        // libvirt hands QEMU's stdout/stderr to virtlogd (stdio_handler
        // "logd"), so that one must run too.
        let virtlogd = find_program("virtlogd")
            .ok_or_else(|| "libvirtd is installed but virtlogd is not".to_owned())?;
        for (program, log) in [(virtlogd, "virtlogd.log"), (libvirtd, "libvirtd.log")] {
            let log = std::fs::File::create(log_dir.join(log)).unwrap();
            let child = Command::new(&program)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            libvirt.started.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !libvirt.answers() {
            for child in &mut libvirt.started {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "a libvirt daemon exited during start-up ({status}); logs in {}",
                        log_dir.display()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer on {URI} within 60 s; logs in {}",
                log_dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(libvirt)
    }

    fn answers(&self) -> bool {
        let out = run(
            Command::new(&self.virsh).args(["-c", URI, "version"]),
            VIRSH_TIMEOUT,
        );
        out.status.success() && text(&out.stdout).contains("QEMU")
    }

    fn virsh(&self, args: &[&str]) -> Output {
        run(
            Command::new(&self.virsh).args(["-c", URI]).args(args),
            VIRSH_TIMEOUT,
        )
    }

    /// A virsh call that must succeed; its stdout.
    fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // libvirtd first, then virtlogd: the reverse of their start.
        while let Some(mut child) = self.started.pop() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A defined domain, destroyed and undefined when dropped.
struct Domain<'a> {
    libvirt: &'a Libvirt,
    name: String,
}

impl Domain<'_> {
    fn query_tpm(&self) -> Value {
        let out = self.libvirt.virsh_ok(&[
            "qemu-monitor-command",
            &self.name,
            r#"{"execute":"query-tpm"}"#,
        ]);
        serde_json::from_str(&out).unwrap()
    }

    fn state(&self) -> String {
        self.libvirt
            .virsh_ok(&["domstate", &self.name])
            .trim()
            .to_owned()
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        let _ = self.libvirt.virsh(&["destroy", &self.name]);
        // `--tpm`: libvirt's own swtpm state too (an emulator backend's).
        let _ = self.libvirt.virsh(&["undefine", "--tpm", &self.name]);
        // What libvirt keeps after undefine: QEMU's log, and swtpm's for an
        // emulator backend.
        for log in [
            format!("/var/log/libvirt/qemu/{}.log", self.name),
            format!("/var/log/swtpm/libvirt/qemu/{}-swtpm.log", self.name),
        ] {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// The group libvirt runs QEMU as: `group = "…"` in qemu.conf, else
/// Debian's build default. `None` when it is root (no group needed).
fn qemu_group() -> Option<String> {
    let conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    let configured = conf.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "group").then(|| value.trim().trim_matches('"').to_owned())
    });
    let group = configured.unwrap_or_else(|| "libvirt-qemu".to_owned());
    (!matches!(group.as_str(), "root" | "+0" | "0")).then_some(group)
}

fn status(d: &Daemon) -> Value {
    d.guest_status(GUEST)
}

/// Polls vtpmd's view of the guest until `pred` holds.
fn wait_status(d: &Daemon, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = status(d);
        if pred(&g) {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {g}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn attach_xml(d: &Daemon) -> String {
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(["attach-args", GUEST, "--for", "libvirt"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "vtpmctl attach-args: {out:?}");
    text(&out.stdout)
}

/// Boots the domain and checks QEMU has the TPM on vtpmd's socket and the
/// firmware used it; returns vtpmd's view of the running guest.
fn boot_and_check(libvirt: &Libvirt, dom: &Domain, d: &Daemon, running: &Value) -> Value {
    libvirt.virsh_ok(&["start", &dom.name]);

    let tpms = dom.query_tpm();
    assert_eq!(
        tpms["return"],
        json!([{"model": "tpm-crb", "id": "tpm-tpm0",
                "options": {"type": "emulator", "data": {"chardev": "chrtpm"}}}]),
        "{tpms}"
    );
    // libvirt kept the external backend and vtpmd's socket.
    let live = libvirt.virsh_ok(&["dumpxml", &dom.name]);
    let ctrl = running["ctrl_socket"].as_str().unwrap();
    assert!(live.contains("<backend type='external'>"), "{live}");
    assert!(live.contains(&format!("path='{ctrl}'")), "{live}");

    // QEMU's CMD_INIT and SeaBIOS's TPM2_Startup write the state: vtpmd
    // reseals, so the generation grows while the same swtpm keeps running.
    let generation = running["generation"].as_i64().unwrap();
    let g = wait_status(d, "a reseal while the VM runs", |g| {
        g["generation"].as_i64().unwrap() > generation
    });
    assert_eq!(g["state"], "running", "{g}");
    assert_eq!(g["pid"], running["pid"], "{g}");

    // A few seconds into SeaBIOS (no disk: it waits to retry the boot),
    // the VM and vtpmd's guest are both still up.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dom.state(), "running");
    let g = status(d);
    assert_eq!(g["state"], "running", "{g}");
    assert_eq!(g["pid"], running["pid"], "{g}");
    g
}

/// virsh destroy: QEMU exits, swtpm with it, vtpmd reseals and the guest
/// is `stopped` (not `failed`), with no swtpm left.
fn destroy_and_check(libvirt: &Libvirt, dom: &Domain, d: &Daemon, running: &Value) {
    libvirt.virsh_ok(&["destroy", &dom.name]);
    let g = wait_status(d, "stopped after virsh destroy", |g| {
        g["state"] != "running"
    });
    assert_eq!(g["state"], "stopped", "{g}");
    assert_eq!(g["failure"], Value::Null, "{g}");
    assert_eq!(g["ctrl_socket"], Value::Null, "{g}");
    assert!(
        g["generation"].as_i64() >= running["generation"].as_i64(),
        "{g}"
    );
    let pid = running["pid"].as_i64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| !comm.starts_with("swtpm")),
        "swtpm {pid} still runs"
    );
}

#[test]
fn libvirt_domain_attaches_to_vtpmd_through_an_external_tpm_backend() {
    let scratch = tempfile::Builder::new()
        .prefix("vtlv")
        .tempdir_in("/tmp")
        .unwrap();
    let libvirt = match Libvirt::connect(scratch.path()) {
        Ok(libvirt) => libvirt,
        Err(reason) => {
            eprintln!("SKIPPED libvirt test: {reason}");
            return;
        }
    };
    let extra = qemu_group()
        .map(|group| format!("[supervisor]\nsocket_group = \"{group}\"\n"))
        .unwrap_or_default();
    let d = Daemon::start_with(&extra);
    // QEMU runs as libvirt's qemu user: it must traverse to the socket.
    std::fs::set_permissions(
        d.root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    d.client()
        .manager(
            "Create",
            json!({"guest": GUEST, "version": "2.0", "model": "tpm-crb", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let start = || {
        d.client()
            .manager("Start", json!({"guest": GUEST, "passphrase": b64(PASS)}))
            .unwrap()["guest"]
            .clone()
    };
    let running = start();
    let ctrl = running["ctrl_socket"].as_str().unwrap().to_owned();

    let tpm = attach_xml(&d);
    assert_eq!(
        tpm,
        format!(
            "<tpm model='tpm-crb'>\n  <backend type='external'>\n    \
             <source type='unix' mode='connect' path='{ctrl}'/>\n  </backend>\n</tpm>\n"
        )
    );
    let name = format!("vtpmd-test-{}", std::process::id());
    let indented: String = tpm.lines().map(|l| format!("    {l}\n")).collect();
    let xml = DOMAIN_TEMPLATE
        .replace("@NAME@", &name)
        .replace("@TPM@\n", &indented);
    let xml_path = scratch.path().join("domain.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    // A leftover from an earlier run killed halfway would block define.
    let _ = libvirt.virsh(&["destroy", &name]);
    let _ = libvirt.virsh(&["undefine", &name]);
    libvirt.virsh_ok(&["define", xml_path.to_str().unwrap()]);
    let dom = Domain {
        libvirt: &libvirt,
        name,
    };

    let t0 = Instant::now();
    let running = boot_and_check(&libvirt, &dom, &d, &running);
    destroy_and_check(&libvirt, &dom, &d, &running);

    // QEMU shut swtpm down on exit: the next boot without a new Start finds
    // no socket, and libvirt says so.
    let refused = libvirt.virsh(&["start", &dom.name]);
    assert!(!refused.status.success(), "{refused:?}");
    let err = text(&refused.stderr);
    assert!(
        err.contains(&ctrl) && err.contains("No such file or directory"),
        "{err}"
    );
    assert_eq!(dom.state(), "shut off");

    // Start again: the same domain boots on the same (resealed) TPM state.
    let running = start();
    assert_eq!(running["ctrl_socket"].as_str(), Some(ctrl.as_str()));
    let running = boot_and_check(&libvirt, &dom, &d, &running);
    destroy_and_check(&libvirt, &dom, &d, &running);
    eprintln!("two boots and destroys took {:?}", t0.elapsed());

    libvirt.virsh_ok(&["undefine", &dom.name]);
    let listed = libvirt.virsh_ok(&["list", "--all", "--name"]);
    assert!(!listed.lines().any(|l| l.trim() == dom.name), "{listed}");
}

// ---------------------------------------------------------------------------
// The benchmark: libvirt's own swtpm (emulator backend with an encryption
// secret, as Nova configures it) against vtpmd + the external backend.

/// The key-slot guest and the passphrase-slot guest of the benchmark.
const BENCH_KEY_GUEST: &str = "5d2c7a90-3e41-4b6f-8a1d-9c0e2f4b6a71";
const BENCH_PASS_GUEST: &str = "7e4b1c23-6f08-4d9a-b25e-3a1c9d7f0e82";
/// One boot, from its first step to the guest's last line, under TCG on a
/// loaded two-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The guest's first TPM answer: its first tpm2_getrandom (tests/guest/init).
const FIRST_ANSWER: &str = "VTPMD-GUEST: random=";

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes
}

fn random_uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A libvirt secret (usage `vtpm`), undefined when dropped.
struct LibvirtSecret<'a> {
    libvirt: &'a Libvirt,
    uuid: String,
}

impl<'a> LibvirtSecret<'a> {
    /// What Nova does for a vTPM: a secret of usage type `vtpm` named
    /// after the instance, its value a random passphrase.
    fn define(libvirt: &'a Libvirt, dir: &Path, instance: &str) -> Self {
        let uuid = random_uuid();
        let xml = format!(
            "<secret ephemeral='no' private='no'>\n  <uuid>{uuid}</uuid>\n  \
             <usage type='vtpm'>\n    <name>{instance}</name>\n  </usage>\n</secret>\n"
        );
        let xml_path = dir.join(format!("secret-{uuid}.xml"));
        std::fs::write(&xml_path, xml).unwrap();
        libvirt.virsh_ok(&["secret-define", xml_path.to_str().unwrap()]);
        std::fs::remove_file(&xml_path).unwrap();
        let secret = Self { libvirt, uuid };
        let value_path = dir.join(format!("secret-{}.value", secret.uuid));
        std::fs::write(&value_path, b64_bytes(&random_bytes::<48>())).unwrap();
        libvirt.virsh_ok(&[
            "secret-set-value",
            &secret.uuid,
            "--file",
            value_path.to_str().unwrap(),
            "--plain",
        ]);
        std::fs::remove_file(&value_path).unwrap();
        secret
    }
}

impl Drop for LibvirtSecret<'_> {
    fn drop(&mut self) {
        let _ = self.libvirt.virsh(&["secret-undefine", &self.uuid]);
    }
}

fn b64_bytes(bytes: &[u8]) -> String {
    <base64ct::Base64 as base64ct::Encoding>::encode_string(bytes)
}

/// The benchmark's domain: the test guest's kernel booted directly (its
/// init checks the TPM and powers off), the serial console into `console`.
/// `tpm` empty: no TPM (the guest's init then only says it started).
fn bench_domain_xml(name: &str, uuid: &str, image_dir: &Path, console: &Path, tpm: &str) -> String {
    let kernel = image_dir.join("vmlinuz");
    let initrd = image_dir.join("initramfs.cpio.gz");
    let step = if tpm.is_empty() { "notpm" } else { "probe" };
    let tpm: String = tpm.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vtpmd.step={step}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path='{console}'/>
    </serial>
    <memballoon model='none'/>
{tpm}  </devices>
</domain>
",
        kernel = kernel.display(),
        initrd = initrd.display(),
        console = console.display(),
    )
}

/// A benchmark domain and the file its serial console goes to.
struct BenchDomain<'a> {
    dom: Domain<'a>,
    console: PathBuf,
}

impl<'a> BenchDomain<'a> {
    fn define(libvirt: &'a Libvirt, dir: &Path, image_dir: &Path, name: &str, tpm: &str) -> Self {
        let console = dir.join(format!("{name}.console"));
        let xml = bench_domain_xml(name, &random_uuid(), image_dir, &console, tpm);
        let xml_path = dir.join(format!("{name}.xml"));
        std::fs::write(&xml_path, xml).unwrap();
        let _ = libvirt.virsh(&["destroy", name]);
        let _ = libvirt.virsh(&["undefine", "--tpm", name]);
        libvirt.virsh_ok(&["define", xml_path.to_str().unwrap()]);
        std::fs::remove_file(&xml_path).unwrap();
        Self {
            dom: Domain {
                libvirt,
                name: name.to_owned(),
            },
            console,
        }
    }

    /// Before the clock starts: no console output of an earlier boot.
    fn prepare(&self) {
        match std::fs::remove_file(&self.console) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", self.console.display()),
        }
    }

    /// `virsh start`, timed from `t0` (the boot's first step): when it
    /// returned, when the guest's init started and (`tpm`) when it printed
    /// its first TPM answer. Then waits for the guest's last line (`tpm`),
    /// `virsh destroy` (the guest may have powered off already) and `shut
    /// off`.
    fn boot(&self, t0: Instant, tpm: bool) -> Boot {
        self.dom.libvirt.virsh_ok(&["start", &self.dom.name]);
        let virsh = t0.elapsed();
        let init = self
            .wait_console("VTPMD-GUEST: init step=")
            .duration_since(t0);
        let mut answer = Duration::ZERO;
        let mut tpm0 = Duration::ZERO;
        if tpm {
            tpm0 = self
                .wait_console("VTPMD-GUEST: tpm0=present")
                .duration_since(t0);
            answer = self.wait_console(FIRST_ANSWER).duration_since(t0);
            self.wait_console("VTPMD-GUEST: done");
        }
        let _ = self.dom.libvirt.virsh(&["destroy", &self.dom.name]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.dom.state() != "shut off" {
            assert!(
                Instant::now() < deadline,
                "{} did not shut off",
                self.dom.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Boot {
            virsh,
            init,
            tpm0,
            tpm: answer,
        }
    }

    /// Polls the console file (every 2 ms) until `marker` is in it; the
    /// instant it was first seen.
    fn wait_console(&self, marker: &str) -> Instant {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let now = Instant::now();
            let seen = std::fs::read(&self.console).unwrap_or_default();
            let seen = String::from_utf8_lossy(&seen);
            if seen.contains(marker) {
                return now;
            }
            assert!(
                !seen.contains("VTPMD-GUEST: FAIL"),
                "{} failed:\n{seen}",
                self.dom.name
            );
            assert!(
                now < deadline,
                "no {marker:?} from {} within {BOOT_TIMEOUT:?}:\n{seen}",
                self.dom.name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[derive(Clone, Copy)]
struct Boot {
    /// `virsh start` returned.
    virsh: Duration,
    /// The guest's init started (its first line).
    init: Duration,
    /// The guest's init found /dev/tpm0 (the kernel's driver probed it).
    tpm0: Duration,
    /// The guest printed its first TPM answer.
    tpm: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// vtpmd's way for one guest: the Create, and each boot's figures with
/// the Start's own time and Monitor's split of it.
#[derive(Default)]
struct VtpmdRuns {
    create: Vec<Duration>,
    first: Vec<Boot>,
    next: Vec<Boot>,
    /// Per boot: the Start call, `virsh start` after it, and Monitor's
    /// kdf / unseal / spawn / ready (ms).
    starts: Vec<(Duration, Duration, [f64; 4])>,
}

/// One boot of vtpmd's way: Start (`secret`: the key or the passphrase),
/// then `virsh start`, timed from the Start call; then the guest stopped.
fn vtpmd_boot(
    d: &Daemon,
    events: &mut common::Events,
    guest: &str,
    secret: &Value,
    dom: &BenchDomain,
    runs: &mut VtpmdRuns,
) -> Boot {
    let mut params = json!({ "guest": guest });
    for (k, v) in secret.as_object().unwrap() {
        params[k] = v.clone();
    }
    dom.prepare();
    let t0 = Instant::now();
    let running = d.client().manager("Start", params).unwrap()["guest"].clone();
    let start = t0.elapsed();
    assert_eq!(running["state"], "running", "{running}");
    let boot = dom.boot(t0, true);
    let (_, event) = events.wait_for(guest, "running", BOOT_TIMEOUT).unwrap();
    // This Start's event (its swtpm's pid).
    assert_eq!(event["guest"]["pid"], running["pid"], "{event}");
    let t = &event["start"];
    let phase = |p: &str| t[p].as_f64().unwrap();
    runs.starts.push((
        start,
        boot.virsh - start,
        [
            phase("kdf_ms"),
            phase("unseal_ms"),
            phase("spawn_ms"),
            phase("ready_ms"),
        ],
    ));
    // QEMU's exit ends swtpm; vtpmd reseals: `stopped`.
    d.wait_state(guest, "stopped", Duration::from_secs(30));
    boot
}

fn vtpmd_create(d: &Daemon, guest: &str, key: Option<&str>) -> Duration {
    let mut params = json!({"guest": guest, "version": "2.0", "model": "tpm-tis",
                            "passphrase": b64(PASS)});
    if let Some(key) = key {
        params["policy"] = json!("deployment");
        params["key"] = json!(key);
    }
    let t0 = Instant::now();
    d.client().manager("Create", params).unwrap();
    t0.elapsed()
}

/// The `<tpm>` element `vtpmctl attach-args --for libvirt` prints for
/// `guest` (it needs the guest running: one Start, then Stop).
fn vtpmd_tpm_element(d: &Daemon, guest: &str, secret: &Value) -> String {
    let mut params = json!({ "guest": guest });
    for (k, v) in secret.as_object().unwrap() {
        params[k] = v.clone();
    }
    d.client().manager("Start", params).unwrap();
    let out = d.vtpmctl(&["attach-args", guest, "--for", "libvirt"]);
    d.client()
        .manager("Stop", json!({ "guest": guest }))
        .unwrap();
    d.wait_state(guest, "stopped", Duration::from_secs(30));
    out
}

/// One line of medians; `base`: libvirt's (virsh, answer), for ratios.
fn line(label: &str, boots: &[Boot], base: Option<(f64, f64)>) -> (f64, f64) {
    let virsh = median(boots.iter().map(|b| ms(b.virsh)).collect());
    let tpm = median(boots.iter().map(|b| ms(b.tpm)).collect());
    let in_guest = median(boots.iter().map(|b| ms(b.tpm) - ms(b.init)).collect());
    let tpm0 = median(boots.iter().map(|b| ms(b.tpm0) - ms(b.init)).collect());
    let ratio = |x: f64, b: Option<f64>| b.map_or(String::new(), |b| format!(" ({:.2}x)", x / b));
    eprintln!(
        "  {label:<47} virsh start {virsh:5.0} ms{:<8}  first TPM answer {tpm:5.0} ms{:<8}  (init to /dev/tpm0 {tpm0:4.0} ms, to answer {in_guest:4.0} ms)",
        ratio(virsh, base.map(|b| b.0)),
        ratio(tpm, base.map(|b| b.1)),
    );
    (virsh, tpm)
}

fn with_create(runs: &VtpmdRuns) -> Vec<Boot> {
    runs.first
        .iter()
        .zip(&runs.create)
        .map(|(b, c)| Boot {
            virsh: b.virsh + *c,
            init: b.init + *c,
            tpm0: b.tpm0 + *c,
            tpm: b.tpm + *c,
        })
        .collect()
}

/// Issue 13's benchmark: the same TCG guest (direct kernel boot, its init
/// reads the TPM and powers off) with libvirt 9.0 managing swtpm itself
/// (emulator backend + an encryption secret, as Nova configures it) and
/// with vtpmd + libvirt's external backend, interleaved. Per boot: when
/// `virsh start` returned and when the guest printed its first TPM answer,
/// timed from the boot's first step (`virsh start`, or vtpmd's Start).
/// First boot: fresh state (libvirt runs swtpm_setup inside `virsh start`;
/// vtpmd's Create did it before, shown with and without Create); next
/// boot: the same state again. vtpmd with a `key` slot (policy
/// `deployment`: no Argon2id in Start) and with a passphrase (Argon2id,
/// vtpmd's default parameters). Figures only (the machine is shared).
#[test]
#[ignore = "a benchmark: cargo test --test libvirt side_by_side -- --ignored --nocapture"]
fn side_by_side_with_libvirts_own_swtpm() {
    // VTPMD_BENCH_ROUNDS=N for more rounds on a noisy machine.
    let rounds: usize = std::env::var("VTPMD_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let scratch = tempfile::Builder::new()
        .prefix("vtlb")
        .tempdir_in("/tmp")
        .unwrap();
    // QEMU (libvirt's qemu user) reads the kernel, virtlogd writes the
    // console, vtpmd's socket is reached through here.
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let libvirt = match Libvirt::connect(scratch.path()) {
        Ok(libvirt) => libvirt,
        Err(reason) => {
            eprintln!("SKIPPED libvirt benchmark: {reason}");
            return;
        }
    };
    // libvirt's own directories for its swtpm: removed at the end if this
    // run made them (and they are empty again).
    let libvirt_dirs = [
        "/var/lib/libvirt/swtpm",
        "/var/log/swtpm/libvirt/qemu",
        "/var/log/swtpm/libvirt",
        "/var/log/swtpm",
    ]
    .map(|dir| (dir, Path::new(dir).exists()));

    // A private copy of the guest image: libvirt's DAC driver relabels a
    // domain's kernel and initrd while it runs.
    let image = common::guest::image();
    let image_dir = scratch.path().join("image");
    std::fs::create_dir(&image_dir).unwrap();
    std::fs::set_permissions(
        &image_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::copy(&image.kernel, image_dir.join("vmlinuz")).unwrap();
    std::fs::copy(&image.initrd, image_dir.join("initramfs.cpio.gz")).unwrap();

    // vtpmd with its default Argon2id (64 MiB, t=3, p=4), as deployed.
    let extra = qemu_group()
        .map(|group| format!("[supervisor]\nsocket_group = \"{group}\"\n"))
        .unwrap_or_default();
    let d = Daemon::start_with_config(&extra);
    std::fs::set_permissions(
        d.root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = b64_bytes(&random_bytes::<32>());
    let key_secret = json!({ "key": key });
    let pass_secret = json!({ "passphrase": b64(PASS) });
    // The socket path is the guest's for good: one element per guest.
    vtpmd_create(&d, BENCH_KEY_GUEST, Some(&key));
    vtpmd_create(&d, BENCH_PASS_GUEST, None);
    let key_tpm = vtpmd_tpm_element(&d, BENCH_KEY_GUEST, &key_secret);
    let pass_tpm = vtpmd_tpm_element(&d, BENCH_PASS_GUEST, &pass_secret);
    for guest in [BENCH_KEY_GUEST, BENCH_PASS_GUEST] {
        d.client()
            .manager("Delete", json!({ "guest": guest }))
            .unwrap();
    }
    let mut events = d.events();

    let version = libvirt.virsh_ok(&["version"]);
    eprintln!("{}", version.trim());
    let swtpm = run(Command::new("swtpm").arg("--version"), VIRSH_TIMEOUT);
    eprintln!("{}", text(&swtpm.stdout).trim());

    let mut notpm = Vec::new();
    let mut lv_first = Vec::new();
    let mut lv_next = Vec::new();
    let mut key_runs = VtpmdRuns::default();
    let mut pass_runs = VtpmdRuns::default();
    let pid = std::process::id();
    // Round 0 warms up (page cache, libvirt's and vtpmd's first spawns)
    // and is not counted.
    for round in 0..=rounds {
        let lv_name = format!("vtpmd-bench-{pid}-{round}-libvirt");
        let lv_uuid = random_uuid();
        let secret = LibvirtSecret::define(&libvirt, scratch.path(), &lv_uuid);
        let lv_tpm = format!(
            "<tpm model='tpm-tis'>\n  <backend type='emulator' version='2.0'>\n    \
             <encryption secret='{}'/>\n  </backend>\n</tpm>\n",
            secret.uuid
        );
        let lv = {
            let console = scratch.path().join(format!("{lv_name}.console"));
            let xml = bench_domain_xml(&lv_name, &lv_uuid, &image_dir, &console, &lv_tpm);
            let xml_path = scratch.path().join(format!("{lv_name}.xml"));
            std::fs::write(&xml_path, xml).unwrap();
            libvirt.virsh_ok(&["define", xml_path.to_str().unwrap()]);
            std::fs::remove_file(&xml_path).unwrap();
            BenchDomain {
                dom: Domain {
                    libvirt: &libvirt,
                    name: lv_name.clone(),
                },
                console,
            }
        };
        let kd = BenchDomain::define(
            &libvirt,
            scratch.path(),
            &image_dir,
            &format!("vtpmd-bench-{pid}-{round}-key"),
            &key_tpm,
        );
        let pd = BenchDomain::define(
            &libvirt,
            scratch.path(),
            &image_dir,
            &format!("vtpmd-bench-{pid}-{round}-pass"),
            &pass_tpm,
        );
        let nd = BenchDomain::define(
            &libvirt,
            scratch.path(),
            &image_dir,
            &format!("vtpmd-bench-{pid}-{round}-notpm"),
            "",
        );

        let mut round_lv = Vec::new();
        let mut round_notpm = None;
        let mut round_key = VtpmdRuns::default();
        let mut round_pass = VtpmdRuns::default();
        // The ways in turn, the first one rotating with the round; the
        // guest without a TPM (the floor) once, among the next boots.
        for boot in 0..2 {
            for way in 0..4 {
                match (way + round) % 4 {
                    0 => {
                        lv.prepare();
                        round_lv.push(lv.boot(Instant::now(), true));
                    }
                    1 | 2 => {
                        let (guest, key, secret, dom, runs) = if (way + round) % 4 == 1 {
                            (
                                BENCH_KEY_GUEST,
                                Some(key.as_str()),
                                &key_secret,
                                &kd,
                                &mut round_key,
                            )
                        } else {
                            (BENCH_PASS_GUEST, None, &pass_secret, &pd, &mut round_pass)
                        };
                        if boot == 0 {
                            runs.create.push(vtpmd_create(&d, guest, key));
                        }
                        let b = vtpmd_boot(&d, &mut events, guest, secret, dom, runs);
                        if boot == 0 {
                            runs.first.push(b);
                        } else {
                            runs.next.push(b);
                        }
                    }
                    _ if boot == 0 => {}
                    _ => {
                        nd.prepare();
                        round_notpm = Some(nd.boot(Instant::now(), false));
                    }
                }
            }
        }
        for guest in [BENCH_KEY_GUEST, BENCH_PASS_GUEST] {
            d.client()
                .manager("Delete", json!({ "guest": guest }))
                .unwrap();
        }
        // Undefined (with libvirt's swtpm state), then the secret.
        drop((lv, kd, pd, nd));
        drop(secret);
        assert!(
            !Path::new(&format!("/var/lib/libvirt/swtpm/{lv_uuid}")).exists(),
            "libvirt kept the swtpm state of {lv_name}"
        );

        let f = |b: &Boot| {
            format!(
                "{:4.0}/{:5.0} (init+{:.0})",
                ms(b.virsh),
                ms(b.tpm),
                ms(b.tpm) - ms(b.init)
            )
        };
        let starts = |r: &VtpmdRuns| {
            r.starts
                .iter()
                .map(|(s, _, p)| {
                    format!(
                        "Start {:.0} ms (kdf {:.0}, unseal {:.1}, spawn {:.1}, ready {:.1})",
                        ms(*s),
                        p[0],
                        p[1],
                        p[2],
                        p[3]
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        eprintln!(
            "{} (virsh start returned / first TPM answer, ms): first boot: libvirt {}, vtpmd key {} (Create {:.0}), passphrase {} (Create {:.0}); next boot: libvirt {}, key {}, passphrase {}; no TPM: virsh start {:.0}, init {:.0}",
            if round == 0 {
                "warm-up".to_owned()
            } else {
                format!("round {round}")
            },
            f(&round_lv[0]),
            f(&round_key.first[0]),
            ms(round_key.create[0]),
            f(&round_pass.first[0]),
            ms(round_pass.create[0]),
            f(&round_lv[1]),
            f(&round_key.next[0]),
            f(&round_pass.next[0]),
            ms(round_notpm.unwrap().virsh),
            ms(round_notpm.unwrap().init),
        );
        eprintln!(
            "    key: {}\n    passphrase: {}",
            starts(&round_key),
            starts(&round_pass)
        );
        if round == 0 {
            continue;
        }
        notpm.push(round_notpm.unwrap());
        lv_first.push(round_lv[0]);
        lv_next.push(round_lv[1]);
        for (all, one) in [(&mut key_runs, round_key), (&mut pass_runs, round_pass)] {
            all.create.extend(one.create);
            all.first.extend(one.first);
            all.next.extend(one.next);
            all.starts.extend(one.starts);
        }
    }

    eprintln!("\nmedians of {rounds} rounds (ratio: vtpmd / libvirt):");
    eprintln!(" first boot (fresh TPM state):");
    let base = line("libvirt emulator + secret (swtpm_setup)", &lv_first, None);
    line(
        "vtpmd key slot, Start + virsh start",
        &key_runs.first,
        Some(base),
    );
    line(
        "vtpmd key slot, Create + Start + virsh start",
        &with_create(&key_runs),
        Some(base),
    );
    line(
        "vtpmd passphrase, Start + virsh start",
        &pass_runs.first,
        Some(base),
    );
    line(
        "vtpmd passphrase, Create + Start + virsh start",
        &with_create(&pass_runs),
        Some(base),
    );
    eprintln!(" next boot (the same state):");
    let base = line("libvirt emulator + secret", &lv_next, None);
    line(
        "vtpmd key slot, Start + virsh start",
        &key_runs.next,
        Some(base),
    );
    line(
        "vtpmd passphrase, Start + virsh start",
        &pass_runs.next,
        Some(base),
    );
    eprintln!(
        " no TPM at all (the floor): virsh start {:.0} ms, guest init {:.0} ms",
        median(notpm.iter().map(|b| ms(b.virsh)).collect()),
        median(notpm.iter().map(|b| ms(b.init)).collect()),
    );
    let split = |r: &VtpmdRuns| {
        let m = |i: usize| median(r.starts.iter().map(|(_, _, p)| p[i]).collect());
        format!(
            "Start {:.1} ms (kdf {:.1}, unseal {:.1}, spawn {:.1}, ready {:.1}), then virsh start {:.0} ms",
            median(r.starts.iter().map(|(s, _, _)| ms(*s)).collect()),
            m(0),
            m(1),
            m(2),
            m(3),
            median(r.starts.iter().map(|(_, v, _)| ms(*v)).collect()),
        )
    };
    let create = |r: &VtpmdRuns| median(r.create.iter().map(|c| ms(*c)).collect());
    eprintln!(
        " vtpmd's own share (medians): key slot {}; Create {:.0} ms\n                              passphrase {}; Create {:.0} ms",
        split(&key_runs),
        create(&key_runs),
        split(&pass_runs),
        create(&pass_runs)
    );

    drop(events);
    drop(d);
    for (dir, existed) in libvirt_dirs {
        if !existed {
            // Only if empty: anything else there is not this run's.
            let _ = std::fs::remove_dir(dir);
        }
    }
}
