//! vtpmd's TOML configuration, with documented defaults.
//!
//! Every key is optional; an unknown key is an error (a typo must not
//! silently fall back to a default). The embedded default is what runs when
//! no file is given, and `vtpmd --check-config` prints the effective result.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use crate::vault::{KdfParams, KdfParamsError, KdfPolicy};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub vault: VaultConfig,
    pub supervisor: SupervisorSection,
    pub swtpm: SwtpmSection,
    pub api: ApiSection,
    pub log: LogSection,
    pub metrics: MetricsSection,
    pub cluster: ClusterSection,
}

/// `[cluster]`: cluster mode on etcd (v3 API). Without `endpoints` vtpmd
/// runs in local mode (the default): its state directory is all it knows.
/// With them, every durable reseal is also written to etcd, each guest
/// has one owning host (bound to that host's lease), and a dead host's
/// guests can be evacuated with their newest state (docs/integration.md,
/// "Cluster mode").
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// etcd's client URLs, e.g. `["https://10.0.0.1:2379", …]`: `http://`
    /// or `https://`, host and port.
    pub endpoints: Vec<String>,
    /// This host's name in the cluster, unique among the vtpmds sharing
    /// the etcd (default: the machine's hostname).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Where vtpmd's keys live in etcd (default `/vtpmd`).
    pub prefix: String,
    /// Seconds this host's lease lives without a keep-alive (default 10;
    /// 2 to 300): how long after a host died its guests can be evacuated,
    /// and how long a host cut off from etcd may go unfenced.
    pub lease_ttl_s: u64,
    /// A guest's reseals reach etcd at most once per this many
    /// milliseconds (default 1000; at most 60000): the newest one in the
    /// window is written, so a guest writing its TPM in a loop cannot
    /// flood etcd. A durable reseal is in etcd within about this window.
    pub replicate_interval_ms: u64,
    /// How long one etcd call may take, milliseconds (default 3000).
    pub timeout_ms: u64,
    /// PEM CA certificate(s) the etcd servers' certificates are checked
    /// against; needed for `https://` endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's client-certificate
    /// authentication (`--client-cert-auth`); both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            host: None,
            prefix: "/vtpmd".to_owned(),
            lease_ttl_s: 10,
            replicate_interval_ms: 1000,
            timeout_ms: 3000,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl ClusterSection {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: String| ConfigError::Invalid {
            section: "cluster",
            key,
            why,
        };
        let mut tls = false;
        for endpoint in &self.endpoints {
            let rest = if let Some(rest) = endpoint.strip_prefix("https://") {
                tls = true;
                rest
            } else if let Some(rest) = endpoint.strip_prefix("http://") {
                rest
            } else {
                return Err(invalid(
                    "endpoints",
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                ));
            };
            let port = rest
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0 && !host.contains('/'))
            {
                return Err(invalid(
                    "endpoints",
                    format!(
                        "{endpoint:?} is not a URL with a host and a port, such as https://10.0.0.1:2379"
                    ),
                ));
            }
        }
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(invalid(
                "endpoints",
                "mixes http:// and https:// endpoints".to_owned(),
            ));
        }
        if !self.enabled() {
            return Ok(());
        }
        if let Some(host) = &self.host {
            crate::cluster::check_host_name(host).map_err(|why| invalid("host", why))?;
        }
        crate::cluster::check_prefix(&self.prefix).map_err(|why| invalid("prefix", why))?;
        if !(2..=300).contains(&self.lease_ttl_s) {
            return Err(invalid(
                "lease_ttl_s",
                format!("{} is not between 2 and 300", self.lease_ttl_s),
            ));
        }
        if self.replicate_interval_ms > 60_000 {
            return Err(invalid(
                "replicate_interval_ms",
                format!("{} is above 60000", self.replicate_interval_ms),
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err(invalid(
                "timeout_ms",
                format!("{} is not between 1 and 60000", self.timeout_ms),
            ));
        }
        for (key, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(invalid(key, "must be an absolute path".to_owned()));
            }
            if path.is_some() && !tls {
                return Err(invalid(
                    key,
                    "is for https:// endpoints; these are http://".to_owned(),
                ));
            }
        }
        if tls && self.ca_file.is_none() {
            return Err(invalid(
                "ca_file",
                "https:// endpoints need the CA that signed the etcd servers' certificates"
                    .to_owned(),
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid(
                "cert_file",
                "cert_file and key_file go together".to_owned(),
            ));
        }
        Ok(())
    }
}

