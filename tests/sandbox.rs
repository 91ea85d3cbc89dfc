//! One sandbox per guest, and a daemon with only CAP_SETUID, CAP_SETGID
//! and CAP_CHOWN: the real vtpmd binary as root, real swtpm, the test
//! playing the VMM and, through `setpriv`, a hostile guest's uid.
//!
//! Every test needs root (vtpmd only hands out per-guest uids as root) and
//! is skipped with a printed reason otherwise.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::nv::{attach_and_write_nv, read_nv};
use common::{Daemon, b64};
use serde_json::{Value, json};
use vtpmd::supervisor::UidRange;

const A: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const B: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASS: &str = "correct horse battery staple";
const TIMEOUT: Duration = Duration::from_secs(10);
/// CAP_CHOWN (0), CAP_SETGID (6), CAP_SETUID (7).
const DOCUMENTED_CAPS: u64 = 0xc1;

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("{test}: skipped, needs root (per-guest uids are only handed out by a root vtpmd)");
    false
}

/// A group that stands in for the VMM's (`kvm` where it exists).
fn vmm_group() -> (String, u32) {
    for name in ["kvm", "disk"] {
        if let Ok(Some(group)) = nix::unistd::Group::from_name(name) {
            return (name.to_owned(), group.gid.as_raw());
        }
    }
    panic!("neither group kvm nor disk exists");
}

fn daemon() -> Daemon {
    let (group, _) = vmm_group();
    Daemon::start_with(&format!("[supervisor]\nsocket_group = \"{group}\"\n"))
}

/// A daemon whose guests' uids come from 256 uids of the default range
/// starting at `first`: no test running beside it holds them, so the
/// lowest free uid is `first`. (A uid a live process holds is never
/// given out, whichever vtpmd it belongs to.)
fn daemon_in_range(first: u32) -> Daemon {
    let (group, _) = vmm_group();
    Daemon::start_with(&format!(
        "[supervisor]\nsocket_group = \"{group}\"\nswtpm_uid_range = \"{first}-{}\"\n",
        first + 255
    ))
}

fn create(d: &Daemon, guest: &str) {
    d.client()
        .manager(
            "Create",
            json!({"guest": guest, "version": "2.0", "model": "tpm-tis", "passphrase": b64(PASS)}),
        )
        .unwrap();
}

fn start(d: &Daemon, guest: &str) -> Value {
    d.start_guest(guest, PASS)
}

fn status(d: &Daemon, guest: &str) -> Value {
    d.guest_status(guest)
}

fn pid_of(guest: &Value) -> u32 {
    u32::try_from(guest["pid"].as_u64().unwrap()).unwrap()
}

fn wait_state(d: &Daemon, guest: &str, state: &str) -> Value {
    d.wait_state(guest, state, TIMEOUT)
}

fn wait_generation_above(d: &Daemon, guest: &str, generation: u64) -> u64 {
    d.wait_generation_above(guest, generation, TIMEOUT)
}

/// `Name:\tvalue` of `/proc/<pid>/status`.
fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'s>(status: &'s str, name: &str) -> &'s str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn hex(status: &str, name: &str) -> u64 {
    u64::from_str_radix(field(status, name), 16).unwrap()
}

/// The one id of `Uid:` or `Gid:` (real, effective, saved, fs must agree).
fn single_id(status: &str, name: &str) -> u32 {
    let ids: Vec<u32> = field(status, name)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(ids.iter().all(|&id| id == ids[0]), "{name}: {ids:?}");
    ids[0]
}

/// Runs `argv` as `uid`/`gid` with no supplementary groups.
fn as_uid(uid: u32, argv: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg("--")
        .args(argv)
        .output()
        .unwrap()
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.uid(), meta.gid())
}

