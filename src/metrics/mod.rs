//! What vtpmd counts, in the Prometheus/OpenMetrics text format, through
//! the `prometheus-client` crate (no hand-written exposition).
//!
//! Every label has a bounded set of values: API method and outcome (the
//! methods and error names of the interface), event kind, guest state,
//! Start phase, swtpm exit cause, connection refusal scope. No metric has
//! a per-guest label: a host with thousands of guests keeps the same
//! number of series, and a guest id in a label would outlive the guest in
//! every scraper's storage. Per-guest figures are in Status and Monitor.
//!
//! Updated where things happen (the supervisor's event publication, the
//! resealer, the KDF queue, the API's accept loop); guests by state and
//! the KDF permits are read when rendered. [`http`] and [`textfile`]
//! expose the rendering beside the `GetMetrics` call.

pub mod http;
pub mod textfile;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    swtpm_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    key: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms to 33 s, doubling: a Start is milliseconds with a key and
/// hundreds of them with Argon2id, seconds when queued behind others.
fn start_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// 50 µs to 1.6 s, doubling: a reseal is two fsyncs.
fn reseal_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// How a swtpm run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// Its VMM went away (or sent CMD_SHUTDOWN): swtpm exited cleanly.
    VmmQuit,
    /// vtpmd ended it: Stop, Drain, AbortMigration.
    Stopped,
    /// Someone else killed it (SIGKILL, SIGTERM not from vtpmd).
    Killed,
    /// Any other exit status or signal.
    Crashed,
}

impl ExitCause {
    fn as_str(self) -> &'static str {
        match self {
            ExitCause::VmmQuit => "vmm-quit",
            ExitCause::Stopped => "stopped",
            ExitCause::Killed => "killed",
            ExitCause::Crashed => "crashed",
        }
    }
}

/// Why the API refused a connection at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedScope {
    /// `max_connections` in all.
    Total,
    /// The share of callers outside the reserved groups.
    Shared,
    /// `max_connections_per_uid`.
    PerUid,
}

/// What the rendering reads at the time of the scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Guests by state name.
    pub guests: Vec<(&'static str, i64)>,
    /// Cluster mode: whether etcd answered the last call, and how many
    /// guests have reseals not in etcd yet.
    pub cluster: Option<(bool, i64)>,
}

/// The registry and the handles that update it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    guests: Family<StateLabel, Gauge>,
    calls: Family<CallLabels, Counter>,
    events: Family<KindLabel, Counter>,
    start: Histogram,
    start_phase: Histograms<PhaseLabel>,
    reseal_latency: Histogram,
    reseal_bytes: Counter,
    reseal_failures: Counter,
    swtpm_exits: Family<CauseLabel, Counter>,
    kdf_in_use: Gauge,
    kdf_queued: Gauge,
    connections_open: Gauge,
    connections_refused: Family<ScopeLabel, Counter>,
    connections_idle_closed: Counter,
    adoptions: Family<KeyLabel, Counter>,
    scrape_seconds: Gauge<f64, AtomicU64>,
    cluster_up: Gauge,
    cluster_pending: Gauge,
    cluster_lag: Histogram,
    cluster_fenced: Counter,
}

