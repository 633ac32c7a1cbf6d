//! The one error type of this crate: every refusal says which rule was broken.
//!
//! Invariant: a variant names one cause; library errors that cross from rcgen, x509-parser,
//! `rsa` or the PKCS#12 codec keep their source, and no variant is a catch-all string.

use std::path::PathBuf;

/// Why a certificate operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The CA name is empty, too long, or has blanks or control characters.
    #[error(
        "ca name {0:?} is not valid: it must be 1 to 64 characters with no blanks or control characters"
    )]
    InvalidName(String),
    /// A subject field breaks its rule (which one and why is in the message).
    #[error("subject {field} {value:?} is not valid: {reason}")]
    InvalidSubject {
        /// The field: `country`, `organisation`, `unit` or `common name`.
        field: &'static str,
        /// The value given.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A DNS subject alternative name is not a host name.
    #[error("subject alternative name {0:?} is not a valid dns name")]
    InvalidDnsName(String),
    /// A server certificate needs at least one subject alternative name: TLS clients such as
    /// rustls match the server's name only against the SAN, never the common name.
    #[error("a server certificate needs at least one subject alternative name (ip or dns)")]
    MissingSan,
    /// `not_before` is not strictly before `not_after`.
    #[error(
        "validity window is empty: not_before {not_before} is not before not_after {not_after}"
    )]
    ValidityOrder {
        /// The requested start (UTC).
        not_before: time::UtcDateTime,
        /// The requested end (UTC).
        not_after: time::UtcDateTime,
    },
    /// A server certificate's validity must lie inside its CA's.
    #[error(
        "server certificate validity must lie inside the ca's ({ca_not_before} to {ca_not_after})"
    )]
    ValidityOutsideCa {
        /// The CA's start (UTC).
        ca_not_before: time::UtcDateTime,
        /// The CA's end (UTC).
        ca_not_after: time::UtcDateTime,
    },
    /// The serial number is zero, negative in two's complement form, or longer than RFC 5280
    /// §4.1.2.2 allows (20 octets).
    #[error(
        "serial number {0} is not valid: it must be positive and at most 20 octets (rfc 5280 4.1.2.2)"
    )]
    InvalidSerial(String),
    /// The serial number was already used for a certificate.
    #[error("serial number {0} was already used for a certificate")]
    SerialAlreadyUsed(String),
    /// The serial registry could not produce a fresh serial number.
    #[error("no unused serial number found after {0} random draws")]
    SerialExhausted(u32),
    /// An RSA key would be (or is) shorter than the configured minimum.
    #[error("key length {bits} bits is below the configured minimum of {min_bits} bits")]
    KeyTooShort {
        /// The key's length (RSA modulus bits, or the RSA-equivalent strength of an EC key).
        bits: u32,
        /// The configured minimum.
        min_bits: u32,
    },
    /// An RSA key length other than 2048, 3072 or 4096 bits was asked for.
    #[error("rsa key length {0} bits is not supported: use 2048, 3072 or 4096")]
    UnsupportedKeySize(u32),
    /// The minimum key length of a [`KeyPolicy`](crate::KeyPolicy) is not 2048, 3072 or 4096.
    #[error("minimum rsa key length {0} bits is not supported: use 2048, 3072 or 4096")]
    InvalidKeyPolicy(u32),
    /// The certificate's key is of a kind this crate does not accept (not RSA or P-256/P-384).
    #[error("unsupported public key algorithm {0}")]
    UnsupportedKey(String),
    /// The certificate is signed with an algorithm this crate does not issue.
    #[error("unsupported signature algorithm {0}")]
    UnsupportedSignature(String),
    /// The key given to sign with does not fit the certificate (import of a CA, or PKCS#12).
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    /// A certificate meant to be a CA has no `basicConstraints CA:TRUE`.
    #[error("the certificate is not a ca certificate (basicConstraints CA:TRUE missing)")]
    NotCa,
    /// A certificate was not issued by the given CA: names differ or the signature is wrong.
    #[error("the certificate was not issued by this ca: {0}")]
    NotIssuedBy(&'static str),
    /// An empty passphrase was given for a PKCS#12 file.
    #[error("a pkcs#12 file needs a non-empty passphrase")]
    EmptyPassphrase,
    /// The PKCS#12 integrity check failed: the passphrase is wrong or the file is damaged.
    #[error("pkcs#12: wrong passphrase or damaged file (integrity check failed)")]
    WrongPassphrase,
    /// The PKCS#12 file holds no private key with its certificate chain.
    #[error("pkcs#12: the file holds no private key with its certificate")]
    Pkcs12NoKey,
    /// The PKCS#12 file could not be written or read.
    #[error("pkcs#12: {0}")]
    Pkcs12(#[source] p12_keystore::error::Error),
    /// RSA key generation failed.
    #[error("rsa key generation failed")]
    RsaKeyGen(#[source] rsa::Error),
    /// Encoding a generated RSA key as PKCS#8 failed.
    #[error("rsa key encoding failed")]
    RsaKeyEncoding(#[source] rsa::pkcs8::Error),
    /// rcgen refused to build or sign a certificate, or to load a key.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    /// The DER or PEM given is not a certificate this crate can read.
    #[error("certificate cannot be parsed")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// PEM text is not a single certificate or a PKCS#8 private key.
    #[error("pem: expected one {0} block")]
    Pem(&'static str),
    /// The operating system's random source failed.
    #[error("random source failed")]
    Random(#[source] getrandom::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The serial registry file has a line that is not a serial number.
    #[error("{}: line {line} is not a serial number", path.display())]
    RegistryCorrupt {
        /// The registry file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
}