#[test]
fn each_guests_swtpm_runs_as_its_own_uid_with_no_capability_or_environment() {
    if !root_or_skip("each_guests_swtpm_runs_as_its_own_uid") {
        return;
    }
    // Arrange
    let first = UidRange::DEFAULT.first() + 0x1000;
    let d = daemon_in_range(first);
    create(&d, A);
    create(&d, B);

    // Act
    let pids = [pid_of(&start(&d, A)), pid_of(&start(&d, B))];

    // Assert
    let mut uids = Vec::new();
    for pid in pids {
        let s = proc_status(pid);
        eprintln!(
            "swtpm {pid}: Uid {} | Gid {} | Groups {} | CapInh {} CapPrm {} CapEff {} CapBnd {} CapAmb {} | NoNewPrivs {} | Seccomp {}",
            field(&s, "Uid"),
            field(&s, "Gid"),
            field(&s, "Groups"),
            field(&s, "CapInh"),
            field(&s, "CapPrm"),
            field(&s, "CapEff"),
            field(&s, "CapBnd"),
            field(&s, "CapAmb"),
            field(&s, "NoNewPrivs"),
            field(&s, "Seccomp"),
        );
        let uid = single_id(&s, "Uid");
        assert_eq!(single_id(&s, "Gid"), uid, "gid = uid");
        assert!(
            UidRange::DEFAULT.contains(uid),
            "uid {uid} outside the default range"
        );
        assert_eq!(field(&s, "Groups"), "", "no supplementary groups");
        for set in ["CapEff", "CapPrm", "CapAmb", "CapInh"] {
            assert_eq!(hex(&s, set), 0, "{set}");
        }
        assert_eq!(field(&s, "NoNewPrivs"), "1");
        assert_eq!(field(&s, "Seccomp"), "2");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(environ.is_empty(), "environment: {environ:?}");
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "two guests share a uid");
    // The lowest free uids, recorded with each guest.
    let recorded: Vec<String> = [A, B]
        .iter()
        .map(|g| std::fs::read_to_string(d.state_dir.join("guests").join(g).join("owner")).unwrap())
        .collect();
    assert_eq!(
        recorded,
        [format!("uid={first}\n"), format!("uid={}\n", first + 1)]
    );
    let mut sorted = uids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted[0], first);
}

#[test]
fn one_guests_uid_can_neither_read_list_nor_signal_another_guests_swtpm() {
    if !root_or_skip("one_guests_uid_can_neither_read_list_nor_signal_another") {
        return;
    }
    // Arrange
    let d = daemon();
    create(&d, A);
    create(&d, B);
    let pid_a = pid_of(&start(&d, A));
    let pid_b = pid_of(&start(&d, B));
    let uid_a = single_id(&proc_status(pid_a), "Uid");
    let b_dir = d.runtime_dir.join(B);
    let b_state = b_dir.join("tpm2-00.permall");
    assert!(b_state.exists(), "precondition: B's state file is there");

    // Act
    let own_signal = as_uid(uid_a, &["kill", "-0", &pid_a.to_string()]);
    let read = as_uid(uid_a, &["cat", b_state.to_str().unwrap()]);
    let list = as_uid(uid_a, &["ls", b_dir.to_str().unwrap()]);
    let signal = as_uid(uid_a, &["kill", "-0", &pid_b.to_string()]);

    // Assert
    assert!(
        own_signal.status.success(),
        "as uid {uid_a} its own swtpm can be signalled: {own_signal:?}"
    );
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!read.status.success() && read.stdout.is_empty(), "{read:?}");
    assert!(
        stderr(&read).contains("Permission denied"),
        "{}",
        stderr(&read)
    );
    assert!(!list.status.success(), "{list:?}");
    assert!(
        stderr(&list).contains("Permission denied"),
        "{}",
        stderr(&list)
    );
    assert!(!signal.status.success(), "{signal:?}");
    assert!(
        stderr(&signal).contains("Operation not permitted"),
        "{}",
        stderr(&signal)
    );
    // B's swtpm is untouched.
    assert_eq!(status(&d, B)["state"], "running");
}

