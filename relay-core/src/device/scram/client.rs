//! The client side of SCRAM-SHA-256: client-first, then client-final from server-first, then
//! the check of server-final (RFC 5802 §5).
//!
//! Invariant: the client accepts success only after verifying the server's signature in
//! constant time, and computes at most [`MAX_ITERATIONS`] whatever the server asks.

use std::fmt;

use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::{
    B64, MAX_ITERATIONS, MIN_ITERATIONS, ScramError, attr, b64_decode, check_nonce,
    encode_saslname, hmac, keys, prepare, salted_password, xor,
};

/// The GS2 header of a client that does not support channel binding (RFC 5802 §7).
const GS2_HEADER: &str = "n,,";

enum State {
    /// Client-first not answered yet; the prepared password is kept until server-first.
    First { password: String },
    /// Client-final sent; the expected server signature.
    Final { server_signature: [u8; 32] },
    /// Finished (successfully or not): no more messages.
    Done,
}

/// A SCRAM-SHA-256 client exchange.
pub struct ScramClient {
    client_first_bare: String,
    nonce: String,
    state: State,
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
        })
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
        let salted = salted_password(&password, &salt, iterations);
        let (client_key, stored_key, server_key) = keys(&salted);
        let without_proof = format!("c={},r={nonce}", B64.encode(GS2_HEADER));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&client_key, &client_signature);
        self.state = State::Final {
            server_signature: hmac(&server_key, &[auth_message.as_bytes()]),
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final: `Ok` only if the server proved it holds the verifier.
    pub fn handle_server_final(&mut self, server_final: &str) -> Result<(), ScramError> {
        let State::Final { server_signature } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        if let Ok(e) = attr(Some(server_final), 'e') {
            return Err(ScramError::ServerRejected(e.to_owned()));
        }
        let v = attr(server_final.split(',').next(), 'v')?;
        let got = b64_decode(v, "the server signature is not base64")?;
        if bool::from(got.as_slice().ct_eq(&server_signature)) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}
