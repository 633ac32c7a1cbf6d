//! The password policy for devices: when a device password is strong enough for Internet
//! registration through the SBC.
//!
//! Invariant: [`PasswordPolicy::check`] evaluates every guideline and reports all that are not
//! met ([`WeakPassword::unmet`]), so the administrator sees the whole list at once; it accepts
//! any input (empty, huge, any Unicode) without panicking. The number and MAC rules hold under
//! every policy; the rest is configurable.

use std::fmt;

use super::MacAddress;

/// Common passwords, one per line, lower case (`#` starts a comment); see the file's header
/// for its provenance.
const COMMON_PASSWORDS: &str = include_str!("common-passwords.txt");

/// Shortest candidate the "common password" check tries after stripping digits and symbols.
const MIN_STRIPPED_LEN: usize = 4;

/// One rule of the password policy, as shown to the administrator when it is not met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Guideline {
    /// At least this many characters.
    MinLength(usize),
    /// At most this many characters.
    MaxLength(usize),
    /// Characters of at least this many of the four classes: lower-case letters, upper-case
    /// letters, digits, other characters.
    CharacterClasses(u8),
    /// Not containing the device's internal number.
    NoDeviceNumber,
    /// Not containing the device's MAC address (any case, any separators) or its
    /// device-specific half (the last six hex digits, often printed as a default password).
    NoMacAddress,
    /// Not a common password, in any case, nor one with digits or symbols appended.
    NotCommon,
    /// No character repeated more than this many times in a row.
    NoRepeats(usize),
    /// No ascending or descending run (`1234`, `abcd`, `dcba`) longer than this.
    NoSequences(usize),
    /// Only characters the password store accepts (SASLprep, RFC 4013: no control characters,
    /// no unassigned code points, consistent text direction).
    Storable,
}

impl fmt::Display for Guideline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Guideline::MinLength(n) => write!(f, "at least {n} characters"),
            Guideline::MaxLength(n) => write!(f, "at most {n} characters"),
            Guideline::CharacterClasses(n) => write!(
                f,
                "characters of at least {n} of the classes lower-case letters, \
                 upper-case letters, digits and other characters"
            ),
            Guideline::NoDeviceNumber => f.write_str("must not contain the device's number"),
            Guideline::NoMacAddress => f.write_str("must not contain the device's mac address"),
            Guideline::NotCommon => f.write_str("must not be a common password"),
            Guideline::NoRepeats(n) => {
                write!(f, "no character more than {n} times in a row")
            }
            Guideline::NoSequences(n) => write!(
                f,
                "no ascending or descending run of more than {n} characters (like 1234 or abcd)"
            ),
            Guideline::Storable => {
                f.write_str("no control, unassigned or mixed-direction characters")
            }
        }
    }
}

/// A password that does not meet the policy, with every guideline it misses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the password is not strong enough: {}", join(unmet))]
pub struct WeakPassword {
    /// The guidelines not met, in the policy's order; never empty.
    pub unmet: Vec<Guideline>,
}

fn join(unmet: &[Guideline]) -> String {
    unmet
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The configurable part of the password policy.
///
/// Defaults: 12 to 128 characters from at least 3 of 4 classes, no common password, no
/// character 3 times in a row, no run like `1234`. Why 12: NIST SP 800-63B-4 §3.1.1.2 asks 15
/// characters for a password that is the only factor and 8 otherwise; a device password is the
/// only factor, but it is typed on a phone keypad, so 12 characters, three classes and the
/// blocklist and pattern rules are the compromise (a random 12-character password of three
/// classes has well over 60 bits). The upper bound keeps hashing and checking cheap; it is far
/// above what a phone's menu takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswordPolicy {
    /// Fewest characters (Unicode scalar values).
    pub min_length: usize,
    /// Most characters (Unicode scalar values).
    pub max_length: usize,
    /// Fewest character classes out of 4 (0 turns the rule off).
    pub min_classes: u8,
    /// Most times one character may repeat in a row (`None`: no limit).
    pub max_repeat: Option<usize>,
    /// Longest allowed ascending or descending run of letters or digits (`None`: no limit).
    pub max_sequence: Option<usize>,
    /// Refuse passwords from the embedded common-password list.
    pub reject_common: bool,
}

impl Default for PasswordPolicy {
    fn default() -> PasswordPolicy {
        PasswordPolicy {
            min_length: 12,
            max_length: 128,
            min_classes: 3,
            max_repeat: Some(2),
            max_sequence: Some(3),
            reject_common: true,
        }
    }
}

