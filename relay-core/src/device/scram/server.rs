//! The server side of SCRAM-SHA-256: server-first from client-first, then server-final from
//! client-final, or [`ScramError::AuthFailed`] (RFC 5802 §5).
//!
//! Invariant: a wrong password and an unknown user fail the same way, after the same work,
//! with server-first messages of the same shape ([`ScramServer::for_unknown_user`]); the proof
//! is compared in constant time.

use std::fmt;

use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::{
    B64, DEFAULT_ITERATIONS, MIN_ITERATIONS, SALT_LEN, ScramError, ScramVerifier, attr, b64_decode,
    check_nonce, decode_saslname, hmac, sha256, xor,
};

/// What client-first said, split up.
struct ClientFirst<'a> {
    gs2_header: &'a str,
    bare: &'a str,
    user: String,
    nonce: &'a str,
}

fn parse_client_first(msg: &str) -> Result<ClientFirst<'_>, ScramError> {
    let mut fields = msg.splitn(3, ',');
    let (Some(cbind), Some(authzid), Some(bare)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(ScramError::Malformed("client-first needs a gs2 header"));
    };
    match cbind {
        "n" | "y" => {}
        c if c.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
        _ => return Err(ScramError::Malformed("unknown channel binding flag")),
    }
    if !authzid.is_empty() {
        return Err(if authzid.starts_with("a=") {
            ScramError::AuthzidUnsupported
        } else {
            ScramError::Malformed("bad authorization identity field")
        });
    }
    let gs2_header = &msg[..cbind.len() + authzid.len() + 2];
    let mut attrs = bare.split(',');
    let user = decode_saslname(attr(attrs.next(), 'n')?)?;
    let nonce = attr(attrs.next(), 'r')?;
    check_nonce(nonce)?;
    Ok(ClientFirst {
        gs2_header,
        bare,
        user,
        nonce,
    })
}

/// The user name in a client-first message, to look up the verifier before making the
/// [`ScramServer`].
pub fn client_first_username(client_first: &str) -> Result<String, ScramError> {
    parse_client_first(client_first).map(|c| c.user)
}

enum State {
    First,
    Final {
        auth_prefix: String,
        nonce: String,
        gs2_header: String,
    },
    Done,
}

/// A SCRAM-SHA-256 server exchange for one user.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// A stand-in for an unknown user: it never succeeds.
    unknown: bool,
    state: State,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::First => "first",
            State::Final { .. } => "final",
            State::Done => "done",
        };
        // `unknown` is left out on purpose: logs must not tell the two cases apart either.
        f.debug_struct("ScramServer")
            .field("verifier", &self.verifier)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// A server for a user whose verifier is `verifier`.
    pub fn new(verifier: ScramVerifier) -> ScramServer {
        ScramServer {
            verifier,
            unknown: false,
            state: State::First,
        }
    }

    /// A server for a user that does not exist, which answers like one that does and fails
    /// like a wrong password. Its salt follows from `user` and the secret `pepper` (stable, so
    /// asking twice shows the same salt, as for a real user), and its iteration count is
    /// [`DEFAULT_ITERATIONS`] — create real verifiers with that count too.
    pub fn for_unknown_user(user: &str, pepper: &[u8]) -> ScramServer {
        ScramServer::for_unknown_user_with_iterations(user, pepper, DEFAULT_ITERATIONS)
    }

    /// [`ScramServer::for_unknown_user`] with the iteration count real verifiers use.
    pub fn for_unknown_user_with_iterations(
        user: &str,
        pepper: &[u8],
        iterations: u32,
    ) -> ScramServer {
        let derive = |label: &[u8]| {
            hmac(
                pepper,
                &[
                    b"homerelay scram unknown user ",
                    label,
                    b"\0",
                    user.as_bytes(),
                ],
            )
        };
        let salt = derive(b"salt");
        ScramServer {
            verifier: ScramVerifier::raw(
                salt[..SALT_LEN].to_vec(),
                iterations.max(MIN_ITERATIONS),
                derive(b"stored key"),
                derive(b"server key"),
            ),
            unknown: true,
            state: State::First,
        }
    }

    /// Answers client-first with server-first; `server_nonce` is this server's random part
    /// (printable ASCII without `,`; see [`super::generate_nonce`]).
    pub fn handle_client_first(
        &mut self,
        client_first: &str,
        server_nonce: &str,
    ) -> Result<String, ScramError> {
        if !matches!(self.state, State::First) {
            return Err(ScramError::OutOfOrder);
        }
        self.state = State::Done;
        check_nonce(server_nonce)?;
        let first = parse_client_first(client_first)?;
        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(self.verifier.salt()),
            self.verifier.iterations()
        );
        self.state = State::Final {
            auth_prefix: format!("{},{server_first},", first.bare),
            nonce,
            gs2_header: first.gs2_header.to_owned(),
        };
        Ok(server_first)
    }

    /// Checks client-final: the server-final to send, or [`ScramError::AuthFailed`] (send
    /// [`super::INVALID_PROOF`]).
    pub fn handle_client_final(&mut self, client_final: &str) -> Result<String, ScramError> {
        let State::Final {
            auth_prefix,
            nonce,
            gs2_header,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final needs a proof"))?;
        let mut fields = without_proof.split(',');
        let cbind = b64_decode(
            attr(fields.next(), 'c')?,
            "the channel binding is not base64",
        )?;
        if cbind != gs2_header.as_bytes() {
            return Err(ScramError::Malformed(
                "the channel binding does not repeat the gs2 header",
            ));
        }
        if attr(fields.next(), 'r')? != nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof = b64_decode(proof, "the proof is not base64")?;
        let proof = <[u8; 32]>::try_from(proof.as_slice())
            .map_err(|_| ScramError::Malformed("the proof is not 32 bytes"))?;
        let auth_message = format!("{auth_prefix}{without_proof}");
        let client_signature = hmac(self.verifier.stored_key(), &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &client_signature);
        let matches: bool = sha256(&client_key).ct_eq(self.verifier.stored_key()).into();
        // Both cases did the same work; an unknown user never succeeds.
        if !matches || self.unknown {
            return Err(ScramError::AuthFailed);
        }
        let server_signature = hmac(self.verifier.server_key(), &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}
