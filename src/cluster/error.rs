//! What can go wrong between vtpmd and etcd, naming the guest, key or
//! host concerned.

use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::GuestId;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read {path}")]
    ReadTls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd did not answer {op} within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("etcd failed {op}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "host name {host:?} is held by another live vtpmd (etcd lease {lease:x}); give each host its own [cluster] host"
    )]
    HostNameInUse { host: String, lease: i64 },
    #[error("guest {guest} is owned by host {owner:?}, whose lease is alive")]
    OwnedElsewhere { guest: GuestId, owner: String },
    #[error("guest {guest} exists in the cluster already (generation {generation})")]
    Exists { guest: GuestId, generation: u64 },
    #[error("the cluster has no record of guest {guest}")]
    NoRecord { guest: GuestId },
    #[error(
        "the cluster holds generation {newest} of guest {guest}, newer than this one ({local})"
    )]
    Stale {
        guest: GuestId,
        local: u64,
        newest: u64,
    },
    #[error("etcd holds a damaged record of guest {guest}: {what}")]
    Corrupt { guest: GuestId, what: String },
    #[error("guest {guest}'s record kept changing under this host's transaction")]
    Contended { guest: GuestId },
    #[error(
        "this host has no etcd lease yet (etcd has not answered since vtpmd started, or a new lease is being taken)"
    )]
    NoLease,
}

impl ClusterError {
    /// Whether etcd could not be reached or answered (not a refusal):
    /// the call may succeed later unchanged.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ClusterError::Connect { .. }
                | ClusterError::Timeout { .. }
                | ClusterError::Etcd { .. }
                | ClusterError::NoLease
        )
    }
}
