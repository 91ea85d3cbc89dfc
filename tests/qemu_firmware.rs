//! Real QEMU 7.2 (TCG, SeaBIOS, no disk) attached to vtpmd's swtpm with
//! exactly the arguments `vtpmctl attach-args --for qemu --json` prints:
//! the firmware finds and uses the TPM, a reset keeps it, and QEMU
//! exiting (QMP `quit` or SIGKILL) leaves the guest `stopped`, resealed
//! and wiped, ready to start again.
//!
//! "The firmware initialized the TPM" is observed from both ends:
//! - SeaBIOS's side: with `-boot menu=on` its boot menu offers
//!   "t. TPM Configuration" only when its TPM set-up succeeded (TPM found,
//!   Startup and self-test answered; `tpm_can_show_menu()`, which for a
//!   TPM 1.2 also needs physical presence asserted). Pressing `t` (QMP
//!   `send-key`) shows the TPM menu, built from what the TPM answers: for
//!   1.2 its enabled/active/owner flags (TPM_GetCapability), for 2.0 the
//!   PCR banks (TPM2_GetCapability), which must be vtpmd's `sha256`. SeaBIOS
//!   writes its screen to the debug console (port 0x402), which the
//!   harness captures; with `-nodefaults` and no display nothing reaches
//!   the serial port, and at Debian's debug level SeaBIOS logs no TPM
//!   lines, so the menu is the one firmware-side signal.
//! - vtpmd's side (TPM 2.0): SeaBIOS's TPM2_Startup(CLEAR) is a TPM Reset,
//!   which counts resetCount up in NV, so swtpm rewrites its permanent
//!   state and vtpmd reseals: a `resealed` Monitor event with a higher
//!   generation. QEMU's own control traffic at VM start (SET_DATAFD,
//!   GET_CAPABILITY, STOP, SET_BUFFERSIZE, INIT) writes nothing: with `-S`
//!   no reseal happens until the CPUs run (checked by hand with QEMU 7.2).
//!   A TPM 1.2's TPM_Startup writes nothing, so 1.2 has no such event;
//!   for it the menu is the evidence.
//!
//! Each case boots SeaBIOS twice (plus a reset) under TCG in 1.5-4 s; the
//! whole file takes about 5 s on a 2-core machine.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::qemu::Qemu;
use common::{Daemon, Events, b64};
use serde_json::{Value, json};

const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASS: &str = "correct horse battery staple";
/// Firmware steps under TCG, with other QEMUs sharing two cores.
const FIRMWARE: Duration = Duration::from_secs(60);
/// vtpmd noticing swtpm's exit, resealing and wiping.
const SETTLE: Duration = Duration::from_secs(15);

fn status(d: &Daemon) -> Value {
    d.guest_status(G)
}

fn start(d: &Daemon) -> Value {
    d.start_guest(G, PASS)
}

