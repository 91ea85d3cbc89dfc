//! A Linux guest under a real QEMU sees vtpmd's TPM: real vtpmd, real
//! swtpm, QEMU started with what `vtpmctl attach-args --for qemu --json`
//! prints, a Debian kernel and an initramfs (busybox + tpm2-tools) built by
//! `tests/guest/build-image` once and cached under the target directory.
//! The guest's `/init` (`tests/guest/init`) reports on the serial console
//! with `VTPMD-GUEST: key=value` lines and powers off.
//!
//! Each boot is a few seconds under TCG; QEMU runs at most two at once
//! (CI has two cores).

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use common::guest::image;
use common::qemu::Qemu;
use common::{Daemon, b64};
use serde_json::{Value, json};

const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASS: &str = "correct horse battery staple";
/// What the guest's init writes into its NV index (tests/guest/init).
const NV_DATA: &str = "vtpmd-guest-nv-ok";
/// One boot, from QEMU's start to the guest's last marker; generous for a
/// loaded two-core machine under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// QEMUs running at once.
const MAX_VMS: usize = 2;

/// At most [`MAX_VMS`] QEMUs at once, across the test threads.
struct VmSlot;

static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

impl VmSlot {
    fn take() -> Self {
        Self::take_many::<1>()[0].take().unwrap()
    }

    /// `N` slots at once, or none: a test that needs two VMs at the same
    /// time (a migration) must not hold one while it waits for the other,
    /// or two such tests (or one beside a test that boots twice) could
    /// each hold a slot and wait forever.
    fn take_many<const N: usize>() -> [Option<Self>; N] {
        let (lock, cond) = &SLOTS;
        let mut used = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *used + N > MAX_VMS {
            used = cond
                .wait(used)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *used += N;
        [(); N].map(|()| Some(Self))
    }
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        let (lock, cond) = &SLOTS;
        *lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
        cond.notify_all();
    }
}

fn create(d: &Daemon, version: &str, model: &str) -> Value {
    d.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": version, "model": model, "passphrase": b64(PASS)}),
        )
        .unwrap()["guest"]
        .clone()
}

fn start(d: &Daemon) -> Value {
    let running = d.start_guest(G1, PASS);
    assert_eq!(running["state"], "running", "{running}");
    running
}

fn status(d: &Daemon) -> Value {
    d.guest_status(G1)
}

fn generation(guest: &Value) -> u64 {
    guest["generation"].as_u64().unwrap()
}

/// Polls Status until the guest is in `state`.
fn wait_state(d: &Daemon, state: &str) -> Value {
    d.wait_state(G1, state, STATE_TIMEOUT)
}

