//! Cluster mode's figures on a real three-member etcd (loopback) and real
//! vtpmd hosts: replication lag from a durable reseal to its etcd commit
//! (against the baseline of a bare etcd put of the same size, in the same
//! run), etcd writes per second with 256 guests writing NV in a loop, and
//! evacuation time from a host's death to the guest's TPM answering on
//! another host (the lease TTL and what vtpmd adds, each reported).
//!
//! `cargo bench --bench cluster` (as root or not; etcd-server installed).
//! `VTPMD_BENCH_GUESTS` (default 256) and `VTPMD_BENCH_SECONDS` (default
//! 10) size the write-rate part. Figures only: nothing here asserts a time.

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "performance/fleet.rs"]
#[allow(dead_code)]
mod fleet;
#[path = "performance/report.rs"]
#[allow(dead_code)]
mod report;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{Daemon, TEST_CONFIG, b64};
use etcd_client::{Client, EventType, WatchOptions};
use serde_json::{Value, json};
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};

use fleet::{PASSPHRASE, guest_id};
use report::{median, ms, percentile};

const TIMEOUT: Duration = Duration::from_secs(60);
const NV_INDEX: u32 = 0x0150_0016;

fn host(etcd: &Etcd, name: &str, ttl_s: u64, interval_ms: u64) -> Daemon {
    let config = format!(
        "{TEST_CONFIG}{}[supervisor]\nkdf_parallelism = 2\n[api]\nmax_connections = 4096\nrequest_timeout_ms = 600000\n",
        etcd.config_with(name, ttl_s, interval_ms)
    );
    let mut d = Daemon::unstarted(&config, None);
    d.restart();
    d
}

/// Each put of `key` etcd commits, with the instant the bench heard of it
/// (a watch from its own runtime thread): (instant, value; None = delete).
fn watch(etcd: &Etcd, key: String) -> mpsc::Receiver<(Instant, Option<Vec<u8>>)> {
    let endpoints = etcd.endpoints();
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut client = Client::connect(&endpoints, None).await.unwrap();
            let mut stream = client.watch(key, Some(WatchOptions::new())).await.unwrap();
            ready_tx.send(()).unwrap();
            while let Ok(Some(response)) = stream.message().await {
                let at = Instant::now();
                for event in response.events() {
                    let value = match event.event_type() {
                        EventType::Put => event.kv().map(|kv| kv.value().to_vec()),
                        EventType::Delete => None,
                    };
                    if tx.send((at, value)).is_err() {
                        return;
                    }
                }
            }
        });
    });
    ready_rx.recv_timeout(TIMEOUT).unwrap();
    rx
}

fn create(d: &Daemon, guest: &str) {
    d.create_guest(guest, PASSPHRASE);
}

fn define_counter(vmm: &mut vtpmd::swtpm::ctrl::Vmm) {
    let attrs = nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
    let define = tpm::tpm2_nv_define_space(NV_INDEX, attrs, 8);
    assert_eq!(vmm.transact(&define).unwrap().rc, 0);
}

fn write_counter(vmm: &mut vtpmd::swtpm::ctrl::Vmm, value: u64) {
    let cmd = tpm::tpm2_nv_write(NV_INDEX, &value.to_be_bytes(), 0).unwrap();
    assert_eq!(vmm.transact(&cmd).unwrap().rc, 0);
}

/// Replication lag: one guest writes its NV every `pause`; for each
/// generation, from its `resealed` event (the local reseal is durable) to
/// etcd's commit of it.
fn lag(etcd: &Etcd, interval_ms: u64, writes: u64, pause: Duration) -> Vec<Duration> {
    let d = host(etcd, &format!("lag-{interval_ms}"), 10, interval_ms);
    let g = guest_id(900 + usize::try_from(interval_ms).unwrap_or(0));
    create(&d, &g);
    let commits = watch(etcd, format!("/vtpmd/guests/{g}/generation"));
    let mut events = d.events();
    let started = d.start_guest(&g, PASSPHRASE);
    let mut vmm = fleet::attach(&started);
    define_counter(&mut vmm);
    for i in 1..=writes {
        write_counter(&mut vmm, i);
        std::thread::sleep(pause);
    }
    // Every reseal, its instant; every commit, its instant.
    std::thread::sleep(Duration::from_millis(interval_ms + 500));
    let mut sealed = std::collections::BTreeMap::new();
    events.drain();
    for (at, e) in events.seen() {
        if e["event"] == "resealed" && e["guest"]["guest"] == g.as_str() {
            sealed.insert(e["guest"]["generation"].as_u64().unwrap(), *at);
        }
    }
    let mut lags = Vec::new();
    let mut reseals: Vec<(u64, Instant)> = sealed.into_iter().collect();
    reseals.sort();
    while let Ok((at, value)) = commits.try_recv() {
        let Some(value) = value else { continue };
        let generation: u64 = String::from_utf8_lossy(&value).parse().unwrap();
        // A commit carries every reseal at or below its generation that
        // the one before did not: each one's lag ends here.
        for (g, sealed_at) in reseals.iter_mut() {
            if *g <= generation && *g != 0 {
                lags.push(at.saturating_duration_since(*sealed_at));
                *g = 0;
            }
        }
    }
    drop(vmm);
    lags
}

/// The baseline: a bare etcd put of `size` bytes, acknowledged.
fn bare_put(etcd: &Etcd, size: usize, count: usize) -> Vec<Duration> {
    let endpoints = etcd.endpoints();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut client = Client::connect(&endpoints, None).await.unwrap();
        let value = vec![0x5a; size];
        let mut out = Vec::new();
        for i in 0..count {
            let began = Instant::now();
            client
                .put(format!("/bench/bare/{}", i % 8), value.clone(), None)
                .await
                .unwrap();
            out.push(began.elapsed());
        }
        out
    })
}

