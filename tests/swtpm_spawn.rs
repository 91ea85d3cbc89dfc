//! `swtpm::spawn` against the real swtpm 0.7.1: a control socket that is
//! connectable at once, exits seen through the pidfd, clean stops, and a
//! child that gets nothing but what it needs.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

#[path = "common/live.rs"]
#[allow(dead_code)]
mod live;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use secrecy::ExposeSecret;
use tempfile::TempDir;
use vtpmd::protocol::{GuestId, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::swtpm::spawn::{ExitReason, SpawnError, SpawnSpec, SpecError, Swtpm, spawn};

const SWTPM: &str = "/usr/bin/swtpm";
const GUEST: &str = "3b0c6f0e-5d1a-4c9b-9e2f-7a8b6c5d4e3f";

/// Tests count this process's fds and children, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn guest() -> GuestId {
    GuestId::parse(GUEST).unwrap()
}

fn key(fill: u8) -> SecretBuf {
    let mut key = SecretBuf::with_capacity(32).unwrap();
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ fill).collect();
    key.extend_from_slice(&bytes).unwrap();
    key
}

fn hex(key: &SecretBuf) -> String {
    key.expose_secret()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("state")).unwrap();
        Fixture { dir }
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn sock(&self) -> PathBuf {
        self.dir.path().join("ctrl.sock")
    }
    fn lock(&self) -> PathBuf {
        self.state().join(".lock")
    }
    fn spec<'k>(&self, key: &'k SecretBuf) -> SpawnSpec<'k> {
        SpawnSpec::new(
            SWTPM,
            TpmVersion::V2_0,
            guest(),
            self.state(),
            self.sock(),
            key,
        )
    }
    /// A TPM 2.0 state made by swtpm_setup, encrypted under `key`.
    fn provision(&self, key: &SecretBuf) {
        let keyfile = self.dir.path().join("setup.key");
        fs::write(&keyfile, hex(key)).unwrap();
        let out = Command::new("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(self.state())
            .arg("--keyfile")
            .arg(&keyfile)
            .arg("--cipher")
            .arg("aes-256-cbc")
            .output()
            .unwrap();
        fs::remove_file(&keyfile).unwrap();
        assert!(
            out.status.success(),
            "swtpm_setup: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One control command, raw: `be32 cmd || body`, reads `reply_len` bytes.
fn ctrl(path: &Path, cmd: u32, body: &[u8], reply_len: usize) -> Vec<u8> {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut msg = cmd.to_be_bytes().to_vec();
    msg.extend_from_slice(body);
    stream.write_all(&msg).unwrap();
    let mut reply = vec![0; reply_len];
    stream.read_exact(&mut reply).unwrap();
    reply
}

fn get_capability(path: &Path) -> u64 {
    let reply = ctrl(path, 0x01, &[], 8);
    u64::from_be_bytes(reply.try_into().unwrap())
}

fn init(path: &Path) -> u32 {
    let reply = ctrl(path, 0x02, &0u32.to_be_bytes(), 4);
    u32::from_be_bytes(reply.try_into().unwrap())
}

fn fd_numbers(pid: &str) -> BTreeSet<i32> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect()
}

fn fd_targets(pid: u32) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = fd_numbers(&pid.to_string())
        .into_iter()
        .map(|n| {
            let target = fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
            (n, target.display().to_string())
        })
        .collect();
    fds.sort();
    fds
}

fn status_field(pid: u32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap()
        .trim()
        .to_owned()
}

/// Children of this process (any state, zombies included).
fn children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{name}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may contain spaces, so split
        // after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) == Some(&me.as_str()) {
            found.push(format!("{head}) {}", fields[0]));
        }
    }
    found
}

#[test]
fn ctrl_socket_answers_the_moment_spawn_returns() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);

    let started = Instant::now();
    let mut swtpm = spawn(&fx.spec(&key)).unwrap();
    let spawned = started.elapsed();
    // No retry: the first connect must work.
    let caps = get_capability(swtpm.ctrl_path());
    println!(
        "spawn returned after {spawned:?}; GET_CAPABILITY answered after {:?}",
        started.elapsed()
    );

    assert_eq!(caps, 0xffff);
    assert_eq!(swtpm.try_exit().unwrap(), None);
    assert_eq!(
        swtpm.stop(Duration::from_secs(2)).unwrap(),
        ExitReason::Exited(0)
    );
}

