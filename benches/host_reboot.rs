//! Host reboot: every guest started at once, unattended. Prints figures,
//! asserts nothing.
//!
//! `cargo bench --bench host_reboot [-- --guests N] [--rounds R]
//! [--passphrase-guests M]`
//!
//! On the real vtpmd binary with its embedded Argon2id defaults (64 MiB,
//! 3 passes, 4 lanes) and real swtpm: N guests (default 256) are created
//! with `policy: host` (setup, not measured), vtpmd is stopped with every
//! guest stopped and sealed, and a new vtpmd starts on the same state
//! directory, as after a host reboot. Then every guest's Start is called at
//! the same instant, each from its own connection (as a hypervisor layer
//! restoring its guests would), with no secret: this host's key opens each
//! guest's host slot (HPKE). As soon as a Start answers, its caller
//! attaches as a VMM on the control socket and sends TPM2_Startup. The
//! figure is the time from the first Start call until every guest's TPM has
//! answered, and each guest's time until its own TPM answered.
//!
//! Against, in the same run and interleaved round by round: N bare `swtpm
//! socket` processes started by hand at the same instant (each on its own
//! copy of one state, the control socket bound by the launcher and handed
//! over as vtpmd does, so no launcher polls), until each answers
//! TPM2_Startup. For contrast, once: the same reboot with M (default N)
//! passphrase Starts, each an Argon2id, at most as many at once as vtpmd
//! has KDF permits.

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up should stop

#[path = "performance/baseline.rs"]
#[allow(dead_code)]
mod baseline;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "performance/fleet.rs"]
#[allow(dead_code)]
mod fleet;
#[path = "performance/procfs.rs"]
#[allow(dead_code)]
mod procfs;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vtpmd::swtpm::ctrl::client::Vmm;

use baseline::{BareSwtpm, Running};
use common::{Daemon, b64};
use fleet::{PASSPHRASE, guest_id};

const REPLY_TIMEOUT: Duration = Duration::from_secs(1800);
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
const CREATE_CLIENTS: usize = 4;

struct Args {
    guests: usize,
    rounds: usize,
    passphrase_guests: usize,
}

