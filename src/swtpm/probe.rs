//! Finding swtpm and swtpm_setup and what this host can serve with them.
//!
//! At start-up vtpmd runs `swtpm socket --print-capabilities` (once more
//! with `--tpm2` for the RSA key sizes) and `swtpm_setup --print-capabilities`
//! and turns their JSON into a [`HostSupport`]: the TPM versions it can
//! provision *and* run, the features vtpmd relies on, and the traits a
//! scheduler (Nova) should see. A missing binary, one that is too old, or
//! one that lacks a feature in [`REQUIRED_SWTPM_FEATURES`] /
//! [`REQUIRED_SETUP_FEATURES`] is a start-up error naming the package to
//! install. Every run has a deadline ([`PROBE_TIMEOUT`]): a hung binary
//! cannot hang start-up.
//!
//! Parsing ([`parse_capabilities`], [`HostSupport::from_capabilities`]) is
//! kept apart from running the processes, so it is unit-tested with the
//! exact output of swtpm 0.7.1.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;

use super::run::{self, RunError};
use crate::protocol::TpmVersion;

/// How long one `--print-capabilities` run may take. 0.7.1 answers in a
/// few milliseconds (swtpm_setup runs swtpm twice for its answer).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The oldest swtpm vtpmd accepts. 0.7.0 is the first release whose
/// `--print-capabilities` reports a version and the TPM versions
/// (`tpm-1.2`, `tpm-2.0`), and whose swtpm_setup is the C rewrite whose
/// behaviour (config lookup, `--keyfile-fd`, `--config`) vtpmd relies on.
pub const MIN_SWTPM_VERSION: (u32, u32, u32) = (0, 7, 0);

/// swtpm features without which vtpmd cannot work:
/// - `cmdarg-key-fd`: the state key reaches swtpm through a pipe
///   (`--key fd=N`), never a file or argv.
/// - `nvram-backend-dir`: the state lives in a private directory
///   (`--tpmstate dir=…`) that vtpmd archives and seals.
/// - `flags-opt-startup`: `--flags not-need-init,startup-clear`, to run a
///   TPM without a VMM (health checks, tests).
///
/// `cmdarg-seccomp` is optional: it is reported ([`HostSupport::seccomp`])
/// and used when present.
pub const REQUIRED_SWTPM_FEATURES: &[&str] =
    &["cmdarg-key-fd", "nvram-backend-dir", "flags-opt-startup"];

/// swtpm_setup features without which vtpmd cannot provision:
/// - `cmdarg-keyfile-fd`: the state is encrypted from its first byte with a
///   key handed over through a pipe (`--keyfile-fd N`).
pub const REQUIRED_SETUP_FEATURES: &[&str] = &["cmdarg-keyfile-fd"];

/// The Debian/Ubuntu package of swtpm.
pub const SWTPM_PACKAGE: &str = "swtpm";
/// The Debian/Ubuntu package of swtpm_setup, swtpm_localca and swtpm_cert.
pub const SWTPM_TOOLS_PACKAGE: &str = "swtpm-tools";
/// The Debian/Ubuntu package of `certtool`, which swtpm_localca runs to
/// create its CA.
pub const CERTTOOL_PACKAGE: &str = "gnutls-bin";

/// What the children of vtpmd get as `PATH`, after the directories of the
/// configured binaries. swtpm_localca finds `certtool` and `swtpm_cert`
/// through it.
const DEFAULT_CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the swtpm programs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub swtpm: PathBuf,
    pub swtpm_setup: PathBuf,
    /// The certificate tool swtpm_setup runs for EK and platform
    /// certificates (from swtpm-tools, like swtpm_setup).
    pub swtpm_localca: PathBuf,
}

impl Default for Binaries {
    /// Each program as found on vtpmd's `PATH`, else under `/usr/bin` (where
    /// the probe will then report it missing).
    fn default() -> Self {
        Self {
            swtpm: find_program("swtpm"),
            swtpm_setup: find_program("swtpm_setup"),
            swtpm_localca: find_program("swtpm_localca"),
        }
    }
}

