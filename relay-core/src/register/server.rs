//! The relay's side of one registration connection: a sans-IO state machine
//! (docs/registration-protocol.md, "States").
//!
//! The shell feeds it bytes ([`ServerSession::handle_bytes`]) or frames, and the time; it
//! hands back frames to send ([`ServerSession::poll_transmit`]) and events
//! ([`ServerSession::poll_event`]). Two events are questions the shell answers, because the
//! SCRAM computation and the device records live outside: [`ServerEvent::Authenticate`]
//! (answer [`ServerSession::challenge`] or [`ServerSession::refuse`]) and
//! [`ServerEvent::VerifyProof`] (answer [`ServerSession::accept`] or `refuse`).
//!
//! Invariant: the session never panics and never reads a clock. Any frame the state does not
//! expect, and any undecodable byte, closes the session with an `Error` frame; once
//! [`ServerState::Closed`] nothing is sent or reported any more, whatever comes in. A refusal
//! that reveals the device's record is only possible after the client's proof.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;

use super::codec::{Decoder, Frame, Refused, Register, Registered};
use super::session::{CloseReason, SessionError};
use super::values::{
    DeviceType, ErrorCode, FirmwareVersion, Number, Refusal, RegistrationId, ScramMessage, Text,
};

/// The relay's keepalive and timeout policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Shortest keepalive interval granted, seconds.
    pub min_keepalive_s: u32,
    /// Longest keepalive interval granted, seconds.
    pub max_keepalive_s: u32,
    /// Interval granted to a client that asks for 0 (no preference), seconds.
    pub default_keepalive_s: u32,
    /// Keepalive intervals without any frame from the client before the registration
    /// expires: `expires = keepalive × keepalive_misses`.
    pub keepalive_misses: u32,
    /// Longest time from the connection (or a renewing `Register`) to the end of the exchange
    /// (`Registered` or `Refused`), in milliseconds; the shell's answers count against it.
    pub handshake_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            min_keepalive_s: 15,
            max_keepalive_s: 600,
            default_keepalive_s: 60,
            keepalive_misses: 3,
            handshake_timeout_ms: 10_000,
        }
    }
}

/// Longest keepalive interval a [`ServerConfig`] may grant: one day.
pub const MAX_KEEPALIVE_S: u32 = 86_400;

/// A [`ServerConfig`] that cannot work: the field and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ServerConfigError {
    /// The field at fault.
    pub field: &'static str,
    /// Why (lowercase).
    pub reason: &'static str,
}

impl ServerConfig {
    /// Checks the bounds are ordered and the products fit the wire's u32 seconds.
    pub fn validate(&self) -> Result<(), ServerConfigError> {
        let err = |field, reason| Err(ServerConfigError { field, reason });
        if self.min_keepalive_s == 0 {
            return err("min_keepalive_s", "must be at least 1");
        }
        if self.max_keepalive_s < self.min_keepalive_s {
            return err("max_keepalive_s", "must not be below min_keepalive_s");
        }
        if self.max_keepalive_s > MAX_KEEPALIVE_S {
            return err("max_keepalive_s", "must be at most 86400 (one day)");
        }
        if !(self.min_keepalive_s..=self.max_keepalive_s).contains(&self.default_keepalive_s) {
            return err(
                "default_keepalive_s",
                "must lie between min_keepalive_s and max_keepalive_s",
            );
        }
        if !(2..=10).contains(&self.keepalive_misses) {
            return err("keepalive_misses", "must be 2 to 10");
        }
        if self.handshake_timeout_ms == 0 {
            return err("handshake_timeout_ms", "must be at least 1");
        }
        Ok(())
    }

    /// The keepalive interval granted for a requested one (0: no preference).
    pub fn grant(&self, requested_s: u32) -> u32 {
        let requested = if requested_s == 0 {
            self.default_keepalive_s
        } else {
            requested_s
        };
        requested.clamp(
            self.min_keepalive_s,
            self.max_keepalive_s.max(self.min_keepalive_s),
        )
    }

