//! A real three-member etcd cluster on loopback ports for tests: three
//! `etcd` processes with their own data directories, started together,
//! each one stoppable and restartable; read with `etcdctl`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64ct::{Base64, Encoding};
use serde_json::Value;

pub struct Etcd {
    pub dir: tempfile::TempDir,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// `None` (with the reason) where etcd is not installed.
pub fn etcd_binary() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/etcd");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: etcd is not installed (apt-get install etcd-server etcd-client)");
        None
    }
}

/// A loopback port no one listens on, for a process that binds it later.
///
/// Not one the kernel hands out for port 0: between the probe and the
/// bind, the kernel may hand that same port to any outgoing connection
/// (etcd's peers, etcdctl, vtpmd) or to another test's probe, and an etcd
/// member that cannot bind it exits while the cluster's member list still
/// names the port, so a client round-robins between two clusters (leases
/// of one "not found" in the other). Ports below the ephemeral range, each
/// taken once per process, from a base that differs between processes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000; // below 32768, where Linux's ephemeral range starts
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = u16::try_from(std::process::id() % 997).unwrap() * 12;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(n < SPAN, "no free loopback port left");
        let port = FIRST + (base + n) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Etcd {
    /// Three members, up and with a leader.
    pub fn start() -> Option<Self> {
        etcd_binary()?;
        let dir = tempfile::Builder::new().prefix("vtetcd").tempdir().unwrap();
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut etcd = Self { dir, members };
        for i in 0..3 {
            etcd.start_member(i);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd.assert_one_cluster();
        Some(etcd)
    }

    /// Every member runs and answers with the same cluster ID: a member
    /// that could not bind its port exits, and another process answering
    /// there would make the health check pass all the same.
    fn assert_one_cluster(&mut self) {
        for m in &mut self.members {
            let exited = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "etcd member {} exited: {exited:?}",
                m.name
            );
        }
        let status = self
            .etcdctl(&["endpoint", "status", "-w", "json"])
            .unwrap_or_default();
        let ids: std::collections::BTreeSet<String> = serde_json::from_str::<Value>(&status)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|e| e["Status"]["header"]["cluster_id"].to_string())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "the three endpoints are not one etcd cluster: {status}"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&status)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len)),
            Some(3),
            "{status}"
        );
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// (Re)starts member `i` on its data directory.
    pub fn start_member(&mut self, i: usize) {
        let cluster = self.initial_cluster();
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap();
        let m = &mut self.members[i];
        let child = Command::new("/usr/bin/etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(self.dir.path().file_name().unwrap())
            // Quick elections on a loaded test machine.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        m.child = Some(child);
    }

    /// SIGKILLs member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The client URLs, as `[cluster] endpoints` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// A `[cluster]` section for host `host` with lease TTL `ttl_s`, and a
    /// short replication window (tests wait for etcd).
    pub fn config(&self, host: &str, ttl_s: u64) -> String {
        self.config_with(host, ttl_s, 100) + "timeout_ms = 1000\n"
    }

    /// A `[cluster]` section with the replication window `interval_ms`.
    pub fn config_with(&self, host: &str, ttl_s: u64, interval_ms: u64) -> String {
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        format!(
            "[cluster]\nendpoints = [{}]\nhost = {host:?}\nlease_ttl_s = {ttl_s}\nreplicate_interval_ms = {interval_ms}\n",
            endpoints.join(", ")
        )
    }

    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .etcdctl(&["endpoint", "health", "--cluster"])
                .is_some_and(|o| !o.contains("unhealthy"));
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `etcdctl` against the living members; its stdout, `None` on failure.
    pub fn etcdctl(&self, args: &[&str]) -> Option<String> {
        let living: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", living.join(",")))
            .args(["--command-timeout=3s", "--dial-timeout=2s"])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", key, "--print-value-only"])?;
        let v = out.trim_end_matches('\n').to_owned();
        (!v.is_empty()).then_some(v)
    }

    /// The generation etcd holds of `guest` (prefix `/vtpmd`).
    pub fn generation(&self, guest: &str) -> Option<u64> {
        self.get(&format!("/vtpmd/guests/{guest}/generation"))?
            .parse()
            .ok()
    }

    pub fn wait_generation_at_least(&self, guest: &str, generation: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(g) = self.generation(guest).filter(|g| *g >= generation) {
                return g;
            }
            assert!(
                Instant::now() < deadline,
                "etcd never held generation {generation} of {guest} (it has {:?})",
                self.generation(guest)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every put and delete under `prefix` since revision 1, in order:
    /// (revision, key, value, lease; value empty for a delete).
    pub fn history(&self, prefix: &str) -> Vec<Change> {
        let out = Command::new("timeout")
            .arg("3")
            .arg("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(["watch", "--prefix", "--rev=1", "-w", "json", prefix])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut changes = Vec::new();
        let mut de = serde_json::Deserializer::from_str(&text).into_iter::<Value>();
        while let Some(Ok(response)) = de.next() {
            for event in response["Events"].as_array().into_iter().flatten() {
                let kv = &event["kv"];
                let decode = |v: &Value| {
                    v.as_str()
                        .map(|s| {
                            String::from_utf8_lossy(&Base64::decode_vec(s).unwrap()).into_owned()
                        })
                        .unwrap_or_default()
                };
                changes.push(Change {
                    revision: kv["mod_revision"].as_i64().unwrap_or(0),
                    key: decode(&kv["key"]),
                    value: if event["type"].as_i64() == Some(1) || event["type"] == "DELETE" {
                        None
                    } else {
                        Some(decode(&kv["value"]))
                    },
                    lease: kv["lease"].as_i64().unwrap_or(0),
                });
            }
        }
        changes
    }
}

#[derive(Debug, Clone)]
pub struct Change {
    pub revision: i64,
    pub key: String,
    /// `None`: deleted.
    pub value: Option<String>,
    pub lease: i64,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        // A failed test's etcd logs go with its temporary directory:
        // what etcd said (elections, leases) is printed while it exists.
        if std::thread::panicking() {
            for m in &self.members {
                let log = self.dir.path().join(format!("{}.log", m.name));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!(
                    "--- etcd member {} (last {} lines) ---\n{}",
                    m.name,
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
    }
}
