//! Cluster mode on a real three-member etcd (three `etcd` processes on
//! loopback ports), with two vtpmd hosts of their own directories and real
//! swtpm: evacuation after a host died, fencing of a host that was paused
//! past its lease, a whole-history check of what etcd recorded, rollback
//! refusal, and etcd members failing under running guests.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::etcd::{Change, Etcd};
use common::{Daemon, TEST_CONFIG, assert_error, b64, nv};
use serde_json::{Value, json};

const G1: &str = "3c1f9a2b-6d4e-4f80-9a1b-2c3d4e5f6a70";
const G2: &str = "4d2e8b3c-7e5f-4a91-8b2c-3d4e5f6a7b81";
const PASS: &str = "the owner's secret";
const TIMEOUT: Duration = Duration::from_secs(30);
/// Short, so that tests wait for expiries in seconds.
const TTL_S: u64 = 3;

/// A three-member etcd and two hosts on it; `None` where etcd is not
/// installed.
fn two_hosts() -> Option<(Etcd, Daemon, Daemon)> {
    let etcd = Etcd::start()?;
    let (a, b) = (host(&etcd, "host-a"), host(&etcd, "host-b"));
    Some((etcd, a, b))
}

fn host(etcd: &Etcd, name: &str) -> Daemon {
    let mut d = Daemon::unstarted(&format!("{TEST_CONFIG}{}", etcd.config(name, TTL_S)), None);
    if let Ok(log) = std::env::var("VTPMD_TEST_LOG") {
        d.rust_log = log;
    }
    d.restart();
    d
}

fn create(d: &Daemon, guest: &str) -> Value {
    d.create_guest(guest, PASS)
}

fn ctrl_of(info: &Value) -> PathBuf {
    PathBuf::from(info["ctrl_socket"].as_str().unwrap())
}

/// Everything `guest`'s VMM was told is written, sealed (Export reseals a
/// running guest first) and in etcd; the generation that holds it.
/// Waiting for the first reseal above a generation is not enough: a
/// define and a write a moment apart may be two reseals.
fn replicated_now(d: &Daemon, etcd: &Etcd, guest: &str) -> u64 {
    let exported = d
        .client()
        .manager("Export", json!({"guest": guest}))
        .unwrap_or_else(|e| panic!("Export {guest}: {e:?}"));
    let generation = exported["generation"].as_u64().unwrap();
    etcd.wait_generation_at_least(guest, generation, TIMEOUT);
    generation
}

/// SIGKILL of the daemon and every swtpm it ran: the host is gone.
fn kill_host(d: &mut Daemon) {
    d.kill();
    common::kill_swtpms_under(&d.runtime_dir);
    wait_for(TIMEOUT, "a swtpm survived SIGKILL", || {
        common::swtpms_under(&d.runtime_dir)
            .is_empty()
            .then_some(())
    });
}

fn evacuate(d: &Daemon, guest: &str) -> Result<Value, common::Remote> {
    d.client()
        .manager("Evacuate", json!({"guest": guest, "passphrase": b64(PASS)}))
}