    /// The expiry that goes with a granted interval.
    pub fn expires(&self, keepalive_s: u32) -> u32 {
        keepalive_s.saturating_mul(self.keepalive_misses)
    }
}

/// Where a [`ServerSession`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerState {
    /// Connected; waiting for `Register`.
    AwaitRegister,
    /// `Register` received; waiting for the shell's [`challenge`](ServerSession::challenge)
    /// or [`refuse`](ServerSession::refuse).
    Authenticating,
    /// `Challenge` sent; waiting for the client's `Proof`.
    AwaitProof,
    /// `Proof` received; waiting for the shell's [`accept`](ServerSession::accept) or refuse.
    Verifying,
    /// Registered: keepalives are answered, and the registration expires after `expires_s`
    /// seconds without a frame from the client.
    Registered,
    /// Ended; see [`ServerSession::close_reason`].
    Closed,
}

impl ServerState {
    /// Stable lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            ServerState::AwaitRegister => "await_register",
            ServerState::Authenticating => "authenticating",
            ServerState::AwaitProof => "await_proof",
            ServerState::Verifying => "verifying",
            ServerState::Registered => "registered",
            ServerState::Closed => "closed",
        }
    }
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A registration in effect, as the relay records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The id the shell gave it in [`ServerSession::accept`].
    pub id: RegistrationId,
    /// The device's number.
    pub number: Number,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The device type.
    pub device_type: DeviceType,
    /// The firmware version.
    pub firmware: FirmwareVersion,
    /// The device's own media address.
    pub media_addr: SocketAddr,
    /// The connection's source address as the relay sees it (the home router's mapping).
    pub public_addr: SocketAddr,
    /// Granted keepalive interval, seconds.
    pub keepalive_s: u32,
    /// Expiry after silence, seconds.
    pub expires_s: u32,
    /// When it took effect (the latest `accept`), ms on the shell's clock.
    pub registered_at_ms: u64,
}

/// What a [`ServerSession`] tells its shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// A device asks to register: look it up and answer with [`ServerSession::challenge`]
    /// (the SCRAM server-first message) or [`ServerSession::refuse`]. For an unknown number
    /// answer with a challenge all the same (a made-up salt, derived from a secret and the
    /// number so it is stable), and refuse `auth_failed` after the proof — exactly as for a
    /// wrong password.
    Authenticate {
        /// The request, SCRAM client-first message included.
        request: Register,
        /// The session was registered: this renews it (the old registration stays in effect
        /// until the outcome; a refusal ends it).
        renewal: bool,
    },
    /// The client's proof: verify it and answer with [`ServerSession::accept`] (the SCRAM
    /// server-final message) or [`ServerSession::refuse`].
    VerifyProof {
        /// The SCRAM client-final message.
        client_final: ScramMessage,
    },
    /// A registration took effect (first or renewed).
    Registered(Registration),
    /// The session ended; nothing more will happen. The shell closes the connection once it
    /// has sent what [`ServerSession::poll_transmit`] still gives.
    Closed(CloseReason),
}

/// The relay's side of one registration connection. See the module documentation.
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    peer: SocketAddr,
    state: ServerState,
    decoder: Decoder,
    transmits: VecDeque<Frame>,
    events: VecDeque<ServerEvent>,
    /// The request under authentication (Authenticating, AwaitProof, Verifying).
    pending: Option<Register>,
    /// The registration in effect (Registered, and during a renewal).
    registration: Option<Registration>,
    /// End of the current exchange (all states but Registered and Closed).
    handshake_deadline: u64,
    /// When the registration expires, moved on by every frame from the client.
    expiry_deadline: u64,
    close_reason: Option<CloseReason>,
}

