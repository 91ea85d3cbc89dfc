//! Where vtpmd lives when nothing says otherwise: the one rule the daemon
//! and `vtpmctl` share, so both meet without configuration.
//!
//! As root (a host service): `/var/lib/vtpmd` for sealed state and
//! `/run/vtpmd` (RAM) for runtime files. As any other user (trying it out,
//! no root needed): `$XDG_STATE_HOME/vtpmd` (else `~/.local/state/vtpmd`)
//! and `$XDG_RUNTIME_DIR/vtpmd` (else `/tmp/vtpmd-<uid>`). The API socket
//! is `vtpmd.sock` in the runtime directory.
//!
//! `/tmp/vtpmd-<uid>` can be created by any user first, so vtpmctl does
//! not take the socket it finds there on trust: it checks who owns the
//! directory and the socket and who listens before it sends a passphrase
//! (`src/bin/vtpmctl/trust.rs`).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// The environment the defaults depend on, so tests can pin it.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub euid: u32,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

impl Env {
    /// This process's.
    pub fn current() -> Self {
        let var = |name| std::env::var_os(name).map(PathBuf::from);
        Self {
            euid: nix::unistd::geteuid().as_raw(),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
            xdg_state_home: var("XDG_STATE_HOME"),
            home: var("HOME"),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        if self.euid == 0 {
            return PathBuf::from("/var/lib/vtpmd");
        }
        match (absolute(&self.xdg_state_home), absolute(&self.home)) {
            (Some(state), _) => state.join("vtpmd"),
            (None, Some(home)) => home.join(".local/state/vtpmd"),
            (None, None) => PathBuf::from(format!("/tmp/vtpmd-state-{}", self.euid)),
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        if self.euid == 0 {
            return PathBuf::from("/run/vtpmd");
        }
        match absolute(&self.xdg_runtime_dir) {
            Some(dir) => dir.join("vtpmd"),
            None => PathBuf::from(format!("/tmp/vtpmd-{}", self.euid)),
        }
    }

    pub fn socket(&self) -> PathBuf {
        socket_in(&self.runtime_dir())
    }
}

/// The API socket inside a runtime directory.
pub fn socket_in(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("vtpmd.sock")
}

fn absolute(path: &Option<PathBuf>) -> Option<&Path> {
    path.as_deref().filter(|p| p.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_gets_the_host_service_paths() {
        let env = Env {
            euid: 0,
            xdg_runtime_dir: Some("/run/user/0".into()),
            ..Env::default()
        };
        assert_eq!(env.state_dir(), Path::new("/var/lib/vtpmd"));
        assert_eq!(env.socket(), Path::new("/run/vtpmd/vtpmd.sock"));
    }

    #[test]
    fn a_user_gets_xdg_paths_and_fallbacks() {
        let env = Env {
            euid: 1000,
            xdg_runtime_dir: Some("/run/user/1000".into()),
            xdg_state_home: None,
            home: Some("/home/ann".into()),
        };
        assert_eq!(env.state_dir(), Path::new("/home/ann/.local/state/vtpmd"));
        assert_eq!(env.socket(), Path::new("/run/user/1000/vtpmd/vtpmd.sock"));
        let bare = Env {
            euid: 1000,
            xdg_runtime_dir: Some("relative".into()),
            ..Env::default()
        };
        assert_eq!(bare.runtime_dir(), Path::new("/tmp/vtpmd-1000"));
        assert_eq!(bare.state_dir(), Path::new("/tmp/vtpmd-state-1000"));
    }
}