/// `[metrics]`: where else than `GetMetrics` vtpmd's metrics are offered.
/// Neither is on by default: the API's own call needs no network and no
/// file outside vtpmd's directories.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// An HTTP listener serving `/metrics`, e.g. "127.0.0.1:9464": a
    /// loopback address only. Under systemd it needs the drop-in
    /// `vtpmd-metrics-http.conf` (the unit has `PrivateNetwork=yes`).
    pub listen: Option<String>,
    /// A node_exporter textfile-collector file (its name ending `.prom`),
    /// rewritten atomically every `textfile_interval_s`. Under systemd the
    /// directory must be writable for vtpmd (`ReadWritePaths=` drop-in).
    pub textfile: Option<PathBuf>,
    /// Seconds between textfile writes (default 15).
    pub textfile_interval_s: u64,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            listen: None,
            textfile: None,
            textfile_interval_s: 15,
        }
    }
}

impl MetricsSection {
    /// The listen address, checked.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(text) = &self.listen else {
            return Ok(None);
        };
        let addr: std::net::SocketAddr = text.parse().map_err(|_| ConfigError::Invalid {
            section: "metrics",
            key: "listen",
            why: format!("{text:?} is not an address:port such as 127.0.0.1:9464"),
        })?;
        if !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                section: "metrics",
                key: "listen",
                why: format!(
                    "{addr} is not a loopback address: metrics are served on this host only"
                ),
            });
        }
        Ok(Some(addr))
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if let Some(path) = &self.textfile {
            let named_prom = path.extension().is_some_and(|e| e == "prom");
            if !path.is_absolute() || !named_prom {
                return Err(ConfigError::Invalid {
                    section: "metrics",
                    key: "textfile",
                    why: format!(
                        "{} must be an absolute path ending in .prom (node_exporter reads only those)",
                        path.display()
                    ),
                });
            }
        }
        if self.textfile_interval_s == 0 {
            return Err(ConfigError::Invalid {
                section: "metrics",
                key: "textfile_interval_s",
                why: "must be at least 1".to_owned(),
            });
        }
        Ok(())
    }
}

/// `[supervisor]`: where guests live and how their swtpm runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorSection {
    /// Persistent root: sealed files under `guests/<uuid>/`, the local CA
    /// under `ca/` (default `/var/lib/vtpmd`).
    pub state_dir: PathBuf,
    /// RAM root for swtpm's state directories and control sockets
    /// (default `/run/vtpmd`); short, so that socket paths stay under 108
    /// bytes, and without commas.
    pub runtime_dir: PathBuf,
    /// Permission bits of each control socket, in octal (default `"0660"`).
    pub socket_mode: String,
    /// Group of each control socket: the VMM's (`kvm`, `libvirt-qemu`).
    /// Default: vtpmd's own group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// The uids each guest's swtpm gets one of (gid = uid), `"N-M"`.
    /// Default when vtpmd runs as root: `"1879048192-1879113727"`
    /// (0x70000000 + 64 Ki, a range nothing else hands out); ignored
    /// otherwise (swtpm then runs as vtpmd's user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swtpm_uid_range: Option<String>,
    /// SIGTERM to SIGKILL on Stop, milliseconds (default 5000).
    pub stop_grace_ms: u64,
    /// How long swtpm's writes are gathered into one reseal, milliseconds
    /// (default 5).
    pub reseal_coalesce_ms: u64,
    /// Argon2 derivations at once; 0 (default) = min(cores, available
    /// memory / (2 x argon2_memory_kib)), at least 1.
    pub kdf_parallelism: usize,
    /// How long an operation waits for its guest's previous one before
    /// answering Busy, milliseconds (default 30000).
    pub lock_wait_ms: u64,
    /// PCR banks of new TPM 2.0 guests (default `sha256`).
    pub pcr_banks: String,
    /// Size of the tmpfs each guest's runtime directory gets, MiB (default
    /// 8; at most 1024): a guest that fills its own cannot starve the
    /// others. Needs systemd (a transient mount unit); 0 = all guests
    /// share the runtime directory's file system.
    pub runtime_space_mib: u64,
}

