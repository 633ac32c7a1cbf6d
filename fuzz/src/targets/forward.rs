//! `forward::decide` with arbitrary channels (endpoints known or not, latched or not, any
//! policy and flags), latch state built up by earlier packets, sources, clocks and last-seen
//! times. Properties, for every packet:
//!
//! - a drop leaves the channel unchanged, but for `DestinationUnknown`, which may have learnt
//!   the source (as a latching forward would); a forward that latched nothing changes nothing;
//! - a forward goes from the other leg's relay address and port (+1 for RTCP) to the other
//!   leg's known endpoint of the same component, and only then (a known destination is the only
//!   reason not to be `DestinationUnknown`);
//! - a forward that latched set exactly the source's endpoint to the source; it never touches
//!   the other leg, and it replaces an endpoint that was latched already only under Handover
//!   (which also unlatches, and only unlatches, that leg's other component);
//! - a Strict channel learns no address (it may only confirm an announced one);
//! - the fast path's subset: a source equal to a latched endpoint is forwarded from that leg
//!   without latching, or dropped as `DestinationUnknown` — or as `NotRelayAddress` when the
//!   datagram was sent to another address than that leg's relay address;
//! - nothing is forwarded from a leg whose relay address the datagram was not sent to, and on
//!   a media-only channel nothing latches but RTP or RTCP.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use relay_common::{Channel, ENDPOINT_LATCHED, Endpoint, LatchMode, Latching, Leg};
use relay_user::forward::{
    Component, Datagram, Decision, DropReason, LatchState, decide, is_media,
};

use crate::{Input, Target};

pub const TARGET: Target = Target {
    name: "forward",
    run,
    seeds,
};

const IPS: [IpAddr; 6] = [
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
];
const PORTS: [u16; 5] = [5004, 5005, 6000, 0, 65535];
/// Destinations: unknown, each relay address of [`leg`], another address.
const DSTS: [Option<IpAddr>; 4] = [
    None,
    Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))),
    Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
    Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9))),
];
/// Payloads: RTP, RTCP (a receiver report), neither.
const PAYLOADS: [&[u8]; 4] = [
    &[0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 7],
    &[0x80, 201, 0, 1, 0, 0, 0, 7],
    b"hello",
    &[],
];
const RELAY_PORT: u16 = 30528;

fn addr(i: &mut Input) -> SocketAddr {
    SocketAddr::new(i.pick(&IPS), i.pick(&PORTS))
}

fn endpoint(i: &mut Input) -> Endpoint {
    match i.below(4) {
        0 => Endpoint::UNKNOWN,
        1 => Endpoint {
            flags: ENDPOINT_LATCHED,
            ..Endpoint::UNKNOWN
        },
        _ => {
            let mut e = Endpoint::new(addr(i), i.bool());
            if i.below(8) == 0 {
                e.flags = i.u8();
            }
            e
        }
    }
}

fn leg(i: &mut Input) -> Leg {
    let local = SocketAddr::new(
        i.pick(&[
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ]),
        if i.below(8) == 0 { i.u16() } else { RELAY_PORT },
    );
    Leg::new(local, endpoint(i), endpoint(i))
}

/// A channel and a packet sequence, decoded from `data`.
fn channel(i: &mut Input) -> Channel {
    let latching = Latching {
        mode: i.below(5) as u8,
        flags: i.below(2) as u8,
        packets: i.pick(&[0, 1, 2, 3, u32::MAX]),
        duration_ms: i.pick(&[0, 1, 20, 500, u32::MAX]),
        ..Latching::default()
    };
    Channel {
        legs: [leg(i), leg(i)],
        flags: u32::from(i.below(4) == 0),
        latching,
        ..Channel::default()
    }
}

fn endpoint_of(ch: &Channel, leg: usize, c: Component) -> Endpoint {
    match c {
        Component::Rtp => ch.legs[leg].rtp,
        Component::Rtcp => ch.legs[leg].rtcp,
    }
}

pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    let mut ch = channel(&mut i);
    let mut state = LatchState::default();
    let mut now: u64 = 1_000_000_000 * u64::from(i.u8());
    for _ in 0..64 {
        if i.is_empty() {
            break;
        }
        let port = match i.below(5) {
            0..=1 => RELAY_PORT,
            2..=3 => RELAY_PORT + 1,
            _ => i.u16(),
        };
        let src = addr(&mut i);
        now = match i.below(6) {
            0 => now,
            1 => now.saturating_sub(u64::from(i.u32())),
            2 => i.u64(),
            _ => now.saturating_add(u64::from(i.u16()) * 1_000_000),
        };
        let seen = [0, 1].map(|_| match i.below(4) {
            0 => 0,
            1 => now,
            2 => now.saturating_sub(u64::from(i.u16()) * 1_000_000),
            _ => i.u64(),
        });
        let dgram = Datagram {
            src,
            dst: i.pick(&DSTS),
            payload: i.pick(&PAYLOADS),
        };
        check(&mut ch, &mut state, port, &dgram, now, seen);
    }
}

