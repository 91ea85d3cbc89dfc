//! The daemon's capabilities: dropped at start to the documented set, then
//! read back and checked.
//!
//! vtpmd as root keeps exactly [`KEPT`]:
//!
//! | capability | why |
//! |---|---|
//! | `CAP_SETUID`, `CAP_SETGID` | run each guest's swtpm as its own uid and gid, and take on that uid for a moment to signal it or probe its socket (`swtpm::spawn::signal_as`) |
//! | `CAP_CHOWN` | give a guest's runtime directory to its group, its state files and control socket to its uid (and the socket to the VMM's group) |
//!
//! and nothing else: no `CAP_KILL` (signals go through a helper running as
//! the guest's uid), no `CAP_DAC_OVERRIDE` or `CAP_DAC_READ_SEARCH` (each
//! guest's runtime directory is vtpmd's and the guest's group, see
//! `store`), no `CAP_IPC_LOCK` (secrets fit in `RLIMIT_MEMLOCK`), no
//! `CAP_SETPCAP` once the bounding set is narrowed.
//!
//! [`restrict`] runs before any other thread exists (capabilities are per
//! thread; threads inherit the creator's): it sets `PR_SET_NO_NEW_PRIVS`
//! (inherited by every child: nothing vtpmd or swtpm executes can gain a
//! privilege through setuid bits or file capabilities), clears the ambient
//! and inheritable sets, drops everything else from the bounding set
//! (possible only while `CAP_SETPCAP` is still effective; under systemd
//! `CapabilityBoundingSet=` has done it already), and sets effective and
//! permitted to [`KEPT`]. Then [`check`] compares what the kernel reports
//! with the documented set: a capability left over is refused (start-up
//! fails, naming it) unless `--allow-extra-caps` says to go on with a
//! warning; one of [`KEPT`] missing as root is always refused, since guests
//! could not be sandboxed.
//!
//! A daemon that is not root and holds no capability has nothing to drop:
//! its (empty) sets are logged and swtpm runs as its own user.

#![forbid(unsafe_code)]

use std::fmt;

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities vtpmd keeps as root.
pub const KEPT: [Capability; 3] = [
    Capability::CAP_CHOWN,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
];

/// The five capability sets of a thread as bit masks (bit n = capability
/// n), as `/proc/<pid>/status` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub bounding: u64,
    pub ambient: u64,
}

impl CapSets {
    /// Parses the `CapInh`, `CapPrm`, `CapEff`, `CapBnd` and `CapAmb`
    /// lines of a `/proc/<pid>/status`; `None` if one is missing.
    pub fn from_proc_status(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        Some(Self {
            effective: field("CapEff")?,
            permitted: field("CapPrm")?,
            inheritable: field("CapInh")?,
            bounding: field("CapBnd")?,
            ambient: field("CapAmb")?,
        })
    }

    /// This thread's sets, through `capget(2)` and `prctl(2)`.
    fn current() -> Result<Self, PrivilegeError> {
        let read = |set: CapSet, name: &'static str| {
            caps::read(None, set)
                .map(|s| mask(&s))
                .map_err(|e| PrivilegeError::Read {
                    set: name,
                    why: e.to_string(),
                })
        };
        Ok(Self {
            effective: read(CapSet::Effective, "effective")?,
            permitted: read(CapSet::Permitted, "permitted")?,
            inheritable: read(CapSet::Inheritable, "inheritable")?,
            bounding: read(CapSet::Bounding, "bounding")?,
            ambient: read(CapSet::Ambient, "ambient").unwrap_or(0),
        })
    }
}

/// Capabilities named by a mask, for messages: `CAP_KILL, CAP_SYS_ADMIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapNames(pub u64);

impl fmt::Display for CapNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for bit in 0..64u8 {
            if self.0 & (1u64 << bit) == 0 {
                continue;
            }
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            match caps::all().into_iter().find(|c| c.index() == bit) {
                Some(cap) => write!(f, "{cap}")?,
                None => write!(f, "capability {bit}")?,
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Why the daemon refuses to run with the capabilities it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "the {set} capability set still holds {caps} beyond the documented CAP_CHOWN, CAP_SETGID, CAP_SETUID; start with --allow-extra-caps to run anyway"
    )]
    ExtraCapabilities { set: &'static str, caps: CapNames },
    #[error(
        "vtpmd runs as root without {caps}, which it needs to run each guest's swtpm under its own uid"
    )]
    MissingCapabilities { caps: CapNames },
    #[error("cannot read the {set} capability set: {why}")]
    Read { set: &'static str, why: String },
    #[error("cannot narrow the {set} capability set: {why}")]
    Drop { set: &'static str, why: String },
    #[error("cannot set PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] nix::Error),
    #[error(
        "capabilities must be dropped before any thread is started, and this process has {threads}"
    )]
    Threads { threads: usize },
}