#[test]
fn tpm12_answers_with_its_capabilities() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut spec = fx.spec(&key);
    spec.version = TpmVersion::V1_2;

    let mut swtpm = spawn(&spec).unwrap();

    assert_eq!(get_capability(swtpm.ctrl_path()), 0x7fff);
    assert_eq!(
        swtpm.stop(Duration::from_secs(2)).unwrap(),
        ExitReason::Exited(0)
    );
}

#[test]
fn socket_gets_the_requested_mode_and_owner() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut spec = fx.spec(&key);
    spec.socket_mode = 0o600;
    let owner = if Uid::effective().is_root() {
        (Uid::from_raw(4242), Gid::from_raw(4343))
    } else {
        (Uid::effective(), Gid::effective())
    };
    spec.socket_owner = Some(owner);

    let swtpm = spawn(&spec).unwrap();
    let meta = fs::symlink_metadata(swtpm.ctrl_path()).unwrap();

    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        (meta.uid(), meta.gid()),
        (owner.0.as_raw(), owner.1.as_raw())
    );
}

#[test]
fn a_stale_socket_is_replaced_but_a_regular_file_is_not() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    drop(std::os::unix::net::UnixListener::bind(fx.sock()).unwrap());
    assert!(fx.sock().exists());

    let mut swtpm = spawn(&fx.spec(&key)).unwrap();
    assert_eq!(get_capability(swtpm.ctrl_path()), 0xffff);
    swtpm.stop(Duration::from_secs(2)).unwrap();

    fs::write(fx.sock(), b"not a socket").unwrap();
    let err = spawn(&fx.spec(&key)).unwrap_err();
    assert!(
        matches!(err, SpawnError::CtrlPathOccupied { .. }),
        "{err:?}"
    );
    assert_eq!(fs::read(fx.sock()).unwrap(), b"not a socket");
}

#[test]
fn sigkill_is_noticed_through_the_pidfd_at_once() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut swtpm = spawn(&fx.spec(&key)).unwrap();
    let pid = Pid::from_raw(swtpm.pid().try_into().unwrap());

    let killed = Instant::now();
    kill(pid, Signal::SIGKILL).unwrap();
    let reason = swtpm.wait_exit(Duration::from_secs(1)).unwrap();
    let noticed = killed.elapsed();
    println!("SIGKILL noticed after {noticed:?}");

    assert_eq!(reason, Some(ExitReason::Signaled(Signal::SIGKILL)));
    assert!(noticed < Duration::from_secs(1));
    // Cleanup ran on the observed exit too.
    assert!(!swtpm.ctrl_path().exists());
}

#[test]
fn wait_exit_times_out_on_a_running_swtpm() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut swtpm = spawn(&fx.spec(&key)).unwrap();

    let started = Instant::now();
    let reason = swtpm.wait_exit(Duration::from_millis(100)).unwrap();

    assert_eq!(reason, None);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[test]
fn stop_is_a_clean_sigterm_exit_leaving_no_socket_or_lock() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut swtpm = spawn(&fx.spec(&key)).unwrap();
    assert_eq!(init(swtpm.ctrl_path()), 0);
    assert!(fx.lock().exists(), "swtpm takes .lock on INIT");
    assert!(fx.state().join("tpm2-00.permall").exists());

    let started = Instant::now();
    let reason = swtpm.stop(Duration::from_secs(2)).unwrap();
    println!("stop took {:?}", started.elapsed());

    assert_eq!(reason, ExitReason::Exited(0));
    assert!(!fx.sock().exists(), "control socket left behind");
    assert!(!fx.lock().exists(), ".lock left behind");
    assert!(fx.state().join("tpm2-00.permall").exists());
}

