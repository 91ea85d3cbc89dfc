//! The supervisor with real swtpm: lifecycles for 2.0/TIS, 2.0/CRB and
//! 1.2/TIS with NV data surviving Stop/Start and a daemon restart; typed
//! errors that change nothing; a SIGKILLed swtpm noticed at once; the VMM
//! hanging up; 50 guests in parallel; reseal latency; shutdown.
//!
//! A weak KDF policy (m = 64 KiB, t = 1) keeps the tests fast; runtime
//! directories live under /tmp so socket paths stay short.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::supervisor::{
    Event, EventKind, GuestInfo, GuestState, Supervisor, SupervisorConfig, SupervisorError,
};
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};
use vtpmd::vault::{KdfParams, KdfPolicy, SealedState};

const NV_INDEX: u32 = 0x0150_0016;
const TIMEOUT: Duration = Duration::from_secs(10);
const VMM_TIMEOUT: Duration = Duration::from_secs(5);
const ATTRS: u32 =
    nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;

struct Env {
    root: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("vs")
            .tempdir_in("/tmp")
            .unwrap();
        // As root each guest's swtpm runs as its own uid (the default),
        // which must pass through this directory.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        Self { root }
    }

    fn state(&self) -> PathBuf {
        self.root.path().join("s")
    }

    fn run(&self) -> PathBuf {
        self.root.path().join("r")
    }

    fn config(&self) -> SupervisorConfig {
        let mut config = SupervisorConfig::new(self.state(), self.run());
        config.kdf = policy();
        config.kdf_parallelism = 4;
        config.stop_grace = Duration::from_secs(2);
        config.lock_wait = Duration::from_secs(20);
        config
    }

    async fn supervisor(&self) -> Arc<Supervisor> {
        Supervisor::start(self.config())
            .await
            .unwrap_or_else(|e| panic!("{}", vtpmd::error_chain::chain(&e)))
    }

    fn sealed(&self, g: GuestId) -> PathBuf {
        self.state()
            .join("guests")
            .join(g.to_string())
            .join("tpm.sealed")
    }

    /// Everything in the runtime directory (plaintext dirs, sockets).
    fn runtime_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.run())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }
}

fn policy() -> KdfPolicy {
    KdfPolicy {
        params: KdfParams::new(64, 1, 1).unwrap(),
        allow_weak: true,
    }
}

fn pass(text: &str) -> SecretBuf {
    let mut buf = SecretBuf::with_capacity(text.len()).unwrap();
    buf.extend_from_slice(text.as_bytes()).unwrap();
    buf
}

fn new_guest() -> GuestId {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).unwrap();
    GuestId::from_bytes(bytes)
}

fn spec(version: TpmVersion, model: TpmModel) -> TpmSpec {
    TpmSpec::new(version, model).unwrap()
}

fn chain(e: &SupervisorError) -> String {
    vtpmd::error_chain::chain(e)
}

/// Waits for the first event of `g` that `pred` accepts.
async fn wait_event(rx: &mut Receiver<Event>, g: GuestId, pred: impl Fn(&Event) -> bool) -> Event {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match rx.recv().await {
                Ok(e) if e.guest.guest == g && pred(&e) => return e,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => panic!("event channel closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no such event for {g} within {TIMEOUT:?}"))
}

/// Whether the sealed file of `g` holds exactly the state files of its
/// runtime directory now.
fn sealed_matches_runtime(env: &Env, g: GuestId, passphrase: &str) -> bool {
    let paths = vtpmd::vault::SealedPaths::new(env.sealed(g));
    let opened = SealedState::open(paths, g, &pass(passphrase), &policy()).unwrap();
    let dir = env.run().join(g.to_string());
    let now = vtpmd::vault::StateArchive::from_dir_matching(&dir, |n| !n.starts_with("TMP"));
    now.is_ok_and(|now| now == opened.archive)
}

/// After a write through the TPM: the Resealed event that makes it durable.
async fn wait_resealed(env: &Env, rx: &mut Receiver<Event>, g: GuestId, passphrase: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !sealed_matches_runtime(env, g, passphrase) {
        assert!(Instant::now() < deadline, "the write was never sealed");
        wait_event(rx, g, |e| matches!(e.kind, EventKind::Resealed { .. })).await;
    }
}

