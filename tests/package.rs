//! The Debian package (package/deb/build) installed, upgraded and removed
//! with dpkg inside a booted systemd 252 (systemd-nspawn): the socket
//! activates vtpmd, a guest goes through create, start, status, stop and
//! delete through the installed unit, then an upgrade while a guest's VMM
//! writes its TPM (same swtpm, still resealing, no write lost), then
//! removal (the guest drained, /var/lib/vtpmd kept) and purge.
//!
//! Runs when `VTPMD_DEB` names a built .deb (.ci/run builds one and sets
//! it); otherwise it says SKIPPED. The container sees this machine's /usr
//! through an overlay (dpkg writes into the upper layer, the host's /usr
//! is untouched) and a copy of /etc and of dpkg's database, so the
//! package's dependencies (swtpm, swtpm-tools, systemd) are the host's.

#![allow(clippy::unwrap_used)]

mod common;

use common::nspawn::{Container, Probed, bind_ro};
use common::run_ok;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const VTPMD: &str = env!("CARGO_BIN_EXE_vtpmd");

/// The guest side: everything through the installed package and unit.
const PACKAGE_PROBE: &str = r#"#!/bin/bash
exec 2>/out/probe.log
set -x
out=/out/result
G=5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f
say() { echo "$1=$2" >>$out; }
field() { vtpmctl status $G --json | tr -d '\n' | sed -n "s/.*\"$1\": *\"\{0,1\}\([^\",}]*\).*/\1/p"; }
ready() { # the unit active again and answering
    for _ in $(seq 100); do
        if [ "$(systemctl is-active vtpmd.service)" = active ] && vtpmctl list >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}
# A container image's policy-rc.d (exit 101: start no service) may come
# with this machine's /usr; this container is a booted system, so it goes
# (from the overlay's upper layer only).
rm -f /usr/sbin/policy-rc.d
dpkg -i /debs/vtpmd.deb >&2
say install $?
say socket_enabled "$(systemctl is-enabled vtpmd.socket)"
say socket_active "$(systemctl is-active vtpmd.socket)"
say service_before "$(systemctl is-active vtpmd.service)"
say groups "$(getent group vtpmd vtpmd-ro | cut -d: -f1 | tr '\n' ' ')"
say state_dir "$(stat -c %a /var/lib/vtpmd)"
say execstart "$(systemctl show -p ExecStart --value vtpmd.service | grep -o 'path=[^ ;]*')"
say man "$(ls /usr/share/man/man8/vtpmd.8.gz)"
printf 'correct horse' >/tmp/pass
vtpmctl create $G --version 2.0 --passphrase-file /tmp/pass >&2
say create $?
say service_after "$(systemctl is-active vtpmd.service)"
vtpmctl start $G --passphrase-file /tmp/pass >&2
say start $?
say status "$(field state)"
vtpmctl stop $G >&2
say stop $?
vtpmctl delete $G >&2
say delete $?

# The upgrade, with a guest running and its VMM writing: the same guest
# again at once, whose previous scope may not be collected yet.
vtpmctl create $G --version 2.0 --passphrase-file /tmp/pass >&2
vtpmctl start $G --passphrase-file /tmp/pass >&2
say start2 $?
S=$(field ctrl_socket)
P=$(field pid)
say swtpm_pid "$P"
M=$(systemctl show -p MainPID --value vtpmd.service)
vmm $S loop /tmp/stop >/tmp/acked 2>/tmp/vmm.err &
V=$!
sleep 1
dpkg -i /debs/vtpmd-upgrade.deb >&2
say upgrade $?
say version "$(dpkg-query -W -f '${Version}' vtpmd)"
ready; say upgrade_ready $?
[ "$(systemctl show -p MainPID --value vtpmd.service)" != "$M" ]; say restarted $?
say upgrade_pid "$(field pid)"
say upgrade_state "$(field state)"
say upgrade_reason "$(field reason | cut -c1-20)"
g1=$(field generation); sleep 1; g2=$(field generation)
[ "$g2" -gt "$g1" ]; say upgrade_resealing $?
kill -0 $V; say upgrade_vmm_alive $?
touch /tmp/stop
wait $V
say vmm_exit $?
say acked "$(grep '^acked ' /tmp/acked | tail -1 | cut -d' ' -f2)"
for _ in $(seq 50); do [ "$(field state)" = stopped ] && break; sleep 0.2; done
vtpmctl start $G --passphrase-file /tmp/pass >&2
say sealed "$(vmm "$(field ctrl_socket)" read-counter - | sed -n 's/^counter //p')"
P2=$(field pid)