#[test]
fn terminate_makes_swtpm_exit_when_the_vmm_hangs_up() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut swtpm = spawn(&fx.spec(&key)).unwrap();

    // QEMU's way: CMD_SET_DATAFD with one end of a socketpair, then INIT.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut ctrl = UnixStream::connect(swtpm.ctrl_path()).unwrap();
    ctrl.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let fds = [std::os::fd::AsRawFd::as_raw_fd(&theirs)];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let msg = 0x10u32.to_be_bytes();
    let iov = [std::io::IoSlice::new(&msg)];
    nix::sys::socket::sendmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&ctrl),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut res = [0u8; 4];
    ctrl.read_exact(&mut res).unwrap();
    assert_eq!(u32::from_be_bytes(res), 0, "SET_DATAFD");
    drop(theirs);
    ctrl.write_all(&[0, 0, 0, 2, 0, 0, 0, 0]).unwrap();
    ctrl.read_exact(&mut res).unwrap();
    assert_eq!(u32::from_be_bytes(res), 0, "INIT");
    // TPM2_Startup(CLEAR) over the data channel.
    let mut data = ours;
    data.write_all(&[0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0])
        .unwrap();
    let mut rsp = [0u8; 10];
    data.read_exact(&mut rsp).unwrap();
    assert_eq!(&rsp[6..], &[0, 0, 0, 0], "TPM2_Startup");

    let hung_up = Instant::now();
    drop(data);
    let reason = swtpm.wait_exit(Duration::from_secs(5)).unwrap();
    println!("--terminate exit noticed after {:?}", hung_up.elapsed());

    assert_eq!(reason, Some(ExitReason::Exited(0)));
    assert!(!fx.sock().exists());
    assert!(!fx.lock().exists());
}

#[test]
fn a_hundred_spawn_stop_cycles_leave_nothing_behind() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let fds_before = fd_numbers("self");
    let children_before = children();

    let started = Instant::now();
    for i in 0..100 {
        let mut swtpm = spawn(&fx.spec(&key)).unwrap();
        if i % 10 == 0 {
            assert_eq!(init(swtpm.ctrl_path()), 0);
        }
        assert_eq!(
            swtpm.stop(Duration::from_secs(2)).unwrap(),
            ExitReason::Exited(0)
        );
    }
    println!("100 spawn/stop cycles took {:?}", started.elapsed());

    assert_eq!(fd_numbers("self"), fds_before, "vtpmd's fds changed");
    assert_eq!(children(), children_before, "children left behind");
    assert!(!fx.sock().exists());
    assert!(!fx.lock().exists());
}

#[test]
fn dropping_a_running_swtpm_stops_and_reaps_it() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let swtpm = spawn(&fx.spec(&key)).unwrap();
    let pid = swtpm.pid();
    assert_eq!(init(swtpm.ctrl_path()), 0);

    drop(swtpm);

    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "zombie or alive"
    );
    assert!(!fx.sock().exists());
    assert!(!fx.lock().exists());
}

#[test]
fn missing_binary_is_an_exec_error_naming_the_path() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut spec = fx.spec(&key);
    spec.swtpm = PathBuf::from("/nonexistent/bin/swtpm");

    let err = spawn(&spec).unwrap_err();

    match &err {
        SpawnError::Exec { binary, source } => {
            assert_eq!(binary, Path::new("/nonexistent/bin/swtpm"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Exec, got {other:?}"),
    }
    assert!(err.to_string().contains("/nonexistent/bin/swtpm"));
    assert!(!fx.sock().exists(), "socket left behind");
}

#[test]
fn missing_state_dir_is_refused_before_spawning() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut spec = fx.spec(&key);
    spec.state_dir = fx.dir.path().join("gone");

    let err = spawn(&spec).unwrap_err();

    assert!(
        matches!(
            err,
            SpawnError::InvalidSpec(SpecError::StateDirMissing { .. })
        ),
        "{err:?}"
    );
    assert!(!fx.sock().exists());
}

#[test]
fn state_dir_removed_behind_the_specs_back_shows_swtpms_message() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut swtpm = spawn(&fx.spec(&key)).unwrap();
    fs::remove_dir(fx.state()).unwrap();

    let res = init(swtpm.ctrl_path());
    let reason = swtpm.wait_exit(Duration::from_secs(2)).unwrap();
    println!(
        "INIT result {res:#x}, then {reason:?}; log: {:#?}",
        swtpm.log_tail()
    );

    assert_ne!(res, 0);
    assert!(!swtpm.log_tail().is_empty(), "swtpm said nothing");
}