/// What [`restrict`] left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub sets: CapSets,
    /// Extra capabilities accepted because `allow_extra` was given.
    pub accepted_extra: Option<(&'static str, CapNames)>,
}

/// The mask of [`KEPT`].
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, c| m | c.bitmask())
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

/// Checks `sets` against the documented set. `root`: the daemon's euid is
/// 0, so [`KEPT`] must all be effective, and the bounding set counts too
/// (for anyone else it is harmless under no-new-privileges). An extra
/// capability is an error unless `allow_extra`, then it is reported.
pub fn check(
    sets: &CapSets,
    root: bool,
    allow_extra: bool,
) -> Result<Option<(&'static str, CapNames)>, PrivilegeError> {
    let kept = kept_mask();
    if root {
        let missing = kept & !sets.effective;
        if missing != 0 {
            return Err(PrivilegeError::MissingCapabilities {
                caps: CapNames(missing),
            });
        }
    }
    let mut checked = vec![
        ("effective", sets.effective),
        ("permitted", sets.permitted),
        ("inheritable", sets.inheritable),
        ("ambient", sets.ambient),
    ];
    if root {
        checked.push(("bounding", sets.bounding));
    }
    let mut accepted = None;
    for (set, bits) in checked {
        // Inheritable and ambient must be empty: nothing is handed on.
        let allowed = match set {
            "inheritable" | "ambient" => 0,
            _ => kept,
        };
        let extra = bits & !allowed;
        if extra == 0 {
            continue;
        }
        if !allow_extra {
            return Err(PrivilegeError::ExtraCapabilities {
                set,
                caps: CapNames(extra),
            });
        }
        accepted.get_or_insert((set, CapNames(extra)));
    }
    Ok(accepted)
}