#[test]
fn modes_and_owners_are_as_documented() {
    if !root_or_skip("modes_and_owners_are_as_documented") {
        return;
    }
    // Arrange
    let d = daemon();
    let (_, vmm_gid) = vmm_group();
    create(&d, A);
    let running = start(&d, A);
    let uid = single_id(&proc_status(pid_of(&running)), "Uid");
    let ctrl = Path::new(running["ctrl_socket"].as_str().unwrap()).to_owned();
    let dir = d.runtime_dir.join(A);

    // Act: the VMM makes swtpm write (a file it creates itself), and
    // INIT makes it take its lock.
    let _vmm = attach_and_write_nv(&ctrl, b"modes");
    wait_generation_above(&d, A, 1);

    // Assert
    assert_eq!(mode_owner(&d.runtime_dir), (0o711, 0, 0), "runtime dir");
    // vtpmd's and the guest's group; swtpm's files (gid = uid).
    assert_eq!(mode_owner(&dir), (0o770, 0, uid), "guest runtime dir");
    assert_eq!(
        mode_owner(&dir.join("tpm2-00.permall")),
        (0o644, uid, uid),
        "state file"
    );
    assert_eq!(
        mode_owner(&dir.join(".lock")),
        (0o660, 0, uid),
        "swtpm's lock"
    );
    let socket = std::fs::symlink_metadata(&ctrl).unwrap();
    assert!(socket.file_type().is_socket());
    assert_eq!(mode_owner(&ctrl), (0o660, uid, vmm_gid), "control socket");
    assert_eq!(mode_owner(&d.state_dir), (0o700, 0, 0), "state dir");
    let guest_dir = d.state_dir.join("guests").join(A);
    assert_eq!(mode_owner(&guest_dir), (0o700, 0, 0), "guest state dir");
    assert_eq!(
        mode_owner(&guest_dir.join("tpm.sealed")),
        (0o600, 0, 0),
        "sealed file"
    );
    assert_eq!(
        mode_owner(&guest_dir.join("tpm.sealed.prev")),
        (0o600, 0, 0),
        "previous generation"
    );
    assert_eq!(
        mode_owner(&guest_dir.join("owner")),
        (0o600, 0, 0),
        "owner record"
    );
}

#[test]
fn the_daemon_keeps_only_setuid_setgid_chown_and_still_does_everything() {
    if !root_or_skip("the_daemon_keeps_only_setuid_setgid_chown") {
        return;
    }
    // Arrange
    let first = UidRange::DEFAULT.first() + 0x2000;
    let mut d = daemon_in_range(first);
    let s = proc_status(u32::try_from(d.pid()).unwrap());
    eprintln!(
        "vtpmd: CapInh {} CapPrm {} CapEff {} CapBnd {} CapAmb {} NoNewPrivs {}",
        field(&s, "CapInh"),
        field(&s, "CapPrm"),
        field(&s, "CapEff"),
        field(&s, "CapBnd"),
        field(&s, "CapAmb"),
        field(&s, "NoNewPrivs"),
    );
    assert_eq!(hex(&s, "CapEff"), DOCUMENTED_CAPS, "effective");
    assert_eq!(hex(&s, "CapPrm"), DOCUMENTED_CAPS, "permitted");
    assert_eq!(hex(&s, "CapBnd"), DOCUMENTED_CAPS, "bounding");
    assert_eq!(hex(&s, "CapInh"), 0, "inheritable");
    assert_eq!(hex(&s, "CapAmb"), 0, "ambient");
    assert_eq!(field(&s, "NoNewPrivs"), "1");

    // Act + Assert: Create, Start, a VMM writes, a reseal (vtpmd reads the
    // guest's files through its group), Stop (a signal to another uid).
    create(&d, A);
    let running = start(&d, A);
    let ctrl = Path::new(running["ctrl_socket"].as_str().unwrap()).to_owned();
    let vmm = attach_and_write_nv(&ctrl, b"capless");
    let generation = wait_generation_above(&d, A, 1);
    let stopped = d.client().manager("Stop", json!({"guest": A})).unwrap()["guest"].clone();
    drop(vmm);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped["generation"].as_u64().unwrap() >= generation);
    assert!(
        !d.runtime_dir.join(A).exists(),
        "plaintext dir left after Stop"
    );
    assert!(!ctrl.exists(), "socket left after Stop");

    // A crash of swtpm (SIGKILL from outside) is noticed and wiped.
    let running = start(&d, A);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid_of(&running)).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let failed = wait_state(&d, A, "failed");
    assert!(
        failed["failure"].as_str().unwrap().contains("SIGKILL"),
        "{failed}"
    );
    assert!(
        !d.runtime_dir.join(A).exists(),
        "plaintext dir left after a crash"
    );

    // A guest without a uid record (created before per-guest uids) gets
    // one at its next Start, across a daemon restart; the data is back.
    d.stop();
    std::fs::remove_file(d.state_dir.join("guests").join(A).join("owner")).unwrap();
    d.restart();
    let again = start(&d, A);
    assert_eq!(
        read_nv(Path::new(again["ctrl_socket"].as_str().unwrap()), 7),
        b"capless"
    );
    wait_state(&d, A, "stopped");
    assert_eq!(
        std::fs::read_to_string(d.state_dir.join("guests").join(A).join("owner")).unwrap(),
        format!("uid={first}\n")
    );

    // Delete frees the uid: the next guest gets it.
    d.client().manager("Delete", json!({"guest": A})).unwrap();
    assert!(!d.state_dir.join("guests").join(A).exists());
    create(&d, B);
    assert_eq!(
        std::fs::read_to_string(d.state_dir.join("guests").join(B).join("owner")).unwrap(),
        format!("uid={first}\n")
    );
}

