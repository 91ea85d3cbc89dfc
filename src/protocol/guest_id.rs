use std::fmt;
use std::str::FromStr;

/// A guest's identity: a UUID in canonical lowercase hyphenated form, the
/// form Nova uses for instance ids.
///
/// Only the canonical text is accepted (no braces, no upper case, no
/// `urn:uuid:` prefix), so one guest has exactly one spelling and the id can
/// be used verbatim as a directory name or inside swtpm's comma-separated
/// options.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestId([u8; 16]);

/// Why a text is not a guest id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestIdError {
    #[error("a guest id is 36 characters, got {0}")]
    Length(usize),
    #[error("a guest id is a lowercase hyphenated UUID (8-4-4-4-12 hex digits)")]
    Syntax,
}

const TEXT_LEN: usize = 36;
const HYPHENS: [usize; 4] = [8, 13, 18, 23];

impl GuestId {
    /// Parses the canonical text form; everything else is refused.
    pub fn parse(text: &str) -> Result<Self, GuestIdError> {
        let bytes = text.as_bytes();
        if bytes.len() != TEXT_LEN {
            return Err(GuestIdError::Length(bytes.len()));
        }
        let mut out = [0u8; 16];
        let mut nibbles = bytes
            .iter()
            .enumerate()
            .filter(|(i, _)| !HYPHENS.contains(i))
            .map(|(_, b)| b);
        for (i, &b) in bytes.iter().enumerate() {
            if HYPHENS.contains(&i) != (b == b'-') {
                return Err(GuestIdError::Syntax);
            }
        }
        for byte in &mut out {
            let hi = nibbles.next().and_then(|b| lower_hex_value(*b));
            let lo = nibbles.next().and_then(|b| lower_hex_value(*b));
            match (hi, lo) {
                (Some(hi), Some(lo)) => *byte = (hi << 4) | lo,
                _ => return Err(GuestIdError::Syntax),
            }
        }
        Ok(Self(out))
    }

    /// The 16 raw bytes, as stored in sealed files.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

fn lower_hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl FromStr for GuestId {
    type Err = GuestIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for GuestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for GuestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestId({self})")
    }
}

impl serde::Serialize for GuestId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GuestId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANONICAL: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";

    #[test]
    fn canonical_text_round_trips() {
        let id = GuestId::parse(CANONICAL).unwrap();
        assert_eq!(id.to_string(), CANONICAL);
        assert_eq!(GuestId::from_bytes(*id.as_bytes()), id);
    }

    #[test]
    fn non_canonical_spellings_are_refused() {
        for bad in [
            "0F6A2D1E-8C4B-4E2A-9D3F-5B7C1A2E3F40",
            "{0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f4}",
            "0f6a2d1e8c4b4e2a9d3f5b7c1a2e3f40",
            "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f4g",
            "0f6a2d1e-8c4b-4e2a-9d3f+5b7c1a2e3f40",
            "0f6a2d1e-8c4b-4e2a-9d3f5-b7c1a2e3f40",
            "../../etc/../../etc/passwd/../../xx",
            "",
        ] {
            assert!(GuestId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_path_is_not_a_guest_id() {
        assert_eq!(GuestId::parse("../../etc"), Err(GuestIdError::Length(9)));
    }

    #[test]
    fn serde_uses_the_canonical_text() {
        let id = GuestId::parse(CANONICAL).unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{CANONICAL}\""));
        assert_eq!(serde_json::from_str::<GuestId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<GuestId>("\"../x\"").is_err());
    }
}