fn generation(guest: &Value) -> u64 {
    guest["generation"].as_u64().unwrap()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Starts QEMU with vtpmctl's arguments and SeaBIOS's boot menu on.
fn boot(d: &Daemon, running: &Value, model: &str) -> Qemu {
    let args = d.qemu_attach_args(G);
    // What vtpmctl printed is what the guest's Status says.
    let ctrl = running["ctrl_socket"].as_str().unwrap();
    assert_eq!(
        args,
        [
            "-chardev".to_owned(),
            format!("socket,id=chrtpm0,path={ctrl}"),
            "-tpmdev".to_owned(),
            "emulator,id=tpm0,chardev=chrtpm0".to_owned(),
            "-device".to_owned(),
            format!("{model},tpmdev=tpm0"),
        ]
    );
    Qemu::builder()
        .debugcon(true)
        .args(["-boot", "menu=on,splash-time=15000"])
        .args(args)
        .start()
}

/// Walks SeaBIOS into its TPM menu (see the module docs); returns when the
/// menu shows what the TPM answered.
fn firmware_uses_tpm(vm: &mut Qemu, version: &str) -> Instant {
    let step = |vm: &mut Qemu, marker: &str| -> String {
        match vm.debugcon().wait_for_line(marker, FIRMWARE) {
            Ok(line) => line,
            Err(e) => panic!("{e}\n{}", vm.diagnostics()),
        }
    };
    step(vm, "Press ESC for boot menu.");
    vm.qmp().send_key("esc").unwrap();
    step(vm, "Select boot device:");
    step(vm, "t. TPM Configuration");
    vm.qmp().send_key("t").unwrap();
    if version == "1.2" {
        step(vm, "The current state of the TPM is:");
        step(vm, "Enabled and active");
    } else {
        step(vm, "1. Clear TPM");
        step(vm, "2. Change active PCR banks");
        vm.qmp().send_key("2").unwrap();
        // SeaBIOS lists the banks the TPM supports, marking the active
        // ones: vtpmd provisions sha256 only (its default `pcr_banks`).
        step(vm, "Toggle active PCR banks by pressing number key");
        let sha1 = step(vm, ": SHA1");
        assert!(!sha1.contains("enabled"), "{sha1}");
        step(vm, ": SHA256 (enabled)");
    }
    Instant::now()
}

/// QMP's view of the attached TPM.
fn qmp_lists_tpm(vm: &mut Qemu, model: &str) {
    let tpms = vm.qmp().query_tpm().unwrap();
    assert_eq!(tpms.len(), 1, "{tpms:?}");
    assert_eq!(tpms[0].id, "tpm0");
    assert_eq!(tpms[0].model, model);
    assert_eq!(tpms[0].options.kind, "emulator");
    assert_eq!(tpms[0].options.data["chardev"], "chrtpm0");
    let models = vm.qmp().query_tpm_models().unwrap();
    assert!(models.iter().any(|m| m == model), "{models:?}");
    let types = vm.qmp().query_tpm_types().unwrap();
    assert!(types.iter().any(|t| t == "emulator"), "{types:?}");
}

/// TPM 2.0: the firmware's Startup made vtpmd reseal (see the module docs).
fn resealed_after(events: &mut Events, generation: u64) -> (Instant, u64) {
    let (at, event) = events
        .wait(FIRMWARE, |e| {
            e["event"] == "resealed"
                && e["guest"]["guest"] == G
                && e["guest"]["generation"].as_u64().unwrap() > generation
        })
        .unwrap_or_else(|| {
            panic!(
                "no reseal after generation {generation}: {:?}",
                events.seen()
            )
        });
    assert_eq!(event["guest"]["state"], "running", "{event}");
    (at, event["guest"]["generation"].as_u64().unwrap())
}

/// After QEMU is gone: vtpmd's `stopped` event, then nothing of the run left.
fn settles_stopped(
    d: &Daemon,
    events: &mut Events,
    vm: &Qemu,
    run: &Value,
    before: u64,
    (how, acted): (&str, Instant),
) {
    let (at, event) = events
        .wait_for(G, "stopped", SETTLE)
        .unwrap_or_else(|| panic!("not stopped after {how}: {:?}", events.seen()));
    let exited = vm.exited_at().unwrap();
    // QEMU sends CMD_SHUTDOWN while it exits, so with `quit` swtpm (and
    // vtpmd's `stopped`) may finish before the QEMU process is reaped.
    let latency = if at >= exited {
        format!("{} ms after", ms(at - exited))
    } else {
        format!("{} ms before", ms(exited - at))
    };
    eprintln!(
        "{how}: QEMU gone {} ms after the request; vtpmd `stopped` {} ms after it \
         ({latency} QEMU's exit was seen)",
        ms(exited - acted),
        ms(at.saturating_duration_since(acted)),
    );
    let s = status(d);
    assert_eq!(s["state"], "stopped", "{s}");
    assert_eq!(s, event["guest"], "Status agrees with the event");
    assert!(s.get("pid").is_none_or(Value::is_null), "{s}");
    assert!(
        generation(&s) >= before,
        "generation went back: {s}, before {before}"
    );
    let pid = run["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "swtpm {pid} still exists after {how}"
    );
    let ctrl = Path::new(run["ctrl_socket"].as_str().unwrap());
    assert!(!ctrl.exists(), "control socket left after {how}");
    assert!(
        !d.runtime_dir.join(G).exists(),
        "plaintext directory left after {how}"
    );
    assert!(d.sealed_file(G).exists());
    // The last Monitor events of the run: no failure on the way.
    assert!(
        !events.seen().iter().any(|(_, e)| e["event"] == "failed"),
        "{:?}",
        events.seen()
    );
}

fn firmware_case(version: &str, model: &str) {
    let case = format!("TPM {version} {model}");
    let t0 = Instant::now();
    let d = Daemon::start();
    let created = d
        .client()
        .manager(
            "Create",
            json!({"guest": G, "version": version, "model": model, "passphrase": b64(PASS)}),
        )
        .unwrap()["guest"]
        .clone();
    assert_eq!(created["model"], model);
    let mut events = d.events();

    // Boot 1: firmware, QMP, reset, quit.
    let run = start(&d);
    assert_eq!(run["state"], "running");
    let gen_started = generation(&run);
    let mut vm = boot(&d, &run, model);
    qmp_lists_tpm(&mut vm, model);
    let seen = firmware_uses_tpm(&mut vm, version);
    eprintln!(
        "{case}: QEMU start -> SeaBIOS shows the TPM menu: {} ms",
        ms(seen - vm.started)
    );
    let mut gen_now = gen_started;
    if version == "2.0" {
        let (at, g) = resealed_after(&mut events, gen_started);
        eprintln!(
            "{case}: QEMU start -> vtpmd resealed the firmware's Startup: {} ms",
            ms(at.saturating_duration_since(vm.started))
        );
        gen_now = g;
    }

    vm.qmp().system_reset().unwrap();
    vm.qmp().wait_event("RESET", FIRMWARE).unwrap();
    firmware_uses_tpm(&mut vm, version);
    if version == "2.0" {
        gen_now = resealed_after(&mut events, gen_now).1;
    }
    qmp_lists_tpm(&mut vm, model);
    let s = status(&d);
    assert_eq!(
        (&s["state"], &s["pid"], &s["ctrl_socket"]),
        (&run["state"], &run["pid"], &run["ctrl_socket"]),
        "the reset kept the same swtpm: {s}"
    );
    assert!(generation(&s) >= gen_now);

    let before = generation(&status(&d));
    let acted = Instant::now();
    vm.quit(SETTLE);
    let how = format!("{case}: QMP quit");
    settles_stopped(&d, &mut events, &vm, &run, before, (&how, acted));
    drop(vm);

    // Boot 2 on a new swtpm, then SIGKILL.
    let run2 = start(&d);
    assert_eq!(run2["state"], "running");
    assert_ne!(run2["pid"], run["pid"], "a new swtpm per VM start");
    let mut vm = boot(&d, &run2, model);
    qmp_lists_tpm(&mut vm, model);
    firmware_uses_tpm(&mut vm, version);
    if version == "2.0" {
        resealed_after(&mut events, generation(&run2));
    }
    let before = generation(&status(&d));
    let acted = Instant::now();
    vm.kill();
    let how = format!("{case}: kill -9");
    settles_stopped(&d, &mut events, &vm, &run2, before, (&how, acted));
    eprintln!("{case}: whole case {} ms", ms(t0.elapsed()));
}

#[test]
fn tpm2_tis_under_seabios() {
    firmware_case("2.0", "tpm-tis");
}

#[test]
fn tpm2_crb_under_seabios() {
    firmware_case("2.0", "tpm-crb");
}

#[test]
fn tpm12_tis_under_seabios() {
    firmware_case("1.2", "tpm-tis");
}

/// The control experiment behind the TPM 2.0 signal: QEMU's own control
/// traffic (SET_DATAFD, GET_CAPABILITY, STOP, SET_BUFFERSIZE, INIT, all
/// sent while QEMU sets the machine up, before QMP answers) writes no TPM
/// state; the reseal comes only once the firmware runs.
#[test]
fn qemu_alone_writes_no_state_the_firmware_does() {
    let d = Daemon::start();
    d.client()
        .manager(
            "Create",
            json!({"guest": G, "version": "2.0", "model": "tpm-crb", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let mut events = d.events();
    let run = start(&d);
    let args = d.qemu_attach_args(G);
    let mut vm = Qemu::builder()
        .debugcon(true)
        .paused(true)
        .args(args)
        .start();
    let paused = vm.qmp().query_status().unwrap();
    assert_eq!(
        (paused.status.as_str(), paused.running),
        ("prelaunch", false)
    );
    qmp_lists_tpm(&mut vm, "tpm-crb");
    let quiet = Duration::from_millis(500);
    assert!(
        events.wait(quiet, |e| e["event"] == "resealed").is_none(),
        "a reseal before the firmware ran: {:?}",
        events.seen()
    );
    assert_eq!(status(&d), run, "unchanged while QEMU is paused");
    vm.qmp().cont().unwrap();
    resealed_after(&mut events, generation(&run));
    vm.debugcon()
        .wait_for_line("No bootable device.", FIRMWARE)
        .unwrap_or_else(|e| panic!("{e}"));
    let before = generation(&status(&d));
    let acted = Instant::now();
    vm.quit(SETTLE);
    settles_stopped(
        &d,
        &mut events,
        &vm,
        &run,
        before,
        ("paused, then run: QMP quit", acted),
    );
}
