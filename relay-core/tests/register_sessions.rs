//! The registration sessions end to end: a `ClientSession` and a `ServerSession` connected by
//! bytes, with a stand-in for SCRAM (opaque messages whose "proof" is only right with the right
//! password — the real SCRAM-SHA-256 is wired in by the shells). Registration, keepalives,
//! renewal, unregistration, refusals, timeouts and out-of-order frames.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::net::SocketAddr;

use relay_core::register::{
    ClientConfig, ClientEvent, ClientSession, ClientState, CloseReason, DeviceType, ErrorCode,
    FirmwareVersion, Frame, Number, Refusal, Refused, RegistrationId, ScramMessage, ServerConfig,
    ServerEvent, ServerSession, ServerState, SessionError, Text,
};

const PEER: &str = "203.0.113.7:40123";
const MEDIA: &str = "192.168.1.20:5004";

fn scram(s: &str) -> ScramMessage {
    ScramMessage::new(s.as_bytes().to_vec()).unwrap()
}

fn client_config(number: &str, keepalive_s: u32) -> ClientConfig {
    ClientConfig {
        number: Number::new(number).unwrap(),
        mac: [0x00, 0x1a, 0xe8, 0x12, 0x34, 0x56],
        device_type: DeviceType::new("openstage_hfa").unwrap(),
        firmware: FirmwareVersion::new("V3 R0.40.4").unwrap(),
        media_addr: MEDIA.parse().unwrap(),
        keepalive_s,
        handshake_timeout_ms: 10_000,
    }
}

/// The stand-in for the relay's device records and SCRAM server.
struct Directory {
    devices: Vec<(&'static str, &'static str)>,
    next_id: u64,
}

impl Directory {
    fn password(&self, number: &str) -> Option<&'static str> {
        self.devices
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, p)| *p)
    }
}

/// A client and a relay session over one connection, and the two shells.
struct Pair {
    client: ClientSession,
    server: ServerSession,
    /// The client's password, as its SCRAM client would use it.
    password: &'static str,
    directory: Directory,
    /// The number under authentication on the server side.
    authenticating: Option<String>,
    /// Whether the server's shell rejects a proof even if right (renewal refusals).
    reject_next_proof: Option<Refusal>,
    /// Whether the client's shell finds the server signature wrong.
    distrust_server: bool,
    now: u64,
    client_events: Vec<ClientEvent>,
    server_events: Vec<ServerEvent>,
    /// Every frame the relay sent, in order.
    server_sent: Vec<Frame>,
    /// Every frame the client sent, in order.
    client_sent: Vec<Frame>,
}

impl Pair {
    fn new(number: &str, password: &'static str, keepalive_s: u32) -> Pair {
        let client = ClientSession::new(client_config(number, keepalive_s), first(number), 0);
        let server = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
        Pair {
            client,
            server,
            password,
            directory: Directory {
                devices: vec![("4711", "correct horse"), ("4712", "battery staple")],
                next_id: 1,
            },
            authenticating: None,
            reject_next_proof: None,
            distrust_server: false,
            now: 0,
            client_events: Vec::new(),
            server_events: Vec::new(),
            server_sent: Vec::new(),
            client_sent: Vec::new(),
        }
    }

