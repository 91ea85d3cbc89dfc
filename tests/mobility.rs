//! Mobility on real processes: two vtpmd daemons on one machine stand for
//! two hosts (each its own state and runtime directories), and a guest's
//! TPM moves between them through Export and Import: cold migration,
//! shelve/unshelve, evacuation after a host died, rescue/rebuild in place,
//! and every refusal, each proven to change nothing on either host.
//!
//! The guest's NV data is written and read back by the example VMM
//! (`examples/vmm.rs`, built here if `cargo test` did not build it), which
//! attaches to the control socket as QEMU does; where a VMM must stay
//! attached while something happens, the test plays it through the same
//! library (`common::nv`).

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64ct::{Base64, Encoding};
use common::{Daemon, assert_error, b64, nv};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const G2: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";
const PASS: &str = "the owner's secret";
const TIMEOUT: Duration = Duration::from_secs(20);

/// The example VMM, built beside the test binaries.
fn vmm_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bins = Path::new(env!("CARGO_BIN_EXE_vtpmd")).parent().unwrap();
        let path = bins.join("examples").join("vmm");
        if !path.exists() {
            // `cargo test --test mobility` builds no examples. The binaries'
            // directory is named for the profile they were built with
            // ("debug" for dev).
            let profile = match bins.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => "dev",
                Some(other) => other,
            };
            let status = Command::new(env!("CARGO"))
                .args(["build", "--example", "vmm", "--profile", profile])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .unwrap();
            assert!(status.success(), "cargo build --example vmm: {status}");
        }
        path
    })
}

/// Runs the example VMM against a control socket; its stdout.
fn vmm(ctrl: &str, action: &str, arg: &str) -> String {
    let out = Command::new(vmm_binary())
        .args([ctrl, action, arg])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vmm {action} {arg}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Starts the guest, has the example VMM write `text` into its NV index
/// and quit (as QEMU does when the VM ends), and waits until the guest's
/// swtpm is gone and its state sealed.
fn write_nv_and_quit(d: &Daemon, guest: &str, text: &str) {
    let started = d.start_guest(guest, PASS);
    let out = vmm(started["ctrl_socket"].as_str().unwrap(), "write", text);
    // A second write finds the index defined (NV_DefineSpace fails) and
    // writes it anew: texts of one length.
    let line = out
        .lines()
        .find(|l| l.contains("NV_Write"))
        .unwrap_or_default();
    assert!(line.ends_with("rc=0x0"), "{out}");
    d.wait_state(guest, "stopped", TIMEOUT);
}

/// Starts the guest with its passphrase and has the example VMM read the
/// NV index back; the text read. The guest is stopped again afterwards.
fn start_and_read_nv(d: &Daemon, guest: &str, len: usize) -> String {
    let started = d.start_guest(guest, PASS);
    assert_eq!(started["state"], "running", "{started}");
    let out = vmm(
        started["ctrl_socket"].as_str().unwrap(),
        "read",
        &len.to_string(),
    );
    d.wait_state(guest, "stopped", TIMEOUT);
    let line = out
        .lines()
        .find(|l| l.contains("NV_Read"))
        .unwrap_or_else(|| panic!("no NV_Read in {out}"));
    assert!(line.contains("rc=0x0"), "{line}");
    let quoted = line.split_once("-> ").unwrap().1;
    serde_json::from_str::<String>(quoted).unwrap()
}

fn create(d: &Daemon, guest: &str) -> Value {
    d.create_guest(guest, PASS)
}

/// Export over Varlink: the file and its generation.
fn export(d: &Daemon, guest: &str) -> (Vec<u8>, u64) {
    let reply = d
        .client()
        .manager("Export", json!({"guest": guest}))
        .unwrap();
    let sealed = Base64::decode_vec(reply["sealed"].as_str().unwrap()).unwrap();
    (sealed, reply["generation"].as_u64().unwrap())
}

fn import(d: &Daemon, guest: &str, sealed: &[u8]) -> Result<Value, common::Remote> {
    d.client().manager(
        "Import",
        json!({"guest": guest, "sealed": Base64::encode_string(sealed)}),
    )
}

/// Every file under `dir`: its path, kind, mode, owner and a digest of its
/// content, so that "nothing changed" can be asserted of a whole host.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.is_dir() {
                todo.push(path.clone());
                "dir".to_owned()
            } else if meta.is_file() {
                let digest = Sha256::digest(std::fs::read(&path).unwrap());
                format!("file {digest:02x?}")
            } else {
                "other".to_owned()
            };
            let rel = path.strip_prefix(dir).unwrap().to_owned();
            out.insert(
                rel,
                format!("{what} {:o} {}:{}", meta.mode(), meta.uid(), meta.gid()),
            );
        }
    }
    out
}

