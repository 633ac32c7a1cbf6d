//! What the two session state machines share: why a session closed ([`CloseReason`]) and the
//! error a shell gets when it answers out of turn ([`SessionError`]).
//!
//! Invariant: a [`SessionError`] is about the shell's call, never about the peer — a peer's
//! mistake closes the session with an `Error` frame and a [`CloseReason`], it is not returned.

use std::fmt;

use super::values::{ErrorCode, Refusal};

/// Why a session is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client unregistered and the relay confirmed it.
    Unregistered,
    /// The relay refused the registration.
    Refused(Refusal),
    /// This side sent an `Error` frame with this code (a protocol error of the peer, a timeout,
    /// or the shell's [`close`](super::ServerSession::close)).
    ErrorSent(ErrorCode),
    /// The peer sent an `Error` frame with this code.
    ErrorReceived(ErrorCode),
    /// The shell reported the connection gone (end of stream, reset).
    ConnectionLost,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Unregistered => f.write_str("unregistered"),
            CloseReason::Refused(r) => write!(f, "refused: {r}"),
            CloseReason::ErrorSent(c) => write!(f, "error sent: {c}"),
            CloseReason::ErrorReceived(c) => write!(f, "error received: {c}"),
            CloseReason::ConnectionLost => f.write_str("connection lost"),
        }
    }
}

/// A shell's call that the session's state does not allow; the session is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The call answers a question the session has not asked, or acts in a state that does
    /// not allow it.
    #[error("{action} is not possible in state {state}")]
    WrongState {
        /// The call (`challenge`, `accept`, `proof`...).
        action: &'static str,
        /// The session's state's name.
        state: &'static str,
    },
    /// A refusal that reveals something about the device's record before the client's proof
    /// ([`Refusal::needs_proof`]): an unknown number must get a challenge like any other, and
    /// `auth_failed` after its proof.
    #[error("{0} may only be sent after the client's proof")]
    RefusalBeforeProof(&'static str),
}
