//! Process-wide hardening that complements locked secret pages: a
//! non-dumpable process writes no core file and cannot be `ptrace`d or have
//! its `/proc/<pid>/mem` read by other processes of the same uid, and a zero
//! core limit keeps that true even if something later makes it dumpable
//! again (e.g. a `setuid` call resets the dumpable flag).

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};

/// Which hardening step failed.
#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("cannot make the process non-dumpable (PR_SET_DUMPABLE)")]
    Dumpable {
        /// What the kernel said.
        #[source]
        source: Errno,
    },
    /// `setrlimit(RLIMIT_CORE, 0, 0)` failed.
    #[error("cannot set RLIMIT_CORE to 0")]
    CoreLimit {
        /// What the kernel said.
        #[source]
        source: Errno,
    },
}

/// Makes the process non-dumpable and disables core files. Call it early in
/// `main`, before any secret exists.
pub fn harden_process() -> Result<(), HardenError> {
    prctl::set_dumpable(false).map_err(|source| HardenError::Dumpable { source })?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|source| HardenError::CoreLimit { source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::test_support::{in_child, run_in_child};
    use nix::sys::resource::getrlimit;

    #[test]
    fn hardened_process_is_not_dumpable_and_has_no_core_limit() {
        if !in_child() {
            run_in_child(
                module_path!(),
                "hardened_process_is_not_dumpable_and_has_no_core_limit",
            );
            return;
        }
        // Arrange
        assert!(prctl::get_dumpable().unwrap(), "precondition: dumpable");

        // Act
        harden_process().unwrap();

        // Assert
        assert!(!prctl::get_dumpable().unwrap());
        assert_eq!(getrlimit(Resource::RLIMIT_CORE).unwrap(), (0, 0));
    }
}