impl Default for SupervisorSection {
    fn default() -> Self {
        Self {
            state_dir: crate::paths::Env::current().state_dir(),
            runtime_dir: crate::paths::Env::current().runtime_dir(),
            socket_mode: "0660".to_owned(),
            socket_group: None,
            swtpm_uid_range: None,
            stop_grace_ms: 5000,
            reseal_coalesce_ms: 5,
            kdf_parallelism: 0,
            lock_wait_ms: 30_000,
            pcr_banks: "sha256".to_owned(),
            runtime_space_mib: crate::supervisor::DEFAULT_RUNTIME_SPACE_MIB,
        }
    }
}

impl SupervisorSection {
    /// `socket_mode` as permission bits: 3 or 4 octal digits, at most 0777.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let text = &self.socket_mode;
        let bits = (matches!(text.len(), 3 | 4)
            && text.bytes().all(|b| (b'0'..=b'7').contains(&b)))
        .then(|| u32::from_str_radix(text, 8).ok())
        .flatten()
        .filter(|bits| bits & !0o777 == 0);
        bits.ok_or_else(|| ConfigError::Invalid {
            section: "supervisor",
            key: "socket_mode",
            why: format!("{text:?} is not octal permission bits such as \"0660\""),
        })
    }
}

/// `[api]`: the Varlink socket and who may use it. Root may always call
/// everything.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// The socket (default `<runtime_dir>/vtpmd.sock`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Members may call every method (default: nobody but root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_group: Option<String>,
    /// Members may call GetCapabilities, GetHostKey, Status, List and Monitor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly_group: Option<String>,
    /// The largest message accepted, bytes (default 65536).
    pub max_message_bytes: usize,
    /// The largest sealed file Export hands out and Import takes, bytes
    /// (default 1048576; at most 16778197, the format's limit). A TPM 2.0
    /// of libtpms 0.9 with every NV byte in use seals to about 140 KiB.
    /// An admin's Import may exceed max_message_bytes by its base64 (4/3
    /// of it), all of it in locked memory while it is received.
    pub max_sealed_bytes: usize,
    /// Connections served at once (default 128); more are refused with
    /// `TooManyConnections`.
    pub max_connections: usize,
    /// Of `max_connections`, how many only root and the admin group may
    /// use (default 16), so that other local users cannot lock them out.
    /// Must be below `max_connections`.
    pub reserved_connections: usize,
    /// Connections one uid other than root's or the admin group's may hold
    /// at once (default 16).
    pub max_connections_per_uid: usize,
    /// A connection of a caller who may do nothing but introspection ends
    /// this long after it was accepted, however busy, milliseconds
    /// (default 5000).
    pub stranger_lifetime_ms: u64,
    /// A connection silent this long is closed, milliseconds (default 30000).
    pub idle_timeout_ms: u64,
    /// A call answers within this, milliseconds, even if its operation
    /// goes on (default 120000).
    pub request_timeout_ms: u64,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            socket: None,
            admin_group: None,
            readonly_group: None,
            max_message_bytes: 64 * 1024,
            max_sealed_bytes: 1024 * 1024,
            max_connections: 128,
            reserved_connections: 16,
            max_connections_per_uid: 16,
            stranger_lifetime_ms: 5000,
            idle_timeout_ms: 30_000,
            request_timeout_ms: 120_000,
        }
    }
}

/// `[log]`: how many lines each source that others drive may log (a local
/// user's denied or refused calls, per uid; a guest's swtpm output, per
/// guest): `burst` at once, then `per_minute`. What is dropped is counted
/// and reported ("suppressed N messages from SOURCE"); vtpmd's own events
/// and root's calls are never limited.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Lines a source may log at once (default 20).
    pub burst: u32,
    /// Lines a source may log per minute after its burst (default 60).
    pub per_minute: u32,
}

