//! The supervisor's error: user-caused refusals first (each maps to one
//! API error), then internal failures, each named for the operation and
//! carrying its cause as a `#[source]`. No variant carries a secret.

use std::path::PathBuf;

use crate::protocol::{GuestId, TpmVersion};
use crate::store::StoreError;
use crate::swtpm::probe::ProbeError;
use crate::swtpm::provision::ProvisionError;
use crate::swtpm::spawn::SpawnError;
use crate::vault::VaultError;

use super::state::{Action, GuestState, Refused};

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("there is no guest {guest}")]
    NoSuchGuest { guest: GuestId },
    #[error("guest {guest} exists already")]
    GuestExists { guest: GuestId },
    #[error("guest {guest} is {state}")]
    GuestRunning { guest: GuestId, state: GuestState },
    #[error("guest {guest} is {state}, not running")]
    GuestNotRunning { guest: GuestId, state: GuestState },
    #[error("guest {guest} is busy with another operation")]
    Busy { guest: GuestId },
    #[error("wrong passphrase for guest {guest}")]
    WrongPassphrase { guest: GuestId },
    /// A key, or this host's key, that opens none of its kind's slots.
    #[error("the {kind} does not open any {kind} slot of guest {guest}")]
    WrongKey {
        guest: GuestId,
        kind: crate::vault::SlotKind,
    },
    /// No slot of the credential's kind: e.g. a Start without a secret on
    /// a host that holds no host slot of the guest.
    #[error("guest {guest} has no {kind} slot{}", for_host.as_ref().map(|f| format!(" for this host (fingerprint {f})")).unwrap_or_default())]
    NoKeyslot {
        guest: GuestId,
        kind: crate::vault::SlotKind,
        for_host: Option<String>,
    },
    #[error("keyslot {index} is the last one of guest {guest}; add another before removing it")]
    LastKeyslot { guest: GuestId, index: usize },
    #[error("guest {guest} has no keyslot {index}")]
    NoSuchKeyslot { guest: GuestId, index: usize },
    #[error("all {max} keyslots of guest {guest} are in use")]
    KeyslotsFull { guest: GuestId, max: usize },
    #[error("the sealed state of guest {guest} is unusable: {what}")]
    StateCorrupt { guest: GuestId, what: String },
    /// The file at the guest's sealed path names another guest (moved or
    /// copied there): an answer about a sound file, not damage.
    #[error("the sealed file of guest {guest} belongs to guest {found}")]
    GuestMismatch { guest: GuestId, found: GuestId },
    /// An imported file not newer than what this host holds: importing it
    /// would roll the guest's TPM back (NV indices, counters, lockout).
    #[error(
        "the imported sealed file of guest {guest} is generation {generation}, not newer than generation {current} on this host"
    )]
    StaleGeneration {
        guest: GuestId,
        generation: u64,
        current: u64,
    },
    /// The sealed file a Start found is older than a generation this vtpmd
    /// sealed or took in: an older copy was put in its place. Starting it
    /// would roll the TPM back (its NV indices, counters, lockout state).
    #[error(
        "the sealed file of guest {guest} is generation {generation}, older than generation {current} that this vtpmd sealed: an older copy was put in its place; starting it would roll the TPM back (put the newest copy back, or Import it)"
    )]
    RolledBack {
        guest: GuestId,
        generation: u64,
        current: u64,
    },
    /// The guest's runtime directory holds writes the sealed file lacks:
    /// exporting or replacing that file would lose them.
    #[error("guest {guest} has writes that are not sealed yet: {reason}")]
    UnsealedWrites { guest: GuestId, reason: String },
    #[error("swtpm of guest {guest} failed: {message}")]
    SwtpmFailed {
        guest: GuestId,
        message: String,
        /// swtpm's last log lines, oldest first.
        log_tail: Vec<String>,
    },
    #[error("this host's swtpm cannot serve TPM {version}")]
    UnsupportedTpm { version: TpmVersion },
    #[error(
        "EK certificates for guest {guest} cannot be created on this host; missing: {}",
        missing.join(", ")
    )]
    CertificatesUnavailable {
        guest: GuestId,
        missing: Vec<String>,
    },
    #[error("guest {guest} is {state}: {action} is not allowed now")]
    NotAllowed {
        guest: GuestId,
        state: GuestState,
        action: Action,
    },
    #[error(
        "the runtime directory {path} of guest {guest} is still used by a swtpm{}; stop that process first",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    RuntimeInUse {
        guest: GuestId,
        path: PathBuf,
        holder: Option<i32>,
    },
    #[error("no free swtpm uid for guest {guest}: every uid of {range} is taken")]
    NoFreeUid {
        guest: GuestId,
        range: super::UidRange,
    },
    #[error("vtpmd is shutting down")]
    ShuttingDown,
    /// Cluster mode: another host's live lease holds the guest.
    #[error(
        "guest {guest} is owned by host {owner:?} in the cluster, whose lease is alive: stop it there first, or evacuate it once that host is gone"
    )]
    OwnedElsewhere { guest: GuestId, owner: String },
    /// Cluster mode: etcd did not answer; running guests go on, but no
    /// guest's ownership can be taken or given up.
    #[error("guest {guest}: the cluster's etcd cannot be used now")]
    ClusterUnavailable {
        guest: GuestId,
        #[source]
        source: Box<crate::cluster::ClusterError>,
    },
    /// Cluster mode is off: Evacuate needs it.
    #[error("guest {guest}: {what} needs cluster mode ([cluster] endpoints)")]
    NotInClusterMode { guest: GuestId, what: &'static str },
    #[error("cannot join the cluster")]
    JoinCluster(#[source] crate::cluster::ClusterError),

    #[error("this host's key cannot be used; vtpmd does not start without it")]
    HostKey(#[source] crate::vault::HostKeyError),
    #[error("invalid supervisor configuration: {what}")]
    Config { what: String },
    #[error("swtpm cannot be used on this host")]
    ProbeSwtpm(#[source] ProbeError),
    #[error("cannot set up vtpmd's directories")]
    InitStore(#[source] StoreError),
    #[error("cannot read the guest registry from the state directory")]
    ScanStore(#[source] StoreError),
    #[error("cannot open the local CA")]
    OpenLocalCa(#[source] ProvisionError),
    #[error("cannot provision a TPM for guest {guest}")]
    Provision {
        guest: GuestId,
        #[source]
        source: ProvisionError,
    },
    #[error("cannot {op} the sealed state of guest {guest}")]
    Vault {
        guest: GuestId,
        op: &'static str,
        #[source]
        source: VaultError,
    },
    #[error("cannot {op} for guest {guest}")]
    Store {
        guest: GuestId,
        op: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("cannot spawn swtpm for guest {guest}")]
    Spawn {
        guest: GuestId,
        #[source]
        source: SpawnError,
    },
    #[error(
        "guest {guest} was migrated to another host: only Delete (or MigrateIn to take it back) applies here"
    )]
    MigratedOut { guest: GuestId },
    #[error("guest {guest}: {why}")]
    Migration { guest: GuestId, why: String },
    #[error("guest {guest}: the migration ticket is refused")]
    Ticket {
        guest: GuestId,
        #[source]
        source: crate::vault::TicketError,
    },
    #[error("cannot give guest {guest} a runtime directory of its own: {what}")]
    RuntimeSpace { guest: GuestId, what: String },
    #[error("cannot {op} for guest {guest}")]
    Task {
        guest: GuestId,
        op: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl SupervisorError {
    /// The API error for a refused state transition.
    pub(crate) fn refused(guest: GuestId, state: GuestState, action: Action, why: Refused) -> Self {
        match why {
            Refused::GuestExists => Self::GuestExists { guest },
            Refused::GuestRunning => Self::GuestRunning { guest, state },
            Refused::GuestNotRunning => Self::GuestNotRunning { guest, state },
            Refused::MigratedOut => Self::MigratedOut { guest },
            Refused::NotAllowed => Self::NotAllowed {
                guest,
                state,
                action,
            },
        }
    }

    /// Sorts a vault error into what the API must tell apart: a wrong
    /// passphrase, an unusable file, or an internal failure of `op`.
    pub(crate) fn from_vault(guest: GuestId, op: &'static str, e: VaultError) -> Self {
        match e {
            VaultError::WrongPassphrase { .. } => Self::WrongPassphrase { guest },
            VaultError::WrongKey { kind, .. } => Self::WrongKey { guest, kind },
            VaultError::NoKeyslot { kind, for_host, .. } => Self::NoKeyslot {
                guest,
                kind,
                for_host,
            },
            // The spec's answer: refused, nothing is damaged, and neither
            // "restore from a backup" nor a fallback would be right.
            VaultError::GuestMismatch { found, .. } => Self::GuestMismatch { guest, found },
            VaultError::Corrupt { .. }
            | VaultError::Missing { .. }
            | VaultError::UnsupportedVersion { .. } => Self::StateCorrupt {
                guest,
                what: crate::error_chain::chain(&e),
            },
            other => Self::Vault {
                guest,
                op,
                source: other,
            },
        }
    }
}
