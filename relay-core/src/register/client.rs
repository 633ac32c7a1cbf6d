//! A device's side of the registration protocol: a sans-IO state machine that registers,
//! proves the password, verifies the relay, keeps the registration alive at the granted
//! interval and unregisters (docs/registration-protocol.md, "States").
//!
//! As on the relay's side, the SCRAM computation lives outside: the session reports the
//! server-first message ([`ClientEvent::Challenge`], answer [`ClientSession::proof`]) and the
//! server-final one ([`ClientEvent::VerifyServer`], answer
//! [`ClientSession::server_verified`] or [`ClientSession::server_rejected`]).
//!
//! Invariant: the session never panics and never reads a clock; it counts itself registered
//! only after the shell has verified the relay's server signature — a relay that does not know
//! the password cannot register a device. Once [`ClientState::Closed`] nothing is sent or
//! reported any more.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;

use super::codec::{Decoder, Frame, Register, Registered};
use super::session::{CloseReason, SessionError};
use super::values::{
    DeviceType, ErrorCode, FirmwareVersion, Number, RegistrationId, ScramMessage, Text,
};

/// What a device registers as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// The device's internal number (also its SCRAM user name).
    pub number: Number,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The device type.
    pub device_type: DeviceType,
    /// The firmware version.
    pub firmware: FirmwareVersion,
    /// The device's own media address.
    pub media_addr: SocketAddr,
    /// Keepalive interval to ask for, seconds; 0: the relay's default.
    pub keepalive_s: u32,
    /// Longest time for an exchange (register to registered, unregister to unregistered), ms.
    pub handshake_timeout_ms: u64,
}

/// Where a [`ClientSession`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    /// `Register` sent; waiting for `Challenge` (or `Refused`).
    AwaitChallenge,
    /// `Challenge` received; waiting for the shell's [`proof`](ClientSession::proof).
    Proving,
    /// `Proof` sent; waiting for `Registered` (or `Refused`).
    AwaitRegistered,
    /// `Registered` received; waiting for the shell to verify the server signature.
    VerifyingServer,
    /// Registered: keepalives go out at the granted interval.
    Registered,
    /// `Unregister` sent; waiting for `Unregistered`.
    Unregistering,
    /// Ended; see [`ClientSession::close_reason`].
    Closed,
}

impl ClientState {
    /// Stable lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            ClientState::AwaitChallenge => "await_challenge",
            ClientState::Proving => "proving",
            ClientState::AwaitRegistered => "await_registered",
            ClientState::VerifyingServer => "verifying_server",
            ClientState::Registered => "registered",
            ClientState::Unregistering => "unregistering",
            ClientState::Closed => "closed",
        }
    }
}

impl fmt::Display for ClientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A registration as the device knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientRegistration {
    /// The relay's id for it.
    pub id: RegistrationId,
    /// Granted keepalive interval, seconds.
    pub keepalive_s: u32,
    /// The relay's expiry after silence, seconds.
    pub expires_s: u32,
    /// The device's address as the relay sees it (its home router's mapping).
    pub public_addr: SocketAddr,
    /// When it took effect (ms on the shell's clock).
    pub registered_at_ms: u64,
}

/// What a [`ClientSession`] tells its shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The SCRAM server-first message: compute the client-final message and answer with
    /// [`ClientSession::proof`].
    Challenge {
        /// The server-first message.
        server_first: ScramMessage,
    },
    /// The SCRAM server-final message: verify the server signature and answer with
    /// [`ClientSession::server_verified`] or [`ClientSession::server_rejected`].
    VerifyServer {
        /// The server-final message.
        server_final: ScramMessage,
    },
    /// The registration is in effect (first or renewed).
    Registered(ClientRegistration),
    /// The session ended; nothing more will happen.
    Closed(CloseReason),
}

/// A device's side of one registration connection. See the module documentation.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    state: ClientState,
    decoder: Decoder,
    transmits: VecDeque<Frame>,
    events: VecDeque<ClientEvent>,
    /// `Registered` as received, until the shell verified it.
    grant: Option<Registered>,
    registration: Option<ClientRegistration>,
    handshake_deadline: u64,
    next_keepalive: u64,
    /// Sequence number of the keepalive awaiting its answer.
    outstanding: Option<u32>,
    seq: u32,
    close_reason: Option<CloseReason>,
}