impl ServerSession {
    /// A session for a connection from `peer` (its source address and port as accepted),
    /// accepted at `now_ms`.
    pub fn new(
        config: ServerConfig,
        peer: SocketAddr,
        now_ms: u64,
    ) -> Result<ServerSession, ServerConfigError> {
        config.validate()?;
        Ok(ServerSession {
            config,
            peer,
            state: ServerState::AwaitRegister,
            decoder: Decoder::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            pending: None,
            registration: None,
            handshake_deadline: now_ms.saturating_add(config.handshake_timeout_ms),
            expiry_deadline: u64::MAX,
            close_reason: None,
        })
    }

    /// The session's state.
    pub fn state(&self) -> ServerState {
        self.state
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == ServerState::Closed
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// The registration in effect: `Some` while registered, including during a renewal.
    pub fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    /// The peer address the session was created with.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmits.pop_front()
    }

    /// Encodes every frame to send into `buf`.
    pub fn encode_transmits(&mut self, buf: &mut Vec<u8>) {
        while let Some(f) = self.transmits.pop_front() {
            f.encode(buf);
        }
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Bytes read from the connection. Every complete frame in them is handled in order; an
    /// undecodable frame closes the session with an `Error` frame.
    pub fn handle_bytes(&mut self, bytes: &[u8], now_ms: u64) {
        if self.is_closed() {
            return;
        }
        self.decoder.feed(bytes);
        while !self.is_closed() {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => self.handle_frame(frame, now_ms),
                Ok(None) => break,
                Err(e) => self.fail(e.error_code(), &e.to_string()),
            }
        }
    }

    /// One decoded frame from the client.
    pub fn handle_frame(&mut self, frame: Frame, now_ms: u64) {
        use ServerState as S;
        match (self.state, frame) {
            (S::Closed, _) => {}
            (_, Frame::Error(e)) => self.close(CloseReason::ErrorReceived(e.code)),
            (S::AwaitRegister | S::Registered, Frame::Register(request)) => {
                let renewal = self.state == S::Registered;
                if renewal {
                    self.expiry_deadline = self.expiry_after(now_ms);
                }
                self.handshake_deadline = now_ms.saturating_add(self.config.handshake_timeout_ms);
                self.pending = Some(request.clone());
                self.state = S::Authenticating;
                self.events
                    .push_back(ServerEvent::Authenticate { request, renewal });
            }
            (S::AwaitProof, Frame::Proof { client_final }) => {
                self.state = S::Verifying;
                self.events
                    .push_back(ServerEvent::VerifyProof { client_final });
            }
            (S::Registered, Frame::Keepalive { seq }) => {
                self.expiry_deadline = self.expiry_after(now_ms);
                self.transmits.push_back(Frame::KeepaliveAck { seq });
            }
            (_, Frame::Unregister) => {
                self.transmits.push_back(Frame::Unregistered);
                self.close(CloseReason::Unregistered);
            }
            (state, frame) => {
                let text = format!("{} in state {state}", frame.message_type());
                self.fail(ErrorCode::UnexpectedMessage, &text);
            }
        }
    }

    /// Answers [`ServerEvent::Authenticate`]: sends the SCRAM server-first message.
    pub fn challenge(&mut self, server_first: ScramMessage) -> Result<(), SessionError> {
        self.expect("challenge", ServerState::Authenticating)?;
        self.transmits.push_back(Frame::Challenge { server_first });
        self.state = ServerState::AwaitProof;
        Ok(())
    }

    /// Answers [`ServerEvent::VerifyProof`] positively: the registration takes effect with id
    /// `id`, and `Registered` carries the SCRAM server-final message.
    pub fn accept(
        &mut self,
        id: RegistrationId,
        server_final: ScramMessage,
        now_ms: u64,
    ) -> Result<(), SessionError> {
        self.expect("accept", ServerState::Verifying)?;
        let Some(request) = self.pending.take() else {
            // Verifying always has a pending request; a session that lost it cannot register.
            self.fail(ErrorCode::UnexpectedMessage, "no pending request");
            return Ok(());
        };
        let keepalive_s = self.config.grant(request.keepalive_s);
        let expires_s = self.config.expires(keepalive_s);
        let registration = Registration {
            id,
            number: request.number,
            mac: request.mac,
            device_type: request.device_type,
            firmware: request.firmware,
            media_addr: request.media_addr,
            public_addr: self.peer,
            keepalive_s,
            expires_s,
            registered_at_ms: now_ms,
        };
        self.transmits.push_back(Frame::Registered(Registered {
            server_final,
            keepalive_s,
            expires_s,
            public_addr: self.peer,
            registration_id: id,
        }));
        self.state = ServerState::Registered;
        self.registration = Some(registration.clone());
        self.expiry_deadline = self.expiry_after(now_ms);
        self.events.push_back(ServerEvent::Registered(registration));
        Ok(())
    }