impl Binaries {
    /// `PATH` for swtpm_setup and its helpers: the directories of the
    /// configured binaries, then the usual system directories.
    pub(crate) fn child_path(&self) -> OsString {
        let mut dirs: Vec<&OsStr> = Vec::new();
        for bin in [&self.swtpm, &self.swtpm_setup, &self.swtpm_localca] {
            if let Some(dir) = bin.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dirs.contains(&dir.as_os_str()) {
                    dirs.push(dir.as_os_str());
                }
            }
        }
        let mut path = OsString::new();
        for dir in dirs {
            path.push(dir);
            path.push(":");
        }
        path.push(DEFAULT_CHILD_PATH);
        path
    }

    /// swtpm_setup's `--tpm` argument: it splits the value at spaces, so
    /// the path must not contain any.
    pub(crate) fn swtpm_for_setup(&self) -> Result<OsString, ProbeError> {
        if self
            .swtpm
            .as_os_str()
            .as_bytes()
            .iter()
            .any(u8::is_ascii_whitespace)
        {
            return Err(ProbeError::UnusablePath {
                binary: self.swtpm.clone(),
                why: "swtpm_setup splits its --tpm argument at whitespace",
            });
        }
        let mut arg = self.swtpm.as_os_str().to_owned();
        arg.push(" socket");
        Ok(arg)
    }
}

fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_CHILD_PATH.into());
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| Path::new("/usr/bin").join(name))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One binary's `--print-capabilities` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// `"swtpm"` or `"swtpm_setup"`.
    pub kind: String,
    pub features: BTreeSet<String>,
    /// Absent before 0.7.0.
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilitiesError {
    #[error("not the expected JSON object: {0}")]
    Json(String),
    #[error("it describes a {found:?}, not a {expected:?}")]
    WrongType { expected: String, found: String },
}

#[derive(Deserialize)]
struct RawCapabilities {
    #[serde(rename = "type")]
    kind: String,
    features: Vec<String>,
    version: Option<String>,
}

/// Parses a `--print-capabilities` answer of the program `expected_type`
/// (`"swtpm"` or `"swtpm_setup"`). Unknown members are ignored: newer
/// versions add some.
pub fn parse_capabilities(
    expected_type: &str,
    json: &[u8],
) -> Result<Capabilities, CapabilitiesError> {
    let raw: RawCapabilities =
        serde_json::from_slice(json).map_err(|e| CapabilitiesError::Json(e.to_string()))?;
    if raw.kind != expected_type {
        return Err(CapabilitiesError::WrongType {
            expected: expected_type.to_owned(),
            found: raw.kind,
        });
    }
    Ok(Capabilities {
        kind: raw.kind,
        features: raw.features.into_iter().collect(),
        version: raw.version,
    })
}

/// What this host can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSupport {
    pub swtpm_version: String,
    pub setup_version: String,
    /// TPM versions both swtpm and swtpm_setup support, oldest first.
    pub versions: Vec<TpmVersion>,
    pub swtpm_features: BTreeSet<String>,
    pub setup_features: BTreeSet<String>,
    /// RSA key sizes of the TPM 2.0 (`rsa-keysize-N` of `swtpm --tpm2`).
    pub rsa_key_sizes: Vec<u32>,
    /// RSA EK sizes swtpm_setup can create (`tpm2-rsa-keysize-N`).
    pub ek_rsa_key_sizes: Vec<u32>,
    /// swtpm takes `--seccomp` (`cmdarg-seccomp`).
    pub seccomp: bool,
    /// Programs EK/platform certificates need that are missing, each with
    /// its package (`"certtool (gnutls-bin)"`). Empty: certificates work.
    pub missing_cert_tools: Vec<String>,
}

