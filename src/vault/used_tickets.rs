//! The nonces of the migration tickets this host has taken, each kept
//! until its ticket expires, in `<state_dir>/tickets.used`: a ticket is
//! single use across restarts of vtpmd too. Without it, a destination
//! restarted within a ticket's life (up to [`MAX_TICKET_TTL`]) would take
//! a replayed ticket and its sealed file again after an Abort or a Delete
//! there, running a TPM that has since moved on elsewhere.
//!
//! The file is rewritten whole (atomically, fsynced) at every take, before
//! MigrateIn goes on: it holds only live tickets, a handful at a time.
//!
//! ```text
//! vtpmd used tickets v1
//! <nonce: 32 hex digits> <expiry: unix seconds>
//! ```
//!
//! [`MAX_TICKET_TTL`]: super::MAX_TICKET_TTL

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use super::VaultError;
use super::durable;

const HEADER: &str = "vtpmd used tickets v1";
/// Far more than the live tickets one host can have taken.
const MAX_FILE_LEN: usize = 1 << 20;

/// The taken nonces, by expiry in unix seconds.
#[derive(Debug)]
pub struct UsedTickets {
    path: PathBuf,
    used: Mutex<BTreeMap<[u8; 16], u64>>,
}

impl UsedTickets {
    /// Reads `path` (none yet is an empty set). A damaged file is set
    /// aside as an error for the caller to report; the set starts empty.
    pub fn load(path: &Path, now: SystemTime) -> (Self, Option<VaultError>) {
        let (used, damage) = match durable::read(path, MAX_FILE_LEN) {
            Ok(None) => (BTreeMap::new(), None),
            Ok(Some(bytes)) => match decode(&bytes) {
                Ok(mut used) => {
                    let now = unix(now);
                    used.retain(|_, until| *until > now);
                    (used, None)
                }
                Err(what) => (
                    BTreeMap::new(),
                    Some(VaultError::Corrupt {
                        path: path.to_owned(),
                        what,
                    }),
                ),
            },
            Err(e) => (BTreeMap::new(), Some(e)),
        };
        let set = Self {
            path: path.to_owned(),
            used: Mutex::new(used),
        };
        (set, damage)
    }

    /// Records `nonce` durably; `Ok(false)` when it was taken before (and
    /// has not expired). Nothing is recorded when the file cannot be
    /// written: the ticket is then not to be taken.
    pub fn take(
        &self,
        nonce: [u8; 16],
        expires: SystemTime,
        now: SystemTime,
    ) -> Result<bool, VaultError> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let now = unix(now);
        used.retain(|_, until| *until > now);
        if used.contains_key(&nonce) {
            return Ok(false);
        }
        let mut next = used.clone();
        // Rounded up: a nonce is never forgotten before its ticket expires.
        next.insert(nonce, unix(expires).saturating_add(1));
        durable::replace(&self.path, encode(&next).as_bytes())?;
        *used = next;
        Ok(true)
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn encode(used: &BTreeMap<[u8; 16], u64>) -> String {
    use std::fmt::Write;
    let mut text = format!("{HEADER}\n");
    for (nonce, until) in used {
        for b in nonce {
            let _ = write!(text, "{b:02x}");
        }
        let _ = writeln!(text, " {until}");
    }
    text
}

fn decode(bytes: &[u8]) -> Result<BTreeMap<[u8; 16], u64>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let body = text
        .strip_prefix(HEADER)
        .and_then(|rest| rest.strip_prefix('\n'))
        .ok_or_else(|| format!("does not begin with {HEADER:?}"))?;
    let mut used = BTreeMap::new();
    for (n, line) in body.split_terminator('\n').enumerate() {
        let bad = || format!("line {} is not `<32 hex digits> <unix seconds>`", n + 2);
        let (hex, until) = line.split_once(' ').ok_or_else(bad)?;
        if hex.len() != 32 || !until.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let mut nonce = [0u8; 16];
        for (i, byte) in nonce.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let until = until.parse().map_err(|_| bad())?;
        if used.insert(nonce, until).is_some() {
            return Err(format!("line {} repeats a nonce", n + 2));
        }
    }
    if !body.is_empty() && !body.ends_with('\n') {
        return Err("the last line is cut short".to_owned());
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_nonce_is_taken_once_and_still_known_after_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tickets.used");
        let (set, damage) = UsedTickets::load(&path, at(1000));
        assert!(damage.is_none());
        assert!(set.take([7; 16], at(1300), at(1000)).unwrap());
        assert!(!set.take([7; 16], at(1300), at(1001)).unwrap());
        assert!(set.take([8; 16], at(1300), at(1002)).unwrap());
        drop(set);
        let (again, damage) = UsedTickets::load(&path, at(1100));
        assert!(damage.is_none());
        assert!(!again.take([7; 16], at(1300), at(1100)).unwrap());
        assert!(!again.take([8; 16], at(1300), at(1100)).unwrap());
    }

    #[test]
    fn an_expired_nonce_is_forgotten_and_dropped_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tickets.used");
        let (set, _) = UsedTickets::load(&path, at(1000));
        assert!(set.take([1; 16], at(1010), at(1000)).unwrap());
        // Past its expiry (rounded up by one second), taking another
        // rewrites the file without it.
        assert!(set.take([2; 16], at(2000), at(1012)).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&"01".repeat(16)), "{text}");
        assert!(text.contains(&"02".repeat(16)), "{text}");
    }

    #[test]
    fn anything_but_the_exact_format_is_damage() {
        let good = format!("{HEADER}\n{} 5\n", "ab".repeat(16));
        assert_eq!(decode(good.as_bytes()).unwrap().len(), 1);
        for bad in [
            String::new(),
            "vtpmd used tickets v2\n".to_owned(),
            format!("{HEADER}\n{} 5", "ab".repeat(16)),
            format!("{HEADER}\n{} -5\n", "ab".repeat(16)),
            format!("{HEADER}\n{} 5\n", "ab".repeat(15)),
            format!("{HEADER}\n{} 5\n", "zz".repeat(16)),
            format!("{HEADER}\n{0} 5\n{0} 6\n", "ab".repeat(16)),
            format!("{HEADER}\n{}  5\n", "ab".repeat(16)),
        ] {
            assert!(decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tickets.used");
        std::fs::write(&path, "junk").unwrap();
        let (set, damage) = UsedTickets::load(&path, at(0));
        assert!(matches!(damage, Some(VaultError::Corrupt { .. })));
        assert!(set.take([3; 16], at(10), at(0)).unwrap());
    }
}
