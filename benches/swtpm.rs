//! swtpm driver benchmark: prints figures, asserts nothing.
//!
//! `cargo bench --bench swtpm` measures, in one run:
//! - spawn-to-first-TPM-response (p50/p99 over 50 runs) through the driver
//!   (vtpmd binds the socket and passes the fd: no polling) against a bare
//!   `swtpm socket` started by hand with the same flags, whose socket is
//!   polled for as libvirt does;
//! - swtpm_setup time with and without EK certificates;
//! - swtpm's resident memory once a guest's TPM is started.

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up should stop

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use vtpmd::protocol::{GuestId, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm;
use vtpmd::swtpm::probe::Binaries;
use vtpmd::swtpm::provision::{LocalCa, ProvisionSpec, provision};
use vtpmd::swtpm::spawn::{SpawnSpec, spawn};

const RUNS: usize = 50;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Nearest-rank percentile of sorted samples, `p` in whole percent.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * (sorted.len() - 1) + 50) / 100;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(name: &str, mut samples: Vec<Duration>, baseline: Option<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 50);
    let p99 = percentile(&samples, 99);
    let ratio = baseline.map_or("1.00".to_owned(), |b| {
        format!("{:.2}", p50.as_secs_f64() / b.as_secs_f64())
    });
    println!("{name:<62} {:>8.2} {:>8.2} {ratio:>7}", ms(p50), ms(p99));
    p50
}

/// The first TPM response: attach as QEMU does, then TPM2_Startup.
fn first_response(ctrl: &Path) -> Vmm {
    let mut vmm = Vmm::attach(ctrl, TIMEOUT).unwrap();
    let rsp = vmm.transact(&tpm::tpm2_startup_clear()).unwrap();
    assert_eq!(rsp.rc, 0);
    vmm
}

fn hex(key: &SecretBuf) -> String {
    key.expose_secret()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn main() {
    let bins = Binaries::default();
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    fs::create_dir(&state).unwrap();
    let key = SecretBuf::random(32).unwrap();
    provision(
        &bins,
        &state,
        &key,
        &ProvisionSpec::new(TpmVersion::V2_0),
        None,
    )
    .unwrap();
    let guest = GuestId::parse("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40").unwrap();
    let ctrl = root.path().join("ctrl.sock");

    println!("swtpm driver benchmark ({RUNS} runs each; TPM 2.0, existing state; times in ms)");
    println!("{:<62} {:>8} {:>8} {:>7}", "figure", "p50", "p99", "ratio");

    // Baseline: bare swtpm with the same flags, the key in a file (the
    // driver uses a pipe), the socket polled every 0.5 ms.
    let key_file = root.path().join("key.hex");
    fs::File::create(&key_file)
        .unwrap()
        .write_all(hex(&key).as_bytes())
        .unwrap();
    let bare: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let mut child = Command::new(&bins.swtpm)
                .arg("socket")
                .arg("--tpm2")
                .arg(format!("--tpmstate=dir={},mode=0600", state.display()))
                .arg(format!(
                    "--ctrl=type=unixio,path={},mode=0660",
                    ctrl.display()
                ))
                .arg(format!(
                    "--key=file={},format=hex,mode=aes-256-cbc",
                    key_file.display()
                ))
                .args([
                    "--log",
                    "level=1",
                    "--seccomp",
                    "action=kill",
                    "--terminate",
                ])
                .env_clear()
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            while UnixStream::connect(&ctrl).is_err() {
                std::thread::sleep(Duration::from_micros(500));
            }
            let vmm = first_response(&ctrl);
            let elapsed = start.elapsed();
            vmm.shutdown().unwrap();
            child.wait().unwrap();
            let _ = fs::remove_file(&ctrl);
            elapsed
        })
        .collect();
    let baseline = summary(
        "bare swtpm by hand, socket polled (libvirt's way)",
        bare,
        None,
    );

    for (name, window) in [
        (
            "vtpmd driver, fd passed, 50 ms early-exit check (default)",
            Duration::from_millis(50),
        ),
        (
            "vtpmd driver, fd passed, no early-exit check",
            Duration::ZERO,
        ),
    ] {
        let mut spawn_only = Vec::new();
        let samples: Vec<Duration> = (0..RUNS)
            .map(|_| {
                let mut spec =
                    SpawnSpec::new(&bins.swtpm, TpmVersion::V2_0, guest, &state, &ctrl, &key);
                spec.early_exit_window = window;
                let start = Instant::now();
                let mut swtpm = spawn(&spec).unwrap();
                spawn_only.push(start.elapsed());
                let vmm = first_response(swtpm.ctrl_path());
                let elapsed = start.elapsed();
                vmm.shutdown().unwrap();
                swtpm.wait_exit(TIMEOUT).unwrap();
                elapsed
            })
            .collect();
        summary(name, samples, Some(baseline));
        summary("  of which spawn() returning", spawn_only, Some(baseline));
    }

    // Memory of one started swtpm.
    let spec = SpawnSpec::new(&bins.swtpm, TpmVersion::V2_0, guest, &state, &ctrl, &key);
    let mut swtpm = spawn(&spec).unwrap();
    let vmm = first_response(swtpm.ctrl_path());
    let status = fs::read_to_string(format!("/proc/{}/status", swtpm.pid())).unwrap();
    for line in status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("RssAnon"))
    {
        println!(
            "swtpm after INIT + TPM2_Startup: {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    vmm.shutdown().unwrap();
    swtpm.wait_exit(TIMEOUT).unwrap();

    // swtpm_setup, with and without certificates (CA created beforehand).
    let ca = LocalCa::open(&root.path().join("ca")).unwrap();
    let warm = root.path().join("warm");
    fs::create_dir(&warm).unwrap();
    let certs = ProvisionSpec {
        ek_certificate: true,
        ..ProvisionSpec::new(TpmVersion::V2_0)
    };
    provision(&bins, &warm, &key, &certs, Some(&ca)).unwrap();
    println!("{:<62} {:>8} {:>8}", "swtpm_setup (5 runs)", "p50", "max");
    for (n, (name, spec, ca)) in [
        (
            "  TPM 2.0, no certificates",
            ProvisionSpec::new(TpmVersion::V2_0),
            None,
        ),
        (
            "  TPM 2.0, EK + platform certificates, --lock-nvram",
            certs,
            Some(&ca),
        ),
        (
            "  TPM 1.2, no certificates",
            ProvisionSpec::new(TpmVersion::V1_2),
            None,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut samples: Vec<Duration> = (0..5)
            .map(|i| {
                let dir = root.path().join(format!("setup-{n}-{i}"));
                fs::create_dir(&dir).unwrap();
                provision(&bins, &dir, &key, &spec, ca).unwrap().elapsed
            })
            .collect();
        samples.sort();
        println!("{name:<62} {:>8.0} {:>8.0}", ms(samples[2]), ms(samples[4]));
    }
}