impl ClientSession {
    /// A session on a fresh connection at `now_ms`: `Register` with the SCRAM client-first
    /// message is the first frame to send.
    pub fn new(config: ClientConfig, client_first: ScramMessage, now_ms: u64) -> ClientSession {
        let mut session = ClientSession {
            config,
            state: ClientState::AwaitChallenge,
            decoder: Decoder::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            grant: None,
            registration: None,
            handshake_deadline: 0,
            next_keepalive: u64::MAX,
            outstanding: None,
            seq: 0,
            close_reason: None,
        };
        session.send_register(client_first, now_ms);
        session
    }

    /// The session's state.
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == ClientState::Closed
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// The registration in effect: `Some` from [`ClientSession::server_verified`] until the
    /// session ends, including during a renewal.
    pub fn registration(&self) -> Option<&ClientRegistration> {
        self.registration.as_ref()
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
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Bytes read from the connection; see [`ServerSession::handle_bytes`](super::ServerSession::handle_bytes).
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

    /// One decoded frame from the relay.
    pub fn handle_frame(&mut self, frame: Frame, _now_ms: u64) {
        use ClientState as S;
        match (self.state, frame) {
            (S::Closed, _) => {}
            (_, Frame::Error(e)) => self.close(CloseReason::ErrorReceived(e.code)),
            // The answer to a keepalive sent before a renewal or an unregistration may arrive
            // in any state.
            (_, Frame::KeepaliveAck { seq }) if self.outstanding == Some(seq) => {
                self.outstanding = None;
            }
            (S::Unregistering, Frame::Unregistered) => self.close(CloseReason::Unregistered),
            // The relay refused before it read `Unregister`: it has closed, no `Unregistered`
            // will come.
            (S::AwaitChallenge | S::AwaitRegistered | S::Unregistering, Frame::Refused(r)) => {
                self.close(CloseReason::Refused(r.refusal))
            }
            // Answers to what was sent before `Unregister` may still arrive; they no longer
            // matter.
            (S::Unregistering, _) => {}
            (S::AwaitChallenge, Frame::Challenge { server_first }) => {
                self.state = S::Proving;
                self.events
                    .push_back(ClientEvent::Challenge { server_first });
            }
            (S::AwaitRegistered, Frame::Registered(r)) => {
                self.state = S::VerifyingServer;
                let server_final = r.server_final.clone();
                self.grant = Some(r);
                self.events
                    .push_back(ClientEvent::VerifyServer { server_final });
            }
            (state, frame) => {
                let text = format!("{} in state {state}", frame.message_type());
                self.fail(ErrorCode::UnexpectedMessage, &text);
            }
        }
    }

    /// Answers [`ClientEvent::Challenge`]: sends the SCRAM client-final message.
    pub fn proof(&mut self, client_final: ScramMessage) -> Result<(), SessionError> {
        self.expect("proof", ClientState::Proving)?;
        self.transmits.push_back(Frame::Proof { client_final });
        self.state = ClientState::AwaitRegistered;
        Ok(())
    }

    /// Answers [`ClientEvent::VerifyServer`]: the server signature is right, so the
    /// registration is in effect; the first keepalive is due one interval from `now_ms`.
    pub fn server_verified(&mut self, now_ms: u64) -> Result<(), SessionError> {
        self.expect("server_verified", ClientState::VerifyingServer)?;
        let Some(grant) = self.grant.take() else {
            self.fail(ErrorCode::UnexpectedMessage, "no registration to verify");
            return Ok(());
        };
        let registration = ClientRegistration {
            id: grant.registration_id,
            keepalive_s: grant.keepalive_s,
            expires_s: grant.expires_s,
            public_addr: grant.public_addr,
            registered_at_ms: now_ms,
        };
        self.state = ClientState::Registered;
        self.registration = Some(registration);
        self.next_keepalive = self.keepalive_after(now_ms);
        self.events.push_back(ClientEvent::Registered(registration));
        Ok(())
    }

    /// Answers [`ClientEvent::VerifyServer`]: the server signature is wrong — the relay does
    /// not know the password. Sends `Error` (`server_auth_failed`) and closes.
    pub fn server_rejected(&mut self) -> Result<(), SessionError> {
        self.expect("server_rejected", ClientState::VerifyingServer)?;
        self.fail(
            ErrorCode::ServerAuthFailed,
            "server signature does not verify",
        );
        Ok(())
    }

    /// Renews a registration in effect with a new SCRAM exchange (e.g. after a configuration
    /// change): sends `Register`; keepalives pause until it is done.
    pub fn reregister(
        &mut self,
        client_first: ScramMessage,
        now_ms: u64,
    ) -> Result<(), SessionError> {
        self.expect("reregister", ClientState::Registered)?;
        self.send_register(client_first, now_ms);
        Ok(())
    }

    /// Ends the registration (or abandons an exchange): sends `Unregister` and waits for
    /// `Unregistered`.
    pub fn unregister(&mut self, now_ms: u64) -> Result<(), SessionError> {
        if matches!(self.state, ClientState::Unregistering | ClientState::Closed) {
            return Err(SessionError::WrongState {
                action: "unregister",
                state: self.state.name(),
            });
        }
        self.transmits.push_back(Frame::Unregister);
        self.state = ClientState::Unregistering;
        self.handshake_deadline = now_ms.saturating_add(self.config.handshake_timeout_ms);
        Ok(())
    }

    /// Ends the session from the device's side: sends an `Error` frame and closes.
    pub fn close_with(&mut self, code: ErrorCode, text: Text) {
        if !self.is_closed() {
            self.transmits.push_back(Frame::error(code, text));
            self.close(CloseReason::ErrorSent(code));
        }
    }

    /// The connection is gone: closes without sending.
    pub fn connection_lost(&mut self) {
        if !self.is_closed() {
            self.close(CloseReason::ConnectionLost);
        }
    }

    /// When [`ClientSession::handle_timeout`] must next be called: the next keepalive while
    /// registered, else the end of the exchange. `None` once closed.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            ClientState::Closed => None,
            ClientState::Registered => Some(self.next_keepalive),
            _ => Some(self.handshake_deadline),
        }
    }

    /// The time has come: sends the next keepalive — or, if the last one is still unanswered,
    /// gives up with `expired`; ends an exchange that did not finish in time. Early calls do
    /// nothing.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        match self.poll_timeout() {
            Some(deadline) if now_ms >= deadline => {}
            _ => return,
        }
        if self.state != ClientState::Registered {
            self.fail(ErrorCode::HandshakeTimeout, "exchange not finished in time");
        } else if self.outstanding.is_some() {
            self.fail(ErrorCode::Expired, "keepalive not answered in time");
        } else {
            self.seq = self.seq.wrapping_add(1);
            self.outstanding = Some(self.seq);
            self.transmits.push_back(Frame::Keepalive { seq: self.seq });
            self.next_keepalive = self.keepalive_after(now_ms);
        }
    }

    fn send_register(&mut self, client_first: ScramMessage, now_ms: u64) {
        let c = &self.config;
        self.transmits.push_back(Frame::Register(Register {
            number: c.number.clone(),
            mac: c.mac,
            device_type: c.device_type.clone(),
            firmware: c.firmware.clone(),
            media_addr: c.media_addr,
            keepalive_s: c.keepalive_s,
            client_first,
        }));
        self.state = ClientState::AwaitChallenge;
        self.handshake_deadline = now_ms.saturating_add(self.config.handshake_timeout_ms);
    }

    /// One keepalive interval after `now_ms` (at least a second, whatever the relay granted).
    fn keepalive_after(&self, now_ms: u64) -> u64 {
        let keepalive_s = self.registration.map_or(1, |r| r.keepalive_s.max(1));
        now_ms.saturating_add(u64::from(keepalive_s) * 1000)
    }

    fn expect(&self, action: &'static str, state: ClientState) -> Result<(), SessionError> {
        if self.state == state {
            Ok(())
        } else {
            Err(SessionError::WrongState {
                action,
                state: self.state.name(),
            })
        }
    }

    fn fail(&mut self, code: ErrorCode, text: &str) {
        self.close_with(code, Text::lossy(text));
    }

    fn close(&mut self, reason: CloseReason) {
        self.state = ClientState::Closed;
        self.grant = None;
        self.registration = None;
        self.outstanding = None;
        self.close_reason = Some(reason);
        self.events.push_back(ClientEvent::Closed(reason));
    }
}
