//! Class of service and toll-fraud rules: which numbers a device may call or forward to.
//!
//! Invariant: emergency numbers can always be called (never forwarded to); a device on the
//! Internet never reaches premium-rate or international numbers, nor forwards to them, whatever
//! its class of service, unless [`CallPolicy::external`] is loosened explicitly; a number that
//! cannot be classified is refused, never guessed.
//!
//! The default dial plan is the German one the field uses (trunk prefix `0`, national `0`,
//! international `00`/`+`, country code 49, premium-rate `0900`/`0137`/`118`, emergency
//! `110`/`112`, and `911`). A number is classified after its trunk prefix: `0 0900 ...` is
//! premium-rate, `0 00 44 ...` international, `0 089 ...` national, `0 1234` local; a number
//! without the trunk prefix is internal; `+49 900 ...` is premium-rate (own country code).

use std::fmt;

use super::networks::Origin;

/// How far a device may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reach {
    /// Internal numbers only.
    InternalOnly,
    /// Also local numbers (no area code).
    Local,
    /// Also national numbers.
    National,
    /// Also international numbers.
    International,
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reach::InternalOnly => "internal_only",
            Reach::Local => "local",
            Reach::National => "national",
            Reach::International => "international",
        })
    }
}

/// A device's class of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassOfService {
    /// How far it may call.
    pub reach: Reach,
    /// Premium-rate numbers allowed (within its reach).
    pub premium_rate: bool,
    /// Call forwarding to external numbers allowed (within its reach).
    pub forward_external: bool,
}

impl ClassOfService {
    /// The least a remote device needs: internal calls only, no premium rate, no forwarding
    /// outside.
    pub const INTERNAL_ONLY: ClassOfService = ClassOfService {
        reach: Reach::InternalOnly,
        premium_rate: false,
        forward_external: false,
    };
}

/// What a dialled number is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NumberClass {
    /// An emergency number.
    Emergency,
    /// An internal number (no trunk prefix).
    Internal,
    /// An external number without area code.
    Local,
    /// An external number with the national prefix.
    National,
    /// An external number with an international prefix.
    International,
    /// A premium-rate or service number.
    PremiumRate,
}

impl NumberClass {
    /// The reach needed to call it (premium rate needs national and the premium flag).
    fn reach(self) -> Reach {
        match self {
            NumberClass::Emergency | NumberClass::Internal => Reach::InternalOnly,
            NumberClass::Local => Reach::Local,
            NumberClass::National | NumberClass::PremiumRate => Reach::National,
            NumberClass::International => Reach::International,
        }
    }
}

impl fmt::Display for NumberClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NumberClass::Emergency => "emergency",
            NumberClass::Internal => "internal",
            NumberClass::Local => "local",
            NumberClass::National => "national",
            NumberClass::International => "international",
            NumberClass::PremiumRate => "premium-rate",
        })
    }
}