/// Polls Status until the generation is above `generation` (a reseal).
fn wait_generation_above(d: &Daemon, generation_before: u64) -> Value {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let s = status(d);
        if generation(&s) > generation_before {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no reseal after {generation_before}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `vtpmctl attach-args G1 --for qemu --json` prints: its `args`.
fn attach_args(d: &Daemon) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["attach-args", G1, "--for", "qemu", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vtpmctl attach-args: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["for"], "qemu");
    printed["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// A booting guest: QEMU and its slot.
struct Vm {
    qemu: Qemu,
    _slot: VmSlot,
}

/// Starts QEMU with vtpmd's attach arguments and the test kernel; `step`
/// goes to the guest's init. `no_reboot`: a guest reset ends QEMU.
fn boot(attach: &[String], step: &str, no_reboot: bool) -> Vm {
    boot_with(attach, step, no_reboot, "")
}

/// [`boot`] with more kernel command-line parameters for the init.
fn boot_with(attach: &[String], step: &str, no_reboot: bool, params: &str) -> Vm {
    boot_in(VmSlot::take(), attach, step, no_reboot, params)
}

/// [`boot_with`] in a slot taken already.
fn boot_in(slot: VmSlot, attach: &[String], step: &str, no_reboot: bool, params: &str) -> Vm {
    let image = image();
    let mut builder = Qemu::builder()
        .memory_mib(256)
        .args(attach.iter().cloned())
        .arg("-kernel")
        .arg(image.kernel.to_str().unwrap())
        .arg("-initrd")
        .arg(image.initrd.to_str().unwrap())
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 vtpmd.step={step} {params}"
        ));
    if no_reboot {
        builder = builder.arg("-no-reboot");
    }
    Vm {
        qemu: builder.start(),
        _slot: slot,
    }
}

impl Vm {
    /// Waits for `VTPMD-GUEST: key=` and returns the value after it;
    /// panics with the console and QEMU's stderr if the guest failed or
    /// stopped first.
    fn value(&mut self, key: &str) -> String {
        let marker = format!("VTPMD-GUEST: {key}=");
        // The marker, then the end of its line (the line may arrive in pieces).
        let line = self
            .qemu
            .serial()
            .wait_for(&marker, BOOT_TIMEOUT)
            .and_then(|_| self.qemu.serial().wait_for("\n", BOOT_TIMEOUT));
        match line {
            Ok(line) => {
                let at = line.find(&marker).unwrap() + marker.len();
                line[at..].trim().to_owned()
            }
            Err(e) => panic!("{e}\n{}", self.qemu.diagnostics()),
        }
    }

    /// Waits for a bare marker (`VTPMD-GUEST: waiting-for-reset`).
    fn marker(&mut self, text: &str) {
        let marker = format!("VTPMD-GUEST: {text}");
        if let Err(e) = self.qemu.serial().wait_for(&marker, BOOT_TIMEOUT) {
            panic!("{e}\n{}", self.qemu.diagnostics());
        }
    }

    /// Waits for the init's last line; returns the guest's uptime then, in
    /// seconds (kernel boot plus init).
    fn done(&mut self) -> String {
        self.value("done uptime")
    }

    /// The guest powered off: QEMU exits on its own, successfully.
    fn wait_poweroff(&mut self) -> Duration {
        match self.qemu.wait_exit(Duration::from_secs(30)) {
            Some(status) => assert!(
                status.success(),
                "QEMU: {status}\n{}",
                self.qemu.diagnostics()
            ),
            None => panic!(
                "QEMU did not exit after poweroff\n{}",
                self.qemu.diagnostics()
            ),
        }
        self.qemu.started.elapsed()
    }
}

/// The TPM as every boot must see it: `/dev/tpm0` (and `/dev/tpmrm0` for
/// 2.0), the version, the driver for the model, and an answer.
/// One boot of a TPM 2.0 TIS guest on `d`'s running TPM that writes the
/// NV value and powers off; back once the guest is stopped (sealed).
fn boot_writing_nv_until_stopped(d: &Daemon) {
    let mut vm = boot(&attach_args(d), "write", true);
    check_tpm(&mut vm, "2.0", "tpm-tis");
    assert_eq!(vm.value("nv-written"), NV_DATA);
    vm.done();
    vm.wait_poweroff();
    drop(vm);
    wait_state(d, "stopped");
}

fn check_tpm(vm: &mut Vm, version: &str, model: &str) {
    let major = &version[..1];
    assert_eq!(vm.value("tpm0"), "present");
    assert_eq!(vm.value("version-major"), major);
    let driver = if model == "tpm-crb" {
        "tpm_crb"
    } else {
        "tpm_tis"
    };
    assert_eq!(vm.value("driver"), driver);
    if major == "2" {
        assert_eq!(vm.value("tpmrm0"), "present");
        let random = vm.value("random");
        assert!(
            is_hex(&random, 16),
            "tpm2_getrandom 8 --hex printed {random:?}"
        );
        let pcr0 = vm.value("pcr0-sha256");
        assert!(is_hex(&pcr0, 64), "tpm2_pcrread sha256:0 printed {pcr0:?}");
        assert_ne!(pcr0, "0".repeat(64), "SeaBIOS measured nothing into PCR 0");
    }
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// After QEMU went away: vtpmd stopped the guest, sealed at least
/// `min_generation` and left no plaintext, socket or swtpm behind.
fn check_stopped_and_sealed(d: &Daemon, running: &Value, min_generation: u64) -> Value {
    let stopped = wait_state(d, "stopped");
    assert!(
        generation(&stopped) >= min_generation,
        "not resealed: {stopped} (expected generation {min_generation} or later)"
    );
    assert!(stopped["pid"].is_null(), "{stopped}");
    let ctrl = Path::new(running["ctrl_socket"].as_str().unwrap());
    assert!(!ctrl.exists(), "control socket left behind");
    assert!(
        !d.runtime_dir.join(G1).exists(),
        "plaintext runtime directory left behind"
    );
    let swtpm = running["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{swtpm}")).exists(),
        "swtpm {swtpm} still running"
    );
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", d.pid()))
        .unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "vtpmd's children left: {children}"
    );
    assert!(d.sealed_file(G1).exists());
    stopped
}

/// Boot 1 writes an NV index and powers off; vtpmd reseals and wipes;
/// Start again; boot 2 reads the index back.
fn nv_survives_a_shutdown_and_a_new_start(model: &str) {
    let d = Daemon::start();
    let created = create(&d, "2.0", model);
    let running = start(&d);

    let mut vm = boot(&attach_args(&d), "write", true);
    check_tpm(&mut vm, "2.0", model);
    assert_eq!(vm.value("nv-written"), NV_DATA);
    let first_uptime = vm.done();
    let first = vm.wait_poweroff();
    let stopped = check_stopped_and_sealed(&d, &running, generation(&created) + 1);

    let running = start(&d);
    let mut vm = boot(&attach_args(&d), "read", true);
    check_tpm(&mut vm, "2.0", model);
    assert_eq!(vm.value("nv-read"), NV_DATA);
    let second_uptime = vm.done();
    let second = vm.wait_poweroff();
    check_stopped_and_sealed(&d, &running, generation(&stopped));
    eprintln!(
        "{model}: write boot {first:?} (guest uptime {first_uptime} s), \
         read boot {second:?} (guest uptime {second_uptime} s)"
    );
}