    /// Moves bytes both ways and answers the shells' questions until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            let mut buf = Vec::new();
            while let Some(f) = self.client.poll_transmit() {
                f.encode(&mut buf);
                self.client_sent.push(f);
            }
            if !buf.is_empty() {
                moved = true;
                self.server.handle_bytes(&buf, self.now);
            }
            while let Some(e) = self.server.poll_event() {
                moved = true;
                self.answer_server(&e);
                self.server_events.push(e);
            }
            let mut buf = Vec::new();
            while let Some(f) = self.server.poll_transmit() {
                f.encode(&mut buf);
                self.server_sent.push(f);
            }
            if !buf.is_empty() {
                moved = true;
                // Byte at a time: the client must not care how the stream is split.
                for b in buf {
                    self.client.handle_bytes(&[b], self.now);
                }
            }
            while let Some(e) = self.client.poll_event() {
                moved = true;
                self.answer_client(&e);
                self.client_events.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    fn answer_server(&mut self, e: &ServerEvent) {
        match e {
            ServerEvent::Authenticate { request, .. } => {
                // An unknown number gets a challenge like a known one.
                self.authenticating = Some(request.number.as_str().to_owned());
                let first = String::from_utf8(request.client_first.as_bytes().to_vec()).unwrap();
                let nonce = first.rsplit("r=").next().unwrap().to_owned();
                self.server
                    .challenge(scram(&format!("r={nonce}srv,s=c2FsdA==,i=4096")))
                    .unwrap();
            }
            ServerEvent::VerifyProof { client_final } => {
                let number = self.authenticating.take().unwrap();
                let right = self
                    .directory
                    .password(&number)
                    .is_some_and(|p| client_final.as_bytes().ends_with(p.as_bytes()));
                match (right, self.reject_next_proof.take()) {
                    (true, None) => {
                        let id = RegistrationId(self.directory.next_id);
                        self.directory.next_id += 1;
                        let signature = format!("v={}", self.directory.password(&number).unwrap());
                        self.server.accept(id, scram(&signature), self.now).unwrap();
                    }
                    (true, Some(refusal)) => self.server.refuse(refusal, Text::empty()).unwrap(),
                    (false, _) => self
                        .server
                        .refuse(Refusal::AuthFailed, Text::lossy("authentication failed"))
                        .unwrap(),
                }
            }
            ServerEvent::Registered(_) | ServerEvent::Closed(_) => {}
        }
    }

    fn answer_client(&mut self, e: &ClientEvent) {
        match e {
            ClientEvent::Challenge { .. } => {
                let proof = format!("c=biws,r=x,p={}", self.password);
                self.client.proof(scram(&proof)).unwrap();
            }
            ClientEvent::VerifyServer { server_final } => {
                let expected = format!("v={}", self.password);
                if !self.distrust_server && server_final.as_bytes() == expected.as_bytes() {
                    self.client.server_verified(self.now).unwrap();
                } else {
                    self.client.server_rejected().unwrap();
                }
            }
            ClientEvent::Registered(_) | ClientEvent::Closed(_) => {}
        }
    }

    /// Advances the clock to `t` ms, firing both sides' timeouts on the way.
    fn advance_to(&mut self, t: u64) {
        loop {
            let next = [self.client.poll_timeout(), self.server.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|&d| d <= t)
                .min();
            let Some(d) = next else { break };
            self.now = self.now.max(d);
            self.client.handle_timeout(self.now);
            self.server.handle_timeout(self.now);
            self.pump();
        }
        self.now = t;
    }
}

fn first(number: &str) -> ScramMessage {
    scram(&format!("n,,n={number},r=cli"))
}

#[test]
fn register_keep_alive_and_unregister() {
    let mut p = Pair::new("4711", "correct horse", 30);
    p.pump();
    assert_eq!(p.client.state(), ClientState::Registered);
    assert_eq!(p.server.state(), ServerState::Registered);
    let reg = p.client.registration().copied().unwrap();
    assert_eq!(reg.public_addr, PEER.parse::<SocketAddr>().unwrap());
    assert_eq!(reg.keepalive_s, 30);
    assert_eq!(reg.expires_s, 90);
    let server_reg = p.server.registration().unwrap();
    assert_eq!(server_reg.id, reg.id);
    assert_eq!(server_reg.media_addr, MEDIA.parse::<SocketAddr>().unwrap());
    assert_eq!(server_reg.number.as_str(), "4711");
    assert!(matches!(
        p.server_events.as_slice(),
        [
            ServerEvent::Authenticate { renewal: false, .. },
            ServerEvent::VerifyProof { .. },
            ServerEvent::Registered(_)
        ]
    ));

    // An hour of keepalives: one every 30 s, each answered; the relay never expires.
    p.advance_to(3_600_000);
    let keepalives = p
        .client_sent
        .iter()
        .filter(|f| matches!(f, Frame::Keepalive { .. }))
        .count();
    assert_eq!(keepalives, 120);
    let acks: Vec<u32> = p
        .server_sent
        .iter()
        .filter_map(|f| match f {
            Frame::KeepaliveAck { seq } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(acks, (1..=120).collect::<Vec<u32>>());
    assert_eq!(p.server.state(), ServerState::Registered);
    assert_eq!(p.server.poll_timeout(), Some(3_600_000 + 90_000));

    p.client.unregister(p.now).unwrap();
    p.pump();
    assert_eq!(p.client.close_reason(), Some(CloseReason::Unregistered));
    assert_eq!(p.server.close_reason(), Some(CloseReason::Unregistered));
    assert_eq!(p.server.registration(), None);
    assert_eq!(p.client.poll_timeout(), None);
    assert_eq!(p.server.poll_timeout(), None);
}

#[test]
fn unknown_device_and_wrong_password_get_the_same_answer() {
    let mut wrong = Pair::new("4711", "not the password", 0);
    let mut unknown = Pair::new("9999", "whatever", 0);
    wrong.pump();
    unknown.pump();
    for p in [&wrong, &unknown] {
        assert_eq!(
            p.client.close_reason(),
            Some(CloseReason::Refused(Refusal::AuthFailed))
        );
        // Both got a challenge first, and the refusal only after the proof.
        assert!(matches!(
            p.server_sent.as_slice(),
            [Frame::Challenge { .. }, Frame::Refused(_)]
        ));
    }
    assert_eq!(wrong.server_sent, unknown.server_sent);
}

#[test]
fn a_refusal_that_reveals_the_record_needs_the_proof() {
    let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
    let mut c = ClientSession::new(client_config("4711", 0), first("4711"), 0);
    s.handle_frame(c.poll_transmit().unwrap(), 0);
    assert_eq!(s.state(), ServerState::Authenticating);
    for r in [
        Refusal::AuthFailed,
        Refusal::WeakPassword,
        Refusal::NotAllowedExternal,
    ] {
        assert_eq!(
            s.refuse(r, Text::empty()),
            Err(SessionError::RefusalBeforeProof(r.name()))
        );
    }
    assert_eq!(s.state(), ServerState::Authenticating);
    assert_eq!(s.poll_transmit(), None);
    // What does not depend on the record may be said at once.
    s.refuse(Refusal::FirmwareTooOld, Text::lossy("minimum V3 R0.40.4"))
        .unwrap();
    let refused = s.poll_transmit().unwrap();
    assert!(matches!(
        refused,
        Frame::Refused(Refused {
            refusal: Refusal::FirmwareTooOld,
            ..
        })
    ));
    c.handle_frame(refused, 1);
    assert_eq!(
        c.close_reason(),
        Some(CloseReason::Refused(Refusal::FirmwareTooOld))
    );
}

#[test]
fn locked_out_carries_retry_after_to_the_client() {
    let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
    let mut c = ClientSession::new(client_config("4711", 0), first("4711"), 0);
    let mut buf = Vec::new();
    c.encode_transmits(&mut buf);
    s.handle_bytes(&buf, 0);
    let refusal = Refusal::LockedOut { retry_after_s: 900 };
    s.refuse(refusal, Text::empty()).unwrap();
    let mut buf = Vec::new();
    s.encode_transmits(&mut buf);
    c.handle_bytes(&buf, 1);
    assert_eq!(c.close_reason(), Some(CloseReason::Refused(refusal)));
    assert_eq!(
        c.poll_event(),
        Some(ClientEvent::Closed(CloseReason::Refused(refusal)))
    );
}

#[test]
fn the_relay_expires_a_silent_registration() {
    let mut p = Pair::new("4711", "correct horse", 20);
    p.pump();
    assert_eq!(p.server.poll_timeout(), Some(60_000));
    // The client's shell stops driving it (say the phone lost power): only the relay's timer.
    p.server.handle_timeout(59_999);
    assert_eq!(p.server.state(), ServerState::Registered);
    p.server.handle_timeout(60_000);
    assert_eq!(
        p.server.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::Expired))
    );
    assert!(matches!(
        p.server.poll_transmit(),
        Some(Frame::Error(e)) if e.code == ErrorCode::Expired
    ));
    assert_eq!(p.server.registration(), None);
}

#[test]
fn the_client_gives_up_on_an_unanswered_keepalive() {
    let mut p = Pair::new("4711", "correct horse", 20);
    p.pump();
    p.client.handle_timeout(20_000);
    assert!(matches!(
        p.client.poll_transmit(),
        Some(Frame::Keepalive { seq: 1 })
    ));
    // The keepalive is lost: no answer by the next one.
    p.client.handle_timeout(40_000);
    assert_eq!(
        p.client.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::Expired))
    );
}

