//! Each guest's swtpm in its own transient systemd scope
//! (`vtpmd-guest-<uuid>.scope`), as libvirt does with its machines: out
//! of vtpmd.service's cgroup, a swtpm outlives a stop or restart of the
//! service (whose `KillMode=mixed` would otherwise kill it), and systemd
//! accounts each guest's memory and CPU on its own. Without systemd
//! nothing is moved: swtpm is already in its own session, and a plain
//! `kill` of vtpmd reaches it no more than a stop does.

use crate::error_chain::chain;
use crate::protocol::GuestId;
use crate::systemd::scope::{ScopeError, ScopeSpec, Systemd, UnitName};

/// How often a move into a scope whose name is still taken is tried, and
/// how long apart: 3 s in all.
const SCOPE_ATTEMPTS: u32 = 30;
const SCOPE_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, Default)]
pub(super) struct Scopes {
    /// `None` when systemd does not manage this host, or cannot be reached.
    systemd: Option<Systemd>,
}

impl Scopes {
    /// A connection to systemd when it manages this host.
    pub(super) async fn connect() -> Self {
        match Systemd::connect().await {
            Ok(Some(systemd)) => {
                tracing::info!(route = ?systemd.route(), "each guest's swtpm goes into its own systemd scope");
                Scopes {
                    systemd: Some(systemd),
                }
            }
            Ok(None) => Scopes::default(),
            Err(e) => {
                tracing::warn!(
                    "systemd runs but cannot be reached ({}): swtpm stays in vtpmd's cgroup and would not survive a stop of the service",
                    chain(&e)
                );
                Scopes::default()
            }
        }
    }

    /// The connection, when systemd manages this host.
    pub(super) fn systemd(&self) -> Option<&Systemd> {
        self.systemd.as_ref()
    }

    /// Moves `pid` (the guest's swtpm) into the guest's scope; with
    /// `adopted`, only if it is not there already. A failure is logged: the
    /// guest runs on, but would not survive a stop of the service.
    pub(super) async fn place(&self, guest: GuestId, pid: u32, adopted: bool) {
        let Some(systemd) = &self.systemd else {
            return;
        };
        let id = guest.to_string();
        let placed = async {
            let name = UnitName::guest_scope(&id)?;
            if adopted && systemd.scope_of_pid(pid).await?.as_deref() == Some(name.as_str()) {
                return Ok::<bool, ScopeError>(false);
            }
            let spec = ScopeSpec::for_guest(&id, pid)?;
            let mut attempt = 1;
            loop {
                match systemd.move_into_scope(&spec).await {
                    // The guest's previous scope, its swtpm just gone, is
                    // still there until systemd collects it: a VM rebooted
                    // at once hits it. It holds nothing alive (a Start
                    // runs only when no swtpm of the guest does), so it is
                    // stopped rather than waited out, which under load
                    // took longer than the retries allow.
                    Err(ScopeError::UnitExists { .. }) if attempt < SCOPE_ATTEMPTS => {
                        if attempt == 1 {
                            let stale = format!("the previous scope of guest {id}");
                            if let Err(e) = systemd.stop_unit(name.as_str(), &stale).await {
                                tracing::debug!(%guest, "stopping {stale}: {}", chain(&e));
                            }
                        }
                        attempt += 1;
                        tokio::time::sleep(SCOPE_RETRY).await;
                    }
                    result => return result.map(|()| true),
                }
            }
        };
        match placed.await {
            Ok(true) => tracing::debug!(%guest, pid, "swtpm moved into its scope"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                %guest, pid,
                "cannot move swtpm into its systemd scope: {}; it would not survive a stop of vtpmd.service",
                chain(&e)
            ),
        }
    }
}
