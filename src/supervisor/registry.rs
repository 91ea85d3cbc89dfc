//! The guests by id, plus the ids being created (reserved, not yet
//! visible), so two Creates of one id cannot both proceed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::protocol::GuestId;

use super::guest::Guest;
use super::state::GuestState;

#[derive(Debug, Default)]
pub(super) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    guests: BTreeMap<GuestId, Arc<Guest>>,
    creating: BTreeSet<GuestId>,
}

/// An id reserved for a Create; released on drop unless the guest was
/// [`Reservation::commit`]ted.
#[derive(Debug)]
pub(super) struct Reservation<'r> {
    registry: &'r Registry,
    id: GuestId,
}

/// Why an id cannot be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// A guest exists, in this state.
    Exists(GuestState),
    /// Another Create of this id is under way.
    BeingCreated,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Map operations do not panic half-way.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, id: GuestId) -> Option<Arc<Guest>> {
        self.lock().guests.get(&id).cloned()
    }

    /// Every guest, sorted by id.
    pub(super) fn all(&self) -> Vec<Arc<Guest>> {
        self.lock().guests.values().cloned().collect()
    }

    pub(super) fn len(&self) -> usize {
        self.lock().guests.len()
    }

    pub(super) fn insert_recovered(&self, guest: Arc<Guest>) {
        self.lock().guests.insert(guest.id, guest);
    }

    pub(super) fn reserve(&self, id: GuestId) -> Result<Reservation<'_>, Taken> {
        let mut inner = self.lock();
        if let Some(guest) = inner.guests.get(&id) {
            return Err(Taken::Exists(guest.state()));
        }
        if !inner.creating.insert(id) {
            return Err(Taken::BeingCreated);
        }
        Ok(Reservation { registry: self, id })
    }

    pub(super) fn remove(&self, id: GuestId) {
        self.lock().guests.remove(&id);
    }
}

impl Reservation<'_> {
    /// Makes the created guest visible.
    pub(super) fn commit(self, guest: Arc<Guest>) {
        let mut inner = self.registry.lock();
        inner.creating.remove(&self.id);
        inner.guests.insert(self.id, guest);
        drop(inner);
        std::mem::forget(self);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.registry.lock().creating.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::{TpmModel, TpmSpec, TpmVersion};
    use crate::supervisor::GuestInfo;

    fn id(n: u8) -> GuestId {
        GuestId::from_bytes([n; 16])
    }

    fn guest(n: u8) -> Arc<Guest> {
        Guest::new(GuestInfo {
            guest: id(n),
            spec: TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).unwrap(),
            state: GuestState::Stopped,
            pid: None,
            ctrl_socket: None,
            generation: 1,
            failure: None,
            reason: None,
            keyslots: Vec::new(),
            replication: None,
        })
    }

    #[test]
    fn a_reserved_id_cannot_be_reserved_twice_and_is_released_on_drop() {
        let registry = Registry::default();
        let first = registry.reserve(id(1)).unwrap();
        assert_eq!(registry.reserve(id(1)).unwrap_err(), Taken::BeingCreated);
        assert!(registry.get(id(1)).is_none(), "visible before commit");
        drop(first);
        registry.reserve(id(1)).unwrap();
    }

    #[test]
    fn a_committed_guest_is_listed_in_id_order() {
        let registry = Registry::default();
        registry.reserve(id(2)).unwrap().commit(guest(2));
        registry.reserve(id(1)).unwrap().commit(guest(1));
        assert_eq!(
            registry.reserve(id(2)).unwrap_err(),
            Taken::Exists(GuestState::Stopped)
        );
        let ids: Vec<GuestId> = registry.all().iter().map(|g| g.id).collect();
        assert_eq!(ids, [id(1), id(2)]);
        registry.remove(id(1));
        assert_eq!(registry.len(), 1);
    }
}