#[test]
fn keepalive_intervals_are_clamped() {
    let config = ServerConfig::default();
    for (requested, granted) in [(0, 60), (1, 15), (30, 30), (u32::MAX, 600)] {
        let mut p = Pair::new("4711", "correct horse", requested);
        p.pump();
        assert_eq!(p.client.registration().unwrap().keepalive_s, granted);
        assert_eq!(
            p.client.registration().unwrap().expires_s,
            granted * config.keepalive_misses
        );
    }
}

#[test]
fn handshake_timeouts() {
    // A connection that never registers.
    let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 1_000).unwrap();
    assert_eq!(s.poll_timeout(), Some(11_000));
    s.handle_timeout(10_999);
    assert_eq!(s.state(), ServerState::AwaitRegister);
    s.handle_timeout(11_000);
    assert_eq!(
        s.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::HandshakeTimeout))
    );
    // A client whose relay never answers.
    let mut c = ClientSession::new(client_config("4711", 0), first("4711"), 5);
    assert_eq!(c.poll_timeout(), Some(10_005));
    c.handle_timeout(10_005);
    assert_eq!(
        c.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::HandshakeTimeout))
    );
    // A shell that never answers the relay's question counts against the same deadline.
    let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
    let mut c = ClientSession::new(client_config("4711", 0), first("4711"), 0);
    s.handle_frame(c.poll_transmit().unwrap(), 9_000);
    assert_eq!(s.poll_timeout(), Some(19_000));
    s.handle_timeout(19_000);
    assert_eq!(
        s.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::HandshakeTimeout))
    );
}