/// Attaches as QEMU does and runs TPM2_Startup (or TPM_Startup).
fn attach(info: &GuestInfo) -> Vmm {
    let mut vmm = Vmm::attach(info.ctrl_socket.as_ref().unwrap(), VMM_TIMEOUT).unwrap();
    let startup = match info.spec.version() {
        TpmVersion::V2_0 => tpm::tpm2_startup_clear(),
        TpmVersion::V1_2 => tpm::tpm12_startup_clear(),
    };
    assert_eq!(vmm.transact(&startup).unwrap().rc, 0, "Startup");
    vmm
}

fn nv_write(vmm: &mut Vmm, data: &[u8], define: bool) {
    if define {
        let len = u16::try_from(data.len()).unwrap();
        let rc = vmm
            .transact(&tpm::tpm2_nv_define_space(NV_INDEX, ATTRS, len))
            .unwrap()
            .rc;
        assert_eq!(rc, 0, "NV_DefineSpace");
    }
    let rc = vmm
        .transact(&tpm::tpm2_nv_write(NV_INDEX, data, 0).unwrap())
        .unwrap()
        .rc;
    assert_eq!(rc, 0, "NV_Write");
}

fn nv_read(vmm: &mut Vmm, len: usize) -> Vec<u8> {
    let read = vmm
        .transact(&tpm::tpm2_nv_read(NV_INDEX, u16::try_from(len).unwrap(), 0))
        .unwrap();
    assert_eq!(read.rc, 0, "NV_Read");
    read.tpm2_nv_data().unwrap().to_vec()
}

/// Whether `pid` is a swtpm child of this test process.
/// Whether `pid` runs (is not a zombie).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn is_our_swtpm(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((comm, rest)) = stat.split_once(") ") else {
        return false;
    };
    let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
    comm.ends_with("(swtpm") && ppid == Some(std::process::id())
}

fn assert_no_trace(env: &Env, g: GuestId) {
    assert!(
        !env.run().join(g.to_string()).exists(),
        "plaintext dir left"
    );
    assert!(
        !env.run().join(format!("{g}.sock")).exists(),
        "control socket left"
    );
    assert!(
        !env.run().join(format!("{g}.create")).exists(),
        "provisioning dir left"
    );
}

