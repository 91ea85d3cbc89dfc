//! A cgroup of its own for each booted container.
//!
//! `systemd-nspawn --register=no --keep-unit` boots the container in the
//! cgroup of the process that runs it. Where no systemd manages the host
//! (a CI machine, this test harness), every test process sits in the same
//! cgroup, so containers booted side by side (cargo runs a file's tests in
//! parallel) would share one tree: each container's systemd creates,
//! empties and removes `system.slice/vtpmd.service` and its guests' mount
//! units in the same directories as the others'. That was seen as one
//! container's unmount helper failing with 219/CGROUP, its cgroup removed
//! under it by another container. Each container gets a fresh child of
//! this process's cgroup instead, in every hierarchy systemd uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The fresh cgroups (one per hierarchy systemd uses), removed on drop.
pub struct OwnCgroup {
    dirs: Vec<PathBuf>,
}

impl OwnCgroup {
    /// Fresh cgroups below this process's in the named `systemd` v1
    /// hierarchy and the unified one, where each is mounted.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let unified_root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/unified")
        };
        let mut dirs = Vec::new();
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let root = match controllers {
                "name=systemd" => PathBuf::from("/sys/fs/cgroup/systemd"),
                "" => unified_root.clone(),
                _ => continue,
            };
            let dir = root.join(path.trim_start_matches('/')).join(&name);
            if root.exists() && std::fs::create_dir(&dir).is_ok() {
                dirs.push(dir);
            }
        }
        Self { dirs }
    }

    /// `program args…`, moved into these cgroups before it executes.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"for p in $OWN_CGROUPS; do echo $$ >"$p/cgroup.procs" || exit 125; done; exec "$@""#)
            .arg("sh")
            .arg(program)
            .env(
                "OWN_CGROUPS",
                self.dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        cmd
    }
}

impl Drop for OwnCgroup {
    /// Every directory below, deepest first (what the container's systemd
    /// left; a cgroup directory goes only once it is empty).
    fn drop(&mut self) {
        for dir in &self.dirs {
            let mut all = Vec::new();
            collect_dirs(dir, &mut all);
            all.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in all {
                let _ = std::fs::remove_dir(&d);
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}
