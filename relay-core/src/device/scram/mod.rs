//! SCRAM-SHA-256 (RFC 5802, RFC 7677): how device passwords are stored ([`ScramVerifier`])
//! and proved, with both sides of the exchange as sans-IO state machines ([`ScramClient`],
//! [`ScramServer`]): each takes a message as text and returns the answer to send.
//!
//! Invariant: neither a verifier nor any message holds the password or anything from which it
//! follows without guessing; the server's checks compare in constant time; every parser
//! returns [`ScramError`] on malformed input and never panics. Randomness (salts, nonces) comes
//! from the caller. Channel binding is not offered (no `-PLUS` mechanism): a client asking for
//! it (`p=`) is refused, as RFC 5802 §6 requires.

mod client;
mod server;
mod verifier;

pub use client::{ScramClient, ScramClientKeys};
pub use server::{ScramServer, client_first_username};
pub use verifier::ScramVerifier;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The mechanism name.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// Fewest iterations accepted, from RFC 7677 §4 ("at least 4096").
pub const MIN_ITERATIONS: u32 = 4096;

/// Most iterations a client computes for a server (a hostile server could ask for billions).
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Iterations for new verifiers: 600 000, the OWASP Password Storage Cheat Sheet's figure for
/// PBKDF2-HMAC-SHA256 (2023). In SCRAM only the client and verifier creation pay it — the
/// server's check is a few HMACs — so the count protects a stolen verifier store at no cost to
/// the SBC. Give unknown-user answers the same count ([`ScramServer::for_unknown_user`]).
pub const DEFAULT_ITERATIONS: u32 = 600_000;

/// Salt bytes of a new verifier (RFC 5802 leaves the length open; 128 bits cannot collide in
/// practice).
pub const SALT_LEN: usize = 16;

/// What the server sends as server-final when the proof is wrong (RFC 5802 §7,
/// `server-error-value`).
pub const INVALID_PROOF: &str = "e=invalid-proof";

/// A failed SCRAM step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The message does not follow the grammar of RFC 5802 §7.
    #[error("malformed scram message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding, which this server does not offer.
    #[error("channel binding is not supported")]
    ChannelBindingUnsupported,
    /// The message carries a mandatory extension (`m=`).
    #[error("mandatory scram extensions are not supported")]
    ExtensionUnsupported,
    /// The client asked to act as another identity (`a=`).
    #[error("authorization identities are not supported")]
    AuthzidUnsupported,
    /// A nonce is empty or has characters outside printable ASCII without `,`.
    #[error("invalid nonce")]
    InvalidNonce,
    /// The server's nonce does not start with the client's, or the client-final's is not the
    /// combined one.
    #[error("the nonce does not match the exchange")]
    NonceMismatch,
    /// The iteration count is outside what is accepted.
    #[error("{0} iterations is outside {MIN_ITERATIONS}..={MAX_ITERATIONS}")]
    Iterations(u32),
    /// The user name or password has characters SASLprep (RFC 4013) prohibits, or is empty.
    #[error("the user name or password is empty or has characters saslprep prohibits")]
    Saslprep,
    /// The proof is wrong: wrong password or unknown user (indistinguishable on purpose).
    #[error("authentication failed")]
    AuthFailed,
    /// The server answered with an error (`e=...`).
    #[error("the server refused: {0}")]
    ServerRejected(String),
    /// The server's signature is wrong: it does not hold this password's verifier.
    #[error("the server's signature does not match")]
    ServerSignature,
    /// A message came in a state that does not expect it.
    #[error("scram message out of order")]
    OutOfOrder,
    /// A stored verifier cannot be read.
    #[error("invalid scram verifier: {0}")]
    InvalidVerifier(&'static str),
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA-256 of the concatenated `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length (RFC 2104 §2)");
    for p in parts {
        mac.update(p);
    }
    to_array(&mac.finalize().into_bytes())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    to_array(&Sha256::digest(data))
}

fn to_array(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b;
    }
    out
}

/// SaltedPassword := Hi(Normalize(password), salt, i) (RFC 5802 §3).
fn salted_password(prepared: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), salt, iterations, &mut out);
    out
}

/// ClientKey, StoredKey and ServerKey from a salted password (RFC 5802 §3).
fn keys(salted: &[u8; 32]) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let client_key = hmac(salted, &[b"Client Key"]);
    let stored_key = sha256(&client_key);
    let server_key = hmac(salted, &[b"Server Key"]);
    (client_key, stored_key, server_key)
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
    out
}

/// SASLprep (RFC 4013) as RFC 5802 §2.2 asks for passwords and user names; empty is refused.
fn prepare(s: &str) -> Result<String, ScramError> {
    match stringprep::saslprep(s) {
        Ok(p) if !p.is_empty() => Ok(p.into_owned()),
        _ => Err(ScramError::Saslprep),
    }
}

/// A fresh nonce: 18 random bytes in base64 (24 printable characters, no `,`).
pub fn generate_nonce(rng: &mut impl RngCore) -> String {
    let mut bytes = [0u8; 18];
    rng.fill_bytes(&mut bytes);
    B64.encode(bytes)
}

fn check_nonce(nonce: &str) -> Result<(), ScramError> {
    // RFC 5802 §7: printable = %x21-2B / %x2D-7E.
    if nonce.is_empty()
        || !nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        return Err(ScramError::InvalidNonce);
    }
    Ok(())
}

/// `saslname` encoding (RFC 5802 §5.1): `=` as `=3D`, `,` as `=2C`.
fn encode_saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

fn decode_saslname(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("=2C") {
            out.push(',');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("=3D") {
            out.push('=');
            rest = t;
        } else {
            return Err(ScramError::Malformed(
                "'=' in a user name not followed by 2C or 3D",
            ));
        }
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    Ok(out)
}

/// The value of attribute `name` at the start of `field` (`r=abc` -> `abc`).
fn attr(field: Option<&str>, name: char) -> Result<&str, ScramError> {
    let field = field.ok_or(ScramError::Malformed("a required attribute is missing"))?;
    let mut chars = field.chars();
    match (chars.next(), chars.next()) {
        (Some(n), Some('=')) if n == name => Ok(chars.as_str()),
        (Some('m'), Some('=')) => Err(ScramError::ExtensionUnsupported),
        _ => Err(ScramError::Malformed(
            "an attribute is missing or out of place",
        )),
    }
}

fn b64_decode(s: &str, what: &'static str) -> Result<Vec<u8>, ScramError> {
    B64.decode(s).map_err(|_| ScramError::Malformed(what))
}

#[cfg(test)]
mod tests;