/// Evacuate, retried while the dead owner's lease lives; the time it took.
fn evacuate_once_free(d: &Daemon, guest: &str) -> (Value, Duration) {
    let began = Instant::now();
    loop {
        match evacuate(d, guest) {
            Ok(reply) => return (reply["guest"].clone(), began.elapsed()),
            Err(e) => {
                // OwnedElsewhere until the dead owner's lease expired;
                // ClusterUnavailable while this host itself takes a new
                // lease (its own lapsed in an earlier round).
                assert!(
                    e.name.ends_with("OwnedElsewhere") || e.name.ends_with("ClusterUnavailable"),
                    "Evacuate failed: {e:?}"
                );
                assert!(
                    began.elapsed() < Duration::from_secs(TTL_S * 4 + 10),
                    "the dead owner's lease never expired"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn a_dead_hosts_guest_is_evacuated_with_its_tpm_once_its_lease_expired() {
    let Some((etcd, mut a, b)) = two_hosts() else {
        return;
    };
    create(&a, G1);
    assert_eq!(etcd.generation(G1), Some(1), "Create is in etcd");
    let started = a.start_guest(G1, PASS);
    let before = started["generation"].as_u64().unwrap();
    assert_eq!(
        etcd.get(&format!("/vtpmd/guests/{G1}/owner")).as_deref(),
        Some("host-a")
    );
    // A guest running on A cannot be started or evacuated elsewhere.
    assert_error(
        b.client()
            .manager("Import", json!({"guest": G1, "sealed": common::b64_bytes(&std::fs::read(a.sealed_file(G1)).unwrap())})),
        "OwnedElsewhere",
    );
    let _vmm = nv::attach_and_write_nv(&ctrl_of(&started), b"evacuated");
    assert!(replicated_now(&a, &etcd, G1) > before);

    kill_host(&mut a);
    let refused = evacuate(&b, G1);
    assert_error(refused, "OwnedElsewhere");
    let (on_b, waited) = evacuate_once_free(&b, G1);
    eprintln!("evacuated {waited:?} after the host's death (lease TTL {TTL_S} s)");
    assert_eq!(on_b["state"], "running");
    assert_eq!(
        etcd.get(&format!("/vtpmd/guests/{G1}/owner")).as_deref(),
        Some("host-b")
    );
    assert_eq!(nv::read_nv(&ctrl_of(&on_b), 9), b"evacuated");
}

/// etcd's generation of `guest` once it equals what `d` reports.
fn etcd_catches_up(d: &Daemon, etcd: &Etcd, guest: &str) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let here = d.guest_status(guest)["generation"].as_u64().unwrap();
        if etcd.generation(guest) == Some(here) {
            return here;
        }
        assert!(
            Instant::now() < deadline,
            "etcd holds {:?}, the guest is at {here}",
            etcd.generation(guest)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Until nobody owns `guest` in etcd (its host let go of it).
fn wait_let_go(etcd: &Etcd, guest: &str) {
    let owner = format!("/vtpmd/guests/{guest}/owner");
    wait_for(
        TIMEOUT,
        &format!("{guest} was never let go in etcd"),
        || etcd.get(&owner).is_none().then_some(()),
    );
}

#[test]
fn keyslot_changes_reach_etcd_so_an_evacuation_opens_with_the_new_credentials_only() {
    let Some((etcd, mut a, b)) = two_hosts() else {
        return;
    };
    const NEW: &str = "the owner's new secret";
    create(&a, G1);
    // A Rekey of the stopped guest is a new generation, in etcd, and the
    // guest is let go again.
    a.client()
        .manager(
            "Rekey",
            json!({"guest": G1, "passphrase": b64(PASS), "new_passphrase": b64(NEW)}),
        )
        .unwrap();
    assert_eq!(
        etcd_catches_up(&a, &etcd, G1),
        2,
        "Rekey wrote generation 2"
    );
    wait_let_go(&etcd, G1);
    // A Grant to B while the guest runs on A: in etcd without any write
    // of the guest's own.
    let started = a.start_guest(G1, NEW);
    let key_b = b.client().manager("GetHostKey", json!({})).unwrap()["public_key"].clone();
    let granted = a
        .client()
        .manager(
            "Grant",
            json!({"guest": G1, "passphrase": b64(NEW), "host_public_key": key_b}),
        )
        .unwrap();
    let granted_at = etcd_catches_up(&a, &etcd, G1);
    assert!(granted_at > started["generation"].as_u64().unwrap());

    kill_host(&mut a);
    // The old passphrase opens nothing in etcd's copy; B's own slot does.
    let refused = wait_for(
        TIMEOUT * 2,
        "the dead owner's lease to expire",
        || match evacuate(&b, G1) {
            Err(e)
                if e.name.ends_with("OwnedElsewhere") || e.name.ends_with("ClusterUnavailable") =>
            {
                None
            }
            other => Some(other),
        },
    );
    assert_error(refused, "WrongPassphrase");
    let on_b = b
        .client()
        .manager("Evacuate", json!({"guest": G1}))
        .unwrap_or_else(|e| panic!("Evacuate with B's host slot: {e:?}"))["guest"]
        .clone();
    assert_eq!(on_b["state"], "running");
    assert_eq!(on_b["keyslots"], granted["keyslots"]);
}

/// Every generation of `guest` etcd recorded, strictly increasing, each
/// written by the host that owned the guest at that revision.
fn check_history(etcd: &Etcd, guest: &str) -> Vec<(i64, u64, String)> {
    let prefix = format!("/vtpmd/guests/{guest}/");
    let changes = etcd.history(&prefix);
    let mut owner: Option<String> = None;
    let mut writes = Vec::new();
    let mut last = 0u64;
    let mut by_revision: std::collections::BTreeMap<i64, Vec<&Change>> = Default::default();
    for c in &changes {
        by_revision.entry(c.revision).or_default().push(c);
    }
    for (revision, changes) in by_revision {
        for c in &changes {
            if c.key.ends_with("/owner") {
                owner.clone_from(&c.value);
            }
        }
        let generation = changes
            .iter()
            .find(|c| c.key.ends_with("/generation"))
            .and_then(|c| c.value.as_ref());
        if let Some(generation) = generation {
            let generation: u64 = generation.parse().unwrap();
            let writer = changes
                .iter()
                .find(|c| c.key.ends_with("/writer"))
                .and_then(|c| c.value.clone())
                .expect("a generation written without its writer");
            assert!(
                generation > last,
                "generation {generation} at revision {revision} after {last}: {changes:?}"
            );
            assert_eq!(
                owner.as_deref(),
                Some(writer.as_str()),
                "generation {generation} at revision {revision} written by {writer}, owner {owner:?}"
            );
            last = generation;
            writes.push((revision, generation, writer));
        }
    }
    writes
}

#[test]
fn a_host_paused_past_its_lease_comes_back_fenced_and_etcd_saw_one_writer_at_a_time() {
    let Some((etcd, a, b)) = two_hosts() else {
        return;
    };
    create(&a, G1);
    let started = a.start_guest(G1, PASS);
    let mut writer = nv::Writer::attach(&ctrl_of(&started));
    writer.write(20);
    replicated_now(&a, &etcd, G1);
    let pid_a = a.pid();
    let swtpm_a = a.guest_status(G1)["pid"].as_i64().unwrap();

    // A freezes (its swtpm and VMM go on); after the TTL, B takes over.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_a),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    writer.write(20);
    let (on_b, waited) = evacuate_once_free(&b, G1);
    eprintln!("evacuated {waited:?} after A froze");
    // B runs what etcd had: the 20 writes A replicated before it froze.
    let mut writer_b = nv::Writer::attach_existing(&ctrl_of(&on_b), 20);
    writer_b.write(10);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_a),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();

    // A learns its lease is gone: its guest is fenced, its swtpm killed.
    let fenced = a.wait_state(G1, "failed", TIMEOUT);
    let reason = fenced["failure"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("fenced"), "{fenced}");
    wait_for(TIMEOUT, "A's swtpm survived the fence", || {
        (!common::is_alive(i32::try_from(swtpm_a).unwrap())).then_some(())
    });
    // A Start on A now is refused: B owns the guest.
    assert_error(
        a.client()
            .manager("Start", json!({"guest": G1, "passphrase": b64(PASS)})),
        "OwnedElsewhere",
    );
    // A takes a new lease as soon as etcd tells it the old one is gone,
    // without waiting for work to fail first: once its metrics say it is
    // in the cluster again, new work goes on there.
    wait_for(TIMEOUT, "A back in the cluster (etcd_up 1)", || {
        metrics_text(&a)
            .contains("vtpmd_cluster_etcd_up 1")
            .then_some(())
    });
    assert_eq!(a.create_guest(G2, PASS)["state"], "stopped");
    writer_b.write(10);
    replicated_now(&b, &etcd, G1);
    drop(writer);
    assert_eq!(writer_b.quit(), 40);
    b.wait_state(G1, "stopped", TIMEOUT);
    let again = b.start_guest(G1, PASS);
    assert_eq!(
        nv::read_counter(&ctrl_of(&again)),
        40,
        "a write acknowledged on B was lost"
    );
    b.wait_state(G1, "stopped", TIMEOUT);

    let writes = check_history(&etcd, G1);
    let writers: Vec<&str> = writes.iter().map(|(_, _, w)| w.as_str()).collect();
    assert!(
        writers.contains(&"host-a") && writers.contains(&"host-b"),
        "{writes:?}"
    );
    let first_b = writers.iter().position(|w| *w == "host-b").unwrap();
    assert!(
        writers[first_b..].iter().all(|w| *w == "host-b"),
        "A wrote after B took over: {writes:?}"
    );
}

#[test]
fn an_older_sealed_file_is_refused_at_start_and_import_after_a_restart() {
    let Some((etcd, mut a, b)) = two_hosts() else {
        return;
    };
    create(&a, G1);
    let old = std::fs::read(a.sealed_file(G1)).unwrap();
    let started = a.start_guest(G1, PASS);
    let vmm = nv::attach_and_write_nv(&ctrl_of(&started), b"newer");
    let newest = a.wait_generation_above(G1, started["generation"].as_u64().unwrap(), TIMEOUT);
    drop(vmm);
    a.wait_state(G1, "stopped", TIMEOUT);
    etcd.wait_generation_at_least(G1, newest, TIMEOUT);

    // A restarted vtpmd knows nothing of what it sealed: etcd does.
    a.restart();
    std::fs::write(a.sealed_file(G1), &old).unwrap();
    let refused = assert_error(
        a.client()
            .manager("Start", json!({"guest": G1, "passphrase": b64(PASS)})),
        "StaleGeneration",
    );
    assert_eq!(refused.parameters["generation"], 1, "{refused:?}");
    assert!(
        refused.parameters["current"].as_u64().unwrap() >= newest,
        "{refused:?}"
    );
    // Once A let go of the stopped guest, B may take it in, but not as
    // the older file.
    wait_let_go(&etcd, G1);
    assert_error(
        b.client().manager(
            "Import",
            json!({"guest": G1, "sealed": common::b64_bytes(&old)}),
        ),
        "StaleGeneration",
    );
    assert_error(
        b.client().manager("Status", json!({"guest": G1})),
        "NoSuchGuest",
    );
}

#[test]
fn etcd_members_failing_under_running_guests() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let mut a = host(&etcd, "host-a");
    create(&a, G1);
    create(&a, G2);
    let started = a.start_guest(G1, PASS);
    let mut writer = nv::Writer::attach(&ctrl_of(&started));
    writer.write(5);
    let mut events = a.events();

    // One member down: nothing noticed.
    etcd.kill_member(0);
    writer.write(5);
    let g = a.wait_generation_above(G1, started["generation"].as_u64().unwrap(), TIMEOUT);
    etcd.wait_generation_at_least(G1, g, TIMEOUT);

    // A majority down: the running guest goes on, a new Start is refused.
    etcd.kill_member(1);
    writer.write(10);
    let local = a.wait_generation_above(G1, g, TIMEOUT);
    assert_error(
        a.client()
            .manager("Start", json!({"guest": G2, "passphrase": b64(PASS)})),
        "ClusterUnavailable",
    );
    assert_eq!(a.guest_status(G2)["state"], "stopped");
    // Status says the guest is behind and why; the metrics say etcd is down.
    let behind = wait_for(TIMEOUT, "replication reported behind", || {
        let r = a.guest_status(G1)["replication"].clone();
        (r["pending"] == true && r["error"].is_string()).then_some(r)
    });
    eprintln!("while etcd has no quorum: {behind}");
    let told = events.wait_for(G1, "replication-behind", TIMEOUT);
    assert!(told.is_some(), "Monitor never said the guest fell behind");
    let metrics = metrics_text(&a);
    assert!(metrics.contains("vtpmd_cluster_etcd_up 0"), "{metrics}");
    // A vtpmd restarted meanwhile starts all the same and adopts its
    // running guest, whose VMM goes on writing.
    a.restart();
    assert_eq!(a.guest_status(G1)["state"], "running");
    writer.write(5);
    assert_error(
        a.client()
            .manager("Start", json!({"guest": G2, "passphrase": b64(PASS)})),
        "ClusterUnavailable",
    );

    // All back: the pending reseals reach etcd, nothing lost.
    etcd.start_member(0);
    etcd.start_member(1);
    etcd.wait_healthy(TIMEOUT);
    etcd.wait_generation_at_least(G1, local, TIMEOUT);
    // Every reseal made while etcd had no quorum is in etcd: its newest
    // generation is the guest's (the writes ended before etcd came back).
    etcd_catches_up(&a, &etcd, G1);
    let current = wait_for(TIMEOUT, "replication current again", || {
        let r = a.guest_status(G1)["replication"].clone();
        (r["pending"] == false && r["error"].is_null()).then_some(r)
    });
    assert_eq!(current["generation"], a.guest_status(G1)["generation"]);
    a.start_guest(G2, PASS);
    assert!(metrics_text(&a).contains("vtpmd_cluster_etcd_up 1"));
    drop(writer);
}

#[test]
fn an_adopted_guest_whose_lease_lapsed_while_etcd_was_down_is_claimed_again() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let mut a = host(&etcd, "host-a");
    create(&a, G1);
    let started = a.start_guest(G1, PASS);
    let mut writer = nv::Writer::attach(&ctrl_of(&started));
    writer.write(5);
    replicated_now(&a, &etcd, G1);

    // No quorum: vtpmd restarts, adopts its running guest and cannot claim
    // it in etcd; the VMM goes on writing.
    etcd.kill_member(0);
    etcd.kill_member(1);
    a.restart();
    assert_eq!(a.guest_status(G1)["state"], "running");
    writer.write(3);
    // etcd comes back while this vtpmd cannot reach it (paused) until the
    // previous vtpmd's lease, and the owner key bound to it, are gone.
    let pid = nix::unistd::Pid::from_raw(a.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    etcd.start_member(0);
    etcd.start_member(1);
    etcd.wait_healthy(TIMEOUT);
    wait_let_go(&etcd, G1);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    // Nobody took the guest over: this host claims it again (the claim
    // start-up could not make), rather than fencing its own guest.
    let owner = format!("/vtpmd/guests/{G1}/owner");
    let status = wait_for(TIMEOUT, "the adopted guest claimed or fenced", || {
        let status = a.guest_status(G1);
        (etcd.get(&owner).is_some() || status["state"] != "running").then_some(status)
    });
    assert_eq!(etcd.get(&owner).as_deref(), Some("host-a"), "{status}");
    let here = etcd_catches_up(&a, &etcd, G1);
    let status = a.guest_status(G1);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["generation"], here);
    writer.write(2);
    assert_eq!(writer.quit(), 10);
}

/// `f`'s first `Some`, polled until `timeout`; `what` names what never
/// came.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metrics_text(d: &Daemon) -> String {
    d.client().manager("GetMetrics", json!({})).unwrap()["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_live_migration_moves_ownership_with_the_destinations_first_reseal() {
    let Some((etcd, a, b)) = two_hosts() else {
        return;
    };
    create(&a, G1);
    let started = a.start_guest(G1, PASS);
    let mut vmm = vtpmd::swtpm::ctrl::Vmm::attach(&ctrl_of(&started), TIMEOUT).unwrap();
    let mut writer = nv::Writer::on(vmm);
    writer.write(3);
    let on_a = a.wait_generation_above(G1, started["generation"].as_u64().unwrap(), TIMEOUT);
    etcd.wait_generation_at_least(G1, on_a, TIMEOUT);
    vmm = writer.vmm;

    let key_b = b.client().manager("GetHostKey", json!({})).unwrap()["public_key"].clone();
    let out = a
        .client()
        .manager("MigrateOut", json!({"guest": G1, "destination": key_b}))
        .unwrap();
    let incoming = b
        .client()
        .manager(
            "MigrateIn",
            json!({"guest": G1, "ticket": out["ticket"], "sealed": out["sealed"]}),
        )
        .unwrap();
    // Until the state arrives the source still owns the guest.
    let owner = format!("/vtpmd/guests/{G1}/owner");
    assert_eq!(etcd.get(&owner).as_deref(), Some("host-a"));
    let blobs = common::live::read_blobs(&mut vmm);
    let (_ctrl, mut data) = common::live::set_blobs(&ctrl_of(&incoming["guest"]), blobs);
    let leap = out["generation"].as_u64().unwrap() + (1 << 20);
    let on_b = b.wait_generation_above(G1, leap - 1, TIMEOUT);
    etcd.wait_generation_at_least(G1, on_b, TIMEOUT);
    assert_eq!(etcd.get(&owner).as_deref(), Some("host-b"));
    // The TPM runs on at B: the counter A's VMM wrote is there.
    let read = data
        .transact(
            &vtpmd::swtpm::ctrl::tpm::tpm2_nv_read(nv::NV_INDEX, 8, 0),
            TIMEOUT,
        )
        .unwrap();
    let read = vtpmd::swtpm::ctrl::TpmResponse::parse(&read).unwrap();
    assert_eq!(read.tpm2_nv_data().unwrap(), 3u64.to_be_bytes());
    vmm.shutdown().unwrap();
    a.wait_state(G1, "migrated-out", TIMEOUT);
    // The source's Delete forgets its copy; the record is B's.
    a.client().manager("Delete", json!({"guest": G1})).unwrap();
    assert_eq!(etcd.get(&owner).as_deref(), Some("host-b"));
    let writes = check_history(&etcd, G1);
    assert_eq!(
        writes.last().map(|w| w.2.as_str()),
        Some("host-b"),
        "{writes:?}"
    );
    assert!(writes.iter().any(|w| w.2 == "host-a"), "{writes:?}");
}

/// A small deterministic generator, so a failing round can be replayed
/// (`VTPMD_CHAOS_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below
    }
}

/// The host the guest runs on, its VMM, and what of its writes etcd is
/// known to hold.
struct Chaos {
    etcd: Etcd,
    hosts: Vec<Daemon>,
    owner: usize,
    writer: nv::Writer,
    /// The counter's value once etcd held every reseal up to it: no later
    /// run of the guest may hold less.
    replicated: u64,
    actions: Vec<&'static str>,
}

impl Chaos {
    /// Writes, then waits until etcd holds every one of them.
    fn write_and_replicate(&mut self, count: u64) {
        self.writer.write(count);
        replicated_now(&self.hosts[self.owner], &self.etcd, G1);
        self.replicated = self.writer.acknowledged;
    }

    /// The other host evacuates the guest (once the owner's lease is gone)
    /// and the VMM moves there; the counter must hold every replicated write.
    /// Returns the VMM of the old run (still attached: dropping it ends
    /// that swtpm).
    fn evacuate_to_other(&mut self) -> nv::Writer {
        let other = 1 - self.owner;
        let (on_other, _) = evacuate_once_free(&self.hosts[other], G1);
        let mut writer = nv::Writer::attach_existing(&ctrl_of(&on_other), 0);
        let read = writer
            .vmm
            .transact(&vtpmd::swtpm::ctrl::tpm::tpm2_nv_read(nv::NV_INDEX, 8, 0))
            .unwrap();
        assert_eq!(
            read.rc, 0,
            "NV_Read on the evacuated TPM (actions {:?})",
            self.actions
        );
        let value = u64::from_be_bytes(read.tpm2_nv_data().unwrap().try_into().unwrap());
        assert!(
            value >= self.replicated,
            "a write etcd held was lost: the evacuated TPM holds {value}, etcd held {} (actions {:?})",
            self.replicated,
            self.actions
        );
        writer.acknowledged = value;
        self.owner = other;
        std::mem::replace(&mut self.writer, writer)
    }

    fn round(&mut self, rng: &mut Rng) {
        self.write_and_replicate(3);
        eprintln!(
            "chaos: round {} after {:?}",
            self.actions.len(),
            self.actions.last()
        );
        match rng.next(5) {
            0 => self.actions.push("nothing"),
            1 => {
                self.actions.push("etcd member down");
                let m = usize::try_from(rng.next(3)).unwrap();
                self.etcd.kill_member(m);
                self.write_and_replicate(3);
                self.etcd.start_member(m);
                self.etcd.wait_healthy(TIMEOUT);
            }
            2 => {
                self.actions.push("etcd quorum lost");
                let m = usize::try_from(rng.next(3)).unwrap();
                let n = (m + 1) % 3;
                self.etcd.kill_member(m);
                self.etcd.kill_member(n);
                self.writer.write(3);
                self.etcd.start_member(m);
                self.etcd.start_member(n);
                self.etcd.wait_healthy(TIMEOUT);
                self.write_and_replicate(1);
            }
            3 => {
                self.actions.push("owner host died");
                let dead = self.owner;
                kill_host(&mut self.hosts[dead]);
                // A reboot: the runtime directory is RAM.
                let run = self.hosts[dead].runtime_dir.clone();
                let _ = std::fs::remove_dir_all(&run);
                drop(self.evacuate_to_other());
                self.hosts[dead].restart();
            }
            _ => {
                self.actions.push("owner host paused past its lease");
                let paused = self.owner;
                let pid = nix::unistd::Pid::from_raw(self.hosts[paused].pid());
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                self.writer.write(2);
                let old = self.evacuate_to_other();
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
                let fenced = self.hosts[paused].wait_state(G1, "failed", TIMEOUT);
                assert!(
                    fenced["failure"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("fenced"),
                    "{fenced}"
                );
                drop(old);
            }
        }
    }
}

fn chaos(rounds: usize) {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let seed = std::env::var("VTPMD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            u64::try_from(nanos % u128::from(u64::MAX)).unwrap() | 1
        });
    eprintln!("chaos: {rounds} rounds, VTPMD_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let hosts = vec![host(&etcd, "host-0"), host(&etcd, "host-1")];
    create(&hosts[0], G1);
    let started = hosts[0].start_guest(G1, PASS);
    let writer = nv::Writer::attach(&ctrl_of(&started));
    let mut chaos = Chaos {
        etcd,
        hosts,
        owner: 0,
        writer,
        replicated: 0,
        actions: Vec::new(),
    };
    for _ in 0..rounds {
        chaos.round(&mut rng);
    }
    chaos.write_and_replicate(3);
    let writes = check_history(&chaos.etcd, G1);
    let mut tally: std::collections::BTreeMap<&str, usize> = Default::default();
    for a in &chaos.actions {
        *tally.entry(a).or_default() += 1;
    }
    eprintln!(
        "chaos: {} generations in etcd's history, each above the one before and written by the owner of its moment; counter {} (>= {} replicated); {tally:?}",
        writes.len(),
        chaos.writer.acknowledged,
        chaos.replicated
    );
}

/// A short run of the randomized rounds for CI (the seed is printed).
#[test]
fn randomized_kills_pauses_and_etcd_faults_keep_one_writer_and_every_replicated_write() {
    chaos(8);
}

/// The full run: `cargo test --test cluster -- --ignored` (about 10 min).
#[test]
#[ignore = "100 randomized rounds, minutes: run by hand"]
fn a_hundred_randomized_rounds() {
    chaos(100);
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client
/// certificate in `dir` with openssl; `false` where openssl is missing.
fn make_certificates(dir: &std::path::Path) -> bool {
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=vtpmd test CA",
    ]) && ["server", "client"].iter().all(|who| {
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{who}.key"),
            "-out",
            &format!("{who}.csr"),
            "-subj",
            &format!("/CN={who}"),
        ]) && openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{who}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
        ])
    })
}

