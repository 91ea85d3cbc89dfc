//! The daemon as its clients see it: the real vtpmd binary, its real
//! socket, real swtpm; the test plays the hypervisor layer and the VMM.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::nv::{attach_and_write_nv, read_nv};
use common::{Daemon, assert_error, b64};
use serde_json::{Value, json};
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm;

const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const G2: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASS: &str = "correct horse battery staple";
const TIMEOUT: Duration = Duration::from_secs(10);

fn create(d: &Daemon, guest: &str, version: &str, model: &str) -> Value {
    d.client()
        .manager(
            "Create",
            json!({"guest": guest, "version": version, "model": model, "passphrase": b64(PASS)}),
        )
        .unwrap()["guest"]
        .clone()
}

fn start(d: &Daemon, guest: &str) -> Value {
    d.start_guest(guest, PASS)
}

fn status(d: &Daemon, guest: &str) -> Value {
    d.guest_status(guest)
}

fn ctrl_of(guest: &Value) -> &Path {
    Path::new(guest["ctrl_socket"].as_str().unwrap())
}

/// As a VMM: attach, Startup, write `data` into a fresh NV index, quit.
fn write_nv(ctrl: &Path, data: &[u8]) {
    attach_and_write_nv(ctrl, data).shutdown().unwrap();
}

/// Waits (on Status, briefly) until the guest reaches `state`.
fn wait_state(d: &Daemon, guest: &str, state: &str) -> Value {
    d.wait_state(guest, state, TIMEOUT)
}

#[test]
fn tpm2_nv_data_survives_stop_start_and_a_daemon_restart() {
    for model in ["tpm-tis", "tpm-crb"] {
        let mut d = Daemon::start();
        let created = create(&d, G1, "2.0", model);
        assert_eq!(
            (created["state"].as_str(), created["model"].as_str()),
            (Some("stopped"), Some(model))
        );
        assert_eq!(created["generation"], 1);

        let running = start(&d, G1);
        assert_eq!(running["state"], "running");
        write_nv(ctrl_of(&running), b"survives everything");
        // The VMM quit: swtpm ends (--terminate) and vtpmd reseals.
        let stopped = wait_state(&d, G1, "stopped");
        assert!(stopped["generation"].as_u64().unwrap() > 1, "{stopped}");
        assert!(!ctrl_of(&running).exists(), "control socket left behind");
        assert!(
            !d.runtime_dir.join(G1).exists(),
            "plaintext directory left behind"
        );

        let again = start(&d, G1);
        assert_eq!(read_nv(ctrl_of(&again), 19), b"survives everything");
        wait_state(&d, G1, "stopped");

        assert_eq!(d.stop(), Some(0), "SIGTERM exit status");
        d.restart();
        let listed = d.client().manager("List", json!({})).unwrap();
        assert_eq!(listed["guests"][0]["guest"], G1);
        assert_eq!(listed["guests"][0]["state"], "stopped");
        let after_restart = start(&d, G1);
        assert_eq!(read_nv(ctrl_of(&after_restart), 19), b"survives everything");
    }
}

#[test]
fn tpm12_tis_goes_through_the_whole_lifecycle() {
    let d = Daemon::start();
    create(&d, G1, "1.2", "tpm-tis");
    let running = start(&d, G1);
    let mut vmm = Vmm::attach(ctrl_of(&running), TIMEOUT).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm12_startup_clear()).unwrap().rc, 0);
    let random = vmm.transact(&tpm::tpm12_get_random(8)).unwrap();
    assert_eq!(random.tpm12_random_bytes().unwrap().len(), 8);
    let stopped = d.client().manager("Stop", json!({"guest": G1})).unwrap()["guest"].clone();
    assert_eq!(stopped["state"], "stopped");
    drop(vmm);
    d.client().manager("Delete", json!({"guest": G1})).unwrap();
    assert_error(
        d.client().manager("Status", json!({"guest": G1})),
        "NoSuchGuest",
    );
    assert!(!d.sealed_file(G1).exists());
}