#[test]
fn an_immediate_exit_is_an_exited_error_with_the_childs_words() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    // swtpm itself only fails this early on bad options, which validation
    // keeps out; a stand-in shows what spawn makes of such an exit.
    let fake = fx.dir.path().join("fake-swtpm");
    fs::write(
        &fake,
        "#!/bin/sh\necho 'fake swtpm: cannot start' >&2\nexit 3\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let mut spec = fx.spec(&key);
    spec.swtpm = fake;
    spec.early_exit_window = Duration::from_secs(2);

    let started = Instant::now();
    let err = spawn(&spec).unwrap_err();
    println!("after {:?}: {err}", started.elapsed());

    let SpawnError::Exited {
        reason, log_tail, ..
    } = &err
    else {
        panic!("expected Exited, got {err:?}");
    };
    assert_eq!(*reason, ExitReason::Exited(3));
    assert_eq!(log_tail, &["fake swtpm: cannot start"]);
    assert!(err.to_string().contains("fake swtpm: cannot start"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited the whole window"
    );
    assert!(!fx.sock().exists(), "socket left behind");
}

#[test]
fn a_state_made_by_swtpm_setup_opens_with_the_same_hex_key() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0xa5);
    fx.provision(&key);

    let mut swtpm = spawn(&fx.spec(&key)).unwrap();

    assert_eq!(init(swtpm.ctrl_path()), 0);
    assert_eq!(
        swtpm.stop(Duration::from_secs(2)).unwrap(),
        ExitReason::Exited(0)
    );
}

#[test]
fn a_wrong_key_fails_init_with_swtpms_hmac_message() {
    let _serial = serial();
    let fx = Fixture::new();
    let key_a = key(0xa5);
    let key_b = key(0x5a);
    fx.provision(&key_a);

    // The key is only used when the state is read, at INIT: spawn succeeds.
    let mut swtpm = spawn(&fx.spec(&key_b)).unwrap();
    let res = init(swtpm.ctrl_path());
    let after_init = swtpm.wait_exit(Duration::from_millis(500)).unwrap();
    println!(
        "INIT with the wrong key: result {res:#x}, then {after_init:?}; log: {:#?}",
        swtpm.log_tail()
    );

    assert_ne!(res, 0);
    assert!(
        swtpm.log_tail().iter().any(|l| l.contains("HMAC")),
        "{:?}",
        swtpm.log_tail()
    );
}

#[test]
fn the_child_gets_an_empty_environment_seccomp_and_only_its_fds() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let mut swtpm = spawn(&fx.spec(&key)).unwrap();
    let pid = swtpm.pid();

    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let before_init = fd_targets(pid);
    // Hold the control connection while looking: once it closes, swtpm
    // drops its end at a moment of its own choosing.
    let mut ctrl =
        vtpmd::swtpm::ctrl::client::CtrlClient::connect(swtpm.ctrl_path(), Duration::from_secs(5))
            .unwrap();
    ctrl.init(false).unwrap();
    let after_init = fd_targets(pid);
    drop(ctrl);
    println!("fds before INIT: {before_init:#?}\nafter INIT: {after_init:#?}");

    assert!(environ.is_empty(), "environment: {environ:?}");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let hex_key = hex(&key);
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(&hex_key),
        "key in argv"
    );
    let numbers: Vec<i32> = before_init.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4, 5]);
    assert_eq!(before_init[0].1, "/dev/null");
    assert!(before_init[1].1.starts_with("pipe:"));
    assert_eq!(
        before_init[1].1, before_init[2].1,
        "stdout and stderr: log pipe"
    );
    assert!(
        before_init[3].1.starts_with("socket:"),
        "fd 3: ctrl listener"
    );
    // swtpm read the key to EOF and closed fd 4; its own signal pipe
    // (both ends) took 4 and 5.
    assert!(before_init[4].1.starts_with("pipe:"));
    assert_eq!(before_init[4].1, before_init[5].1, "fds 4 and 5: one pipe");
    assert_ne!(before_init[4].1, before_init[1].1);
    // After INIT: the ctrl connection and the .lock, nothing else.
    assert_eq!(after_init.len(), 8, "{after_init:?}");
    assert_eq!(&after_init[..6], &before_init[..]);
    assert!(after_init[6].1.starts_with("socket:"));
    let lock = fx.lock().display().to_string();
    assert!(
        after_init.iter().any(|(_, t)| *t == lock),
        "no .lock fd after INIT: {after_init:?}"
    );
    swtpm.stop(Duration::from_secs(2)).unwrap();
}

