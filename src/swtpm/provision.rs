//! Provisioning a fresh TPM state with swtpm_setup.
//!
//! [`provision`] "manufactures" a TPM 1.2 or 2.0 into an empty directory:
//! PCR banks activated, NVRAM locked as libvirt does (`--lock-nvram`) and,
//! on request, an EK with EK and platform certificates signed by a
//! host-local CA ([`LocalCa`]). Without certificates the result is still a
//! complete, usable TPM.
//!
//! The state is encrypted by swtpm from its first byte: swtpm_setup gets
//! the guest's swtpm state key (derived from the vault's data key) as 64 hex
//! digits through a pipe (`--keyfile-fd N --cipher aes-256-cbc`; swtpm_setup
//! passes `--key fd=N,mode=aes-256-cbc` to the swtpm it runs, whose default
//! key format is hex). The key never touches a file, argv or the
//! environment.
//!
//! swtpm_setup runs with an empty environment (bar `PATH` and `TMPDIR`),
//! umask 077, stdin from /dev/null, in its own process group, and with a
//! deadline ([`SETUP_TIMEOUT`]). Its configuration is vtpmd's own, written
//! into a private work directory (never `/etc/swtpm_setup.conf` or a
//! per-user one), and its log, stdout and stderr all go to one file there,
//! which ends up in the [`ProvisionReport`] or in the error.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg, OFlag};
use secrecy::ExposeSecret;

use super::probe::{Binaries, ProbeError};
use super::run::{self, RunError};
use crate::protocol::TpmVersion;
use crate::secret::{SecretBuf, SecretError};

/// How long one swtpm_setup run may take before it and its children are
/// killed. 0.7.1 needs 0.6–1.1 s (TPM 1.2 with certificates is slowest);
/// the margin covers a loaded host and a queue on the CA lock, which is
/// taken before the clock starts.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Length of the swtpm state key: AES-256.
const STATE_KEY_LEN: usize = 32;

/// At most this much of swtpm_setup's log is kept.
const LOG_CAP: u64 = 1 << 20;

/// The banks `--pcr-banks` may name.
const KNOWN_BANKS: [&str; 4] = ["sha1", "sha256", "sha384", "sha512"];

/// The PCR banks a TPM 2.0 starts with: a non-empty comma-separated list of
/// distinct `sha1`, `sha256`, `sha384`, `sha512`. Default `sha256` (as
/// swtpm_setup and libvirt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrBanks(String);

