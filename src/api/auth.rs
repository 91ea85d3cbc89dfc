//! Who may call what, from the peer's kernel-verified credentials
//! (SO_PEERCRED), never from anything the client says.

use std::path::Path;

use nix::unistd::{Gid, Uid};

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every method: root, or a member of the admin group.
    Admin,
    /// GetCapabilities, GetHostKey, GetMetrics, Status, List, Monitor: a member of the read-only group.
    ReadOnly,
    /// Nothing but the introspection of `org.varlink.service`.
    Denied,
}

/// The groups that grant access; `None` grants nothing beyond root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Groups {
    pub admin: Option<Gid>,
    pub read_only: Option<Gid>,
}

/// The peer as the kernel reported it when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: Uid,
    pub gid: Gid,
    pub pid: Option<i32>,
}

impl Groups {
    /// Root is trusted (threat model), and so is vtpmd's own user (who
    /// owns its state anyway: a daemon run by hand serves its user);
    /// otherwise the peer's primary group or, read from `/proc/<pid>/status`
    /// and only believed while that process still has the peer's uid, a
    /// supplementary group.
    pub fn access(&self, peer: &Peer) -> Access {
        self.access_with(peer, Path::new("/proc"), nix::unistd::geteuid())
    }

    fn access_with(&self, peer: &Peer, proc_root: &Path, own_uid: Uid) -> Access {
        if peer.uid.is_root() || peer.uid == own_uid {
            return Access::Admin;
        }
        let groups = supplementary_groups(peer, proc_root);
        let member =
            |group: Option<Gid>| group.is_some_and(|g| peer.gid == g || groups.contains(&g));
        if member(self.admin) {
            Access::Admin
        } else if member(self.read_only) {
            Access::ReadOnly
        } else {
            Access::Denied
        }
    }
}

fn supplementary_groups(peer: &Peer, proc_root: &Path) -> Vec<Gid> {
    let Some(pid) = peer.pid else {
        return Vec::new();
    };
    let Ok(status) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")) else {
        return Vec::new();
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|n| n.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // Uid: real, effective, saved, fs. A recycled pid of another user
    // does not lend its groups.
    if field("Uid:").get(1) != Some(&peer.uid.as_raw()) {
        return Vec::new();
    }
    field("Groups:").into_iter().map(Gid::from_raw).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(pid: i32, uid: u32, groups: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(pid.to_string());
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("status"),
            format!("Name:\tqemu\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGroups:\t{groups}\n"),
        )
        .unwrap();
        root
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            pid: Some(4242),
        }
    }

    const DAEMON: Uid = Uid::from_raw(0);

    const GROUPS: Groups = Groups {
        admin: Some(Gid::from_raw(990)),
        read_only: Some(Gid::from_raw(991)),
    };

    #[test]
    fn root_is_admin_and_strangers_are_denied() {
        let proc = fake_proc(4242, 1000, "100");
        assert_eq!(
            GROUPS.access_with(&peer(0, 0), proc.path(), DAEMON),
            Access::Admin
        );
        assert_eq!(
            GROUPS.access_with(&peer(1000, 100), proc.path(), DAEMON),
            Access::Denied
        );
        assert_eq!(
            Groups::default().access_with(&peer(1000, 990), proc.path(), DAEMON),
            Access::Denied
        );
    }

    #[test]
    fn the_daemons_own_user_is_admin() {
        let proc = fake_proc(4242, 1000, "100");
        let own = Uid::from_raw(1000);
        assert_eq!(
            Groups::default().access_with(&peer(1000, 100), proc.path(), own),
            Access::Admin
        );
        assert_eq!(
            Groups::default().access_with(&peer(1001, 100), proc.path(), own),
            Access::Denied
        );
    }

    #[test]
    fn primary_or_supplementary_groups_grant_access() {
        let proc = fake_proc(4242, 1000, "100 991");
        assert_eq!(
            GROUPS.access_with(&peer(1000, 990), proc.path(), DAEMON),
            Access::Admin
        );
        assert_eq!(
            GROUPS.access_with(&peer(1000, 100), proc.path(), DAEMON),
            Access::ReadOnly
        );
    }

    #[test]
    fn a_recycled_pid_of_another_user_lends_no_groups() {
        let proc = fake_proc(4242, 2000, "990");
        assert_eq!(
            GROUPS.access_with(&peer(1000, 100), proc.path(), DAEMON),
            Access::Denied
        );
    }
}