/// A dialled string that is not a number this plan can classify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{number:?} is not a dialable number: {reason}")]
pub struct InvalidNumber {
    /// The dialled text.
    pub number: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The numbering plan: prefixes that tell what a number is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialPlan {
    /// Seizes an outside line; numbers without it are internal (empty: every number is
    /// external).
    pub trunk_prefix: String,
    /// Starts a national number (after the trunk prefix).
    pub national_prefix: String,
    /// Start an international number (after the trunk prefix; `+` also without it).
    pub international_prefixes: Vec<String>,
    /// Own country code: `+<cc>...` and `00<cc>...` are national numbers, checked for
    /// premium rate as such.
    pub country_code: Option<String>,
    /// Premium-rate and service numbers (after the trunk prefix, in national form).
    pub premium_prefixes: Vec<String>,
    /// Emergency numbers (exact, with or without the trunk prefix).
    pub emergency_numbers: Vec<String>,
}

impl Default for DialPlan {
    fn default() -> DialPlan {
        let v = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        DialPlan {
            trunk_prefix: "0".to_owned(),
            national_prefix: "0".to_owned(),
            international_prefixes: v(&["00", "+"]),
            country_code: Some("49".to_owned()),
            premium_prefixes: v(&["0900", "0137", "0138", "118"]),
            emergency_numbers: v(&["112", "110", "911"]),
        }
    }
}

/// Separators people type in numbers; removed before classifying.
const SEPARATORS: &[char] = &[' ', '-', '/', '.', '(', ')'];

impl DialPlan {
    /// Classifies a dialled number.
    pub fn classify(&self, dialled: &str) -> Result<NumberClass, InvalidNumber> {
        let invalid = |reason| InvalidNumber {
            number: dialled.to_owned(),
            reason,
        };
        let number: String = dialled
            .chars()
            .filter(|c| !SEPARATORS.contains(c))
            .collect();
        let (plus, digits) = match number.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, number.as_str()),
        };
        if digits.is_empty() {
            return Err(invalid("no digits"));
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid(
                "only digits and a leading + are dialable (feature codes are not calls)",
            ));
        }
        if !plus {
            let bare = non_empty_strip(digits, &self.trunk_prefix).unwrap_or(digits);
            if self
                .emergency_numbers
                .iter()
                .any(|e| e == digits || e == bare)
            {
                return Ok(NumberClass::Emergency);
            }
        }
        let rest = if plus {
            number.as_str()
        } else if self.trunk_prefix.is_empty() {
            // No line-seize code in this plan: every number is external.
            digits
        } else {
            match non_empty_strip(digits, &self.trunk_prefix) {
                Some(rest) => rest,
                None => return Ok(NumberClass::Internal),
            }
        };
        if rest.is_empty() {
            return Err(invalid("only the trunk prefix"));
        }
        if let Some(international) = self
            .international_prefixes
            .iter()
            .find_map(|p| non_empty_strip(rest, p))
        {
            if let Some(national) = self
                .country_code
                .as_deref()
                .and_then(|cc| non_empty_strip(international, cc))
            {
                // Own country: classify the national form (`+49 900...` is `0900...`).
                return Ok(self.classify_national(&format!("{}{national}", self.national_prefix)));
            }
            if international.is_empty() {
                return Err(invalid("no number after the international prefix"));
            }
            return Ok(NumberClass::International);
        }
        if plus {
            return Err(invalid("a + without an international prefix in the plan"));
        }
        Ok(self.classify_national(rest))
    }

    /// Classifies a number after the trunk prefix that is not international.
    fn classify_national(&self, rest: &str) -> NumberClass {
        if self
            .premium_prefixes
            .iter()
            .any(|p| non_empty_strip(rest, p).is_some())
        {
            NumberClass::PremiumRate
        } else if non_empty_strip(rest, &self.national_prefix).is_some() {
            NumberClass::National
        } else {
            NumberClass::Local
        }
    }
}

/// `s` without `prefix`, if `prefix` is non-empty and starts `s`.
fn non_empty_strip<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() {
        None
    } else {
        s.strip_prefix(prefix)
    }
}

/// What devices on the Internet may reach, whatever their class of service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExternalLimits {
    /// Premium-rate numbers allowed (default: no).
    pub premium_rate: bool,
    /// International numbers allowed (default: no).
    pub international: bool,
}

/// Why a call or forwarding is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallRefusal {
    /// The number cannot be classified.
    #[error(transparent)]
    Invalid(#[from] InvalidNumber),
    /// The class of service does not reach that far.
    #[error("class of service {reach} does not allow {class} numbers")]
    OutOfReach {
        /// The device's reach.
        reach: Reach,
        /// The number's class.
        class: NumberClass,
    },
    /// Premium-rate numbers are not allowed for the device.
    #[error("premium-rate numbers are not allowed for this device")]
    PremiumRate,
    /// The device is on the Internet and the number is of a class barred there.
    #[error("devices on the internet may not reach {0} numbers")]
    BarredFromInternet(NumberClass),
    /// Forwarding to external numbers is not allowed for the device.
    #[error("call forwarding to external numbers is not allowed for this device")]
    ForwardingExternal,
    /// Calls are never forwarded to emergency numbers.
    #[error("calls cannot be forwarded to an emergency number")]
    ForwardingToEmergency,
}