impl PcrBanks {
    pub fn parse(text: &str) -> Result<Self, ProvisionError> {
        let invalid = |why| ProvisionError::InvalidPcrBanks {
            banks: text.to_owned(),
            why,
        };
        let mut seen: Vec<&str> = Vec::new();
        for bank in text.split(',') {
            if bank.is_empty() {
                return Err(invalid("an empty entry"));
            }
            if !KNOWN_BANKS.contains(&bank) {
                return Err(invalid("banks are sha1, sha256, sha384 and sha512"));
            }
            if seen.contains(&bank) {
                return Err(invalid("a bank is named twice"));
            }
            seen.push(bank);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for PcrBanks {
    fn default() -> Self {
        Self("sha256".to_owned())
    }
}

/// What to provision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionSpec {
    pub version: TpmVersion,
    /// TPM 2.0 only; a TPM 1.2 has one SHA-1 bank.
    pub pcr_banks: PcrBanks,
    /// Create an EK (TPM 2.0: RSA 2048 at 0x81010001 and ECC P-384 at
    /// 0x81010016) with EK certificates and a platform certificate signed by
    /// the [`LocalCa`]. Needs a `LocalCa`.
    pub ek_certificate: bool,
}

impl ProvisionSpec {
    /// `version` with the default banks and no certificates.
    pub fn new(version: TpmVersion) -> Self {
        Self {
            version,
            pcr_banks: PcrBanks::default(),
            ek_certificate: false,
        }
    }
}

/// A successful provisioning.
#[derive(Debug, Clone)]
pub struct ProvisionReport {
    pub version: TpmVersion,
    /// The state file swtpm_setup wrote (`tpm2-00.permall` or
    /// `tpm-00.permall`).
    pub state_file: PathBuf,
    pub ek_certificate: bool,
    /// Wall time of the swtpm_setup run (without waiting for the CA lock).
    pub elapsed: Duration,
    /// swtpm_setup's log (not secret: it holds the EK's public key at most).
    pub log: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("invalid PCR banks {banks:?}: {why}")]
    InvalidPcrBanks { banks: String, why: &'static str },
    #[error("{path} cannot be handed to swtpm_setup: {why}")]
    UnsafePath { path: PathBuf, why: &'static str },
    #[error("EK certificates need a local CA, and none was given")]
    NoLocalCa,
    #[error("the swtpm state key must be 32 bytes (AES-256)")]
    StateKeyLength,
    #[error("secret memory")]
    Secret(#[from] SecretError),
    #[error("swtpm_setup cannot be used")]
    Binary(#[source] ProbeError),
    #[error("cannot create the pipe for the state key")]
    KeyPipe(#[source] io::Error),
    #[error("cannot create swtpm_setup's work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the local CA directory {path}")]
    CreateCaDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the local CA directory {path} is not a directory owned by uid {expected} (owner {owner})"
    )]
    CaDirNotOurs {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("cannot lock the local CA at {path}")]
    LockCa {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restrict the permissions of {path}")]
    RestrictCa {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "swtpm_setup for {state_dir} did not finish within {after:?} and was killed; its log:\n{log}"
    )]
    TimedOut {
        state_dir: PathBuf,
        after: Duration,
        log: String,
    },
    #[error("swtpm_setup for {state_dir} failed ({status}); its log:\n{log}")]
    SwtpmSetup {
        state_dir: PathBuf,
        status: ExitStatus,
        log: String,
    },
    #[error("swtpm_setup for {state_dir} succeeded but wrote no {file}; its log:\n{log}")]
    NoState {
        state_dir: PathBuf,
        file: &'static str,
        log: String,
    },
}

/// A host-local CA that signs EK and platform certificates, kept in a
/// directory of vtpmd's own (never Debian's `/var/lib/swtpm-localca`, which
/// root and non-root users must not share).
///
/// Layout of `dir` (mode 0700, owned by vtpmd's user; every file 0600):
///
/// | file | by | what |
/// |---|---|---|
/// | `swtpm-localca.conf` | vtpmd | `statedir`, `signingkey`, `issuercert`, `certserial`, all in `dir` |
/// | `swtpm-localca.options` | vtpmd | platform manufacturer, version, model for platform certificates |
/// | `vtpmd-ca.lock` | vtpmd | `flock`ed while a provisioning uses the CA |
/// | `swtpm-localca-rootca-privkey.pem`, `swtpm-localca-rootca-cert.pem` | swtpm_localca, first use | root CA |
/// | `signkey.pem`, `issuercert.pem` | swtpm_localca, first use | intermediate CA that signs |
/// | `certserial`, `.lock.swtpm-localca` | swtpm_localca | next serial number; its own lock |
///
/// swtpm_localca creates the private keys 0640; vtpmd restricts every file
/// to 0600 after each use, under the lock.
///
/// Every use is serialized, within vtpmd by a mutex and across processes by
/// an exclusive `flock` on `vtpmd-ca.lock`. (Not on swtpm_localca's own
/// `.lock.swtpm-localca`: swtpm_localca runs as vtpmd's grandchild and
/// `flock`s that file itself, on another open file description, so vtpmd
/// holding it would deadlock its own child.)
#[derive(Debug)]
pub struct LocalCa {
    dir: PathBuf,
    lock: Mutex<()>,
}

/// Holding the CA: the mutex, then the file lock (released on drop).
struct CaGuard<'a> {
    _file: Flock<File>,
    _mutex: MutexGuard<'a, ()>,
}

const CA_LOCK_FILE: &str = "vtpmd-ca.lock";
const LOCALCA_CONF: &str = "swtpm-localca.conf";
const LOCALCA_OPTIONS: &str = "swtpm-localca.options";
const ISSUER_CERT: &str = "issuercert.pem";

impl LocalCa {
    /// Opens the CA in `dir`, creating the directory (0700, parents too) and
    /// (re)writing vtpmd's configuration files. The keys are created by
    /// swtpm_localca on the first provisioning that asks for certificates.
    pub fn open(dir: &Path) -> Result<Self, ProvisionError> {
        config_safe(dir)?;
        match DirBuilder::new().recursive(true).mode(0o700).create(dir) {
            Ok(()) => {}
            Err(source) => {
                return Err(ProvisionError::CreateCaDir {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
        let meta = fs::symlink_metadata(dir).map_err(|source| ProvisionError::CreateCaDir {
            path: dir.to_owned(),
            source,
        })?;
        let euid = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != euid {
            return Err(ProvisionError::CaDirNotOurs {
                path: dir.to_owned(),
                owner: meta.uid(),
                expected: euid,
            });
        }
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
                ProvisionError::RestrictCa {
                    path: dir.to_owned(),
                    source,
                }
            })?;
        }

        let ca = Self {
            dir: dir.to_owned(),
            lock: Mutex::new(()),
        };
        {
            let _guard = ca.lock()?;
            write_private(&dir.join(LOCALCA_CONF), ca.localca_conf().as_bytes())?;
            write_private(
                &dir.join(LOCALCA_OPTIONS),
                b"--platform-manufacturer vtpmd\n--platform-version 2.1\n--platform-model QEMU\n",
            )?;
            ca.restrict()?;
        }
        Ok(ca)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificate that signs EK and platform certificates (PEM),
    /// present after the first provisioning with certificates.
    pub fn issuer_certificate(&self) -> PathBuf {
        self.dir.join(ISSUER_CERT)
    }

    fn localca_conf(&self) -> String {
        let dir = self.dir.display();
        format!(
            "# Written by vtpmd; rewritten at every start.\n\
             statedir = {dir}\n\
             signingkey = {dir}/signkey.pem\n\
             issuercert = {dir}/{ISSUER_CERT}\n\
             certserial = {dir}/certserial\n"
        )
    }

    fn lock(&self) -> Result<CaGuard<'_>, ProvisionError> {
        // `()` has no invariant a panicking holder could have broken.
        let mutex = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let path = self.dir.join(CA_LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(|source| ProvisionError::LockCa {
                path: path.clone(),
                source,
            })?;
        let file = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            ProvisionError::LockCa {
                path,
                source: errno.into(),
            }
        })?;
        Ok(CaGuard {
            _file: file,
            _mutex: mutex,
        })
    }

    /// Every regular file in the CA directory to 0600 (swtpm_localca makes
    /// its private keys 0640). Call with the lock held.
    fn restrict(&self) -> Result<(), ProvisionError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| ProvisionError::RestrictCa { path, source }
        };
        for entry in fs::read_dir(&self.dir).map_err(err(&self.dir))? {
            let path = entry.map_err(err(&self.dir))?.path();
            let meta = fs::symlink_metadata(&path).map_err(err(&path))?;
            if !meta.is_file() || meta.mode() & 0o177 == 0 {
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(OFlag::O_NOFOLLOW.bits())
                .open(&path)
                .map_err(err(&path))?;
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(err(&path))?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` (0600) through a temporary file and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    let err = |source| ProvisionError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

/// swtpm's option syntax (`key=value,key=value`) cannot carry a comma.
fn option_safe(path: &Path) -> Result<(), ProvisionError> {
    if path.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(ProvisionError::UnsafePath {
            path: path.to_owned(),
            why: "swtpm options cannot carry a comma",
        });
    }
    Ok(())
}

/// swtpm_setup's and swtpm_localca's config files take `name = value`
/// lines, cut at `#`, with `${VAR}` expanded and trailing space dropped.
fn config_safe(path: &Path) -> Result<&str, ProvisionError> {
    let unsafe_path = |why| ProvisionError::UnsafePath {
        path: path.to_owned(),
        why,
    };
    let text = path
        .to_str()
        .ok_or_else(|| unsafe_path("it is not UTF-8"))?;
    if !path.is_absolute() {
        return Err(unsafe_path("it is not absolute"));
    }
    if text
        .chars()
        .any(|c| c.is_control() || matches!(c, '#' | '$' | ','))
        || text.ends_with(' ')
    {
        return Err(unsafe_path(
            "config files cannot carry control characters, '#', '$', ',' or trailing spaces",
        ));
    }
    Ok(text)
}

/// The key as 64 lower-case hex digits, built straight into locked memory.
fn hex_key(key: &SecretBuf) -> Result<SecretBuf, ProvisionError> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    if key.len() != STATE_KEY_LEN {
        return Err(ProvisionError::StateKeyLength);
    }
    let mut hex = SecretBuf::with_capacity(2 * STATE_KEY_LEN)?;
    for byte in key.expose_secret() {
        let high = DIGITS[usize::from(byte >> 4)];
        let low = DIGITS[usize::from(byte & 0x0f)];
        hex.extend_from_slice(&[high, low])?;
    }
    Ok(hex)
}

/// The read end of a pipe that holds the key and nothing else; its write
/// end is already closed. CLOEXEC in vtpmd, numbered 3 or above so the
/// child's stdio set-up cannot overwrite it.
fn key_pipe(hex: &SecretBuf) -> Result<OwnedFd, ProvisionError> {
    let (mut read, write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ProvisionError::KeyPipe(e.into()))?;
    // 64 bytes fit into any pipe buffer, so this cannot block.
    File::from(write)
        .write_all(hex.expose_secret())
        .map_err(ProvisionError::KeyPipe)?;
    while read.as_raw_fd() < 3 {
        // try_clone dups with F_DUPFD_CLOEXEC from 3 upwards.
        read = read.try_clone().map_err(ProvisionError::KeyPipe)?;
    }
    Ok(read)
}

/// A private (0700) directory for one swtpm_setup run, removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<Self, ProvisionError> {
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..8 {
            let mut tag = [0u8; 8];
            getrandom::fill(&mut tag).map_err(|e| ProvisionError::WorkDir {
                path: base.clone(),
                source: io::Error::other(e.to_string()),
            })?;
            let name: String = tag.iter().map(|b| format!("{b:02x}")).collect();
            let path = base.join(format!("vtpmd-setup-{name}"));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(source) => return Err(ProvisionError::WorkDir { path, source }),
            }
        }
        Err(ProvisionError::WorkDir {
            path: base,
            source: last.unwrap_or_else(|| io::Error::other("no free name")),
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), %err, "cannot remove swtpm_setup's work directory");
        }
    }
}

