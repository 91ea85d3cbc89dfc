//! The baselines: what the same work costs without vtpmd. A bare swtpm
//! started by hand, the argon2 crate alone, AES-256-GCM alone.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use nix::libc;
use nix::unistd::Pid;
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
    /// As libvirt 9.0's `qemuTPMEmulatorStart` does it: swtpm daemonized
    /// (double fork, pid file), then its `virTimeBackOffWait` loop (first
    /// check at once, then sleeps of 1, 2, 4, 8 … ms) on the socket's
    /// path, checking the pid is alive. (libvirtd's RPC, the size of the
    /// process it forks and its security labelling are left out: the
    /// baseline is kind to libvirt.)
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

    /// Another bare swtpm in `dir`, on a copy of this one's state and key
    /// (cheaper than another swtpm_setup; each copy starts as this one).
    #[allow(dead_code)] // host_reboot and start_keys use it, not this bench
    pub fn copy_to(&self, dir: &Path) -> Self {
        let state = dir.join("bare-state");
        fs::create_dir_all(&state).unwrap();
        for entry in fs::read_dir(&self.state).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() && entry.file_name() != ".lock" {
                fs::copy(entry.path(), state.join(entry.file_name())).unwrap();
            }
        }
        let key_file = dir.join("bare.key");
        fs::copy(&self.key_file, &key_file).unwrap();
        Self {
            bins: self.bins.clone(),
            state,
            key_file,
            ctrl: dir.join("bare.sock"),
        }
    }

    /// Like [`start`](Self::start), but the launcher binds the control
    /// socket itself and hands swtpm the listening fd (as vtpmd does; the
    /// process started by `posix_spawn`), then
    /// attaches at once: the connection waits in the backlog until swtpm
    /// accepts. Nothing is polled, so many launchers can start their swtpm
    /// at the same instant without competing with them for the CPU.
    #[allow(dead_code)] // host_reboot and start_keys use it, not this bench
    pub fn start_prebound(&self) -> (Duration, Running) {
        let (elapsed, _, running) = self.start_handed_over(false);
        (elapsed, running)
    }

    /// [`start_prebound`](Self::start_prebound), with `probe` as vtpmd
    /// does it: a control connection made before the spawn, asked
    /// CMD_GET_CAPABILITY once swtpm runs and closed, and only then the
    /// VMM's attach. Also returns the time until the probe answered.
    #[allow(dead_code)] // host_reboot and start_keys use it, not this bench
    pub fn start_handed_over(&self, probe: bool) -> (Duration, Duration, Running) {
        let _ = fs::remove_file(&self.ctrl);
        let began = Instant::now();
        let listener = std::os::unix::net::UnixListener::bind(&self.ctrl).unwrap();
        let early = probe.then(|| UnixStream::connect(&self.ctrl).unwrap());
        let mut cmd = self.swtpm_command();
        // The listener's own number, inherited (CLOEXEC cleared on a copy):
        // with no pre_exec hook std starts swtpm by posix_spawn, which does
        // not copy this process's address space (a fork of a process with
        // hundreds of launcher threads would be the baseline's own cost).
        // A launcher spawning at the same instant may inherit the copy too;
        // that swtpm never accepts on it, and it ends with it.
        // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1.
        let high = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&listener),
                libc::F_DUPFD_CLOEXEC,
                10,
            )
        };
        assert!(high >= 10, "dup of the control socket");
        // SAFETY: F_SETFD on the fd made above.
        assert_eq!(unsafe { libc::fcntl(high, libc::F_SETFD, 0) }, 0);
        cmd.arg("--ctrl").arg(format!("type=unixio,fd={high}"));
        let child = cmd.spawn().unwrap();
        drop(cmd);
        // SAFETY: `high` is ours (made above) and closed once.
        unsafe { libc::close(high) };
        drop(listener);
        if let Some(stream) = early {
            vtpmd::swtpm::ctrl::CtrlClient::from_stream(stream, TIMEOUT)
                .unwrap()
                .get_capability()
                .unwrap();
        }
        let probed = began.elapsed();
        let mut vmm = Vmm::attach(&self.ctrl, TIMEOUT * 3).unwrap();
        let rsp = vmm.transact(&tpm::tpm2_startup_clear()).unwrap();
        let elapsed = began.elapsed();
        assert_eq!(rsp.rc, 0, "TPM2_Startup on the bare swtpm");
        (
            elapsed,
            probed,
            Running {
                vmm,
                process: Process::Child(child),
            },
        )
    }

    /// swtpm on this state and key, as vtpmd runs it (seccomp, terminate
    /// when the VMM hangs up), with no environment or stdio; the caller
    /// adds its `--ctrl`.
    fn swtpm_command(&self) -> Command {
        let mut cmd = Command::new(&self.bins.swtpm);
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={},mode=0600", self.state.display()))
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
            .stderr(Stdio::null());
        cmd
    }

    /// Starts swtpm, waits for its socket as `wait` says, attaches as QEMU
    /// does and sends TPM2_Startup: returns the time to that first answer
    /// and the attached VMM (whose shutdown ends swtpm: `--terminate`).
    pub fn start(&self, wait: Wait) -> (Duration, Running) {
        let (elapsed, _, running) = self.start_timed(wait);
        (elapsed, running)
    }

    /// Like [`start`](Self::start), also returning how long starting the
    /// process took (until swtpm's pid was known).
    pub fn start_timed(&self, wait: Wait) -> (Duration, Duration, Running) {
        let _ = fs::remove_file(&self.ctrl);
        let began = Instant::now();
        let mut cmd = self.swtpm_command();
        cmd.arg("--ctrl").arg(format!(
            "type=unixio,path={},mode=0600",
            self.ctrl.display()
        ));
        let process = match wait {
            Wait::Tight => Process::Child(cmd.spawn().unwrap()),
            Wait::LibvirtBackoff => Process::Daemon(self.daemonize(cmd)),
        };
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
                    // libvirt also checks each time that the pid is alive.
                    if let Process::Daemon(pid) = process {
                        assert!(nix::sys::signal::kill(pid, None).is_ok(), "swtpm died");
                    }
                    std::thread::sleep(sleep);
                    sleep = (sleep * 2).min(Duration::from_secs(1));
                }
            }
        }
        let mut vmm = Vmm::attach(&self.ctrl, TIMEOUT).unwrap();
        let rsp = vmm.transact(&tpm::tpm2_startup_clear()).unwrap();
        let elapsed = began.elapsed();
        assert_eq!(rsp.rc, 0, "TPM2_Startup on the bare swtpm");
        (elapsed, spawned, Running { vmm, process })
    }

    /// libvirt's `virCommandDaemonize` + `virCommandSetPidFile` +
    /// `virCommandRun`: fork, setsid, fork again; the grandchild writes its
    /// pid file and execs swtpm, the middle child exits, and the caller
    /// reaps it and reads the pid file. This process must be a child
    /// subreaper (see `main`) to reap the grandchild later.
    fn daemonize(&self, mut cmd: Command) -> Pid {
        let pidfile = self.ctrl.with_extension("pid");
        let _ = fs::remove_file(&pidfile);
        let path = CString::new(pidfile.as_os_str().as_bytes()).unwrap();
        // SAFETY: between fork and exec the hook calls only setsid, fork,
        // getpid, open, write, close and _exit (async-signal-safe) and
        // allocates nothing (the path was built before).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                match libc::fork() {
                    -1 => Err(std::io::Error::last_os_error()),
                    0 => write_pid_file(&path),
                    _ => libc::_exit(0),
                }
            });
        }
        let status = cmd.spawn().unwrap().wait().unwrap();
        assert!(status.success(), "daemonizing swtpm: {status}");
        let pid: i32 = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Pid::from_raw(pid)
    }
}

/// Writes this process's pid into `path` without allocating.
fn write_pid_file(path: &CString) -> std::io::Result<()> {
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    // SAFETY: getpid cannot fail.
    let mut pid = unsafe { libc::getpid() }.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + u8::try_from(pid % 10).unwrap_or(0);
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    // SAFETY: a valid C string, flags and mode; the fd is closed below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let text = &digits[at..];
    // SAFETY: `text` is valid for its length; `fd` is ours.
    let written = unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    if written < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A hand-started swtpm: our child, or (libvirt's way) a daemon whose pid
/// came from its pid file.
enum Process {
    Child(Child),
    Daemon(Pid),
}

/// A hand-started swtpm with its VMM attached.
pub struct Running {
    pub vmm: Vmm,
    process: Process,
}

impl Running {
    pub fn stop(self) {
        self.vmm.shutdown().unwrap();
        match self.process {
            Process::Child(mut child) => {
                child.wait().unwrap();
            }
            Process::Daemon(pid) => {
                nix::sys::wait::waitpid(pid, None).unwrap();
            }
        }
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
