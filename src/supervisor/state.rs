//! The per-guest state machine: which action is allowed in which state.
//!
//! `stopped → starting → running → stopping → stopped`, and `failed` when
//! swtpm dies on its own or a final reseal fails; `migrated-out` when a
//! run handed out with MigrateOut ended (the guest runs on another host
//! now: this one may only Delete it, or take it back with MigrateIn). `starting` and
//! `stopping` exist only while an operation holds the guest's lock, so
//! another operation, which must take that lock first, normally meets
//! `stopped`, `running` or `failed`; the table still says what happens in
//! every state, with no wildcard.

use std::fmt;

/// A guest's lifecycle state, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
    MigratedOut,
}

impl GuestState {
    pub const ALL: [GuestState; 6] = [
        GuestState::Stopped,
        GuestState::Starting,
        GuestState::Running,
        GuestState::Stopping,
        GuestState::Failed,
        GuestState::MigratedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GuestState::Stopped => "stopped",
            GuestState::Starting => "starting",
            GuestState::Running => "running",
            GuestState::Stopping => "stopping",
            GuestState::Failed => "failed",
            GuestState::MigratedOut => "migrated-out",
        }
    }
}

impl fmt::Display for GuestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation on an existing guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Start,
    Stop,
    Delete,
    Rekey,
    /// Hand out the sealed file (mobility).
    Export,
    /// Replace the sealed file of an existing guest with a newer one from
    /// another host (an Import of an unknown guest registers it instead,
    /// like Create).
    Import,
}

impl Action {
    pub const ALL: [Action; 7] = [
        Action::Create,
        Action::Start,
        Action::Stop,
        Action::Delete,
        Action::Rekey,
        Action::Export,
        Action::Import,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Delete => "delete",
            Action::Rekey => "rekey",
            Action::Export => "export",
            Action::Import => "import",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an allowed action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Unseal and spawn (from stopped, or to recover from failed).
    Start,
    /// Stop swtpm, final reseal, wipe.
    Stop,
    /// Remove both generations.
    Delete,
    /// Rewrap the keyslot in the files (guest not running).
    RekeyAtRest,
    /// Rewrap through the state held by the running guest, so its next
    /// reseal keeps the new keyslot.
    RekeyRunning,
    /// The sealed file as it is on disk.
    ExportAtRest,
    /// A reseal of the running state first, so the file holds every write
    /// swtpm acknowledged.
    ExportRunning,
    /// Write the newer file over the guest's (not running).
    ImportOver,
}

/// Why an action is refused in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    GuestExists,
    GuestRunning,
    GuestNotRunning,
    NotAllowed,
    /// The guest's TPM now lives on another host.
    MigratedOut,
}

/// [`decide`] for guest `guest`, refusals as the supervisor's errors.
pub(super) fn permit(
    guest: crate::protocol::GuestId,
    state: GuestState,
    action: Action,
) -> Result<Allowed, super::SupervisorError> {
    decide(state, action).map_err(|why| super::SupervisorError::refused(guest, state, action, why))
}