impl Args {
    fn parse() -> Self {
        let mut guests = 256;
        let mut rounds = 3;
        let mut passphrase_guests = None;
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = || it.next().and_then(|n| n.parse().ok()).unwrap();
            match arg.as_str() {
                "--guests" => guests = value(),
                "--rounds" => rounds = value(),
                "--passphrase-guests" => passphrase_guests = Some(value()),
                // cargo bench passes --bench; libtest-style filters are ignored.
                _ => {}
            }
        }
        let guests: usize = guests.max(1);
        Self {
            guests,
            rounds: rounds.max(1),
            passphrase_guests: passphrase_guests.unwrap_or(guests).min(guests),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p`th percentile (nearest rank) of `samples`.
fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 50)
}

/// One mass start: the time until every guest's TPM answered (from the
/// first call), and each guest's time until its own answered.
struct Wave {
    wall: Duration,
    per_guest: Vec<Duration>,
    /// Time from the first call until each Start answered (vtpmd only).
    answered: Vec<Duration>,
    /// vtpmd's own split of each Start (Monitor's `start`), ms by phase.
    phases: Vec<Value>,
    /// CPU time vtpmd itself used from the first call to the last answer.
    vtpmd_cpu: Duration,
    failures: Vec<String>,
}

impl Wave {
    fn print(&self, name: &str) {
        println!(
            "{name:<46} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            ms(self.wall),
            ms(median(&self.per_guest)),
            ms(percentile(&self.per_guest, 90)),
            ms(percentile(&self.per_guest, 100)),
        );
    }
}

/// How the reboot's Starts open each guest.
#[derive(Clone, Copy)]
enum Secret {
    /// No secret: this host's key opens the host slot.
    ThisHost,
    Passphrase,
}

fn main() {
    let args = Args::parse();
    raise_fd_limit();
    let work = fleet::tmpfs_work("vtpmd-reboot");
    let mut d = Daemon::start_on(fleet::CONFIG, Some(work.path().join("run")));
    let ids: Vec<String> = (0..args.guests).map(guest_id).collect();
    println!(
        "host reboot: {} guests with host slots, {} rounds, {} CPUs, swtpm uids: {}",
        args.guests,
        args.rounds,
        std::thread::available_parallelism().map_or(0, usize::from),
        if nix::unistd::geteuid().is_root() {
            "one per guest"
        } else {
            "this user's"
        }
    );

    let created = Instant::now();
    create_all(&d, &ids);
    println!(
        "setup: {} Creates (policy host), {CREATE_CLIENTS} clients at once: {:.1} s",
        ids.len(),
        created.elapsed().as_secs_f64()
    );
    let bares = bare_fleet(work.path(), ids.len());

    let mut host_waves = Vec::new();
    let mut bare_waves = Vec::new();
    for round in 0..args.rounds {
        // Alternate which goes first, so drift hits both alike.
        for host_first in [round % 2 == 0, round % 2 == 1] {
            if host_first {
                reboot(&mut d);
                host_waves.push(start_all(&d, &ids, Secret::ThisHost));
            } else {
                bare_waves.push(start_bare(&bares));
            }
        }
    }
    let crowd = (ids.len() > 1).then(|| lone_and_crowded(&d, &ids, 9));
    let passphrase_ids = &ids[..args.passphrase_guests];
    let passphrase_wave = (!passphrase_ids.is_empty()).then(|| {
        reboot(&mut d);
        start_all(&d, passphrase_ids, Secret::Passphrase)
    });

    println!();
    println!(
        "{:<46} {:>9} {:>9} {:>9} {:>9}",
        "until the first TPM answer, ms", "all", "p50", "p90", "max"
    );
    for (i, (host, bare)) in host_waves.iter().zip(&bare_waves).enumerate() {
        host.print(&format!(
            "round {}: {} host-slot Starts",
            i + 1,
            host.per_guest.len()
        ));
        bare.print(&format!(
            "round {}: {} bare swtpm spawns",
            i + 1,
            bare.per_guest.len()
        ));
    }
    if let Some(wave) = &passphrase_wave {
        wave.print(&format!(
            "{} passphrase Starts (Argon2id)",
            wave.per_guest.len()
        ));
    }
    let walls = |waves: &[Wave]| waves.iter().map(|w| w.wall).collect::<Vec<_>>();
    let p50s = |waves: &[Wave]| {
        waves
            .iter()
            .map(|w| median(&w.per_guest))
            .collect::<Vec<_>>()
    };
    let (host_wall, bare_wall) = (median(&walls(&host_waves)), median(&walls(&bare_waves)));
    let (host_p50, bare_p50) = (median(&p50s(&host_waves)), median(&p50s(&bare_waves)));
    println!();
    println!(
        "median of {} rounds: host-slot reboot {:.2} s until all answered, bare spawns {:.2} s: {:.2}x \
         (per-guest p50 {:.0} ms vs {:.0} ms: {:.2}x)",
        host_waves.len(),
        host_wall.as_secs_f64(),
        bare_wall.as_secs_f64(),
        host_wall.as_secs_f64() / bare_wall.as_secs_f64(),
        ms(host_p50),
        ms(bare_p50),
        host_p50.as_secs_f64() / bare_p50.as_secs_f64(),
    );
    if let Some(wave) = &passphrase_wave {
        let permits =
            vtpmd::supervisor::default_kdf_parallelism(&vtpmd::vault::KdfPolicy::default());
        println!(
            "passphrase reboot of {} guests ({permits} KDF permits): {:.1} s until all answered, \
             {:.1}x the host-slot reboot of {}",
            wave.per_guest.len(),
            wave.wall.as_secs_f64(),
            wave.wall.as_secs_f64() / host_wall.as_secs_f64(),
            ids.len()
        );
    }
    if let Some([lone, crowded]) = crowd {
        println!(
            "one host-slot Start, median of 9: alone spawn {:.2} ms, Start to first answer {:.2} ms; \
             with the {} others running spawn {:.2} ms, Start to first answer {:.2} ms",
            ms(lone.0),
            ms(lone.1),
            ids.len() - 1,
            ms(crowded.0),
            ms(crowded.1)
        );
    }
    println!();
    println!("vtpmd's split of each Start (Monitor `start`), ms: p50 / max over the guests");
    let mut shown: Vec<(&str, &Wave)> = vec![("host slot, round 1", &host_waves[0])];
    if let Some(w) = host_waves.last().filter(|_| host_waves.len() > 1) {
        shown.push(("host slot, last round", w));
    }
    if let Some(w) = &passphrase_wave {
        shown.push(("passphrase", w));
    }
    for (name, wave) in shown {
        let phase = |key: &str| {
            let v: Vec<Duration> = wave
                .phases
                .iter()
                .filter_map(|p| p[key].as_f64())
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
                .collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1} / {:.1}", ms(median(&v)), ms(percentile(&v, 100)))
            }
        };
        println!(
            "  {name:<24} queued {}  kdf {}  unseal {}  spawn {}  ready {}  total {}  \
             (Start answered: p50 {:.0}, max {:.0}; vtpmd CPU {:.2} ms per guest)",
            phase("queued_ms"),
            phase("kdf_ms"),
            phase("unseal_ms"),
            phase("spawn_ms"),
            phase("ready_ms"),
            phase("total_ms"),
            ms(median(&wave.answered)),
            ms(percentile(&wave.answered, 100)),
            ms(wave.vtpmd_cpu) / wave.per_guest.len().max(1) as f64,
        );
    }
    let failures: Vec<&String> = host_waves
        .iter()
        .chain(&passphrase_wave)
        .flat_map(|w| &w.failures)
        .collect();
    println!("failed Starts: {}", failures.len());
    for f in failures.iter().take(5) {
        println!("  {f}");
    }

    // Every swtpm of vtpmd's is stopped by Drain when the fixture drops;
    // the bare ones were stopped after each of their rounds.
    let _ = d.client().manager("Drain", json!({}));
    drop(d);
}

/// Creates every guest with a passphrase slot and a host slot for this
/// host, from a few clients at once.
fn create_all(d: &Daemon, ids: &[String]) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..CREATE_CLIENTS {
            scope.spawn(|| {
                let mut client = d.client();
                client.set_reply_timeout(REPLY_TIMEOUT);
                while let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                    client
                        .manager(
                            "Create",
                            json!({"guest": id, "version": "2.0", "model": "tpm-crb",
                                   "passphrase": b64(PASSPHRASE), "policy": "host"}),
                        )
                        .unwrap_or_else(|e| panic!("Create {id}: {e:?}"));
                }
            });
        }
    });
}

/// The host reboot as vtpmd sees it: every guest stopped and sealed
/// (Drain), vtpmd gone, a new vtpmd on the same state directory.
fn reboot(d: &mut Daemon) {
    d.client().manager("Drain", json!({})).unwrap();
    d.stop();
    d.restart();
}

/// Starts every guest of `ids` at the same instant, each from its own
/// connection (connected beforehand); each caller attaches as a VMM once
/// its Start answers. Every guest is stopped again (its VMM hangs up) once
/// all have answered.
fn start_all(d: &Daemon, ids: &[String], secret: Secret) -> Wave {
    let (wave, vmms) = start_all_running(d, ids, secret);
    for vmm in vmms {
        vmm.shutdown().unwrap();
    }
    fleet::wait_all_stopped(d, ids);
    wave
}

/// [`start_all`], leaving every guest running with its VMM attached.
fn start_all_running(d: &Daemon, ids: &[String], secret: Secret) -> (Wave, Vec<Vmm>) {
    let mut events = d.events();
    let pid = fleet::daemon_pid(d);
    let barrier = Arc::new(Barrier::new(ids.len() + 1));
    let results = std::thread::scope(|scope| {
        let workers: Vec<_> = ids
            .iter()
            .map(|id| {
                let barrier = Arc::clone(&barrier);
                let mut client = d.client();
                client.set_reply_timeout(REPLY_TIMEOUT);
                let params = match secret {
                    Secret::ThisHost => json!({"guest": id}),
                    Secret::Passphrase => json!({"guest": id, "passphrase": b64(PASSPHRASE)}),
                };
                scope.spawn(move || {
                    barrier.wait();
                    let called = Instant::now();
                    let reply = client.manager("Start", params);
                    let answered = Instant::now();
                    let vmm = reply.map_err(|e| format!("{id}: {e:?}")).and_then(|reply| {
                        let ctrl = reply["guest"]["ctrl_socket"].as_str().unwrap().to_owned();
                        let mut vmm = Vmm::attach(std::path::Path::new(&ctrl), ATTACH_TIMEOUT)
                            .map_err(|e| format!("{id}: attach: {e}"))?;
                        let rsp = vmm
                            .transact(&vtpmd::swtpm::ctrl::tpm::tpm2_startup_clear())
                            .map_err(|e| format!("{id}: TPM2_Startup: {e}"))?;
                        assert_eq!(rsp.rc, 0, "TPM2_Startup of {id}");
                        Ok(vmm)
                    });
                    (called, answered, Instant::now(), vmm)
                })
            })
            .collect();
        let cpu = procfs::cpu_ticks(pid);
        barrier.wait();
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (results, procfs::cpu_ticks(pid) - cpu)
    });
    let (results, cpu_ticks) = results;
    let first = results.iter().map(|r| r.0).min().unwrap();
    let mut wave = Wave {
        wall: Duration::ZERO,
        per_guest: Vec::new(),
        answered: Vec::new(),
        phases: Vec::new(),
        vtpmd_cpu: Duration::from_secs_f64(cpu_ticks as f64 / procfs::ticks_per_second() as f64),
        failures: Vec::new(),
    };
    let mut vmms = Vec::new();
    for (_, answered, done, vmm) in results {
        match vmm {
            Ok(vmm) => {
                wave.per_guest.push(done - first);
                wave.answered.push(answered - first);
                wave.wall = wave.wall.max(done - first);
                vmms.push(vmm);
            }
            Err(e) => wave.failures.push(e),
        }
    }
    // Every Start's `running` event has been sent before its reply.
    let mut running = 0;
    while running < vmms.len() {
        let Some((_, event)) = events.wait(Duration::from_secs(10), |e| e["event"] == "running")
        else {
            break;
        };
        wave.phases.push(event["start"].clone());
        running += 1;
    }
    (wave, vmms)
}

/// vtpmd's `spawn` phase (Monitor's `start.spawn_ms`) and the whole Start
/// to the first TPM answer of one guest, medians of `runs`: alone, then
/// with every other guest of `ids` running.
fn lone_and_crowded(d: &Daemon, ids: &[String], runs: usize) -> [(Duration, Duration); 2] {
    let one = |events: &mut common::Events| {
        let called = Instant::now();
        let reply = d
            .client()
            .manager("Start", json!({"guest": ids[0]}))
            .unwrap();
        let vmm = fleet::attach(&reply["guest"]);
        let total = called.elapsed();
        let (_, event) = events
            .wait_for(&ids[0], "running", Duration::from_secs(30))
            .unwrap();
        vmm.shutdown().unwrap();
        events
            .wait_for(&ids[0], "stopped", Duration::from_secs(30))
            .unwrap();
        let spawn = Duration::from_secs_f64(event["start"]["spawn_ms"].as_f64().unwrap() / 1e3);
        (spawn, total)
    };
    let medians = |samples: Vec<(Duration, Duration)>| {
        let spawns: Vec<Duration> = samples.iter().map(|s| s.0).collect();
        let totals: Vec<Duration> = samples.iter().map(|s| s.1).collect();
        (median(&spawns), median(&totals))
    };
    let mut events = d.events();
    let lone = medians((0..runs).map(|_| one(&mut events)).collect());
    let (_, vmms) = start_all_running(d, &ids[1..], Secret::ThisHost);
    std::thread::sleep(Duration::from_secs(1));
    let crowded = medians((0..runs).map(|_| one(&mut events)).collect());
    for vmm in vmms {
        vmm.shutdown().unwrap();
    }
    fleet::wait_all_stopped(d, ids);
    [lone, crowded]
}

/// `n` bare swtpm states: one made by swtpm_setup, the rest copies of it.
fn bare_fleet(work: &std::path::Path, n: usize) -> Vec<BareSwtpm> {
    let dir = |i: usize| {
        let dir = work.join(format!("bare-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let first = BareSwtpm::provision(&dir(0));
    let mut all: Vec<BareSwtpm> = (1..n).map(|i| first.copy_to(&dir(i))).collect();
    all.insert(0, first);
    all
}

/// Starts every bare swtpm at the same instant, each from its own thread,
/// until its first TPM answer; stops them all once all have answered.
fn start_bare(bares: &[BareSwtpm]) -> Wave {
    let barrier = Arc::new(Barrier::new(bares.len() + 1));
    let results: Vec<(Instant, Instant, Running)> = std::thread::scope(|scope| {
        let workers: Vec<_> = bares
            .iter()
            .map(|bare| {
                let barrier = Arc::clone(&barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let began = Instant::now();
                    let (_, running) = bare.start_prebound();
                    (began, Instant::now(), running)
                })
            })
            .collect();
        barrier.wait();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let first = results.iter().map(|r| r.0).min().unwrap();
    let per_guest: Vec<Duration> = results.iter().map(|r| r.1 - first).collect();
    let wall = per_guest.iter().copied().max().unwrap();
    for (_, _, running) in results {
        running.stop();
    }
    Wave {
        wall,
        per_guest,
        answered: Vec::new(),
        phases: Vec::new(),
        vtpmd_cpu: Duration::ZERO,
        failures: Vec::new(),
    }
}

/// 256 guests take four fds each in vtpmd and two in this process; the
/// usual soft limit of 1024 is not enough for both at once.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