# Removal with that guest running: drained, then the units stop.
dpkg -r vtpmd >&2
say remove $?
kill -0 $P2 2>/dev/null; say remove_swtpm_alive $?
say remove_service "$(systemctl is-active vtpmd.service)"
say remove_socket "$(systemctl is-active vtpmd.socket)"
say remove_sealed "$(test -f /var/lib/vtpmd/guests/$G/tpm.sealed && echo kept)"
say remove_conffile "$(test -f /etc/vtpmd/vtpmd.toml && echo kept)"
dpkg -P vtpmd >&2
say purge $?
say purge_sealed "$(test -f /var/lib/vtpmd/guests/$G/tpm.sealed && echo kept)"
say purge_conffile "$(test -f /etc/vtpmd/vtpmd.toml && echo kept)"
say purge_units "$(systemctl list-unit-files --no-legend vtpmd.service vtpmd.socket | wc -l)"
echo "done=1" >>$out
systemctl poweroff
"#;

/// `deb` repacked with a higher version (what an upgrade brings).
fn upgrade_of(deb: &Path, work: &Path) -> PathBuf {
    let tree = work.join("upgrade-tree");
    run_ok(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let text: String = text
        .lines()
        .map(|l| match l.strip_prefix("Version: ") {
            Some(v) => format!("Version: {v}+upgrade1\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&control, text).unwrap();
    let out = work.join("debs/vtpmd-upgrade.deb");
    run_ok(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&tree)
            .arg(&out)
            .stdout(Stdio::null()),
    );
    out
}

/// Installs, drives, upgrades, removes and purges the package inside a
/// booted systemd (`common::nspawn`, this machine's /usr under an overlay
/// that takes dpkg's writes); `None` (with the reason) where that cannot
/// run.
fn boot_with_package(deb: &Path) -> Option<Probed> {
    // The example VMM, built beside the test binaries by `cargo test`.
    let vmm = Path::new(VTPMD)
        .parent()
        .unwrap()
        .join("examples")
        .join("vmm");
    assert!(
        vmm.exists(),
        "{} is missing: `cargo build --examples` (cargo test builds it)",
        vmm.display()
    );
    let c = Container::new("vtpmd-deb", &["var/log", "var/cache", "var/lib"])?;
    let root = c.root();
    run_ok(Command::new("cp").args([
        "-a",
        "/var/lib/dpkg",
        root.join("var/lib/").to_str().unwrap(),
    ]));
    // Whatever this machine has of vtpmd outside dpkg stays outside.
    for stale in [
        "etc/vtpmd",
        "etc/systemd/system/vtpmd.service",
        "etc/systemd/system/vtpmd.socket",
        "etc/systemd/system/sockets.target.wants/vtpmd.socket",
        "etc/systemd/system/multi-user.target.wants/vtpmd.service",
    ] {
        let p = root.join(stale);
        let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
    }
    std::fs::create_dir_all(c.path("usr-upper")).unwrap();
    std::fs::create_dir_all(c.path("local/bin")).unwrap();
    std::fs::copy(&vmm, c.path("local/bin/vmm")).unwrap();
    std::fs::create_dir_all(c.path("debs")).unwrap();
    std::fs::copy(deb, c.path("debs/vtpmd.deb")).unwrap();
    upgrade_of(deb, &c.path(""));
    let args = [
        // dpkg writes /usr into the upper layer only.
        format!("--overlay=/usr:{}:/usr", c.path("usr-upper").display()).into(),
        bind_ro(&c.path("local"), "/usr/local"),
        bind_ro(&c.path("debs"), "/debs"),
    ];
    Some(c.boot(PACKAGE_PROBE, "After=multi-user.target", &args, 300))
}

/// The upgrade's guest is the first one created again right after its
/// Stop and Delete: its old `vtpmd-guest-<uuid>.scope` may not be
/// collected yet, and a vtpmd that waited it out left the new swtpm in
/// vtpmd.service's cgroup, where the upgrade's restart ended it after
/// TimeoutStopSec= (the guest stopped); vtpmd now stops the stale scope.
#[test]
fn the_package_installs_runs_a_guest_upgrades_under_it_and_removes() {
    let Some(deb) = std::env::var_os("VTPMD_DEB") else {
        eprintln!("SKIPPED: VTPMD_DEB names no .deb (package/deb/build makes one)");
        return;
    };
    let Some(r) = boot_with_package(Path::new(&deb)) else {
        return;
    };
    assert_eq!(r.get("done"), "1");
    assert_eq!(r.get("install"), "0");
    assert_eq!(r.get("socket_enabled"), "enabled");
    assert_eq!(r.get("socket_active"), "active");
    assert_eq!(r.get("service_before"), "inactive", "not socket-activated");
    assert_eq!(r.get("groups"), "vtpmd vtpmd-ro ");
    assert_eq!(r.get("state_dir"), "700");
    assert_eq!(r.get("execstart"), "path=/usr/sbin/vtpmd");
    assert_eq!(r.get("man"), "/usr/share/man/man8/vtpmd.8.gz");
    for step in ["create", "start", "stop", "delete", "start2"] {
        assert_eq!(r.get(step), "0", "{step} failed");
    }
    assert_eq!(r.get("service_after"), "active");
    assert_eq!(r.get("status"), "running");

    // The upgrade restarted vtpmd; the guest noticed nothing.
    assert_eq!(r.get("upgrade"), "0");
    assert!(
        r.get("version").ends_with("+upgrade1"),
        "{}",
        r.get("version")
    );
    assert_eq!(r.get("upgrade_ready"), "0");
    assert_eq!(r.get("restarted"), "0", "the upgrade did not restart vtpmd");
    assert_eq!(r.get("upgrade_state"), "running");
    assert_eq!(r.get("upgrade_reason"), "", "no key came back");
    assert_eq!(r.get("upgrade_resealing"), "0", "not resealing");
    assert_eq!(r.get("upgrade_vmm_alive"), "0");
    assert_eq!(r.get("vmm_exit"), "0", "a TPM write failed");
    let acked: u64 = r.get("acked").parse().unwrap();
    assert!(acked > 10, "{acked}");
    assert_eq!(r.get("sealed"), r.get("acked"), "acknowledged writes lost");
    // The swtpm of before the upgrade served it throughout.
    assert!(!r.get("swtpm_pid").is_empty());
    assert_eq!(r.get("upgrade_pid"), r.get("swtpm_pid"), "another swtpm");

    // Removal drained the guest and kept its sealed state; so did purge.
    assert_eq!(r.get("remove"), "0");
    assert_eq!(r.get("remove_swtpm_alive"), "1", "a guest outlived removal");
    assert_eq!(r.get("remove_service"), "inactive");
    assert_eq!(r.get("remove_socket"), "inactive");
    assert_eq!(r.get("remove_sealed"), "kept");
    assert_eq!(r.get("remove_conffile"), "kept");
    assert_eq!(r.get("purge"), "0");
    assert_eq!(r.get("purge_sealed"), "kept");
    assert_eq!(r.get("purge_conffile"), "");
    assert_eq!(r.get("purge_units"), "0");
}

/// What package/deb/build runs: the binaries print their man pages and
/// completions from their own clap definitions.
#[test]
fn the_binaries_generate_their_man_pages_and_completions() {
    let vtpmctl = Path::new(VTPMD).with_file_name("vtpmctl");
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(VTPMD)
            .args(["--generate", "man"])
            .arg(dir.path()),
    );
    run_ok(
        Command::new(&vtpmctl)
            .args(["--generate", "man"])
            .arg(dir.path()),
    );
    let page = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    assert!(page("vtpmd.8").contains(".TH vtpmd 8"));
    assert!(page("vtpmd.8").contains("check\\-config"));
    assert!(page("vtpmctl.1").contains(".TH vtpmctl 1"));
    assert!(page("vtpmctl-state-verify.1").contains("passphrase\\-file"));
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef vtpmctl"),
        ("fish", "complete -c vtpmctl"),
    ] {
        let out = Command::new(&vtpmctl)
            .args(["--generate", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("attach-args"), "{shell}");
    }
    // Anything else after --generate is a usage error, and without it the
    // arguments parse as before.
    let out = Command::new(&vtpmctl)
        .args(["--generate", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(&vtpmctl).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vtpmctl {}", env!("CARGO_PKG_VERSION"))
    );
}
