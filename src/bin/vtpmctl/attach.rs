//! `vtpmctl attach-args`: what to give a VMM so that it attaches to a
//! running guest's swtpm through its control socket.
//!
//! - QEMU: `-chardev socket,… -tpmdev emulator,… -device <model>,…`.
//! - libvirt (≥ 9.0): a `<tpm>` element with `<backend type='external'>`.
//!   No `version` attribute on the backend: libvirt's schema allows it,
//!   but libvirt keeps the version only for its own `emulator` backend
//!   (the `external` one stores just the socket), and its documentation
//!   says the attribute only works with `emulator`.
//! - cloud-hypervisor: `--tpm socket=…`; it emulates a TPM 2.0 behind a
//!   CRB interface only, so other guests are refused.

use clap::ValueEnum;
use serde_json::{Value, json};
use vtpmd::protocol::manager::GuestView;

/// The VMM to print arguments for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Vmm {
    Qemu,
    Libvirt,
    CloudHypervisor,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Libvirt => "libvirt",
            Self::CloudHypervisor => "cloud-hypervisor",
        }
    }
}

/// What to give the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// Command-line arguments, one element each.
    Args { vmm: Vmm, args: Vec<String> },
    /// A libvirt domain XML fragment.
    Xml(String),
}

impl Attach {
    /// For people: arguments on one line, each quoted for a POSIX shell
    /// where needed; XML as it is.
    pub fn human(&self) -> String {
        match self {
            Self::Args { args, .. } => {
                let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
                format!("{}\n", quoted.join(" "))
            }
            Self::Xml(xml) => xml.clone(),
        }
    }

    /// For programs: `{"for": …, "args": […]}` or `{"for": "libvirt", "xml": …}`.
    pub fn json(&self) -> Value {
        match self {
            Self::Args { vmm, args } => json!({ "for": vmm.name(), "args": args }),
            Self::Xml(xml) => json!({ "for": Vmm::Libvirt.name(), "xml": xml }),
        }
    }
}

/// Why no arguments can be given, phrased like the daemon's errors.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub name: &'static str,
    pub parameters: Value,
    pub message: String,
}

/// A QEMU object id: a letter, then letters, digits, `-`, `.`, `_`.
pub fn parse_id(text: &str) -> Result<String, String> {
    let mut chars = text.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if first_ok && rest_ok && text.len() <= 120 {
        Ok(text.to_owned())
    } else {
        Err("an id is a letter followed by letters, digits, '-', '.' or '_'".to_owned())
    }
}

/// The arguments for `vmm` to attach to guest `g`, which must be running.
pub fn attach_args(g: &GuestView, vmm: Vmm, id: &str) -> Result<Attach, Refusal> {
    let socket = match (&g.ctrl_socket, g.state.as_str()) {
        (Some(socket), "running") => socket.as_str(),
        _ => {
            return Err(Refusal {
                name: "io.vtpmd.Manager.GuestNotRunning",
                parameters: json!({ "guest": g.guest, "state": g.state }),
                message: format!(
                    "guest {}: not running (state: {}); start it first (vtpmctl start {})",
                    g.guest, g.state, g.guest
                ),
            });
        }
    };
    if !matches!(g.model.as_str(), "tpm-tis" | "tpm-crb") {
        return Err(spec_refusal(format!(
            "guest {}: unknown TPM model {:?}",
            g.guest, g.model
        )));
    }
    Ok(match vmm {
        Vmm::Qemu => Attach::Args {
            vmm,
            args: vec![
                "-chardev".to_owned(),
                format!("socket,id=chr{id},path={}", qemu_escape(socket)),
                "-tpmdev".to_owned(),
                format!("emulator,id={id},chardev=chr{id}"),
                "-device".to_owned(),
                format!("{},tpmdev={id}", g.model),
            ],
        },
        Vmm::Libvirt => Attach::Xml(format!(
            "<tpm model='{}'>\n  <backend type='external'>\n    \
             <source type='unix' mode='connect' path='{}'/>\n  </backend>\n</tpm>\n",
            xml_escape(&g.model),
            xml_escape(socket)
        )),
        Vmm::CloudHypervisor => {
            if g.version != "2.0" || g.model != "tpm-crb" {
                return Err(spec_refusal(format!(
                    "guest {}: cloud-hypervisor attaches only a TPM 2.0 with the CRB interface \
                     (tpm-crb); this guest's TPM is {} with {}",
                    g.guest, g.version, g.model
                )));
            }
            if socket.contains(',') {
                return Err(spec_refusal(format!(
                    "guest {}: cloud-hypervisor cannot take a socket path with a comma: {socket}",
                    g.guest
                )));
            }
            Attach::Args {
                vmm,
                args: vec!["--tpm".to_owned(), format!("socket={socket}")],
            }
        }
    })
}

fn spec_refusal(message: String) -> Refusal {
    Refusal {
        name: "io.vtpmd.Manager.InvalidTpmSpec",
        parameters: json!({ "reason": message }),
        message,
    }
}

