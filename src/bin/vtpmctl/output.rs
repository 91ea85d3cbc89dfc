//! Human output: replies as `key: value` lines or a short table, and
//! Varlink errors as sentences.

use std::fmt::Write;

use serde_json::Value;
use vtpmd::protocol::manager::{CapabilitiesReply, GuestView, KeyslotView, MonitorReply};

/// `name: sentence` for an error reply, e.g.
/// `io.vtpmd.Manager.WrongPassphrase: guest 0f6a…: wrong passphrase`.
/// SwtpmFailed is followed by swtpm's log lines, indented.
pub fn describe_remote(name: &str, parameters: &Value) -> String {
    let p = |key: &str| -> String {
        match parameters.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => "?".to_owned(),
        }
    };
    let short = name.rsplit('.').next().unwrap_or(name);
    let sentence = match (name.strip_suffix(short), short) {
        (Some("io.vtpmd.Manager."), "NoSuchGuest") => {
            format!("guest {}: no such guest", p("guest"))
        }
        (Some("io.vtpmd.Manager."), "GuestExists") => {
            format!("guest {}: already exists", p("guest"))
        }
        (Some("io.vtpmd.Manager."), "GuestRunning") => {
            format!("guest {}: is {}; stop it first", p("guest"), p("state"))
        }
        (Some("io.vtpmd.Manager."), "GuestNotRunning") => {
            format!("guest {}: not running (state: {})", p("guest"), p("state"))
        }
        (Some("io.vtpmd.Manager."), "InvalidTpmSpec") => {
            format!("invalid TPM spec: {}", p("reason"))
        }
        (Some("io.vtpmd.Manager."), "WrongPassphrase") => {
            format!("guest {}: wrong passphrase", p("guest"))
        }
        (Some("io.vtpmd.Manager."), "WrongKey") => {
            format!(
                "guest {}: the {} opens none of its {} slots",
                p("guest"),
                p("kind"),
                p("kind")
            )
        }
        (Some("io.vtpmd.Manager."), "NoKeyslot") => match parameters.get("host_fingerprint") {
            Some(Value::String(f)) => format!(
                "guest {}: no host slot for this host (fingerprint {f}); Grant this host's key (vtpmctl host-key) on a host that can open the guest, or give the passphrase or key",
                p("guest")
            ),
            _ => format!("guest {}: no {} slot", p("guest"), p("kind")),
        },
        (Some("io.vtpmd.Manager."), "LastKeyslot") => format!(
            "guest {}: keyslot {} is the last one; add another before removing it",
            p("guest"),
            p("slot")
        ),
        (Some("io.vtpmd.Manager."), "NoSuchKeyslot") => {
            format!("guest {}: no keyslot {}", p("guest"), p("slot"))
        }
        (Some("io.vtpmd.Manager."), "KeyslotsFull") => format!(
            "guest {}: all {} keyslots are in use; revoke one first",
            p("guest"),
            p("max")
        ),
        (Some("io.vtpmd.Manager."), "StateCorrupt") => format!(
            "guest {}: the sealed state is damaged and no earlier generation opens ({}); restore it from a backup (or import a sound copy)",
            p("guest"),
            p("reason")
        ),
        (Some("io.vtpmd.Manager."), "GuestMismatch") => format!(
            "guest {}: the sealed file belongs to guest {} (nothing is damaged); put the guest's own file at its path, or import this guest's file",
            p("guest"),
            p("found")
        ),
        (Some("io.vtpmd.Manager."), "SwtpmFailed") => {
            let mut text = format!("guest {}: swtpm failed: {}", p("guest"), p("message"));
            let lines: Vec<&str> = parameters
                .get("log_tail")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !lines.is_empty() {
                text.push_str("\nswtpm's log (last lines):");
                for line in lines {
                    let _ = write!(text, "\n  {line}");
                }
            }
            text
        }
        (Some("io.vtpmd.Manager."), "StaleGeneration") => format!(
            "guest {}: the sealed file is generation {}, not newer than generation {} on this host; importing it would roll the TPM back (nothing was written)",
            p("guest"),
            p("generation"),
            p("current")
        ),
        (Some("io.vtpmd.Manager."), "UnsealedWrites") => format!(
            "guest {}: has writes that are not sealed yet ({}); start it with its passphrase first",
            p("guest"),
            p("reason")
        ),
        (Some("io.vtpmd.Manager."), "SealedTooLarge") => format!(
            "guest {}: the sealed file is {} bytes, above this host's limit of {} ([api] max_sealed_bytes)",
            p("guest"),
            p("size"),
            p("limit")
        ),
        (Some("io.vtpmd.Manager."), "PermissionDenied") => format!(
            "permission denied for {}: this needs vtpmd's (read-write) group or root",
            p("method")
        ),
        (Some("io.vtpmd.Manager."), "Busy") => format!(
            "guest {}: busy (another operation on it is in progress, or vtpmd is shutting down); try again",
            p("guest")
        ),
        (Some("io.vtpmd.Manager."), "Internal") => {
            format!("vtpmd failed: {} (its log has the details)", p("reason"))
        }
        (Some("io.vtpmd.Manager."), "TooManyConnections") => {
            if parameters.get("scope").and_then(Value::as_str) == Some("uid") {
                format!(
                    "your user already holds its {} connections to vtpmd; close some and try again",
                    p("limit")
                )
            } else {
                format!(
                    "vtpmd serves {} connections at most and all are in use; try again",
                    p("limit")
                )
            }
        }
        (Some("org.varlink.service."), "InvalidParameter") => {
            format!("vtpmd refused the parameter {}", p("parameter"))
        }
        (Some("org.varlink.service."), "MethodNotFound") => format!(
            "vtpmd does not know the method {} (an older vtpmd?)",
            p("method")
        ),
        (Some("org.varlink.service."), "MethodNotImplemented") => {
            format!("vtpmd does not implement the method {}", p("method"))
        }
        (Some("org.varlink.service."), "InterfaceNotFound") => {
            format!("vtpmd does not offer the interface {}", p("interface"))
        }
        (Some("org.varlink.service."), "ExpectedMore") => {
            "vtpmd expected a streaming call (\"more\")".to_owned()
        }
        _ => {
            let params = match parameters {
                Value::Object(m) if m.is_empty() => String::new(),
                other => format!(" {other}"),
            };
            format!("error reply{params}")
        }
    };
    format!("{name}: {sentence}")
}

