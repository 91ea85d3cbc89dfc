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
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
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
        let _ = self.libvirt.virsh(&["undefine", &self.name]);
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
