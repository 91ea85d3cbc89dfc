//! Many guests of one real vtpmd, driven the way a hypervisor layer would:
//! one connection per concurrent call.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm;

use crate::common::{Daemon, Remote, b64};

pub const PASSPHRASE: &str = "benchmark passphrase";

/// vtpmd's embedded defaults, but for the connection cap and the time a
/// call may take: starting 256 guests at the same instant takes 256
/// connections (the default admits 128 and closes the rest at once, which a
/// hypervisor layer would retry), and the last Start of a wave of n waits
/// for n Argon2 runs / permits (120 s by default, then the call answers
/// while the Start goes on).
pub const CONFIG: &str = "[api]\nmax_connections = 4096\nrequest_timeout_ms = 1800000\n";

/// A work directory on tmpfs: as in production, swtpm's plaintext state
/// lives on tmpfs (vtpmd's runtime directory is /run/vtpmd), the sealed
/// files on disk. Mode 0711: each guest's swtpm uid must pass through to
/// its runtime directory.
pub fn tmpfs_work(prefix: &str) -> tempfile::TempDir {
    let work = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    work
}
const TIMEOUT: Duration = Duration::from_secs(30);
const REPLY_TIMEOUT: Duration = Duration::from_secs(1800);

/// The `i`th guest's id (canonical lowercase UUID).
pub fn guest_id(i: usize) -> String {
    format!("5e1f0000-0000-4000-8000-{i:012x}")
}

pub fn daemon_pid(d: &Daemon) -> u32 {
    u32::try_from(d.pid()).unwrap()
}

/// Creates `ids` (TPM 2.0, CRB, no certificates) from `threads` clients at
/// once; returns each Create's latency.
pub fn create_all(d: &Daemon, ids: &[String], threads: usize) -> Vec<Duration> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut client = d.client();
                    let mut latencies = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(id) = ids.get(i) else {
                            return latencies;
                        };
                        let began = Instant::now();
                        client
                            .manager(
                                "Create",
                                json!({"guest": id, "version": "2.0", "model": "tpm-crb",
                                       "passphrase": b64(PASSPHRASE)}),
                            )
                            .unwrap_or_else(|e| panic!("Create {id}: {e:?}"));
                        latencies.push(began.elapsed());
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

/// What starting many guests at once gave.
pub struct Wave {
    pub wall: Duration,
    pub latencies: Vec<Duration>,
    pub failures: Vec<String>,
    pub guests: Vec<Value>,
}

/// Starts every guest of `ids` at the same instant, each from its own
/// connection (connected beforehand), and waits for every answer.
pub fn start_all(d: &Daemon, ids: &[String]) -> Wave {
    let barrier = Arc::new(Barrier::new(ids.len() + 1));
    let results = std::thread::scope(|scope| {
        let workers: Vec<_> = ids
            .iter()
            .map(|id| {
                let barrier = Arc::clone(&barrier);
                let mut client = d.client();
                // A Start waits its turn for a KDF permit: with n at once
                // the last answers after n × one Argon2 / permits.
                client.set_reply_timeout(REPLY_TIMEOUT);
                scope.spawn(move || {
                    barrier.wait();
                    let began = Instant::now();
                    let result = client
                        .manager("Start", json!({"guest": id, "passphrase": b64(PASSPHRASE)}));
                    (
                        began.elapsed(),
                        result.map_err(|e: Remote| format!("{id}: {e:?}")),
                    )
                })
            })
            .collect();
        barrier.wait();
        let began = Instant::now();
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (began.elapsed(), results)
    });
    let (wall, results) = results;
    let mut wave = Wave {
        wall,
        latencies: Vec::new(),
        failures: Vec::new(),
        guests: Vec::new(),
    };
    for (latency, result) in results {
        wave.latencies.push(latency);
        match result {
            Ok(reply) => wave.guests.push(reply["guest"].clone()),
            Err(e) => wave.failures.push(e),
        }
    }
    wave
}

/// Stops `ids` from a few clients and waits until vtpmd lists them all
/// as stopped.
pub fn stop_all(d: &Daemon, ids: &[String]) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let mut client = d.client();
                while let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                    // A guest whose VMM left has stopped by itself.
                    let _ = client.manager("Stop", json!({"guest": id}));
                }
            });
        }
    });
    wait_all_stopped(d, ids);
}

pub fn wait_all_stopped(d: &Daemon, ids: &[String]) -> Duration {
    let began = Instant::now();
    let mut client = d.client();
    loop {
        let listed = client.manager("List", json!({})).unwrap();
        let busy = listed["guests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| ids.iter().any(|id| g["guest"] == id.as_str()))
            .filter(|g| g["state"] != "stopped")
            .count();
        if busy == 0 {
            return began.elapsed();
        }
        assert!(began.elapsed() < TIMEOUT * 4, "{busy} guests never stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids of the running guests' swtpm.
pub fn swtpm_pids(d: &Daemon) -> Vec<u32> {
    let listed = d.client().manager("List", json!({})).unwrap();
    listed["guests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["pid"].as_u64())
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect()
}

/// Attaches as a VMM and answers TPM2_Startup.
pub fn attach(guest: &Value) -> Vmm {
    let ctrl = Path::new(guest["ctrl_socket"].as_str().unwrap());
    let mut vmm = Vmm::attach(ctrl, TIMEOUT).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    vmm
}

/// Whether the TPM behind `vmm` answers TPM2_GetRandom with 32 bytes.
pub fn answers(vmm: &mut Vmm) -> bool {
    vmm.transact(&tpm::tpm2_get_random(32))
        .ok()
        .filter(|r| r.rc == 0)
        .and_then(|r| r.tpm2_random_bytes().ok().map(|b| b.len() == 32))
        .unwrap_or(false)
}
