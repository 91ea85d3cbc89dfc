//! The baselines: what the same work costs without vtpmd. A bare swtpm
//! started by hand, the argon2 crate alone, AES-256-GCM alone.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use secrecy::ExposeSecret;
use vtpmd::protocol::TpmVersion;
use vtpmd::secret::SecretBuf;
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm;
use vtpmd::swtpm::probe::Binaries;
use vtpmd::swtpm::provision::{ProvisionSpec, provision};
use vtpmd::vault::KdfParams;

const TIMEOUT: Duration = Duration::from_secs(10);

/// How a hand-written launcher waits for swtpm's socket.
#[derive(Clone, Copy)]
pub enum Wait {
    /// Checks every 100 µs: the fastest a launcher can poll.
    Tight,
    /// As libvirt does it: fork + exec, then its `virTimeBackOffWait` loop
    /// (first check at once, then sleeps of 1, 2, 4, 8 … ms) on the
    /// socket's path. (libvirtd's own fork, its double fork to daemonize
    /// and the pid file are left out: the baseline is kind to libvirt.)
    LibvirtBackoff,
}

/// A TPM 2.0 state made by swtpm_setup, encrypted under `key`, and swtpm
/// started on it by hand with the flags vtpmd gives it.
pub struct BareSwtpm {
    bins: Binaries,
    state: PathBuf,
    key_file: PathBuf,
    ctrl: PathBuf,
}

impl BareSwtpm {
    pub fn provision(dir: &Path) -> Self {
        let bins = Binaries::default();
        let state = dir.join("bare-state");
        fs::create_dir_all(&state).unwrap();
        let key = SecretBuf::random(32).unwrap();
        provision(
            &bins,
            &state,
            &key,
            &ProvisionSpec::new(TpmVersion::V2_0),
            None,
        )
        .unwrap();
        let hex: String = key
            .expose_secret()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key_file = dir.join("bare.key");
        fs::write(&key_file, hex).unwrap();
        Self {
            bins,
            state,
            key_file,
            ctrl: dir.join("bare.sock"),
        }
    }

    /// Starts swtpm, waits for its socket as `wait` says, attaches as QEMU
    /// does and sends TPM2_Startup: returns the time to that first answer
    /// and the attached VMM (whose shutdown ends swtpm: `--terminate`).
    pub fn start(&self, wait: Wait) -> (Duration, Running) {
        let (elapsed, _, running) = self.start_timed(wait);
        (elapsed, running)
    }

    /// Like [`start`](Self::start), also returning how long the spawn call
    /// itself took.
    pub fn start_timed(&self, wait: Wait) -> (Duration, Duration, Running) {
        let _ = fs::remove_file(&self.ctrl);
        let began = Instant::now();
        let mut cmd = Command::new(&self.bins.swtpm);
        if matches!(wait, Wait::LibvirtBackoff) {
            // libvirt's virCommand forks (then sets up the child and execs);
            // std spawns with posix_spawn unless there is a pre-exec hook.
            // SAFETY: the hook does nothing.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || Ok(()));
            }
        }
        let child = cmd
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={},mode=0600", self.state.display()))
            .arg("--ctrl")
            .arg(format!(
                "type=unixio,path={},mode=0600",
                self.ctrl.display()
            ))
            .arg("--key")
            .arg(format!(
                "file={},format=hex,mode=aes-256-cbc",
                self.key_file.display()
            ))
            .args([
                "--log",
                "level=1",
                "--seccomp",
                "action=kill",
                "--terminate",
            ])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let spawned = began.elapsed();
        let mut sleep = Duration::from_millis(1);
        loop {
            let present = match wait {
                Wait::Tight => UnixStream::connect(&self.ctrl).is_ok(),
                Wait::LibvirtBackoff => self.ctrl.exists(),
            };
            if present {
                break;
            }
            assert!(
                began.elapsed() < TIMEOUT,
                "bare swtpm never made its socket"
            );
            match wait {
                Wait::Tight => std::thread::sleep(Duration::from_micros(100)),
                Wait::LibvirtBackoff => {
                    std::thread::sleep(sleep);
                    sleep = (sleep * 2).min(Duration::from_secs(1));
                }
            }
        }
        let mut vmm = Vmm::attach(&self.ctrl, TIMEOUT).unwrap();
        let rsp = vmm.transact(&tpm::tpm2_startup_clear()).unwrap();
        let elapsed = began.elapsed();
        assert_eq!(rsp.rc, 0, "TPM2_Startup on the bare swtpm");
        (elapsed, spawned, Running { vmm, child })
    }
}

/// A hand-started swtpm with its VMM attached.
pub struct Running {
    pub vmm: Vmm,
    child: Child,
}

impl Running {
    pub fn stop(mut self) {
        self.vmm.shutdown().unwrap();
        self.child.wait().unwrap();
    }
}

/// One Argon2id derivation with vtpmd's parameters, by the argon2 crate.
pub fn raw_argon2(params: KdfParams) -> Duration {
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(
            params.memory_kib(),
            params.iterations(),
            params.lanes(),
            Some(32),
        )
        .unwrap(),
    );
    let mut out = [0u8; 32];
    let began = Instant::now();
    argon
        .hash_password_into(b"benchmark passphrase", &[7u8; 32], &mut out)
        .unwrap();
    let elapsed = began.elapsed();
    std::hint::black_box(out);
    elapsed
}

/// One AES-256-GCM decryption of `len` bytes (what unsealing a state of
/// that size cannot avoid).
pub fn raw_aes_gcm_open(len: usize) -> Duration {
    let cipher = Aes256Gcm::new_from_slice(&[9u8; 32]).unwrap();
    let nonce = Nonce::from([3u8; 12]);
    let mut buf = vec![0x5au8; len];
    let tag = cipher
        .encrypt_inout_detached(&nonce, b"aad", buf.as_mut_slice().into())
        .unwrap();
    let began = Instant::now();
    cipher
        .decrypt_inout_detached(&nonce, b"aad", buf.as_mut_slice().into(), &tag)
        .unwrap();
    let elapsed = began.elapsed();
    std::hint::black_box(buf);
    elapsed
}
