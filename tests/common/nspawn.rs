//! A systemd booted in a container, for the tests that need a real one
//! (the shipped unit, the Debian package): systemd-nspawn on a skeleton
//! root with a copy of this machine's /etc, and a oneshot probe unit that
//! writes `key=value` lines to /out/result and powers the container off.
//!
//! nspawn itself gets CAP_IPC_LOCK and an unlimited RLIMIT_MEMLOCK only
//! because its own seccomp filter refuses mlock without that capability
//! and it would cap LimitMEMLOCK= at this host's 8 MiB, and memfd_secret
//! in its filter (which the unit allows too); the service's bounding set
//! still holds just CAP_SETUID CAP_SETGID CAP_CHOWN.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const NSPAWN: &str = "/usr/bin/systemd-nspawn";

/// The directories every root gets; a caller may add its own.
const ROOT_DIRS: [&str; 9] = [
    "dev", "proc", "sys", "run", "tmp", "var/tmp", "usr/lib", "etc", "root",
];

/// A container's work directory (`root/`, `out/` and whatever the caller
/// puts beside them), removed on drop.
pub struct Container {
    work: tempfile::TempDir,
    tag: String,
}

/// What the probe wrote: /out's files, read when the container stopped.
pub struct Probed {
    result: String,
    files: std::collections::BTreeMap<String, String>,
}

impl Container {
    /// A root with this machine's /etc (its hostname `tag`) and the
    /// `extra_dirs`; `None` (with the reason printed) when not root.
    pub fn new(tag: &str, extra_dirs: &[&str]) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: systemd-nspawn needs root");
            return None;
        }
        assert!(
            Path::new(NSPAWN).exists(),
            "systemd-container is not installed"
        );
        let work = tempfile::Builder::new()
            .prefix(tag)
            .tempdir_in("/var/tmp")
            .unwrap();
        let c = Self {
            work,
            tag: tag.to_owned(),
        };
        let root = c.root();
        for dir in ROOT_DIRS.iter().chain(extra_dirs) {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for link in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            if let Ok(target) = std::fs::read_link(Path::new("/").join(link)) {
                std::os::unix::fs::symlink(target, root.join(link)).unwrap();
            }
        }
        super::run_ok(Command::new("cp").args([
            "-a",
            "/etc/.",
            root.join("etc").to_str().unwrap(),
        ]));
        // nspawn looks for it before it binds or overlays /usr.
        std::fs::copy("/usr/lib/os-release", root.join("usr/lib/os-release")).unwrap();
        std::fs::write(root.join("etc/hostname"), format!("{tag}\n")).unwrap();
        std::fs::write(root.join("etc/machine-id"), "").unwrap();
        std::fs::create_dir(c.path("out")).unwrap();
        Some(c)
    }

    /// `p` in the work directory.
    pub fn path(&self, p: &str) -> PathBuf {
        self.work.path().join(p)
    }

    /// The container's root directory.
    pub fn root(&self) -> PathBuf {
        self.path("root")
    }

    /// Boots with `probe` as the oneshot `vtpmd-probe.service` (its
    /// `[Unit]` lines `unit`) and the caller's nspawn arguments, for at
    /// most `timeout_s`; prints what nspawn and the probe said.
    pub fn boot(&self, probe: &str, unit: &str, args: &[OsString], timeout_s: u32) -> Probed {
        std::fs::write(self.path("probe.sh"), probe).unwrap();
        std::fs::set_permissions(
            self.path("probe.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(
            self.path("vtpmd-probe.service"),
            format!("[Unit]\n{unit}\n[Service]\nType=oneshot\nExecStart=/probe.sh\n"),
        )
        .unwrap();
        let cgroup = super::cgroup::OwnCgroup::new(&self.tag);
        let mut cmd = cgroup.command("timeout");
        cmd.arg(timeout_s.to_string())
            .arg(NSPAWN)
            .args(["--register=no", "--keep-unit", "--quiet", "-D"])
            .arg(self.root())
            .args([
                "--capability=CAP_IPC_LOCK",
                "--rlimit=RLIMIT_MEMLOCK=infinity",
                "--system-call-filter=memfd_secret",
            ])
            .args(args)
            .arg(bind_ro(
                &self.path("vtpmd-probe.service"),
                "/etc/systemd/system/vtpmd-probe.service",
            ))
            .arg(bind_ro(&self.path("probe.sh"), "/probe.sh"))
            .arg(format!("--bind={}:/out", self.path("out").display()))
            .args(["-b", "--", "systemd.wants=vtpmd-probe.service"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let started = Instant::now();
        let out = cmd.output().unwrap();
        eprintln!(
            "nspawn: {} in {:?}\n{}",
            out.status,
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
        let files: std::collections::BTreeMap<String, String> = std::fs::read_dir(self.path("out"))
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let text = std::fs::read_to_string(e.path()).ok()?;
                Some((e.file_name().to_string_lossy().into_owned(), text))
            })
            .collect();
        let probed = Probed {
            result: files.get("result").cloned().unwrap_or_default(),
            files,
        };
        eprintln!(
            "--- probe.log\n{}\n--- result\n{}",
            probed.file("probe.log"),
            probed.result
        );
        probed
    }
}

impl Probed {
    /// The value the probe wrote as `key=value`.
    pub fn get(&self, key: &str) -> String {
        self.result
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in the result:\n{}", self.result))
            .to_owned()
    }

    /// A file the probe left in /out ("" when it wrote none).
    pub fn file(&self, name: &str) -> String {
        self.files.get(name).cloned().unwrap_or_default()
    }
}

/// nspawn's read-only bind of `src` at `dst`.
pub fn bind_ro(src: &Path, dst: &str) -> OsString {
    format!("--bind-ro={}:{dst}", src.display()).into()
}