impl HostSupport {
    /// Turns the three capability answers into what the host can serve, or
    /// the first reason it cannot serve at all. `swtpm_tpm2` is the answer
    /// of `swtpm socket --tpm2 --print-capabilities`, absent when swtpm
    /// lacks TPM 2.0. Pure: [`probe`] does the running.
    pub fn from_capabilities(
        bins: &Binaries,
        swtpm: &Capabilities,
        swtpm_tpm2: Option<&Capabilities>,
        setup: &Capabilities,
    ) -> Result<Self, ProbeError> {
        let swtpm_version = check_version(&bins.swtpm, swtpm, SWTPM_PACKAGE)?;
        let setup_version = check_version(&bins.swtpm_setup, setup, SWTPM_TOOLS_PACKAGE)?;
        check_features(&bins.swtpm, swtpm, REQUIRED_SWTPM_FEATURES, SWTPM_PACKAGE)?;
        check_features(
            &bins.swtpm_setup,
            setup,
            REQUIRED_SETUP_FEATURES,
            SWTPM_TOOLS_PACKAGE,
        )?;

        let versions: Vec<TpmVersion> =
            [(TpmVersion::V1_2, "tpm-1.2"), (TpmVersion::V2_0, "tpm-2.0")]
                .into_iter()
                .filter(|(_, f)| swtpm.features.contains(*f) && setup.features.contains(*f))
                .map(|(v, _)| v)
                .collect();
        if versions.is_empty() {
            return Err(ProbeError::NoTpmVersion {
                swtpm: bins.swtpm.clone(),
                setup: bins.swtpm_setup.clone(),
            });
        }
        let features = swtpm_tpm2.map_or(&swtpm.features, |c| &c.features);
        Ok(Self {
            swtpm_version,
            setup_version,
            versions,
            rsa_key_sizes: numbered(features, "rsa-keysize-"),
            ek_rsa_key_sizes: numbered(&setup.features, "tpm2-rsa-keysize-"),
            seccomp: swtpm.features.contains("cmdarg-seccomp"),
            swtpm_features: swtpm.features.clone(),
            setup_features: setup.features.clone(),
            missing_cert_tools: Vec::new(),
        })
    }

    pub fn supports(&self, version: TpmVersion) -> bool {
        self.versions.contains(&version)
    }

    /// The scheduler traits this host earns (Nova's seed rule: from what
    /// the installed swtpm actually supports).
    pub fn traits(&self) -> Vec<&'static str> {
        self.versions
            .iter()
            .map(|v| match v {
                TpmVersion::V1_2 => "COMPUTE_SECURITY_TPM_1_2",
                TpmVersion::V2_0 => "COMPUTE_SECURITY_TPM_2_0",
            })
            .collect()
    }

    /// Whether EK and platform certificates can be created.
    pub fn can_create_certificates(&self) -> bool {
        self.missing_cert_tools.is_empty()
    }
}

fn check_version(
    binary: &Path,
    caps: &Capabilities,
    package: &'static str,
) -> Result<String, ProbeError> {
    let too_old = |found: &str| ProbeError::TooOld {
        binary: binary.to_owned(),
        found: found.to_owned(),
        package,
    };
    let found = caps
        .version
        .as_deref()
        .ok_or_else(|| too_old("unknown (it reports no version)"))?;
    match parse_version(found) {
        Some(v) if v >= MIN_SWTPM_VERSION => Ok(found.to_owned()),
        _ => Err(too_old(found)),
    }
}

/// `"0.7.1"` → (0, 7, 1); a suffix after the digits (`"0.8.0-rc1"`) is
/// ignored, a missing patch level is 0.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.splitn(3, '.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, patch))
}

