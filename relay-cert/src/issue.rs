//! Issuing certificates: a self-signed root CA and the server certificates it signs.
//!
//! Invariant: a certificate is signed only after its request passed validation against the
//! [`KeyPolicy`] and its serial number was reserved in the [`SerialRegistry`]; keys leave this
//! module only as PKCS#8 (DER or PEM) and are wiped from memory when dropped.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::UtcDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::error::CertError;
use crate::inspect::{self, check_key_length, signature_of};
use crate::request::{CaRequest, KeyPolicy, San, ServerRequest, SignatureAlgorithm, Validity};
use crate::serial::{Serial, SerialRegistry};

/// A root CA: its certificate and its private key.
pub struct Ca {
    name: String,
    signature: SignatureAlgorithm,
    validity: Validity,
    cert_der: Vec<u8>,
    cert_pem: String,
    key_der: Zeroizing<Vec<u8>>,
    key_pem: Zeroizing<String>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.name)
            .field("signature", &self.signature)
            .field("validity", &self.validity)
            .field("fingerprint", &inspect::fingerprint_sha256(&self.cert_der))
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// The CA's name in the store.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The algorithm this CA signs with.
    #[must_use]
    pub fn signature(&self) -> SignatureAlgorithm {
        self.signature
    }

    /// The CA certificate's validity window.
    #[must_use]
    pub fn validity(&self) -> Validity {
        self.validity
    }

    /// The CA certificate, DER.
    #[must_use]
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate, PEM (`CERTIFICATE`).
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PKCS#8 DER.
    #[must_use]
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    /// The CA's private key, PKCS#8 PEM (`PRIVATE KEY`).
    #[must_use]
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Loads a CA created earlier (or elsewhere) from its certificate and PKCS#8 key, both PEM.
    /// Refused unless the certificate is a CA (`basicConstraints CA:TRUE`), signed with one of
    /// the algorithms this crate issues, its key meets `policy`, and the key belongs to it.
    pub fn from_pem(
        name: &str,
        cert_pem: &str,
        key_pem: &str,
        policy: &KeyPolicy,
    ) -> Result<Self, CertError> {
        crate::request::validate_name(name)?;
        let cert_der = pem_block(cert_pem, "CERTIFICATE")?;
        let key_der = Zeroizing::new(pem_block(key_pem, "PRIVATE KEY")?);
        let info = inspect::inspect(&cert_der)?;
        if !info.is_ca {
            return Err(CertError::NotCa);
        }
        check_key_length(&info, policy.min_rsa_bits())?;
        let (_, x509) = X509Certificate::from_der(&cert_der).map_err(CertError::Parse)?;
        let signature = signature_of(&x509)
            .ok_or_else(|| CertError::UnsupportedSignature(info.signature_algorithm.clone()))?;
        let key = load_key(&key_der, signature)?;
        if rcgen::PublicKeyData::der_bytes(&key)
            != x509.public_key().subject_public_key.data.as_ref()
        {
            return Err(CertError::KeyMismatch);
        }
        let validity = Validity {
            not_before: utc(x509.validity().not_before.to_datetime()),
            not_after: utc(x509.validity().not_after.to_datetime()),
        };
        Ok(Self {
            name: name.to_owned(),
            signature,
            validity,
            cert_pem: to_pem("CERTIFICATE", &cert_der),
            cert_der,
            key_pem: Zeroizing::new(to_pem("PRIVATE KEY", &key_der)),
            key_der,
        })
    }
}

/// A server certificate signed by a CA, and its private key.
pub struct ServerCert {
    signature: SignatureAlgorithm,
    cert_der: Vec<u8>,
    cert_pem: String,
    key_der: Zeroizing<Vec<u8>>,
    key_pem: Zeroizing<String>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("key", &self.signature)
            .field("fingerprint", &inspect::fingerprint_sha256(&self.cert_der))
            .finish_non_exhaustive()
    }
}

impl ServerCert {
    /// The algorithm that fixed this certificate's key type (RSA or P-256).
    #[must_use]
    pub fn key_algorithm(&self) -> SignatureAlgorithm {
        self.signature
    }

