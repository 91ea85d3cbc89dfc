//! [`SupervisorConfig`]: everything the supervisor needs, with defaults,
//! and its derivation from the TOML [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use nix::unistd::{Gid, Group};

use crate::config::Config;
use crate::swtpm::probe::Binaries;
use crate::swtpm::provision::PcrBanks;
use crate::vault::KdfPolicy;

use super::SupervisorError;
use super::uids::UidRange;

/// The supervisor's settings. Build with [`SupervisorConfig::new`] (the
/// documented defaults) or [`SupervisorConfig::from_config`].
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Sealed files: `<state_dir>/guests/<uuid>/tpm.sealed` (+ `.prev`);
    /// local CA: `<state_dir>/ca`.
    pub state_dir: PathBuf,
    /// RAM (`/run/vtpmd` in production): `<runtime_dir>/<uuid>/` is swtpm's
    /// state dir (0770, vtpmd and the guest's group),
    /// `<runtime_dir>/<uuid>.sock` its control socket.
    pub runtime_dir: PathBuf,
    pub kdf: KdfPolicy,
    pub binaries: Binaries,
    pub pcr_banks: PcrBanks,
    /// Default 0o660.
    pub socket_mode: u32,
    /// The VMM's group; `None` = vtpmd's.
    pub socket_group: Option<Gid>,
    /// Each guest's swtpm runs as its own uid (gid = uid) from this range;
    /// `None` runs every swtpm as vtpmd's user, the only choice when vtpmd
    /// is not root. Default: [`UidRange::DEFAULT`] when root, else `None`.
    pub swtpm_uids: Option<UidRange>,
    /// SIGTERM → SIGKILL, default 5 s.
    pub stop_grace: Duration,
    /// Default 5 ms.
    pub reseal_coalesce: Duration,
    /// Argon2 semaphore permits; default: min(cores, MemAvailable / (kdf
    /// memory × 2)), at least 1.
    pub kdf_parallelism: usize,
    /// How long an operation waits for its guest's lock before Busy,
    /// default 30 s.
    pub lock_wait: Duration,
    /// Bytes of the tmpfs each guest's runtime directory gets (under
    /// systemd); `None` = all share the runtime directory's file system.
    /// Default 8 MiB.
    pub runtime_space: Option<u64>,
    /// How many of each swtpm's output lines go to the log (all are kept
    /// in its tail); default 20 at once, 60 a minute.
    pub log_rate: crate::log_limit::Rate,
    /// Cluster mode: etcd and this host's name in it; `None` (the
    /// default) is local mode.
    pub cluster: Option<ClusterSetup>,
}

/// `[cluster]` with the host name settled.
#[derive(Debug, Clone)]
pub struct ClusterSetup {
    pub section: crate::config::ClusterSection,
    pub host: String,
}

impl SupervisorConfig {
    /// The defaults for these two roots.
    pub fn new(state_dir: impl Into<PathBuf>, runtime_dir: impl Into<PathBuf>) -> Self {
        let kdf = KdfPolicy::default();
        Self {
            state_dir: state_dir.into(),
            runtime_dir: runtime_dir.into(),
            kdf,
            binaries: Binaries::default(),
            pcr_banks: PcrBanks::default(),
            socket_mode: 0o660,
            socket_group: None,
            swtpm_uids: nix::unistd::geteuid()
                .is_root()
                .then_some(UidRange::DEFAULT),
            stop_grace: Duration::from_secs(5),
            reseal_coalesce: Duration::from_millis(5),
            kdf_parallelism: default_kdf_parallelism(&kdf),
            lock_wait: Duration::from_secs(30),
            runtime_space: Some(DEFAULT_RUNTIME_SPACE_MIB << 20),
            log_rate: crate::log_limit::Rate::default(),
            cluster: None,
        }
    }

