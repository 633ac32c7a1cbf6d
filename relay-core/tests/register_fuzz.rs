//! Fuzz targets of the registration sessions, in the style of the `fuzz/` crate's targets
//! (a plain function over bytes that panics when a property fails, run by proptest from a fixed
//! seed on random inputs and on mutations of valid streams). They live here rather than in
//! `fuzz/` because that crate depends on `relay-user` (aya) and `control`, which `relay-core`'s
//! tests must not build. `HOMERELAY_FUZZ_CASES` / `HOMERELAY_FUZZ_SEED` set the budget and seed,
//! as for `fuzz/`; `scripts/fuzz.sh` runs them at length.
//!
//! Each target drives one session with a byte stream from the peer (random, or a valid
//! exchange mutated) and a second byte string of choices: how the stream is split, how the
//! clock moves, how the shell answers its questions (including out of turn). The properties:
//! no panic; every frame sent encodes within the limit and decodes to itself; a side sends only
//! its own message types; `Error`, `Refused` and `Unregistered` are the last frames sent;
//! exactly one `Closed` event, after which nothing is sent, reported or scheduled; the relay
//! never refuses with a reason that needs the proof before it has the proof, and reports the
//! peer address it was given as the public address.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};
use relay_core::register::{
    ClientConfig, ClientEvent, ClientSession, ClientState, DeviceType, ErrorCode, FirmwareVersion,
    Frame, MAX_FRAME_LEN, MessageType, Number, Refusal, Register, Registered, RegistrationId,
    ScramMessage, ServerConfig, ServerEvent, ServerSession, ServerState, SessionError, Text,
    frame_len,
};

const PEER: &str = "198.51.100.9:51000";

/// Cases in which the relay's session reached `Registered` (and renewed), and in which the
/// device's did: a fuzz run that never gets past the first message proves little.
static SERVER_REGISTERED: AtomicU32 = AtomicU32::new(0);
static SERVER_RENEWED: AtomicU32 = AtomicU32::new(0);
static CLIENT_REGISTERED: AtomicU32 = AtomicU32::new(0);