impl Default for LogSection {
    fn default() -> Self {
        let rate = crate::log_limit::Rate::default();
        Self {
            burst: rate.burst,
            per_minute: rate.per_minute,
        }
    }
}

impl LogSection {
    pub fn rate(&self) -> crate::log_limit::Rate {
        crate::log_limit::Rate {
            burst: self.burst,
            per_minute: self.per_minute,
        }
    }
}

/// `[swtpm]`: where the swtpm programs are. Each defaults to the program
/// found on vtpmd's `PATH` (else `/usr/bin/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwtpmSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swtpm: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swtpm_setup: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swtpm_localca: Option<PathBuf>,
}

/// `[vault]`: how sealed state files are protected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// Argon2id memory per key derivation, KiB (default 65536 = 64 MiB,
    /// RFC 9106's second recommended option).
    pub argon2_memory_kib: u32,
    /// Argon2id passes (default 3).
    pub argon2_iterations: u32,
    /// Argon2id lanes (default 4).
    pub argon2_lanes: u32,
    /// Accept parameters below OWASP's floor (m = 19 MiB, t = 2), for tests
    /// and very small hosts. Default false; a warning is logged when used.
    pub allow_weak_kdf: bool,
}

impl Default for VaultConfig {
    fn default() -> Self {
        let params = KdfParams::default();
        Self {
            argon2_memory_kib: params.memory_kib(),
            argon2_iterations: params.iterations(),
            argon2_lanes: params.lanes(),
            allow_weak_kdf: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("[vault] Argon2id parameters are invalid")]
    Kdf(#[source] KdfParamsError),
    #[error(
        "[vault] Argon2id parameters {params} are below OWASP's floor; set allow_weak_kdf = true to accept them"
    )]
    WeakKdf { params: KdfParams },
    #[error(
        "[api] reserved_connections = {reserved} leaves no connection for anyone but root and the admin group: it must be below max_connections = {max}"
    )]
    ReservedNotBelowMax { reserved: usize, max: usize },
    #[error("[{section}] {key}: {why}")]
    Invalid {
        section: &'static str,
        key: &'static str,
        why: String,
    },
}

