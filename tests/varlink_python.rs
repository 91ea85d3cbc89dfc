//! vtpmd driven by the reference Python client: the `varlink` package from
//! PyPI (pinned, 31.0.0), installed into a venv of its own, runs a guest's
//! whole lifecycle through its Client, interface handlers, IDL parser and
//! error classes (tests/varlink_reference_client.py) against a real daemon.
//! The package checks every reply against the IDL it parsed, so this also
//! holds vtpmd's replies to its own interface description.
//!
//! The venv is made once under the target directory and reused; without
//! `/usr/bin/python3 -m venv` or PyPI the test fails, saying which (.ci/run
//! installs python3-venv).

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::{Value, json};

const PYTHON: &str = "/usr/bin/python3";
const PACKAGE: &str = "varlink";
const VERSION: &str = "31.0.0";
const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/varlink_reference_client.py"
);
const G1: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const G2: &str = "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa";

/// The installed version of the package in the venv's python, if any.
fn installed(python: &Path) -> Option<String> {
    let out = Command::new(python)
        .args([
            "-c",
            &format!("import importlib.metadata as m; print(m.version({PACKAGE:?}))"),
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The venv's python with `varlink==31.0.0`: made and installed on first
/// use (in a directory of its own, renamed into place only when complete),
/// reused afterwards.
fn venv_python() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = tmp.join(format!("{PACKAGE}-{VERSION}-venv"));
    let python = venv.join("bin/python");
    if installed(&python).as_deref() == Some(VERSION) {
        return python;
    }
    let partial = tmp.join(format!("{PACKAGE}-{VERSION}-venv.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    run(
        Command::new(PYTHON).args(["-m", "venv"]).arg(&partial),
        &format!(
            "making a venv with {PYTHON} -m venv (apt-get install python3-venv; .ci/run does)"
        ),
    );
    run(
        Command::new(partial.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            &format!("{PACKAGE}=={VERSION}"),
        ]),
        &format!(
            "pip install {PACKAGE}=={VERSION} from PyPI (the reference client; needs the \
             network, or PIP_INDEX_URL naming a mirror)"
        ),
    );
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::rename(&partial, &venv).unwrap();
    let got = installed(&python);
    assert_eq!(
        got.as_deref(),
        Some(VERSION),
        "{PACKAGE} in {} after installing",
        venv.display()
    );
    python
}

/// Runs the reference client to its end (two minutes at most).
fn reference_client(python: &Path, socket: &Path) -> Value {
    let mut child = Command::new(python)
        .arg(CLIENT)
        .arg(socket)
        .args([G1, G2])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the reference client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn the_python_varlink_package_drives_the_whole_lifecycle() {
    let python = venv_python();
    let d = Daemon::start();
    let r = reference_client(&python, &d.socket);
    eprintln!("{r:#}");

    assert_eq!(r["package"], VERSION);
    assert_eq!(r["info"]["product"], "vtpmd");
    assert_eq!(r["info"]["url"], env!("CARGO_PKG_REPOSITORY"));
    assert_eq!(
        r["info"]["interfaces"],
        json!(["org.varlink.service", "io.vtpmd.Manager"])
    );
    // The package's own parser reads vtpmd's IDL and the service interface.
    assert_eq!(r["interface_name"], "io.vtpmd.Manager");
    assert_eq!(r["service_interface_name"], "org.varlink.service");
    let methods: Vec<&str> = r["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in [
        "GetCapabilities",
        "Create",
        "Start",
        "Stop",
        "Status",
        "List",
        "Monitor",
        "Rekey",
        "Delete",
        "Export",
        "Import",
    ] {
        assert!(methods.contains(&m), "{m} not parsed: {methods:?}");
    }
    assert_eq!(
        r["unknown_interface"],
        json!({"class": "InterfaceNotFound", "error": "org.varlink.service.InterfaceNotFound",
               "parameters": {"interface": "com.example.Nope"}})
    );
    assert!(
        r["capabilities"]["versions"]
            .as_array()
            .unwrap()
            .contains(&json!("2.0"))
    );

    assert_eq!(
        r["created"],
        json!({"guest": G1, "version": "2.0", "model": "tpm-crb", "state": "stopped"})
    );
    assert_eq!(
        r["started"],
        json!({"state": "running", "has_ctrl_socket": true})
    );
    assert_eq!(r["status"], "running");
    assert_eq!(r["listed"], json!([G1]));
    assert_eq!(r["running_event_has_start_timings"], true);
    assert_eq!(r["after_oneway"], json!([G1]));
    assert_eq!(r["stopped"], "stopped");
    // Rekey and Delete answer no parameters; the package reads that as {}.
    assert_eq!(r["rekeyed"], json!({}));
    assert_eq!(
        r["old_passphrase"],
        json!({"class": "VarlinkError", "error": "io.vtpmd.Manager.WrongPassphrase",
               "parameters": {"guest": G1}})
    );
    assert_eq!(r["restarted"], "running");
    assert_eq!(r["deleted"], json!({}));

    // Monitor, read with `more`: the stream in the order things happened.
    let events: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let order = ["existing", "running", "stopped", "deleted"];
    let mut at = 0;
    for e in &events {
        if at < order.len() && *e == order[at] {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "events out of order: {events:?}");
    assert_eq!(events.first(), Some(&"existing"), "{events:?}");

    assert_eq!(
        r["no_such_guest"],
        json!({"class": "VarlinkError", "error": "io.vtpmd.Manager.NoSuchGuest",
               "parameters": {"guest": G2}})
    );
    assert_eq!(
        r["invalid_guest"],
        json!({"class": "InvalidParameter", "error": "org.varlink.service.InvalidParameter",
               "parameters": {"parameter": "guest"}})
    );
    // An error without fields: no parameters on the wire, none to the package.
    assert_eq!(
        r["expected_more"]["error"],
        "org.varlink.service.ExpectedMore"
    );
    assert_eq!(r["expected_more"]["class"], "VarlinkError");
    assert_eq!(r["listed_at_end"], json!([]));
}