fn check(
    ch: &mut Channel,
    state: &mut LatchState,
    port: u16,
    dgram: &Datagram<'_>,
    now: u64,
    seen: [u64; 2],
) {
    let src = dgram.src;
    let before = *ch;
    let comp = Component::of_port(port);
    let mode = before.latching.mode();
    let d = decide(ch, state, port, dgram, now, |leg| seen[leg]);
    // Whether the datagram was sent to `leg`'s relay address (or that is not checked).
    let addressed = |leg: usize| {
        let local = before.legs[leg].local_addr;
        local.is_unspecified() || dgram.dst.is_none_or(|d| IpAddr::from(local) == d)
    };
    if let Decision::Forward {
        from_leg, latched, ..
    } = d
    {
        assert!(
            addressed(from_leg),
            "{d:?} for a datagram sent to {:?}",
            dgram.dst
        );
        if latched && before.latching.media_only() {
            assert!(
                is_media(dgram.payload, comp),
                "{d:?} latched on a non-media payload"
            );
        }
    }
    let fast = [0, 1].into_iter().find(|&l| {
        let e = endpoint_of(&before, l, comp);
        e.is_latched() && e.matches(src)
    });
    if fast.is_some_and(|l| !addressed(l)) {
        assert_eq!(d, Decision::Drop(DropReason::NotRelayAddress), "{before:?}");
    } else if let Some(l) = fast {
        match d {
            Decision::Forward {
                from_leg, latched, ..
            } => assert!(from_leg == l && !latched, "{d:?} for a latched source"),
            Decision::Drop(r) => assert_eq!(r, DropReason::DestinationUnknown, "{before:?}"),
        }
    }
    if mode == LatchMode::Strict {
        // Only the control plane's addresses: at most an announced one is confirmed.
        let mut confirmed = before;
        for (l, c) in confirmed.legs.iter_mut().zip(&ch.legs) {
            l.rtp.flags = c.rtp.flags;
            l.rtcp.flags = c.rtcp.flags;
        }
        assert_eq!(*ch, confirmed, "a Strict channel learnt an address");
    }
    // The leg this packet came from, where the rule says so.
    let from_leg = match d {
        Decision::Forward {
            from_leg,
            from,
            to,
            latched,
        } => {
            let to_leg = &ch.legs[1 - from_leg];
            assert_eq!(Some(to), endpoint_of(ch, 1 - from_leg, comp).socket_addr());
            let offset = u16::from(comp == Component::Rtcp);
            assert_eq!(
                from,
                SocketAddr::new(
                    to_leg.local_addr.into(),
                    to_leg.local_port.get().wrapping_add(offset)
                )
            );
            if !latched {
                assert_eq!(
                    *ch, before,
                    "a forward without latching changed the channel"
                );
                let was = endpoint_of(&before, from_leg, comp);
                assert!(was.is_latched() && was.matches(src));
                return;
            }
            from_leg
        }
        // No destination yet: the source may still have been learnt (the worker compares the
        // channel to see it), or it came from a latched endpoint.
        Decision::Drop(DropReason::DestinationUnknown) => {
            let leg = if *ch == before {
                fast.expect("DestinationUnknown from a source that is neither latched nor learnt")
            } else {
                [0, 1]
                    .into_iter()
                    .find(|&l| ch.legs[l] != before.legs[l])
                    .expect("a changed channel")
            };
            assert_eq!(
                endpoint_of(ch, 1 - leg, comp).socket_addr(),
                None,
                "DestinationUnknown with a known destination"
            );
            if *ch == before {
                return;
            }
            leg
        }
        Decision::Drop(_) => {
            assert_eq!(*ch, before, "a drop changed the channel");
            return;
        }
    };
    check_latch(&before, ch, from_leg, comp, src);
}

/// `after` is `before` with `leg`'s `comp` endpoint latched to `src` and nothing else changed,
/// except under Handover: a latched endpoint replaced, the leg's other component unlatched.
fn check_latch(before: &Channel, after: &Channel, leg: usize, comp: Component, src: SocketAddr) {
    let mode = before.latching.mode();
    let other = 1 - leg;
    assert_eq!(
        after.legs[other], before.legs[other],
        "the other leg changed"
    );
    assert_eq!(endpoint_of(after, leg, comp), Endpoint::new(src, true));
    if endpoint_of(before, leg, comp).is_latched() {
        assert_eq!(mode, LatchMode::Handover, "a latched endpoint was replaced");
    }
    let o = match comp {
        Component::Rtp => Component::Rtcp,
        Component::Rtcp => Component::Rtp,
    };
    let (o_before, o_after) = (endpoint_of(before, leg, o), endpoint_of(after, leg, o));
    if o_before != o_after {
        assert_eq!(mode, LatchMode::Handover);
        assert_eq!(
            o_after,
            Endpoint {
                flags: o_before.flags & !ENDPOINT_LATCHED,
                ..o_before
            }
        );
    }
    let (mut rest, mut rest_before) = (*after, *before);
    for c in [&mut rest, &mut rest_before] {
        c.legs[leg].rtp = Endpoint::UNKNOWN;
        c.legs[leg].rtcp = Endpoint::UNKNOWN;
    }
    assert_eq!(rest, rest_before, "latching changed more than endpoints");
}

fn seeds() -> Vec<Vec<u8>> {
    // A few hand-made cases: all-zero (unknown legs), a short one, and patterns.
    vec![
        vec![0; 64],
        vec![
            2, 0, 0, 1, 0, 0, 0, 2, 0, 1, 0, 1, 0, 2, 0, 0, 1, 0, 0, 0, 3, 0, 0,
        ],
        (0..=255).collect(),
        [3u8, 0, 2, 0, 0, 0].repeat(40),
    ]
}