#[test]
fn out_of_order_frames_close_with_an_error() {
    let out_of_order = [
        Frame::Keepalive { seq: 1 },
        Frame::Proof {
            client_final: scram("c=biws"),
        },
        Frame::Registered(relay_core::register::Registered {
            server_final: scram("v=x"),
            keepalive_s: 1,
            expires_s: 3,
            public_addr: PEER.parse().unwrap(),
            registration_id: RegistrationId(1),
        }),
        Frame::Unregistered,
    ];
    for frame in out_of_order {
        let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
        s.handle_frame(frame.clone(), 1);
        assert_eq!(
            s.close_reason(),
            Some(CloseReason::ErrorSent(ErrorCode::UnexpectedMessage)),
            "{frame:?}"
        );
        assert!(
            matches!(s.poll_transmit(), Some(Frame::Error(e)) if e.code == ErrorCode::UnexpectedMessage)
        );
        // Closed is final: nothing more is sent or reported, whatever arrives.
        while s.poll_event().is_some() {}
        s.handle_bytes(&Frame::Unregister.to_bytes(), 2);
        s.handle_timeout(u64::MAX);
        s.close_with(ErrorCode::ShuttingDown, Text::empty());
        assert_eq!(s.poll_transmit(), None);
        assert_eq!(s.poll_event(), None);
    }
    // A proof while the relay's shell is still deciding on the challenge.
    let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
    let mut c = ClientSession::new(client_config("4711", 0), first("4711"), 0);
    s.handle_frame(c.poll_transmit().unwrap(), 0);
    s.handle_frame(
        Frame::Proof {
            client_final: scram("c=biws"),
        },
        0,
    );
    assert_eq!(
        s.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::UnexpectedMessage))
    );
    assert_eq!(
        s.challenge(scram("r=x")),
        Err(SessionError::WrongState {
            action: "challenge",
            state: "closed"
        })
    );
    // The client: a keepalive answer nobody asked for.
    c.handle_frame(Frame::KeepaliveAck { seq: 9 }, 0);
    assert_eq!(
        c.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::UnexpectedMessage))
    );
}

#[test]
fn garbage_closes_with_the_matching_error_code() {
    for (bytes, code) in [
        (
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            ErrorCode::UnsupportedVersion,
        ),
        (&[0x48, 0x02][..], ErrorCode::UnsupportedVersion),
        (
            &[0x48, 0x01, 0x01, 0x00, 0xff, 0xff][..],
            ErrorCode::FrameTooLarge,
        ),
        (
            &[0x48, 0x01, 0x06, 0x00, 0x00, 0x00][..],
            ErrorCode::MalformedFrame,
        ),
        (
            &[0x48, 0x01, 0x63, 0x00, 0x00, 0x00][..],
            ErrorCode::MalformedFrame,
        ),
    ] {
        let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
        s.handle_bytes(bytes, 0);
        assert_eq!(
            s.close_reason(),
            Some(CloseReason::ErrorSent(code)),
            "{bytes:?}"
        );
    }
}