/// The whole table.
pub fn decide(state: GuestState, action: Action) -> Result<Allowed, Refused> {
    use Action as A;
    use GuestState as S;
    match (state, action) {
        (
            S::Stopped | S::Starting | S::Running | S::Stopping | S::Failed | S::MigratedOut,
            A::Create,
        ) => Err(Refused::GuestExists),
        (S::MigratedOut, A::Start | A::Rekey) => Err(Refused::MigratedOut),
        (S::MigratedOut, A::Stop) => Err(Refused::GuestNotRunning),
        (S::MigratedOut, A::Delete) => Ok(Allowed::Delete),
        // Its file here is older than the other host's: not worth moving.
        (S::MigratedOut, A::Export) => Err(Refused::MigratedOut),
        // The guest coming back by a cold move, with a newer generation.
        (S::MigratedOut, A::Import) => Ok(Allowed::ImportOver),
        (S::Stopped | S::Failed, A::Start) => Ok(Allowed::Start),
        (S::Running, A::Start) => Err(Refused::GuestRunning),
        (S::Starting | S::Stopping, A::Start) => Err(Refused::NotAllowed),
        (S::Running, A::Stop) => Ok(Allowed::Stop),
        (S::Stopped | S::Failed, A::Stop) => Err(Refused::GuestNotRunning),
        (S::Starting | S::Stopping, A::Stop) => Err(Refused::NotAllowed),
        (S::Stopped | S::Failed, A::Delete) => Ok(Allowed::Delete),
        (S::Running, A::Delete) => Err(Refused::GuestRunning),
        (S::Starting | S::Stopping, A::Delete) => Err(Refused::NotAllowed),
        (S::Stopped | S::Failed, A::Rekey) => Ok(Allowed::RekeyAtRest),
        (S::Running, A::Rekey) => Ok(Allowed::RekeyRunning),
        (S::Starting | S::Stopping, A::Rekey) => Err(Refused::NotAllowed),
        (S::Stopped | S::Failed, A::Export) => Ok(Allowed::ExportAtRest),
        (S::Running, A::Export) => Ok(Allowed::ExportRunning),
        (S::Starting | S::Stopping, A::Export) => Err(Refused::NotAllowed),
        (S::Stopped | S::Failed, A::Import) => Ok(Allowed::ImportOver),
        // The running swtpm's next reseal would overwrite the import, or
        // the import the writes it made: one writer per guest.
        (S::Running, A::Import) => Err(Refused::GuestRunning),
        (S::Starting | S::Stopping, A::Import) => Err(Refused::NotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use GuestState as S;

    /// Every (state, action) pair, written out once more by hand.
    const TABLE: [(GuestState, Action, Result<Allowed, Refused>); 42] = [
        (S::Stopped, A::Create, Err(Refused::GuestExists)),
        (S::Stopped, A::Start, Ok(Allowed::Start)),
        (S::Stopped, A::Stop, Err(Refused::GuestNotRunning)),
        (S::Stopped, A::Delete, Ok(Allowed::Delete)),
        (S::Stopped, A::Rekey, Ok(Allowed::RekeyAtRest)),
        (S::Stopped, A::Export, Ok(Allowed::ExportAtRest)),
        (S::Stopped, A::Import, Ok(Allowed::ImportOver)),
        (S::Starting, A::Create, Err(Refused::GuestExists)),
        (S::Starting, A::Start, Err(Refused::NotAllowed)),
        (S::Starting, A::Stop, Err(Refused::NotAllowed)),
        (S::Starting, A::Delete, Err(Refused::NotAllowed)),
        (S::Starting, A::Rekey, Err(Refused::NotAllowed)),
        (S::Starting, A::Export, Err(Refused::NotAllowed)),
        (S::Starting, A::Import, Err(Refused::NotAllowed)),
        (S::Running, A::Create, Err(Refused::GuestExists)),
        (S::Running, A::Start, Err(Refused::GuestRunning)),
        (S::Running, A::Stop, Ok(Allowed::Stop)),
        (S::Running, A::Delete, Err(Refused::GuestRunning)),
        (S::Running, A::Rekey, Ok(Allowed::RekeyRunning)),
        (S::Running, A::Export, Ok(Allowed::ExportRunning)),
        (S::Running, A::Import, Err(Refused::GuestRunning)),
        (S::Stopping, A::Create, Err(Refused::GuestExists)),
        (S::Stopping, A::Start, Err(Refused::NotAllowed)),
        (S::Stopping, A::Stop, Err(Refused::NotAllowed)),
        (S::Stopping, A::Delete, Err(Refused::NotAllowed)),
        (S::Stopping, A::Rekey, Err(Refused::NotAllowed)),
        (S::Stopping, A::Export, Err(Refused::NotAllowed)),
        (S::Stopping, A::Import, Err(Refused::NotAllowed)),
        (S::Failed, A::Create, Err(Refused::GuestExists)),
        (S::Failed, A::Start, Ok(Allowed::Start)),
        (S::Failed, A::Stop, Err(Refused::GuestNotRunning)),
        (S::Failed, A::Delete, Ok(Allowed::Delete)),
        (S::Failed, A::Rekey, Ok(Allowed::RekeyAtRest)),
        (S::Failed, A::Export, Ok(Allowed::ExportAtRest)),
        (S::Failed, A::Import, Ok(Allowed::ImportOver)),
        (S::MigratedOut, A::Create, Err(Refused::GuestExists)),
        (S::MigratedOut, A::Start, Err(Refused::MigratedOut)),
        (S::MigratedOut, A::Stop, Err(Refused::GuestNotRunning)),
        (S::MigratedOut, A::Delete, Ok(Allowed::Delete)),
        (S::MigratedOut, A::Rekey, Err(Refused::MigratedOut)),
        (S::MigratedOut, A::Export, Err(Refused::MigratedOut)),
        (S::MigratedOut, A::Import, Ok(Allowed::ImportOver)),
    ];

    #[test]
    fn every_state_action_pair_has_the_documented_outcome() {
        for (state, action, expected) in TABLE {
            assert_eq!(decide(state, action), expected, "({state}, {action})");
        }
    }

    #[test]
    fn the_table_covers_every_pair() {
        for state in GuestState::ALL {
            for action in Action::ALL {
                assert!(
                    TABLE.iter().any(|(s, a, _)| *s == state && *a == action),
                    "({state}, {action}) untested"
                );
            }
        }
    }

    #[test]
    fn state_names_are_the_api_names() {
        let names: Vec<&str> = GuestState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "stopped",
                "starting",
                "running",
                "stopping",
                "failed",
                "migrated-out"
            ]
        );
    }
}
