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

const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const G2: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASS: &str = "the owner's passphrase";

fn key_b64(byte: u8) -> String {
    Base64::encode_string(&[byte; 32])
}

fn create(d: &Daemon, guest: &str, extra: Value) -> Value {
    let mut params = json!({"guest": guest, "version": "2.0", "passphrase": common::b64(PASS)});
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    d.client().manager("Create", params).unwrap()["guest"].clone()
}

fn kinds(guest: &Value) -> Vec<String> {
    guest["keyslots"]
        .as_array()
        .unwrap_or_else(|| panic!("no keyslots in {guest}"))
        .iter()
        .map(|s| s["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn start(d: &Daemon, guest: &str, params: Value) -> Result<Value, common::Remote> {
    let mut p = json!({"guest": guest});
    for (k, v) in params.as_object().unwrap() {
        p[k] = v.clone();
    }
    d.client().manager("Start", p)
}

fn stop(d: &Daemon, guest: &str) {
    d.client().manager("Stop", json!({"guest": guest})).unwrap();
}

fn version_of(d: &Daemon, guest: &str) -> u16 {
    let bytes = fs::read(d.sealed_file(guest)).unwrap();
    u16::from_be_bytes([bytes[8], bytes[9]])
}

#[test]
fn create_with_each_policy_and_start_with_what_each_allows() {
    let d = Daemon::start();
    let me = host_key(&d);

    // user: the passphrase only; nothing else starts it.
    let user = create(&d, G, json!({}));
    assert_eq!(kinds(&user), ["argon2id-passphrase"]);
    assert_eq!(
        version_of(&d, G),
        1,
        "a passphrase-only file stays version 1"
    );
    let refused = assert_error(start(&d, G, json!({})), "NoKeyslot");
    assert_eq!(refused.parameters["kind"], "host", "{refused:?}");
    assert_eq!(refused.parameters["host_fingerprint"], me["fingerprint"]);
    let refused = assert_error(start(&d, G, json!({"key": key_b64(1)})), "NoKeyslot");
    assert_eq!(refused.parameters["kind"], "key", "{refused:?}");
    assert_eq!(d.guest_status(G)["state"], "stopped");
    d.client().manager("Delete", json!({"guest": G})).unwrap();

    // host: this host starts it with no secret.
    let host = create(&d, G, json!({"policy": "host"}));
    assert_eq!(kinds(&host), ["argon2id-passphrase", "host"]);
    assert_eq!(host["keyslots"][1]["host_fingerprint"], me["fingerprint"]);
    assert_eq!(version_of(&d, G), 2);
    let running = start(&d, G, json!({})).unwrap();
    assert_eq!(running["guest"]["state"], "running", "{running}");
    stop(&d, G);
    // The passphrase still works too, and a key does not.
    assert_eq!(
        start(&d, G, json!({"passphrase": common::b64(PASS)})).unwrap()["guest"]["state"],
        "running"
    );
    stop(&d, G);
    d.client().manager("Delete", json!({"guest": G})).unwrap();

    // deployment: the caller's key starts it, a wrong key does not.
    let deployment = create(&d, G, json!({"policy": "deployment", "key": key_b64(7)}));
    assert_eq!(kinds(&deployment), ["argon2id-passphrase", "key"]);
    let refused = assert_error(start(&d, G, json!({"key": key_b64(8)})), "WrongKey");
    assert_eq!(refused.parameters["kind"], "key", "{refused:?}");
    let running = start(&d, G, json!({"key": key_b64(7)})).unwrap();
    assert_eq!(running["guest"]["state"], "running", "{running}");
    assert_eq!(kinds(&d.guest_status(G)), ["argon2id-passphrase", "key"]);
    // Rekey of a guest started with its key rewraps the passphrase slot,
    // never the key slot.
    d.client()
        .manager(
            "Rekey",
            json!({"guest": G, "passphrase": common::b64(PASS), "new_passphrase": common::b64("new")}),
        )
        .unwrap();
    stop(&d, G);
    assert_eq!(
        start(&d, G, json!({"passphrase": common::b64("new")})).unwrap()["guest"]["state"],
        "running"
    );
    stop(&d, G);
    assert_eq!(
        start(&d, G, json!({"key": key_b64(7)})).unwrap()["guest"]["state"],
        "running"
    );
    stop(&d, G);

    // A deployment without a key, and a key without deployment, are refused.
    for bad in [
        json!({"policy": "deployment"}),
        json!({"key": key_b64(7)}),
        json!({"policy": "owner"}),
    ] {
        let mut params = json!({"guest": G2, "version": "2.0", "passphrase": common::b64(PASS)});
        for (k, v) in bad.as_object().unwrap() {
            params[k] = v.clone();
        }
        assert_error(d.client().manager("Create", params), "InvalidParameter");
    }

    // vtpmctl: create --policy, start --key-file / --host-key, inspect.
    let key_file = d.root.path().join("key");
    fs::write(&key_file, format!("{}\n", key_b64(9))).unwrap();
    let pass_file = d.root.path().join("pass");
    fs::write(&pass_file, PASS).unwrap();
    let k = key_file.to_str().unwrap();
    let p = pass_file.to_str().unwrap();
    d.vtpmctl(&[
        "create",
        G2,
        "--policy",
        "deployment",
        "--key-file",
        k,
        "--passphrase-file",
        p,
    ]);
    let out = d.vtpmctl(&["start", G2, "--key-file", k]);
    assert!(out.contains("running"), "{out}");
    d.vtpmctl(&["stop", G2]);
    let inspect = d.vtpmctl(&["state", "inspect", d.sealed_file(G2).to_str().unwrap()]);
    assert!(inspect.contains("1: key"), "{inspect}");
    assert!(inspect.contains("format version  2"), "{inspect}");
    let status = d.vtpmctl(&["status", G2]);
    assert!(status.contains("1: key"), "{status}");
    let verify = d.vtpmctl(&[
        "state",
        "verify",
        d.sealed_file(G2).to_str().unwrap(),
        "--guest",
        G2,
        "--key-file",
        k,
        "--json",
    ]);
    assert!(verify.contains("\"ok\""), "{verify}");
}

/// Two daemons on one machine are two hosts: the second gets the guest's
/// sealed file (as cold migration would carry it) and opens it with its
/// own host key once the first granted that key.
#[test]
fn grant_lets_a_second_host_start_the_guest_with_its_own_key_and_revoke_takes_it_back() {
    let source = Daemon::start();
    let mut destination = Daemon::start();
    let theirs = host_key(&destination);
    create(&source, G, json!({}));

    // Carried over before any grant: the destination cannot open it.
    let carry = |from: &Daemon, to: &mut Daemon| {
        let dir = to.state_dir.join("guests").join(G);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        fs::copy(from.sealed_file(G), dir.join("tpm.sealed")).unwrap();
        // The registry is rebuilt from the state directory at start.
        to.restart();
    };
    carry(&source, &mut destination);
    let refused = assert_error(start(&destination, G, json!({})), "NoKeyslot");
    assert_eq!(
        refused.parameters["host_fingerprint"],
        theirs["fingerprint"]
    );

    // Grant needs the owner's secret, and the right one.
    let grant = |secret: Value| {
        let mut params = json!({"guest": G, "host_public_key": theirs["public_key"]});
        for (k, v) in secret.as_object().unwrap() {
            params[k] = v.clone();
        }
        source.client().manager("Grant", params)
    };
    assert_error(grant(json!({})), "InvalidParameter");
    assert_error(
        grant(json!({"passphrase": common::b64("wrong")})),
        "WrongPassphrase",
    );
    let granted = grant(json!({"passphrase": common::b64(PASS)})).unwrap();
    assert_eq!(granted["slot"], 1, "{granted}");
    assert_eq!(granted["keyslots"][1]["kind"], "host");
    assert_eq!(
        granted["keyslots"][1]["host_fingerprint"],
        theirs["fingerprint"]
    );
    // Twice: the same one slot.
    let again = grant(json!({"passphrase": common::b64(PASS)})).unwrap();
    assert_eq!(again["slot"], 1);
    assert_eq!(again["keyslots"].as_array().unwrap().len(), 2);
    // The source itself cannot open the destination's slot.
    assert_error(start(&source, G, json!({})), "NoKeyslot");

    carry(&source, &mut destination);
    let running = start(&destination, G, json!({})).unwrap();
    assert_eq!(running["guest"]["state"], "running", "{running}");
    assert_eq!(
        kinds(&destination.guest_status(G)),
        ["argon2id-passphrase", "host"]
    );
    // A bad public key is the caller's fault.
    assert_error(
        source.client().manager(
            "Grant",
            json!({"guest": G, "passphrase": common::b64(PASS), "host_public_key": "A".repeat(44)}),
        ),
        "InvalidParameter",
    );

    // Revoke on the destination while the guest runs there: its own slot
    // opens the state (no secret given), then goes; it keeps running and
    // resealing; the next Start there needs the passphrase.
    let revoked = destination
        .client()
        .manager("Revoke", json!({"guest": G, "slot": 1}))
        .unwrap();
    assert_eq!(
        revoked["keyslots"].as_array().unwrap().len(),
        1,
        "{revoked}"
    );
    assert_eq!(destination.guest_status(G)["state"], "running");
    let generation = destination.guest_status(G)["generation"].as_u64().unwrap();
    fs::write(
        destination.runtime_dir.join(G).join("extra"),
        b"after revoke",
    )
    .unwrap();
    destination.wait_generation_above(G, generation, std::time::Duration::from_secs(20));
    stop(&destination, G);
    assert_eq!(version_of(&destination, G), 1, "back to version 1");
    assert_error(start(&destination, G, json!({})), "NoKeyslot");

    // The last slot never goes; a slot that is not there is named.
    let last = assert_error(
        destination.client().manager(
            "Revoke",
            json!({"guest": G, "slot": 0, "passphrase": common::b64(PASS)}),
        ),
        "LastKeyslot",
    );
    assert_eq!(last.parameters["slot"], 0);
    assert_error(
        destination.client().manager(
            "Revoke",
            json!({"guest": G, "slot": 3, "passphrase": common::b64(PASS)}),
        ),
        "NoSuchKeyslot",
    );
    assert_eq!(
        start(&destination, G, json!({"passphrase": common::b64(PASS)})).unwrap()["guest"]["state"],
        "running"
    );
    stop(&destination, G);

    // vtpmctl grant and revoke on the source.
    let pass_file = source.root.path().join("pass");
    fs::write(&pass_file, PASS).unwrap();
    let p = pass_file.to_str().unwrap();
    let out = source.vtpmctl(&[
        "grant",
        G,
        "--host-public-key",
        theirs["public_key"].as_str().unwrap(),
        "--passphrase-file",
        p,
    ]);
    assert!(out.contains("1: host"), "{out}");
    let out = source.vtpmctl(&["revoke", G, "1", "--passphrase-file", p]);
    assert!(!out.contains("host"), "{out}");
}

/// A `host` policy guest needs no key back across a vtpmd restart: the
/// adopted swtpm is resealed at once with this host's key, where a `user`
/// guest waits for a Start with its passphrase.
#[test]
fn after_a_restart_without_its_key_a_host_policy_guest_goes_on_resealing() {
    let mut d = Daemon::start();
    create(&d, G, json!({"policy": "host"}));
    create(&d, G2, json!({}));
    let host_run = start(&d, G, json!({})).unwrap()["guest"].clone();
    let user_run =
        start(&d, G2, json!({"passphrase": common::b64(PASS)})).unwrap()["guest"].clone();
    // Each VMM stays attached: swtpm ends when its data channel closes.
    let _vmm_host = common::nv::attach_and_write_nv(
        std::path::Path::new(host_run["ctrl_socket"].as_str().unwrap()),
        b"before",
    );
    let _vmm_user = common::nv::attach_and_write_nv(
        std::path::Path::new(user_run["ctrl_socket"].as_str().unwrap()),
        b"before",
    );
    // A restart with no service manager's fd store: no key comes back.
    d.restart();
    let host = d.guest_status(G);
    assert_eq!(host["state"], "running", "{host}");
    assert_eq!(host["pid"], host_run["pid"], "the same swtpm, adopted");
    assert!(host.get("reason").is_none(), "{host}");
    let user = d.guest_status(G2);
    assert_eq!(user["state"], "running", "{user}");
    assert!(
        user["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("key needed"),
        "{user}"
    );
    // And the host guest's writes are sealed again.
    let generation = host["generation"].as_u64().unwrap();
    fs::write(d.runtime_dir.join(G).join("extra"), b"after the restart").unwrap();
    d.wait_generation_above(G, generation, std::time::Duration::from_secs(20));
}

#[test]
fn a_copy_from_before_a_revoke_is_refused_as_a_rollback() {
    let d = Daemon::start();
    create(&d, G, json!({}));
    const LEAKED: &str = "a passphrase that leaked";
    let added = d
        .client()
        .manager(
            "Rekey",
            json!({"guest": G, "passphrase": common::b64(PASS), "new_passphrase": common::b64(LEAKED)}),
        )
        .unwrap();
    assert!(added["left_as_is"].is_null(), "{added}");
    // The copy someone kept while the leaked passphrase opened it.
    let kept = fs::read(d.sealed_file(G)).unwrap();
    let kept_at = d.guest_status(G)["generation"].as_u64().unwrap();
    d.client()
        .manager(
            "Rekey",
            json!({"guest": G, "passphrase": common::b64(LEAKED), "new_passphrase": common::b64(PASS)}),
        )
        .unwrap();
    // A keyslot change is a generation of its own.
    let now = d.guest_status(G)["generation"].as_u64().unwrap();
    assert_eq!(now, kept_at + 1);
    fs::write(d.sealed_file(G), &kept).unwrap();
    let refused = assert_error(
        start(&d, G, json!({"passphrase": common::b64(LEAKED)})),
        "StaleGeneration",
    );
    assert_eq!(refused.parameters["generation"], kept_at, "{refused:?}");
    assert_eq!(refused.parameters["current"], now, "{refused:?}");
    assert!(common::swtpms_under(&d.runtime_dir).is_empty());
}