/// etcd with TLS and client-certificate authentication: vtpmd with the
/// CA and its client certificate writes its guests there; without the
/// client certificate etcd refuses it, and vtpmd says so.
#[test]
fn cluster_mode_speaks_tls_with_client_certificates() {
    if common::etcd::etcd_binary().is_none() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("vtetls").tempdir().unwrap();
    let d = dir.path();
    if !make_certificates(d) {
        eprintln!("SKIPPED: openssl cannot make test certificates");
        return;
    }
    let (client_port, peer_port) = (common::etcd::free_port(), common::etcd::free_port());
    let url = format!("https://127.0.0.1:{client_port}");
    let p = |f: &str| d.join(f).display().to_string();
    let mut etcd = std::process::Command::new("/usr/bin/etcd")
        .args(["--name", "tls", "--data-dir", &p("data")])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer_port}"),
        ])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer_port}"),
        ])
        .args([
            "--initial-cluster",
            &format!("tls=http://127.0.0.1:{peer_port}"),
        ])
        .args([
            "--cert-file",
            &p("server.pem"),
            "--key-file",
            &p("server.key"),
        ])
        .args(["--client-cert-auth", "--trusted-ca-file", &p("ca.pem")])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(d.join("etcd.log")).unwrap())
        .spawn()
        .unwrap();
    let etcdctl = |args: &[&str]| {
        std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={url}"))
            .args([
                "--cacert",
                &p("ca.pem"),
                "--cert",
                &p("client.pem"),
                "--key",
                &p("client.key"),
            ])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    wait_for(TIMEOUT, "etcd healthy over TLS", || {
        etcdctl(&["endpoint", "health"])
    });

    let section = |with_client_cert: bool| {
        let mut s = format!(
            "[cluster]\nendpoints = [{url:?}]\nhost = \"tls-host\"\nlease_ttl_s = 3\ntimeout_ms = 1000\nca_file = {:?}\n",
            p("ca.pem")
        );
        if with_client_cert {
            s.push_str(&format!(
                "cert_file = {:?}\nkey_file = {:?}\n",
                p("client.pem"),
                p("client.key")
            ));
        }
        s
    };
    let a = Daemon::start_with_config(&format!("{TEST_CONFIG}{}", section(true)));
    create(&a, G1);
    assert_eq!(
        etcdctl(&[
            "get",
            &format!("/vtpmd/guests/{G1}/generation"),
            "--print-value-only"
        ])
        .as_deref(),
        Some("00000000000000000001")
    );
    drop(a);

    // No client certificate: etcd refuses the connection; vtpmd runs and
    // says, typed, that the cluster cannot be used.
    let b = Daemon::start_with_config(&format!("{TEST_CONFIG}{}", section(false)));
    assert_error(
        b.client().manager(
            "Create",
            json!({"guest": G2, "version": "2.0", "passphrase": b64(PASS)}),
        ),
        "ClusterUnavailable",
    );
    assert_error(
        b.client().manager("Status", json!({"guest": G2})),
        "NoSuchGuest",
    );
    let _ = etcd.kill();
    let _ = etcd.wait();
}

