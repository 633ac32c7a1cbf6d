//! The stored form of a device password: the SCRAM-SHA-256 verifier (RFC 5802 §3, written as in
//! RFC 5803 §3).
//!
//! Invariant: a verifier has a non-empty salt and at least [`MIN_ITERATIONS`]; its text and
//! `Debug` forms never show the password, and `Debug` does not show the keys either.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use rand::RngCore;

use super::{B64, MECHANISM, MIN_ITERATIONS, SALT_LEN, ScramError, keys, prepare, salted_password};

/// What the server stores for a password: salt, iteration count, StoredKey and ServerKey.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramVerifier {
    /// Derives the verifier of `password` with `salt` (random bytes from the caller) and
    /// `iterations` (see [`super::DEFAULT_ITERATIONS`]).
    pub fn new(password: &str, salt: &[u8], iterations: u32) -> Result<ScramVerifier, ScramError> {
        if salt.is_empty() {
            return Err(ScramError::InvalidVerifier("empty salt"));
        }
        if iterations < MIN_ITERATIONS {
            return Err(ScramError::Iterations(iterations));
        }
        let salted = salted_password(&prepare(password)?, salt, iterations);
        let (_, stored_key, server_key) = keys(&salted);
        Ok(ScramVerifier {
            salt: salt.to_vec(),
            iterations,
            stored_key,
            server_key,
        })
    }

    /// Derives a verifier with a fresh [`SALT_LEN`]-byte salt from `rng`.
    pub fn generate(
        password: &str,
        iterations: u32,
        rng: &mut impl RngCore,
    ) -> Result<ScramVerifier, ScramError> {
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        ScramVerifier::new(password, &salt, iterations)
    }

    /// A verifier from its parts (as a store keeps them).
    pub fn from_parts(
        salt: Vec<u8>,
        iterations: u32,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    ) -> Result<ScramVerifier, ScramError> {
        if salt.is_empty() {
            return Err(ScramError::InvalidVerifier("empty salt"));
        }
        if iterations < MIN_ITERATIONS {
            return Err(ScramError::Iterations(iterations));
        }
        Ok(ScramVerifier {
            salt,
            iterations,
            stored_key,
            server_key,
        })
    }

    /// A verifier from parts the caller has checked (non-empty salt, enough iterations).
    pub(super) fn raw(
        salt: Vec<u8>,
        iterations: u32,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    ) -> ScramVerifier {
        ScramVerifier {
            salt,
            iterations,
            stored_key,
            server_key,
        }
    }

    /// The salt.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// The iteration count.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// StoredKey := H(ClientKey).
    pub fn stored_key(&self) -> &[u8; 32] {
        &self.stored_key
    }

    /// ServerKey := HMAC(SaltedPassword, "Server Key").
    pub fn server_key(&self) -> &[u8; 32] {
        &self.server_key
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("salt", &B64.encode(&self.salt))
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for ScramVerifier {
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64 (RFC 5803 §3).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{MECHANISM}${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

impl FromStr for ScramVerifier {
    type Err = ScramError;

    fn from_str(s: &str) -> Result<ScramVerifier, ScramError> {
        let bad = ScramError::InvalidVerifier;
        let mut sections = s.trim().split('$');
        let (Some(mech), Some(params), Some(keys), None) = (
            sections.next(),
            sections.next(),
            sections.next(),
            sections.next(),
        ) else {
            return Err(bad(
                "expected SCRAM-SHA-256$<iterations>:<salt>$<stored key>:<server key>",
            ));
        };
        if mech != MECHANISM {
            return Err(bad("not a SCRAM-SHA-256 verifier"));
        }
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(bad("expected <iterations>:<salt>"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(bad("expected <stored key>:<server key>"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| bad("the iteration count is not a number"))?;
        let salt = B64
            .decode(salt)
            .map_err(|_| bad("the salt is not base64"))?;
        let key = |k: &str| -> Result<[u8; 32], ScramError> {
            let bytes = B64.decode(k).map_err(|_| bad("a key is not base64"))?;
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| bad("a key is not 32 bytes"))
        };
        ScramVerifier::from_parts(salt, iterations, key(stored)?, key(server)?)
    }
}
