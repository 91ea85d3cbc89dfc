//! Start by keyslot kind: prints figures, asserts nothing.
//!
//! `cargo bench --bench start_keys [-- --runs N]` measures, on the real
//! vtpmd binary with its embedded Argon2id defaults (64 MiB, 3 passes, 4
//! lanes) and real swtpm, the time from Start's call to the first TPM
//! answer (TPM2_Startup through the control socket, as QEMU attaches) for
//! one guest created with `policy: deployment` and granted to this host:
//! - Start with the passphrase (Argon2id);
//! - Start with the key slot's key (HKDF, no Argon2id);
//! - Start with no secret (this host's key opens its host slot: HPKE);
//! - against a bare `swtpm socket` started by hand on a state of its own,
//!   its socket polled every 100 µs (the fastest a launcher can do);
//! - and the same bare swtpm started vtpmd's way: the control socket bound
//!   by the launcher and handed over (nothing to poll), then also probed
//!   with CMD_GET_CAPABILITY before the VMM attaches, as vtpmd does before
//!   it answers Start. What a Start costs beyond that is vtpmd's own.
//!
//! Each run starts the kinds in a rotated order (what ran just before moves
//! a spawn by a millisecond or two). It also prints vtpmd's split of each
//! (Monitor's `start`: waiting for a KDF permit, the KDF itself, the rest
//! of the unseal with the runtime directory's set-up, spawn, swtpm's first
//! answer, vtpmd's whole Start), the reply reaching the caller after that,
//! and the VMM's attach and TPM2_Startup after the reply.

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up should stop

#[path = "performance/baseline.rs"]
#[allow(dead_code)]
mod baseline;
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use base64ct::{Base64, Encoding};
use serde_json::{Value, json};
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm;

use baseline::{BareSwtpm, Wait};
use common::{Daemon, Events};

const GUEST: &str = "3b1f0c52-9a7e-4d18-b6c4-2e5a7f9d0c11";
const PASSPHRASE: &str = "a benchmark's passphrase";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// What one Start took: until the first TPM answer, until Start's reply,
/// and vtpmd's own split of it (Monitor's `start`, ms by phase).
struct Sample {
    total: Duration,
    answered: Duration,
    phases: Value,
}

/// One Start with `secret` until the first TPM answer. The guest is
/// stopped again (VMM hangs up).
fn start_once(d: &Daemon, events: &mut Events, secret: &Value) -> Sample {
    let mut params = json!({"guest": GUEST});
    for (k, v) in secret.as_object().unwrap() {
        params[k] = v.clone();
    }
    let called = Instant::now();
    let reply = d.client().manager("Start", params).unwrap();
    let answered = called.elapsed();
    let ctrl = reply["guest"]["ctrl_socket"].as_str().unwrap().to_owned();
    let mut vmm = Vmm::attach(std::path::Path::new(&ctrl), Duration::from_secs(10)).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    let total = called.elapsed();
    let (_, event) = events
        .wait_for(GUEST, "running", Duration::from_secs(30))
        .unwrap();
    vmm.shutdown().unwrap();
    events
        .wait_for(GUEST, "stopped", Duration::from_secs(30))
        .unwrap();
    Sample {
        total,
        answered,
        phases: event["start"].clone(),
    }
}

/// The median of phase `key` (ms) over `samples`.
fn phase(samples: &[Sample], key: &str) -> Duration {
    median(
        samples
            .iter()
            .map(|s| Duration::from_secs_f64(s.phases[key].as_f64().unwrap() / 1e3))
            .collect(),
    )
}