    /// From the TOML configuration; user and group names are looked up
    /// here (the only I/O).
    pub fn from_config(config: &Config) -> Result<Self, SupervisorError> {
        let bad = |what: String| SupervisorError::Config { what };
        let s = &config.supervisor;
        let kdf = config.kdf_policy().map_err(|e| bad(e.to_string()))?;
        let mut out = Self::new(&s.state_dir, &s.runtime_dir);
        out.kdf = kdf;
        out.kdf_parallelism = match s.kdf_parallelism {
            0 => default_kdf_parallelism(&kdf),
            n => n,
        };
        let defaults = Binaries::default();
        out.binaries = Binaries {
            swtpm: config.swtpm.swtpm.clone().unwrap_or(defaults.swtpm),
            swtpm_setup: config
                .swtpm
                .swtpm_setup
                .clone()
                .unwrap_or(defaults.swtpm_setup),
            swtpm_localca: config
                .swtpm
                .swtpm_localca
                .clone()
                .unwrap_or(defaults.swtpm_localca),
        };
        out.pcr_banks = PcrBanks::parse(&s.pcr_banks).map_err(|e| bad(e.to_string()))?;
        out.socket_mode = s.socket_mode_bits().map_err(|e| bad(e.to_string()))?;
        out.socket_group = match &s.socket_group {
            None => None,
            Some(name) => Some(
                Group::from_name(name)
                    .map_err(|e| bad(format!("cannot look up group {name:?}: {e}")))?
                    .ok_or_else(|| bad(format!("socket_group {name:?} does not exist")))?
                    .gid,
            ),
        };
        if let Some(text) = &s.swtpm_uid_range {
            let range =
                UidRange::parse(text).map_err(|why| bad(format!("swtpm_uid_range: {why}")))?;
            out.swtpm_uids = Some(range);
        }
        out.stop_grace = Duration::from_millis(s.stop_grace_ms);
        out.reseal_coalesce = Duration::from_millis(s.reseal_coalesce_ms);
        out.lock_wait = Duration::from_millis(s.lock_wait_ms);
        out.runtime_space = match s.runtime_space_mib {
            0 => None,
            mib if mib > MAX_RUNTIME_SPACE_MIB => {
                return Err(bad(format!(
                    "runtime_space_mib {mib} is more than {MAX_RUNTIME_SPACE_MIB} (a guest's state is far smaller)"
                )));
            }
            mib => Some(mib << 20),
        };
        out.log_rate = config.log.rate();
        if config.cluster.enabled() {
            let host = match &config.cluster.host {
                Some(host) => host.clone(),
                None => {
                    let name = nix::unistd::gethostname().map_err(|e| {
                        bad(format!(
                            "cannot read this machine's hostname for [cluster] host: {e}"
                        ))
                    })?;
                    let name = name.to_string_lossy().into_owned();
                    crate::cluster::check_host_name(&name).map_err(|why| {
                        bad(format!(
                            "[cluster] host: this machine's hostname: {why}; set host"
                        ))
                    })?;
                    name
                }
            };
            out.cluster = Some(ClusterSetup {
                section: config.cluster.clone(),
                host,
            });
        }
        Ok(out)
    }
}

/// A TPM 2.0 state with full NVRAM is well under 1 MiB (libtpms'
/// permanent state, the volatile state of a suspend, the `.lock`); a
/// swtpm rewrites a file through a temporary copy, so twice that must fit.
pub const DEFAULT_RUNTIME_SPACE_MIB: u64 = 8;

/// Beyond this a bound would bound nothing a guest needs.
const MAX_RUNTIME_SPACE_MIB: u64 = 1024;

/// min(cores, MemAvailable / (2 × Argon2 memory)), at least 1.
pub fn default_kdf_parallelism(kdf: &KdfPolicy) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per_derivation_kib = u64::from(kdf.params.memory_kib()).saturating_mul(2).max(1);
    let by_memory = mem_available_kib()
        .map(|avail| usize::try_from(avail / per_derivation_kib).unwrap_or(usize::MAX))
        .unwrap_or(cores);
    cores.min(by_memory).max(1)
}

/// `MemAvailable` from `/proc/meminfo`, KiB.
fn mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mem_available_is_read_in_kib() {
        let text = "MemTotal:       24684360 kB\nMemFree:  1 kB\nMemAvailable:   24302572 kB\n";
        assert_eq!(parse_mem_available(text), Some(24_302_572));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn kdf_parallelism_is_at_least_one() {
        let kdf = KdfPolicy {
            params: crate::vault::KdfParams::new(4 * 1024 * 1024, 1, 1).unwrap(),
            allow_weak: true,
        };
        assert!(default_kdf_parallelism(&kdf) >= 1);
    }

    #[test]
    fn the_toml_defaults_are_the_documented_ones() {
        let c = SupervisorConfig::from_config(&Config::default()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/vtpmd"));
        assert_eq!(c.runtime_dir, PathBuf::from("/run/vtpmd"));
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.stop_grace, Duration::from_secs(5));
        assert_eq!(c.reseal_coalesce, Duration::from_millis(5));
        assert_eq!(c.lock_wait, Duration::from_secs(30));
        assert!(c.kdf_parallelism >= 1);
        assert!(c.socket_group.is_none());
        let expected = nix::unistd::geteuid()
            .is_root()
            .then_some(UidRange::DEFAULT);
        assert_eq!(c.swtpm_uids, expected);
    }

    #[test]
    fn a_configured_uid_range_is_used() {
        let mut config = Config::default();
        config.supervisor.swtpm_uid_range = Some("70000-70099".to_owned());
        let c = SupervisorConfig::from_config(&config).unwrap();
        assert_eq!(c.swtpm_uids, Some(UidRange::new(70000, 70099).unwrap()));
    }
}