#[test]
fn tpm2_tis_nv_written_in_one_boot_is_read_in_the_next() {
    nv_survives_a_shutdown_and_a_new_start("tpm-tis");
}

#[test]
fn tpm2_crb_nv_written_in_one_boot_is_read_in_the_next() {
    nv_survives_a_shutdown_and_a_new_start("tpm-crb");
}

/// TPM 1.2: tpm2-tools cannot talk to it and vtpmd locks its NVRAM at
/// provisioning (no NV without an owner), so the guest shows it answers
/// through the kernel's TPM 1.2 sysfs files (PCRs, capabilities, the EK),
/// and the EK, created at Create and sealed since, is the same next boot.
#[test]
fn tpm12_tis_answers_in_the_guest_and_keeps_its_ek_across_starts() {
    let d = Daemon::start();
    let created = create(&d, "1.2", "tpm-tis");
    let mut ek = Vec::new();
    let mut sealed_generation = generation(&created);
    for round in 0..2 {
        let running = start(&d);
        let mut vm = boot(&attach_args(&d), "probe", true);
        check_tpm(&mut vm, "1.2", "tpm-tis");
        let pcr0 = vm.value("pcr0");
        assert!(is_hex(&pcr0, 40), "PCR-00 {pcr0:?}");
        assert_ne!(pcr0, "0".repeat(40), "SeaBIOS measured nothing into PCR 0");
        assert_eq!(vm.value("pcr-count"), "24");
        let caps = vm.value("caps");
        assert!(caps.contains("Manufacturer"), "{caps}");
        ek.push(vm.value("pubek-sha256"));
        let uptime = vm.done();
        let took = vm.wait_poweroff();
        eprintln!("tpm 1.2 boot {round}: {took:?} (guest uptime {uptime} s)");
        let stopped = wait_state(&d, "stopped");
        assert!(generation(&stopped) >= sealed_generation, "{stopped}");
        eprintln!(
            "tpm 1.2 boot {round}: generation {} -> {}",
            sealed_generation,
            generation(&stopped)
        );
        sealed_generation = generation(&stopped);
        assert!(!d.runtime_dir.join(G1).exists(), "plaintext left behind");
        let swtpm = running["pid"].as_u64().unwrap();
        assert!(!Path::new(&format!("/proc/{swtpm}")).exists(), "swtpm left");
    }
    assert_eq!(ek[0].len(), 64, "{ek:?}");
    assert_eq!(ek[0], ek[1], "the EK changed between starts");
}

/// A guest reset (QMP `system_reset`) keeps the same swtpm attached and
/// its state: the guest writes NV, QEMU resets it, the same kernel boots
/// again on the same TPM and reads it back.
#[test]
fn tpm2_crb_system_reset_keeps_the_tpm_and_its_state() {
    let d = Daemon::start();
    let created = create(&d, "2.0", "tpm-crb");
    let running = start(&d);

    let mut vm = boot(&attach_args(&d), "auto", false);
    check_tpm(&mut vm, "2.0", "tpm-crb");
    assert_eq!(vm.value("auto-step"), "write");
    assert_eq!(vm.value("nv-written"), NV_DATA);
    vm.marker("waiting-for-reset");
    // The write was resealed while the VM runs.
    let written = wait_generation_above(&d, generation(&created));
    assert_eq!(written["state"], "running");

    let reset_at = Instant::now();
    vm.qemu.qmp().system_reset().unwrap();
    vm.qemu
        .qmp()
        .wait_event("RESET", Duration::from_secs(10))
        .unwrap();
    vm.value("init step");
    check_tpm(&mut vm, "2.0", "tpm-crb");
    assert_eq!(vm.value("auto-step"), "read");
    assert_eq!(vm.value("nv-read"), NV_DATA);
    let uptime = vm.done();
    eprintln!(
        "reset -> second boot read the NV index in {:?} (guest uptime {uptime} s)",
        reset_at.elapsed()
    );
    // Same swtpm all along: the reset did not restart or detach it.
    let after = status(&d);
    assert_eq!(
        (after["state"].clone(), after["pid"].clone()),
        (json!("running"), running["pid"].clone()),
        "{after}"
    );
    let total = vm.wait_poweroff();
    eprintln!("reset run, two boots: {total:?}");
    check_stopped_and_sealed(&d, &running, generation(&written));
}