#[test]
fn every_refusal_is_typed_and_changes_nothing() {
    let d = Daemon::start();
    create(&d, G1, "2.0", "tpm-crb");
    let sealed = std::fs::read(d.sealed_file(G1)).unwrap();
    let mut c = d.client();

    assert_error(
        c.manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
        ),
        "GuestExists",
    );
    assert_error(
        c.manager("Start", json!({"guest": G2, "passphrase": b64(PASS)})),
        "NoSuchGuest",
    );
    assert_error(
        c.manager("Start", json!({"guest": G1, "passphrase": b64("wrong")})),
        "WrongPassphrase",
    );
    assert_error(c.manager("Stop", json!({"guest": G1})), "GuestNotRunning");
    let spec = assert_error(
        c.manager(
            "Create",
            json!({"guest": G2, "version": "1.2", "model": "tpm-crb", "passphrase": b64(PASS)}),
        ),
        "InvalidTpmSpec",
    );
    assert!(spec.parameters["reason"].as_str().unwrap().contains("2.0"));
    assert_error(
        c.manager(
            "Create",
            json!({"guest": G2, "flavor_extra_specs": {"hw:tpm_version": "2.0"},
                   "image_properties": {"hw_tpm_version": "1.2"}, "passphrase": b64(PASS)}),
        ),
        "InvalidTpmSpec",
    );
    let bad = assert_error(
        c.manager("Status", json!({"guest": "../../etc"})),
        "InvalidParameter",
    );
    assert_eq!(bad.parameters["parameter"], "guest");
    let bad = assert_error(
        c.manager("Start", json!({"guest": G1, "passphrase": ""})),
        "InvalidParameter",
    );
    assert_eq!(bad.parameters["parameter"], "passphrase");
    let unknown = assert_error(
        c.manager("Status", json!({"guest": G1, "extra": 1})),
        "InvalidParameter",
    );
    assert_eq!(unknown.parameters["parameter"], "extra");
    assert_error(c.manager("Explode", json!({})), "MethodNotFound");
    // None of that touched the sealed state or the registry.
    assert_eq!(std::fs::read(d.sealed_file(G1)).unwrap(), sealed);
    assert_eq!(
        d.client().manager("List", json!({})).unwrap()["guests"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let running = start(&d, G1);
    assert_error(
        d.client()
            .manager("Start", json!({"guest": G1, "passphrase": b64(PASS)})),
        "GuestRunning",
    );
    assert_error(
        d.client().manager("Delete", json!({"guest": G1})),
        "GuestRunning",
    );
    let still = status(&d, G1);
    assert_eq!(
        (still["state"].clone(), still["pid"].clone()),
        (json!("running"), running["pid"].clone())
    );
    d.client().manager("Stop", json!({"guest": G1})).unwrap();
}

#[test]
fn rekey_moves_the_guest_to_the_new_passphrase() {
    let d = Daemon::start();
    create(&d, G1, "2.0", "tpm-tis");
    let mut c = d.client();

    assert_error(
        c.manager(
            "Rekey",
            json!({"guest": G1, "passphrase": b64("wrong"), "new_passphrase": b64("new one")}),
        ),
        "WrongPassphrase",
    );
    c.manager(
        "Rekey",
        json!({"guest": G1, "passphrase": b64(PASS), "new_passphrase": b64("new one")}),
    )
    .unwrap();

    assert_error(
        c.manager("Start", json!({"guest": G1, "passphrase": b64(PASS)})),
        "WrongPassphrase",
    );
    let running = c
        .manager("Start", json!({"guest": G1, "passphrase": b64("new one")}))
        .unwrap();
    assert_eq!(running["guest"]["state"], "running");
}

#[test]
fn a_killed_swtpm_is_reported_failed_at_once_and_starts_again_with_its_data() {
    let d = Daemon::start();
    create(&d, G1, "2.0", "tpm-tis");
    let running = start(&d, G1);
    write_nv_keep_running(ctrl_of(&running), b"last words");
    wait_generation_above(&d, G1, 1);

    let mut monitor = d.client();
    let first = monitor
        .call_with("io.vtpmd.Manager.Monitor", json!({}), true)
        .unwrap();
    assert_eq!(first["event"], "existing");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(running["pid"].as_u64().unwrap()).unwrap());
    let killed = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let failed = loop {
        let event = monitor.read_reply();
        if event["parameters"]["event"] == "failed" {
            break event["parameters"]["guest"].clone();
        }
    };
    eprintln!(
        "SIGKILL of swtpm -> Monitor 'failed' in {:?}",
        killed.elapsed()
    );
    assert_eq!(failed["guest"], G1);
    assert!(
        failed["failure"].as_str().unwrap().contains("SIGKILL"),
        "{failed}"
    );
    assert_eq!(status(&d, G1)["state"], "failed");
    assert!(
        !d.runtime_dir.join(G1).exists(),
        "plaintext left after the crash"
    );

    let again = start(&d, G1);
    assert_eq!(read_nv(ctrl_of(&again), 10), b"last words");
}