/// A cursor over the choice bytes; past the end it yields zeros.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn below(&mut self, n: usize) -> usize {
        usize::from(u16::from_le_bytes([self.u8(), self.u8()])) % n.max(1)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How many stream bytes the next step feeds: the next frame whole (also once the choices
/// run out) — a real peer waits for the answer before its next frame — or 1–64 bytes.
fn feed_len(rest: &[u8], c: &mut Choices) -> usize {
    match c.below(2) {
        0 => frame_len(rest).ok().flatten().unwrap_or(1),
        _ => 1 + c.below(64),
    }
}

fn scram(s: &str) -> ScramMessage {
    ScramMessage::new(s.as_bytes().to_vec()).unwrap()
}

fn refusal(c: &mut Choices) -> Refusal {
    match c.below(7) {
        0 => Refusal::AuthFailed,
        1 => Refusal::LockedOut { retry_after_s: 60 },
        2 => Refusal::WeakPassword,
        3 => Refusal::FirmwareTooOld,
        4 => Refusal::NotAllowedExternal,
        5 => Refusal::BadRequest,
        _ => Refusal::ServerBusy {
            retry_after_s: None,
        },
    }
}

fn register() -> Register {
    Register {
        number: Number::new("4711").unwrap(),
        mac: [2, 0, 0, 0, 0, 1],
        device_type: DeviceType::new("deskphone_cp_hfa").unwrap(),
        firmware: FirmwareVersion::new("V1 R2.8.0").unwrap(),
        media_addr: "10.0.0.5:5004".parse().unwrap(),
        keepalive_s: 20,
        client_first: scram("n,,n=4711,r=abc"),
    }
}

/// What a valid client sends over a whole session.
fn client_stream() -> Vec<u8> {
    let mut b = Vec::new();
    for f in [
        Frame::Register(register()),
        Frame::Proof {
            client_final: scram("c=biws,r=abcdef,p=cHJvb2Y="),
        },
        Frame::Keepalive { seq: 1 },
        Frame::Register(register()),
        Frame::Proof {
            client_final: scram("c=biws,r=abcxyz,p=cHJvb2Y="),
        },
        Frame::Keepalive { seq: 2 },
        Frame::Unregister,
    ] {
        f.encode(&mut b);
    }
    b
}

/// What a valid relay sends over a whole session.
fn server_stream() -> Vec<u8> {
    let mut b = Vec::new();
    for f in [
        Frame::Challenge {
            server_first: scram("r=abcdef,s=c2FsdA==,i=4096"),
        },
        Frame::Registered(Registered {
            server_final: scram("v=c2ln"),
            keepalive_s: 1,
            expires_s: 3,
            public_addr: PEER.parse().unwrap(),
            registration_id: RegistrationId(7),
        }),
        Frame::KeepaliveAck { seq: 1 },
        Frame::KeepaliveAck { seq: 2 },
        Frame::Unregistered,
    ] {
        f.encode(&mut b);
    }
    b
}

/// `seed` changed by a few byte-level mutations: flips, writes, boundary values, insertions,
/// deletions, truncation, 16-bit boundary values (lengths, types).
fn mutate(seed: &[u8], noise: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    let mut n = Choices(noise);
    for _ in 0..1 + n.below(6) {
        let len = out.len();
        let at = n.below(len);
        match n.below(7) {
            0 if len > 0 => out[at] ^= 1 << n.below(8),
            1 if len > 0 => out[at] = n.u8(),
            2 => out.insert(at.min(len), n.u8()),
            3 if len > 0 => {
                let end = (at + 1 + n.below(16)).min(len);
                out.drain(at..end);
            }
            4 if len > 0 => out.truncate(at),
            5 if len > 1 => {
                let v: u16 = [0, 1, 0x0f, 0x10, 0x7fff, 0x8000, 0xffff][n.below(7)];
                let at = at.min(len - 2);
                out[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
            _ => {}
        }
    }
    out
}

/// What both sides' checks share: the frames one step sent, and whether it had closed before.
#[derive(Default)]
struct Track {
    closed_events: usize,
    /// A frame after which nothing may be sent was sent.
    final_sent: bool,
}

impl Track {
    fn frames(&mut self, frames: &[Frame], allowed: &[MessageType], was_closed: bool) {
        if was_closed {
            assert!(frames.is_empty(), "sent after close: {frames:?}");
        }
        for f in frames {
            assert!(!self.final_sent, "frame after a final one: {f:?}");
            assert!(allowed.contains(&f.message_type()), "wrong side: {f:?}");
            let bytes = f.to_bytes();
            assert!(bytes.len() <= MAX_FRAME_LEN);
            assert_eq!(Frame::decode(&bytes), Ok(Some((f.clone(), bytes.len()))));
            if matches!(f, Frame::Error(_) | Frame::Refused(_) | Frame::Unregistered) {
                self.final_sent = true;
            }
        }
    }

    fn closed(&mut self, closed_events: usize, is_closed: bool, timeout: Option<u64>) {
        self.closed_events += closed_events;
        assert!(self.closed_events <= 1, "closed twice");
        assert_eq!(self.closed_events == 1, is_closed);
        if is_closed {
            assert_eq!(timeout, None);
        }
    }
}

/// The relay's session against a hostile or broken client.
fn run_server(stream: &[u8], choices: &[u8]) {
    let peer: SocketAddr = PEER.parse().unwrap();
    let mut c = Choices(choices);
    let mut now = u64::from(c.u8()) * 1000;
    let mut s = ServerSession::new(ServerConfig::default(), peer, now).unwrap();
    let mut track = Track::default();
    let mut rest = stream;
    let mut next_id = 0;
    let server_types = [
        MessageType::Challenge,
        MessageType::Registered,
        MessageType::Refused,
        MessageType::KeepaliveAck,
        MessageType::Unregistered,
        MessageType::Error,
    ];
    while !rest.is_empty() || !c.is_empty() {
        let was_closed = s.is_closed();
        // Choice 0 (also once the choices run out) feeds the stream on.
        match c.below(16) {
            12 | 13 => {
                now = now.saturating_add(c.below(40_000) as u64);
                s.handle_timeout(now);
            }
            14 if c.below(8) == 0 => s.close_with(ErrorCode::ShuttingDown, Text::empty()),
            14 if c.below(8) == 0 => s.connection_lost(),
            15 => {
                // An answer out of turn is an error and changes nothing.
                let state = s.state();
                let r = match c.below(3) {
                    0 => s.challenge(scram("r=x")),
                    1 => s.accept(RegistrationId(0), scram("v=x"), now),
                    _ => s.refuse(refusal(&mut c), Text::empty()),
                };
                if r.is_err() {
                    assert_eq!(s.state(), state);
                }
            }
            _ => {
                let n = feed_len(rest, &mut c);
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                now = now.saturating_add(c.below(50) as u64);
                s.handle_bytes(chunk, now);
            }
        }
        let mut closed_events = 0;
        while let Some(e) = s.poll_event() {
            assert!(!was_closed, "event after close: {e:?}");
            match e {
                ServerEvent::Authenticate { request, renewal } => {
                    assert!(request.number.as_str().bytes().all(|b| b.is_ascii_digit()));
                    if s.state() != ServerState::Authenticating {
                        continue;
                    }
                    // Still authenticating: this is the latest request (another `Register`
                    // now would have closed the session).
                    assert_eq!(renewal, s.registration().is_some());
                    match c.below(8) {
                        7 => {
                            let r = refusal(&mut c);
                            let got = s.refuse(r, Text::lossy("no"));
                            if r.needs_proof() {
                                assert_eq!(got, Err(SessionError::RefusalBeforeProof(r.name())));
                                assert_eq!(s.state(), ServerState::Authenticating);
                            } else {
                                assert_eq!(got, Ok(()));
                            }
                        }
                        6 => {} // The shell never answers: the handshake timeout ends it.
                        _ => s.challenge(scram("r=abcdef,s=c2FsdA==,i=4096")).unwrap(),
                    }
                }
                ServerEvent::VerifyProof { .. } => {
                    if s.state() != ServerState::Verifying {
                        continue;
                    }
                    match c.below(4) {
                        3 => s.refuse(refusal(&mut c), Text::empty()).unwrap(),
                        _ => {
                            next_id += 1;
                            s.accept(RegistrationId(next_id), scram("v=c2ln"), now)
                                .unwrap();
                        }
                    }
                }
                ServerEvent::Registered(r) => {
                    assert_eq!(r.public_addr, peer);
                    if r.id.0 == 1 {
                        SERVER_REGISTERED.fetch_add(1, Ordering::Relaxed);
                    } else if r.id.0 == 2 {
                        SERVER_RENEWED.fetch_add(1, Ordering::Relaxed);
                    }
                }
                ServerEvent::Closed(_) => closed_events += 1,
            }
        }
        let mut frames = Vec::new();
        while let Some(f) = s.poll_transmit() {
            if let Frame::Registered(r) = &f {
                assert_eq!(r.public_addr, peer);
                assert!(r.keepalive_s >= 1 && r.expires_s >= 2 * r.keepalive_s);
            }
            frames.push(f);
        }
        track.frames(&frames, &server_types, was_closed);
        track.closed(closed_events, s.is_closed(), s.poll_timeout());
        if s.is_closed() {
            assert!(s.registration().is_none());
        }
        if s.state() == ServerState::Registered {
            assert!(s.registration().is_some());
        }
    }
}

/// A device's session against a hostile or broken relay.
fn run_client(stream: &[u8], choices: &[u8]) {
    let mut c = Choices(choices);
    let mut now = 0u64;
    let config = ClientConfig {
        number: Number::new("4711").unwrap(),
        mac: [2, 0, 0, 0, 0, 1],
        device_type: DeviceType::new("openstage_hfa").unwrap(),
        firmware: FirmwareVersion::new("V3 R0.40.4").unwrap(),
        media_addr: "10.0.0.5:5004".parse().unwrap(),
        keepalive_s: u32::from(c.u8()),
        handshake_timeout_ms: 10_000,
    };
    let mut s = ClientSession::new(config, scram("n,,n=4711,r=abc"), now);
    let mut track = Track::default();
    let mut rest = stream;
    let client_types = [
        MessageType::Register,
        MessageType::Proof,
        MessageType::Keepalive,
        MessageType::Unregister,
        MessageType::Error,
    ];
    while !rest.is_empty() || !c.is_empty() {
        let was_closed = s.is_closed();
        // Choice 0 (also once the choices run out) feeds the stream on.
        match c.below(16) {
            11..=13 => {
                now = now.saturating_add(c.below(30_000) as u64);
                s.handle_timeout(now);
            }
            14 if c.below(4) == 0 => {
                let _ = s.reregister(scram("n,,n=4711,r=def"), now);
            }
            14 if c.below(4) == 0 => {
                let _ = s.unregister(now);
            }
            14 if c.below(8) == 0 => s.connection_lost(),
            15 => {
                let _ = match c.below(3) {
                    0 => s.proof(scram("c=biws")),
                    1 => s.server_verified(now),
                    _ => s.server_rejected(),
                };
            }
            _ => {
                let n = feed_len(rest, &mut c);
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                s.handle_bytes(chunk, now);
            }
        }
        let mut closed_events = 0;
        while let Some(e) = s.poll_event() {
            match e {
                ClientEvent::Challenge { .. } => {
                    let _ = s.proof(scram("c=biws,r=abcdef,p=cHJvb2Y="));
                }
                ClientEvent::VerifyServer { .. } => {
                    let _ = if c.below(8) == 7 {
                        s.server_rejected()
                    } else {
                        s.server_verified(now)
                    };
                }
                ClientEvent::Registered(r) => {
                    CLIENT_REGISTERED.fetch_add(1, Ordering::Relaxed);
                    if s.state() == ClientState::Registered {
                        assert_eq!(Some(&r), s.registration());
                    }
                }
                ClientEvent::Closed(_) => closed_events += 1,
            }
        }
        let mut frames = Vec::new();
        while let Some(f) = s.poll_transmit() {
            frames.push(f);
        }
        // (`Register`, sent at creation, comes out in the first step.) Only `Error` is final
        // on this side: the relay's final frames are not the client's to send.
        track.frames(&frames, &client_types, was_closed);
        track.closed(closed_events, s.is_closed(), s.poll_timeout());
        if s.is_closed() {
            assert!(s.registration().is_none());
        }
    }
}

/// Runs `target` on `cases` inputs: a quarter random byte streams, half mutated valid ones, a
/// quarter the valid one, each with random choices; a failure is shrunk and reported with the
/// seed.
fn fuzz(
    name: &str,
    target: fn(&[u8], &[u8]),
    seed_stream: fn() -> Vec<u8>,
    default_cases: u32,
) -> u32 {
    let cases = std::env::var("HOMERELAY_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_cases);
    let seed: u64 = std::env::var("HOMERELAY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x686f_6d65_7265_6c61);
    let valid = seed_stream();
    // The valid exchange, unmutated, with a few choice strings.
    for choices in [&[][..], &[0xff; 64], &[3; 200]] {
        target(&valid, choices);
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..8 + name.len().min(24)].copy_from_slice(&name.as_bytes()[..name.len().min(24)]);
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let strategy = (
        0u8..4,
        prop::collection::vec(any::<u8>(), 0..768),
        prop::collection::vec(any::<u8>(), 0..512),
    );
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |(kind, bytes, choices)| {
        let stream = match kind {
            0 => bytes,
            1 | 2 => mutate(&valid, &bytes),
            // The valid exchange: the choices alone decide what happens.
            _ => valid.clone(),
        };
        target(&stream, &choices);
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target {name} failed (seed {seed}): {e}");
    }
    eprintln!("fuzz {name}: {cases} cases in {:.2?}", started.elapsed());
    cases
}

#[test]
fn fuzz_register_server() {
    let cases = fuzz("register_server", run_server, client_stream, 2000);
    let (registered, renewed) = (
        SERVER_REGISTERED.load(Ordering::Relaxed),
        SERVER_RENEWED.load(Ordering::Relaxed),
    );
    eprintln!("register_server: registered in {registered} runs, renewed in {renewed}");
    assert!(
        registered >= cases / 40 && renewed >= cases / 200,
        "the fuzz stays shallow"
    );
}

#[test]
fn fuzz_register_client() {
    let cases = fuzz("register_client", run_client, server_stream, 2000);
    let registered = CLIENT_REGISTERED.load(Ordering::Relaxed);
    eprintln!("register_client: registered in {registered} runs");
    assert!(registered >= cases / 40, "the fuzz stays shallow");
}