/// A Linux guest writes its TPM in a loop while vtpmd is SIGTERMed and
/// restarted 10 times, then SIGKILLed and restarted 10 times (each time
/// the orchestrator's Start re-attaches, as no fd store runs here): the
/// guest sees no TPM error, its swtpm is the same process throughout, and
/// after it powers off the sealed state holds the last value it wrote.
#[test]
fn tpm2_guest_writing_in_a_loop_sees_no_error_across_20_vtpmd_restarts() {
    const RESTARTS: usize = 10;
    let mut d = Daemon::start();
    create(&d, "2.0", "tpm-crb");
    let running = start(&d);
    let pid = running["pid"].clone();
    let mut vm = boot_with(&attach_args(&d), "loop", true, "vtpmd.seconds=50");
    check_tpm(&mut vm, "2.0", "tpm-crb");
    vm.value("acked");
    let began = Instant::now();
    for round in 0..2 * RESTARTS {
        if round < RESTARTS {
            assert_eq!(d.stop(), Some(0), "SIGTERM exit status");
        } else {
            d.kill();
        }
        d.restart();
        let adopted = status(&d);
        assert_eq!(
            (&adopted["state"], &adopted["pid"]),
            (&json!("running"), &pid),
            "{adopted}"
        );
        let again = start(&d);
        assert_eq!(again["pid"], pid, "a new swtpm was spawned");
        // The guest goes on writing between restarts: a fresh ack.
        vm.qemu.serial().skip_to_end();
        vm.value("acked");
    }
    eprintln!("{} restarts in {:?}", 2 * RESTARTS, began.elapsed());
    let last = vm.value("last");
    let acked = last.parse::<u64>().unwrap();
    assert!(acked > 2 * RESTARTS as u64, "only {acked} writes");
    eprintln!("the guest's TPM acknowledged {acked} NV writes, none failed");
    vm.done();
    vm.wait_poweroff();
    wait_state(&d, "stopped");
    let next = start(&d);
    let sealed = common::nv::read_nv(Path::new(next["ctrl_socket"].as_str().unwrap()), 8);
    assert_eq!(
        String::from_utf8_lossy(&sealed),
        last,
        "the sealed state lost writes"
    );
}

/// QEMU killed with SIGKILL while the guest runs: the guest's NV write was
/// already resealed, vtpmd ends up `stopped` with nothing left behind, and
/// the next start boots with the data.
#[test]
fn tpm2_tis_qemu_killed_leaves_the_guest_stopped_sealed_and_startable() {
    let d = Daemon::start();
    let created = create(&d, "2.0", "tpm-tis");
    let running = start(&d);

    let mut vm = boot(&attach_args(&d), "auto", false);
    check_tpm(&mut vm, "2.0", "tpm-tis");
    assert_eq!(vm.value("nv-written"), NV_DATA);
    vm.marker("waiting-for-reset");
    let written = wait_generation_above(&d, generation(&created));
    let status = vm.qemu.kill();
    assert!(!status.success());
    drop(vm);
    check_stopped_and_sealed(&d, &running, generation(&written));

    start(&d);
    let mut vm = boot(&attach_args(&d), "read", true);
    check_tpm(&mut vm, "2.0", "tpm-tis");
    assert_eq!(vm.value("nv-read"), NV_DATA);
    vm.done();
    vm.wait_poweroff();
}

/// A live migration of a running Linux guest from one host to another
/// (two vtpmd daemons, each its own host key and directories; two QEMU
/// 7.2 processes; QMP `migrate` over a unix socket), with no passphrase:
/// before it the guest extends PCR 16 and writes its NV index; after it,
/// on the destination and without a reboot, it reads the same PCR value
/// (the volatile state moved live) and the NV data; then it reboots there
/// and reads the NV data again. The source ends `migrated-out`.
fn live_migration(model: &str) {
    let [src_slot, dst_slot] = VmSlot::take_many::<2>().map(Option::unwrap);
    let a = Daemon::start();
    let b = Daemon::start();
    create(&a, "2.0", model);
    start(&a);
    let mut src = boot_in(src_slot, &attach_args(&a), "migrate", false, "");
    check_tpm(&mut src, "2.0", model);
    let pcr16 = src.value("pcr16-before");
    assert!(is_hex(&pcr16, 64), "{pcr16}");
    assert_ne!(pcr16, "0".repeat(64), "PCR 16 not extended");
    assert_eq!(src.value("nv-written"), NV_DATA);
    src.marker("waiting-for-migration");

    let (mut dst, out, _) = migrate(&mut src, &a, &b, dst_slot);

    // The guest, now on the destination, goes on where it waited.
    dst.qemu.serial().write(b"go\n").unwrap();
    assert_eq!(dst.value("pcr16-after"), pcr16, "PCR 16 did not move");
    assert_eq!(dst.value("nv-read-after"), NV_DATA);
    dst.marker("waiting-for-reset");
    let there = b.guest_status(G1);
    assert_eq!(there["state"], "running", "{there}");
    // Resealed on the destination, above the source's generations.
    let generation = out["generation"].as_u64().unwrap();
    assert!(
        there["generation"].as_u64().unwrap() > generation + (1 << 20) - 1,
        "{there}"
    );
    dst.qemu.qmp().system_reset().unwrap();
    assert_eq!(dst.value("migrate-step"), "read");
    assert_eq!(dst.value("nv-read"), NV_DATA);
    dst.done();
    dst.wait_poweroff();
    b.wait_state(G1, "stopped", STATE_TIMEOUT);
}

/// [`boot_with`] for a migration's destination: the same machine, waiting
/// for the source's state on `uri`.
fn boot_with_incoming(slot: VmSlot, attach: &[String], step: &str, uri: &str) -> Vm {
    let mut args = attach.to_vec();
    args.push("-incoming".to_owned());
    args.push(uri.to_owned());
    boot_in(slot, &args, step, false, "")
}