/// swtpm_setup's own configuration: with a CA, where its tool and config
/// are; without one, no certificate tool at all.
fn setup_conf(bins: &Binaries, ca: Option<&LocalCa>) -> Result<String, ProvisionError> {
    let mut conf = String::from("# Written by vtpmd for one swtpm_setup run.\n");
    if let Some(ca) = ca {
        let tool = config_safe(&bins.swtpm_localca)?;
        let conf_file = ca.dir.join(LOCALCA_CONF);
        let options = ca.dir.join(LOCALCA_OPTIONS);
        conf.push_str(&format!(
            "create_certs_tool = {tool}\n\
             create_certs_tool_config = {}\n\
             create_certs_tool_options = {}\n",
            config_safe(&conf_file)?,
            config_safe(&options)?,
        ));
    }
    conf.push_str("active_pcr_banks = sha256\n");
    Ok(conf)
}

fn state_file_name(version: TpmVersion) -> &'static str {
    match version {
        TpmVersion::V1_2 => "tpm-00.permall",
        TpmVersion::V2_0 => "tpm2-00.permall",
    }
}

fn read_log(path: &Path) -> String {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(file) => {
            let _ = file.take(LOG_CAP).read_to_end(&mut bytes);
        }
        Err(err) => return format!("(cannot read {}: {err})", path.display()),
    }
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