impl Metrics {
    pub fn new(swtpm_version: &str) -> Self {
        let mut registry = Registry::default();
        // A gauge of 1, not OpenMetrics' info type: the 0.0.4 text format
        // (promtool 2.42, node_exporter's textfile collector) has no info.
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                swtpm_version: swtpm_version.to_owned(),
            })
            .set(1);
        registry.register(
            "vtpmd_build_info",
            "vtpmd's version and the swtpm it drives (always 1)",
            build,
        );
        let m = Self {
            guests: Family::default(),
            calls: Family::default(),
            events: Family::default(),
            start: start_buckets(),
            start_phase: Family::new_with_constructor(start_buckets),
            reseal_latency: reseal_buckets(),
            reseal_bytes: Counter::default(),
            reseal_failures: Counter::default(),
            swtpm_exits: Family::default(),
            kdf_in_use: Gauge::default(),
            kdf_queued: Gauge::default(),
            connections_open: Gauge::default(),
            connections_refused: Family::default(),
            connections_idle_closed: Counter::default(),
            adoptions: Family::default(),
            scrape_seconds: Gauge::default(),
            cluster_up: Gauge::default(),
            cluster_pending: Gauge::default(),
            cluster_lag: start_buckets(),
            cluster_fenced: Counter::default(),
            registry,
        };
        let mut registry = m.registry;
        registry.register(
            "vtpmd_guests",
            "Guests registered, by state",
            m.guests.clone(),
        );
        registry.register(
            "vtpmd_api_calls",
            "Calls of io.vtpmd.Manager, by method and outcome (ok or the error's name)",
            m.calls.clone(),
        );
        registry.register(
            "vtpmd_events",
            "Guest events published (what Monitor streams), by kind",
            m.events.clone(),
        );
        registry.register(
            "vtpmd_start_duration_seconds",
            "Start, from the call to the answer, for Starts that brought a guest up",
            m.start.clone(),
        );
        registry.register(
            "vtpmd_start_phase_duration_seconds",
            "Start's phases: queued (for a KDF permit), kdf, unseal, spawn, ready",
            m.start_phase.clone(),
        );
        registry.register(
            "vtpmd_reseal_latency_seconds",
            "From a swtpm write seen to its durable reseal",
            m.reseal_latency.clone(),
        );
        registry.register(
            "vtpmd_reseal_bytes",
            "State bytes sealed by reseals (archive length)",
            m.reseal_bytes.clone(),
        );
        registry.register(
            "vtpmd_reseal_failures",
            "Reseals that failed (retried until one succeeds)",
            m.reseal_failures.clone(),
        );
        registry.register(
            "vtpmd_swtpm_exits",
            "swtpm runs ended, by cause: vmm-quit, stopped, killed, crashed",
            m.swtpm_exits.clone(),
        );
        registry.register(
            "vtpmd_kdf_permits_in_use",
            "Argon2id derivations running now",
            m.kdf_in_use.clone(),
        );
        registry.register(
            "vtpmd_kdf_queued",
            "Operations waiting for a KDF permit",
            m.kdf_queued.clone(),
        );
        registry.register(
            "vtpmd_api_connections_open",
            "API connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "vtpmd_api_connections_refused",
            "API connections refused at accept, by the limit they met: total, shared, per-uid",
            m.connections_refused.clone(),
        );
        registry.register(
            "vtpmd_api_connections_idle_closed",
            "API connections closed for idleness or a stranger's lifetime",
            m.connections_idle_closed.clone(),
        );
        registry.register(
            "vtpmd_adoptions",
            "swtpm processes of an earlier vtpmd taken over at start-up, by whether their key came back (returned) or not (needed)",
            m.adoptions.clone(),
        );
        registry.register(
            "vtpmd_last_scrape_duration_seconds",
            "How long the previous rendering of these metrics took",
            m.scrape_seconds.clone(),
        );
        registry.register(
            "vtpmd_cluster_etcd_up",
            "Cluster mode: 1 while this host holds a live etcd lease and etcd answered its last keep-alive, else 0",
            m.cluster_up.clone(),
        );
        registry.register(
            "vtpmd_cluster_replication_pending",
            "Cluster mode: guests with a durable reseal not in etcd yet",
            m.cluster_pending.clone(),
        );
        registry.register(
            "vtpmd_cluster_replication_lag_seconds",
            "Cluster mode: from a durable reseal to its write in etcd",
            m.cluster_lag.clone(),
        );
        registry.register(
            "vtpmd_cluster_fenced",
            "Cluster mode: guest runs ended because this host no longer owned them",
            m.cluster_fenced.clone(),
        );
        Self { registry, ..m }
    }

    /// The exposition in `format`, with the figures read now.
    pub fn render(&self, snapshot: &Snapshot, format: Format) -> String {
        let started = std::time::Instant::now();
        for (state, count) in &snapshot.guests {
            self.guests.get_or_create(&StateLabel { state }).set(*count);
        }
        if let Some((up, pending)) = snapshot.cluster {
            self.cluster_up.set(i64::from(up));
            self.cluster_pending.set(pending);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        let out = match format {
            Format::OpenMetrics => out,
            Format::Prometheus => prometheus_text(&out),
        };
        self.scrape_seconds.set(started.elapsed().as_secs_f64());
        out
    }

    pub fn api_call(&self, method: &'static str, outcome: &str) {
        self.calls
            .get_or_create(&CallLabels {
                method,
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn event(&self, kind: &'static str) {
        self.events.get_or_create(&KindLabel { kind }).inc();
    }

    /// A Start's phases (queued, kdf, unseal, spawn, ready) and its total.
    pub fn start(&self, phases: &[(&'static str, Duration)], total: Duration) {
        for (phase, took) in phases {
            self.start_phase
                .get_or_create(&PhaseLabel { phase })
                .observe(took.as_secs_f64());
        }
        self.start.observe(total.as_secs_f64());
    }

    pub fn resealed(&self, latency: Duration) {
        self.reseal_latency.observe(latency.as_secs_f64());
    }

    pub fn reseal_bytes(&self, bytes: usize) {
        self.reseal_bytes
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    pub fn cluster_replicated(&self, lag: Duration) {
        self.cluster_lag.observe(lag.as_secs_f64());
    }

    pub fn fenced(&self) {
        self.cluster_fenced.inc();
    }

    pub fn reseal_failed(&self) {
        self.reseal_failures.inc();
    }

    pub fn swtpm_exit(&self, cause: ExitCause) {
        self.swtpm_exits
            .get_or_create(&CauseLabel {
                cause: cause.as_str(),
            })
            .inc();
    }

    /// Held while an operation waits for a KDF permit.
    pub fn kdf_waiting(&self) -> GaugeHold {
        GaugeHold::new(&self.kdf_queued)
    }

    /// Held while a KDF permit is in use.
    pub fn kdf_running(&self) -> GaugeHold {
        GaugeHold::new(&self.kdf_in_use)
    }

    /// Held while an API connection is open.
    pub fn connection_open(&self) -> GaugeHold {
        GaugeHold::new(&self.connections_open)
    }

    pub fn connection_refused(&self, scope: RefusedScope) {
        let scope = match scope {
            RefusedScope::Total => "total",
            RefusedScope::Shared => "shared",
            RefusedScope::PerUid => "per-uid",
        };
        self.connections_refused
            .get_or_create(&ScopeLabel { scope })
            .inc();
    }

    pub fn connection_idle_closed(&self) {
        self.connections_idle_closed.inc();
    }

    pub fn adopted(&self, key_returned: bool) {
        let key = if key_returned { "returned" } else { "needed" };
        self.adoptions.get_or_create(&KeyLabel { key }).inc();
    }
}

/// The two text expositions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format 0.0.4: what promtool 2.42 checks, what
    /// node_exporter's textfile collector and older scrapers read.
    Prometheus,
    /// OpenMetrics 1.0 text, as `prometheus-client` writes it.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// OpenMetrics text → Prometheus text 0.0.4. The samples are the same;
/// the formats differ where this edits: a counter family is named after
/// its samples (`x_total`, where OpenMetrics names it `x`), and there is
/// no `# EOF`. (`prometheus-client` writes only OpenMetrics, and no
/// metric here uses units, `_created` or exemplars.)
fn prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A gauge raised while this lives.
#[derive(Debug)]
pub struct GaugeHold(Gauge);

impl GaugeHold {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeHold {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn what_is_counted_is_rendered_with_bounded_labels() {
        let m = Metrics::new("0.7.1");
        m.api_call("Start", "ok");
        m.api_call("Start", "ok");
        m.api_call("Start", "io.vtpmd.Manager.WrongPassphrase");
        m.event("resealed");
        m.start(
            &[("kdf", Duration::from_millis(3))],
            Duration::from_millis(7),
        );
        m.swtpm_exit(ExitCause::VmmQuit);
        let held = m.kdf_running();
        let open = m.render(
            &Snapshot {
                guests: vec![("running", 2), ("stopped", 5)],
                cluster: Some((true, 1)),
            },
            Format::OpenMetrics,
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE vtpmd_api_calls counter\n"), "{open}");
        let text = m.render(&Snapshot::default(), Format::Prometheus);
        assert!(
            text.contains("# TYPE vtpmd_api_calls_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert_eq!(
            value_of(
                &text,
                r#"vtpmd_api_calls_total{method="Start",outcome="ok"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value_of(
                &text,
                r#"vtpmd_api_calls_total{method="Start",outcome="io.vtpmd.Manager.WrongPassphrase"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value_of(&text, r#"vtpmd_guests{state="stopped"}"#),
            Some(5.0)
        );
        assert_eq!(value_of(&text, "vtpmd_kdf_permits_in_use"), Some(1.0));
        assert_eq!(
            value_of(&text, "vtpmd_start_duration_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            value_of(&text, r#"vtpmd_swtpm_exits_total{cause="vmm-quit"}"#),
            Some(1.0)
        );
        assert!(
            text.contains(r#"vtpmd_build_info{version=""#)
                && text.contains(r#"swtpm_version="0.7.1""#),
            "{text}"
        );
        drop(held);
        let text = m.render(&Snapshot::default(), Format::Prometheus);
        assert_eq!(value_of(&text, "vtpmd_kdf_permits_in_use"), Some(0.0));
    }
}
