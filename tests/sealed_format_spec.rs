//! docs/sealed-format.md against what vtpmd does: the statements of the
//! spec that a writer or reader of another implementation relies on,
//! checked on the real daemon, the real swtpm and real files, and an
//! outside reader (tests/outside_reader.py, written from the spec alone)
//! that must decode what vtpmd sealed and reach vtpmctl's verdicts.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use common::{Daemon, b64};
use serde_json::json;

const SPEC: &str = include_str!("../docs/sealed-format.md");
const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASS: &str = "correct horse battery staple";

fn create(d: &Daemon, guest: &str) {
    d.client()
        .manager(
            "Create",
            json!({"guest": guest, "version": "2.0", "passphrase": b64(PASS)}),
        )
        .unwrap();
}

/// The `--key` option of the real swtpm vtpmd started is the one the spec
/// gives, word for word (the fd number written `N`).
#[test]
fn swtpm_gets_the_key_option_the_spec_gives() {
    let d = Daemon::start();
    create(&d, G);
    d.start_guest(G, PASS);
    let pids = common::swtpms_under(&d.runtime_dir);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--key").unwrap();
    let value = &args[at + 1];
    let (fd, rest) = value
        .strip_prefix("fd=")
        .and_then(|v| v.split_once(','))
        .unwrap_or_else(|| panic!("--key {value}"));
    assert!(fd.parse::<u32>().is_ok(), "--key {value}");
    let documented = format!("`--key fd=N,{rest}`");
    assert!(
        SPEC.contains(&documented),
        "the spec does not give swtpm's actual key option {documented}"
    );
    assert!(
        SPEC.contains(&format!("(vtpmd uses {fd})")),
        "the spec names another key fd than {fd}"
    );
}
