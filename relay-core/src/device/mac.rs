//! A device's MAC address, as the system phones are identified by it.
//!
//! Invariant: a [`MacAddress`] is exactly six bytes; its text forms are parsed, never guessed.

use std::fmt;
use std::str::FromStr;

/// A 48-bit MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress(pub [u8; 6]);

/// Text that is not a MAC address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a mac address (12 hex digits, optionally grouped by ':', '-' or '.')")]
pub struct MacParseError {
    /// The refused text.
    pub input: String,
}

impl MacAddress {
    /// The twelve hex digits in lower case, without separators.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = MacParseError;

    /// Accepts `00:1a:2b:3c:4d:5e`, `00-1A-2B-3C-4D-5E`, `001a.2b3c.4d5e` and `001A2B3C4D5E`
    /// (any case, one kind of separator at consistent places).
    fn from_str(s: &str) -> Result<MacAddress, MacParseError> {
        let err = || MacParseError {
            input: s.to_owned(),
        };
        let t = s.trim();
        let digits: String = match t.len() {
            12 => t.to_owned(),
            17 => {
                let sep = t.as_bytes().get(2).copied().ok_or_else(err)?;
                if !(sep == b':' || sep == b'-') {
                    return Err(err());
                }
                let groups: Vec<&str> = t.split(sep as char).collect();
                if groups.len() != 6 || groups.iter().any(|g| g.len() != 2) {
                    return Err(err());
                }
                groups.concat()
            }
            14 => {
                let groups: Vec<&str> = t.split('.').collect();
                if groups.len() != 3 || groups.iter().any(|g| g.len() != 4) {
                    return Err(err());
                }
                groups.concat()
            }
            _ => return Err(err()),
        };
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = digits.get(2 * i..2 * i + 2).ok_or_else(err)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(MacAddress(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let want = MacAddress([0x00, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e]);
        for s in [
            "00:1a:2b:3c:4d:5e",
            "00-1A-2B-3C-4D-5E",
            "001a.2b3c.4d5e",
            "001A2B3C4D5E",
            " 00:1A:2b:3C:4d:5E ",
        ] {
            assert_eq!(s.parse::<MacAddress>(), Ok(want), "{s}");
        }
        assert_eq!(want.to_string(), "00:1a:2b:3c:4d:5e");
        assert_eq!(want.hex(), "001a2b3c4d5e");
    }

    #[test]
    fn refuses_the_rest() {
        for s in [
            "",
            "00:1a:2b:3c:4d",
            "00:1a:2b:3c:4d:5g",
            "00:1a-2b:3c:4d:5e",
            "001a2b3c4d5e00",
            "0:01a:2b:3c:4d:5e",
            "éé:1a:2b:3c:4d:5",
            "+01a2b3c4d5e",
        ] {
            assert!(s.parse::<MacAddress>().is_err(), "{s}");
        }
    }
}