/// `key: value` lines for one guest.
pub fn guest(g: &GuestView) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("guest", g.guest.clone()),
        ("state", g.state.clone()),
        ("version", g.version.clone()),
        ("model", g.model.clone()),
        ("generation", g.generation.to_string()),
    ];
    if let Some(pid) = g.pid {
        rows.push(("pid", pid.to_string()));
    }
    if let Some(sock) = &g.ctrl_socket {
        rows.push(("ctrl_socket", sock.clone()));
    }
    if let Some(failure) = &g.failure {
        rows.push(("failure", failure.clone()));
    }
    if let Some(reason) = &g.reason {
        rows.push(("reason", reason.clone()));
    }
    if let Some(r) = &g.replication {
        let state = match (&r.error, r.pending) {
            (Some(e), _) => format!("behind, retrying ({e})"),
            (None, true) => "pending".to_owned(),
            (None, false) => "current".to_owned(),
        };
        rows.push(("etcd", format!("generation {}, {state}", r.generation)));
    }
    let mut out = key_values(&rows);
    if let Some(slots) = &g.keyslots {
        out.push_str("keyslots:\n");
        out.push_str(&keyslots(slots));
    }
    out
}

/// One line per keyslot: index, kind, and a host slot's host.
pub fn keyslots(slots: &[KeyslotView]) -> String {
    let mut out = String::new();
    for slot in slots {
        let host = slot
            .host_fingerprint
            .as_ref()
            .map(|f| format!(" (host {f})"))
            .unwrap_or_default();
        let _ = writeln!(out, "  {}: {}{host}", slot.index, slot.kind);
    }
    out
}

/// What this host serves.
pub fn capabilities(c: &CapabilitiesReply) -> String {
    key_values(&[
        ("swtpm_version", c.swtpm_version.clone()),
        ("versions", c.versions.join(", ")),
        ("models", c.models.join(", ")),
        ("traits", c.traits.join(", ")),
        (
            "max_sealed_bytes",
            c.max_sealed_bytes
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
        ),
    ])
}

fn key_values(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in rows {
        let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
    }
    out
}