#[test]
fn a_runtime_dir_that_guests_cannot_reach_is_refused_at_start() {
    if !root_or_skip("a_runtime_dir_that_guests_cannot_reach_is_refused_at_start") {
        return;
    }
    // Arrange: a private (0700) parent, as `mktemp -d` makes.
    let root = tempfile::Builder::new()
        .prefix("vt")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let config = root.path().join("vtpmd.toml");
    std::fs::write(&config, common::TEST_CONFIG).unwrap();

    // Act
    let mut child = Command::new(env!("CARGO_BIN_EXE_vtpmd"))
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(root.path().join("state"))
        .arg("--runtime-dir")
        .arg(root.path().join("run"))
        .arg("--socket")
        .arg(root.path().join("api.sock"))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vtpmd started on a runtime dir that guests cannot reach");
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    // Assert
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("not searchable by others"), "{stderr}");
}

#[test]
fn a_live_swtpm_of_a_guests_uid_is_adopted_after_a_crash() {
    if !root_or_skip("a_live_swtpm_of_a_guests_uid_is_adopted_after_a_crash") {
        return;
    }
    // Arrange: a running guest whose swtpm has not been INIT'ed (so holds
    // no lock) and runs as the guest's uid; its socket belongs to that uid
    // and the VMM's group, which vtpmd may not connect to.
    let mut d = daemon();
    create(&d, A);
    let started = start(&d, A);
    let swtpm = pid_of(&started);

    // Act: vtpmd dies without a word; swtpm lives on; vtpmd comes back.
    d.kill();
    d.restart();

    // Assert: the recorded swtpm proved to be itself (start time, uid,
    // executable, state directory) and was adopted; Stop reaches it
    // (signalled as its own uid, vtpmd has no CAP_KILL) and it is gone.
    let found = status(&d, A);
    assert_eq!(found["state"], "running", "{found}");
    assert_eq!(pid_of(&found), swtpm);
    assert!(
        d.runtime_dir.join(A).exists(),
        "a live swtpm's directory was wiped"
    );
    let stopped = d.client().manager("Stop", json!({"guest": A})).unwrap();
    assert_eq!(stopped["guest"]["state"], "stopped", "{stopped}");
    assert!(
        !common::is_alive(i32::try_from(swtpm).unwrap()),
        "the adopted swtpm still runs"
    );
}