async fn lifecycle(version: TpmVersion, model: TpmModel, ek_certificate: bool) {
    let env = Env::new();
    let sup = env.supervisor().await;
    let mut rx = sup.subscribe();
    let g = new_guest();
    let data = b"sealed by vtpmd's supervisor";

    let created = sup
        .create(g, spec(version, model), pass("pw"), ek_certificate)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(
        (created.state, created.generation),
        (GuestState::Stopped, 1)
    );
    assert_no_trace(&env, g);
    wait_event(&mut rx, g, |e| e.kind == EventKind::Created).await;

    let running = sup.start_guest(g, pass("pw")).await.unwrap();
    assert_eq!(running.state, GuestState::Running);
    assert!(is_our_swtpm(running.pid.unwrap()));
    let mut vmm = attach(&running);
    match version {
        TpmVersion::V2_0 => nv_write(&mut vmm, data, true),
        TpmVersion::V1_2 => {
            let random = vmm.transact(&tpm::tpm12_get_random(8)).unwrap();
            assert_eq!(random.tpm12_random_bytes().unwrap().len(), 8);
        }
    }
    wait_resealed(&env, &mut rx, g, "pw").await;

    let stopped = sup.stop_guest(g).await.unwrap();
    drop(vmm);
    assert_eq!(stopped.state, GuestState::Stopped, "{:?}", stopped.failure);
    // A TPM 2.0 NV write changes the state; a TPM 1.2 GetRandom need not
    // (an unchanged state is not sealed again).
    let written = if version == TpmVersion::V2_0 { 2 } else { 1 };
    assert!(
        stopped.generation >= written,
        "generation {}",
        stopped.generation
    );
    assert!(!is_our_swtpm(running.pid.unwrap()));
    assert_no_trace(&env, g);

    let again = sup.start_guest(g, pass("pw")).await.unwrap();
    let mut vmm = attach(&again);
    match version {
        TpmVersion::V2_0 => assert_eq!(nv_read(&mut vmm, data.len()), data),
        TpmVersion::V1_2 => {
            let random = vmm.transact(&tpm::tpm12_get_random(8)).unwrap();
            assert_eq!(random.rc, 0);
        }
    }
    if ek_certificate {
        // TCG's RSA EK certificate index, a DER certificate.
        let read = vmm
            .transact(&tpm::tpm2_nv_read(0x01c0_0002, 16, 0))
            .unwrap();
        assert_eq!(read.rc, 0, "EK certificate");
        assert_eq!(&read.tpm2_nv_data().unwrap()[..2], &[0x30, 0x82]);
    }
    let stopped = sup.stop_guest(g).await.unwrap();
    drop(vmm);
    assert_eq!(stopped.state, GuestState::Stopped);
    assert_no_trace(&env, g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpm2_tis_nv_data_survives_stop_and_start() {
    lifecycle(TpmVersion::V2_0, TpmModel::Tis, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpm2_crb_with_ek_certificate_survives_stop_and_start() {
    lifecycle(TpmVersion::V2_0, TpmModel::Crb, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpm12_tis_answers_across_stop_and_start() {
    lifecycle(TpmVersion::V1_2, TpmModel::Tis, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_supervisor_finds_guests_and_data_and_wipes_leftovers() {
    let env = Env::new();
    let g = new_guest();
    let data = b"across a daemon restart";
    let generation = {
        let sup = env.supervisor().await;
        let mut rx = sup.subscribe();
        sup.create(g, spec(TpmVersion::V2_0, TpmModel::Tis), pass("pw"), false)
            .await
            .unwrap();
        let info = sup.start_guest(g, pass("pw")).await.unwrap();
        let mut vmm = attach(&info);
        nv_write(&mut vmm, data, true);
        wait_resealed(&env, &mut rx, g, "pw").await;
        sup.drain().await.unwrap();
        drop(vmm);
        let info = sup.status(g).unwrap();
        assert_eq!(info.state, GuestState::Stopped);
        info.generation
    };
    // What a crash leaves: a stale socket and record; a plaintext dir and
    // a provisioning dir of a guest that has no sealed state (an
    // interrupted Create); and a guest whose socket a live process still
    // serves.
    let crashed = new_guest();
    drop(std::os::unix::net::UnixListener::bind(env.run().join(format!("{g}.sock"))).unwrap());
    std::fs::write(
        env.run().join(format!("{g}.run")),
        b"vtpmd-run 1\npid=1\nstart_time=1\nctrl=1:1\n",
    )
    .unwrap();
    std::fs::create_dir(env.run().join(crashed.to_string())).unwrap();
    std::fs::write(
        env.run().join(crashed.to_string()).join("tpm2-00.permall"),
        b"x",
    )
    .unwrap();
    std::fs::create_dir(env.run().join(format!("{crashed}.create"))).unwrap();
    let held = new_guest();
    std::fs::create_dir(env.run().join(held.to_string())).unwrap();
    let _live =
        std::os::unix::net::UnixListener::bind(env.run().join(format!("{held}.sock"))).unwrap();

    let sup = env.supervisor().await;

    let listed = sup.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].guest, listed[0].state, listed[0].generation),
        (g, GuestState::Stopped, generation)
    );
    assert_no_trace(&env, g);
    assert!(
        !env.run().join(format!("{g}.run")).exists(),
        "stale run record left"
    );
    assert_no_trace(&env, crashed);
    assert!(
        env.run().join(held.to_string()).exists(),
        "a live guest's dir was wiped"
    );
    let info = sup.start_guest(g, pass("pw")).await.unwrap();
    let mut vmm = attach(&info);
    assert_eq!(nv_read(&mut vmm, data.len()), data);
    sup.stop_guest(g).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_are_typed_and_change_nothing() {
    let env = Env::new();
    let sup = env.supervisor().await;
    let g = new_guest();
    let s = spec(TpmVersion::V2_0, TpmModel::Tis);
    sup.create(g, s, pass("pw"), false).await.unwrap();
    let sealed = std::fs::read(env.sealed(g)).unwrap();

    let err = sup.create(g, s, pass("pw"), false).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::GuestExists { guest } if guest == g),
        "{err:?}"
    );
    let unknown = new_guest();
    let err = sup.start_guest(unknown, pass("pw")).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::NoSuchGuest { .. }),
        "{err:?}"
    );
    assert!(matches!(
        sup.status(unknown),
        Err(SupervisorError::NoSuchGuest { .. })
    ));
    let err = sup.start_guest(g, pass("wrong")).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::WrongPassphrase { .. }),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read(env.sealed(g)).unwrap(),
        sealed,
        "file changed"
    );
    assert_eq!(sup.status(g).unwrap().state, GuestState::Stopped);
    assert_no_trace(&env, g);
    let err = sup.stop_guest(g).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::GuestNotRunning { .. }),
        "{err:?}"
    );

    let running = sup.start_guest(g, pass("pw")).await.unwrap();
    let err = sup.start_guest(g, pass("pw")).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::GuestRunning { .. }),
        "{err:?}"
    );
    let err = sup.delete(g).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::GuestRunning { .. }),
        "{err:?}"
    );
    assert_eq!(
        sup.status(g).unwrap().pid,
        running.pid,
        "running guest disturbed"
    );
    // Rekey while running: the old passphrase is checked, then rewrapped
    // through the held state so later reseals keep the new keyslot.
    let err = sup.rekey(g, pass("wrong"), pass("new")).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::WrongPassphrase { .. }),
        "{err:?}"
    );
    sup.rekey(g, pass("pw"), pass("new")).await.unwrap();
    sup.stop_guest(g).await.unwrap();
    let err = sup.start_guest(g, pass("pw")).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::WrongPassphrase { .. }),
        "{err:?}"
    );
    // Rekey at rest, back to the first one.
    sup.rekey(g, pass("new"), pass("pw")).await.unwrap();
    sup.start_guest(g, pass("pw")).await.unwrap();
    sup.stop_guest(g).await.unwrap();

    // Damage the body of both generations (a start that changed nothing
    // wrote no second one).
    for path in [env.sealed(g), env.sealed(g).with_extension("sealed.prev")] {
        let Ok(mut bytes) = std::fs::read(&path) else {
            continue;
        };
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
    }
    let before = sup.status(g).unwrap();
    let err = sup.start_guest(g, pass("pw")).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::StateCorrupt { .. }),
        "{err:?}"
    );
    assert_eq!(sup.status(g).unwrap(), before);
    assert_no_trace(&env, g);

    sup.delete(g).await.unwrap();
    assert!(matches!(
        sup.status(g),
        Err(SupervisorError::NoSuchGuest { .. })
    ));
    assert!(!env.sealed(g).parent().unwrap().exists(), "guest dir left");
    let err = sup.delete(g).await.unwrap_err();
    assert!(
        matches!(err, SupervisorError::NoSuchGuest { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_swtpm_is_failed_at_once_and_a_new_start_has_all_data() {
    let env = Env::new();
    let sup = env.supervisor().await;
    let mut rx = sup.subscribe();
    let g = new_guest();
    let data = b"the last write before the crash";
    sup.create(g, spec(TpmVersion::V2_0, TpmModel::Tis), pass("pw"), false)
        .await
        .unwrap();
    let info = sup.start_guest(g, pass("pw")).await.unwrap();
    let mut vmm = attach(&info);
    nv_write(&mut vmm, data, true);
    wait_resealed(&env, &mut rx, g, "pw").await;

    let pid = nix::unistd::Pid::from_raw(i32::try_from(info.pid.unwrap()).unwrap());
    let killed = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let failed = wait_event(&mut rx, g, |e| e.kind == EventKind::Failed).await;
    let latency = killed.elapsed();
    println!("SIGKILL → failed event: {latency:?}");

    let status = sup.status(g).unwrap();
    assert_eq!(status.state, GuestState::Failed);
    let reason = status.failure.clone().unwrap_or_default();
    assert!(reason.contains("SIGKILL"), "{reason}");
    assert_eq!(failed.guest, status);
    assert_no_trace(&env, g);
    assert!(!is_our_swtpm(info.pid.unwrap()));
    drop(vmm);

    let again = sup.start_guest(g, pass("pw")).await.unwrap();
    assert_eq!(again.failure, None);
    let mut vmm = attach(&again);
    assert_eq!(nv_read(&mut vmm, data.len()), data);
    sup.stop_guest(g).await.unwrap();
    assert!(latency < Duration::from_secs(1), "{latency:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_vmm_hanging_up_stops_the_guest_with_a_final_reseal() {
    let env = Env::new();
    let sup = env.supervisor().await;
    let mut rx = sup.subscribe();
    let g = new_guest();
    sup.create(g, spec(TpmVersion::V2_0, TpmModel::Tis), pass("pw"), false)
        .await
        .unwrap();
    let info = sup.start_guest(g, pass("pw")).await.unwrap();
    let mut vmm = attach(&info);
    nv_write(&mut vmm, b"bye", true);

    drop(vmm); // QEMU gone: swtpm --terminate exits 0
    let stopped = wait_event(&mut rx, g, |e| e.kind == EventKind::Stopped).await;

    assert_eq!(stopped.guest.state, GuestState::Stopped);
    assert_eq!(stopped.guest.failure, None);
    assert!(stopped.guest.generation >= 2);
    assert_no_trace(&env, g);
    let info = sup.start_guest(g, pass("pw")).await.unwrap();
    let mut vmm = attach(&info);
    assert_eq!(nv_read(&mut vmm, 3), b"bye");
    sup.stop_guest(g).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_guests_start_in_parallel_answer_and_stop_clean() {
    const GUESTS: usize = 50;
    let env = Env::new();
    let sup = env.supervisor().await;
    let guests: Vec<GuestId> = (0..GUESTS).map(|_| new_guest()).collect();
    let s = spec(TpmVersion::V2_0, TpmModel::Tis);

    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for &g in &guests {
        let sup = Arc::clone(&sup);
        tasks.spawn(async move { sup.create(g, s, pass("pw"), false).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap_or_else(|e| panic!("{}", chain(&e)));
    }
    let created = t.elapsed();

    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for &g in &guests {
        let sup = Arc::clone(&sup);
        tasks.spawn(async move { sup.start_guest(g, pass("pw")).await });
    }
    let mut infos = Vec::new();
    while let Some(done) = tasks.join_next().await {
        infos.push(done.unwrap().unwrap_or_else(|e| panic!("{}", chain(&e))));
    }
    let started = t.elapsed();

    let t = Instant::now();
    let mut answers = tokio::task::JoinSet::new();
    for info in infos.clone() {
        answers.spawn_blocking(move || {
            let mut vmm = attach(&info);
            let random = vmm.transact(&tpm::tpm2_get_random(8)).unwrap();
            let len = random.tpm2_random_bytes().unwrap().len();
            (vmm, len)
        });
    }
    // The VMMs stay attached until Stop, as QEMU would.
    let mut vmms = Vec::new();
    while let Some(done) = answers.join_next().await {
        let (vmm, len) = done.unwrap();
        assert_eq!(len, 8);
        vmms.push(vmm);
    }
    let answered = t.elapsed();

    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for &g in &guests {
        let sup = Arc::clone(&sup);
        tasks.spawn(async move { sup.stop_guest(g).await });
    }
    while let Some(done) = tasks.join_next().await {
        let info = done.unwrap().unwrap();
        assert_eq!(info.state, GuestState::Stopped, "{:?}", info.failure);
    }
    let stopped = t.elapsed();
    drop(vmms);
    println!(
        "{GUESTS} guests: create {created:?}, start {started:?}, attach+GetRandom {answered:?}, stop {stopped:?}"
    );

    for info in &infos {
        assert!(
            !is_our_swtpm(info.pid.unwrap()),
            "swtpm {:?} left",
            info.pid
        );
    }
    assert!(
        env.runtime_entries().is_empty(),
        "{:?}",
        env.runtime_entries()
    );
    assert!(sup.list().iter().all(|i| i.state == GuestState::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reseal_latency_under_a_loop_of_nv_writes() {
    const WRITES: usize = 50;
    let env = Env::new();
    let sup = env.supervisor().await;
    let mut rx = sup.subscribe();
    let g = new_guest();
    sup.create(g, spec(TpmVersion::V2_0, TpmModel::Tis), pass("pw"), false)
        .await
        .unwrap();
    let info = sup.start_guest(g, pass("pw")).await.unwrap();
    let mut vmm = attach(&info);
    nv_write(&mut vmm, b"init", true);
    wait_resealed(&env, &mut rx, g, "pw").await;

    let mut latencies = Vec::new();
    for i in 0..WRITES {
        let data = format!("{i:04}");
        nv_write(&mut vmm, data.as_bytes(), false);
        let event = wait_event(&mut rx, g, |e| matches!(e.kind, EventKind::Resealed { .. })).await;
        if let EventKind::Resealed { latency } = event.kind {
            latencies.push(latency);
        }
    }
    // The last write is sealed.
    wait_resealed(&env, &mut rx, g, "pw").await;
    sup.stop_guest(g).await.unwrap();
    drop(vmm);

    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "reseal latency (seen write → durable) over {} writes: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pct(50),
        pct(99),
        latencies[latencies.len() - 1]
    );
    assert!(sup.reseal_latencies(g).len() >= WRITES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_reseals_every_guest_leaves_it_running_and_refuses_new_work() {
    let env = Env::new();
    let sup = env.supervisor().await;
    let s = spec(TpmVersion::V2_0, TpmModel::Tis);
    let guests: Vec<GuestId> = (0..3).map(|_| new_guest()).collect();
    let mut pids = Vec::new();
    for &g in &guests {
        sup.create(g, s, pass("pw"), false).await.unwrap();
        pids.push(sup.start_guest(g, pass("pw")).await.unwrap().pid.unwrap());
    }
    // One guest has a VMM attached that wrote something.
    let mut vmm = attach(&sup.status(guests[0]).unwrap());
    nv_write(&mut vmm, b"at shutdown", true);

    sup.shutdown().await;

    for &pid in &pids {
        assert!(
            is_our_swtpm(pid) && is_alive(pid),
            "swtpm {pid} did not outlive the shutdown"
        );
    }
    for &g in &guests {
        assert!(env.run().join(g.to_string()).exists(), "{g}'s runtime dir");
    }
    let err = sup.start_guest(guests[1], pass("pw")).await.unwrap_err();
    assert!(matches!(err, SupervisorError::ShuttingDown), "{err:?}");
    let err = sup
        .create(new_guest(), s, pass("pw"), false)
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::ShuttingDown), "{err:?}");

    // The next supervisor adopts all three, same processes; the VMM is
    // still served; the passphrase re-attaches; a drain stops them all.
    let next = env.supervisor().await;
    for (&g, &pid) in guests.iter().zip(&pids) {
        let info = next.status(g).unwrap();
        assert_eq!((info.state, info.pid), (GuestState::Running, Some(pid)));
        assert!(info.reason.is_some(), "no key came back: {info:?}");
    }
    assert_eq!(nv_read(&mut vmm, b"at shutdown".len()), b"at shutdown");
    let again = next.start_guest(guests[0], pass("pw")).await.unwrap();
    assert_eq!(again.pid, Some(pids[0]));
    assert!(again.reason.is_none(), "{again:?}");
    // The VMM hanging up ends guests[0]'s swtpm (--terminate) and so its
    // run, on its own: wait for that, or the drain races it and finds two
    // or three guests running.
    let mut rx = next.subscribe();
    drop(vmm);
    let stopped = wait_event(&mut rx, guests[0], |e| e.kind == EventKind::Stopped).await;
    assert_eq!(stopped.guest.failure, None, "{stopped:?}");
    let drained = next.drain().await.unwrap();
    assert_eq!(drained.len(), 2);
    for pid in pids {
        assert!(!is_our_swtpm(pid) || !is_alive(pid), "swtpm {pid} left");
    }
    assert!(sealed_matches_after_restart(&env, guests[0]).await);
}

/// The data written before shutdown is there after a restart.
async fn sealed_matches_after_restart(env: &Env, g: GuestId) -> bool {
    let sup = env.supervisor().await;
    let info = sup.start_guest(g, pass("pw")).await.unwrap();
    let mut vmm = attach(&info);
    let data = nv_read(&mut vmm, b"at shutdown".len());
    sup.drain().await.unwrap();
    data == b"at shutdown"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_name_versions_models_and_traits() {
    let env = Env::new();
    let sup = env.supervisor().await;
    let caps = sup.capabilities();
    assert!(caps.versions.contains(&TpmVersion::V2_0));
    assert!(caps.models.contains(&TpmModel::Tis) && caps.models.contains(&TpmModel::Crb));
    assert!(caps.traits.iter().any(|t| t == "COMPUTE_SECURITY_TPM_2_0"));
    assert!(!caps.swtpm_version.is_empty());
    // The layout's modes.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&env.state()), 0o700);
    assert_eq!(mode(&env.run()), 0o711);
}
