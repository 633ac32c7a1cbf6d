//! The STUN server's decisions: table tests, and a fuzz target in the style of
//! `register_fuzz.rs` (proptest over random bytes and mutated valid requests): never a panic,
//! a response never longer than `response_bound`, always a Binding response with a valid
//! FINGERPRINT and the request's transaction id.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use relay_core::stun::{
    Addresses, Decision, DropReason, MAX_RESPONSE_LEN, Outcome, RateConfig, RateLimiter, Server,
    Transport, Verdict, answer, answer_into, response_bound,
};
use stun_rs::attributes::discovery::{ChangeRequest, ChangeRequestFlags};
use stun_rs::attributes::stun::{Fingerprint, Software, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessage,
    StunMessageBuilder,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const SRC: &str = "198.51.100.7:40000";
const A: &str = "127.0.0.1:3478";
const B: &str = "127.0.0.2:3479";

fn one() -> Addresses {
    Addresses {
        primary: sa(A),
        other: None,
    }
}
fn two() -> Addresses {
    Addresses {
        primary: sa(A),
        other: Some(sa(B)),
    }
}

fn request(attrs: Vec<stun_rs::StunAttribute>, class: MessageClass) -> Vec<u8> {
    let mut b = StunMessageBuilder::new(BINDING, class);
    for a in attrs {
        b = b.with_attribute(a);
    }
    let mut buf = [0u8; 1500];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &b.build())
        .unwrap();
    buf[..n].to_vec()
}

fn bare() -> Vec<u8> {
    request(vec![], MessageClass::Request)
}

fn change(ip: bool, port: bool) -> Vec<u8> {
    use ChangeRequestFlags::{ChangeIp, ChangePort};
    let flags = match (ip, port) {
        (false, false) => None,
        (true, false) => Some(ChangeIp.into()),
        (false, true) => Some(ChangePort.into()),
        (true, true) => Some(ChangeIp | ChangePort),
    };
    request(
        vec![ChangeRequest::new(flags).into()],
        MessageClass::Request,
    )
}

/// Decodes a response, checking FINGERPRINT, and returns it.
fn decode(bytes: &[u8]) -> StunMessage {
    let ctx = DecoderContextBuilder::default().with_validation().build();
    let (msg, n) = MessageDecoderBuilder::default()
        .with_context(ctx)
        .build()
        .decode(bytes)
        .unwrap();
    assert_eq!(n, bytes.len());
    assert!(msg.get::<Fingerprint>().is_some(), "no FINGERPRINT");
    assert!(matches!(msg.attributes().last(), Some(a) if a.is_fingerprint()));
    msg
}

fn respond(d: Decision) -> (Vec<u8>, SocketAddr) {
    match d {
        Decision::Respond { bytes, from } => (bytes, from),
        Decision::Drop(r) => panic!("dropped: {r:?}"),
    }
}

fn mapped(msg: &StunMessage) -> SocketAddr {
    *msg.get::<XorMappedAddress>()
        .unwrap()
        .as_xor_mapped_address()
        .unwrap()
        .socket_address()
}

#[test]
fn bare_binding_gets_mapped_software_fingerprint_in_56_bytes() {
    let req = bare();
    assert_eq!(req.len(), 20);
    let (bytes, from) = respond(answer(&req, sa(SRC), sa(A), one(), Transport::Udp));
    assert_eq!(from, sa(A));
    assert_eq!(bytes.len(), 56);
    let msg = decode(&bytes);
    assert_eq!(msg.class(), MessageClass::SuccessResponse);
    assert_eq!(&bytes[8..20], &req[8..20]);
    assert_eq!(mapped(&msg), sa(SRC));
    assert_eq!(
        msg.get::<Software>()
            .unwrap()
            .as_software()
            .unwrap()
            .as_str(),
        "homerelay"
    );
}

#[test]
fn ipv6_bare_binding_fits_the_floor() {
    let src = sa("[2001:db8::7]:40000");
    let (bytes, _) = respond(answer(
        &bare(),
        src,
        sa("[::1]:3478"),
        Addresses {
            primary: sa("[::1]:3478"),
            other: None,
        },
        Transport::Udp,
    ));
    assert_eq!(bytes.len(), 52, "SOFTWARE does not fit in IPv6");
    assert_eq!(mapped(&decode(&bytes)), src);
}