/// The numbering plan and the limits for devices on the Internet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallPolicy {
    /// How numbers are classified.
    pub plan: DialPlan,
    /// What devices on the Internet may reach regardless of class of service.
    pub external: ExternalLimits,
}

impl CallPolicy {
    /// Whether a device with `cos`, registered from `origin`, may call `target` (or, with
    /// `is_forwarding`, forward calls to it); on success the number's class.
    pub fn authorize_call(
        &self,
        cos: ClassOfService,
        origin: Origin,
        target: &str,
        is_forwarding: bool,
    ) -> Result<NumberClass, CallRefusal> {
        let class = self.plan.classify(target)?;
        match class {
            NumberClass::Emergency if is_forwarding => {
                return Err(CallRefusal::ForwardingToEmergency);
            }
            NumberClass::Emergency | NumberClass::Internal => return Ok(class),
            _ => {}
        }
        if origin == Origin::External {
            let barred = match class {
                NumberClass::PremiumRate => !self.external.premium_rate,
                NumberClass::International => !self.external.international,
                _ => false,
            };
            if barred {
                return Err(CallRefusal::BarredFromInternet(class));
            }
        }
        if class.reach() > cos.reach {
            return Err(CallRefusal::OutOfReach {
                reach: cos.reach,
                class,
            });
        }
        if class == NumberClass::PremiumRate && !cos.premium_rate {
            return Err(CallRefusal::PremiumRate);
        }
        if is_forwarding && !cos.forward_external {
            return Err(CallRefusal::ForwardingExternal);
        }
        Ok(class)
    }
}

/// [`CallPolicy::authorize_call`] under the default policy.
pub fn authorize_call(
    cos: ClassOfService,
    origin: Origin,
    target: &str,
    is_forwarding: bool,
) -> Result<NumberClass, CallRefusal> {
    CallPolicy::default().authorize_call(cos, origin, target, is_forwarding)
}

#[cfg(test)]
mod tests {
    use super::NumberClass::*;
    use super::*;

    #[test]
    fn classify_table() {
        let plan = DialPlan::default();
        let cases: &[(&str, Result<NumberClass, ()>)] = &[
            ("112", Ok(Emergency)),
            ("0112", Ok(Emergency)),
            ("110", Ok(Emergency)),
            ("911", Ok(Emergency)),
            ("100", Ok(Internal)),
            ("4711", Ok(Internal)),
            ("1120", Ok(Internal)),
            ("11833", Ok(Internal)),
            ("01234567", Ok(Local)),
            ("0 089 123456", Ok(National)),
            ("0(089)123-456", Ok(National)),
            ("0 0900 123456", Ok(PremiumRate)),
            ("0 0137 123456", Ok(PremiumRate)),
            ("0 11833", Ok(PremiumRate)),
            ("0 0044 20 1234", Ok(International)),
            ("+44 20 1234", Ok(International)),
            ("+49 89 123456", Ok(National)),
            ("+49 900 123456", Ok(PremiumRate)),
            ("0 0049 900 123456", Ok(PremiumRate)),
            ("0 0049 1234", Ok(National)),
            ("", Err(())),
            ("0", Err(())),
            ("+", Err(())),
            ("0 00", Err(())),
            ("*21*0900123", Err(())),
            ("#31#", Err(())),
            ("12a4", Err(())),
            ("++44", Err(())),
            ("४७११", Err(())),
        ];
        for (number, want) in cases {
            assert_eq!(plan.classify(number).map_err(|_| ()), *want, "{number:?}");
        }
    }

    fn cos(reach: Reach, premium_rate: bool, forward_external: bool) -> ClassOfService {
        ClassOfService {
            reach,
            premium_rate,
            forward_external,
        }
    }

