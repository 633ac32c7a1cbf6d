//! What a caller asks for: the key policy, a CA request and a server-certificate request, and
//! the rules each field must follow before anything is generated.
//!
//! Invariant: `validate` is pure and runs before a key is generated or a serial number is
//! reserved, so a refused request costs nothing and burns no serial.

use std::net::IpAddr;

use time::UtcDateTime;

use crate::error::CertError;
use crate::serial::Serial;

/// RSA key lengths this crate generates.
pub const RSA_KEY_SIZES: [u32; 3] = [2048, 3072, 4096];

/// The signature algorithm of a certificate, which also fixes the kind of key generated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// sha256WithRSAEncryption (PKCS#1 v1.5), RSA key.
    RsaSha256,
    /// sha512WithRSAEncryption (PKCS#1 v1.5), RSA key.
    RsaSha512,
    /// ecdsa-with-SHA256, key on NIST P-256.
    EcdsaP256Sha256,
}

impl SignatureAlgorithm {
    /// Whether the key is RSA (and so `rsa_bits` applies).
    #[must_use]
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::RsaSha256 | Self::RsaSha512)
    }

    /// The name OpenSSL prints for this algorithm (`openssl x509 -text`).
    #[must_use]
    pub fn openssl_name(self) -> &'static str {
        match self {
            Self::RsaSha256 => "sha256WithRSAEncryption",
            Self::RsaSha512 => "sha512WithRSAEncryption",
            Self::EcdsaP256Sha256 => "ecdsa-with-SHA256",
        }
    }

    pub(crate) fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::RsaSha256 => &rcgen::PKCS_RSA_SHA256,
            Self::RsaSha512 => &rcgen::PKCS_RSA_SHA512,
            Self::EcdsaP256Sha256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

/// The configured minimum key length, set before any CA is created or imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicy {
    min_rsa_bits: u32,
}

impl KeyPolicy {
    /// A policy with this minimum RSA key length (2048, 3072 or 4096 bits).
    pub fn new(min_rsa_bits: u32) -> Result<Self, CertError> {
        if !RSA_KEY_SIZES.contains(&min_rsa_bits) {
            return Err(CertError::InvalidKeyPolicy(min_rsa_bits));
        }
        Ok(Self { min_rsa_bits })
    }

    /// The minimum RSA key length in bits.
    #[must_use]
    pub fn min_rsa_bits(&self) -> u32 {
        self.min_rsa_bits
    }

    /// Checks a key to be generated: RSA lengths must be supported and not below the minimum;
    /// P-256 is held to the same minimum through its RSA-equivalent strength (3072 bits,
    /// NIST SP 800-57 Part 1 Table 2), so a 4096-bit minimum refuses it.
    pub fn check_request(
        &self,
        signature: SignatureAlgorithm,
        rsa_bits: u32,
    ) -> Result<(), CertError> {
        let bits = if signature.is_rsa() {
            rsa_bits
        } else {
            P256_RSA_EQUIVALENT_BITS
        };
        if bits < self.min_rsa_bits {
            return Err(CertError::KeyTooShort {
                bits,
                min_bits: self.min_rsa_bits,
            });
        }
        if signature.is_rsa() && !RSA_KEY_SIZES.contains(&rsa_bits) {
            return Err(CertError::UnsupportedKeySize(rsa_bits));
        }
        Ok(())
    }
}

impl Default for KeyPolicy {
    /// A 2048-bit minimum.
    fn default() -> Self {
        Self { min_rsa_bits: 2048 }
    }
}

/// RSA-equivalent strength of a P-256 key (NIST SP 800-57 Part 1 Rev. 5, Table 2).
pub(crate) const P256_RSA_EQUIVALENT_BITS: u32 = 3072;
/// RSA-equivalent strength of a P-384 key (same table).
pub(crate) const P384_RSA_EQUIVALENT_BITS: u32 = 7680;

/// A certificate's subject distinguished name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// ISO 3166 two-letter country code, e.g. `DE`.
    pub country: String,
    /// Organisation (O).
    pub organisation: String,
    /// Organisational unit (OU).
    pub unit: String,
    /// Common name (CN).
    pub common_name: String,
}

/// Upper bound of O, OU and CN (RFC 5280 Appendix A, `ub-organization-name` and friends).
const UB_NAME: usize = 64;

