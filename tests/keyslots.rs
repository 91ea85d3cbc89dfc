//! Host identity and keyslot kinds on the real daemon: GetHostKey, Create
//! with each policy, Start with a key or with this host's key, Grant to a
//! second daemon (a second host), Revoke, and the refusals.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use base64ct::{Base64, Encoding};
use common::{Daemon, assert_error};
use serde_json::{Value, json};

fn host_key(d: &Daemon) -> Value {
    d.client().manager("GetHostKey", json!({})).unwrap()
}

#[test]
fn each_host_has_one_key_kept_across_restarts_and_its_file_is_root_only() {
    let mut d = Daemon::start();
    let first = host_key(&d);
    let public = Base64::decode_vec(first["public_key"].as_str().unwrap()).unwrap();
    assert_eq!(public.len(), 32);
    assert_eq!(first["fingerprint"].as_str().unwrap().len(), 32);
    let path = d.state_dir.join("host.key");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    assert_eq!(meta.len(), 42);

    d.restart();
    assert_eq!(host_key(&d), first, "the same key after a restart");
    let text = d.vtpmctl(&["host-key"]);
    assert!(
        text.contains(first["public_key"].as_str().unwrap()),
        "{text}"
    );
    let as_json: Value = serde_json::from_str(&d.vtpmctl(&["host-key", "--json"])).unwrap();
    assert_eq!(as_json, first);

    let other = Daemon::start();
    assert_ne!(host_key(&other), first, "two hosts, two keys");
}

#[test]
fn a_damaged_host_key_stops_vtpmd_naming_the_file_and_is_left_alone() {
    let mut d = Daemon::start();
    d.stop();
    let path = d.state_dir.join("host.key");
    let mut bytes = fs::read(&path).unwrap();
    bytes.truncate(40);
    fs::write(&path, &bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = d.start_expecting_failure(&d.root.path().join("again.sock"));
    assert_ne!(code, Some(0));
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("40 bytes"), "{stderr}");
    assert_eq!(fs::read(&path).unwrap(), bytes, "replaced");

    // Readable by others: refused too, not silently fixed.
    let mut d = Daemon::start();
    d.stop();
    let path = d.state_dir.join("host.key");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = d.start_expecting_failure(&d.root.path().join("again.sock"));
    assert_ne!(code, Some(0));
    assert!(stderr.contains("0o644"), "{stderr}");
    let _ = assert_error;
}