#[test]
fn renewal_keeps_the_registration_until_the_outcome() {
    let mut p = Pair::new("4711", "correct horse", 30);
    p.pump();
    let first_id = p.server.registration().unwrap().id;
    p.advance_to(100_000);
    p.client.reregister(first("4711"), p.now).unwrap();
    // Before the relay answers, both still hold the registration.
    assert!(p.client.registration().is_some());
    p.pump();
    assert_eq!(p.client.state(), ClientState::Registered);
    let renewed = p.server.registration().unwrap().id;
    assert_ne!(renewed, first_id);
    assert!(matches!(
        p.server_events
            .iter()
            .filter(|e| matches!(e, ServerEvent::Authenticate { renewal: true, .. }))
            .count(),
        1
    ));
    // A renewal the relay refuses ends the old registration too.
    p.reject_next_proof = Some(Refusal::NotAllowedExternal);
    p.client.reregister(first("4711"), p.now).unwrap();
    p.pump();
    assert_eq!(
        p.server.close_reason(),
        Some(CloseReason::Refused(Refusal::NotAllowedExternal))
    );
    assert_eq!(p.server.registration(), None);
    assert_eq!(p.client.registration(), None);
}

#[test]
fn the_client_refuses_a_relay_that_does_not_know_the_password() {
    let mut p = Pair::new("4711", "correct horse", 0);
    p.distrust_server = true;
    p.pump();
    assert_eq!(
        p.client.close_reason(),
        Some(CloseReason::ErrorSent(ErrorCode::ServerAuthFailed))
    );
    assert_eq!(
        p.server.close_reason(),
        Some(CloseReason::ErrorReceived(ErrorCode::ServerAuthFailed))
    );
    assert!(
        !p.client_events
            .iter()
            .any(|e| matches!(e, ClientEvent::Registered(_)))
    );
}

#[test]
fn answers_out_of_turn_are_errors_and_change_nothing() {
    let mut s = ServerSession::new(ServerConfig::default(), PEER.parse().unwrap(), 0).unwrap();
    assert!(s.challenge(scram("r=x")).is_err());
    assert!(s.accept(RegistrationId(1), scram("v=x"), 0).is_err());
    assert!(s.refuse(Refusal::BadRequest, Text::empty()).is_err());
    assert_eq!(s.state(), ServerState::AwaitRegister);
    assert_eq!(s.poll_transmit(), None);
    let mut c = ClientSession::new(client_config("4711", 0), first("4711"), 0);
    assert!(c.proof(scram("c=biws")).is_err());
    assert!(c.server_verified(0).is_err());
    assert!(c.server_rejected().is_err());
    assert!(c.reregister(first("4711"), 0).is_err());
    assert_eq!(c.state(), ClientState::AwaitChallenge);
    c.unregister(0).unwrap();
    assert!(c.unregister(0).is_err());
}

#[test]
fn a_refusal_crossing_an_unregister_ends_the_client_at_once() {
    let mut c = ClientSession::new(client_config("4711", 0), first("4711"), 0);
    c.unregister(1).unwrap();
    c.handle_frame(
        Frame::Refused(Refused {
            refusal: Refusal::ServerBusy {
                retry_after_s: Some(30),
            },
            text: Text::empty(),
        }),
        2,
    );
    assert_eq!(
        c.close_reason(),
        Some(CloseReason::Refused(Refusal::ServerBusy {
            retry_after_s: Some(30)
        }))
    );
}

#[test]
fn server_config_is_validated() {
    assert_eq!(ServerConfig::default().validate(), Ok(()));
    let bad = [
        ServerConfig {
            min_keepalive_s: 0,
            ..ServerConfig::default()
        },
        ServerConfig {
            max_keepalive_s: 10,
            ..ServerConfig::default()
        },
        ServerConfig {
            max_keepalive_s: 86_401,
            ..ServerConfig::default()
        },
        ServerConfig {
            default_keepalive_s: 5,
            ..ServerConfig::default()
        },
        ServerConfig {
            keepalive_misses: 1,
            ..ServerConfig::default()
        },
        ServerConfig {
            handshake_timeout_ms: 0,
            ..ServerConfig::default()
        },
    ];
    for c in bad {
        let e = c.validate().unwrap_err();
        assert!(ServerSession::new(c, PEER.parse().unwrap(), 0).is_err());
        assert!(!e.reason.is_empty());
    }
}