/// A value inside a QEMU option string: commas are doubled.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// An XML attribute value between single or double quotes.
fn xml_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// One word for a POSIX shell: as it is when only safe characters, else in
/// single quotes (a `'` inside becomes `'\''`).
fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";

    fn guest(version: &str, model: &str) -> GuestView {
        GuestView {
            guest: G.into(),
            version: version.into(),
            model: model.into(),
            state: "running".into(),
            pid: Some(99),
            ctrl_socket: Some("/run/vtpmd/g/0f6a/ctrl.sock".into()),
            generation: 3,
            failure: None,
            reason: None,
            keyslots: None,
            replication: None,
        }
    }

    #[test]
    fn qemu_gets_chardev_tpmdev_and_device_with_the_guest_model() {
        let a = attach_args(&guest("2.0", "tpm-crb"), Vmm::Qemu, "tpm0").unwrap();
        assert_eq!(
            a.human(),
            "-chardev socket,id=chrtpm0,path=/run/vtpmd/g/0f6a/ctrl.sock \
             -tpmdev emulator,id=tpm0,chardev=chrtpm0 -device tpm-crb,tpmdev=tpm0\n"
        );
        let a = attach_args(&guest("1.2", "tpm-tis"), Vmm::Qemu, "vtpm").unwrap();
        assert_eq!(
            a.json(),
            json!({"for": "qemu", "args": [
                "-chardev", "socket,id=chrvtpm,path=/run/vtpmd/g/0f6a/ctrl.sock",
                "-tpmdev", "emulator,id=vtpm,chardev=chrvtpm",
                "-device", "tpm-tis,tpmdev=vtpm"]})
        );
    }

    #[test]
    fn odd_paths_are_escaped_for_qemu_and_the_shell() {
        let mut g = guest("2.0", "tpm-tis");
        g.ctrl_socket = Some("/tmp/my dir/it's,odd.sock".into());
        let a = attach_args(&g, Vmm::Qemu, "tpm0").unwrap();
        let Attach::Args { args, .. } = &a else {
            panic!("{a:?}")
        };
        assert_eq!(args[1], "socket,id=chrtpm0,path=/tmp/my dir/it's,,odd.sock");
        assert!(
            a.human()
                .starts_with(r"-chardev 'socket,id=chrtpm0,path=/tmp/my dir/it'\''s,,odd.sock' "),
            "{}",
            a.human()
        );
    }

    #[test]
    fn libvirt_gets_an_external_backend_element() {
        let a = attach_args(&guest("2.0", "tpm-crb"), Vmm::Libvirt, "tpm0").unwrap();
        assert_eq!(
            a.human(),
            "<tpm model='tpm-crb'>\n  <backend type='external'>\n    \
             <source type='unix' mode='connect' path='/run/vtpmd/g/0f6a/ctrl.sock'/>\n  \
             </backend>\n</tpm>\n"
        );
        assert_eq!(a.json()["for"], "libvirt");
        let mut g = guest("2.0", "tpm-tis");
        g.ctrl_socket = Some("/tmp/a&b'<c>\".sock".into());
        let a = attach_args(&g, Vmm::Libvirt, "tpm0").unwrap();
        assert!(
            a.human()
                .contains("path='/tmp/a&amp;b&apos;&lt;c&gt;&quot;.sock'"),
            "{}",
            a.human()
        );
    }

    #[test]
    fn cloud_hypervisor_takes_only_tpm2_crb() {
        let a = attach_args(&guest("2.0", "tpm-crb"), Vmm::CloudHypervisor, "tpm0").unwrap();
        assert_eq!(a.human(), "--tpm socket=/run/vtpmd/g/0f6a/ctrl.sock\n");
        assert_eq!(
            a.json(),
            json!({"for": "cloud-hypervisor", "args": ["--tpm", "socket=/run/vtpmd/g/0f6a/ctrl.sock"]})
        );
        for (v, m) in [("2.0", "tpm-tis"), ("1.2", "tpm-tis")] {
            let r = attach_args(&guest(v, m), Vmm::CloudHypervisor, "tpm0").unwrap_err();
            assert_eq!(r.name, "io.vtpmd.Manager.InvalidTpmSpec");
            assert!(
                r.message.contains("only a TPM 2.0 with the CRB"),
                "{}",
                r.message
            );
        }
    }

    #[test]
    fn a_guest_that_does_not_run_is_refused() {
        let mut g = guest("2.0", "tpm-crb");
        g.state = "stopped".into();
        g.ctrl_socket = None;
        g.pid = None;
        for vmm in [Vmm::Qemu, Vmm::Libvirt, Vmm::CloudHypervisor] {
            let r = attach_args(&g, vmm, "tpm0").unwrap_err();
            assert_eq!(r.name, "io.vtpmd.Manager.GuestNotRunning");
            assert_eq!(r.parameters, json!({"guest": G, "state": "stopped"}));
            assert!(r.message.contains("not running (state: stopped)"));
        }
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(parse_id("tpm0").unwrap(), "tpm0");
        assert!(parse_id("t-p.m_1").is_ok());
        for bad in ["", "0tpm", "tpm,0", "tpm 0", "tpm=0"] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }
}
