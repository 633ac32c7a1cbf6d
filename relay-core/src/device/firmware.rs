//! Minimum device software for Internet registration, and the version formats of the field
//! (`V3 R0.40.4`, `V2R5.11.01`, `V2.0.12`...).
//!
//! Invariant: a [`FirmwareVersion`] is the version number followed by up to
//! [`MAX_PARTS`] release numbers, and versions compare numerically part by part with missing
//! parts as zero — so `V3 R0.40.4`, `V3R0.40.4` and `v3 r0.40.04` are equal and the `R` marker
//! only changes how a version is written. Parsing never panics.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use super::DeviceType;

/// Most release numbers after the version number (`R0.40.4` has three).
pub const MAX_PARTS: usize = 4;

/// A device software version: `V<version> R<release parts>` or `V<version>.<parts>`.
#[derive(Clone, Copy, Debug)]
pub struct FirmwareVersion {
    version: u32,
    parts: [u32; MAX_PARTS],
    len: u8,
    release_marker: bool,
}

impl FirmwareVersion {
    /// The version number (the `3` of `V3 R0.40.4`).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The release numbers after it (`[0, 40, 4]` for `V3 R0.40.4`).
    pub fn parts(&self) -> &[u32] {
        &self.parts[..usize::from(self.len).min(MAX_PARTS)]
    }

    fn key(&self) -> (u32, [u32; MAX_PARTS]) {
        // Unused parts are zero, so `V2.0` equals `V2.0.0`.
        (self.version, self.parts)
    }
}

impl PartialEq for FirmwareVersion {
    fn eq(&self, other: &FirmwareVersion) -> bool {
        self.key() == other.key()
    }
}

impl Eq for FirmwareVersion {}

impl PartialOrd for FirmwareVersion {
    fn partial_cmp(&self, other: &FirmwareVersion) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for FirmwareVersion {
    fn cmp(&self, other: &FirmwareVersion) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl fmt::Display for FirmwareVersion {
    /// The canonical form: `V3 R0.40.4` with a release marker, `V2.0.12` without.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "V{}", self.version)?;
        let parts = self.parts();
        if self.release_marker {
            f.write_str(" R")?;
        } else if !parts.is_empty() {
            f.write_str(".")?;
        }
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Text that is not a firmware version.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unparsable firmware version {input:?}: {reason}")]
pub struct FirmwareParseError {
    /// The refused text.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for FirmwareVersion {
    type Err = FirmwareParseError;

    /// Accepts an optional `V`, the version number, then either `R` and dotted release numbers
    /// (blanks around the `R` allowed) or dotted numbers: `V3 R0.40.4`, `V3R0.40.4`,
    /// `v2r5.11.01`, `V2.0.12`, `2.0.12`, `V3`. Case and surrounding blanks do not matter.
    fn from_str(s: &str) -> Result<FirmwareVersion, FirmwareParseError> {
        let err = |reason| FirmwareParseError {
            input: s.to_owned(),
            reason,
        };
        let t = s.trim();
        let t = t.strip_prefix(['V', 'v']).map(str::trim_start).unwrap_or(t);
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (major, rest) = t.split_at(digits_end);
        if major.is_empty() {
            return Err(err("expected a version number like V3"));
        }
        let version = number(major).ok_or_else(|| err("a number is too large"))?;
        let rest_trimmed = rest.trim_start();
        let (release_marker, dotted) = if let Some(r) = rest_trimmed.strip_prefix(['R', 'r']) {
            (true, Some(r.trim_start()))
        } else if let Some(d) = rest.strip_prefix('.') {
            (false, Some(d))
        } else if rest.trim().is_empty() {
            (false, None)
        } else {
            return Err(err("expected R or '.' after the version number"));
        };
        let mut parts = [0u32; MAX_PARTS];
        let mut len = 0u8;
        if let Some(dotted) = dotted {
            for (i, p) in dotted.split('.').enumerate() {
                if i >= MAX_PARTS {
                    return Err(err("too many release numbers"));
                }
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err("release numbers are digits separated by '.'"));
                }
                parts[i] = number(p).ok_or_else(|| err("a number is too large"))?;
                len += 1;
            }
        }
        Ok(FirmwareVersion {
            version,
            parts,
            len,
            release_marker,
        })
    }
}

fn number(digits: &str) -> Option<u32> {
    digits.parse().ok()
}

/// The lowest firmware a device type needs for Internet registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Minimum {
    /// This version or newer.
    AtLeast(FirmwareVersion),
    /// Only versions newer than this one.
    NewerThan(FirmwareVersion),
}

