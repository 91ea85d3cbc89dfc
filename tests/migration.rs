//! Live migration between two hosts (two real vtpmd daemons on their own
//! state and runtime directories and host keys), with no passphrase: the
//! source's MigrateOut, the destination's MigrateIn, and QEMU's part (the
//! state blobs read from the source's swtpm and set into the
//! destination's, as QEMU 7.2's tpm_emulator does) played by the test
//! through the real control channels. Then the refusals, and a migration
//! called off on both sides.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::live::{read_blobs, set_blobs};
use common::{Daemon, b64};
use serde_json::{Value, json};
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};
use vtpmd::swtpm::ctrl::{DataChannel, TpmResponse, Vmm};

const G: &str = "7c2d9e4f-3a1b-4c5d-8e6f-0a1b2c3d4e5f";
const OTHER: &str = "8d3e0f5a-4b2c-4d6e-9f70-1b2c3d4e5f60";
const PASS: &str = "migrate me";
const INDEX: u32 = common::nv::NV_INDEX;
const MARKER: &[u8] = b"nv-bytes-that-never-travel-in-clear-0077";
const TIMEOUT: Duration = Duration::from_secs(20);
/// The destination seals above the source's generation by this much.
const LEAP: u64 = 1 << 20;

fn ctrl_of(guest: &Value) -> PathBuf {
    PathBuf::from(guest["ctrl_socket"].as_str().unwrap())
}

