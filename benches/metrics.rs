//! Scraping vtpmd's metrics with many guests registered: prints figures,
//! asserts nothing.
//!
//! `cargo bench --bench metrics [-- --guests N --scrapes M]` creates N
//! guests (default 1,000; real swtpm_setup each, so this takes a minute
//! or two) on the real vtpmd binary, then times M `GetMetrics` calls
//! (default 200) against, in the same run and connection, M `List` calls
//! (the baseline: the cheapest call that reads every guest) and M
//! `Status` calls of one guest (one call's round trip). No metric has a
//! per-guest label, so the rendering's size does not grow with N.

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up should stop

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use common::Daemon;

fn arg(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// The `per_mille`-th of sorted `samples`.
fn percentile(samples: &mut [Duration], per_mille: usize) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) * per_mille / 1000).min(samples.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn guest_id(n: usize) -> String {
    format!("5c1e2f00-0000-4000-8000-{n:012x}")
}

fn main() {
    let guests = arg("--guests", 1000);
    let scrapes = arg("--scrapes", 200);
    let d = Daemon::start_with("[api]\nrequest_timeout_ms = 300000\nmax_connections = 64\n");
    let started = Instant::now();
    let workers = 4;
    std::thread::scope(|s| {
        for w in 0..workers {
            let d = &d;
            s.spawn(move || {
                let mut c = d.client();
                for n in (w..guests).step_by(workers) {
                    c.manager(
                        "Create",
                        json!({"guest": guest_id(n), "version": "2.0", "passphrase": common::b64("p")}),
                    )
                    .unwrap();
                }
            });
        }
    });
    eprintln!(
        "{guests} guests created in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut c = d.client();
    let one = guest_id(0);
    let mut metrics = Vec::new();
    let mut list = Vec::new();
    let mut status = Vec::new();
    let mut size = 0;
    for _ in 0..scrapes {
        let t = Instant::now();
        let reply = c.manager("GetMetrics", json!({})).unwrap();
        metrics.push(t.elapsed());
        size = reply["text"].as_str().unwrap().len();
        let t = Instant::now();
        c.manager("List", json!({})).unwrap();
        list.push(t.elapsed());
        let t = Instant::now();
        c.manager("Status", json!({"guest": one})).unwrap();
        status.push(t.elapsed());
    }
    let text = c.manager("GetMetrics", json!({})).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let render = text
        .lines()
        .find_map(|l| l.strip_prefix("vtpmd_last_scrape_duration_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let (m50, m99) = (percentile(&mut metrics, 500), percentile(&mut metrics, 990));
    let (l50, l99) = (percentile(&mut list, 500), percentile(&mut list, 990));
    let (s50, s99) = (percentile(&mut status, 500), percentile(&mut status, 990));
    println!(
        "{guests} guests registered, {scrapes} calls each, interleaved ({} CPUs)",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("{:<34} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    println!(
        "{:<34} {:>9.3} {:>9.3}",
        "GetMetrics (0.0.4 text)",
        ms(m50),
        ms(m99)
    );
    println!(
        "{:<34} {:>9.3} {:>9.3}",
        "List (baseline: every guest)",
        ms(l50),
        ms(l99)
    );
    println!(
        "{:<34} {:>9.3} {:>9.3}",
        "Status (one call's round trip)",
        ms(s50),
        ms(s99)
    );
    println!(
        "GetMetrics / List p50: {:.2}; rendering inside vtpmd {:.3} ms; {size} bytes",
        m50.as_secs_f64() / l50.as_secs_f64(),
        render * 1e3
    );
}
