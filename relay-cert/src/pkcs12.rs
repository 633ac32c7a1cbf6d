//! PKCS#12 files (RFC 7292): the server certificate, its key and the CA certificate under one
//! passphrase, as the store imports them.
//!
//! Invariant: files are written with PBES2 only — PBKDF2-HMAC-SHA-256 and AES-256-CBC for the
//! key and the certificates, HMAC-SHA-256 for the integrity MAC — which OpenSSL 3 reads
//! without `-legacy`; legacy PBES1 algorithms (RC2, 3DES) are neither written nor read.

use p12_keystore::{
    Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, Pkcs12ImportPolicy,
    PrivateKey, PrivateKeyChain,
};
use rcgen::{KeyPair, PublicKeyData};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::error::CertError;
use crate::issue::{Ca, ServerCert};

/// PBKDF2 iterations for the key encryption and for the MAC: about ten times OpenSSL 3's
/// default (2048) and twice the JDK's (10,000); deriving costs an import a few milliseconds
/// in a release build.
pub const PKCS12_ITERATIONS: u32 = 20_000;

/// What a PKCS#12 file held: the certificate chain (leaf first, then its issuers) and the
/// leaf's private key.
#[derive(Clone)]
pub struct Pkcs12Contents {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_der: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Pkcs12Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs12Contents")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Writes `server`, its key and `ca`'s certificate into a PKCS#12 file protected by
/// `passphrase` (which must not be empty). The key's friendly name is the server's common name.
pub fn to_pkcs12(server: &ServerCert, ca: &Ca, passphrase: &str) -> Result<Vec<u8>, CertError> {
    if passphrase.is_empty() {
        return Err(CertError::EmptyPassphrase);
    }
    let (_, leaf) = X509Certificate::from_der(server.cert_der()).map_err(CertError::Parse)?;
    let alias = leaf
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("server")
        .to_owned();
    let key = PrivateKey::from_der(server.key_der()).map_err(CertError::Pkcs12)?;
    let certs = [server.cert_der(), ca.cert_der()]
        .into_iter()
        .map(Certificate::from_der)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertError::Pkcs12)?;
    // localKeyID ties the key bag to the leaf's certificate bag; OpenSSL uses a digest of the
    // certificate, and so do we (its first 20 octets, the length OpenSSL's SHA-1 gives).
    let local_key_id = Sha256::digest(server.cert_der())[..20].to_vec();

    let mut store = KeyStore::new();
    store.add_entry(
        &alias,
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(local_key_id, key, certs)),
    );
    store
        .writer(passphrase)
        .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .encryption_iterations(PKCS12_ITERATIONS)
        .mac_algorithm(MacAlgorithm::HmacSha256)
        .mac_iterations(PKCS12_ITERATIONS)
        .write()
        .map_err(CertError::Pkcs12)
}

/// Reads a PKCS#12 file: checks its MAC with `passphrase` (a wrong one is
/// [`CertError::WrongPassphrase`]), takes the first private key and the certificate chain it
/// belongs to, and checks that the key is the leaf certificate's.
pub fn from_pkcs12(bytes: &[u8], passphrase: &str) -> Result<Pkcs12Contents, CertError> {
    let store =
        KeyStore::from_pkcs12(bytes, passphrase, Pkcs12ImportPolicy::Strict).map_err(|e| {
            match e {
                // The MAC is keyed by the passphrase; a wrong one fails it. Files without a MAC fail
                // the CBC padding check instead.
                p12_keystore::error::Error::MacError(_)
                | p12_keystore::error::Error::UnpadError => CertError::WrongPassphrase,
                e => CertError::Pkcs12(e),
            }
        })?;
    let (_, chain) = store.private_key_chain().ok_or(CertError::Pkcs12NoKey)?;
    let leaf = chain.certs().first().ok_or(CertError::Pkcs12NoKey)?;
    let key_der = Zeroizing::new(chain.key().as_der().to_vec());

    let key = KeyPair::try_from(key_der.as_slice()).map_err(|_| CertError::KeyMismatch)?;
    let (_, leaf_x509) = X509Certificate::from_der(leaf.as_der()).map_err(CertError::Parse)?;
    if key.der_bytes() != leaf_x509.public_key().subject_public_key.data.as_ref() {
        return Err(CertError::KeyMismatch);
    }

    Ok(Pkcs12Contents {
        chain: chain.certs().iter().map(|c| c.as_der().to_vec()).collect(),
        key_der,
    })
}
