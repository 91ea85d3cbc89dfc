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
//!   its socket polled every 100 µs (the fastest a launcher can do).
//!
//! It also prints the KDF phase vtpmd reports for each (Monitor's
//! `start.kdf_ms`): Argon2id, HKDF or HPKE.

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

/// One Start with `secret` until the first TPM answer; the KDF phase
/// vtpmd reported. The guest is stopped again (VMM hangs up).
fn start_once(d: &Daemon, events: &mut Events, secret: &Value) -> (Duration, Duration) {
    let mut params = json!({"guest": GUEST});
    for (k, v) in secret.as_object().unwrap() {
        params[k] = v.clone();
    }
    let called = Instant::now();
    let reply = d.client().manager("Start", params).unwrap();
    let ctrl = reply["guest"]["ctrl_socket"].as_str().unwrap().to_owned();
    let mut vmm = Vmm::attach(std::path::Path::new(&ctrl), Duration::from_secs(10)).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    let total = called.elapsed();
    let (_, event) = events
        .wait_for(GUEST, "running", Duration::from_secs(30))
        .unwrap();
    let kdf = Duration::from_secs_f64(event["start"]["kdf_ms"].as_f64().unwrap() / 1e3);
    vmm.shutdown().unwrap();
    events
        .wait_for(GUEST, "stopped", Duration::from_secs(30))
        .unwrap();
    (total, kdf)
}

fn main() {
    let runs = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10usize);
    // Embedded defaults (real Argon2id), a generous call timeout.
    let d = Daemon::start_with_config("[api]\nrequest_timeout_ms = 300000\n");
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
    let bare_dir = tempfile::tempdir().unwrap();
    let bare = BareSwtpm::provision(bare_dir.path());

    let kinds: [(&str, Value); 3] = [
        (
            "Start, passphrase (Argon2id 64 MiB t=3 p=4)",
            json!({"passphrase": common::b64(PASSPHRASE)}),
        ),
        ("Start, key slot (HKDF)", json!({"key": key_b64})),
        ("Start, this host's key (HPKE)", json!({})),
    ];
    let mut totals: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    let mut kdfs: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    let mut bare_times = Vec::new();
    // Warm-up: page cache, the binaries' first fork.
    for (_, secret) in &kinds {
        start_once(&d, &mut events, secret);
    }
    bare.start(Wait::Tight).1.stop();
    for _ in 0..runs {
        for (i, (_, secret)) in kinds.iter().enumerate() {
            let (total, kdf) = start_once(&d, &mut events, secret);
            totals[i].push(total);
            kdfs[i].push(kdf);
        }
        let (elapsed, running) = bare.start(Wait::Tight);
        running.stop();
        bare_times.push(elapsed);
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
        let total = median(totals[i].clone());
        println!(
            "{name:<48} {:>10.2} {:>10.3} {:>9.2}",
            ms(total),
            ms(median(kdfs[i].clone())),
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
}
