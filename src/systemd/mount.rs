//! A size-limited tmpfs at a guest's runtime directory, as a transient
//! mount unit of systemd's (what `systemd-mount --tmpfs` does).
//!
//! Under its unit vtpmd has no `CAP_SYS_ADMIN` and lives in a mount
//! namespace of its own (`PrivateMounts=yes`), so it cannot mount anything
//! the host would see. systemd can: it mounts in the host's namespace, and
//! the mount propagates into vtpmd's (a slave of the host's), into the one
//! an earlier vtpmd's swtpm still runs in, and it outlives a restart of
//! the service, as the guest's swtpm does.

#![forbid(unsafe_code)]

use std::path::Path;

use zbus::zvariant::Value;

use super::scope::{ScopeError, Systemd};

/// The unit mounts are ordered before: at shutdown systemd stops vtpmd
/// (which reseals what each swtpm wrote last) before it unmounts a guest's
/// runtime directory.
const BEFORE: &str = "vtpmd.service";

/// One tmpfs to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpfsSpec {
    unit: String,
    where_: String,
    options: String,
    description: String,
}

impl TmpfsSpec {
    /// A tmpfs of `size_bytes` at `path` (which must exist), its root
    /// `mode` and owned by `uid`:`gid`; nosuid, nodev, noexec.
    pub fn new(
        path: &Path,
        size_bytes: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        description: String,
    ) -> Result<Self, ScopeError> {
        let unit = mount_unit_name(path)?;
        let where_ =
            path.to_str()
                .map(str::to_owned)
                .ok_or_else(|| ScopeError::InvalidUnitName {
                    name: path.display().to_string(),
                    why: "the path is not UTF-8",
                })?;
        Ok(Self {
            unit,
            where_,
            options: format!(
                "size={size_bytes},mode={mode:04o},uid={uid},gid={gid},nosuid,nodev,noexec"
            ),
            description,
        })
    }

    pub fn unit(&self) -> &str {
        &self.unit
    }

    fn properties(&self) -> Vec<(&'static str, Value<'_>)> {
        vec![
            ("Description", Value::from(self.description.as_str())),
            ("Where", Value::from(self.where_.as_str())),
            ("What", Value::from("tmpfs")),
            ("Type", Value::from("tmpfs")),
            ("Options", Value::from(self.options.as_str())),
            // A mount that failed would otherwise stay loaded, and its
            // name could not be used again.
            ("CollectMode", Value::from("inactive-or-failed")),
            // Released only once its directory is wiped: a reader still
            // closing a file there (a last reseal, the watch) must not
            // make the unmount fail and leave the mount behind; it is
            // detached at once and freed when the last file closes.
            ("LazyUnmount", Value::from(true)),
            ("Before", Value::from(vec![BEFORE])),
        ]
    }
}

impl Systemd {
    /// Mounts `spec` and returns once systemd's job is done (the file
    /// system is then visible in vtpmd's namespace too).
    pub async fn mount_tmpfs(&self, spec: &TmpfsSpec) -> Result<(), ScopeError> {
        let subject = format!("a tmpfs at {}", spec.where_);
        self.start_transient(&spec.unit, spec.properties(), &subject)
            .await
    }

    /// Unmounts what a [`TmpfsSpec`] mounted at `path`; nothing mounted
    /// there is fine.
    pub async fn unmount(&self, path: &Path) -> Result<(), ScopeError> {
        let unit = mount_unit_name(path)?;
        self.stop_unit(&unit, &format!("the mount at {}", path.display()))
            .await
    }
}

/// The mount unit for `path`, escaped as `systemd-escape --path --suffix
/// mount` does: `/` between components becomes `-`; every byte other than
/// ASCII letters, digits, `:`, `_` and `.` (and a `.` that would begin
/// the name) becomes
/// `\xNN`. Only absolute, normal paths (no `.`, `..` or empty component)
/// are accepted: systemd refuses the others.
pub fn mount_unit_name(path: &Path) -> Result<String, ScopeError> {
    let invalid = |why| ScopeError::InvalidUnitName {
        name: path.display().to_string(),
        why,
    };
    let text = path
        .to_str()
        .ok_or_else(|| invalid("the path is not UTF-8"))?;
    if !text.starts_with('/') {
        return Err(invalid("a mount point must be an absolute path"));
    }
    let components: Vec<&str> = text[1..].split('/').collect();
    if text == "/" {
        return Err(invalid("the root cannot be mounted over"));
    }
    if components
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(invalid("a mount point must be a normalized path"));
    }
    let mut name = String::new();
    for (i, component) in components.iter().enumerate() {
        if i > 0 {
            name.push('-');
        }
        for (j, b) in component.bytes().enumerate() {
            let keep = b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.');
            if keep && !(j == 0 && i == 0 && b == b'.') {
                name.push(char::from(b));
            } else {
                name.push_str(&format!("\\x{b:02x}"));
            }
        }
    }
    name.push_str(".mount");
    if name.len() > 255 {
        return Err(invalid("its unit name would be longer than 255 bytes"));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_runtime_directory_names_its_mount_unit_as_systemd_escape_does() {
        // `systemd-escape --path --suffix=mount /run/vtpmd/5d0c…`
        assert_eq!(
            mount_unit_name(Path::new("/run/vtpmd/5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f")).unwrap(),
            r"run-vtpmd-5d0c3f9e\x2d1b2a\x2d4c6d\x2d8e7f\x2d9a0b1c2d3e4f.mount"
        );
        assert_eq!(
            mount_unit_name(Path::new("/tmp/.x y/a.b")).unwrap(),
            r"tmp-.x\x20y-a.b.mount"
        );
        assert_eq!(
            mount_unit_name(Path::new("/.a/b")).unwrap(),
            r"\x2ea-b.mount"
        );
    }

    #[test]
    fn paths_systemd_would_refuse_are_refused() {
        for path in [
            "",
            "run/vtpmd",
            "/",
            "/run/../x",
            "/run/./x",
            "/run//x",
            "/run/x/",
        ] {
            assert!(
                matches!(
                    mount_unit_name(Path::new(path)),
                    Err(ScopeError::InvalidUnitName { .. })
                ),
                "{path:?} was accepted"
            );
        }
    }

    #[test]
    fn the_options_bound_size_and_set_the_roots_owner() {
        let spec = TmpfsSpec::new(
            Path::new("/run/vtpmd/g"),
            8 << 20,
            0o770,
            0,
            1879048192,
            "d".to_owned(),
        )
        .unwrap();
        assert_eq!(
            spec.options,
            "size=8388608,mode=0770,uid=0,gid=1879048192,nosuid,nodev,noexec"
        );
        assert_eq!(spec.unit(), "run-vtpmd-g.mount");
    }
}