fn main() {
    let runs = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10usize);
    // As in production, swtpm's plaintext state (the runtime directory)
    // lives on tmpfs, the sealed files on disk; the bare swtpm's state sits
    // on the same tmpfs.
    let work = tempfile::Builder::new()
        .prefix("vtpmd-start-keys")
        .tempdir_in("/dev/shm")
        .unwrap();
    // As root each guest's swtpm uid must pass through to its runtime
    // directory.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    // Embedded defaults (real Argon2id), a generous call timeout.
    let d = Daemon::start_on(
        "[api]\nrequest_timeout_ms = 300000\n",
        Some(work.path().join("run")),
    );
    let key_b64 = Base64::encode_string(&[0x42u8; 32]);
    d.client()
        .manager(
            "Create",
            json!({"guest": GUEST, "version": "2.0", "passphrase": common::b64(PASSPHRASE),
                   "policy": "deployment", "key": key_b64}),
        )
        .unwrap();
    let me = d.client().manager("GetHostKey", json!({})).unwrap();
    d.client()
        .manager(
            "Grant",
            json!({"guest": GUEST, "key": key_b64, "host_public_key": me["public_key"]}),
        )
        .unwrap();
    let mut events = Events::subscribe(&d.socket);
    let bare = BareSwtpm::provision(work.path());

    let kinds: [(&str, Value); 3] = [
        (
            "Start, passphrase (Argon2id 64 MiB t=3 p=4)",
            json!({"passphrase": common::b64(PASSPHRASE)}),
        ),
        ("Start, key slot (HKDF)", json!({"key": key_b64})),
        ("Start, this host's key (HPKE)", json!({})),
    ];
    let mut samples: Vec<Vec<Sample>> = kinds.iter().map(|_| Vec::new()).collect();
    let mut bare_times = Vec::new();
    let mut prebound_times = Vec::new();
    let mut probed_times = Vec::new();
    let mut probe_answers = Vec::new();
    // Warm-up: page cache, the binaries' first fork.
    for (_, secret) in &kinds {
        start_once(&d, &mut events, secret);
    }
    bare.start(Wait::Tight).1.stop();
    bare.start_prebound().1.stop();
    for run in 0..runs {
        // Each kind in turn follows each other kind (and the bare spawn):
        // what ran just before moves a spawn by a millisecond or two.
        for k in 0..kinds.len() {
            let i = (k + run) % kinds.len();
            samples[i].push(start_once(&d, &mut events, &kinds[i].1));
        }
        let (elapsed, running) = bare.start(Wait::Tight);
        running.stop();
        bare_times.push(elapsed);
        let (elapsed, running) = bare.start_prebound();
        running.stop();
        prebound_times.push(elapsed);
        let (elapsed, probed, running) = bare.start_handed_over(true);
        running.stop();
        probed_times.push(elapsed);
        probe_answers.push(probed);
    }
    let bare_median = median(bare_times);
    println!(
        "Start until the first TPM answer, median of {runs} runs ({} CPUs)",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "{:<48} {:>10} {:>10} {:>9}",
        "", "total ms", "kdf ms", "× bare"
    );
    for (i, (name, _)) in kinds.iter().enumerate() {
        let total = median(samples[i].iter().map(|s| s.total).collect());
        println!(
            "{name:<48} {:>10.2} {:>10.3} {:>9.2}",
            ms(total),
            ms(phase(&samples[i], "kdf_ms")),
            total.as_secs_f64() / bare_median.as_secs_f64()
        );
    }
    println!(
        "{:<48} {:>10.2} {:>10} {:>9.2}",
        "bare swtpm spawn (polled every 100 µs)",
        ms(bare_median),
        "-",
        1.0
    );
    let prebound = median(prebound_times);
    println!(
        "{:<48} {:>10.2} {:>10} {:>9.2}",
        "bare swtpm spawn (socket bound and handed over)",
        ms(prebound),
        "-",
        prebound.as_secs_f64() / bare_median.as_secs_f64()
    );
    let probed = median(probed_times);
    println!(
        "{:<48} {:>10.2} {:>10} {:>9.2}",
        "  the same, probed before the attach (as vtpmd)",
        ms(probed),
        "-",
        probed.as_secs_f64() / bare_median.as_secs_f64()
    );
    println!(
        "{:<48} {:>10.2}",
        "    of which spawn → probe answered",
        ms(median(probe_answers))
    );
    // Where a Start's time goes, as vtpmd reports it, and the rest as the
    // caller sees it: Start's reply (vtpmd's answer reaching the client)
    // and the VMM's attach + TPM2_Startup after it.
    println!();
    println!(
        "{:<48} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "split, median ms", "queued", "kdf", "unseal", "spawn", "ready", "vtpmd", "reply", "attach"
    );
    for (i, (name, _)) in kinds.iter().enumerate() {
        let s = &samples[i];
        let answered = median(s.iter().map(|s| s.answered).collect());
        let attach = median(
            s.iter()
                .map(|s| s.total.saturating_sub(s.answered))
                .collect(),
        );
        let vtpmd = phase(s, "total_ms");
        println!(
            "{name:<48} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}",
            ms(phase(s, "queued_ms")),
            ms(phase(s, "kdf_ms")),
            ms(phase(s, "unseal_ms")),
            ms(phase(s, "spawn_ms")),
            ms(phase(s, "ready_ms")),
            ms(vtpmd),
            ms(answered.saturating_sub(vtpmd)),
            ms(attach),
        );
    }
}
