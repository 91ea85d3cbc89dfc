//! The Linux test guest: a Debian kernel and an initramfs (busybox,
//! tpm2-tools, `tests/guest/init`) that `tests/guest/build-image` builds
//! once and caches under the target directory. The guest's `/init` reports
//! on the serial console with `VTPMD-GUEST: key=value` lines.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (or finds in the cache) the guest kernel and initramfs, once per
/// test binary; the script itself locks the cache against other processes.
pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-image");
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(&script)
            .arg(&cache)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "{}({:?})",
            String::from_utf8_lossy(&out.stdout),
            started.elapsed()
        );
        Image {
            kernel: cache.join("vmlinuz"),
            initrd: cache.join("initramfs.cpio.gz"),
        }
    })
}
