//! Faults of the file systems under vtpmd: a state file system that fills
//! up or turns read-only while a guest writes its TPM. Real vtpmd, real
//! swtpm, a test VMM writing NV data, real tmpfs mounts (CI runs as root;
//! elsewhere these tests say they were skipped).
//!
//! What an operator must see: the failure reported while the guest runs
//! (its `reason`, a `reseal-failed` event), the writes sealed by a retry
//! as soon as the file system takes them again, without the guest writing
//! anything more, and no write lost, even when the run ends meanwhile.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::nv::{Writer, read_counter};
use common::{Daemon, b64};
use serde_json::{Value, json};

const G1: &str = "4d6f8a02-3e5b-4c7d-8e9f-1a2b3c4d5e6f";
const PASS: &str = "correct horse battery staple";
const TIMEOUT: Duration = Duration::from_secs(10);
/// Retries back off up to 30 s; the first few come within 15 s.
const RETRY_WAIT: Duration = Duration::from_secs(40);

/// A tmpfs of its own, unmounted (then removed) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            println!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("vtfs")
            .tempdir_in("/tmp")
            .unwrap();
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0711"),
                "tmpfs",
            ],
            dir.path(),
        );
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes `dir` (inside this file system) a mount of its own, then
    /// read-only or writable again (`how`: "ro" or "rw"). A bind mount,
    /// because remounting the whole tmpfs read-only is refused while a
    /// file on it is open for writing (vtpmd's own lock), and it is the
    /// guests' sealed files that matter here.
    fn remount(&self, dir: &Path, how: &str) {
        let is_mount = Command::new("mountpoint")
            .arg("-q")
            .arg(dir)
            .status()
            .unwrap()
            .success();
        if !is_mount {
            mount(&["--bind", &dir.display().to_string()], dir);
        }
        mount(&["-o", &format!("remount,bind,{how}")], dir);
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(self.path()).status();
    }
}