/// Provisions a fresh TPM state into `state_dir`, which must exist and hold
/// no TPM state (swtpm_setup refuses to overwrite one, and says so in the
/// error). The state is encrypted with `state_key` (32 bytes, AES-256-CBC)
/// from its first byte.
///
/// With `spec.ek_certificate`, `ca` must be given; its use is serialized
/// with every other provisioning that uses it, in this process and in
/// others. On failure `state_dir` may hold partial state: the caller, who
/// created it, removes it.
pub fn provision(
    bins: &Binaries,
    state_dir: &Path,
    state_key: &SecretBuf,
    spec: &ProvisionSpec,
    ca: Option<&LocalCa>,
) -> Result<ProvisionReport, ProvisionError> {
    // Validate everything first.
    let ca = match (spec.ek_certificate, ca) {
        (true, None) => return Err(ProvisionError::NoLocalCa),
        (true, Some(ca)) => Some(ca),
        (false, _) => None,
    };
    option_safe(state_dir)?;
    let tpm_arg = bins.swtpm_for_setup().map_err(ProvisionError::Binary)?;
    let hex = hex_key(state_key)?;
    let conf = setup_conf(bins, ca)?;

    // Then act: work directory, config, log, key pipe.
    let work = WorkDir::create()?;
    option_safe(&work.0)?;
    let conf_path = work.0.join("swtpm_setup.conf");
    write_private(&conf_path, conf.as_bytes())?;
    let log_path = work.0.join("swtpm_setup.log");
    let log = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|source| ProvisionError::WriteFile {
            path: log_path.clone(),
            source,
        })?;
    let log_err = log
        .try_clone()
        .map_err(|source| ProvisionError::WriteFile {
            path: log_path.clone(),
            source,
        })?;
    let key_read = key_pipe(&hex)?;
    drop(hex);
    let key_fd = key_read.as_raw_fd();

    let mut cmd = Command::new(&bins.swtpm_setup);
    if spec.version == TpmVersion::V2_0 {
        cmd.arg("--tpm2")
            .arg("--pcr-banks")
            .arg(spec.pcr_banks.as_str());
    }
    cmd.arg("--tpm")
        .arg(&tpm_arg)
        .arg("--tpmstate")
        .arg(state_dir);
    if spec.ek_certificate {
        cmd.args(["--createek", "--create-ek-cert", "--create-platform-cert"]);
    }
    cmd.arg("--lock-nvram")
        .arg("--config")
        .arg(&conf_path)
        .arg("--logfile")
        .arg(&log_path)
        .arg("--keyfile-fd")
        .arg(key_fd.to_string())
        .args(["--cipher", "aes-256-cbc"])
        .env_clear()
        .env("PATH", bins.child_path())
        .env("TMPDIR", &work.0)
        .current_dir(&work.0)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: the closure runs in the forked child between fork and exec,
    // where only async-signal-safe calls are allowed; fcntl(2) and umask(2)
    // are, and nothing allocates or takes a lock. `key_fd` is open in the
    // child: `key_read` stays open in vtpmd until after spawn returns. The
    // fd table is the child's own copy, so clearing FD_CLOEXEC there hands
    // exactly this one fd to swtpm_setup and leaves vtpmd's copy CLOEXEC.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::fcntl(key_fd, nix::libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            nix::libc::umask(0o077);
            Ok(())
        });
    }

    let guard = ca.map(LocalCa::lock).transpose()?;
    let outcome = run::run(&mut cmd, SETUP_TIMEOUT, false);
    drop(cmd);
    drop(key_read);
    if let Some(ca) = ca {
        ca.restrict()?;
    }
    drop(guard);

    let done = match outcome {
        Ok(done) => done,
        Err(RunError::TimedOut(after)) => {
            return Err(ProvisionError::TimedOut {
                state_dir: state_dir.to_owned(),
                after,
                log: read_log(&log_path),
            });
        }
        Err(RunError::Spawn(source) | RunError::Wait(source)) => {
            return Err(ProvisionError::Spawn {
                binary: bins.swtpm_setup.clone(),
                source,
            });
        }
    };
    let log = read_log(&log_path);
    if !done.status.success() {
        return Err(ProvisionError::SwtpmSetup {
            state_dir: state_dir.to_owned(),
            status: done.status,
            log,
        });
    }
    let file = state_file_name(spec.version);
    let state_file = state_dir.join(file);
    if !state_file.is_file() {
        return Err(ProvisionError::NoState {
            state_dir: state_dir.to_owned(),
            file,
            log,
        });
    }
    tracing::info!(
        state_dir = %state_dir.display(),
        version = spec.version.as_str(),
        certificates = spec.ek_certificate,
        elapsed_ms = done.elapsed.as_millis(),
        "provisioned TPM state"
    );
    Ok(ProvisionReport {
        version: spec.version,
        state_file,
        ek_certificate: spec.ek_certificate,
        elapsed: done.elapsed,
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_banks_accept_known_distinct_banks() {
        for ok in ["sha256", "sha1,sha256", "sha256,sha384,sha512", "sha1"] {
            assert_eq!(PcrBanks::parse(ok).expect(ok).as_str(), ok);
        }
        assert_eq!(PcrBanks::default().as_str(), "sha256");
    }

    #[test]
    fn pcr_banks_reject_unknown_empty_and_repeated_banks() {
        for bad in [
            "",
            "sha256,",
            ",sha1",
            "md5",
            "SHA256",
            "sha256 ",
            "sha1,sha1",
            "sha256;sha1",
            "-",
        ] {
            let err = PcrBanks::parse(bad).expect_err(bad);
            assert!(
                matches!(err, ProvisionError::InvalidPcrBanks { .. }),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn the_key_becomes_64_lower_case_hex_digits() {
        let mut key = SecretBuf::with_capacity(32).expect("buf");
        let bytes: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(0xa0))
            .collect();
        key.extend_from_slice(&bytes).expect("fits");
        let hex = hex_key(&key).expect("hex");
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex.expose_secret(), expected.as_bytes());
    }

    #[test]
    fn a_key_of_the_wrong_length_is_refused() {
        let key = SecretBuf::zeroed(16).expect("buf");
        assert!(matches!(hex_key(&key), Err(ProvisionError::StateKeyLength)));
    }

    #[test]
    fn the_key_pipe_holds_exactly_the_key_and_is_cloexec() {
        let mut hex = SecretBuf::with_capacity(64).expect("buf");
        hex.extend_from_slice(&[b'a'; 64]).expect("fits");
        let read = key_pipe(&hex).expect("pipe");
        assert!(read.as_raw_fd() >= 3);
        let flags = nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_GETFD).expect("flags");
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0);
        let mut got = Vec::new();
        File::from(read).read_to_end(&mut got).expect("read to EOF");
        assert_eq!(got, [b'a'; 64]);
    }

    #[test]
    fn paths_that_swtpm_or_its_config_would_misread_are_refused() {
        assert!(option_safe(Path::new("/run/vtpmd/a,b")).is_err());
        assert!(option_safe(Path::new("/run/vtpmd/ab")).is_ok());
        for bad in [
            "relative/ca",
            "/ca#x",
            "/ca/${HOME}",
            "/ca\n",
            "/ca ",
            "/c,a",
        ] {
            assert!(config_safe(Path::new(bad)).is_err(), "{bad:?}");
        }
        assert!(config_safe(Path::new("/var/lib/vtpmd/ca")).is_ok());
    }

    #[test]
    fn setup_conf_points_at_the_ca_only_when_there_is_one() {
        let root = tempfile::tempdir().expect("tempdir");
        let ca = LocalCa::open(&root.path().join("ca")).expect("ca");
        let bins = Binaries {
            swtpm: "/usr/bin/swtpm".into(),
            swtpm_setup: "/usr/bin/swtpm_setup".into(),
            swtpm_localca: "/usr/bin/swtpm_localca".into(),
        };
        let with = setup_conf(&bins, Some(&ca)).expect("conf");
        assert!(
            with.contains("create_certs_tool = /usr/bin/swtpm_localca\n"),
            "{with}"
        );
        assert!(with.contains(&format!(
            "create_certs_tool_config = {}/swtpm-localca.conf\n",
            ca.dir().display()
        )));
        let without = setup_conf(&bins, None).expect("conf");
        assert!(!without.contains("create_certs_tool"), "{without}");
    }

    #[test]
    fn a_new_ca_directory_is_private_and_its_files_0600() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("state/ca");
        let ca = LocalCa::open(&dir).expect("ca");
        let mode = |p: &Path| fs::symlink_metadata(p).expect("meta").mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for name in [LOCALCA_CONF, LOCALCA_OPTIONS, CA_LOCK_FILE] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        let conf = fs::read_to_string(dir.join(LOCALCA_CONF)).expect("conf");
        assert!(
            conf.contains(&format!("statedir = {}\n", dir.display())),
            "{conf}"
        );

        // A key file swtpm_localca made 0640 is restricted again.
        let key = dir.join("signkey.pem");
        fs::write(&key, b"key").expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).expect("chmod");
        ca.restrict().expect("restrict");
        assert_eq!(mode(&key), 0o600);
    }

    #[test]
    fn a_loose_ca_directory_is_tightened() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("ca");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        LocalCa::open(&dir).expect("ca");
        assert_eq!(fs::metadata(&dir).expect("meta").mode() & 0o777, 0o700);
    }

    #[test]
    fn certificates_without_a_ca_are_refused_before_anything_runs() {
        let key = SecretBuf::zeroed(32).expect("key");
        let spec = ProvisionSpec {
            ek_certificate: true,
            ..ProvisionSpec::new(TpmVersion::V2_0)
        };
        let err = provision(
            &Binaries::default(),
            Path::new("/nonexistent"),
            &key,
            &spec,
            None,
        )
        .expect_err("no CA");
        assert!(matches!(err, ProvisionError::NoLocalCa), "{err:?}");
    }

    #[test]
    fn the_work_directory_is_private_and_removed() {
        let work = WorkDir::create().expect("work dir");
        let path = work.0.clone();
        assert_eq!(fs::metadata(&path).expect("meta").mode() & 0o777, 0o700);
        drop(work);
        assert!(!path.exists());
    }
}