/// etcd's revision now.
fn revision(etcd: &Etcd) -> i64 {
    let out = etcd
        .etcdctl(&["get", "/", "-w", "json", "--keys-only", "--limit", "1"])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v["header"]["revision"].as_i64().unwrap()
}

/// `guests` guests each writing NV in a loop for `seconds`: local reseals
/// and etcd writes per second.
fn write_rate(etcd: &Etcd, guests: usize, seconds: u64) -> (f64, f64, f64, usize) {
    let d = host(etcd, "rate", 10, 1000);
    let ids: Vec<String> = (0..guests).map(guest_id).collect();
    fleet::create_all(&d, &ids, 4);
    let wave = fleet::start_all(&d, &ids);
    assert!(wave.failures.is_empty(), "{:?}", wave.failures);
    let mut events = d.events();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let before = revision(etcd);
    let began = Instant::now();
    std::thread::scope(|scope| {
        for guest in &wave.guests {
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            scope.spawn(move || {
                let mut vmm = fleet::attach(guest);
                define_counter(&mut vmm);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    write_counter(&mut vmm, i);
                    acked.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(vmm);
            });
        }
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    let took = began.elapsed().as_secs_f64();
    let after = revision(etcd);
    events.drain();
    let reseals = events
        .seen()
        .iter()
        .filter(|(_, e)| e["event"] == "resealed")
        .count();
    let writes = u64::try_from(after - before).unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    let out = (
        acked.load(Ordering::Relaxed) as f64 / took,
        reseals as f64 / took,
        writes as f64 / took,
        wave.guests.len(),
    );
    out
}

/// Evacuation: host A dies (SIGKILL of vtpmd and swtpm); B evacuates as
/// soon as it may. (lease part, vtpmd's part, total).
fn evacuation(etcd: &Etcd, ttl_s: u64) -> (Duration, Duration, Duration) {
    let mut a = host(etcd, &format!("evac-a-{ttl_s}"), ttl_s, 1000);
    let b = host(etcd, &format!("evac-b-{ttl_s}"), ttl_s, 1000);
    let g = guest_id(990 + usize::try_from(ttl_s).unwrap_or(0));
    create(&a, &g);
    let started = a.start_guest(&g, PASSPHRASE);
    let mut vmm = fleet::attach(&started);
    define_counter(&mut vmm);
    write_counter(&mut vmm, 7);
    let owner = watch(etcd, format!("/vtpmd/guests/{g}/owner"));
    std::thread::sleep(Duration::from_millis(1500));
    let died = Instant::now();
    a.kill();
    common::kill_swtpms_under(&a.runtime_dir);
    // The owner key goes when etcd expires A's lease.
    let expired = loop {
        let (at, value) = owner.recv_timeout(TIMEOUT).unwrap();
        if value.is_none() {
            break at;
        }
    };
    let answered = loop {
        let reply = b.client().manager(
            "Evacuate",
            json!({"guest": g, "passphrase": b64(PASSPHRASE)}),
        );
        match reply {
            Ok(reply) => {
                let mut vmm = fleet::attach(&reply["guest"]);
                assert!(fleet::answers(&mut vmm));
                break Instant::now();
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    drop(vmm);
    (
        expired - died,
        answered.saturating_duration_since(expired),
        answered - died,
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // A connection and a VMM per guest, from this one process.
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let guests: usize = std::env::var("VTPMD_BENCH_GUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let seconds: u64 = std::env::var("VTPMD_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);

    println!("# vtpmd cluster mode (etcd 3-member on loopback)\n");
    // A TPM 2.0 guest's sealed file with a few NV writes is about 12 KiB.
    let bare = bare_put(&etcd, 12 * 1024, 200);
    println!(
        "baseline: bare etcd put of 12 KiB, acknowledged: p50 {} p99 {}",
        ms(median(&bare)),
        ms(percentile(&bare, 99))
    );
    let lag0 = lag(&etcd, 0, 100, Duration::from_millis(50));
    println!(
        "replication lag, replicate_interval_ms = 0 (no coalescing), a write every 50 ms: {} samples, p50 {} p99 {} ({:.2}x / {:.2}x the bare put)",
        lag0.len(),
        ms(median(&lag0)),
        ms(percentile(&lag0, 99)),
        report::ratio(median(&lag0), median(&bare)),
        report::ratio(percentile(&lag0, 99), percentile(&bare, 99)),
    );
    let lag1 = lag(&etcd, 1000, 100, Duration::from_millis(50));
    println!(
        "replication lag, replicate_interval_ms = 1000 (default), a write every 50 ms: {} samples, p50 {} p99 {} (the window bounds it)",
        lag1.len(),
        ms(median(&lag1)),
        ms(percentile(&lag1, 99)),
    );
    let (acked, reseals, writes, ran) = write_rate(&etcd, guests, seconds);
    println!(
        "{ran} guests writing NV in a loop for {seconds} s: {acked:.0} TPM writes/s acknowledged, {reseals:.0} durable reseals/s, {writes:.0} etcd writes/s (bound: {ran} guests / 1 s window = {ran}/s)"
    );
    for ttl in [3, 10] {
        let (lease, vtpmd, total) = evacuation(&etcd, ttl);
        println!(
            "evacuation with lease_ttl_s = {ttl}: host death to lease expiry {}, expiry to the TPM answering on the new host {} (vtpmd's part), total {}",
            ms(lease),
            ms(vtpmd),
            ms(total)
        );
    }
}
