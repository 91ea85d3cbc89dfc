//! Each guest's swtpm in its own transient systemd scope
//! (`vtpmd-guest-<uuid>.scope`), as libvirt does with its machines: out
//! of vtpmd.service's cgroup, a swtpm outlives a stop or restart of the
//! service (whose `KillMode=mixed` would otherwise SIGKILL it), and
//! systemd accounts each guest's memory and CPU on its own. Without
//! systemd nothing is moved: swtpm is already in its own session, and a
//! plain `kill` of vtpmd reaches it no more than a stop does.

#[derive(Debug, Default)]
pub(super) struct Scopes {}

impl Scopes {
    /// Moves `pid` (the guest's swtpm) into the guest's scope. A failure
    /// is logged: the guest runs on, but would not survive a stop of the
    /// service.
    pub(super) async fn place(&self, guest: crate::protocol::GuestId, pid: u32) {
        tracing::trace!(%guest, pid, "no service manager to place swtpm under");
    }
}