/// Narrows this process to the documented capabilities and checks the
/// result; see the [module docs](self). Call it first thing, before any
/// thread is started.
pub fn restrict(allow_extra: bool) -> Result<Report, PrivilegeError> {
    if let Some(threads) = thread_count() {
        if threads != 1 {
            return Err(PrivilegeError::Threads { threads });
        }
    }
    // Inherited by every child: swtpm_setup, swtpm, the signal helpers.
    nix::sys::prctl::set_no_new_privs().map_err(PrivilegeError::NoNewPrivs)?;
    let root = nix::unistd::geteuid().is_root();
    let before = CapSets::current()?;
    if !root && before.permitted == 0 && before.ambient == 0 && before.inheritable == 0 {
        tracing::info!(
            effective = %CapNames(before.effective),
            "not root: no capability to drop; every swtpm runs as vtpmd's user"
        );
        return Ok(Report {
            sets: before,
            accepted_extra: None,
        });
    }
    let kept: CapsHashSet = KEPT.into_iter().collect();
    let drop_err = |set: &'static str| {
        move |e: caps::errors::CapsError| PrivilegeError::Drop {
            set,
            why: e.to_string(),
        }
    };
    // Ambient first (it must stay a subset of permitted and inheritable).
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(drop_err("ambient"))?;
    }
    // The bounding set needs CAP_SETPCAP, still effective here if we had
    // it; a capability that cannot be dropped is caught by the check.
    for cap in caps::read(None, CapSet::Bounding).map_err(drop_err("bounding"))? {
        if !kept.contains(&cap) {
            if let Err(e) = caps::drop(None, CapSet::Bounding, cap) {
                tracing::debug!("cannot drop {cap} from the bounding set: {e}");
            }
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(drop_err("inheritable"))?;
    // Effective before permitted: effective must stay within permitted.
    let permitted = caps::read(None, CapSet::Permitted).map_err(drop_err("permitted"))?;
    let keep: CapsHashSet = permitted.intersection(&kept).copied().collect();
    caps::set(None, CapSet::Effective, &keep).map_err(drop_err("effective"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(drop_err("permitted"))?;

    // Read back what the kernel says, /proc first (every bit, also
    // capabilities newer than the `caps` crate), capget otherwise.
    let after = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| CapSets::from_proc_status(&s))
        .map_or_else(CapSets::current, Ok)?;
    let accepted_extra = check(&after, root, allow_extra)?;
    match accepted_extra {
        Some((set, caps)) => tracing::warn!(
            "--allow-extra-caps: running with {caps} in the {set} set, beyond the documented set"
        ),
        None => tracing::info!(
            effective = %CapNames(after.effective),
            bounding = %CapNames(after.bounding),
            "capabilities narrowed"
        ),
    }
    Ok(Report {
        sets: after,
        accepted_extra,
    })
}

/// The number of threads of this process, if `/proc` tells.
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KILL: u64 = 1 << 5;
    const DAC_OVERRIDE: u64 = 1 << 1;

    fn exact() -> CapSets {
        CapSets {
            effective: kept_mask(),
            permitted: kept_mask(),
            inheritable: 0,
            bounding: kept_mask(),
            ambient: 0,
        }
    }

    #[test]
    fn the_kept_set_is_setuid_setgid_chown() {
        // CAP_CHOWN = 0, CAP_SETGID = 6, CAP_SETUID = 7.
        assert_eq!(kept_mask(), 0xc1);
        assert_eq!(
            CapNames(kept_mask()).to_string(),
            "CAP_CHOWN, CAP_SETGID, CAP_SETUID"
        );
    }

    #[test]
    fn exactly_the_documented_set_passes() {
        assert_eq!(check(&exact(), true, false), Ok(None));
    }

    #[test]
    fn an_extra_capability_is_refused_by_name() {
        let mut sets = exact();
        sets.effective |= KILL;
        sets.permitted |= KILL;
        assert_eq!(
            check(&sets, true, false),
            Err(PrivilegeError::ExtraCapabilities {
                set: "effective",
                caps: CapNames(KILL)
            })
        );
        let message = check(&sets, true, false).unwrap_err().to_string();
        assert!(message.contains("CAP_KILL") && message.contains("--allow-extra-caps"));
    }

    #[test]
    fn an_extra_bounding_capability_is_refused_for_root() {
        let mut sets = exact();
        sets.bounding |= DAC_OVERRIDE;
        assert!(matches!(
            check(&sets, true, false),
            Err(PrivilegeError::ExtraCapabilities {
                set: "bounding",
                ..
            })
        ));
    }

    #[test]
    fn inheritable_or_ambient_capabilities_are_extra_even_if_kept() {
        let mut sets = exact();
        sets.ambient = Capability::CAP_SETUID.bitmask();
        assert!(matches!(
            check(&sets, true, false),
            Err(PrivilegeError::ExtraCapabilities { set: "ambient", .. })
        ));
    }

    #[test]
    fn allow_extra_accepts_and_reports_them() {
        let mut sets = exact();
        sets.effective |= KILL;
        assert_eq!(
            check(&sets, true, true),
            Ok(Some(("effective", CapNames(KILL))))
        );
    }

    #[test]
    fn a_missing_capability_is_refused_as_root_even_with_allow_extra() {
        let mut sets = exact();
        sets.effective &= !Capability::CAP_CHOWN.bitmask();
        assert_eq!(
            check(&sets, true, true),
            Err(PrivilegeError::MissingCapabilities {
                caps: CapNames(Capability::CAP_CHOWN.bitmask())
            })
        );
    }

    #[test]
    fn an_unprivileged_daemon_with_no_capabilities_passes() {
        let sets = CapSets {
            bounding: u64::MAX >> 23,
            ..CapSets::default()
        };
        assert_eq!(check(&sets, false, false), Ok(None));
    }

    #[test]
    fn proc_status_lines_are_parsed() {
        let status = "Name:\tvtpmd\nCapInh:\t0000000000000000\nCapPrm:\t00000000000000c1\nCapEff:\t00000000000000c1\nCapBnd:\t00000000000000c1\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert_eq!(CapSets::from_proc_status(status), Some(exact()));
        assert_eq!(CapSets::from_proc_status("CapEff:\t0\n"), None);
    }
}
