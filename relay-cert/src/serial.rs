//! Certificate serial numbers and the registry that keeps them from being used twice.
//!
//! Invariant: a [`Serial`] is always a positive integer of at most 20 octets in its DER
//! encoding (RFC 5280 §4.1.2.2), held in its shortest big-endian form; and a serial handed to
//! a certificate was first reserved in a [`SerialRegistry`], which refuses a second
//! reservation of the same number for as long as the registry lives (for
//! [`FileSerialRegistry`], for as long as its file does).

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::CertError;

/// RFC 5280 §4.1.2.2: conforming CAs use serial numbers of at most 20 octets.
const MAX_OCTETS: usize = 20;

/// A certificate serial number: positive, at most 20 octets once DER-encoded.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// A serial from an unsigned integer; zero is refused (serials are positive).
    pub fn from_u64(n: u64) -> Result<Self, CertError> {
        Self::from_be_bytes(&n.to_be_bytes())
    }

    /// A serial from unsigned big-endian bytes; leading zero octets are dropped. Refused when
    /// zero, or when its DER INTEGER would exceed 20 octets (21 content octets are needed when
    /// a 20-octet magnitude has its top bit set).
    pub fn from_be_bytes(bytes: &[u8]) -> Result<Self, CertError> {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        let magnitude = &bytes[start..];
        let der_len = magnitude.len() + usize::from(magnitude.first().is_some_and(|&b| b >= 0x80));
        if magnitude.is_empty() || der_len > MAX_OCTETS {
            return Err(CertError::InvalidSerial(hex_upper(bytes)));
        }
        Ok(Self(magnitude.to_vec()))
    }

    /// Parses hexadecimal digits (upper or lower case, optional `:` separators, as OpenSSL
    /// and this crate print them).
    pub fn from_hex(text: &str) -> Result<Self, CertError> {
        let bad = || CertError::InvalidSerial(text.to_owned());
        let digits: Vec<u8> = text
            .bytes()
            .filter(|&b| b != b':')
            .map(|b| (b as char).to_digit(16).map(|d| d as u8))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        if digits.is_empty() || digits.len() > 2 * (MAX_OCTETS + 1) {
            return Err(bad());
        }
        let padded: Vec<u8> = if digits.len() % 2 == 1 {
            std::iter::once(0).chain(digits).collect()
        } else {
            digits
        };
        let bytes: Vec<u8> = padded.chunks(2).map(|p| p[0] << 4 | p[1]).collect();
        Self::from_be_bytes(&bytes).map_err(|_| bad())
    }

    /// The magnitude, big-endian, without leading zero octets.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Upper-case hex of the magnitude, two digits an octet (as `openssl x509 -serial` prints).
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex_upper(&self.0)
    }

    pub(crate) fn to_rcgen(&self) -> rcgen::SerialNumber {
        rcgen::SerialNumber::from_slice(&self.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

pub(crate) fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// A fresh random serial from the operating system's random source: 159 random bits (20
/// octets with the top bit clear, so the DER INTEGER stays positive and within 20 octets),
/// far beyond the 64 bits of entropy the CA/Browser Forum asks for.
pub fn random_serial() -> Result<Serial, CertError> {
    loop {
        let mut bytes = [0u8; MAX_OCTETS];
        getrandom::fill(&mut bytes).map_err(CertError::Random)?;
        bytes[0] &= 0x7f;
        // Zero has probability 2^-159; drawing again keeps the function total.
        if let Ok(serial) = Serial::from_be_bytes(&bytes) {
            return Ok(serial);
        }
    }
}

/// Remembers every serial number used for a certificate, so none is used twice.
pub trait SerialRegistry {
    /// Whether `serial` was already reserved.
    fn is_used(&self, serial: &Serial) -> Result<bool, CertError>;

    /// Marks `serial` as used; [`CertError::SerialAlreadyUsed`] if it already was.
    fn reserve(&mut self, serial: &Serial) -> Result<(), CertError>;

    /// Draws a random serial not used before and reserves it.
    fn next(&mut self) -> Result<Serial, CertError> {
        const DRAWS: u32 = 8;
        for _ in 0..DRAWS {
            let serial = random_serial()?;
            match self.reserve(&serial) {
                Ok(()) => return Ok(serial),
                Err(CertError::SerialAlreadyUsed(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(CertError::SerialExhausted(DRAWS))
    }
}

/// A registry in memory, for tests and for callers that persist serials themselves.
#[derive(Debug, Default, Clone)]
pub struct MemorySerialRegistry {
    used: HashSet<Serial>,
}

impl MemorySerialRegistry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl SerialRegistry for MemorySerialRegistry {
    fn is_used(&self, serial: &Serial) -> Result<bool, CertError> {
        Ok(self.used.contains(serial))
    }

    fn reserve(&mut self, serial: &Serial) -> Result<(), CertError> {
        if self.used.insert(serial.clone()) {
            Ok(())
        } else {
            Err(CertError::SerialAlreadyUsed(serial.to_hex()))
        }
    }
}

/// A registry kept as a text file, `serials.txt` in a directory, one upper-case hex serial a
/// line. A reservation is appended and synced to disk before it is granted, so a crash never
/// forgets a serial that went into a certificate. One process at a time writes a registry
/// (the daemon); the file is read again before each reservation, so serials that another
/// process appended in between are still refused.
#[derive(Debug)]
pub struct FileSerialRegistry {
    path: PathBuf,
}

impl FileSerialRegistry {
    /// The file's name inside the registry directory.
    pub const FILE_NAME: &'static str = "serials.txt";

    /// Opens the registry in `dir`, creating the directory and an empty file if needed, and
    /// checks that every line is a serial number.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CertError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(Self::FILE_NAME);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| CertError::Io {
                path: path.clone(),
                source,
            })?;
        let registry = Self { path };
        registry.load()?;
        Ok(registry)
    }

    /// The registry file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every serial in the file.
    pub fn load(&self) -> Result<HashSet<Serial>, CertError> {
        let text = fs::read_to_string(&self.path).map_err(|source| CertError::Io {
            path: self.path.clone(),
            source,
        })?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                Serial::from_hex(line.trim()).map_err(|_| CertError::RegistryCorrupt {
                    path: self.path.clone(),
                    line: i + 1,
                })
            })
            .collect()
    }
}

impl SerialRegistry for FileSerialRegistry {
    fn is_used(&self, serial: &Serial) -> Result<bool, CertError> {
        Ok(self.load()?.contains(serial))
    }

    fn reserve(&mut self, serial: &Serial) -> Result<(), CertError> {
        if self.is_used(serial)? {
            return Err(CertError::SerialAlreadyUsed(serial.to_hex()));
        }
        let io = |source| CertError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file: File = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        file.write_all(format!("{}\n", serial.to_hex()).as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_bounds() {
        assert!(Serial::from_u64(0).is_err());
        assert!(Serial::from_be_bytes(&[0, 0]).is_err());
        assert_eq!(Serial::from_u64(1).expect("1").as_bytes(), &[1]);
        assert_eq!(Serial::from_u64(0x1234).expect("x").to_hex(), "1234");
        // 20 octets with the top bit set need a 21st (sign) octet in DER: refused.
        assert!(Serial::from_be_bytes(&[0x80; 20]).is_err());
        Serial::from_be_bytes(&[0x7f; 20]).expect("20 octets, top bit clear");
        assert!(Serial::from_be_bytes(&[0x01; 21]).is_err());
        // Leading zeros are dropped, so the same number compares equal.
        assert_eq!(
            Serial::from_be_bytes(&[0, 0, 5]).expect("5"),
            Serial::from_u64(5).expect("5")
        );
    }

    #[test]
    fn hex_round_trip() {
        let s = Serial::from_be_bytes(&[0x0a, 0xbc, 0xde]).expect("serial");
        assert_eq!(s.to_hex(), "0ABCDE");
        assert_eq!(Serial::from_hex("0ABCDE").expect("hex"), s);
        assert_eq!(Serial::from_hex("ab:cd:e").expect("odd"), s);
        assert!(Serial::from_hex("xyz").is_err());
        assert!(Serial::from_hex("").is_err());
        assert!(Serial::from_hex("00").is_err());
    }

    #[test]
    fn random_serials_are_positive_and_short() {
        for _ in 0..64 {
            let s = random_serial().expect("random");
            assert!(s.as_bytes().len() <= 20);
            if s.as_bytes().len() == 20 {
                assert!(s.as_bytes()[0] < 0x80);
            }
        }
        assert_ne!(random_serial().expect("a"), random_serial().expect("b"));
    }

    #[test]
    fn memory_registry_refuses_reuse() {
        let mut r = MemorySerialRegistry::new();
        let s = Serial::from_u64(42).expect("42");
        r.reserve(&s).expect("first");
        assert!(matches!(r.reserve(&s), Err(CertError::SerialAlreadyUsed(h)) if h == "2A"));
        let n = r.next().expect("next");
        assert!(r.is_used(&n).expect("used"));
        assert!(r.reserve(&n).is_err());
    }

    #[test]
    fn file_registry_persists_and_refuses_reuse() {
        let dir = std::env::temp_dir().join(format!("relay-cert-serials-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = Serial::from_u64(7).expect("7");
        let n = {
            let mut r = FileSerialRegistry::open(&dir).expect("open");
            r.reserve(&s).expect("first");
            assert!(matches!(
                r.reserve(&s),
                Err(CertError::SerialAlreadyUsed(_))
            ));
            r.next().expect("next")
        };
        // A second registry over the same directory (another run of the daemon) remembers both.
        let mut again = FileSerialRegistry::open(&dir).expect("reopen");
        assert!(matches!(
            again.reserve(&s),
            Err(CertError::SerialAlreadyUsed(_))
        ));
        assert!(matches!(
            again.reserve(&n),
            Err(CertError::SerialAlreadyUsed(_))
        ));
        assert_eq!(again.load().expect("load").len(), 2);
        fs::write(again.path(), "07\nnot-hex\n").expect("corrupt");
        assert!(matches!(
            FileSerialRegistry::open(&dir),
            Err(CertError::RegistryCorrupt { line: 2, .. })
        ));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
