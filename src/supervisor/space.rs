//! Each guest's runtime directory on a tmpfs of its own, of a bounded size,
//! so that a guest whose swtpm (or anything running as its uid) fills its
//! directory hurts only itself: every other guest's swtpm keeps storing
//! its NVRAM. With one shared file system (`/run`), one full guest would
//! put every other swtpm into failure mode.
//!
//! The tmpfs is a transient mount unit of systemd's (vtpmd itself keeps no
//! `CAP_SYS_ADMIN`, and its mount namespace is private). It is mounted
//! right after the directory is made and before the state is unpacked,
//! and stays through restarts of vtpmd (as the swtpm does); it is
//! unmounted once the directory is wiped. Without systemd, or with
//! `runtime_space_mib = 0`, every guest shares the runtime directory's
//! file system, and vtpmd says so at start.

use std::path::Path;

use nix::unistd::Gid;

use crate::error_chain::chain;
use crate::protocol::GuestId;
use crate::store;
use crate::systemd::mount::TmpfsSpec;

use super::{Shared, SupervisorError, blocking};

/// How runtime directories get their space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RuntimeSpace {
    /// One file system for all (the reason was logged at start).
    Shared,
    /// A tmpfs of this many bytes per guest, mounted by systemd.
    Bounded { bytes: u64 },
}

impl RuntimeSpace {
    /// The choice for this host, logged: `bytes` is the configured size
    /// (`None`: unbounded by configuration), `systemd` whether systemd
    /// manages this host and answered.
    pub(super) fn choose(bytes: Option<u64>, systemd: bool, runtime_dir: &Path) -> Self {
        match (bytes, systemd) {
            (Some(bytes), true) => {
                tracing::info!(
                    bytes,
                    "each guest's runtime directory is a tmpfs of its own (a systemd mount unit)"
                );
                RuntimeSpace::Bounded { bytes }
            }
            (None, _) => {
                tracing::warn!(
                    runtime_dir = %runtime_dir.display(),
                    "runtime_space_mib = 0: every guest's runtime directory shares one file system, so one guest that fills it stops every other swtpm from storing its state"
                );
                RuntimeSpace::Shared
            }
            (Some(_), false) => {
                tracing::warn!(
                    runtime_dir = %runtime_dir.display(),
                    "no systemd to mount a tmpfs per guest: every guest's runtime directory shares one file system, so one guest that fills it stops every other swtpm from storing its state"
                );
                RuntimeSpace::Shared
            }
        }
    }
}

/// Gives the fresh, empty runtime directory `dir` of guest `id` its own
/// tmpfs, owned by vtpmd and `gid` (0770), unless one is mounted there
/// already (left by an earlier run, emptied).
pub(super) async fn bound(
    shared: &Shared,
    id: GuestId,
    dir: &Path,
    gid: Option<Gid>,
) -> Result<(), SupervisorError> {
    let RuntimeSpace::Bounded { bytes } = shared.space else {
        return Ok(());
    };
    let Some(systemd) = shared.scopes.systemd() else {
        return Ok(());
    };
    let dir2 = dir.to_owned();
    if blocking(id, "check the runtime directory", move || {
        store::is_mount_point(&dir2)
    })
    .await?
    {
        return Ok(());
    }
    let failed = |what: String| SupervisorError::RuntimeSpace { guest: id, what };
    let (mode, group) = match gid {
        Some(gid) => (store::GUEST_RUNTIME_DIR_MODE, gid),
        None => (0o700, nix::unistd::getegid()),
    };
    let spec = TmpfsSpec::new(
        dir,
        bytes,
        mode,
        nix::unistd::geteuid().as_raw(),
        group.as_raw(),
        format!("vtpmd: runtime directory of guest {id}"),
    )
    .map_err(|e| failed(chain(&e)))?;
    systemd
        .mount_tmpfs(&spec)
        .await
        .map_err(|e| failed(chain(&e)))?;
    let dir2 = dir.to_owned();
    // The mount reaches vtpmd's namespace by propagation; a host that
    // does not propagate (a slave that was made private) must not make
    // vtpmd believe its guests are bounded.
    if !blocking(id, "check the runtime directory", move || {
        store::is_mount_point(&dir2)
    })
    .await?
    {
        let _ = systemd.unmount(dir).await;
        return Err(failed(format!(
            "systemd mounted {} ({}) but the mount did not reach vtpmd's mount namespace",
            dir.display(),
            spec.unit()
        )));
    }
    tracing::debug!(guest = %id, unit = spec.unit(), bytes, "runtime directory mounted");
    Ok(())
}

/// Takes away guest `id`'s tmpfs once its runtime directory has been
/// wiped (an emptied mount point), and the directory with it. A directory
/// that still holds anything (unsealed writes) is left as it is. Failures
/// are logged: nothing is lost by a mount that stays.
pub(super) async fn release(shared: &Shared, id: GuestId) {
    let dir = shared.store.runtime_state_dir(id);
    let Some(systemd) = shared.scopes.systemd() else {
        return;
    };
    let dir2 = dir.clone();
    let idle = blocking(id, "check the runtime directory", move || {
        store::is_mount_point(&dir2) && is_empty(&dir2)
    })
    .await;
    if !matches!(idle, Ok(true)) {
        return;
    }
    if let Err(e) = systemd.unmount(&dir).await {
        tracing::warn!(guest = %id, dir = %dir.display(), "cannot unmount the runtime directory: {}", chain(&e));
        return;
    }
    let dir2 = dir.clone();
    let removed = blocking(id, "remove the runtime directory", move || {
        store::wipe_dir(&dir2)
    })
    .await;
    match removed {
        Ok(Ok(())) => tracing::debug!(guest = %id, "runtime directory unmounted"),
        Ok(Err(e)) => {
            tracing::warn!(guest = %id, "cannot remove the runtime directory: {}", chain(&e))
        }
        Err(e) => tracing::warn!(guest = %id, "cannot remove the runtime directory: {}", chain(&e)),
    }
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}