/// The largest config file read; a config is a few hundred bytes.
const MAX_CONFIG_LEN: u64 = 1024 * 1024;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read_err)?
            .take(MAX_CONFIG_LEN)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Self::parse(path, &text)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            source: Box::new(e),
        })?;
        config.kdf_policy()?;
        config.check_supervisor()?;
        config.check_api_and_log()?;
        config.metrics.check()?;
        config.cluster.check()?;
        Ok(config)
    }

    /// The `[supervisor]` and `[swtpm]` rules that need no I/O.
    fn check_supervisor(&self) -> Result<(), ConfigError> {
        let s = &self.supervisor;
        let invalid = |section, key, why: &str| ConfigError::Invalid {
            section,
            key,
            why: why.to_owned(),
        };
        for (key, path) in [("state_dir", &s.state_dir), ("runtime_dir", &s.runtime_dir)] {
            if !path.is_absolute() {
                return Err(invalid("supervisor", key, "must be an absolute path"));
            }
        }
        s.socket_mode_bits()?;
        if let Some(range) = &s.swtpm_uid_range {
            crate::supervisor::UidRange::parse(range)
                .map_err(|why| invalid("supervisor", "swtpm_uid_range", &why))?;
        }
        crate::swtpm::provision::PcrBanks::parse(&s.pcr_banks)
            .map_err(|e| invalid("supervisor", "pcr_banks", &e.to_string()))?;
        let w = &self.swtpm;
        for (key, path) in [
            ("swtpm", &w.swtpm),
            ("swtpm_setup", &w.swtpm_setup),
            ("swtpm_localca", &w.swtpm_localca),
        ] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(invalid("swtpm", key, "must be an absolute path"));
            }
        }
        Ok(())
    }

    /// The quotas must leave room for everyone: root and the admin group
    /// their reserve, every other uid at least one connection.
    fn check_api_and_log(&self) -> Result<(), ConfigError> {
        let a = &self.api;
        if a.reserved_connections >= a.max_connections {
            return Err(ConfigError::ReservedNotBelowMax {
                reserved: a.reserved_connections,
                max: a.max_connections,
            });
        }
        let at_least_one = |section, key, value: u64| {
            if value == 0 {
                Err(ConfigError::Invalid {
                    section,
                    key,
                    why: "must be at least 1".to_owned(),
                })
            } else {
                Ok(())
            }
        };
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        at_least_one(
            "api",
            "max_connections_per_uid",
            wide(a.max_connections_per_uid),
        )?;
        at_least_one("api", "stranger_lifetime_ms", a.stranger_lifetime_ms)?;
        if !(1..=crate::vault::MAX_SEALED_FILE_LEN).contains(&a.max_sealed_bytes) {
            return Err(ConfigError::Invalid {
                section: "api",
                key: "max_sealed_bytes",
                why: format!(
                    "{} is not within 1..={}, the largest a sealed file can be",
                    a.max_sealed_bytes,
                    crate::vault::MAX_SEALED_FILE_LEN
                ),
            });
        }
        at_least_one("log", "burst", u64::from(self.log.burst))?;
        at_least_one("log", "per_minute", u64::from(self.log.per_minute))?;
        Ok(())
    }

    /// The vault's KDF policy; refuses weak parameters unless allowed, so a
    /// bad config fails at start-up rather than at the first Create.
    pub fn kdf_policy(&self) -> Result<KdfPolicy, ConfigError> {
        let v = &self.vault;
        let params = KdfParams::new(v.argon2_memory_kib, v.argon2_iterations, v.argon2_lanes)
            .map_err(ConfigError::Kdf)?;
        if params.is_weak() && !v.allow_weak_kdf {
            return Err(ConfigError::WeakKdf { params });
        }
        Ok(KdfPolicy {
            params,
            allow_weak: v.allow_weak_kdf,
        })
    }

    /// The effective configuration as TOML, for `--check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// For the fuzzer: `bytes` as a config file. Never panics; a config that