#[test]
fn discovery_only_with_a_second_address() {
    let (bytes, _) = respond(answer(&bare(), sa(SRC), sa(A), one(), Transport::Udp));
    let msg = decode(&bytes);
    assert!(
        msg.get::<stun_rs::attributes::discovery::OtherAddress>()
            .is_none()
    );
    assert!(
        msg.get::<stun_rs::attributes::discovery::ResponseOrigin>()
            .is_none()
    );

    let (bytes, from) = respond(answer(&bare(), sa(SRC), sa(A), two(), Transport::Udp));
    assert_eq!(from, sa(A));
    assert_eq!(bytes.len(), 64);
    let msg = decode(&bytes);
    let other = msg
        .get::<stun_rs::attributes::discovery::OtherAddress>()
        .unwrap();
    assert_eq!(*other.as_other_address().unwrap().socket_address(), sa(B));
    let origin = msg
        .get::<stun_rs::attributes::discovery::ResponseOrigin>()
        .unwrap();
    assert_eq!(
        *origin.as_response_origin().unwrap().socket_address(),
        sa(A)
    );
}

#[test]
fn change_request_picks_the_source() {
    for (ip, port, want) in [
        (false, false, A),
        (true, false, "127.0.0.2:3478"),
        (false, true, "127.0.0.1:3479"),
        (true, true, B),
    ] {
        let (bytes, from) = respond(answer(
            &change(ip, port),
            sa(SRC),
            sa(A),
            two(),
            Transport::Udp,
        ));
        assert_eq!(from, sa(want), "ip {ip} port {port}");
        let msg = decode(&bytes);
        let origin = msg
            .get::<stun_rs::attributes::discovery::ResponseOrigin>()
            .unwrap();
        assert_eq!(
            *origin.as_response_origin().unwrap().socket_address(),
            sa(want)
        );
        assert_eq!(mapped(&msg), sa(SRC));
    }
    // Received on the alternate pair: changing goes back to the primary.
    let (_, from) = respond(answer(
        &change(true, true),
        sa(SRC),
        sa(B),
        two(),
        Transport::Udp,
    ));
    assert_eq!(from, sa(A));
}

#[test]
fn change_request_without_second_address_or_over_tcp_is_420() {
    for (addrs, transport) in [(one(), Transport::Udp), (two(), Transport::Tcp)] {
        let (bytes, from) = respond(answer(
            &change(true, false),
            sa(SRC),
            sa(A),
            addrs,
            transport,
        ));
        assert_eq!(from, sa(A));
        let msg = decode(&bytes);
        assert_eq!(msg.class(), MessageClass::ErrorResponse);
        let code = msg.get::<stun_rs::attributes::stun::ErrorCode>().unwrap();
        assert_eq!(code.as_error_code().unwrap().error_code().error_code(), 420);
        let ua = msg
            .get::<stun_rs::attributes::stun::UnknownAttributes>()
            .unwrap();
        assert_eq!(ua.as_unknown_attributes().unwrap().attributes(), &[0x0003]);
        assert!(bytes.len() <= response_bound(28));
    }
    // No flags: a plain Binding.
    let (bytes, _) = respond(answer(
        &change(false, false),
        sa(SRC),
        sa(A),
        one(),
        Transport::Udp,
    ));
    assert_eq!(decode(&bytes).class(), MessageClass::SuccessResponse);
}

#[test]
fn drops() {
    let mut classic = bare();
    classic[4..8].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(
        answer(&classic, sa(SRC), sa(A), one(), Transport::Udp),
        Decision::Drop(DropReason::Rfc3489)
    );
    assert_eq!(
        answer(b"hello", sa(SRC), sa(A), one(), Transport::Udp),
        Decision::Drop(DropReason::NotStun)
    );
    let indication = request(vec![], MessageClass::Indication);
    assert_eq!(
        answer(&indication, sa(SRC), sa(A), one(), Transport::Udp),
        Decision::Drop(DropReason::NotBindingRequest)
    );
    let resp = request(vec![], MessageClass::SuccessResponse);
    assert_eq!(
        answer(&resp, sa(SRC), sa(A), one(), Transport::Udp),
        Decision::Drop(DropReason::NotBindingRequest)
    );
    let mut long = vec![0u8; 2000];
    long[..20].copy_from_slice(&bare());
    assert_eq!(
        answer(&long, sa(SRC), sa(A), one(), Transport::Udp),
        Decision::Drop(DropReason::TooLong)
    );
}