/// Writes NV data and leaves the VMM attached (the guest keeps running).
fn write_nv_keep_running(ctrl: &Path, data: &[u8]) {
    // Keep the data channel open: QEMU still attached.
    std::mem::forget(attach_and_write_nv(ctrl, data));
}

fn wait_generation_above(d: &Daemon, guest: &str, generation: u64) {
    d.wait_generation_above(guest, generation, TIMEOUT);
}

#[test]
fn fifty_guests_start_in_parallel_answer_and_stop_clean() {
    let d = Daemon::start();
    let guests: Vec<String> = (0..50)
        .map(|i| format!("00000000-0000-4000-8000-{i:012x}"))
        .collect();
    std::thread::scope(|s| {
        for g in &guests {
            let d = &d;
            s.spawn(move || create(d, g, "2.0", "tpm-tis"));
        }
    });
    let started = Instant::now();
    let infos: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = guests.iter().map(|g| s.spawn(|| start(&d, g))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("50 parallel starts took {:?}", started.elapsed());
    std::thread::scope(|s| {
        for info in &infos {
            s.spawn(move || {
                let mut vmm = Vmm::attach(ctrl_of(info), TIMEOUT).unwrap();
                assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
                let r = vmm.transact(&tpm::tpm2_get_random(8)).unwrap();
                assert_eq!(r.tpm2_random_bytes().unwrap().len(), 8);
                vmm.shutdown().unwrap();
            });
        }
    });
    for g in &guests {
        wait_state(&d, g, "stopped");
    }
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", d.pid(), d.pid()))
        .unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "swtpm children left: {children}"
    );
    assert_eq!(
        std::fs::read_dir(&d.runtime_dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name != "api.sock"
            })
            .count(),
        0,
        "runtime leftovers"
    );
}

#[test]
fn sigterm_reseals_running_guests_and_leaves_their_swtpm_serving() {
    let mut d = Daemon::start();
    create(&d, G1, "2.0", "tpm-tis");
    let running = start(&d, G1);
    write_nv_keep_running(ctrl_of(&running), b"at shutdown");
    let swtpm_pid = i32::try_from(running["pid"].as_u64().unwrap()).unwrap();

    assert_eq!(d.stop(), Some(0));

    assert!(common::is_alive(swtpm_pid), "swtpm died with the daemon");
    assert!(ctrl_of(&running).exists(), "its control socket went away");
    // What SIGTERM sealed is all there is after the host loses its RAM
    // (a reboot): the running swtpm and its runtime directory go.
    common::kill_swtpms_under(&d.runtime_dir);
    std::fs::remove_dir_all(&d.runtime_dir).unwrap();
    d.restart();
    assert_eq!(status(&d, G1)["state"], "stopped");
    let again = start(&d, G1);
    assert_eq!(read_nv(ctrl_of(&again), 11), b"at shutdown");
}

#[test]
fn introspection_describes_the_interface() {
    let d = Daemon::start();
    let mut c = d.client();
    let info = c.call("org.varlink.service.GetInfo", json!({})).unwrap();
    assert!(
        info["interfaces"]
            .as_array()
            .unwrap()
            .contains(&json!("io.vtpmd.Manager"))
    );
    let idl = c
        .call(
            "org.varlink.service.GetInterfaceDescription",
            json!({"interface": "io.vtpmd.Manager"}),
        )
        .unwrap();
    assert!(idl["description"].as_str().unwrap().starts_with("# vtpmd"));
    let caps = c.manager("GetCapabilities", json!({})).unwrap();
    assert_eq!(caps["versions"], json!(["1.2", "2.0"]));
    assert!(
        caps["traits"]
            .as_array()
            .unwrap()
            .contains(&json!("COMPUTE_SECURITY_TPM_2_0"))
    );
}