fn check_features(
    binary: &Path,
    caps: &Capabilities,
    required: &[&'static str],
    package: &'static str,
) -> Result<(), ProbeError> {
    match required.iter().find(|f| !caps.features.contains(**f)) {
        Some(feature) => Err(ProbeError::MissingFeature {
            binary: binary.to_owned(),
            feature,
            package,
        }),
        None => Ok(()),
    }
}

fn numbered(features: &BTreeSet<String>, prefix: &str) -> Vec<u32> {
    let mut sizes: Vec<u32> = features
        .iter()
        .filter_map(|f| f.strip_prefix(prefix)?.parse().ok())
        .collect();
    sizes.sort_unstable();
    sizes
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "{binary} is missing or not executable; install package {package} (apt-get install swtpm swtpm-tools)"
    )]
    NotFound {
        binary: PathBuf,
        package: &'static str,
    },
    #[error("{binary} cannot be used: {why}")]
    UnusablePath { binary: PathBuf, why: &'static str },
    #[error("cannot run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --print-capabilities did not answer within {after:?} and was killed")]
    TimedOut { binary: PathBuf, after: Duration },
    #[error(
        "{binary} --print-capabilities failed ({status}); vtpmd needs swtpm 0.7.0 or newer (package {package}); it said: {stderr}"
    )]
    Failed {
        binary: PathBuf,
        status: ExitStatus,
        stderr: String,
        package: &'static str,
    },
    #[error("{binary} --print-capabilities answered something vtpmd cannot read: {output:?}")]
    BadCapabilities {
        binary: PathBuf,
        output: String,
        #[source]
        source: CapabilitiesError,
    },
    #[error("{binary} is version {found}; vtpmd needs 0.7.0 or newer: upgrade package {package}")]
    TooOld {
        binary: PathBuf,
        found: String,
        package: &'static str,
    },
    #[error("{binary} lacks feature {feature:?}, which vtpmd needs; upgrade package {package}")]
    MissingFeature {
        binary: PathBuf,
        feature: &'static str,
        package: &'static str,
    },
    #[error(
        "{swtpm} and {setup} have no TPM version (1.2 or 2.0) in common; libtpms may be too old"
    )]
    NoTpmVersion { swtpm: PathBuf, setup: PathBuf },
}

/// Runs the probes and returns what the host can serve. Each program runs
/// with an empty environment (bar `PATH`) and a deadline of
/// [`PROBE_TIMEOUT`].
pub fn probe(bins: &Binaries) -> Result<HostSupport, ProbeError> {
    probe_with_timeout(bins, PROBE_TIMEOUT)
}

/// [`probe`] with another deadline for each of its runs.
pub fn probe_with_timeout(bins: &Binaries, timeout: Duration) -> Result<HostSupport, ProbeError> {
    require(&bins.swtpm, SWTPM_PACKAGE)?;
    require(&bins.swtpm_setup, SWTPM_TOOLS_PACKAGE)?;
    let tpm_arg = bins.swtpm_for_setup()?;

    let swtpm = capabilities(
        bins,
        &bins.swtpm,
        &["socket"],
        "swtpm",
        SWTPM_PACKAGE,
        timeout,
    )?;
    let swtpm_tpm2 = if swtpm.features.contains("tpm-2.0") {
        Some(capabilities(
            bins,
            &bins.swtpm,
            &["socket", "--tpm2"],
            "swtpm",
            SWTPM_PACKAGE,
            timeout,
        )?)
    } else {
        None
    };
    let setup_args = [OsStr::new("--tpm"), tpm_arg.as_os_str()];
    let setup = capabilities(
        bins,
        &bins.swtpm_setup,
        &setup_args,
        "swtpm_setup",
        SWTPM_TOOLS_PACKAGE,
        timeout,
    )?;

    let mut support = HostSupport::from_capabilities(bins, &swtpm, swtpm_tpm2.as_ref(), &setup)?;
    support.missing_cert_tools = missing_cert_tools(bins);
    tracing::info!(
        swtpm = %support.swtpm_version,
        versions = ?support.versions.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        seccomp = support.seccomp,
        certificates = support.can_create_certificates(),
        "probed swtpm"
    );
    if !support.missing_cert_tools.is_empty() {
        tracing::warn!(
            missing = ?support.missing_cert_tools,
            "EK and platform certificates cannot be created"
        );
    }
    Ok(support)
}