#[test]
fn rate_limit_per_source_refills_and_is_bounded() {
    let cfg = RateConfig {
        per_second: 2,
        burst: 3,
        max_sources: 4,
    };
    let mut s = Server::new(one(), cfg);
    let t0 = Duration::from_secs(100);
    let go = |s: &mut Server, src: &str, t| s.handle(&bare(), sa(src), sa(A), Transport::Udp, t);
    for _ in 0..3 {
        assert!(matches!(go(&mut s, SRC, t0), Decision::Respond { .. }));
    }
    assert_eq!(go(&mut s, SRC, t0), Decision::Drop(DropReason::RateLimited));
    // Another source is not affected.
    assert!(matches!(
        go(&mut s, "198.51.100.8:1", t0),
        Decision::Respond { .. }
    ));
    // Half a second later one token is back.
    assert!(matches!(
        go(&mut s, SRC, t0 + Duration::from_millis(500)),
        Decision::Respond { .. }
    ));
    assert_eq!(
        go(&mut s, SRC, t0 + Duration::from_millis(500)),
        Decision::Drop(DropReason::RateLimited)
    );

    let mut l = RateLimiter::new(cfg);
    for i in 0..100u8 {
        l.allow(std::net::IpAddr::from([10, 0, 0, i]), t0);
        assert!(l.len() <= 4);
    }
}

#[test]
fn outcomes_name_every_result_once_and_match_the_decision() {
    let names: Vec<&str> = Outcome::ALL.iter().map(|o| o.name()).collect();
    assert_eq!(
        names,
        [
            "answered",
            "error",
            "not_stun",
            "rfc3489",
            "not_binding_request",
            "rate_limited",
            "too_long"
        ]
    );
    for (i, o) in Outcome::ALL.iter().enumerate() {
        assert_eq!(o.index(), i, "{o:?}");
    }
    for r in DropReason::ALL {
        assert!(Outcome::ALL.contains(&Outcome::Dropped(r)));
    }
    let outcome = |req: &[u8], addrs| answer(req, sa(SRC), sa(A), addrs, Transport::Udp).outcome();
    assert_eq!(outcome(&bare(), one()), Outcome::Answered);
    assert_eq!(outcome(&change(true, true), two()), Outcome::Answered);
    assert_eq!(outcome(&change(true, false), one()), Outcome::Error);
    assert_eq!(
        outcome(b"hello", one()),
        Outcome::Dropped(DropReason::NotStun)
    );
    // The buffer variant says the same and writes the same bytes.
    let req = change(true, false);
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let v = answer_into(&req, sa(SRC), sa(A), one(), Transport::Udp, &mut out);
    let Verdict::Respond { len, from, error } = v else {
        panic!("{v:?}")
    };
    assert!(error);
    assert_eq!(
        answer(&req, sa(SRC), sa(A), one(), Transport::Udp),
        Decision::Respond {
            bytes: out[..len].to_vec(),
            from
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("HOMERELAY_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_answer(
        seed in prop_oneof![
            Just(0u8), Just(1), Just(2), Just(3), Just(4)
        ],
        random in proptest::collection::vec(any::<u8>(), 0..200),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        extra in proptest::collection::vec(any::<u8>(), 0..80),
        v6 in any::<bool>(),
        discovery in any::<bool>(),
        tcp in any::<bool>(),
    ) {
        let mut req = match seed {
            0 => random,
            1 => bare(),
            2 => change(true, true),
            3 => request(vec![Software::new("x").unwrap().into(), Fingerprint::default().into()], MessageClass::Request),
            _ => {
                // A valid header followed by random attribute bytes, length fixed up.
                let mut r = bare();
                r.extend_from_slice(&extra[..extra.len() / 4 * 4]);
                let n = u16::try_from(r.len() - 20).unwrap();
                r[2..4].copy_from_slice(&n.to_be_bytes());
                r
            }
        };
        for (at, x) in flips {
            if !req.is_empty() && seed != 0 {
                let i = at % req.len();
                req[i] ^= x;
            }
        }
        let (src, addrs, local) = if v6 {
            (sa("[2001:db8::9]:5000"), Addresses { primary: sa("[::1]:3478"), other: discovery.then(|| sa("[::2]:3479")) }, sa("[::1]:3478"))
        } else {
            (sa(SRC), if discovery { two() } else { one() }, sa(A))
        };
        let transport = if tcp { Transport::Tcp } else { Transport::Udp };
        let decision = answer(&req, src, local, addrs, transport);
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let verdict = answer_into(&req, src, local, addrs, transport, &mut out);
        prop_assert_eq!(decision.outcome(), verdict.outcome());
        if let Decision::Respond { bytes, from } = decision {
            prop_assert!(bytes.len() <= MAX_RESPONSE_LEN);
            prop_assert!(bytes.len() <= response_bound(req.len()), "{} > bound of {}", bytes.len(), req.len());
            let msg = decode(&bytes);
            prop_assert_eq!(msg.method(), BINDING);
            prop_assert_eq!(&bytes[4..20], &req[4..20]);
            prop_assert!(matches!(msg.class(), MessageClass::SuccessResponse | MessageClass::ErrorResponse));
            if msg.class() == MessageClass::SuccessResponse {
                prop_assert_eq!(mapped(&msg), src);
            }
            if tcp || !discovery {
                prop_assert_eq!(from, local);
            }
        }
    }
}
