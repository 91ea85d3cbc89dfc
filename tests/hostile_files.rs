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