/// Checks `password` against the default policy; see [`PasswordPolicy::check`].
pub fn check_strength(
    password: &str,
    number: &str,
    mac: Option<MacAddress>,
) -> Result<(), WeakPassword> {
    PasswordPolicy::default().check(password, number, mac)
}

impl PasswordPolicy {
    /// Checks `password` of the device with internal `number` (and `mac`, for phones); the
    /// error lists every guideline not met.
    pub fn check(
        &self,
        password: &str,
        number: &str,
        mac: Option<MacAddress>,
    ) -> Result<(), WeakPassword> {
        let mut unmet = Vec::new();
        let chars: Vec<char> = password.chars().collect();
        let lower = password.to_lowercase();
        if chars.len() < self.min_length {
            unmet.push(Guideline::MinLength(self.min_length));
        }
        if chars.len() > self.max_length {
            unmet.push(Guideline::MaxLength(self.max_length));
        }
        if classes(&chars) < self.min_classes {
            unmet.push(Guideline::CharacterClasses(self.min_classes));
        }
        let number = number.trim();
        if !number.is_empty() && lower.contains(&number.to_lowercase()) {
            unmet.push(Guideline::NoDeviceNumber);
        }
        if mac.is_some_and(|mac| contains_mac(&lower, mac)) {
            unmet.push(Guideline::NoMacAddress);
        }
        if self.reject_common && is_common(&lower) {
            unmet.push(Guideline::NotCommon);
        }
        if let Some(max) = self.max_repeat
            && longest_repeat(&chars) > max
        {
            unmet.push(Guideline::NoRepeats(max));
        }
        if let Some(max) = self.max_sequence
            && longest_sequence(&chars) > max
        {
            unmet.push(Guideline::NoSequences(max));
        }
        if stringprep::saslprep(password).is_err() {
            unmet.push(Guideline::Storable);
        }
        if unmet.is_empty() {
            Ok(())
        } else {
            Err(WeakPassword { unmet })
        }
    }
}

/// How many of the four classes (lower, upper, digit, other) occur.
fn classes(chars: &[char]) -> u8 {
    let mut seen = [false; 4];
    for &c in chars {
        let class = if c.is_lowercase() {
            0
        } else if c.is_uppercase() {
            1
        } else if c.is_numeric() {
            2
        } else {
            3
        };
        seen[class] = true;
    }
    seen.iter().map(|&s| u8::from(s)).sum()
}

fn contains_mac(lower: &str, mac: MacAddress) -> bool {
    let squeezed: String = lower
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.' | ' '))
        .collect();
    let hex = mac.hex();
    // The device-specific half (NIC part) is what labels and default passwords show.
    let nic = hex.get(6..).unwrap_or(&hex);
    squeezed.contains(&hex) || squeezed.contains(nic)
}

fn is_common(lower: &str) -> bool {
    let strip = |c: char| c.is_ascii_digit() || c.is_ascii_punctuation() || c == ' ';
    let trailing = lower.trim_end_matches(strip);
    let both = trailing.trim_start_matches(strip);
    let listed = |candidate: &str| {
        COMMON_PASSWORDS
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .any(|l| l == candidate)
    };
    listed(lower)
        || [trailing, both]
            .into_iter()
            .any(|c| c.chars().count() >= MIN_STRIPPED_LEN && listed(c))
}

/// The longest run of one character (case-insensitive).
fn longest_repeat(chars: &[char]) -> usize {
    longest_run(chars, |a, b| fold(a) == fold(b))
}

/// The longest ascending or descending run of ASCII letters (case-insensitive) or digits.
fn longest_sequence(chars: &[char]) -> usize {
    let step = |a: char, b: char, d: i32| {
        let (a, b) = (fold(a), fold(b));
        let same_kind = (a.is_ascii_digit() && b.is_ascii_digit())
            || (a.is_ascii_lowercase() && b.is_ascii_lowercase());
        same_kind && b as i32 - a as i32 == d
    };
    longest_run(chars, |a, b| step(a, b, 1)).max(longest_run(chars, |a, b| step(a, b, -1)))
}

fn fold(c: char) -> char {
    c.to_ascii_lowercase()
}

