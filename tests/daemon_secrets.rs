//! Secrets leave no trace in the daemon's readable memory: once Start has
//! answered, the passphrase (raw or as the base64 it travelled in) is found
//! nowhere in vtpmd's readable pages; after Stop, neither is the guest's
//! swtpm state key (raw or hex, as handed to swtpm). Pages of locked secret
//! memory (memfd_secret) cannot be read through /proc at all, which is the
//! point.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use common::{Daemon, b64};
use secrecy::ExposeSecret;
use serde_json::json;
use vtpmd::protocol::GuestId;
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{KdfParams, KdfPolicy, SealedPaths, SealedState};

const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASSPHRASE: &str = "Zq8!unmistakable-passphrase-4711-XyZ";

/// Every readable mapping of `pid`; the ones the kernel will not let us
/// read (secretmem, guard pages, vsyscall) are skipped and counted.
fn readable_memory(pid: i32) -> (Vec<Vec<u8>>, usize) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut regions = Vec::new();
    let mut unreadable = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let range = fields.next().unwrap();
        let perms = fields.next().unwrap();
        if !perms.starts_with('r') {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        let read = mem
            .seek(SeekFrom::Start(start))
            .and_then(|_| mem.read_exact(&mut buf));
        match read {
            Ok(()) => regions.push(buf),
            Err(_) => unreadable += 1,
        }
    }
    (regions, unreadable)
}

fn occurrences(regions: &[Vec<u8>], needle: &[u8]) -> usize {
    regions
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .filter(|&(i, &b)| b == needle[0] && r[i..].starts_with(needle))
                .count()
        })
        .sum()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn no_passphrase_after_start_and_no_key_after_stop_in_readable_memory() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: reading a non-dumpable daemon's memory needs root");
        return;
    }
    let d = Daemon::start();
    let mut c = d.client();
    c.manager(
        "Create",
        json!({"guest": GUEST, "version": "2.0", "passphrase": b64(PASSPHRASE)}),
    )
    .unwrap();
    let running = c
        .manager(
            "Start",
            json!({"guest": GUEST, "passphrase": b64(PASSPHRASE)}),
        )
        .unwrap();
    assert_eq!(running["guest"]["state"], "running");

    let (regions, unreadable) = readable_memory(d.pid());
    let scanned: usize = regions.iter().map(Vec::len).sum();
    eprintln!(
        "after Start: scanned {} KiB in {} regions, {unreadable} unreadable",
        scanned / 1024,
        regions.len()
    );
    // A control: the guest id went through the same buffers and is there.
    assert!(
        occurrences(&regions, GUEST.as_bytes()) > 0,
        "the scan finds nothing at all"
    );
    assert_eq!(
        occurrences(&regions, PASSPHRASE.as_bytes()),
        0,
        "passphrase in readable memory"
    );
    assert_eq!(
        occurrences(&regions, b64(PASSPHRASE).as_bytes()),
        0,
        "base64 passphrase in readable memory"
    );

    c.manager("Stop", json!({"guest": GUEST})).unwrap();
    // The key the daemon held while the guest ran, derived here from the
    // sealed file with the passphrase.
    let mut pass = SecretBuf::with_capacity(PASSPHRASE.len()).unwrap();
    pass.extend_from_slice(PASSPHRASE.as_bytes()).unwrap();
    let policy = KdfPolicy {
        params: KdfParams::new(64, 1, 1).unwrap(),
        allow_weak: true,
    };
    let sealed = SealedState::open(
        SealedPaths::new(d.sealed_file(GUEST)),
        GuestId::parse(GUEST).unwrap(),
        &pass,
        &policy,
    )
    .unwrap();
    let key = sealed.state.swtpm_state_key().unwrap();

    let (regions, _) = readable_memory(d.pid());
    assert_eq!(
        occurrences(&regions, key.expose_secret()),
        0,
        "state key in readable memory"
    );
    assert_eq!(
        occurrences(&regions, hex(key.expose_secret()).as_bytes()),
        0,
        "hex state key in readable memory"
    );
    assert_eq!(occurrences(&regions, PASSPHRASE.as_bytes()), 0);
}