fn mount(args: &[&str], at: &Path) {
    let out = Command::new("mount").args(args).arg(at).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        at.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// vtpmd with its state directory on `fs`, G1 created and started, and
/// a VMM attached that has written (and seen sealed) a few values.
fn guest_writing_on(fs: &Tmpfs) -> (Daemon, Writer) {
    let mut d = Daemon::unstarted(common::TEST_CONFIG, None);
    d.state_dir = fs.path().join("state");
    d.restart();
    d.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let running = d.start_guest(G1, PASS);
    let mut vmm = Writer::attach(&ctrl_of(&running));
    vmm.write(3);
    d.wait_generation_above(G1, 1, TIMEOUT);
    (d, vmm)
}

fn ctrl_of(guest: &Value) -> PathBuf {
    PathBuf::from(guest["ctrl_socket"].as_str().unwrap())
}

fn reason_of(guest: &Value) -> String {
    guest["reason"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_full_state_file_system_is_reported_then_retried_until_the_writes_are_sealed() {
    let Some(fs) = Tmpfs::mount("1m") else { return };
    let (d, mut vmm) = guest_writing_on(&fs);
    let mut events = d.events();

    let filler = fs.fill();
    vmm.write(5);
    let (_, failed) = events
        .wait_for(G1, "reseal-failed", TIMEOUT)
        .expect("no reseal-failed event while the state file system is full");
    let detail = failed["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("No space left on device"), "{detail}");
    let status = d.guest_status(G1);
    assert_eq!(status["state"], "running", "{status}");
    let reason = reason_of(&status);
    assert!(
        reason.contains("reseal failed") && reason.contains("not sealed yet"),
        "{reason}"
    );
    let behind = status["generation"].as_u64().unwrap();

    // Space returns; the guest writes nothing more.
    fs::remove_file(&filler).unwrap();
    let (_, recovered) = events
        .wait_for(G1, "resealed", RETRY_WAIT)
        .expect("the writes were not sealed once space returned");
    let detail = recovered["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("sealed again after"), "{detail}");
    let status = d.guest_status(G1);
    assert!(status["generation"].as_u64().unwrap() > behind, "{status}");
    assert!(status["reason"].is_null(), "{status}");

    let last = vmm.quit();
    d.wait_state(G1, "stopped", TIMEOUT);
    let next = d.start_guest(G1, PASS);
    assert_eq!(
        read_counter(&ctrl_of(&next)),
        last,
        "acknowledged writes lost"
    );
}

#[test]
fn a_read_only_state_file_system_keeps_the_writes_through_a_stop_for_the_next_start() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let (d, mut vmm) = guest_writing_on(&fs);
    let mut events = d.events();

    let guests = d.state_dir.join("guests");
    fs.remount(&guests, "ro");
    vmm.write(4);
    let (_, failed) = events
        .wait_for(G1, "reseal-failed", TIMEOUT)
        .expect("no reseal-failed event while the state file system is read-only");
    let detail = failed["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("Read-only file system"), "{detail}");
    let last = vmm.acknowledged;

    // The run ends while the writes are not sealed: the guest fails with
    // the reason, and its runtime directory (the only copy) stays.
    let stopped = d.client().manager("Stop", json!({"guest": G1}));
    println!("Stop while read-only: {stopped:?}");
    let status = d.wait_state(G1, "failed", TIMEOUT);
    let failure = status["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("final reseal failed"), "{failure}");
    let runtime = d.runtime_dir.join(G1);
    assert!(
        fs::read_dir(&runtime).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".permall")),
        "the runtime directory with the unsealed writes is gone"
    );

    fs.remount(&guests, "rw");
    let next = d.start_guest(G1, PASS);
    assert_eq!(
        read_counter(&ctrl_of(&next)),
        last,
        "acknowledged writes lost"
    );
}

/// Every guest's runtime directory shares one file system (`/run` in
/// production). When it is full, a swtpm that cannot store its state
/// answers TPM_RC_FAILURE from then on and has lost the write: that guest
/// is `failed`, not `stopped`, once its run ends, with swtpm's words.
#[test]
fn a_swtpm_that_could_not_store_its_state_is_reported_failed() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let d = Daemon::start_on(common::TEST_CONFIG, Some(fs.path().join("run")));
    d.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let running = d.start_guest(G1, PASS);
    let mut vmm = Writer::attach(&ctrl_of(&running));
    vmm.write(2);
    let mut events = d.events();

    let _filler = fs.fill();
    let cmd = vtpmd::swtpm::ctrl::tpm::tpm2_nv_write(common::nv::NV_INDEX, &9u64.to_be_bytes(), 0)
        .unwrap();
    let rc = vmm.vmm.transact(&cmd).unwrap().rc;
    println!("NV_Write on a full runtime file system: rc {rc:#x}");
    let (_, event) = events
        .wait_for(G1, "store-failed", TIMEOUT)
        .expect("no store-failed event");
    println!("{event}");
    let status = d.guest_status(G1);
    assert!(reason_of(&status).contains("could not store"), "{status}");

    let _ = vmm.quit();
    let status = d.wait_state(G1, "failed", TIMEOUT);
    let failure = status["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("could not store"), "{failure}");
}

/// The lost write outlives the vtpmd that read swtpm's words: a vtpmd
/// started after it adopts the swtpm with the reason (from the run record),
/// and the run still ends `failed`.
#[test]
fn a_lost_write_is_still_reported_after_vtpmd_restarts() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let mut d = Daemon::start_on(common::TEST_CONFIG, Some(fs.path().join("run")));
    d.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let running = d.start_guest(G1, PASS);
    let mut vmm = Writer::attach(&ctrl_of(&running));
    vmm.write(2);
    let mut events = d.events();
    let filler = fs.fill();
    let cmd = vtpmd::swtpm::ctrl::tpm::tpm2_nv_write(common::nv::NV_INDEX, &9u64.to_be_bytes(), 0)
        .unwrap();
    let _ = vmm.vmm.transact(&cmd).unwrap();
    events
        .wait_for(G1, "store-failed", TIMEOUT)
        .expect("no store-failed event");
    drop(events);
    // Room again, so that only the record can carry the failure over.
    std::fs::remove_file(&filler).unwrap();

    d.restart();
    let status = d.guest_status(G1);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(
        status["pid"], running["pid"],
        "not the same swtpm: {status}"
    );
    assert!(reason_of(&status).contains("could not store"), "{status}");

    let _ = vmm.quit();
    let status = d.wait_state(G1, "failed", TIMEOUT);
    let failure = status["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("could not store"), "{failure}");
}