/// `vtpmd --check-config`: a bad `[cluster]` is refused naming its key,
/// without any etcd; a good one prints the host name in effect.
#[test]
fn check_config_validates_the_cluster_section_without_connecting() {
    let run = |section: &str| {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("vtpmd.toml");
        std::fs::write(&config, section).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vtpmd"))
            .arg("--config")
            .arg(&config)
            .arg("--check-config")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (bad, why) in [
        ("endpoints = [\"10.0.0.1:2379\"]", "[cluster] endpoints"),
        (
            "endpoints = [\"https://10.0.0.1:2379\"]",
            "[cluster] ca_file",
        ),
        (
            "endpoints = [\"http://10.0.0.1:2379\"]\nlease_ttl_s = 1",
            "[cluster] lease_ttl_s",
        ),
        (
            "endpoints = [\"http://10.0.0.1:2379\"]\nhost = \"a/b\"",
            "[cluster] host",
        ),
    ] {
        let (ok, _, stderr) = run(&format!("[cluster]\n{bad}\n"));
        assert!(!ok, "{bad}: accepted");
        assert!(stderr.contains(why), "{bad}: {stderr}");
    }
    // Port 9 on a TEST-NET address: nothing answers, and nothing is asked.
    let (ok, stdout, stderr) = run("[cluster]\nendpoints = [\"http://192.0.2.1:9\"]\n");
    assert!(ok, "{stderr}");
    let hostname = nix::unistd::gethostname().unwrap();
    assert!(
        stdout.contains(&format!("host = {:?}", hostname.to_string_lossy())),
        "{stdout}"
    );
}

/// A Start right after a Stop: the let-go of the stopped run (once its
/// last reseal is in etcd) must not delete the owner key the new Start
/// just put, or the new run's first reseal would be refused and the guest
/// fenced (seen with a real QEMU guest booted twice in a row).
#[test]
fn a_start_right_after_a_stop_keeps_the_guest_owned() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let a = host(&etcd, "host-a");
    create(&a, G1);
    let owner = format!("/vtpmd/guests/{G1}/owner");
    for round in 0..8 {
        let started = a.start_guest(G1, PASS);
        let mut writer = if round == 0 {
            nv::Writer::attach(&ctrl_of(&started))
        } else {
            nv::Writer::attach_existing(&ctrl_of(&started), round * 2)
        };
        writer.write(2);
        a.wait_generation_above(G1, started["generation"].as_u64().unwrap(), TIMEOUT);
        assert_eq!(etcd.get(&owner).as_deref(), Some("host-a"), "round {round}");
        writer.quit();
        a.wait_state(G1, "stopped", TIMEOUT);
    }
    // The last run's let-go happens in the end: nobody owns the guest.
    wait_let_go(&etcd, G1);
    let s = a.guest_status(G1);
    assert_eq!(s["state"], "stopped", "{s}");
    assert!(s["failure"].is_null(), "{s}");
}