/// TPM 1.2 moves live too: the PCRs SeaBIOS extended and the EK are the
/// same on the destination (no NV: see the guest's init).
#[test]
fn tpm12_tis_live_migration_moves_its_pcrs_and_ek_to_another_host() {
    let [src_slot, dst_slot] = VmSlot::take_many::<2>().map(Option::unwrap);
    let a = Daemon::start();
    let b = Daemon::start();
    create(&a, "1.2", "tpm-tis");
    start(&a);
    let mut src = boot_in(src_slot, &attach_args(&a), "migrate", false, "");
    check_tpm(&mut src, "1.2", "tpm-tis");
    let pubek = src.value("pubek-sha256");
    let pcrs = src.value("pcrs-before");
    src.marker("waiting-for-migration");
    let (mut dst, _, _) = migrate(&mut src, &a, &b, dst_slot);
    dst.qemu.serial().write(b"go\n").unwrap();
    assert_eq!(dst.value("pcrs-after"), pcrs, "the PCRs did not move");
    assert_eq!(dst.value("pubek-after"), pubek, "another EK");
    dst.done();
    dst.wait_poweroff();
    b.wait_state(G1, "stopped", STATE_TIMEOUT);
}

/// The orchestrator's part before QEMU migrates: `b`'s host key to
/// MigrateOut on `a`, its ticket and sealed file to MigrateIn on `b`.
/// Returns both replies.
fn hand_over(a: &Daemon, b: &Daemon) -> (Value, Value) {
    let destination = b.client().manager("GetHostKey", json!({})).unwrap()["public_key"].clone();
    let out = a
        .client()
        .manager(
            "MigrateOut",
            json!({"guest": G1, "destination": destination}),
        )
        .unwrap();
    let taken_in = b
        .client()
        .manager(
            "MigrateIn",
            json!({"guest": G1, "ticket": out["ticket"], "sealed": out["sealed"]}),
        )
        .unwrap();
    (out, taken_in)
}

/// MigrateOut on `a`, MigrateIn on `b`, a destination QEMU waiting with
/// `-incoming`, QMP `migrate` until completed, the source QEMU quit and
/// its guest `migrated-out`. Returns the destination VM, MigrateOut's
/// reply and QEMU's downtime (ms).
fn migrate(src: &mut Vm, a: &Daemon, b: &Daemon, slot: VmSlot) -> (Vm, Value, u64) {
    let (out, _) = hand_over(a, b);
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("migration.sock").display());
    let dst = boot_with_incoming(slot, &attach_args(b), "migrate", &uri);
    let done = run_migration(src, &uri);
    src.qemu.quit(Duration::from_secs(10));
    let moved = a.wait_state(G1, "migrated-out", STATE_TIMEOUT);
    assert_eq!(moved["state"], "migrated-out");
    (dst, out, done["downtime"].as_u64().unwrap_or(0))
}

