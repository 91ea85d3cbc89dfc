//! Who may hold how many connections, decided at accept from the peer's
//! kernel credentials.
//!
//! The socket is open to every local user, so one pool shared by all would
//! let any of them hold every slot (a connection kept alive by a cheap
//! GetInfo within the idle timeout) and lock root out. So: a reserve that
//! only root and the admin group may use, a cap per uid for everyone else
//! (admins are trusted and may use the whole pool), and the total.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::protocol::manager::ManagerError;

use super::auth::Access;

/// The limits, from [`super::Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Quota {
    pub total: usize,
    pub reserved: usize,
    pub per_uid: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The caller's uid holds its `limit` already.
    Uid { limit: usize },
    /// The `limit` connections open to this caller are all in use.
    All { limit: usize },
}

impl Refusal {
    /// The limit it met, for the metrics: an admin's `All` is the whole
    /// of `max_connections`, anyone else's the share outside the reserve.
    pub(super) fn scope(self, access: super::auth::Access) -> crate::metrics::RefusedScope {
        use crate::metrics::RefusedScope;
        match (self, access) {
            (Self::Uid { .. }, _) => RefusedScope::PerUid,
            (Self::All { .. }, super::auth::Access::Admin) => RefusedScope::Total,
            (Self::All { .. }, _) => RefusedScope::Shared,
        }
    }

    pub(super) fn to_wire(self) -> ManagerError {
        let (scope, limit) = match self {
            Self::Uid { limit } => ("uid", limit),
            Self::All { limit } => ("all", limit),
        };
        ManagerError::TooManyConnections {
            scope: scope.to_owned(),
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Connections of callers other than admins.
    unprivileged: usize,
    per_uid: HashMap<u32, usize>,
}

#[derive(Debug)]
pub(super) struct Quotas {
    quota: Quota,
    counts: Mutex<Counts>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub(super) struct Admitted {
    quotas: Arc<Quotas>,
    /// `None` for an admin, who is counted in the total only.
    uid: Option<u32>,
}

impl Quotas {
    pub(super) fn new(quota: Quota) -> Arc<Self> {
        Arc::new(Self {
            quota,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Plain counters: a panic elsewhere leaves them consistent.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn admit(self: &Arc<Self>, uid: u32, access: Access) -> Result<Admitted, Refusal> {
        let q = self.quota;
        let mut c = self.counts();
        if access == Access::Admin {
            if c.total >= q.total {
                return Err(Refusal::All { limit: q.total });
            }
            c.total += 1;
            return Ok(Admitted {
                quotas: Arc::clone(self),
                uid: None,
            });
        }
        let open_to_others = q.total.saturating_sub(q.reserved);
        if c.per_uid.get(&uid).copied().unwrap_or(0) >= q.per_uid {
            return Err(Refusal::Uid { limit: q.per_uid });
        }
        if c.unprivileged >= open_to_others || c.total >= q.total {
            return Err(Refusal::All {
                limit: open_to_others,
            });
        }
        c.total += 1;
        c.unprivileged += 1;
        *c.per_uid.entry(uid).or_default() += 1;
        Ok(Admitted {
            quotas: Arc::clone(self),
            uid: Some(uid),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.quotas.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(uid) = self.uid {
            c.unprivileged = c.unprivileged.saturating_sub(1);
            if let Some(n) = c.per_uid.get_mut(&uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_uid.remove(&uid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUOTA: Quota = Quota {
        total: 6,
        reserved: 2,
        per_uid: 3,
    };

    #[test]
    fn others_are_capped_per_uid_and_leave_the_reserve_to_admins() {
        let quotas = Quotas::new(QUOTA);
        let a: Vec<_> = (0..3)
            .map(|_| quotas.admit(1000, Access::Denied).unwrap())
            .collect();
        assert_eq!(
            quotas.admit(1000, Access::Denied).unwrap_err(),
            Refusal::Uid { limit: 3 }
        );
        let b = quotas.admit(1001, Access::ReadOnly).unwrap();
        assert_eq!(
            quotas.admit(1002, Access::ReadOnly).unwrap_err(),
            Refusal::All { limit: 4 }
        );
        let admins: Vec<_> = (0..2)
            .map(|_| quotas.admit(0, Access::Admin).unwrap())
            .collect();
        assert_eq!(
            quotas.admit(0, Access::Admin).unwrap_err(),
            Refusal::All { limit: 6 }
        );
        drop(b);
        assert!(quotas.admit(1002, Access::ReadOnly).is_ok());
        drop(a);
        drop(admins);
        let c = quotas.counts();
        assert_eq!((c.total, c.unprivileged), (0, 0));
        assert!(c.per_uid.is_empty());
    }

    #[test]
    fn admins_may_use_the_whole_pool_and_are_not_capped_per_uid() {
        let quotas = Quotas::new(QUOTA);
        let all: Vec<_> = (0..6)
            .map(|_| quotas.admit(0, Access::Admin).unwrap())
            .collect();
        assert_eq!(
            quotas.admit(1000, Access::Denied).unwrap_err(),
            Refusal::All { limit: 4 }
        );
        drop(all);
        assert!(quotas.admit(1000, Access::Denied).is_ok());
    }
}