fn require(binary: &Path, package: &'static str) -> Result<(), ProbeError> {
    if is_executable(binary) {
        Ok(())
    } else {
        Err(ProbeError::NotFound {
            binary: binary.to_owned(),
            package,
        })
    }
}

fn missing_cert_tools(bins: &Binaries) -> Vec<String> {
    let mut missing = Vec::new();
    if !is_executable(&bins.swtpm_localca) {
        missing.push(format!(
            "{} ({SWTPM_TOOLS_PACKAGE})",
            bins.swtpm_localca.display()
        ));
    }
    let path = bins.child_path();
    for (tool, package) in [
        ("swtpm_cert", SWTPM_TOOLS_PACKAGE),
        ("certtool", CERTTOOL_PACKAGE),
    ] {
        if !std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool))) {
            missing.push(format!("{tool} ({package})"));
        }
    }
    missing
}

fn capabilities<S: AsRef<OsStr>>(
    bins: &Binaries,
    binary: &Path,
    args: &[S],
    kind: &str,
    package: &'static str,
    timeout: Duration,
) -> Result<Capabilities, ProbeError> {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .arg("--print-capabilities")
        .env_clear()
        .env("PATH", bins.child_path())
        .stdin(Stdio::null());
    let done = run::run(&mut cmd, timeout, true).map_err(|err| match err {
        RunError::Spawn(source) | RunError::Wait(source) => ProbeError::Spawn {
            binary: binary.to_owned(),
            source,
        },
        RunError::TimedOut(after) => ProbeError::TimedOut {
            binary: binary.to_owned(),
            after,
        },
    })?;
    if !done.status.success() {
        return Err(ProbeError::Failed {
            binary: binary.to_owned(),
            status: done.status,
            stderr: String::from_utf8_lossy(&done.stderr).trim().to_owned(),
            package,
        });
    }
    parse_capabilities(kind, &done.stdout).map_err(|source| ProbeError::BadCapabilities {
        binary: binary.to_owned(),
        output: String::from_utf8_lossy(&done.stdout).trim().to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `swtpm socket --print-capabilities`, swtpm 0.7.1 (Debian 12).
    const SWTPM_071: &str = r#"{ "type": "swtpm", "features": [ "tpm-1.2", "tpm-2.0", "tpm-send-command-header", "flags-opt-startup", "cmdarg-seccomp", "cmdarg-key-fd", "cmdarg-pwd-fd", "cmdarg-print-states", "nvram-backend-dir", "nvram-backend-file" ], "version": "0.7.1" }
"#;
    /// `swtpm socket --tpm2 --print-capabilities`, swtpm 0.7.1.
    const SWTPM_TPM2_071: &str = r#"{ "type": "swtpm", "features": [ "tpm-1.2", "tpm-2.0", "tpm-send-command-header", "flags-opt-startup", "cmdarg-seccomp", "cmdarg-key-fd", "cmdarg-pwd-fd", "cmdarg-print-states", "nvram-backend-dir", "nvram-backend-file", "rsa-keysize-1024", "rsa-keysize-2048", "rsa-keysize-3072" ], "version": "0.7.1" }
"#;
    /// `swtpm_setup --print-capabilities`, swtpm 0.7.1.
    const SETUP_071: &str = r#"{ "type": "swtpm_setup", "features": [ "tpm-1.2", "tpm-2.0", "cmdarg-keyfile-fd", "cmdarg-pwdfile-fd", "tpm12-not-need-root", "cmdarg-write-ek-cert-files", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks", "tpm2-rsa-keysize-2048", "tpm2-rsa-keysize-3072" ], "version": "0.7.1" }
"#;
    /// `swtpm socket --print-capabilities`, swtpm 0.6.0 (no version, no
    /// TPM versions).
    const SWTPM_060: &str = r#"{ "type": "swtpm", "features": [ "tpm-send-command-header", "flags-opt-startup", "cmdarg-seccomp", "cmdarg-key-fd", "cmdarg-pwd-fd", "nvram-backend-dir", "nvram-backend-file" ] }"#;

    fn bins() -> Binaries {
        Binaries {
            swtpm: "/usr/bin/swtpm".into(),
            swtpm_setup: "/usr/bin/swtpm_setup".into(),
            swtpm_localca: "/usr/bin/swtpm_localca".into(),
        }
    }

    fn caps(kind: &str, json: &str) -> Capabilities {
        parse_capabilities(kind, json.as_bytes()).expect("parses")
    }

    fn support_071() -> Result<HostSupport, ProbeError> {
        HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", SWTPM_071),
            Some(&caps("swtpm", SWTPM_TPM2_071)),
            &caps("swtpm_setup", SETUP_071),
        )
    }

    #[test]
    fn swtpm_071_serves_both_versions_with_both_traits() {
        let support = support_071().expect("supported");
        assert_eq!(support.versions, [TpmVersion::V1_2, TpmVersion::V2_0]);
        assert!(support.supports(TpmVersion::V1_2) && support.supports(TpmVersion::V2_0));
        assert_eq!(
            support.traits(),
            ["COMPUTE_SECURITY_TPM_1_2", "COMPUTE_SECURITY_TPM_2_0"]
        );
        assert_eq!(support.swtpm_version, "0.7.1");
        assert_eq!(support.rsa_key_sizes, [1024, 2048, 3072]);
        assert_eq!(support.ek_rsa_key_sizes, [2048, 3072]);
        assert!(support.seccomp);
        assert!(support.setup_features.contains("cmdarg-keyfile-fd"));
    }

    #[test]
    fn only_versions_both_programs_support_are_served() {
        let setup = SETUP_071.replace("\"tpm-1.2\", ", "");
        let support = HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", SWTPM_071),
            None,
            &caps("swtpm_setup", &setup),
        )
        .expect("supported");
        assert_eq!(support.versions, [TpmVersion::V2_0]);
        assert_eq!(support.traits(), ["COMPUTE_SECURITY_TPM_2_0"]);
        assert!(!support.supports(TpmVersion::V1_2));
    }

    #[test]
    fn no_common_version_is_an_error() {
        let swtpm = SWTPM_071.replace("\"tpm-2.0\", ", "");
        let setup = SETUP_071.replace("\"tpm-1.2\", ", "");
        let err = HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", &swtpm),
            None,
            &caps("swtpm_setup", &setup),
        )
        .expect_err("nothing to serve");
        assert!(matches!(err, ProbeError::NoTpmVersion { .. }), "{err:?}");
    }

    #[test]
    fn swtpm_060_is_too_old_and_names_its_package() {
        let err = HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", SWTPM_060),
            None,
            &caps("swtpm_setup", SETUP_071),
        )
        .expect_err("too old");
        assert!(
            matches!(
                &err,
                ProbeError::TooOld {
                    package: "swtpm",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("0.7.0"), "{err}");
    }

    #[test]
    fn an_old_version_number_is_too_old() {
        let setup = SETUP_071.replace("0.7.1", "0.6.3");
        let err = HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", SWTPM_071),
            None,
            &caps("swtpm_setup", &setup),
        )
        .expect_err("too old");
        assert!(
            matches!(&err, ProbeError::TooOld { found, package: "swtpm-tools", .. } if found == "0.6.3"),
            "{err:?}"
        );
    }

    #[test]
    fn a_missing_required_feature_is_named() {
        let swtpm = SWTPM_071.replace("\"cmdarg-key-fd\", ", "");
        let err = HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", &swtpm),
            None,
            &caps("swtpm_setup", SETUP_071),
        )
        .expect_err("missing");
        assert!(
            matches!(
                err,
                ProbeError::MissingFeature {
                    feature: "cmdarg-key-fd",
                    package: "swtpm",
                    ..
                }
            ),
            "{err:?}"
        );
        let setup = SETUP_071.replace("\"cmdarg-keyfile-fd\", ", "");
        let err = HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", SWTPM_071),
            None,
            &caps("swtpm_setup", &setup),
        )
        .expect_err("missing");
        assert!(
            matches!(
                err,
                ProbeError::MissingFeature {
                    feature: "cmdarg-keyfile-fd",
                    package: "swtpm-tools",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn seccomp_is_optional_and_reported() {
        let swtpm = SWTPM_071.replace("\"cmdarg-seccomp\", ", "");
        let support = HostSupport::from_capabilities(
            &bins(),
            &caps("swtpm", &swtpm),
            None,
            &caps("swtpm_setup", SETUP_071),
        )
        .expect("supported");
        assert!(!support.seccomp);
        assert!(support.rsa_key_sizes.is_empty());
    }

    #[test]
    fn malformed_answers_are_rejected() {
        for bad in [
            "",
            "{",
            "TPM emulator version 0.7.1",
            r#"{ "type": "swtpm" }"#,
            r#"{ "type": "swtpm", "features": "tpm-2.0" }"#,
            r#"{ "type": "swtpm", "features": [ 1 ] }"#,
            r#"{ "type": 1, "features": [] }"#,
            r#"[ "swtpm" ]"#,
        ] {
            let err = parse_capabilities("swtpm", bad.as_bytes()).expect_err(bad);
            assert!(matches!(err, CapabilitiesError::Json(_)), "{bad}: {err:?}");
        }
    }

    #[test]
    fn an_answer_of_the_other_program_is_rejected() {
        let err = parse_capabilities("swtpm", SETUP_071.as_bytes()).expect_err("wrong type");
        assert_eq!(
            err,
            CapabilitiesError::WrongType {
                expected: "swtpm".into(),
                found: "swtpm_setup".into()
            }
        );
    }

    #[test]
    fn versions_parse_with_suffixes_and_short_forms() {
        assert_eq!(parse_version("0.7.1"), Some((0, 7, 1)));
        assert_eq!(parse_version("0.8.0-rc1"), Some((0, 8, 0)));
        assert_eq!(parse_version("1.0"), Some((1, 0, 0)));
        assert_eq!(parse_version("x.y"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn the_child_path_starts_with_the_binaries_directories() {
        let mut b = bins();
        b.swtpm = "/opt/swtpm/bin/swtpm".into();
        let path = b.child_path();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        assert_eq!(dirs[0], Path::new("/opt/swtpm/bin"));
        assert_eq!(dirs[1], Path::new("/usr/bin"));
        assert_eq!(
            dirs.iter().filter(|d| *d == Path::new("/usr/bin")).count(),
            2
        );
    }

    #[test]
    fn a_swtpm_path_with_spaces_is_refused_for_swtpm_setup() {
        let mut b = bins();
        b.swtpm = "/opt/my tpm/swtpm".into();
        assert!(matches!(
            b.swtpm_for_setup(),
            Err(ProbeError::UnusablePath { .. })
        ));
        assert_eq!(
            bins().swtpm_for_setup().expect("ok"),
            "/usr/bin/swtpm socket"
        );
    }

    #[test]
    fn a_missing_binary_is_not_found_with_its_package() {
        let mut b = bins();
        b.swtpm_setup = "/nonexistent/swtpm_setup".into();
        if !is_executable(&b.swtpm) {
            b.swtpm = "/nonexistent/swtpm".into();
        }
        let err = probe(&b).expect_err("missing");
        assert!(matches!(err, ProbeError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("apt-get install"), "{err}");
    }
}