/// A table of guests, one line each; "no guests" for none.
pub fn guest_table(guests: &[GuestView]) -> String {
    if guests.is_empty() {
        return "no guests\n".to_owned();
    }
    let header = ["GUEST", "STATE", "TPM", "MODEL", "GENERATION", "PID"];
    let mut rows: Vec<[String; 6]> = vec![header.map(str::to_owned)];
    for g in guests {
        rows.push([
            g.guest.clone(),
            g.state.clone(),
            g.version.clone(),
            g.model.clone(),
            g.generation.to_string(),
            g.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for g in guests.iter().filter(|g| g.failure.is_some()) {
        let _ = writeln!(
            out,
            "{} failed: {}",
            g.guest,
            g.failure.as_deref().unwrap_or_default()
        );
    }
    out
}

/// One line per Monitor event.
pub fn event(e: &MonitorReply) -> String {
    let g = &e.guest;
    let mut line = format!(
        "{} {} state={} tpm={} model={} generation={}",
        e.event, g.guest, g.state, g.version, g.model, g.generation
    );
    if let Some(pid) = g.pid {
        let _ = write!(line, " pid={pid}");
    }
    if let Some(failure) = &g.failure {
        let _ = write!(line, " failure={failure:?}");
    }
    if let Some(reason) = &g.reason {
        let _ = write!(line, " reason={reason:?}");
    }
    if let Some(ms) = e.reseal_ms {
        let _ = write!(line, " reseal_ms={ms:.1}");
    }
    if let Some(t) = &e.start {
        let _ = write!(
            line,
            " start_ms={:.1} (queued={:.1} kdf={:.1} unseal={:.1} spawn={:.1} ready={:.1})",
            t.total_ms, t.queued_ms, t.kdf_ms, t.unseal_ms, t.spawn_ms, t.ready_ms
        );
    }
    if let Some(detail) = &e.detail {
        let _ = write!(line, " detail={detail:?}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vtpmd::protocol::manager::StartTimingsView;

    const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";

    fn running() -> GuestView {
        GuestView {
            guest: G.into(),
            version: "2.0".into(),
            model: "tpm-crb".into(),
            state: "running".into(),
            pid: Some(4242),
            ctrl_socket: Some(format!("/run/vtpmd/guests/{G}/ctrl.sock")),
            generation: 7,
            failure: None,
            reason: None,
            keyslots: None,
            replication: None,
        }
    }

    #[test]
    fn every_manager_error_reads_as_a_sentence() {
        let cases = [
            ("NoSuchGuest", json!({"guest": G}), "no such guest"),
            ("GuestExists", json!({"guest": G}), "already exists"),
            (
                "GuestRunning",
                json!({"guest": G, "state": "running"}),
                "is running; stop it first",
            ),
            (
                "GuestNotRunning",
                json!({"guest": G, "state": "stopped"}),
                "not running (state: stopped)",
            ),
            (
                "InvalidTpmSpec",
                json!({"reason": "tpm-crb needs 2.0"}),
                "invalid TPM spec: tpm-crb needs 2.0",
            ),
            ("WrongPassphrase", json!({"guest": G}), "wrong passphrase"),
            (
                "StateCorrupt",
                json!({"guest": G, "reason": "bad tag"}),
                "restore it from a backup",
            ),
            (
                "GuestMismatch",
                json!({"guest": G, "found": "7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa"}),
                "belongs to guest 7d0a9d43-41d4-4c3e-8a5e-2f61b3c0d7aa",
            ),
            (
                "PermissionDenied",
                json!({"method": "Start"}),
                "permission denied for Start",
            ),
            ("Busy", json!({"guest": G}), "busy"),
            (
                "StaleGeneration",
                json!({"guest": G, "generation": 3, "current": 5}),
                "generation 3, not newer than generation 5",
            ),
            (
                "UnsealedWrites",
                json!({"guest": G, "reason": "no key"}),
                "not sealed yet (no key)",
            ),
            (
                "SealedTooLarge",
                json!({"guest": G, "size": 9, "limit": 8}),
                "9 bytes, above this host's limit of 8",
            ),
            (
                "Internal",
                json!({"reason": "disk full"}),
                "vtpmd failed: disk full",
            ),
            (
                "TooManyConnections",
                json!({"scope": "uid", "limit": 16}),
                "your user already holds its 16 connections",
            ),
            (
                "TooManyConnections",
                json!({"scope": "all", "limit": 112}),
                "112 connections at most",
            ),
        ];
        for (short, params, expect) in cases {
            let name = format!("io.vtpmd.Manager.{short}");
            let text = describe_remote(&name, &params);
            assert!(text.starts_with(&format!("{name}: ")), "{text}");
            assert!(text.contains(expect), "{text}");
        }
        assert_eq!(
            describe_remote("io.vtpmd.Manager.WrongPassphrase", &json!({"guest": G})),
            format!("io.vtpmd.Manager.WrongPassphrase: guest {G}: wrong passphrase")
        );
    }

    #[test]
    fn swtpm_failures_show_the_log_tail() {
        let text = describe_remote(
            "io.vtpmd.Manager.SwtpmFailed",
            &json!({"guest": G, "message": "exited with status 1",
                    "log_tail": ["libtpms: error", "Verification of HMAC failed"]}),
        );
        assert_eq!(
            text,
            format!(
                "io.vtpmd.Manager.SwtpmFailed: guest {G}: swtpm failed: exited with status 1\n\
                 swtpm's log (last lines):\n  libtpms: error\n  Verification of HMAC failed"
            )
        );
    }

    #[test]
    fn service_and_unknown_errors_are_readable() {
        for (name, params, expect) in [
            (
                "org.varlink.service.InvalidParameter",
                json!({"parameter": "guest"}),
                "refused the parameter guest",
            ),
            (
                "org.varlink.service.MethodNotFound",
                json!({"method": "io.vtpmd.Manager.X"}),
                "does not know the method io.vtpmd.Manager.X",
            ),
            (
                "org.varlink.service.MethodNotImplemented",
                json!({"method": "m"}),
                "does not implement",
            ),
            (
                "org.varlink.service.InterfaceNotFound",
                json!({"interface": "x.y"}),
                "does not offer the interface x.y",
            ),
            ("org.varlink.service.ExpectedMore", json!({}), "streaming"),
            ("com.example.Odd", json!({"x": 1}), r#"error reply {"x":1}"#),
            ("io.vtpmd.Manager.Future", json!({}), "error reply"),
        ] {
            let text = describe_remote(name, &params);
            assert!(text.starts_with(name), "{text}");
            assert!(text.contains(expect), "{text}");
        }
        // Missing parameters do not break the sentence.
        assert!(describe_remote("io.vtpmd.Manager.NoSuchGuest", &json!({})).contains("guest ?"));
    }

    #[test]
    fn a_guest_is_key_value_lines() {
        let text = guest(&running());
        assert_eq!(
            text,
            format!(
                "guest:       {G}\nstate:       running\nversion:     2.0\nmodel:       tpm-crb\n\
                 generation:  7\npid:         4242\nctrl_socket: /run/vtpmd/guests/{G}/ctrl.sock\n"
            )
        );
        let mut failed = running();
        failed.state = "failed".into();
        failed.pid = None;
        failed.ctrl_socket = None;
        failed.failure = Some("swtpm was killed by signal 9".into());
        let text = guest(&failed);
        assert!(
            text.contains("failure:    swtpm was killed by signal 9"),
            "{text}"
        );
        assert!(!text.contains("pid"));
        let mut adopted = running();
        adopted.reason = Some("key needed to reseal".into());
        assert!(
            guest(&adopted).contains("reason:      key needed to reseal"),
            "{}",
            guest(&adopted)
        );
    }

    #[test]
    fn the_list_is_a_table() {
        let mut stopped = running();
        stopped.guest = "11111111-2222-4333-8444-555555555555".into();
        stopped.state = "stopped".into();
        stopped.pid = None;
        let text = guest_table(&[running(), stopped]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("GUEST"));
        assert!(
            lines[1].starts_with(G) && lines[1].contains("running") && lines[1].ends_with("4242")
        );
        assert!(lines[2].contains("stopped") && lines[2].ends_with('-'));
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("running"), Some(col), "aligned:\n{text}");
        assert_eq!(guest_table(&[]), "no guests\n");
    }

    #[test]
    fn events_are_one_line() {
        let e = MonitorReply {
            event: "running".into(),
            guest: running(),
            detail: None,
            reseal_ms: None,
            start: None,
        };
        assert_eq!(
            event(&e),
            format!("running {G} state=running tpm=2.0 model=tpm-crb generation=7 pid=4242")
        );
    }

    #[test]
    fn events_carry_their_measurements() {
        let started = MonitorReply {
            event: "running".into(),
            guest: running(),
            detail: Some("started from the previous generation".into()),
            reseal_ms: None,
            start: Some(StartTimingsView {
                queued_ms: 0.0,
                kdf_ms: 201.25,
                unseal_ms: 1.5,
                spawn_ms: 3.0,
                ready_ms: 4.0,
                total_ms: 210.0,
            }),
        };
        assert!(event(&started).ends_with(
            " pid=4242 start_ms=210.0 (queued=0.0 kdf=201.2 unseal=1.5 spawn=3.0 ready=4.0) \
             detail=\"started from the previous generation\""
        ));
        let resealed = MonitorReply {
            event: "resealed".into(),
            reseal_ms: Some(9.46),
            ..started
        };
        assert!(event(&resealed).contains(" pid=4242 reseal_ms=9.5 start_ms="));
    }
}