fn header_generation(sealed: &[u8]) -> u64 {
    u64::from_be_bytes(sealed[26..34].try_into().unwrap())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
fn cold_migration_moves_the_tpm_and_its_nv_data_to_the_other_host() {
    let (a, b) = (Daemon::start(), Daemon::start());
    create(&a, G1);
    write_nv_and_quit(&a, G1, "cold migration");
    let on_a = a.guest_status(G1)["generation"].as_u64().unwrap();

    // Export on A (stopped: the file as it is), by vtpmctl to a file.
    let file = a.root.path().join("moving.sealed");
    let out = a.vtpmctl(&["export", G1, "--out", file.to_str().unwrap()]);
    assert!(out.contains(&format!("generation {on_a}")), "{out}");
    let sealed = std::fs::read(&file).unwrap();
    assert_eq!(sealed, std::fs::read(a.sealed_file(G1)).unwrap());
    assert_eq!(header_generation(&sealed), on_a);

    // Import on B: registered stopped, at A's generation, no passphrase.
    let began = Instant::now();
    let out = b.vtpmctl(&["--json", "import", G1, file.to_str().unwrap()]);
    let import_ms = ms(began.elapsed());
    let imported: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(imported["guest"]["state"], "stopped", "{imported}");
    assert_eq!(imported["guest"]["generation"], on_a);
    assert_eq!(std::fs::read(b.sealed_file(G1)).unwrap(), sealed);
    // The swtpm uid is recorded as Create records it.
    let owner = std::fs::read_to_string(b.state_dir.join("guests").join(G1).join("owner"));
    if nix::unistd::geteuid().is_root() {
        assert!(owner.unwrap().starts_with("uid="));
    }

    // Start on B with the passphrase: the NV data A's guest wrote is there.
    assert_eq!(start_and_read_nv(&b, G1, 14), "cold migration");
    // The migration done, A drops its copy; Delete after Export works.
    a.client().manager("Delete", json!({"guest": G1})).unwrap();
    assert!(!a.state_dir.join("guests").join(G1).exists());
    eprintln!(
        "cold migration: sealed file {} bytes (generation {on_a}); vtpmctl import {import_ms:.1} ms",
        sealed.len()
    );
}

#[test]
fn an_export_of_a_running_guest_holds_every_write_its_vmm_saw_acknowledged() {
    // Reseals are put off for 3 s: only the Export's own reseal can have
    // sealed the write before the Export answers.
    let a = Daemon::start_with("[supervisor]\nreseal_coalesce_ms = 3000\n");
    let b = Daemon::start();
    create(&a, G1);
    let started = a.start_guest(G1, PASS);
    let before = started["generation"].as_u64().unwrap();
    let ctrl = PathBuf::from(started["ctrl_socket"].as_str().unwrap());
    let vmm = nv::attach_and_write_nv(&ctrl, b"acked before export");
    let mut events = a.events();

    let began = Instant::now();
    let (sealed, generation) = export(&a, G1);
    let export_ms = ms(began.elapsed());
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "the export waited for the resealer"
    );
    assert!(generation > before, "no reseal for the export");
    assert_eq!(header_generation(&sealed), generation);
    assert_eq!(
        a.guest_status(G1)["state"],
        "running",
        "Export stops nothing"
    );
    assert_eq!(
        a.guest_status(G1)["generation"].as_u64().unwrap(),
        generation
    );
    let (_, exported) = events.wait_for(G1, "exported", TIMEOUT).unwrap();
    assert_eq!(
        exported["detail"],
        format!("generation {generation}, resealed for the export")
    );

    // The guest leaves A (its VMM quits), then starts on B from the export.
    vmm.shutdown().unwrap();
    a.wait_state(G1, "stopped", TIMEOUT);
    import(&b, G1, &sealed).unwrap();
    let on_b = b.start_guest(G1, PASS);
    let ctrl_b = PathBuf::from(on_b["ctrl_socket"].as_str().unwrap());
    assert_eq!(nv::read_nv(&ctrl_b, 19), b"acked before export");
    eprintln!("export of a running guest (with its reseal): {export_ms:.1} ms");
}

