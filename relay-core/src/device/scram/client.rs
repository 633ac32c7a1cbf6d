//! The client side of SCRAM-SHA-256: client-first, then client-final from server-first, then
//! the check of server-final (RFC 5802 §5), and the keys a device may keep between exchanges
//! ([`ScramClientKeys`]) so that it pays PBKDF2 once per salt and iteration count.
//!
//! Invariant: the client accepts success only after verifying the server's signature in
//! constant time, and computes at most [`MAX_ITERATIONS`] whatever the server asks. Cached keys
//! are used only for the salt and iteration count they were derived for, and an exchange hands
//! its keys out for caching only after the server proved it holds the verifier.

use std::fmt;

use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::{
    B64, MAX_ITERATIONS, MIN_ITERATIONS, ScramError, attr, b64_decode, check_nonce,
    encode_saslname, hmac, keys, prepare, salted_password, sha256, xor,
};

/// The GS2 header of a client that does not support channel binding (RFC 5802 §7).
const GS2_HEADER: &str = "n,,";

/// ClientKey and ServerKey of one password for one salt and iteration count (RFC 5802 §3).
///
/// Deriving them runs PBKDF2 (`Hi`) for the iteration count the server names — 600,000 for
/// verifiers made with [`super::DEFAULT_ITERATIONS`], a noticeable fraction of a second on a
/// phone. RFC 5802 §5.1 lets a client keep them (or SaltedPassword) per salt and iteration
/// count and skip the derivation while the server keeps the same verifier: give them to the
/// next exchange with [`ScramClient::with_keys`]. They prove the password to this server (and
/// to anyone who learns them), so they deserve the password's protection; `Debug` does not
/// show them.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramClientKeys {
    salt: Vec<u8>,
    iterations: u32,
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramClientKeys {
    /// Derives the keys of `password` for `salt` and `iterations` (the PBKDF2 work).
    pub fn derive(
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<ScramClientKeys, ScramError> {
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Iterations(iterations));
        }
        Ok(ScramClientKeys::from_prepared(
            &prepare(password)?,
            salt,
            iterations,
        ))
    }

    fn from_prepared(prepared: &str, salt: &[u8], iterations: u32) -> ScramClientKeys {
        let (client_key, _, server_key) = keys(&salted_password(prepared, salt, iterations));
        ScramClientKeys {
            salt: salt.to_vec(),
            iterations,
            client_key,
            server_key,
        }
    }

    /// The salt the keys belong to.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// The iteration count the keys belong to.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    fn matches(&self, salt: &[u8], iterations: u32) -> bool {
        self.iterations == iterations && self.salt == salt
    }
}

impl fmt::Debug for ScramClientKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClientKeys")
            .field("salt", &B64.encode(&self.salt))
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

enum State {
    /// Client-first not answered yet; the prepared password is kept until server-first.
    First { password: String },
    /// Client-final sent; the expected server signature and the keys of this exchange.
    Final {
        server_signature: [u8; 32],
        keys: ScramClientKeys,
    },
    /// Finished (successfully or not): no more messages.
    Done,
}

/// A SCRAM-SHA-256 client exchange.
pub struct ScramClient {
    client_first_bare: String,
    nonce: String,
    state: State,
    /// Keys from an earlier exchange, used if server-first names their salt and count.
    cached: Option<ScramClientKeys>,
    /// Whether this exchange took its keys from `cached` (no PBKDF2).
    used_cache: bool,
    /// The keys of this exchange once the server's signature verified.
    verified: Option<ScramClientKeys>,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::First { .. } => "first",
            State::Final { .. } => "final",
            State::Done => "done",
        };
        f.debug_struct("ScramClient")
            .field("client_first_bare", &self.client_first_bare)
            .field("state", &state)
            .field("cached", &self.cached)
            .field("used_cache", &self.used_cache)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// Starts an exchange for `user` with `password` and the client nonce `nonce` (random,
    /// printable ASCII without `,`; see [`super::generate_nonce`]).
    pub fn new(user: &str, password: &str, nonce: &str) -> Result<ScramClient, ScramError> {
        check_nonce(nonce)?;
        let user = prepare(user)?;
        let password = prepare(password)?;
        Ok(ScramClient {
            client_first_bare: format!("n={},r={nonce}", encode_saslname(&user)),
            nonce: nonce.to_owned(),
            state: State::First { password },
            cached: None,
            used_cache: false,
            verified: None,
        })
    }

    /// Offers keys kept from an earlier exchange of the same user and password (see
    /// [`ScramClientKeys`]): if server-first names their salt and iteration count, the proof is
    /// computed from them without PBKDF2; otherwise (the password was set again on the server,
    /// or another server answers) they are ignored and the keys are derived from the password.
    /// Keys of another password would make the server refuse the proof.
    #[must_use]
    pub fn with_keys(mut self, keys: ScramClientKeys) -> ScramClient {
        self.cached = Some(keys);
        self
    }

    /// Whether this exchange computed its proof from the keys given to [`Self::with_keys`]
    /// (known after [`Self::handle_server_first`]).
    pub fn used_cached_keys(&self) -> bool {
        self.used_cache
    }

    /// The keys of this exchange, to keep for the next one; `Some` only after
    /// [`Self::handle_server_final`] verified the server's signature (keys a server did not
    /// prove its knowledge of the password for are not worth keeping).
    pub fn verified_keys(&self) -> Option<&ScramClientKeys> {
        self.verified.as_ref()
    }

    /// The client-first message to send.
    pub fn client_first(&self) -> String {
        format!("{GS2_HEADER}{}", self.client_first_bare)
    }

    /// Answers server-first with client-final.
    pub fn handle_server_first(&mut self, server_first: &str) -> Result<String, ScramError> {
        let State::First { password } = std::mem::replace(&mut self.state, State::Done) else {
            return Err(ScramError::OutOfOrder);
        };
        if let Ok(e) = attr(Some(server_first), 'e') {
            return Err(ScramError::ServerRejected(e.to_owned()));
        }
        let mut fields = server_first.split(',');
        let nonce = attr(fields.next(), 'r')?;
        let salt = b64_decode(attr(fields.next(), 's')?, "the salt is not base64")?;
        let iterations: u32 = attr(fields.next(), 'i')?
            .parse()
            .map_err(|_| ScramError::Malformed("the iteration count is not a number"))?;
        // Further fields are extensions, which RFC 5802 §5.1 lets a client ignore.
        check_nonce(nonce)?;
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(ScramError::NonceMismatch);
        }
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Iterations(iterations));
        }
        let keys = match self.cached.take() {
            Some(k) if k.matches(&salt, iterations) => {
                self.used_cache = true;
                k
            }
            _ => ScramClientKeys::from_prepared(&password, &salt, iterations),
        };
        let stored_key = sha256(&keys.client_key);
        let without_proof = format!("c={},r={nonce}", B64.encode(GS2_HEADER));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&keys.client_key, &client_signature);
        self.state = State::Final {
            server_signature: hmac(&keys.server_key, &[auth_message.as_bytes()]),
            keys,
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final: `Ok` only if the server proved it holds the verifier.
    pub fn handle_server_final(&mut self, server_final: &str) -> Result<(), ScramError> {
        let State::Final {
            server_signature,
            keys,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        if let Ok(e) = attr(Some(server_final), 'e') {
            return Err(ScramError::ServerRejected(e.to_owned()));
        }
        let v = attr(server_final.split(',').next(), 'v')?;
        let got = b64_decode(v, "the server signature is not base64")?;
        if bool::from(got.as_slice().ct_eq(&server_signature)) {
            self.verified = Some(keys);
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}