/// What swtpm is handed at exec, seen by a wrapper that lists its fds and
/// then execs the real swtpm: 0-4, with the key pipe at 4 and no write end
/// of it anywhere. The pipe swtpm holds at 4 and 5 afterwards is another
/// one (its signal self-pipe, made after it read the key and closed 4).
#[test]
fn the_key_pipe_reaches_swtpm_read_end_only_and_is_gone_once_read() {
    let _serial = serial();
    let fx = Fixture::new();
    let key = key(0);
    let listing = fx.dir.path().join("fds-at-exec");
    let wrapper = fx.dir.path().join("swtpm-wrapper");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nls -l /proc/$$/fd/ > {}\nexec {SWTPM} \"$@\"\n",
            listing.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let spec = SpawnSpec::new(
        &wrapper,
        TpmVersion::V2_0,
        guest(),
        fx.state(),
        fx.sock(),
        &key,
    );
    let mut swtpm = spawn(&spec).unwrap();
    // The control socket answers only once swtpm (not the wrapper) runs.
    assert_eq!(get_capability(swtpm.ctrl_path()), 0xffff);
    let mut at_exec: Vec<(i32, String)> = fs::read_to_string(&listing)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            let n = left.rsplit(' ').next()?.parse().ok()?;
            Some((n, target.to_owned()))
        })
        // dash keeps its script and a saved fd at 10 and up, CLOEXEC.
        .filter(|(n, _)| *n < 10)
        .collect();
    at_exec.sort();
    let running = fd_targets(swtpm.pid());
    println!("at exec: {at_exec:#?}\nrunning: {running:#?}");

    let numbers: Vec<i32> = at_exec.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4], "fds handed to swtpm");
    let key_pipe = &at_exec[4].1;
    assert!(key_pipe.starts_with("pipe:"), "fd 4: {key_pipe}");
    let key_pipe_mode = fs::read_to_string(fx.dir.path().join("fds-at-exec"))
        .unwrap()
        .lines()
        .find(|l| l.ends_with(&format!(" 4 -> {key_pipe}")))
        .map(|l| l[..3].to_owned())
        .unwrap();
    assert_eq!(key_pipe_mode, "lr-", "fd 4 is the read end only");
    assert!(
        running.iter().all(|(_, t)| t != key_pipe),
        "swtpm still holds the key pipe {key_pipe}: {running:?}"
    );
    swtpm.stop(Duration::from_secs(2)).unwrap();
}