/// Runs vtpmctl as another user (root only: setpriv switches identity).
fn vtpmctl_as(uid: &str, gid: &str, socket: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid", uid, "--regid", gid, "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vtpmctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn peers_are_authorized_by_their_credentials() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    // nobody's primary group is the read-only group; daemon (uid 1) is in
    // no configured group.
    let d = Daemon::start_with("[api]\nreadonly_group = \"nogroup\"\n");
    create(&d, G1, "2.0", "tpm-tis");
    // The stranger must be able to reach the socket to be told no.
    std::fs::set_permissions(
        d.root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let read_only_status = vtpmctl_as("nobody", "nogroup", &d.socket, &["--json", "status", G1]);
    let read_only_stop = vtpmctl_as("nobody", "nogroup", &d.socket, &["stop", G1]);
    let stranger = vtpmctl_as("daemon", "daemon", &d.socket, &["list"]);

    assert_eq!(
        read_only_status.status.code(),
        Some(0),
        "{read_only_status:?}"
    );
    assert!(String::from_utf8_lossy(&read_only_status.stdout).contains(G1));
    assert_eq!(read_only_stop.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&read_only_stop.stderr).contains("PermissionDenied"),
        "{read_only_stop:?}"
    );
    assert_eq!(stranger.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("PermissionDenied"),
        "{stranger:?}"
    );
}

fn vtpmctl(d: &Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn vtpmctl_drives_the_real_daemon() {
    let d = Daemon::start();
    let pass = d.root.path().join("pass");
    std::fs::write(&pass, format!("{PASS}\n")).unwrap();
    let pass = pass.to_str().unwrap();

    let created = vtpmctl(
        &d,
        &[
            "create",
            G1,
            "--flavor-extra-spec",
            "hw:tpm_version=2.0",
            "--image-property",
            "hw_tpm_model=tpm-crb",
            "--passphrase-file",
            pass,
        ],
    );
    let started = vtpmctl(&d, &["--json", "start", G1, "--passphrase-file", pass]);
    let args = vtpmctl(&d, &["attach-args", G1, "--for", "qemu"]);
    let listed = vtpmctl(&d, &["list"]);
    let stopped = vtpmctl(&d, &["stop", G1]);
    let again = vtpmctl(&d, &["stop", G1]);

    assert_eq!(created.status.code(), Some(0), "{created:?}");
    assert_eq!(started.status.code(), Some(0), "{started:?}");
    let started: Value = serde_json::from_slice(&started.stdout).unwrap();
    let ctrl = started["guest"]["ctrl_socket"].as_str().unwrap();
    let args = String::from_utf8(args.stdout).unwrap();
    assert!(
        args.contains(&format!("path={ctrl}")) && args.contains("-device tpm-crb,tpmdev=tpm0"),
        "{args}"
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("running"));
    assert_eq!(stopped.status.code(), Some(0));
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("GuestNotRunning"),
        "{again:?}"
    );
}