fn host_key(d: &Daemon) -> String {
    d.client().manager("GetHostKey", json!({})).unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A running guest on `d` whose VMM (returned, attached) has written
/// [`MARKER`] into an NV index.
fn running_guest(d: &Daemon, guest: &str) -> Vmm {
    d.client()
        .manager(
            "Create",
            json!({"guest": guest, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
    let running = d.start_guest(guest, PASS);
    let mut vmm = Vmm::attach(&ctrl_of(&running), TIMEOUT).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    let attrs = nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
    let len = u16::try_from(MARKER.len()).unwrap();
    let define = tpm::tpm2_nv_define_space(INDEX, attrs, len);
    assert_eq!(vmm.transact(&define).unwrap().rc, 0);
    let write = tpm::tpm2_nv_write(INDEX, MARKER, 0).unwrap();
    assert_eq!(vmm.transact(&write).unwrap().rc, 0);
    vmm
}

fn migrate_out(d: &Daemon, guest: &str, destination: &str) -> Value {
    d.client()
        .manager(
            "MigrateOut",
            json!({"guest": guest, "destination": destination}),
        )
        .unwrap()
}

fn nv_read(data: &mut DataChannel) -> Vec<u8> {
    let len = u16::try_from(MARKER.len()).unwrap();
    let bytes = data
        .transact(&tpm::tpm2_nv_read(INDEX, len, 0), TIMEOUT)
        .unwrap();
    let read = TpmResponse::parse(&bytes).unwrap();
    assert_eq!(read.rc, 0, "NV_Read");
    read.tpm2_nv_data().unwrap().to_vec()
}

fn refusal(result: Result<Value, common::Remote>) -> String {
    let remote = common::assert_error(result, "MigrationRefused");
    remote.parameters["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Every file under `dir`, with its bytes: what "nothing changed" compares.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_running_guest_moves_to_another_host_with_its_state_and_no_passphrase() {
    let a = Daemon::start();
    let b = Daemon::start();
    let mut vmm = running_guest(&a, G);

    let out = migrate_out(&a, G, &host_key(&b));
    let generation = out["generation"].as_u64().unwrap();
    let source = a.guest_status(G);
    assert_eq!(source["state"], "running", "{source}");
    assert!(
        source["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("migrating out"),
        "{source}"
    );

    let incoming = b
        .client()
        .manager(
            "MigrateIn",
            json!({"guest": G, "ticket": out["ticket"], "sealed": out["sealed"]}),
        )
        .unwrap();
    assert_eq!(incoming["guest"]["state"], "running", "{incoming}");

    // What QEMU's stream carries: no NV byte in clear (swtpm encrypts the
    // blobs under the migration key).
    let blobs = read_blobs(&mut vmm);
    for (blob, got) in &blobs {
        assert!(
            !got.data
                .as_bytes()
                .windows(MARKER.len())
                .any(|w| w == MARKER),
            "{blob:?} carries the NV bytes in clear"
        );
    }
    let (_dst_ctrl, mut data) = set_blobs(&ctrl_of(&incoming["guest"]), blobs);
    // No TPM2_Startup: the volatile state moved, the TPM runs on.
    assert_eq!(nv_read(&mut data), MARKER);

    // The destination reseals what it took in, above the source's history.
    let sealed_there = b.wait_generation_above(G, generation + LEAP - 1, TIMEOUT);
    assert!(sealed_there >= generation + LEAP, "{sealed_there}");
    assert_eq!(
        b.guest_status(G)["reason"].as_str().unwrap_or_default(),
        "migrating in: its swtpm waits for the VMM's state (QEMU -incoming)"
    );

    // The source's VMM is gone once the VM has moved: migrated-out there.
    vmm.shutdown().unwrap();
    let moved = a.wait_state(G, "migrated-out", TIMEOUT);
    assert!(
        moved["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("migrated out to host"),
        "{moved}"
    );
    let again = a
        .client()
        .manager("Start", json!({"guest": G, "passphrase": b64(PASS)}));
    common::assert_error(again, "MigratedOut");
    a.client().manager("Delete", json!({"guest": G})).unwrap();
    assert!(!a.sealed_file(G).exists());

    // A replayed ticket is refused, even on the right host.
    let replay = b.client().manager(
        "MigrateIn",
        json!({"guest": G, "ticket": out["ticket"], "sealed": out["sealed"]}),
    );
    assert!(refusal(replay).contains("used before"));

    // The guest's own TPM on the destination: after its VMM leaves and a
    // Start with the passphrase, the NV data is there.
    drop(data);
    drop(_dst_ctrl);
    b.wait_state(G, "stopped", TIMEOUT);
    let restarted = b.start_guest(G, PASS);
    assert_eq!(
        common::nv::read_nv(&ctrl_of(&restarted), MARKER.len()),
        MARKER
    );
}

#[test]
fn ticket_misuse_is_refused_and_changes_nothing() {
    let a = Daemon::start();
    let b = Daemon::start();
    let c = Daemon::start();
    let _vmm = running_guest(&a, G);
    let out = migrate_out(&a, G, &host_key(&b));
    let before_c = snapshot(&c.state_dir);
    let before_b = snapshot(&b.state_dir);

    // Another host's ticket.
    let there = c.client().manager(
        "MigrateIn",
        json!({"guest": G, "ticket": out["ticket"], "sealed": out["sealed"]}),
    );
    assert!(refusal(there).contains("not this one"));
    // For another guest.
    let other = b.client().manager(
        "MigrateIn",
        json!({"guest": OTHER, "ticket": out["ticket"], "sealed": out["sealed"]}),
    );
    assert!(refusal(other).contains("is for guest"));
    // An altered ticket.
    let mut bent = base64ct_decode(out["ticket"].as_str().unwrap());
    let last = bent.len() - 1;
    bent[last] ^= 1;
    let altered = b.client().manager(
        "MigrateIn",
        json!({"guest": G, "ticket": base64ct_encode(&bent), "sealed": out["sealed"]}),
    );
    assert!(refusal(altered).contains("does not open"));
    // A ticket that expired.
    let short = a
        .client()
        .manager(
            "MigrateOut",
            json!({"guest": G, "destination": host_key(&b), "ttl_seconds": 0}),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let expired = b.client().manager(
        "MigrateIn",
        json!({"guest": G, "ticket": short["ticket"], "sealed": short["sealed"]}),
    );
    assert!(refusal(expired).contains("expired"));
    // A sealed file that is not the ticket's (an earlier generation).
    let mismatched = b.client().manager(
        "MigrateIn",
        json!({"guest": G, "ticket": short["ticket"], "sealed": out["sealed"]}),
    );
    assert!(mismatched.is_err());
    // To this very host.
    let own = a.client().manager(
        "MigrateOut",
        json!({"guest": G, "destination": host_key(&a)}),
    );
    assert!(refusal(own).contains("this host's own"));

    assert_eq!(snapshot(&c.state_dir), before_c, "host C changed");
    assert_eq!(snapshot(&b.state_dir), before_b, "host B changed");
    assert_eq!(
        b.client().manager("List", json!({})).unwrap()["guests"],
        json!([])
    );
}

#[test]
fn a_migration_called_off_leaves_the_source_running_and_the_destination_empty() {
    let a = Daemon::start();
    let mut b = Daemon::start();
    let mut vmm = running_guest(&a, G);
    let out = migrate_out(&a, G, &host_key(&b));
    let incoming = b
        .client()
        .manager(
            "MigrateIn",
            json!({"guest": G, "ticket": out["ticket"], "sealed": out["sealed"]}),
        )
        .unwrap();
    let pid = incoming["guest"]["pid"].as_u64().unwrap();
    // QEMU's migration failed: the orchestrator calls it off on both.
    b.client()
        .manager("AbortMigration", json!({"guest": G}))
        .unwrap();
    common::assert_error(
        b.client().manager("Status", json!({"guest": G})),
        "NoSuchGuest",
    );
    assert!(!common::is_alive(i32::try_from(pid).unwrap()), "swtpm left");
    assert!(common::swtpms_under(&b.runtime_dir).is_empty());
    assert!(!b.sealed_file(G).exists(), "sealed file left");
    let left: Vec<_> = std::fs::read_dir(&b.runtime_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(G))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The ticket stays used across a restart of the destination: replayed
    // there within its life, it is refused and nothing is taken in.
    b.restart();
    let replay = b.client().manager(
        "MigrateIn",
        json!({"guest": G, "ticket": out["ticket"], "sealed": out["sealed"]}),
    );
    assert!(refusal(replay).contains("used before"));
    assert!(!b.sealed_file(G).exists(), "the replay was taken in");

    let source = a
        .client()
        .manager("AbortMigration", json!({"guest": G}))
        .unwrap();
    assert_eq!(source["guest"]["state"], "running");
    assert!(source["guest"]["reason"].is_null(), "{source}");
    // The source goes on: its writes are sealed, and when its VMM quits
    // the guest is stopped, not migrated-out.
    let changed = b"nv-bytes-written-after-the-call-off-0078";
    let write = tpm::tpm2_nv_write(INDEX, changed, 0).unwrap();
    assert_eq!(vmm.transact(&write).unwrap().rc, 0);
    a.wait_generation_above(G, out["generation"].as_u64().unwrap(), TIMEOUT);
    vmm.shutdown().unwrap();
    a.wait_state(G, "stopped", TIMEOUT);
}

fn base64ct_decode(text: &str) -> Vec<u8> {
    use base64ct::{Base64, Encoding};
    Base64::decode_vec(text).unwrap()
}

fn base64ct_encode(bytes: &[u8]) -> String {
    use base64ct::{Base64, Encoding};
    Base64::encode_string(bytes)
}

/// The same by hand with vtpmctl: `migrate-out --to KEY --out BUNDLE` on
/// the source (the bundle 0600, its ticket for that host only),
/// `migrate-in GUEST BUNDLE` on the destination, `abort-migration` on
/// both, and `host-key` to get the destination's key.
#[test]
fn vtpmctl_carries_a_migration_in_a_bundle_and_calls_it_off() {
    use std::os::unix::fs::PermissionsExt;
    let a = Daemon::start();
    let b = Daemon::start();
    let _vmm = running_guest(&a, G);
    let key: Value = serde_json::from_str(&b.vtpmctl(&["host-key", "--json"])).unwrap();
    let key = key["public_key"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.json");
    let bundle_arg = bundle.to_str().unwrap();
    a.vtpmctl(&["migrate-out", G, "--to", &key, "--out", bundle_arg]);
    let mode = std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let written: Value = serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    assert_eq!(written["guest"], G);

    let incoming: Value =
        serde_json::from_str(&b.vtpmctl(&["migrate-in", G, bundle_arg, "--json"])).unwrap();
    assert_eq!(incoming["guest"]["state"], "running", "{incoming}");
    b.vtpmctl(&["abort-migration", G]);
    common::assert_error(
        b.client().manager("Status", json!({"guest": G})),
        "NoSuchGuest",
    );
    a.vtpmctl(&["abort-migration", G]);
    assert!(a.guest_status(G)["reason"].is_null());
}