impl Minimum {
    /// Whether `version` meets the minimum.
    pub fn admits(&self, version: &FirmwareVersion) -> bool {
        match self {
            Minimum::AtLeast(min) => version >= min,
            Minimum::NewerThan(min) => version > min,
        }
    }
}

impl fmt::Display for Minimum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Minimum::AtLeast(v) => write!(f, ">= {v}"),
            Minimum::NewerThan(v) => write!(f, "> {v}"),
        }
    }
}

impl FromStr for Minimum {
    type Err = FirmwareParseError;

    /// `V3 R0.40.4` or `>= V3 R0.40.4` (at least), `> V2.0.12` (newer than).
    fn from_str(s: &str) -> Result<Minimum, FirmwareParseError> {
        let t = s.trim();
        if let Some(v) = t.strip_prefix(">=") {
            Ok(Minimum::AtLeast(v.parse()?))
        } else if let Some(v) = t.strip_prefix('>') {
            Ok(Minimum::NewerThan(v.parse()?))
        } else {
            Ok(Minimum::AtLeast(t.parse()?))
        }
    }
}

/// Why a device's firmware may not register from the Internet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FirmwareRefusal {
    /// The version is below the minimum.
    #[error("{version} is older than the minimum {minimum} for {device}")]
    TooOld {
        /// The device type.
        device: DeviceType,
        /// The version it reported.
        version: FirmwareVersion,
        /// The configured minimum.
        minimum: FirmwareVersion,
    },
    /// The version is not newer than the last refused one.
    #[error("{version} is not newer than {minimum}, which {device} must exceed")]
    NotNewer {
        /// The device type.
        device: DeviceType,
        /// The version it reported.
        version: FirmwareVersion,
        /// The configured minimum.
        minimum: FirmwareVersion,
    },
    /// The reported version cannot be read.
    #[error(transparent)]
    Unparsable(#[from] FirmwareParseError),
}

/// A policy override that names no device type or no version.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FirmwarePolicyError {
    /// The device type is unknown.
    #[error(transparent)]
    DeviceType(#[from] super::UnknownDeviceType),
    /// The minimum is unparsable.
    #[error(transparent)]
    Version(#[from] FirmwareParseError),
}

/// Minimum firmware per device type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwarePolicy {
    minimums: [Option<Minimum>; DeviceType::ALL.len()],
}

/// Builds a version from the literal defaults below; they are tested to parse.
const fn v(version: u32, p: [u32; 3], len: u8, release_marker: bool) -> FirmwareVersion {
    FirmwareVersion {
        version,
        parts: [p[0], p[1], p[2], 0],
        len,
        release_marker,
    }
}

impl Default for FirmwarePolicy {
    /// The field's minimums: OpenStage HFA and DeskPhone IP HFA V3 R0.40.4, DeskPhone CP HFA
    /// V1 R2.8.0, myPortal to go Android V2R2.26.19, iOS V2R5.11.01, myPortal @work newer than
    /// V2.0.12; a SIP device has none.
    fn default() -> FirmwarePolicy {
        let mut minimums = [None; DeviceType::ALL.len()];
        for t in DeviceType::ALL {
            minimums[t as usize] = match t {
                DeviceType::OpenStageHfa | DeviceType::DeskPhoneIpHfa => {
                    Some(Minimum::AtLeast(v(3, [0, 40, 4], 3, true)))
                }
                DeviceType::DeskPhoneCpHfa => Some(Minimum::AtLeast(v(1, [2, 8, 0], 3, true))),
                DeviceType::MyPortalToGoAndroid => {
                    Some(Minimum::AtLeast(v(2, [2, 26, 19], 3, true)))
                }
                DeviceType::MyPortalToGoIos => Some(Minimum::AtLeast(v(2, [5, 11, 1], 3, true))),
                DeviceType::MyPortalAtWork => Some(Minimum::NewerThan(v(2, [0, 12, 0], 2, false))),
                DeviceType::SipDevice => None,
            };
        }
        FirmwarePolicy { minimums }
    }
}

impl FirmwarePolicy {
    /// The minimum for `device`, if it has one.
    pub fn minimum(&self, device: DeviceType) -> Option<Minimum> {
        self.minimums.get(device as usize).copied().flatten()
    }

    /// Sets (or with `None` removes) the minimum for `device`.
    pub fn set_minimum(&mut self, device: DeviceType, minimum: Option<Minimum>) {
        if let Some(slot) = self.minimums.get_mut(device as usize) {
            *slot = minimum;
        }
    }