impl Subject {
    /// Checks every field: a two-letter country, and O, OU and CN of 1 to 64 characters
    /// without control characters.
    pub fn validate(&self) -> Result<(), CertError> {
        if self.country.len() != 2 || !self.country.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(CertError::InvalidSubject {
                field: "country",
                value: self.country.clone(),
                reason: "it must be two letters (iso 3166)",
            });
        }
        for (field, value) in [
            ("organisation", &self.organisation),
            ("unit", &self.unit),
            ("common name", &self.common_name),
        ] {
            let reason = if value.trim().is_empty() {
                "it must not be empty"
            } else if value.chars().count() > UB_NAME {
                "it must be at most 64 characters"
            } else if value.chars().any(char::is_control) {
                "it must not contain control characters"
            } else {
                continue;
            };
            return Err(CertError::InvalidSubject {
                field,
                value: value.clone(),
                reason,
            });
        }
        Ok(())
    }

    pub(crate) fn to_rcgen(&self) -> Result<rcgen::DistinguishedName, CertError> {
        let mut dn = rcgen::DistinguishedName::new();
        // RFC 5280 Appendix A: countryName is a PrintableString of two characters.
        let country = rcgen::string::PrintableString::try_from(self.country.to_ascii_uppercase())
            .map_err(CertError::Generate)?;
        dn.push(
            rcgen::DnType::CountryName,
            rcgen::DnValue::PrintableString(country),
        );
        dn.push(rcgen::DnType::OrganizationName, self.organisation.as_str());
        dn.push(rcgen::DnType::OrganizationalUnitName, self.unit.as_str());
        dn.push(rcgen::DnType::CommonName, self.common_name.as_str());
        Ok(dn)
    }
}

/// A subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum San {
    /// An IPv4 or IPv6 address (iPAddress).
    Ip(IpAddr),
    /// A DNS name (dNSName); a leading `*.` wildcard label is allowed.
    Dns(String),
}

impl San {
    /// Checks a DNS name: labels of 1 to 63 letters, digits and hyphens, not starting or
    /// ending with a hyphen, at most 253 characters, optionally a leading `*.` (RFC 1123,
    /// RFC 6125 §6.4.3).
    pub fn validate(&self) -> Result<(), CertError> {
        let Self::Dns(name) = self else {
            return Ok(());
        };
        let bad = || CertError::InvalidDnsName(name.clone());
        let rest = name.strip_prefix("*.").unwrap_or(name);
        if rest.is_empty() || name.len() > 253 {
            return Err(bad());
        }
        for label in rest.split('.') {
            let ok = (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(bad());
            }
        }
        Ok(())
    }

    pub(crate) fn to_rcgen(&self) -> Result<rcgen::SanType, CertError> {
        Ok(match self {
            Self::Ip(ip) => rcgen::SanType::IpAddress(*ip),
            Self::Dns(name) => rcgen::SanType::DnsName(
                rcgen::string::Ia5String::try_from(name.as_str()).map_err(CertError::Generate)?,
            ),
        })
    }
}

/// A validity window in UTC; X.509 keeps whole seconds, so sub-second parts are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First moment the certificate is valid.
    pub not_before: UtcDateTime,
    /// Last moment the certificate is valid.
    pub not_after: UtcDateTime,
}

impl Validity {
    /// Checks that `not_before` is strictly before `not_after` (after dropping sub-seconds).
    pub fn validate(&self) -> Result<(), CertError> {
        let (nb, na) = (self.not_before_secs(), self.not_after_secs());
        if nb >= na {
            return Err(CertError::ValidityOrder {
                not_before: nb,
                not_after: na,
            });
        }
        Ok(())
    }

    pub(crate) fn not_before_secs(&self) -> UtcDateTime {
        truncate_secs(self.not_before)
    }

    pub(crate) fn not_after_secs(&self) -> UtcDateTime {
        truncate_secs(self.not_after)
    }

    pub(crate) fn contains(&self, inner: &Validity) -> bool {
        self.not_before_secs() <= inner.not_before_secs()
            && inner.not_after_secs() <= self.not_after_secs()
    }
}

fn truncate_secs(t: UtcDateTime) -> UtcDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// A request for a self-signed root CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRequest {
    /// The CA's name in the store: 1 to 64 characters, no blanks.
    pub name: String,
    /// A serial number never used before for any certificate.
    pub serial: Serial,
    /// The CA's signature algorithm; it also signs every server certificate of this CA.
    pub signature: SignatureAlgorithm,
    /// RSA modulus length (2048, 3072 or 4096); ignored for ECDSA.
    pub rsa_bits: u32,
    /// Validity window (UTC).
    pub validity: Validity,
    /// Subject (and, being self-signed, issuer) name.
    pub subject: Subject,
    /// Optional subject alternative names.
    pub san: Vec<San>,
}

/// Checks a CA name: 1 to 64 characters, no blanks (any Unicode white space) and no control
/// characters.
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && !name.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName(name.to_owned()))
    }
}

