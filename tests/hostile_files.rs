//! Files planted where vtpmd reads: a FIFO (which an `open` would wait on
//! forever) in place of swtpm's `.lock` in a guest's runtime directory, and
//! in place of the sealed file. Each is refused at once, typed, and the
//! daemon goes on serving. Real vtpmd, real swtpm.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, b64};
use serde_json::json;

const G: &str = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d";
const PASS: &str = "correct horse battery staple";

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
}

fn create(d: &Daemon) {
    d.client()
        .manager(
            "Create",
            json!({"guest": G, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
}

#[test]
fn a_fifo_in_place_of_the_swtpm_lock_does_not_hang_stop() {
    let d = Daemon::start();
    create(&d);
    d.start_guest(G, PASS);
    mkfifo(&d.runtime_dir.join(G).join(".lock"));

    let began = Instant::now();
    let mut client = d.client();
    client.set_reply_timeout(Duration::from_secs(20));
    let stopped = client.manager("Stop", json!({"guest": G})).unwrap();

    eprintln!("Stop answered in {:?}", began.elapsed());
    assert_eq!(stopped["guest"]["state"], "stopped", "{stopped}");
    assert!(!d.runtime_dir.join(G).exists());
    // And the guest starts again.
    assert_eq!(d.start_guest(G, PASS)["state"], "running");
}

#[test]
fn a_fifo_in_place_of_the_sealed_file_is_refused_at_once_and_a_restart_serves() {
    let mut d = Daemon::start();
    create(&d);
    let sealed = d.sealed_file(G);
    mkfifo(&sealed);

    let began = Instant::now();
    let mut client = d.client();
    client.set_reply_timeout(Duration::from_secs(20));
    let refused = client.manager("Start", json!({"guest": G, "passphrase": b64(PASS)}));
    eprintln!("Start answered in {:?}: {refused:?}", began.elapsed());
    assert!(refused.is_err(), "a FIFO was started from: {refused:?}");
    assert!(!d.runtime_dir.join(G).exists(), "something was unpacked");

    // A restarting vtpmd reads every sealed header before it serves.
    d.stop();
    d.restart();
    let status = d.guest_status(G);
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["failure"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{status}"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&sealed)
            .unwrap()
            .file_type()
            .is_fifo(),
        "a refusal changed the file"
    );
}

/// The uid the guest's swtpm runs as: the owner of its state files.
fn guest_uid(d: &Daemon) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(d.runtime_dir.join(G).join("tpm2-00.permall"))
        .unwrap()
        .uid()
}

/// Runs `script` with `sh -c` in the guest's runtime directory as `uid`
/// (its gid too, no supplementary groups): what a compromised swtpm can do.
fn as_guest(d: &Daemon, uid: u32, script: &str) {
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .args(["--", "sh", "-c", script])
        .current_dir(d.runtime_dir.join(G))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The peak resident set of `pid` so far, in KiB (`VmHWM`).
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

#[test]
fn sixty_five_sparse_files_planted_by_the_guest_are_refused_before_they_are_read() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (per-guest uids)");
        return;
    }
    let d = Daemon::start();
    create(&d);
    d.start_guest(G, PASS);
    let uid = guest_uid(&d);
    let before = peak_rss_kib(d.pid());
    let mut events = d.events();

    // 65 files of 16 MiB each that cost no disk: 1 GiB if read.
    as_guest(
        &d,
        uid,
        "for i in $(seq 10 74); do truncate -s 16M junk$i; done",
    );

    let (_, failed) = events
        .wait_for(G, "reseal-failed", Duration::from_secs(20))
        .expect("no reseal-failed event");
    // The retries (after 1 s, then 2 s) must be as cheap as the first try.
    std::thread::sleep(Duration::from_secs(4));
    let after = peak_rss_kib(d.pid());
    eprintln!("vtpmd VmHWM: {before} kB before, {after} kB after the planted files");
    let detail = failed["detail"].as_str().unwrap();
    assert!(
        detail.contains("/junk") && detail.contains("16777216 bytes"),
        "the refusal does not name the file and its size: {detail}"
    );
    assert!(
        after < before + 64 * 1024,
        "a reseal read the planted files: VmHWM {before} kB -> {after} kB"
    );
    assert_eq!(d.guest_status(G)["state"], "running");

    // Once they are gone, the writes are sealed again.
    as_guest(&d, uid, "rm -f junk*; echo again > extra");
    events
        .wait_for(G, "resealed", Duration::from_secs(40))
        .expect("no reseal once the files were removed");
}

#[test]
fn entries_the_guest_plants_that_cannot_be_archived_do_not_stop_resealing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (per-guest uids)");
        return;
    }
    let d = Daemon::start();
    create(&d);
    d.start_guest(G, PASS);
    let uid = guest_uid(&d);
    let generation = d.guest_status(G)["generation"].as_u64().unwrap();
    let mut events = d.events();

    // A name with a space, a directory, a FIFO, a symlink, a name too long
    // to encode; then a file that can be an entry, so there is something
    // new to seal.
    as_guest(
        &d,
        uid,
        &format!(
            "echo x > 'a b'; mkdir sub; mkfifo fifo; ln -s /etc/passwd link; \
             echo y > {}; echo kept > extra",
            "n".repeat(65)
        ),
    );

    let generation = d.wait_generation_above(G, generation, Duration::from_secs(20));
    let failures: Vec<_> = events
        .drain()
        .into_iter()
        .filter(|e| e["event"] == "reseal-failed")
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(d.guest_status(G)["reason"].is_null());
    let stopped = d.client().manager("Stop", json!({"guest": G})).unwrap();
    assert_eq!(stopped["guest"]["state"], "stopped", "{stopped}");
    assert!(stopped["guest"]["generation"].as_u64().unwrap() >= generation);

    // What could be archived was; the rest was not.
    d.start_guest(G, PASS);
    let dir = d.runtime_dir.join(G);
    assert_eq!(std::fs::read(dir.join("extra")).unwrap(), b"kept\n");
    for stray in ["a b", "sub", "fifo", "link"] {
        assert!(
            std::fs::symlink_metadata(dir.join(stray)).is_err(),
            "{stray} was restored"
        );
    }
}

/// The largest state a reseal may take costs about two archives of memory
/// (the archive read, and the file it is encrypted into in place), not
/// four: VmHWM grows by well under 3 × 16 MiB.
#[test]
fn a_reseal_of_the_largest_state_holds_about_two_copies_of_it() {
    let d = Daemon::start();
    create(&d);
    d.start_guest(G, PASS);
    let generation = d.guest_status(G)["generation"].as_u64().unwrap();
    let before = peak_rss_kib(d.pid());
    // Not sparse, not compressible: every page is really read and sealed.
    let data: Vec<u8> = (0..16u32 * 1024 * 1024 - 64 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(d.runtime_dir.join(G).join("big"), &data).unwrap();

    d.wait_generation_above(G, generation, Duration::from_secs(60));

    let after = peak_rss_kib(d.pid());
    eprintln!("vtpmd VmHWM: {before} kB before, {after} kB after sealing 16 MiB");
    assert!(
        after < before + 40 * 1024,
        "sealing 16 MiB raised VmHWM from {before} kB to {after} kB"
    );
}