/// QMP `migrate` to `uri` and `query-migrate` until it completed; its
/// last answer (`total-time`, `downtime`, in ms).
fn run_migration(src: &mut Vm, uri: &str) -> Value {
    let started = Instant::now();
    src.qemu
        .qmp()
        .execute_value("migrate", Some(json!({ "uri": uri })))
        .unwrap();
    let done = loop {
        let state = src.qemu.qmp().execute_value("query-migrate", None).unwrap();
        match state["status"].as_str() {
            Some("completed") => break state,
            Some("failed" | "cancelled") => panic!("migration {state}"),
            _ => {}
        }
        assert!(started.elapsed() < BOOT_TIMEOUT, "migration: {state}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "migrated in {} ms, downtime {} ms",
        done["total-time"], done["downtime"]
    );
    done
}

#[test]
fn tpm2_tis_live_migration_moves_pcrs_and_nv_to_another_host() {
    live_migration("tpm-tis");
}

#[test]
fn tpm2_crb_live_migration_moves_pcrs_and_nv_to_another_host() {
    live_migration("tpm-crb");
}

/// The benchmark for the downtime a TPM adds to a live migration: the same
/// guest migrated with a vtpmd TPM (TIS) and without any, interleaved,
/// `ROUNDS` times each; prints each downtime and the medians' ratio.
/// Figures only (the machine is shared): run with `--ignored --nocapture`.
#[test]
#[ignore = "a benchmark: cargo test --test qemu_linux -- --ignored --nocapture"]
fn live_migration_downtime_with_and_without_a_tpm() {
    const ROUNDS: usize = 5;
    let mut with_tpm = Vec::new();
    let mut without = Vec::new();
    for round in 0..ROUNDS {
        // With a TPM: two hosts, the guest's TPM moving along.
        let [src_slot, dst_slot] = VmSlot::take_many::<2>().map(Option::unwrap);
        let a = Daemon::start();
        let b = Daemon::start();
        create(&a, "2.0", "tpm-tis");
        start(&a);
        let mut src = boot_in(src_slot, &attach_args(&a), "migrate", false, "");
        src.marker("waiting-for-migration");
        let (mut dst, _, downtime) = migrate(&mut src, &a, &b, dst_slot);
        dst.qemu.serial().write(b"go\n").unwrap();
        dst.marker("waiting-for-reset");
        // Both VMs (and their slots) go before the next two are taken.
        drop((src, dst));
        with_tpm.push(downtime);

        // Without: the same machine and guest, no TPM.
        let [src_slot, dst_slot] = VmSlot::take_many::<2>().map(Option::unwrap);
        let mut src = boot_in(src_slot, &[], "notpm", false, "");
        src.marker("waiting-for-migration");
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("unix:{}", dir.path().join("migration.sock").display());
        let mut dst = boot_with_incoming(dst_slot, &[], "notpm", &uri);
        let done = run_migration(&mut src, &uri);
        src.qemu.quit(Duration::from_secs(10));
        dst.qemu.serial().write(b"go\n").unwrap();
        dst.value("done moved uptime");
        without.push(done["downtime"].as_u64().unwrap_or(0));
        eprintln!(
            "round {round}: downtime with a TPM {} ms, without {} ms",
            with_tpm[round], without[round]
        );
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (w, n) = (median(&mut with_tpm), median(&mut without));
    eprintln!(
        "live migration downtime, median of {ROUNDS}: with a TPM {w} ms, without {n} ms, ratio {:.2}, added {} ms",
        w as f64 / n.max(1) as f64,
        w.saturating_sub(n)
    );
}

/// A tap between the source QEMU and the destination's `-incoming`
/// socket: what the source sends is recorded on its way through.
struct StreamTap {
    uri: String,
    copied: std::thread::JoinHandle<Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl StreamTap {
    /// Listens on a socket of its own and, once the source connects,
    /// forwards to `destination` (a `unix:` URI), recording one way.
    fn between(destination: &str) -> Self {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tap.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let to = PathBuf::from(destination.strip_prefix("unix:").unwrap());
        let copied = std::thread::spawn(move || {
            let (mut from_source, _) = listener.accept().unwrap();
            let deadline = Instant::now() + BOOT_TIMEOUT;
            let mut to_destination = loop {
                match UnixStream::connect(&to) {
                    Ok(s) => break s,
                    Err(e) => assert!(Instant::now() < deadline, "{}: {e}", to.display()),
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // The way back (QEMU's return path, unused without postcopy).
            let mut back_from = to_destination.try_clone().unwrap();
            let mut back_to = from_source.try_clone().unwrap();
            std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
            let mut recorded = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match from_source.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        recorded.extend_from_slice(&buf[..n]);
                        if to_destination.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to_destination.shutdown(std::net::Shutdown::Write);
            recorded
        });
        Self {
            uri: format!("unix:{}", path.display()),
            copied,
            _dir: dir,
        }
    }

    fn recorded(self) -> Vec<u8> {
        self.copied.join().unwrap()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The migration stream QEMU sends carries the TPM's state, and none of
/// its NV data in plaintext: the NV index is written by the host (as a
/// VMM, before the guest boots) with a value the guest's RAM never holds
/// until it reads it on the destination, after the move. The stream is
/// recorded between the two QEMUs; as a control, it holds the guest's
/// kernel command line (its RAM) and QEMU's TPM device section.
#[test]
fn tpm2_tis_migration_stream_carries_no_nv_data_in_plaintext() {
    let nv_data = format!("vtpmd-stream-{:016x}", rand_u64());
    let [src_slot, dst_slot] = VmSlot::take_many::<2>().map(Option::unwrap);
    let a = Daemon::start();
    let b = Daemon::start();
    create(&a, "2.0", "tpm-tis");
    let first = start(&a);
    let ctrl = PathBuf::from(first["ctrl_socket"].as_str().unwrap());
    common::nv::attach_and_write_nv(&ctrl, nv_data.as_bytes())
        .shutdown()
        .unwrap();
    wait_state(&a, "stopped");
    start(&a);

    let mut src = boot_in(src_slot, &attach_args(&a), "stream", false, "");
    check_tpm(&mut src, "2.0", "tpm-tis");
    let pcr16 = src.value("pcr16-before");
    src.marker("waiting-for-migration");

    hand_over(&a, &b);
    let dir = tempfile::tempdir().unwrap();
    let incoming = format!("unix:{}", dir.path().join("migration.sock").display());
    let mut dst = boot_with_incoming(dst_slot, &attach_args(&b), "stream", &incoming);
    let tap = StreamTap::between(&incoming);
    run_migration(&mut src, &tap.uri);
    src.qemu.quit(Duration::from_secs(10));
    let stream = tap.recorded();
    a.wait_state(G1, "migrated-out", STATE_TIMEOUT);

    dst.qemu.serial().write(b"go\n").unwrap();
    assert_eq!(dst.value("pcr16-after"), pcr16, "PCR 16 did not move");
    assert_eq!(
        dst.value("nv-read-after"),
        nv_data,
        "the NV data did not move"
    );
    dst.done();
    dst.wait_poweroff();
    b.wait_state(G1, "stopped", STATE_TIMEOUT);

    eprintln!("migration stream: {} bytes", stream.len());
    assert!(
        contains(&stream, b"vtpmd.step=stream"),
        "the recorded stream does not hold the guest's RAM"
    );
    assert!(
        contains(&stream, b"tpm-emulator"),
        "the recorded stream has no TPM emulator section"
    );
    assert!(
        !contains(&stream, nv_data.as_bytes()),
        "the migration stream carries the guest's NV data in plaintext"
    );
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    u64::from_le_bytes(bytes)
}

/// A live migration that fails because the destination QEMU is killed
/// mid-way: the source VM goes on with its TPM (same PCR and NV, and
/// resealed after a reset); the destination, its swtpm ended with its VMM
/// before the state arrived, keeps nothing of the guest by itself (no
/// sealed file, uid, directory or swtpm; a later AbortMigration there
/// answers NoSuchGuest); the orchestrator calls it off on the source, so
/// the guest ends `stopped` there, not `migrated-out`, startable again.
#[test]
fn tpm2_tis_failed_live_migration_leaves_the_source_running_and_the_destination_empty() {
    let [src_slot, dst_slot] = VmSlot::take_many::<2>().map(Option::unwrap);
    let a = Daemon::start();
    let b = Daemon::start();
    create(&a, "2.0", "tpm-tis");
    let running = start(&a);
    let mut src = boot_in(src_slot, &attach_args(&a), "migrate", false, "");
    check_tpm(&mut src, "2.0", "tpm-tis");
    let pcr16 = src.value("pcr16-before");
    assert_eq!(src.value("nv-written"), NV_DATA);
    src.marker("waiting-for-migration");

    let (_, taken_in) = hand_over(&a, &b);
    let dst_swtpm = taken_in["guest"]["pid"].as_i64().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("migration.sock").display());
    let mut dst = boot_with_incoming(dst_slot, &attach_args(&b), "migrate", &uri);
    // Slow enough to be killed mid-way: 4 MB/s.
    src.qemu
        .qmp()
        .execute_value(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 4_000_000})),
        )
        .unwrap();
    src.qemu
        .qmp()
        .execute_value("migrate", Some(json!({ "uri": uri })))
        .unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let state = src.qemu.qmp().execute_value("query-migrate", None).unwrap();
        let status = state["status"].as_str().unwrap_or_default();
        assert!(matches!(status, "setup" | "active"), "{state}");
        if state["ram"]["transferred"].as_u64().unwrap_or(0) > 2_000_000 {
            break;
        }
        assert!(Instant::now() < deadline, "{state}");
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.qemu.kill();
    let failed = loop {
        let state = src.qemu.qmp().execute_value("query-migrate", None).unwrap();
        if !matches!(state["status"].as_str(), Some("setup" | "active")) {
            break state;
        }
        assert!(Instant::now() < deadline, "{state}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(failed["status"], "failed", "{failed}");

    // The destination's swtpm ended with its VMM before any state came:
    // the destination dropped the guest by itself, so the orchestrator's
    // call-off there finds nothing; on the source it keeps the guest here.
    b.wait_gone(G1, STATE_TIMEOUT);
    common::assert_error(
        b.client().manager("AbortMigration", json!({"guest": G1})),
        "NoSuchGuest",
    );
    a.client()
        .manager("AbortMigration", json!({"guest": G1}))
        .unwrap();
    assert!(!common::is_alive(i32::try_from(dst_swtpm).unwrap()));
    assert!(common::swtpms_under(&b.runtime_dir).is_empty());
    let left: Vec<_> = std::fs::read_dir(&b.runtime_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(G1))
        .collect();
    assert!(left.is_empty(), "left on the destination: {left:?}");
    assert!(
        !b.sealed_file(G1).exists(),
        "sealed file left on the destination"
    );

    // The source VM goes on with the same TPM, resealed here.
    let here = status(&a);
    assert_eq!(here["state"], "running", "{here}");
    assert_eq!(here["pid"], running["pid"], "{here}");
    src.qemu.serial().write(b"go\n").unwrap();
    assert_eq!(src.value("pcr16-after"), pcr16);
    assert_eq!(src.value("nv-read-after"), NV_DATA);
    src.marker("waiting-for-reset");
    let before = generation(&status(&a));
    src.qemu.qmp().system_reset().unwrap();
    assert_eq!(src.value("migrate-step"), "read");
    assert_eq!(src.value("nv-read"), NV_DATA);
    wait_generation_above(&a, before);
    src.done();
    src.wait_poweroff();
    let stopped = wait_state(&a, "stopped");
    assert!(stopped["reason"].is_null(), "{stopped}");
    start(&a);
}

/// Start with no secret: this host's own host slot opens the state.
fn start_by_host_slot(d: &Daemon) -> Value {
    let running = d.client().manager("Start", json!({"guest": G1})).unwrap()["guest"].clone();
    assert_eq!(running["state"], "running", "{running}");
    running
}

/// Cold migration, then evacuation, of a Linux guest's TPM under the
/// `host` policy, with no passphrase on either move's destination: host A
/// creates the guest (its own host slot) and the guest writes NV there;
/// the owner grants host B a slot; A's sealed file is exported and
/// imported on B, where the guest boots and reads the NV data. Then B
/// dies under the running guest (its vtpmd and swtpm SIGKILLed, QEMU
/// killed): B's sealed file, as shared storage would hold it, is imported
/// back on A, which starts it with its own host slot, and the guest reads
/// the NV data again.
#[test]
fn tpm2_tis_cold_migration_and_evacuation_under_the_host_policy_keep_nv() {
    let a = Daemon::start();
    let mut b = Daemon::start();
    a.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "model": "tpm-tis", "passphrase": b64(PASS), "policy": "host"}),
        )
        .unwrap();
    start_by_host_slot(&a);
    boot_writing_nv_until_stopped(&a);

    // Cold migration to B: the owner grants B while present; the move
    // itself needs no secret.
    let b_key = b.client().manager("GetHostKey", json!({})).unwrap()["public_key"].clone();
    a.client()
        .manager(
            "Grant",
            json!({"guest": G1, "passphrase": b64(PASS), "host_public_key": b_key}),
        )
        .unwrap();
    let exported = a.client().manager("Export", json!({"guest": G1})).unwrap();
    b.client()
        .manager("Import", json!({"guest": G1, "sealed": exported["sealed"]}))
        .unwrap();
    start_by_host_slot(&b);
    let mut vm = boot(&attach_args(&b), "stream", false);
    check_tpm(&mut vm, "2.0", "tpm-tis");
    vm.marker("waiting-for-migration");
    vm.qemu.serial().write(b"go\n").unwrap();
    assert_eq!(
        vm.value("nv-read-after"),
        NV_DATA,
        "NV after the cold migration"
    );
    // B dies under the running guest: after the last write it acknowledged
    // was sealed, its vtpmd, its swtpm and the VM go at once.
    let on_b = b.wait_generation_above(G1, generation(&exported), STATE_TIMEOUT);
    b.kill();
    common::kill_swtpms_under(&b.runtime_dir);
    vm.qemu.kill();
    drop(vm);

    // Evacuation back to A from B's sealed file; A's own slot opens it.
    let sealed = std::fs::read(b.sealed_file(G1)).unwrap();
    let imported = a
        .client()
        .manager("Import", json!({"guest": G1, "sealed": b64_bytes(&sealed)}))
        .unwrap();
    assert_eq!(generation(&imported["guest"]), on_b, "{imported}");
    start_by_host_slot(&a);
    let mut vm = boot(&attach_args(&a), "read", true);
    check_tpm(&mut vm, "2.0", "tpm-tis");
    assert_eq!(vm.value("nv-read"), NV_DATA, "NV after the evacuation");
    vm.done();
    vm.wait_poweroff();
    wait_state(&a, "stopped");
}

fn b64_bytes(bytes: &[u8]) -> String {
    use base64ct::{Base64, Encoding};
    Base64::encode_string(bytes)
}

/// Cluster mode with a real guest: host A (a vtpmd on a three-member
/// etcd) runs the guest, which writes its NV; A's vtpmd, swtpm and QEMU
/// die at once under the running VM; once A's lease expired, host B
/// evacuates the guest with etcd's newest state and the guest booted there
/// reads the NV value it wrote on A.
#[test]
fn tpm2_tis_a_dead_hosts_guest_is_evacuated_through_etcd_and_reads_its_nv() {
    let Some(etcd) = common::etcd::Etcd::start() else {
        return;
    };
    let host = |name: &str| {
        Daemon::start_with_config(&format!("{}{}", common::TEST_CONFIG, etcd.config(name, 3)))
    };
    let mut a = host("host-a");
    let b = host("host-b");
    create(&a, "2.0", "tpm-tis");
    start(&a);
    boot_writing_nv_until_stopped(&a);

    // Running again on A when A dies, its newest reseal in etcd.
    start(&a);
    let mut vm = boot(&attach_args(&a), "stream", false);
    check_tpm(&mut vm, "2.0", "tpm-tis");
    vm.marker("waiting-for-migration");
    etcd.wait_generation_at_least(G1, generation(&status(&a)), STATE_TIMEOUT);
    a.kill();
    common::kill_swtpms_under(&a.runtime_dir);
    vm.qemu.kill();
    drop(vm);

    let died = Instant::now();
    loop {
        match b
            .client()
            .manager("Evacuate", json!({"guest": G1, "passphrase": b64(PASS)}))
        {
            Ok(_) => break,
            Err(e) => {
                assert!(e.name.ends_with("OwnedElsewhere"), "{e:?}");
                assert!(died.elapsed() < STATE_TIMEOUT, "A's lease never expired");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    eprintln!(
        "evacuated {:?} after host A died (lease TTL 3 s)",
        died.elapsed()
    );
    let mut vm = boot(&attach_args(&b), "read", true);
    check_tpm(&mut vm, "2.0", "tpm-tis");
    assert_eq!(vm.value("nv-read"), NV_DATA, "NV after the evacuation");
    vm.done();
    vm.wait_poweroff();
    wait_state(&b, "stopped");
}