#[test]
fn runs_as_the_requested_user_when_root() {
    let _serial = serial();
    if !Uid::effective().is_root() {
        println!("skipped: needs root to switch users");
        return;
    }
    let user = User::from_name("tss")
        .unwrap()
        .or_else(|| User::from_name("nobody").unwrap())
        .unwrap();
    let fx = Fixture::new();
    fs::set_permissions(fx.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(fx.state(), Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    let key = key(0);
    let mut spec = fx.spec(&key);
    spec.run_as = Some((user.uid, user.gid));
    spec.socket_owner = Some((user.uid, user.gid));

    let mut swtpm = spawn(&spec).unwrap();
    let pid = swtpm.pid();
    let uid_line = status_field(pid, "Uid");
    let gid_line = status_field(pid, "Gid");
    let groups = status_field(pid, "Groups");
    let init_res = init(swtpm.ctrl_path());

    let uid = user.uid.as_raw().to_string();
    let gid = user.gid.as_raw().to_string();
    assert!(
        uid_line.split_whitespace().all(|u| u == uid),
        "Uid: {uid_line}"
    );
    assert!(
        gid_line.split_whitespace().all(|g| g == gid),
        "Gid: {gid_line}"
    );
    assert_eq!(groups, "", "supplementary groups");
    assert_eq!(init_res, 0);
    let permall = fs::metadata(fx.state().join("tpm2-00.permall")).unwrap();
    assert_eq!(permall.uid(), user.uid.as_raw());
    assert_eq!(
        swtpm.stop(Duration::from_secs(2)).unwrap(),
        ExitReason::Exited(0)
    );
    assert!(!fx.lock().exists());
    assert!(!fx.sock().exists());
}

#[allow(dead_code)]
fn assert_send(swtpm: Swtpm) -> impl Send {
    swtpm
}

/// What QEMU's migration moves, done by hand: a swtpm with a
/// `--migration-key` hands out its state blobs encrypted (GET_CONFIG says
/// both keys), none of an NV index's bytes in them; a second swtpm on an
/// empty state directory with the same two keys takes them (STOP,
/// SET_STATEBLOB, INIT, as QEMU's `-incoming` does) and answers NV_Read
/// with the bytes, without a TPM2_Startup: the volatile state moved too.
/// Without a migration key the same blob carries the NV bytes in clear.
#[test]
fn a_migration_key_encrypts_the_blobs_and_the_same_keys_take_them_in() {
    use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};
    use vtpmd::swtpm::ctrl::{BlobType, Vmm};
    let _serial = serial();
    const INDEX: u32 = 0x0150_0021;
    let marker = b"plaintext-marker-that-must-not-travel-0042";
    let state_key = key(0x11);
    let migration_key = key(0x22);
    for with_key in [false, true] {
        let src = Fixture::new();
        src.provision(&state_key);
        let mut spec = src.spec(&state_key);
        spec.migration_key = with_key.then_some(&migration_key);
        let source = spawn(&spec).unwrap();
        let mut vmm = Vmm::attach(&src.sock(), Duration::from_secs(5)).unwrap();
        assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
        let attrs =
            nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
        let len = u16::try_from(marker.len()).unwrap();
        assert_eq!(
            vmm.transact(&tpm::tpm2_nv_define_space(INDEX, attrs, len))
                .unwrap()
                .rc,
            0
        );
        let write = tpm::tpm2_nv_write(INDEX, marker, 0).unwrap();
        assert_eq!(vmm.transact(&write).unwrap().rc, 0);
        let config = vmm.ctrl().get_config().unwrap();
        assert_eq!(config, if with_key { 0x3 } else { 0x1 }, "GET_CONFIG");

        // The source side of a migration: both blobs, as QEMU 7.2 reads
        // them (asking for them decrypted: PTM_STATE_FLAG_DECRYPTED).
        let mut blobs = Vec::new();
        for blob in [BlobType::Permanent, BlobType::Volatile] {
            let got = vmm.ctrl().get_state_blob(blob, true).unwrap();
            let clear = got
                .data
                .as_bytes()
                .windows(marker.len())
                .any(|w| w == marker);
            if blob == BlobType::Permanent {
                assert_eq!(clear, !with_key, "NV bytes in the blob: {clear}");
            }
            assert!(!with_key || !clear, "{blob:?} carries the NV bytes");
            blobs.push((blob, got));
        }
        drop(vmm);
        drop(source);
        if !with_key {
            continue;
        }

        // The destination: same keys, empty state directory.
        let dst = Fixture::new();
        let mut spec = dst.spec(&state_key);
        spec.migration_key = Some(&migration_key);
        let destination = spawn(&spec).unwrap();
        let (ctrl, mut data) = live::set_blobs(&dst.sock(), blobs);
        let read = data
            .transact(&tpm::tpm2_nv_read(INDEX, len, 0), Duration::from_secs(5))
            .unwrap();
        let read = vtpmd::swtpm::ctrl::TpmResponse::parse(&read).unwrap();
        assert_eq!(read.rc, 0, "NV_Read on the destination");
        assert_eq!(read.tpm2_nv_data().unwrap(), marker);
        drop(ctrl);
        drop(destination);
    }
}