impl CaRequest {
    /// Checks every field against the rules and the key policy.
    pub fn validate(&self, policy: &KeyPolicy) -> Result<(), CertError> {
        validate_name(&self.name)?;
        policy.check_request(self.signature, self.rsa_bits)?;
        self.validity.validate()?;
        self.subject.validate()?;
        self.san.iter().try_for_each(San::validate)
    }
}

/// A request for a server certificate signed by a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRequest {
    /// A serial number never used before for any certificate.
    pub serial: Serial,
    /// Fixes the server's key: RSA (either RSA value) or P-256. The certificate itself is
    /// signed with the CA's algorithm, as only the CA's key can sign it.
    pub signature: SignatureAlgorithm,
    /// RSA modulus length (2048, 3072 or 4096); ignored for ECDSA.
    pub rsa_bits: u32,
    /// Validity window (UTC); it must lie inside the CA's.
    pub validity: Validity,
    /// Subject name.
    pub subject: Subject,
    /// Subject alternative names: at least one, since TLS clients match only these.
    pub san: Vec<San>,
}

impl ServerRequest {
    /// Checks every field against the rules and the key policy.
    pub fn validate(&self, policy: &KeyPolicy) -> Result<(), CertError> {
        policy.check_request(self.signature, self.rsa_bits)?;
        self.validity.validate()?;
        self.subject.validate()?;
        if self.san.is_empty() {
            return Err(CertError::MissingSan);
        }
        self.san.iter().try_for_each(San::validate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_blanks_are_refused() {
        for bad in ["", "home ca", "home\tca", "ca\u{a0}x", " ca", "ca\n"] {
            assert!(
                matches!(validate_name(bad), Err(CertError::InvalidName(_))),
                "{bad:?}"
            );
        }
        validate_name("homerelay-root-CA_2026").expect("valid name");
    }

    #[test]
    fn key_policy_accepts_only_known_sizes() {
        assert!(KeyPolicy::new(1024).is_err());
        assert!(KeyPolicy::new(2000).is_err());
        assert_eq!(KeyPolicy::default().min_rsa_bits(), 2048);
        let p = KeyPolicy::new(3072).expect("3072");
        assert!(matches!(
            p.check_request(SignatureAlgorithm::RsaSha256, 2048),
            Err(CertError::KeyTooShort {
                bits: 2048,
                min_bits: 3072
            })
        ));
        assert!(matches!(
            KeyPolicy::default().check_request(SignatureAlgorithm::RsaSha256, 1024),
            Err(CertError::KeyTooShort { .. })
        ));
        assert!(matches!(
            KeyPolicy::default().check_request(SignatureAlgorithm::RsaSha512, 2500),
            Err(CertError::UnsupportedKeySize(2500))
        ));
        p.check_request(SignatureAlgorithm::EcdsaP256Sha256, 0)
            .expect("p-256 is 3072-equivalent");
        let strict = KeyPolicy::new(4096).expect("4096");
        assert!(
            strict
                .check_request(SignatureAlgorithm::EcdsaP256Sha256, 0)
                .is_err()
        );
    }

    #[test]
    fn subject_rules() {
        let good = Subject {
            country: "de".into(),
            organisation: "Example".into(),
            unit: "Voice".into(),
            common_name: "homerelay root".into(),
        };
        good.validate().expect("valid");
        for bad in [
            Subject {
                country: "DEU".into(),
                ..good.clone()
            },
            Subject {
                country: "D1".into(),
                ..good.clone()
            },
            Subject {
                organisation: " ".into(),
                ..good.clone()
            },
            Subject {
                common_name: "x".repeat(65),
                ..good.clone()
            },
            Subject {
                unit: "a\u{0}b".into(),
                ..good.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(CertError::InvalidSubject { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["relay.example.org", "*.example.org", "a-b.c1", "localhost"] {
            San::Dns(ok.into()).validate().expect(ok);
        }
        for bad in [
            "",
            "*.",
            "-a.example",
            "a..b",
            "a b",
            "ex_ample.org",
            "*.*.x",
            "é.example",
        ] {
            assert!(San::Dns(bad.into()).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validity_order() {
        let t = UtcDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        let v = Validity {
            not_before: t,
            not_after: t,
        };
        assert!(matches!(v.validate(), Err(CertError::ValidityOrder { .. })));
        let v = Validity {
            not_before: t + time::Duration::milliseconds(10),
            not_after: t,
        };
        assert!(v.validate().is_err());
        // Equal once sub-seconds are dropped: still empty.
        let v = Validity {
            not_before: t,
            not_after: t + time::Duration::milliseconds(500),
        };
        assert!(v.validate().is_err());
        Validity {
            not_before: t,
            not_after: t + time::Duration::seconds(1),
        }
        .validate()
        .expect("one second");
    }
}