/// parses renders (as `--check-config` prints it) to TOML that parses back
/// to the same config.
#[doc(hidden)]
pub fn fuzz_config(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let Ok(config) = Config::parse(Path::new("fuzz.toml"), text) else {
        return false;
    };
    let rendered = config.to_toml();
    let again = Config::parse(Path::new("rendered.toml"), &rendered);
    assert_eq!(again.ok().as_ref(), Some(&config), "{rendered}");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.kdf_policy().unwrap(), KdfPolicy::default());
    }

    #[test]
    fn the_rendered_default_parses_back_to_itself() {
        let config = Config::default();
        assert_eq!(parse(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(matches!(
            parse("[vault]\nargon2_memroy_kib = 1\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(parse("[vualt]\n"), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn weak_parameters_need_allow_weak_kdf() {
        let weak = "[vault]\nargon2_memory_kib = 1024\nargon2_iterations = 1\nargon2_lanes = 1\n";
        assert!(matches!(parse(weak), Err(ConfigError::WeakKdf { .. })));
        let allowed = parse(&format!("{weak}allow_weak_kdf = true\n")).unwrap();
        assert!(allowed.kdf_policy().unwrap().allow_weak);
    }

    #[test]
    fn supervisor_keys_are_checked() {
        let ok = parse(
            "[supervisor]\nruntime_dir = \"/run/v\"\nsocket_mode = \"0600\"\nsocket_group = \"kvm\"\n",
        )
        .unwrap();
        assert_eq!(ok.supervisor.socket_mode_bits().unwrap(), 0o600);
        assert_eq!(ok.supervisor.socket_group.as_deref(), Some("kvm"));
        assert_eq!(parse(&ok.to_toml()).unwrap(), ok);
        for bad in [
            "[supervisor]\nstate_dir = \"relative\"\n",
            "[supervisor]\nsocket_mode = \"4777\"\n",
            "[supervisor]\nsocket_mode = \"0x1ff\"\n",
            "[supervisor]\nsocket_mode = \"0668\"\n",
            "[supervisor]\npcr_banks = \"md5\"\n",
            "[supervisor]\nswtpm_uid_range = \"0-100\"\n",
            "[supervisor]\nswtpm_uid_range = \"100\"\n",
            "[swtpm]\nswtpm = \"swtpm\"\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ConfigError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("[supervisor]\nstate_dri = \"/x\"\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn quotas_must_leave_room_for_everyone() {
        let ok = parse(
            "[api]\nmax_connections = 8\nreserved_connections = 7\nmax_connections_per_uid = 1\nstranger_lifetime_ms = 1\n[log]\nburst = 1\nper_minute = 1\n",
        )
        .unwrap();
        assert_eq!(ok.api.reserved_connections, 7);
        assert_eq!(parse(&ok.to_toml()).unwrap(), ok);
        for (reserved, max) in [(8, 8), (16, 8), (16, 0)] {
            let text =
                format!("[api]\nmax_connections = {max}\nreserved_connections = {reserved}\n");
            match parse(&text) {
                Err(ConfigError::ReservedNotBelowMax {
                    reserved: r,
                    max: m,
                }) => {
                    assert_eq!((r, m), (reserved, max));
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("[api]\nmax_connections = 16\n"),
            Err(ConfigError::ReservedNotBelowMax { .. })
        ));
        for bad in [
            "[api]\nmax_connections_per_uid = 0\n",
            "[api]\nstranger_lifetime_ms = 0\n",
            "[log]\nburst = 0\n",
            "[log]\nper_minute = 0\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ConfigError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("[log]\nbrust = 1\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn out_of_range_parameters_are_refused() {
        assert!(matches!(
            parse("[vault]\nargon2_lanes = 0\n"),
            Err(ConfigError::Kdf(_))
        ));
        assert!(matches!(
            parse("[vault]\nargon2_iterations = -1\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn cluster_settings_are_checked_before_anything_connects() {
        assert!(!parse("").unwrap().cluster.enabled());
        let ok = parse(
            "[cluster]\nendpoints = [\"https://10.0.0.1:2379\", \"https://etcd-2:2379\"]\nhost = \"compute-7\"\nca_file = \"/etc/vtpmd/etcd-ca.pem\"\ncert_file = \"/etc/vtpmd/c.pem\"\nkey_file = \"/etc/vtpmd/k.pem\"\n",
        )
        .unwrap();
        assert!(ok.cluster.enabled());
        assert_eq!(parse(&ok.to_toml()).unwrap(), ok);
        let base = "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\n";
        for (bad, key) in [
            ("[cluster]\nendpoints = [\"127.0.0.1:2379\"]\n", "endpoints"),
            (
                "[cluster]\nendpoints = [\"http://127.0.0.1\"]\n",
                "endpoints",
            ),
            ("[cluster]\nendpoints = [\"http://:2379\"]\n", "endpoints"),
            (
                "[cluster]\nendpoints = [\"http://a:1\", \"https://b:2\"]\nca_file = \"/ca\"\n",
                "endpoints",
            ),
            ("[cluster]\nendpoints = [\"https://a:1\"]\n", "ca_file"),
            (&format!("{base}host = \"a b\"\n"), "host"),
            (&format!("{base}prefix = \"vtpmd/\"\n"), "prefix"),
            (&format!("{base}lease_ttl_s = 1\n"), "lease_ttl_s"),
            (&format!("{base}lease_ttl_s = 301\n"), "lease_ttl_s"),
            (
                &format!("{base}replicate_interval_ms = 60001\n"),
                "replicate_interval_ms",
            ),
            (&format!("{base}timeout_ms = 0\n"), "timeout_ms"),
            (&format!("{base}ca_file = \"/ca\"\n"), "ca_file"),
            (
                "[cluster]\nendpoints = [\"https://a:1\"]\nca_file = \"/ca\"\ncert_file = \"/c\"\n",
                "cert_file",
            ),
            (
                "[cluster]\nendpoints = [\"https://a:1\"]\nca_file = \"ca.pem\"\n",
                "ca_file",
            ),
        ] {
            match parse(bad) {
                Err(ConfigError::Invalid {
                    section: "cluster",
                    key: k,
                    ..
                }) => assert_eq!(k, key, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