    /// The certificate, DER.
    #[must_use]
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The certificate, PEM (`CERTIFICATE`).
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PKCS#8 DER.
    #[must_use]
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    /// The private key, PKCS#8 PEM (`PRIVATE KEY`).
    #[must_use]
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

/// The certificate chain a TLS server presents, leaf first then the CA, as PEM.
#[must_use]
pub fn pem_chain(server: &ServerCert, ca: &Ca) -> String {
    format!("{}{}", server.cert_pem, ca.cert_pem)
}

/// The server's private key, PKCS#8 PEM.
#[must_use]
pub fn key_pem(server: &ServerCert) -> &str {
    server.key_pem()
}

/// Creates a self-signed root CA: validates the request against `policy`, reserves its serial
/// in `serials`, generates the key and signs. The CA may sign end-entity certificates only
/// (`pathLenConstraint` 0), with key usage keyCertSign, cRLSign and digitalSignature.
pub fn create_ca(
    req: &CaRequest,
    policy: &KeyPolicy,
    serials: &mut dyn SerialRegistry,
) -> Result<Ca, CertError> {
    req.validate(policy)?;
    serials.reserve(&req.serial)?;
    let key = generate_key(req.signature, req.rsa_bits)?;

    let mut params = base_params(&req.serial, &req.validity, &req.san)?;
    params.distinguished_name = req.subject.to_rcgen()?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(CertError::Generate)?;

    Ok(Ca {
        name: req.name.clone(),
        signature: req.signature,
        validity: req.validity,
        cert_der: cert.der().to_vec(),
        cert_pem: cert.pem(),
        key_der: Zeroizing::new(key.serialize_der()),
        key_pem: Zeroizing::new(key.serialize_pem()),
    })
}

/// Creates a server certificate signed by `ca`: validates the request against `policy`
/// (its validity must lie inside the CA's), reserves its serial in `serials`, generates the
/// server's key and has the CA sign with the CA's algorithm. The certificate carries
/// `basicConstraints CA:FALSE`, key usage digitalSignature (and keyEncipherment for RSA keys,
/// for TLS 1.2 RSA key exchange), extended key usage serverAuth and the authority key
/// identifier of the CA.
pub fn create_server_cert(
    ca: &Ca,
    req: &ServerRequest,
    policy: &KeyPolicy,
    serials: &mut dyn SerialRegistry,
) -> Result<ServerCert, CertError> {
    req.validate(policy)?;
    if !ca.validity.contains(&req.validity) {
        return Err(CertError::ValidityOutsideCa {
            ca_not_before: ca.validity.not_before_secs(),
            ca_not_after: ca.validity.not_after_secs(),
        });
    }
    serials.reserve(&req.serial)?;
    let key = generate_key(req.signature, req.rsa_bits)?;

    let ca_key = load_key(&ca.key_der, ca.signature)?;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca.cert_der.as_slice()), ca_key)
        .map_err(CertError::Generate)?;

    let mut params = base_params(&req.serial, &req.validity, &req.san)?;
    params.distinguished_name = req.subject.to_rcgen()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = if req.signature.is_rsa() {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(CertError::Generate)?;

    Ok(ServerCert {
        signature: req.signature,
        cert_der: cert.der().to_vec(),
        cert_pem: cert.pem(),
        key_der: Zeroizing::new(key.serialize_der()),
        key_pem: Zeroizing::new(key.serialize_pem()),
    })
}

fn base_params(
    serial: &Serial,
    validity: &Validity,
    san: &[San],
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.serial_number = Some(serial.to_rcgen());
    params.not_before = validity.not_before_secs().into();
    params.not_after = validity.not_after_secs().into();
    params.subject_alt_names = san.iter().map(San::to_rcgen).collect::<Result<_, _>>()?;
    Ok(params)
}

/// Generates a key pair for `signature`. ring (rcgen's backend here) cannot generate RSA keys,
/// so RSA keys come from the `rsa` crate with the operating system's random source and are
/// handed to rcgen as PKCS#8; P-256 keys come from ring through rcgen.
fn generate_key(signature: SignatureAlgorithm, rsa_bits: u32) -> Result<KeyPair, CertError> {
    if !signature.is_rsa() {
        return KeyPair::generate_for(signature.rcgen()).map_err(CertError::Generate);
    }
    let bits = usize::try_from(rsa_bits).map_err(|_| CertError::UnsupportedKeySize(rsa_bits))?;
    let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits).map_err(CertError::RsaKeyGen)?;
    let der =
        rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&key).map_err(CertError::RsaKeyEncoding)?;
    load_key(der.as_bytes(), signature)
}

/// Loads a PKCS#8 key to sign with `signature`.
fn load_key(pkcs8: &[u8], signature: SignatureAlgorithm) -> Result<KeyPair, CertError> {
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), signature.rcgen())
        .map_err(|e| match e {
            rcgen::Error::RingKeyRejected(_) => CertError::KeyMismatch,
            e => CertError::Generate(e),
        })
}

pub(crate) fn pem_block(text: &str, tag: &'static str) -> Result<Vec<u8>, CertError> {
    match pem::parse_many(text) {
        Ok(blocks) if blocks.len() == 1 && blocks[0].tag() == tag => Ok(blocks
            .into_iter()
            .next()
            .map(pem::Pem::into_contents)
            .unwrap_or_default()),
        _ => Err(CertError::Pem(tag)),
    }
}

pub(crate) fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

pub(crate) fn utc(t: time::OffsetDateTime) -> UtcDateTime {
    t.to_utc()
}