#[test]
fn shelve_then_unshelve_on_another_host() {
    let (a, mut b) = (Daemon::start(), Daemon::start());
    create(&a, G1);
    write_nv_and_quit(&a, G1, "shelved");
    // Shelve: Export, then Delete on A. Nothing of the guest is left there.
    let (sealed, generation) = export(&a, G1);
    a.client().manager("Delete", json!({"guest": G1})).unwrap();
    assert_error(
        a.client().manager("Status", json!({"guest": G1})),
        "NoSuchGuest",
    );
    assert!(!a.state_dir.join("guests").join(G1).exists());
    assert_eq!(
        a.client().manager("List", json!({})).unwrap()["guests"],
        json!([])
    );
    // Unshelve, later, elsewhere: Import, then Start with the passphrase.
    let info = import(&b, G1, &sealed).unwrap()["guest"].clone();
    assert_eq!(info["generation"], generation);
    assert_eq!(info["state"], "stopped");
    // The import is on disk, not only in B's registry: a restarted vtpmd
    // finds the guest as it left it.
    b.restart();
    assert_eq!(b.guest_status(G1)["generation"], generation);
    assert_eq!(start_and_read_nv(&b, G1, 7), "shelved");
}

#[test]
fn evacuation_starts_the_guest_elsewhere_from_the_dead_hosts_file() {
    let (mut a, b) = (Daemon::start(), Daemon::start());
    create(&a, G1);
    let started = a.start_guest(G1, PASS);
    let before = started["generation"].as_u64().unwrap();
    let ctrl = PathBuf::from(started["ctrl_socket"].as_str().unwrap());
    // The VM is running and has written its TPM when the host dies.
    let _vmm = nv::attach_and_write_nv(&ctrl, b"evacuated");
    // Export reseals what the swtpm wrote: the define and the write may
    // be two reseals, so the first one above `before` may lack the write.
    let (_, sealed_at) = export(&a, G1);
    assert!(sealed_at > before);
    a.kill();
    common::kill_swtpms_under(&a.runtime_dir);
    let deadline = Instant::now() + TIMEOUT;
    while !common::swtpms_under(&a.runtime_dir).is_empty() {
        assert!(Instant::now() < deadline, "A's swtpm survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Shared storage gives B the file as A left it.
    let shared = a.sealed_file(G1);
    let out = b.vtpmctl(&["import", G1, shared.to_str().unwrap()]);
    assert!(out.contains("stopped"), "{out}");
    let on_b = b.start_guest(G1, PASS);
    let ctrl_b = PathBuf::from(on_b["ctrl_socket"].as_str().unwrap());
    assert_eq!(nv::read_nv(&ctrl_b, 9), b"evacuated");
}

/// Evacuation with the `host` policy needs no passphrase: the guest runs on
/// A from A's host slot (Start with nothing), the standby host B was
/// granted a slot while A was alive (the one call that takes the owner's
/// secret, at placement time); A's daemon and swtpm are SIGKILLed; B
/// imports A's file from shared storage and starts it with nothing.
#[test]
fn evacuation_with_a_host_slot_for_the_standby_needs_no_passphrase() {
    let (mut a, b) = (Daemon::start(), Daemon::start());
    a.client()
        .manager(
            "Create",
            json!({"guest": G1, "version": "2.0", "passphrase": b64(PASS), "policy": "host"}),
        )
        .unwrap();
    let started = a.client().manager("Start", json!({"guest": G1})).unwrap()["guest"].clone();
    let b_key = b.client().manager("GetHostKey", json!({})).unwrap()["public_key"].clone();
    a.client()
        .manager(
            "Grant",
            json!({"guest": G1, "passphrase": b64(PASS), "host_public_key": b_key}),
        )
        .unwrap();
    let ctrl = PathBuf::from(started["ctrl_socket"].as_str().unwrap());
    let _vmm = nv::attach_and_write_nv(&ctrl, b"evacuated");
    // Sealed by now: Export reseals what the swtpm wrote (the Grant's
    // generation is above the Start's already, so a wait for the first
    // reseal above it would not say the write is in).
    let (_, sealed_at) = export(&a, G1);
    assert!(sealed_at > started["generation"].as_u64().unwrap());
    a.kill();
    common::kill_swtpms_under(&a.runtime_dir);
    let deadline = Instant::now() + TIMEOUT;
    while !common::swtpms_under(&a.runtime_dir).is_empty() {
        assert!(Instant::now() < deadline, "A's swtpm survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }

    let shared = a.sealed_file(G1);
    b.vtpmctl(&["import", G1, shared.to_str().unwrap()]);
    let on_b = b.client().manager("Start", json!({"guest": G1})).unwrap()["guest"].clone();
    let ctrl_b = PathBuf::from(on_b["ctrl_socket"].as_str().unwrap());
    assert_eq!(nv::read_nv(&ctrl_b, 9), b"evacuated");
}

#[test]
fn rescue_and_rebuild_keep_the_guests_own_tpm() {
    let d = Daemon::start();
    create(&d, G1);
    write_nv_and_quit(&d, G1, "my own TPM");
    // Rescue or rebuild: the VM goes down and comes up again on this host,
    // with the same TPM: Stop (here the VMM quit), Start.
    assert_eq!(start_and_read_nv(&d, G1, 10), "my own TPM");
    let again = d.start_guest(G1, PASS);
    d.client().manager("Stop", json!({"guest": G1})).unwrap();
    assert_eq!(d.guest_status(G1)["state"], "stopped", "{again}");
    assert_eq!(start_and_read_nv(&d, G1, 10), "my own TPM");
}

#[test]
fn every_refused_import_is_typed_and_changes_nothing_on_either_host() {
    let (a, b) = (Daemon::start(), Daemon::start());
    create(&a, G1);
    create(&a, G2);
    write_nv_and_quit(&a, G1, "first!");
    let (first, first_gen) = export(&a, G1);
    import(&b, G1, &first).unwrap();
    write_nv_and_quit(&a, G1, "second");
    let (second, second_gen) = export(&a, G1);
    assert!(second_gen > first_gen);
    let (other, _) = export(&a, G2);

    let unchanged = |what: &str, call: &dyn Fn() -> Result<Value, common::Remote>, error: &str| {
        let (ta, tb) = (tree(&a.state_dir), tree(&b.state_dir));
        let remote = assert_error(call(), error);
        assert_eq!(tree(&a.state_dir), ta, "{what} changed host A");
        assert_eq!(tree(&b.state_dir), tb, "{what} changed host B");
        remote
    };
    // The same generation again, and (once B has the second) an older one.
    let same = unchanged(
        "the same generation",
        &|| import(&b, G1, &first),
        "StaleGeneration",
    );
    assert_eq!(same.parameters["generation"], first_gen);
    assert_eq!(same.parameters["current"], first_gen);
    import(&b, G1, &second).unwrap();
    let older = unchanged(
        "an older generation",
        &|| import(&b, G1, &first),
        "StaleGeneration",
    );
    assert_eq!(
        (
            &older.parameters["generation"],
            &older.parameters["current"]
        ),
        (&json!(first_gen), &json!(second_gen))
    );
    // Another guest's file.
    let mismatch = unchanged(
        "another guest's file",
        &|| import(&b, G1, &other),
        "GuestMismatch",
    );
    assert_eq!(mismatch.parameters["found"], G2);
    assert_eq!(mismatch.parameters["guest"], G1);
    unchanged(
        "another guest's file, for a guest new here",
        &|| import(&b, G2, &first),
        "GuestMismatch",
    );
    // Damaged: a header byte (the checksum catches it), a cut-off body.
    let mut flipped = second.clone();
    flipped[30] ^= 0x10;
    let damaged = unchanged(
        "a damaged header",
        &|| import(&b, G1, &flipped),
        "StateCorrupt",
    );
    assert!(
        damaged.parameters["reason"]
            .as_str()
            .unwrap()
            .contains("imported sealed file"),
        "{}",
        damaged.parameters
    );
    let cut = &second[..second.len() - 1];
    unchanged("a truncated file", &|| import(&b, G1, cut), "StateCorrupt");
    unchanged(
        "not a sealed file",
        &|| import(&b, G2, b"hello"),
        "StateCorrupt",
    );
    let bad = unchanged(
        "invalid base64",
        &|| {
            b.client()
                .manager("Import", json!({"guest": G1, "sealed": "not base64!"}))
        },
        "InvalidParameter",
    );
    assert_eq!(bad.parameters["parameter"], "sealed");
    // Onto a guest that runs on B (A's newest file would be newer).
    write_nv_and_quit(&a, G1, "third!");
    let (third, _) = export(&a, G1);
    b.start_guest(G1, PASS);
    b.wait_state(G1, "running", TIMEOUT);
    let running = unchanged(
        "onto a running guest",
        &|| import(&b, G1, &third),
        "GuestRunning",
    );
    assert_eq!(running.parameters["state"], "running");
    b.client().manager("Stop", json!({"guest": G1})).unwrap();
    // After all that, B still holds the second generation, which opens.
    assert_eq!(start_and_read_nv(&b, G1, 6), "second");
}

#[test]
fn a_damaged_current_file_is_not_exported_and_the_previous_one_is_not_handed_out() {
    let d = Daemon::start();
    create(&d, G1);
    write_nv_and_quit(&d, G1, "two generations");
    let path = d.sealed_file(G1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let before = tree(&d.state_dir);
    let refused = assert_error(
        d.client().manager("Export", json!({"guest": G1})),
        "StateCorrupt",
    );
    let reason = refused.parameters["reason"].as_str().unwrap();
    assert!(
        reason.contains("previous generation") && reason.contains("Start the guest here"),
        "{reason}"
    );
    assert_eq!(tree(&d.state_dir), before, "a refused export changed files");
    // The repair it names: Start falls back (to whatever the previous
    // generation holds), Stop's reseal replaces the damaged file in place.
    let previous = header_generation(
        &std::fs::read(d.state_dir.join("guests").join(G1).join("tpm.sealed.prev")).unwrap(),
    );
    d.start_guest(G1, PASS);
    d.client().manager("Stop", json!({"guest": G1})).unwrap();
    let (sealed, generation) = export(&d, G1);
    assert_eq!(header_generation(&sealed), generation);
    assert_eq!(generation, previous + 1);
    assert_error(
        d.client().manager("Export", json!({"guest": G2})),
        "NoSuchGuest",
    );
}

#[test]
fn a_file_above_max_sealed_bytes_is_refused_both_ways() {
    let small = Daemon::start_with("[api]\nmax_sealed_bytes = 1000\n");
    let other = Daemon::start();
    create(&small, G1);
    let refused = assert_error(
        small.client().manager("Export", json!({"guest": G1})),
        "SealedTooLarge",
    );
    assert_eq!(refused.parameters["limit"], 1000);
    let size = std::fs::metadata(small.sealed_file(G1)).unwrap().len();
    assert_eq!(refused.parameters["size"], size);

    create(&other, G2);
    let (sealed, _) = export(&other, G2);
    let before = tree(&small.state_dir);
    let refused = assert_error(import(&small, G2, &sealed), "SealedTooLarge");
    assert_eq!(refused.parameters["size"], sealed.len());
    // vtpmctl reads the limit from GetCapabilities and sends nothing.
    let file = other.root.path().join("g2.sealed");
    std::fs::write(&file, &sealed).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
        .arg("--socket")
        .arg(&small.socket)
        .args(["--json", "import", G2, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"], "io.vtpmd.Manager.SealedTooLarge", "{reply}");
    assert_eq!(tree(&small.state_dir), before);
    let caps = small
        .client()
        .manager("GetCapabilities", json!({}))
        .unwrap();
    assert_eq!(caps["max_sealed_bytes"], 1000);
}

#[test]
fn a_tpm_with_every_nv_byte_in_use_moves_within_the_default_limits() {
    use vtpmd::swtpm::ctrl::client::Vmm;
    use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};
    let (a, b) = (Daemon::start(), Daemon::start());
    create(&a, G1);
    let fresh = std::fs::metadata(a.sealed_file(G1)).unwrap().len();
    let started = a.start_guest(G1, PASS);
    let ctrl = PathBuf::from(started["ctrl_socket"].as_str().unwrap());
    let mut vmm = Vmm::attach(&ctrl, TIMEOUT).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    let attrs = nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
    let chunk = |i: u32| -> Vec<u8> {
        (0..1024u32)
            .map(|k| u8::try_from((k * 7 + i) % 251).unwrap())
            .collect()
    };
    // 2 KiB indices (libtpms's largest) until the TPM says its NV is full.
    let mut indices = 0;
    loop {
        let index = 0x0150_0100 + indices;
        let rc = vmm
            .transact(&tpm::tpm2_nv_define_space(index, attrs, 2048))
            .unwrap()
            .rc;
        if rc != 0 {
            assert_eq!(rc, 0x14b, "TPM_RC_NV_SPACE expected");
            break;
        }
        for offset in [0u16, 1024] {
            let write = tpm::tpm2_nv_write(index, &chunk(indices), offset).unwrap();
            assert_eq!(vmm.transact(&write).unwrap().rc, 0);
        }
        indices += 1;
        assert!(indices < 1000, "NV never filled");
    }
    vmm.shutdown().unwrap();
    a.wait_state(G1, "stopped", TIMEOUT);

    let began = Instant::now();
    let (sealed, _) = export(&a, G1);
    let export_ms = ms(began.elapsed());
    let base64_len = sealed.len().div_ceil(3) * 4;
    assert!(
        base64_len > 64 * 1024,
        "the full file fits a default message: the limit test proves nothing"
    );
    let began = Instant::now();
    import(&b, G1, &sealed).unwrap();
    let import_ms = ms(began.elapsed());
    let on_b = b.start_guest(G1, PASS);
    let ctrl_b = PathBuf::from(on_b["ctrl_socket"].as_str().unwrap());
    let mut vmm = Vmm::attach(&ctrl_b, TIMEOUT).unwrap();
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
    let last = 0x0150_0100 + indices - 1;
    let read = vmm.transact(&tpm::tpm2_nv_read(last, 1024, 1024)).unwrap();
    assert_eq!(read.rc, 0);
    assert_eq!(read.tpm2_nv_data().unwrap(), chunk(indices - 1));
    vmm.shutdown().unwrap();
    eprintln!(
        "sealed file: fresh TPM 2.0 {fresh} bytes; NV full ({indices} x 2 KiB indices) {} bytes, {base64_len} as base64; Export {export_ms:.1} ms, Import {import_ms:.1} ms",
        sealed.len()
    );
}

/// Runs vtpmctl against `d`; exit code, stdout, stderr.
fn vtpmctl(d: &Daemon, args: &[&str], stdin: Option<&[u8]>) -> (Option<i32>, Vec<u8>, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vtpmctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = stdin {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vtpmctl_export_writes_0600_refuses_to_overwrite_and_import_reads_stdin() {
    let (a, b) = (Daemon::start(), Daemon::start());
    create(&a, G1);
    let file = a.root.path().join("out.sealed");
    let f = file.to_str().unwrap();
    let (code, stdout, _) = vtpmctl(&a, &["--json", "export", G1, "--out", f], None);
    assert_eq!(code, Some(0));
    let printed: Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(printed["generation"], 1);
    assert_eq!(printed["out"], f);
    let sealed = std::fs::read(&file).unwrap();
    assert_eq!(printed["size"], sealed.len());
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // An existing file stays as it is without --force (a local failure).
    std::fs::write(&file, b"keep me").unwrap();
    let (code, stdout, stderr) = vtpmctl(&a, &["--json", "export", G1, "--out", f], None);
    assert_eq!(code, Some(6), "{stderr}");
    let refused: Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(refused["error"], "vtpmctl.LocalFailure");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let (code, _, _) = vtpmctl(&a, &["export", G1, "--out", f, "--force"], None);
    assert_eq!(code, Some(0));
    assert_eq!(std::fs::read(&file).unwrap(), sealed);

    // To stdout: the file's bytes; with --json, the reply.
    let (code, stdout, _) = vtpmctl(&a, &["export", G1], None);
    assert_eq!((code, &stdout), (Some(0), &sealed));
    let (_, stdout, _) = vtpmctl(&a, &["--json", "export", G1], None);
    let reply: Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(reply["sealed"], Base64::encode_string(&sealed));

    // Import from stdin; --json answers with the guest.
    let (code, stdout, stderr) = vtpmctl(&b, &["--json", "import", G1, "-"], Some(&sealed));
    assert_eq!(code, Some(0), "{stderr}");
    let imported: Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(imported["guest"]["guest"], G1);
    // A refusal by vtpmd: exit 1, its name on stdout with --json.
    let (code, stdout, stderr) = vtpmctl(&b, &["--json", "import", G1, "-"], Some(&sealed));
    assert_eq!(code, Some(1));
    let refused: Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(refused["error"], "io.vtpmd.Manager.StaleGeneration");
    assert!(stderr.contains("not newer than generation 1"), "{stderr}");
    let (code, _, stderr) = vtpmctl(&a, &["export", G2, "--out", f, "--force"], None);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no such guest"), "{stderr}");
    let (code, _, _) = vtpmctl(&a, &["export", "not-a-uuid"], None);
    assert_eq!(code, Some(2));
    let (code, _, stderr) = vtpmctl(&b, &["import", G2, "/nonexistent/file"], None);
    assert_eq!(code, Some(6), "{stderr}");
}

#[test]
fn export_and_import_are_for_admins_only() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let d = Daemon::start_with("[api]\nreadonly_group = \"nogroup\"\n");
    create(&d, G1);
    let (sealed, _) = export(&d, G1);
    let file = d.root.path().join("g1.sealed");
    std::fs::write(&file, &sealed).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .map(|g| g.gid.as_raw().to_string())
        .unwrap_or_else(|| "65534".to_owned());
    for args in [
        vec!["--json", "export", G1],
        vec!["--json", "import", G1, file.to_str().unwrap()],
    ] {
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                &nogroup,
                "--clear-groups",
                "--",
            ])
            .arg(env!("CARGO_BIN_EXE_vtpmctl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            reply["error"], "io.vtpmd.Manager.PermissionDenied",
            "{args:?}: {reply}"
        );
    }
}

#[test]
fn writes_not_sealed_yet_are_neither_exported_stale_nor_overwritten() {
    let (mut d, b) = (Daemon::start(), Daemon::start());
    create(&d, G1);
    let started = d.start_guest(G1, PASS);
    let ctrl = PathBuf::from(started["ctrl_socket"].as_str().unwrap());
    let (older, _) = export(&d, G1);
    // vtpmd dies; the restarted one adopts the swtpm without its key (no
    // service manager keeps it here), so it cannot seal what the VMM writes.
    d.kill();
    d.restart();
    let vmm = nv::attach_and_write_nv(&ctrl, b"unsealed");
    let adopted = d.guest_status(G1);
    assert_eq!(adopted["state"], "running", "{adopted}");
    let before = tree(&d.state_dir);
    let refused = assert_error(
        d.client().manager("Export", json!({"guest": G1})),
        "UnsealedWrites",
    );
    assert!(
        refused.parameters["reason"]
            .as_str()
            .unwrap()
            .contains("without its key"),
        "{}",
        refused.parameters
    );
    assert_error(import(&d, G1, &older), "GuestRunning");
    // The VMM quits while no key is at hand: the writes stay in the
    // runtime directory, and the stopped guest refuses both calls too.
    vmm.shutdown().unwrap();
    d.wait_state(G1, "stopped", TIMEOUT);
    assert_error(
        d.client().manager("Export", json!({"guest": G1})),
        "UnsealedWrites",
    );
    assert_error(import(&d, G1, &older), "UnsealedWrites");
    assert_eq!(tree(&d.state_dir), before, "a refusal changed files");
    // Start with the passphrase seals them; then the export carries them.
    d.start_guest(G1, PASS);
    d.client().manager("Stop", json!({"guest": G1})).unwrap();
    let (sealed, _) = export(&d, G1);
    import(&b, G1, &sealed).unwrap();
    let on_b = b.start_guest(G1, PASS);
    let ctrl_b = PathBuf::from(on_b["ctrl_socket"].as_str().unwrap());
    assert_eq!(nv::read_nv(&ctrl_b, 8), b"unsealed");
}

#[test]
fn an_admins_room_beyond_max_message_bytes_is_for_import_only() {
    let d = Daemon::start();
    create(&d, G1);
    // A Status as long as a large Import (root is an admin): refused as
    // any over-long message is, and the connection closed.
    let mut c = d.client();
    let padded = json!({"method": "io.vtpmd.Manager.Status",
                        "parameters": {"guest": G1, "pad": "x".repeat(100 * 1024)}});
    let mut msg = serde_json::to_vec(&padded).unwrap();
    msg.push(0);
    c.send_raw(&msg);
    let reply = c.read_reply();
    assert_eq!(reply["error"], "org.varlink.service.InvalidParameter");
    assert_eq!(reply["parameters"]["parameter"], "message");
    let mut byte = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut c.stream(), &mut byte).unwrap(),
        0,
        "the connection stayed open"
    );
    // An Import just as long is read and answered on its merits.
    let long = vec![0u8; 100 * 1024];
    let refused = assert_error(import(&d, G2, &long), "StateCorrupt");
    assert!(
        refused.parameters["reason"]
            .as_str()
            .unwrap()
            .contains("corrupt"),
        "{}",
        refused.parameters
    );
    assert_eq!(d.guest_status(G1)["state"], "stopped");
}

#[test]
fn an_import_over_a_damaged_current_file_replaces_it_and_keeps_the_sound_previous_one() {
    let (a, b) = (Daemon::start(), Daemon::start());
    create(&a, G1);
    let (first, _) = export(&a, G1);
    import(&b, G1, &first).unwrap();
    write_nv_and_quit(&b, G1, "on b");
    write_nv_and_quit(&a, G1, "on a");
    write_nv_and_quit(&a, G1, "on a");
    let (newer, newer_gen) = export(&a, G1);
    let current = b.sealed_file(G1);
    let previous = b.state_dir.join("guests").join(G1).join("tpm.sealed.prev");
    let previous_bytes = std::fs::read(&previous).unwrap();
    let previous_gen = header_generation(&previous_bytes);
    assert!(newer_gen > previous_gen, "{newer_gen} vs {previous_gen}");
    // B's current file is damaged; its .prev is sound.
    let mut damaged = std::fs::read(&current).unwrap();
    damaged[40] ^= 1;
    std::fs::write(&current, &damaged).unwrap();
    // No older generation than the sound .prev gets in behind it.
    let before = tree(&b.state_dir);
    let stale = assert_error(import(&b, G1, &first), "StaleGeneration");
    assert_eq!(stale.parameters["current"], previous_gen);
    assert_eq!(tree(&b.state_dir), before);
    // A newer one replaces the damaged file in place: it never becomes
    // the previous generation.
    import(&b, G1, &newer).unwrap();
    assert_eq!(std::fs::read(&current).unwrap(), newer);
    assert_eq!(std::fs::read(&previous).unwrap(), previous_bytes);
    assert_eq!(start_and_read_nv(&b, G1, 4), "on a");
}

/// An older copy of a guest's sealed file put in place of the current one
/// (a restored backup, a stale copy from shared storage) is a rollback of
/// its TPM: Start refuses it, typed, naming both generations, and changes
/// nothing; the newer file put back starts as before.
#[test]
fn a_start_from_an_older_copy_than_vtpmd_sealed_is_refused_as_a_rollback() {
    let d = Daemon::start();
    create(&d, G1);
    write_nv_and_quit(&d, G1, "first-value-0001");
    let sealed = d.sealed_file(G1);
    let older = std::fs::read(&sealed).unwrap();
    write_nv_and_quit(&d, G1, "later-value-0002");
    let newer = std::fs::read(&sealed).unwrap();
    let (older_gen, newer_gen) = (header_generation(&older), header_generation(&newer));
    assert!(older_gen < newer_gen);
    std::fs::write(&sealed, &older).unwrap();
    let before = tree(&d.state_dir);
    let refused = common::assert_error(
        d.client()
            .manager("Start", json!({"guest": G1, "passphrase": b64(PASS)})),
        "StaleGeneration",
    );
    assert_eq!(refused.parameters["generation"], older_gen, "{refused:?}");
    assert_eq!(refused.parameters["current"], newer_gen, "{refused:?}");
    assert_eq!(tree(&d.state_dir), before, "the refusal changed the state");
    assert!(common::swtpms_under(&d.runtime_dir).is_empty());
    assert_eq!(d.guest_status(G1)["state"], "stopped");
    std::fs::write(&sealed, &newer).unwrap();
    assert_eq!(start_and_read_nv(&d, G1, 16), "later-value-0002");
}
