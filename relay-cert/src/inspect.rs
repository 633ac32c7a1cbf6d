//! Reading certificates back: what a certificate says, its SHA-256 fingerprint as OpenSSL
//! prints it, its key length against the policy, and whether a CA issued it.
//!
//! Invariant: everything here is read from the DER with x509-parser, never from the request
//! that produced it, so the same checks hold for imported certificates.

use std::net::IpAddr;

use sha2::{Digest, Sha256};
use time::UtcDateTime;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::error::CertError;
use crate::issue::utc;
use crate::request::{P256_RSA_EQUIVALENT_BITS, P384_RSA_EQUIVALENT_BITS, San, SignatureAlgorithm};
use crate::serial::hex_upper;

/// The SHA-256 fingerprint of a DER certificate as `openssl x509 -noout -fingerprint -sha256`
/// prints it: upper-case hex octets joined by `:`.
#[must_use]
pub fn fingerprint_sha256(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The kind of a certificate's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// RSA.
    Rsa,
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// Anything else, by its algorithm (and, for EC, curve) OID.
    Other(String),
}

/// What a certificate says, read from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject name, RFC 4514 style (`C=DE, O=…, OU=…, CN=…`).
    pub subject: String,
    /// Issuer name, same style.
    pub issuer: String,
    /// Serial number, upper-case hex (as `openssl x509 -serial` prints it).
    pub serial_hex: String,
    /// Start of validity (UTC).
    pub not_before: UtcDateTime,
    /// End of validity (UTC).
    pub not_after: UtcDateTime,
    /// Public key kind.
    pub key_algorithm: KeyAlgorithm,
    /// Public key length in bits (RSA modulus, or EC field size).
    pub key_bits: u32,
    /// Signature algorithm as OpenSSL names it, or the dotted OID if unknown here.
    pub signature_algorithm: String,
    /// The signature algorithm if it is one this crate issues.
    pub signature: Option<SignatureAlgorithm>,
    /// Subject alternative names (IP and DNS; other kinds are left out).
    pub san: Vec<San>,
    /// `basicConstraints CA:TRUE`.
    pub is_ca: bool,
    /// SHA-256 fingerprint, as [`fingerprint_sha256`].
    pub fingerprint: String,
}

/// Reads a DER certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(CertError::Parse)?;
    let spki = cert.public_key();
    let (key_algorithm, key_bits) = if spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
            _ => 0,
        };
        (KeyAlgorithm::Rsa, bits)
    } else if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => (KeyAlgorithm::EcP256, 256),
            Some(c) if c == OID_NIST_EC_P384 => (KeyAlgorithm::EcP384, 384),
            Some(c) => (KeyAlgorithm::Other(format!("ec {c}")), 0),
            None => (KeyAlgorithm::Other("ec".to_owned()), 0),
        }
    } else {
        (
            KeyAlgorithm::Other(spki.algorithm.algorithm.to_id_string()),
            0,
        )
    };

    let signature = signature_of(&cert);
    let signature_algorithm = signature.map_or_else(
        || cert.signature_algorithm.algorithm.to_id_string(),
        |s| s.openssl_name().to_owned(),
    );

    let mut san = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => san.push(San::Dns((*d).to_owned())),
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        san.push(San::Ip(IpAddr::from(v4)));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        san.push(San::Ip(IpAddr::from(v6)));
                    }
                }
                _ => {}
            }
        }
    }

    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial_hex: serial_hex(cert.raw_serial()),
        not_before: utc(cert.validity().not_before.to_datetime()),
        not_after: utc(cert.validity().not_after.to_datetime()),
        key_algorithm,
        key_bits,
        signature_algorithm,
        signature,
        san,
        is_ca: cert.is_ca(),
        fingerprint: fingerprint_sha256(der),
    })
}

/// Checks a certificate's key against the configured minimum RSA key length. RSA keys need at
/// least `min_rsa_bits`; EC keys count with their RSA-equivalent strength (P-256 as 3072 bits,
/// P-384 as 7680, NIST SP 800-57 Part 1 Table 2); any other key is refused.
pub fn check_key_length(info: &CertInfo, min_rsa_bits: u32) -> Result<(), CertError> {
    let bits = match &info.key_algorithm {
        KeyAlgorithm::Rsa => info.key_bits,
        KeyAlgorithm::EcP256 => P256_RSA_EQUIVALENT_BITS,
        KeyAlgorithm::EcP384 => P384_RSA_EQUIVALENT_BITS,
        KeyAlgorithm::Other(name) => return Err(CertError::UnsupportedKey(name.clone())),
    };
    if bits < min_rsa_bits {
        return Err(CertError::KeyTooShort {
            bits,
            min_bits: min_rsa_bits,
        });
    }
    Ok(())
}

/// Checks that `cert_der` was issued by `ca_der`: the CA is a CA, the certificate's issuer
/// name is the CA's subject name, and the CA's key verifies the certificate's signature.
pub fn verify_issued_by(cert_der: &[u8], ca_der: &[u8]) -> Result<(), CertError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(CertError::Parse)?;
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(CertError::Parse)?;
    if !ca.is_ca() {
        return Err(CertError::NotCa);
    }
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return Err(CertError::NotIssuedBy(
            "issuer name differs from the ca's subject",
        ));
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| CertError::NotIssuedBy("signature does not verify with the ca's key"))
}

pub(crate) fn signature_of(cert: &X509Certificate<'_>) -> Option<SignatureAlgorithm> {
    let oid = &cert.signature_algorithm.algorithm;
    if *oid == OID_PKCS1_SHA256WITHRSA {
        Some(SignatureAlgorithm::RsaSha256)
    } else if *oid == OID_PKCS1_SHA512WITHRSA {
        Some(SignatureAlgorithm::RsaSha512)
    } else if *oid == OID_SIG_ECDSA_WITH_SHA256 {
        Some(SignatureAlgorithm::EcdsaP256Sha256)
    } else {
        None
    }
}

/// Bits of an unsigned big-endian integer (x509-parser's `key_size` assumes one leading zero).
fn modulus_bits(modulus: &[u8]) -> u32 {
    let start = modulus
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(modulus.len());
    let m = &modulus[start..];
    match m.first() {
        None => 0,
        Some(&top) => {
            let len = u32::try_from(m.len()).unwrap_or(u32::MAX / 8);
            8 * len - top.leading_zeros()
        }
    }
}

/// The serial as OpenSSL prints it: upper-case hex of the magnitude without the DER sign
/// octet.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex_upper(&raw[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_format() {
        let f = fingerprint_sha256(b"");
        assert_eq!(
            f,
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
    }

    #[test]
    fn modulus_bit_count() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0x00]), 9);
        assert_eq!(modulus_bits(&[]), 0);
        assert_eq!(serial_hex(&[0x00, 0x80]), "80");
        assert_eq!(serial_hex(&[0x00]), "00");
    }
}
