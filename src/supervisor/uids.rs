//! One uid per guest: the configured range and who holds which uid.
//!
//! Each guest's swtpm runs as its own uid (and a gid of the same number),
//! taken from [`UidRange`] at Create (the lowest free one), recorded in
//! `<state_dir>/guests/<uuid>/owner` so it survives restarts, and released
//! at Delete. Guests without a record (created before per-guest uids, or
//! whose record is unreadable, outside the range or taken twice) get a new
//! one at their next Start. The uids need no entry in `/etc/passwd`: the
//! kernel knows only numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::protocol::GuestId;

/// An inclusive range of uids for guests' swtpm; each uid doubles as the
/// guest's gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    first: u32,
    last: u32,
}

impl UidRange {
    /// `0x70000000`–`0x7000ffff` (1879048192–1879113727): 65536 uids that
    /// no distribution, `useradd` (regular users from 1000, subordinate
    /// ids from 100000 in blocks of 65536), systemd (`DynamicUser=` in
    /// 61184–65519, `systemd-nspawn` containers in 524288–1879048191) or
    /// the overflow ids (65534, 65535) hand out, and below 2^31, where
    /// tools that keep uids in signed integers go wrong.
    pub const DEFAULT: UidRange = UidRange {
        first: 0x7000_0000,
        last: 0x7000_ffff,
    };

    /// `first..=last`; refuses an empty range, root, the overflow ids and
    /// `(uid_t)-1`.
    pub fn new(first: u32, last: u32) -> Result<Self, String> {
        if first > last {
            return Err(format!("{first}-{last} is empty"));
        }
        if first == 0 {
            return Err("it must not contain uid 0 (root)".to_owned());
        }
        if last == u32::MAX {
            return Err("it must not contain 4294967295, which is (uid_t)-1".to_owned());
        }
        if first <= 65535 && last >= 65534 {
            return Err("it must not contain 65534 or 65535 (the overflow ids)".to_owned());
        }
        Ok(Self { first, last })
    }

    /// `"N-M"`, both decimal.
    pub fn parse(text: &str) -> Result<Self, String> {
        let number = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        let (first, last) = text
            .split_once('-')
            .and_then(|(a, b)| Some((number(a)?, number(b)?)))
            .ok_or_else(|| {
                format!("{text:?} is not a range of uids such as \"1879048192-1879113727\"")
            })?;
        Self::new(first, last)
    }

    pub fn first(&self) -> u32 {
        self.first
    }

    pub fn last(&self) -> u32 {
        self.last
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Which guest holds which uid of the range.
#[derive(Debug)]
pub(super) struct UidPool {
    range: UidRange,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    by_guest: BTreeMap<GuestId, u32>,
    taken: BTreeSet<u32>,
}

impl UidPool {
    pub(super) fn new(range: UidRange) -> Self {
        Self {
            range,
            held: Mutex::new(Held::default()),
        }
    }

    pub(super) fn range(&self) -> UidRange {
        self.range
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // Two plain collections updated together under the lock; a panic
        // cannot happen between the two updates.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives `guest` the uid it recorded; false (nothing changes) if that
    /// uid is outside the range or held by another guest.
    pub(super) fn assign(&self, guest: GuestId, uid: u32) -> bool {
        let mut held = self.held();
        if !self.range.contains(uid) || held.taken.contains(&uid) {
            return false;
        }
        if let Some(old) = held.by_guest.insert(guest, uid) {
            held.taken.remove(&old);
        }
        held.taken.insert(uid);
        true
    }

    /// `guest`'s uid, if it has one.
    pub(super) fn get(&self, guest: GuestId) -> Option<u32> {
        self.held().by_guest.get(&guest).copied()
    }

    /// `guest`'s uid, or the lowest free one, now held by it; `None` if the
    /// range is exhausted. A uid is free only when no guest holds it and
    /// no live process runs as it: a swtpm that outlived its guest's
    /// record (a Delete while a crashed vtpmd's swtpm still ran) must
    /// never share a uid with a new guest, whose files it could reach.
    pub(super) fn allocate(&self, guest: GuestId) -> Option<u32> {
        let live = match crate::swtpm::spawn::procfs::live_uids() {
            Ok(live) => live,
            Err(e) => {
                // Without /proc nothing can be ruled out: refuse rather than guess.
                tracing::error!("cannot list the uids of live processes: {e}");
                return None;
            }
        };
        self.allocate_avoiding(guest, &live)
    }

    fn allocate_avoiding(&self, guest: GuestId, live: &BTreeSet<u32>) -> Option<u32> {
        let mut held = self.held();
        if let Some(uid) = held.by_guest.get(&guest) {
            return Some(*uid);
        }
        let uid = (self.range.first..=self.range.last)
            .find(|uid| !held.taken.contains(uid) && !live.contains(uid))?;
        held.by_guest.insert(guest, uid);
        held.taken.insert(uid);
        Some(uid)
    }

    /// Frees `guest`'s uid (Delete, or a Create that failed).
    pub(super) fn release(&self, guest: GuestId) {
        let mut held = self.held();
        if let Some(uid) = held.by_guest.remove(&guest) {
            held.taken.remove(&uid);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn guest(n: u8) -> GuestId {
        GuestId::parse(&format!("00000000-0000-4000-8000-0000000000{n:02x}")).unwrap()
    }

    #[test]
    fn ranges_parse_and_bad_ones_are_refused() {
        assert_eq!(
            UidRange::parse("1879048192-1879113727").unwrap(),
            UidRange::DEFAULT
        );
        assert_eq!(
            UidRange::parse("70000-70000").unwrap().to_string(),
            "70000-70000"
        );
        for bad in [
            "",
            "5",
            "-5",
            "5-",
            "a-b",
            "10-5",
            "0-10",
            "60000-70000",
            "1-4294967295",
            " 1-2",
            "+1-2",
            "1-99999999999",
        ] {
            assert!(UidRange::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_uid_a_live_process_holds_is_never_given_out() {
        let pool = UidPool::new(UidRange::new(70000, 70002).unwrap());
        let live = BTreeSet::from([70000, 70001]);
        assert_eq!(pool.allocate_avoiding(guest(1), &live), Some(70002));
        assert_eq!(pool.allocate_avoiding(guest(2), &live), None);
    }

    #[test]
    fn the_lowest_free_uid_is_allocated_and_released() {
        let pool = UidPool::new(UidRange::new(70000, 70002).unwrap());
        assert_eq!(pool.allocate(guest(1)), Some(70000));
        assert_eq!(pool.allocate(guest(2)), Some(70001));
        assert_eq!(pool.allocate(guest(1)), Some(70000), "stable per guest");
        pool.release(guest(1));
        assert_eq!(pool.allocate(guest(3)), Some(70000), "lowest free");
        assert_eq!(pool.allocate(guest(4)), Some(70002));
        assert_eq!(pool.allocate(guest(5)), None, "exhausted");
        assert_eq!(pool.get(guest(2)), Some(70001));
        assert_eq!(pool.get(guest(5)), None);
    }

    #[test]
    fn a_recorded_uid_is_kept_unless_outside_the_range_or_taken() {
        let pool = UidPool::new(UidRange::new(70000, 70009).unwrap());
        assert!(pool.assign(guest(1), 70005));
        assert!(!pool.assign(guest(2), 70005), "taken");
        assert!(!pool.assign(guest(2), 80000), "outside");
        assert_eq!(pool.get(guest(2)), None);
        assert_eq!(pool.allocate(guest(2)), Some(70000));
    }
}