    /// Answers [`ServerEvent::Authenticate`] or [`ServerEvent::VerifyProof`] negatively: sends
    /// `Refused` and closes (a renewal's old registration ends too). Refusals that
    /// [need the proof](Refusal::needs_proof) are refused while authenticating.
    pub fn refuse(&mut self, refusal: Refusal, text: Text) -> Result<(), SessionError> {
        match self.state {
            ServerState::Authenticating if refusal.needs_proof() => {
                return Err(SessionError::RefusalBeforeProof(refusal.name()));
            }
            ServerState::Authenticating | ServerState::Verifying => {}
            state => {
                return Err(SessionError::WrongState {
                    action: "refuse",
                    state: state.name(),
                });
            }
        }
        self.transmits
            .push_back(Frame::Refused(Refused { refusal, text }));
        self.close(CloseReason::Refused(refusal));
        Ok(())
    }

    /// Ends the session from the relay's side (e.g. [`ErrorCode::ShuttingDown`]): sends an
    /// `Error` frame and closes. Nothing happens once closed.
    pub fn close_with(&mut self, code: ErrorCode, text: Text) {
        if !self.is_closed() {
            self.transmits.push_back(Frame::error(code, text));
            self.close(CloseReason::ErrorSent(code));
        }
    }

    /// The connection is gone (end of stream, reset): closes without sending.
    pub fn connection_lost(&mut self) {
        if !self.is_closed() {
            self.close(CloseReason::ConnectionLost);
        }
    }

    /// When [`ServerSession::handle_timeout`] must next be called (ms on the shell's clock):
    /// the end of the exchange, or the registration's expiry (during a renewal, whichever
    /// comes first). `None` once closed.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            ServerState::Closed => None,
            ServerState::Registered => Some(self.expiry_deadline),
            _ if self.registration.is_some() => {
                Some(self.handshake_deadline.min(self.expiry_deadline))
            }
            _ => Some(self.handshake_deadline),
        }
    }

    /// The time has come: a registration without news for its expiry time expires, an
    /// exchange that did not finish in time ends. Early calls do nothing.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        match self.poll_timeout() {
            Some(deadline) if now_ms >= deadline => {}
            _ => return,
        }
        if self.registration.is_some() && now_ms >= self.expiry_deadline {
            self.fail(ErrorCode::Expired, "no keepalive received in time");
        } else {
            self.fail(ErrorCode::HandshakeTimeout, "exchange not finished in time");
        }
    }

    fn expiry_after(&self, now_ms: u64) -> u64 {
        let expires_s = self
            .registration
            .as_ref()
            .map_or(0, |r| u64::from(r.expires_s));
        now_ms.saturating_add(expires_s.saturating_mul(1000))
    }

    fn expect(&self, action: &'static str, state: ServerState) -> Result<(), SessionError> {
        if self.state == state {
            Ok(())
        } else {
            Err(SessionError::WrongState {
                action,
                state: self.state.name(),
            })
        }
    }

    /// Sends an `Error` frame and closes.
    fn fail(&mut self, code: ErrorCode, text: &str) {
        self.close_with(code, Text::lossy(text));
    }

    fn close(&mut self, reason: CloseReason) {
        self.state = ServerState::Closed;
        self.pending = None;
        self.registration = None;
        self.close_reason = Some(reason);
        self.events.push_back(ServerEvent::Closed(reason));
    }
}