    /// Applies an override from configuration: a device type name ([`DeviceType::name`]) and a
    /// minimum ([`Minimum::from_str`], or `none` for no minimum).
    pub fn apply_override(
        &mut self,
        device: &str,
        minimum: &str,
    ) -> Result<(), FirmwarePolicyError> {
        let device: DeviceType = device.parse()?;
        let minimum = if minimum.trim().eq_ignore_ascii_case("none") {
            None
        } else {
            Some(minimum.parse()?)
        };
        self.set_minimum(device, minimum);
        Ok(())
    }

    /// Whether `device` reporting `version` may register from the Internet.
    pub fn check(&self, device: DeviceType, version: &str) -> Result<(), FirmwareRefusal> {
        let version: FirmwareVersion = version.parse()?;
        match self.minimum(device) {
            None => Ok(()),
            Some(m) if m.admits(&version) => Ok(()),
            Some(Minimum::AtLeast(minimum)) => Err(FirmwareRefusal::TooOld {
                device,
                version,
                minimum,
            }),
            Some(Minimum::NewerThan(minimum)) => Err(FirmwareRefusal::NotNewer {
                device,
                version,
                minimum,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceType::*;

    fn parse(s: &str) -> FirmwareVersion {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn field_formats_parse() {
        let cases: &[(&str, u32, &[u32], &str)] = &[
            ("V3 R0.40.4", 3, &[0, 40, 4], "V3 R0.40.4"),
            ("V3R0.40.4", 3, &[0, 40, 4], "V3 R0.40.4"),
            ("V1 R2.8.0", 1, &[2, 8, 0], "V1 R2.8.0"),
            ("V2R2.26.19", 2, &[2, 26, 19], "V2 R2.26.19"),
            ("V2R5.11.01", 2, &[5, 11, 1], "V2 R5.11.1"),
            ("V2.0.12", 2, &[0, 12], "V2.0.12"),
            ("v3 r0.40.4", 3, &[0, 40, 4], "V3 R0.40.4"),
            ("  V3   R 0.40.4 ", 3, &[0, 40, 4], "V3 R0.40.4"),
            ("V 3R0.40.4", 3, &[0, 40, 4], "V3 R0.40.4"),
            ("2.0.12", 2, &[0, 12], "V2.0.12"),
            ("V3", 3, &[], "V3"),
            ("V3 R1.2.3.4", 3, &[1, 2, 3, 4], "V3 R1.2.3.4"),
        ];
        for &(s, version, parts, shown) in cases {
            let v = parse(s);
            assert_eq!((v.version(), v.parts()), (version, parts), "{s}");
            assert_eq!(v.to_string(), shown, "{s}");
        }
    }

    #[test]
    fn garbage_is_refused() {
        for s in [
            "",
            "V",
            "R0.40.4",
            "V3 R",
            "V3 R0..4",
            "V3 R0.40.4.",
            "V3 R0.40.4-beta",
            "V3 X0.40.4",
            "V3 R1.2.3.4.5",
            "V99999999999 R0",
            "V3 R0.99999999999",
            "V3.0 R1",
            "V٣ R0.40.4",
            "V3 R0.40.4 build 7",
        ] {
            let e = s.parse::<FirmwareVersion>().unwrap_err();
            assert!(
                e.to_string().starts_with("unparsable firmware version"),
                "{s}: {e}"
            );
        }
    }

    #[test]
    fn ordering_is_numeric() {
        assert!(parse("V3 R0.40.10") > parse("V3 R0.40.9"));
        assert!(parse("V3 R1.0.0") > parse("V3 R0.99.99"));
        assert!(parse("V4") > parse("V3 R9.9.9"));
        assert_eq!(parse("V2.0"), parse("V2.0.0"));
        assert_eq!(parse("V2R5.11.01"), parse("V2 R5.11.1"));
    }

    #[test]
    fn defaults_from_the_field() {
        let policy = FirmwarePolicy::default();
        let cases: &[(DeviceType, &str, bool)] = &[
            (OpenStageHfa, "V3 R0.40.4", true),
            (OpenStageHfa, "V3 R0.40.5", true),
            (OpenStageHfa, "V3 R1.0.0", true),
            (OpenStageHfa, "V3 R0.39.0", false),
            (OpenStageHfa, "V2 R9.9.9", false),
            (DeskPhoneIpHfa, "V3R0.40.4", true),
            (DeskPhoneIpHfa, "V3R0.40.3", false),
            (DeskPhoneCpHfa, "V1 R2.8.0", true),
            (DeskPhoneCpHfa, "V1 R2.7.99", false),
            (MyPortalToGoAndroid, "V2R2.26.19", true),
            (MyPortalToGoAndroid, "V2R2.26.18", false),
            (MyPortalToGoAndroid, "V2R3.0.0", true),
            (MyPortalToGoIos, "V2R5.11.01", true),
            (MyPortalToGoIos, "V2R5.11.1", true),
            (MyPortalToGoIos, "V2R5.10.99", false),
            (MyPortalAtWork, "V2.0.12", false),
            (MyPortalAtWork, "V2.0.11", false),
            (MyPortalAtWork, "V2.0.13", true),
            (MyPortalAtWork, "V2.1", true),
            (SipDevice, "V0", true),
        ];
        for &(device, version, ok) in cases {
            assert_eq!(
                policy.check(device, version).is_ok(),
                ok,
                "{device} {version}"
            );
        }
    }

    #[test]
    fn refusals_say_why() {
        let policy = FirmwarePolicy::default();
        let msg = |d, v| policy.check(d, v).unwrap_err().to_string();
        assert_eq!(
            msg(OpenStageHfa, "V3 R0.39.0"),
            "V3 R0.39.0 is older than the minimum V3 R0.40.4 for OpenStage HFA"
        );
        assert_eq!(
            msg(MyPortalAtWork, "V2.0.12"),
            "V2.0.12 is not newer than V2.0.12, which myPortal @work must exceed"
        );
        assert_eq!(
            msg(SipDevice, "latest"),
            "unparsable firmware version \"latest\": expected a version number like V3"
        );
    }

    #[test]
    fn defaults_equal_their_text() {
        let policy = FirmwarePolicy::default();
        for (device, text) in [
            (OpenStageHfa, ">= V3 R0.40.4"),
            (DeskPhoneIpHfa, ">= V3 R0.40.4"),
            (DeskPhoneCpHfa, ">= V1 R2.8.0"),
            (MyPortalToGoAndroid, ">= V2R2.26.19"),
            (MyPortalToGoIos, "V2R5.11.01"),
            (MyPortalAtWork, "> V2.0.12"),
        ] {
            let want: Minimum = text.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(policy.minimum(device), Some(want), "{device}");
        }
        assert_eq!(policy.minimum(SipDevice), None);
        assert_eq!(
            policy
                .minimum(OpenStageHfa)
                .map(|m| m.to_string())
                .as_deref(),
            Some(">= V3 R0.40.4")
        );
    }

    #[test]
    fn overrides() {
        let mut policy = FirmwarePolicy::default();
        policy
            .apply_override("openstage_hfa", "V3 R1.0.0")
            .unwrap_or_else(|e| panic!("{e}"));
        policy
            .apply_override("sip_device", "> V1.2")
            .unwrap_or_else(|e| panic!("{e}"));
        policy
            .apply_override("myportal_at_work", "none")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(policy.check(OpenStageHfa, "V3 R0.40.4").is_err());
        assert!(policy.check(SipDevice, "V1.2").is_err());
        assert!(policy.check(SipDevice, "V1.2.1").is_ok());
        assert!(policy.check(MyPortalAtWork, "V1").is_ok());
        assert!(matches!(
            policy.apply_override("fax", "V1"),
            Err(FirmwarePolicyError::DeviceType(_))
        ));
        assert!(matches!(
            policy.apply_override("sip_device", ">= soon"),
            Err(FirmwarePolicyError::Version(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips(s in "\\PC{0,24}") {
            if let Ok(v) = s.parse::<FirmwareVersion>() {
                proptest::prop_assert_eq!(v.to_string().parse::<FirmwareVersion>(), Ok(v));
            }
        }

        #[test]
        fn generated_versions_parse(version in 0u32..100, parts in proptest::collection::vec(0u32..1000, 0..=4), r in proptest::bool::ANY) {
            let dotted = parts.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
            let text = match (r, parts.is_empty()) {
                (true, _) => format!("V{version} R{dotted}"),
                (false, true) => format!("V{version}"),
                (false, false) => format!("V{version}.{dotted}"),
            };
            if r && parts.is_empty() {
                proptest::prop_assert!(text.parse::<FirmwareVersion>().is_err());
            } else {
                let v: FirmwareVersion = text.parse().map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}")))?;
                proptest::prop_assert_eq!(v.version(), version);
                proptest::prop_assert_eq!(v.parts(), &parts[..]);
            }
        }
    }
}