    #[test]
    fn authorize_table() {
        use CallRefusal as R;
        use Origin::*;
        let all = cos(Reach::International, true, true);
        let national = cos(Reach::National, false, false);
        type Case = (
            ClassOfService,
            Origin,
            &'static str,
            bool,
            Result<NumberClass, R>,
        );
        let cases: &[Case] = &[
            // Emergency always, but never as a forwarding target.
            (
                ClassOfService::INTERNAL_ONLY,
                External,
                "112",
                false,
                Ok(Emergency),
            ),
            (
                ClassOfService::INTERNAL_ONLY,
                External,
                "0110",
                false,
                Ok(Emergency),
            ),
            (all, Internal, "112", true, Err(R::ForwardingToEmergency)),
            // Internal numbers always, also forwarding.
            (
                ClassOfService::INTERNAL_ONLY,
                External,
                "4711",
                true,
                Ok(NumberClass::Internal),
            ),
            (
                ClassOfService::INTERNAL_ONLY,
                Internal,
                "0 1234",
                false,
                Err(R::OutOfReach {
                    reach: Reach::InternalOnly,
                    class: Local,
                }),
            ),
            (national, Internal, "0 089 1234", false, Ok(National)),
            (
                national,
                Internal,
                "0 00 44 1234",
                false,
                Err(R::OutOfReach {
                    reach: Reach::National,
                    class: International,
                }),
            ),
            (
                national,
                Internal,
                "0 0900 1234",
                false,
                Err(R::PremiumRate),
            ),
            (
                national,
                Internal,
                "0 089 1234",
                true,
                Err(R::ForwardingExternal),
            ),
            (all, Internal, "0 0900 1234", true, Ok(PremiumRate)),
            (all, Internal, "+44 20 1234", true, Ok(International)),
            // From the Internet: never premium rate or international, whatever the class.
            (
                all,
                External,
                "0 0900 1234",
                false,
                Err(R::BarredFromInternet(PremiumRate)),
            ),
            (
                all,
                External,
                "+49 900 1234",
                false,
                Err(R::BarredFromInternet(PremiumRate)),
            ),
            (
                all,
                External,
                "0 11833",
                true,
                Err(R::BarredFromInternet(PremiumRate)),
            ),
            (
                all,
                External,
                "+44 20 1234",
                false,
                Err(R::BarredFromInternet(International)),
            ),
            (
                all,
                External,
                "0 00 1 555 1234",
                true,
                Err(R::BarredFromInternet(International)),
            ),
            (all, External, "0 089 1234", true, Ok(National)),
        ];
        let policy = CallPolicy::default();
        for (cos, origin, target, fwd, want) in cases {
            assert_eq!(
                &policy.authorize_call(*cos, *origin, target, *fwd),
                want,
                "{cos:?} {origin:?} {target} forwarding={fwd}"
            );
        }
        assert!(matches!(
            authorize_call(all, Internal, "*21#", false),
            Err(R::Invalid(_))
        ));
    }

    #[test]
    fn the_internet_limits_are_configurable() {
        let mut policy = CallPolicy::default();
        policy.external.international = true;
        let all = cos(Reach::International, true, true);
        assert_eq!(
            policy.authorize_call(all, Origin::External, "+44 20 1234", false),
            Ok(International)
        );
        assert!(
            policy
                .authorize_call(all, Origin::External, "0 0900 1234", false)
                .is_err()
        );
        // Configurable prefixes.
        policy.plan.premium_prefixes = vec!["0180".to_owned()];
        policy.external.premium_rate = false;
        assert_eq!(policy.plan.classify("0 0900 1"), Ok(National));
        assert_eq!(policy.plan.classify("0 0180 1"), Ok(PremiumRate));
    }

    #[test]
    fn messages() {
        assert_eq!(
            CallRefusal::BarredFromInternet(PremiumRate).to_string(),
            "devices on the internet may not reach premium-rate numbers"
        );
        assert_eq!(
            CallRefusal::OutOfReach {
                reach: Reach::Local,
                class: National
            }
            .to_string(),
            "class of service local does not allow national numbers"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(target in "\\PC{0,24}", fwd in proptest::bool::ANY) {
            let all = cos(Reach::International, true, true);
            let _ = authorize_call(all, Origin::External, &target, fwd);
        }

        #[test]
        fn external_never_reaches_premium_or_international(target in "[+0-9 ]{1,16}", fwd in proptest::bool::ANY) {
            let all = cos(Reach::International, true, true);
            if let Ok(class) = authorize_call(all, Origin::External, &target, fwd) {
                proptest::prop_assert!(class != PremiumRate && class != International);
            }
        }
    }
}