/// The longest stretch in which every neighbouring pair satisfies `linked`.
fn longest_run(chars: &[char], linked: impl Fn(char, char) -> bool) -> usize {
    let mut best = usize::from(!chars.is_empty());
    let mut run = best;
    for pair in chars.windows(2) {
        run = if linked(pair[0], pair[1]) { run + 1 } else { 1 };
        best = best.max(run);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::Guideline::*;
    use super::*;

    const MAC: MacAddress = MacAddress([0x00, 0x1a, 0xe8, 0x3c, 0x4d, 0x5e]);

    fn unmet(password: &str) -> Vec<Guideline> {
        match check_strength(password, "4711", Some(MAC)) {
            Ok(()) => vec![],
            Err(e) => e.unmet,
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, &[Guideline])] = &[
            ("Tr0mbone-Kiwi", &[]),
            ("Correct horse battery staple", &[]),
            ("Grüße-aus-Köln", &[]),
            ("ŁódźWęgiel#77x", &[]),
            ("", &[MinLength(12), CharacterClasses(3)]),
            ("Sh0rt!", &[MinLength(12)]),
            ("onlylowercaseletters", &[CharacterClasses(3)]),
            ("Kiwi4711Banane", &[NoDeviceNumber]),
            ("x001AE83C4D5Ey", &[NoMacAddress]),
            ("Ab!00:1a:e8:3c:4d:5e", &[NoMacAddress]),
            ("Ab!00-1A-E8-3C-4D-5E", &[NoMacAddress]),
            ("Tromb-3c4d5e-X", &[NoMacAddress]),
            ("Password2024!", &[NotCommon]),
            ("PASSWORD!2024", &[NotCommon]),
            ("2024!Passwort!", &[NotCommon]),
            ("Qwertzuiop12!", &[NotCommon]),
            ("Trommmbone-Kiwi", &[NoRepeats(2)]),
            ("Tromb0ne-Kiwi-AAA", &[NoRepeats(2)]),
            ("Tromb0ne-1234-Kiwi", &[NoSequences(3)]),
            ("Tromb0ne-DcBa-Kiwi", &[NoSequences(3)]),
            ("Tromb0ne-123-Kiwi", &[]),
            ("Tromb0ne\u{7}Kiwi", &[Storable]),
            (
                "aaaa",
                &[MinLength(12), CharacterClasses(3), NotCommon, NoRepeats(2)],
            ),
            (
                "1234",
                &[
                    MinLength(12),
                    CharacterClasses(3),
                    NotCommon,
                    NoSequences(3),
                ],
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter(|(p, want)| unmet(p) != *want)
            .map(|(p, want)| format!("{p:?}: got {:?}, want {want:?}", unmet(p)))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn every_guideline_is_listed_at_once() {
        let err = check_strength("4711\u{0}", "4711", None).unwrap_err();
        assert_eq!(
            err.unmet,
            [MinLength(12), CharacterClasses(3), NoDeviceNumber, Storable]
        );
        assert_eq!(
            err.to_string(),
            "the password is not strong enough: at least 12 characters; characters of at least \
             3 of the classes lower-case letters, upper-case letters, digits and other \
             characters; must not contain the device's number; no control, unassigned or \
             mixed-direction characters"
        );
    }

    #[test]
    fn the_policy_is_configurable() {
        let lax = PasswordPolicy {
            min_length: 4,
            max_length: 8,
            min_classes: 0,
            max_repeat: None,
            max_sequence: None,
            reject_common: false,
        };
        assert_eq!(lax.check("aaaa", "", None), Ok(()));
        assert_eq!(lax.check("1234", "", None), Ok(()));
        assert_eq!(
            lax.check("aaaaaaaaa", "", None).unwrap_err().unmet,
            [MaxLength(8)]
        );
        // The device number and MAC rules hold under any policy.
        assert_eq!(
            lax.check("x4711", "4711", None).unwrap_err().unmet,
            [NoDeviceNumber]
        );
        // An empty number is no rule.
        assert_eq!(lax.check("x4711", " ", None), Ok(()));
    }

    #[test]
    fn the_list_is_lower_case_and_usable() {
        let entries: Vec<&str> = COMMON_PASSWORDS
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert!(entries.len() >= 300, "{}", entries.len());
        for e in entries {
            assert_eq!(e, e.trim().to_lowercase(), "{e:?}");
            assert!(!e.is_empty());
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(password in ".{0,40}", number in "[0-9]{0,6}", mac in proptest::option::of(proptest::array::uniform6(0u8..))) {
            let _ = check_strength(&password, &number, mac.map(MacAddress));
        }

        #[test]
        fn refusals_are_never_empty(password in "\\PC{0,20}") {
            if let Err(e) = check_strength(&password, "", None) {
                proptest::prop_assert!(!e.unmet.is_empty());
            }
        }
    }
}