#[test]
fn a_misbehaving_client_is_cut_off_and_others_are_served() {
    let d = Daemon::start_with(
        // max_sealed_bytes = 1: the room an admin (this test runs as root)
        // has beyond max_message_bytes for an Import is 4 bytes here, so
        // the framing limit is what is tested.
        "[api]\nmax_message_bytes = 8192\nmax_sealed_bytes = 1\nidle_timeout_ms = 300\nmax_connections = 3\nreserved_connections = 0\n",
    );
    // Too large: answered with InvalidParameter(message), then closed.
    let mut big = d.client();
    big.send_raw(&vec![b'{'; 10_000]);
    let reply = big.read_reply();
    assert_eq!(reply["error"], "org.varlink.service.InvalidParameter");
    assert_eq!(reply["parameters"]["parameter"], "message");

    // Silent: dropped after the idle timeout.
    let silent = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let n = std::io::Read::read(&mut &silent, &mut byte).unwrap();
    assert_eq!(n, 0, "an idle connection was not closed");
    eprintln!("idle connection closed after {:?}", started.elapsed());

    // A message that never ends is dropped the same way.
    let mut never = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    never
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::Write::write_all(&mut never, b"{\"method\":\"io.vtpmd.Manager.List\"").unwrap();
    assert_eq!(
        std::io::Read::read(&mut never, &mut byte).unwrap(),
        0,
        "a half message was kept open"
    );

    // Over the connection cap: the extra connection is told so and closed
    // at once; once a slot frees, a well-behaved client is served.
    let held: Vec<_> = (0..3).map(|_| d.client()).collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut extra = d.client();
    let refused = extra.read_reply();
    assert_eq!(
        refused["error"], "io.vtpmd.Manager.TooManyConnections",
        "over the cap but served: {refused}"
    );
    assert_eq!(refused["parameters"], json!({"scope": "all", "limit": 3}));
    assert_eq!(
        std::io::Read::read(&mut extra.stream(), &mut byte).unwrap_or(0),
        0,
        "not closed after the refusal"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(50));
    assert!(d.client().manager("List", json!({})).is_ok());
}

#[test]
fn monitor_reports_where_a_start_spent_its_time_and_each_reseal_latency() {
    let d = Daemon::start();
    create(&d, G1, "2.0", "tpm-crb");
    let mut events = d.events();

    let called = Instant::now();
    let running = start(&d, G1);
    let elapsed = called.elapsed();
    let (_, event) = events.wait_for(G1, "running", TIMEOUT).unwrap();
    let t = &event["start"];
    let phase = |name: &str| t[name].as_f64().unwrap_or_else(|| panic!("{name} in {t}"));
    let total = phase("total_ms");
    let phases = ["queued_ms", "kdf_ms", "unseal_ms", "spawn_ms", "ready_ms"];
    let sum: f64 = phases.iter().map(|p| phase(p)).sum();
    for p in phases {
        assert!(phase(p) >= 0.0, "{p} in {t}");
    }
    // The phases are parts of the whole, and the whole is what the client
    // waited for, less the round trip.
    assert!(sum <= total, "phases {sum} ms > total {total} ms: {t}");
    assert!(total <= elapsed.as_secs_f64() * 1e3, "{t} vs {elapsed:?}");
    assert!(phase("spawn_ms") > 0.0 && phase("ready_ms") > 0.0, "{t}");

    // A VMM's NV write is resealed, and the event says how long it took.
    write_nv_keep_running(ctrl_of(&running), b"timed");
    let (_, resealed) = events.wait_for(G1, "resealed", TIMEOUT).unwrap();
    let latency = resealed["reseal_ms"].as_f64().unwrap();
    assert!(
        latency > 0.0 && latency < TIMEOUT.as_secs_f64() * 1e3,
        "{resealed}"
    );
    assert!(resealed.get("start").is_none(), "{resealed}");

    // Changes that measured nothing carry no figures; a failed start says why.
    d.client().manager("Stop", json!({"guest": G1})).unwrap();
    let (_, stopped) = events.wait_for(G1, "stopped", TIMEOUT).unwrap();
    assert!(
        stopped.get("start").is_none() && stopped.get("reseal_ms").is_none(),
        "{stopped}"
    );
    assert_error(
        d.client()
            .manager("Start", json!({"guest": G1, "passphrase": b64("wrong")})),
        "WrongPassphrase",
    );
    let (_, undone) = events
        .wait(TIMEOUT, |e| {
            e["guest"]["guest"] == G1 && e.get("detail").is_some()
        })
        .unwrap();
    assert_eq!(undone["event"], "stopped", "{undone}");
    assert!(
        undone["detail"].as_str().unwrap().contains("start failed"),
        "{undone}"
    );
}

