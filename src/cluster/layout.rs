//! Where vtpmd's records live in etcd, and how a generation is written
//! there.
//!
//! ```text
//! <prefix>/hosts/<host>              this host's name, bound to its lease (alive)
//! <prefix>/guests/<uuid>/owner       the owning host's name, bound to its lease
//! <prefix>/guests/<uuid>/sealed      the newest sealed file, as on disk
//! <prefix>/guests/<uuid>/generation  its generation, 20 decimal digits
//! <prefix>/guests/<uuid>/writer      the host that wrote it
//! ```
//!
//! The generation is zero-padded so that etcd's byte-wise value compare
//! orders generations as numbers: "the stored generation is below the new
//! one" is one `Compare` in the transaction that writes it.

use crate::protocol::GuestId;

/// The keys under one prefix.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    prefix: String,
}

impl Layout {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub(super) fn host(&self, host: &str) -> String {
        format!("{}/hosts/{host}", self.prefix)
    }

    pub(super) fn guest_prefix(&self, guest: GuestId) -> String {
        format!("{}/guests/{guest}/", self.prefix)
    }

    pub(super) fn owner(&self, guest: GuestId) -> String {
        format!("{}owner", self.guest_prefix(guest))
    }

    pub(super) fn sealed(&self, guest: GuestId) -> String {
        format!("{}sealed", self.guest_prefix(guest))
    }

    pub(super) fn generation(&self, guest: GuestId) -> String {
        format!("{}generation", self.guest_prefix(guest))
    }

    pub(super) fn writer(&self, guest: GuestId) -> String {
        format!("{}writer", self.guest_prefix(guest))
    }
}

/// A generation as etcd holds it.
pub(super) fn encode_generation(generation: u64) -> String {
    format!("{generation:020}")
}

/// The generation etcd holds; `None` unless exactly 20 ASCII digits.
pub(super) fn decode_generation(value: &[u8]) -> Option<u64> {
    if value.len() != 20 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A host name: what DNS allows in one name (letters, digits, `-`, `.`,
/// and `_`), 1 to 253 bytes; it is a key component and a value.
pub fn check_host_name(host: &str) -> Result<(), String> {
    let ok = (1..=253).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !host.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host name (1 to 253 letters, digits, '-', '.', '_')"
        ))
    }
}

/// A key prefix: begins with `/`, does not end with one, no empty, `.`
/// or `..` component, printable ASCII without spaces.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let components_ok = prefix.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    });
    if components_ok && prefix.bytes().all(|b| b.is_ascii_graphic()) && prefix.len() <= 128 {
        Ok(())
    } else {
        Err(format!(
            "{prefix:?} is not a key prefix such as \"/vtpmd\" (a leading '/', no trailing one, no empty component)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_generations_order_as_numbers() {
        let mut gens = [0u64, 9, 10, 99, 100, 1 << 20, u64::MAX];
        gens.reverse();
        let mut encoded: Vec<String> = gens.iter().map(|g| encode_generation(*g)).collect();
        encoded.sort();
        let decoded: Vec<u64> = encoded
            .iter()
            .map(|e| decode_generation(e.as_bytes()).unwrap())
            .collect();
        assert_eq!(decoded, [0, 9, 10, 99, 100, 1 << 20, u64::MAX]);
    }

    #[test]
    fn only_twenty_digits_are_a_generation() {
        for bad in [
            "",
            "1",
            "0000000000000000000x",
            "000000000000000000001",
            " 0000000000000000001",
        ] {
            assert_eq!(decode_generation(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_sit_under_the_prefix() {
        let l = Layout::new("/vtpmd");
        let g: GuestId = "5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f".parse().unwrap();
        assert_eq!(
            l.owner(g),
            "/vtpmd/guests/5d0c3f9e-1b2a-4c6d-8e7f-9a0b1c2d3e4f/owner"
        );
        assert!(l.sealed(g).starts_with(&l.guest_prefix(g)));
        assert_eq!(l.host("a"), "/vtpmd/hosts/a");
    }

    #[test]
    fn names_and_prefixes_are_checked() {
        assert!(check_host_name("compute-01.example_org").is_ok());
        for bad in ["", "a/b", "a b", ".a", &"x".repeat(254)] {
            assert!(check_host_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix("/vtpmd").is_ok());
        assert!(check_prefix("/a/b").is_ok());
        for bad in ["", "/", "vtpmd", "/vtpmd/", "/a//b", "/a/../b", "/a b"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