#[test]
fn sigterm_during_a_burst_of_starts_drops_the_queued_ones_and_exits() {
    // One Argon2 at a time, at its real cost: the Starts queue behind it.
    let mut d = Daemon::start_with_config(
        "[supervisor]\nkdf_parallelism = 1\n[api]\nrequest_timeout_ms = 120000\n",
    );
    let guests: Vec<String> = (0..6)
        .map(|i| format!("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f{i:02x}"))
        .collect();
    for g in &guests {
        create(&d, g, "2.0", "tpm-tis");
    }
    let mut events = d.events();
    let socket = d.socket.clone();
    let starts: Vec<_> = guests
        .iter()
        .map(|g| {
            let (g, socket) = (g.clone(), socket.clone());
            std::thread::spawn(move || {
                common::Client::try_connect(&socket)
                    .unwrap()
                    .manager("Start", json!({"guest": g, "passphrase": b64(PASS)}))
            })
        })
        .collect();
    // The first Start through its KDF; the others wait for the permit.
    events
        .wait(Duration::from_secs(60), |e| e["event"] == "running")
        .expect("no Start got through");

    assert_eq!(d.stop(), Some(0), "vtpmd exits cleanly");

    let answers: Vec<_> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let started = answers.iter().filter(|a| a.is_ok()).count();
    let dropped: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(started >= 1, "{answers:?}");
    assert!(
        !dropped.is_empty(),
        "every queued Start ran before the shutdown: {answers:?}"
    );
    for e in &dropped {
        assert!(e.name.ends_with(".Busy"), "{e:?}");
    }
    // The guests that started run on (a shutdown stops none); the
    // dropped ones left nothing behind.
    let started_ids: Vec<&String> = guests
        .iter()
        .zip(&answers)
        .filter(|(_, a)| a.is_ok())
        .map(|(g, _)| g)
        .collect();
    for g in &guests {
        assert_eq!(
            d.runtime_dir.join(g).exists(),
            started_ids.contains(&g),
            "{g}'s runtime directory"
        );
    }
    assert_eq!(
        common::swtpms_under(&d.runtime_dir).len(),
        started,
        "a swtpm per started guest, no more"
    );
    d.restart();
    for g in &guests {
        let expected = if started_ids.contains(&g) {
            "running"
        } else {
            "stopped"
        };
        assert_eq!(status(&d, g)["state"], expected, "{g}");
    }
}

/// Create runs swtpm_setup while the passphrase slot's Argon2id runs, not
/// after it (a Create costs the slower of the two, not their sum):
/// swtpm_setup, through a wrapper that notes when it began, begins well
/// within the time an Argon2id of these parameters takes (a Start's, as
/// Monitor reports it).
#[test]
fn create_runs_swtpm_setup_while_the_passphrase_slot_is_derived() {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{SystemTime, UNIX_EPOCH};

    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("swtpm_setup"))
        .find(|p| p.is_file())
        .expect("swtpm_setup on PATH");
    let dir = tempfile::tempdir().unwrap();
    let began = dir.path().join("began");
    let wrapper = dir.path().join("swtpm_setup");
    // Only the provisioning run (not vtpmd's --print-capabilities probe).
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *' --tpmstate '*) date +%s%N >> '{}' ;; esac\nexec '{}' \"$@\"\n",
            began.display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A real Argon2id (above the floor: no weak-KDF allowance), long
    // enough to tell "at once" from "after it".
    let d = Daemon::start_with_config(&format!(
        "[vault]\nargon2_memory_kib = 65536\nargon2_iterations = 8\nargon2_lanes = 1\n\n\
         [swtpm]\nswtpm_setup = \"{}\"\n",
        wrapper.display()
    ));
    let now_ns = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    };
    let called = now_ns();
    create(&d, G1, "2.0", "tpm-crb");
    let began: u128 = std::fs::read_to_string(&began)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let setup_after = Duration::from_nanos(u64::try_from(began - called).unwrap());

    // The same Argon2id in a Start; the created state opens and runs.
    let mut events = d.events();
    let running = start(&d, G1);
    assert_eq!(running["state"], "running", "{running}");
    let (_, event) = events.wait_for(G1, "running", TIMEOUT).unwrap();
    let kdf = Duration::from_secs_f64(event["start"]["kdf_ms"].as_f64().unwrap() / 1e3);
    assert!(
        setup_after < kdf / 2,
        "swtpm_setup began {setup_after:?} after the Create call; an Argon2id takes {kdf:?}"
    );
}
