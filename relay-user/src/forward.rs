//! The forwarding rule shared by both data paths, as a pure function (no I/O, no clock).
//!
//! Given a channel and a datagram that arrived on one of its relay ports from `src`, decide
//! where it goes and which endpoint it latches. The XDP program implements the subset of this
//! rule that needs no state change (source latched, destination latched) and passes every other
//! packet up; [`decide`] is the whole rule, applied by the user-space path. Fixture tests run
//! the same packets through both and require the same outcome.
//!
//! Latching (NAT traversal, "symmetric RTP"): a device behind a home router does not know its
//! public address, so the address it announced is useless. The relay learns the real source of
//! each component (RTP, RTCP) of each leg from traffic; from then on only that source is
//! accepted for that leg — anything else is dropped and counted, which is the protection
//! against RTP injection. How a source is learnt is the channel's policy
//! ([`relay_common::Latching`]):
//!
//! - **FirstPacket** (default): the first packet from an unlatched leg latches it.
//! - **After** N packets / T ms: a new source latches with its N-th consecutive packet, or with
//!   its first packet at least T ms after its first one, whichever comes first (a zero
//!   parameter is not a criterion; both zero behaves like FirstPacket). Until then its packets
//!   are dropped as [`DropReason::Learning`]. A packet from another source restarts the
//!   learning with that source, so a single spoofed packet cannot win the race; a peer that
//!   interleaves with the real one delays latching, it cannot take it over.
//! - **Strict**: only the addresses the control plane gave; nothing is learnt from traffic.
//! - **Handover** T ms: like FirstPacket, and once both legs are latched, a new source takes
//!   over a leg whose latched source has been silent (no packet of either component from it,
//!   on either data path) for T ms. The other component of that leg is unlatched (its address
//!   kept as the expected one) so it re-learns its new source too.
//!
//! In every mode, a packet from an endpoint's announced address (set, not yet latched) latches
//! it at once: that address came from the control plane.
//!
//! Everything but the first step (a latched source) needs state or a clock, so the XDP fast
//! path forwards only latched → latched and passes the rest up to this rule.
use std::net::{IpAddr, SocketAddr};

use relay_common::{Channel, Endpoint, LEG_A, LEG_B, LatchMode};

/// RTP or RTCP, from the parity of the relay port (RFC 3550 §11: RTCP uses RTP port + 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Rtp,
    Rtcp,
}

impl Component {
    /// The component a packet to relay port `port` belongs to.
    pub fn of_port(port: u16) -> Self {
        if port & 1 == 0 {
            Component::Rtp
        } else {
            Component::Rtcp
        }
    }
    fn endpoint(self, leg: &relay_common::Leg) -> &Endpoint {
        match self {
            Component::Rtp => &leg.rtp,
            Component::Rtcp => &leg.rtcp,
        }
    }
    fn endpoint_mut(self, leg: &mut relay_common::Leg) -> &mut Endpoint {
        match self {
            Component::Rtp => &mut leg.rtp,
            Component::Rtcp => &mut leg.rtcp,
        }
    }
    fn other(self) -> Self {
        match self {
            Component::Rtp => Component::Rtcp,
            Component::Rtcp => Component::Rtp,
        }
    }
    fn offset(self) -> u16 {
        match self {
            Component::Rtp => 0,
            Component::Rtcp => 1,
        }
    }
}

/// Why a datagram was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The source matched no latched endpoint and the policy lets it take none: both legs
    /// latched (and, for Handover, neither silent long enough), or a Strict channel. An
    /// injection attempt or a stale peer.
    UnknownSource,
    /// The source matched no endpoint and more than one leg could take it: refusing to guess.
    Ambiguous,
    /// The destination leg's address for this component is not known yet.
    DestinationUnknown,
    /// An After channel is still learning this source (fewer packets or less time than the
    /// policy asks).
    Learning,
    /// Not addressed to the relay address of the leg it comes from: transit traffic, or a
    /// peer sending to another of the host's addresses.
    NotRelayAddress,
    /// From a source not latched yet, on a media-only channel, and not RTP or RTCP version 2:
    /// it may not latch.
    NotMedia,
}

impl DropReason {
    /// Every reason, for counters.
    pub const ALL: [DropReason; 6] = [
        DropReason::UnknownSource,
        DropReason::Ambiguous,
        DropReason::DestinationUnknown,
        DropReason::Learning,
        DropReason::NotRelayAddress,
        DropReason::NotMedia,
    ];

    /// A stable lowercase name, used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown_source",
            DropReason::Ambiguous => "ambiguous_source",
            DropReason::DestinationUnknown => "destination_unknown",
            DropReason::Learning => "learning",
            DropReason::NotRelayAddress => "not_relay_address",
            DropReason::NotMedia => "not_media",
        }
    }
}

/// The outcome for one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send the payload unchanged from `from` (a relay address) to `to`. `from_leg` is the leg
    /// it came from (the direction index of the counters). `latched` is true when this packet
    /// latched its source: the channel changed and the fast path should learn it.
    Forward {
        from_leg: usize,
        from: SocketAddr,
        to: SocketAddr,
        latched: bool,
    },
    /// Drop it, counted by reason.
    Drop(DropReason),
}

/// A source an After channel is learning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    src: SocketAddr,
    first_ns: u64,
    packets: u32,
}

/// What the rule remembers about a channel besides the channel itself: the sources being
/// learnt (After) and when each leg's latched source was last known to be alive (Handover).
/// Kept by the user-space path next to its channel; start afresh ([`Default`]) when the
/// channel is replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatchState {
    /// By leg, then component (RTP, RTCP).
    candidates: [[Option<Candidate>; 2]; 2],
    /// By leg: before this time the leg's latched source is known not to be silent long
    /// enough, so a stream of foreign packets costs one last-seen lookup per silence period,
    /// not one per packet.
    alive_until_ns: [u64; 2],
}

impl LatchState {
    /// Forgets what was learnt about `leg` (its configuration was replaced), keeping the other
    /// leg's learning progress.
    pub fn forget_leg(&mut self, leg: usize) {
        self.candidates[leg & 1] = [None, None];
        self.alive_until_ns[leg & 1] = 0;
    }
}

/// A datagram as a relay socket received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// Where it came from (the peer as the relay sees it, after any NAT).
    pub src: SocketAddr,
    /// The address it was sent to (the IP header's destination, from `IP_PKTINFO`); `None`:
    /// not known, not checked.
    pub dst: Option<IpAddr>,
    /// The UDP payload.
    pub payload: &'a [u8],
}

/// Whether `payload`, received on a relay port of `component`, parses as RTP or RTCP version
/// 2: what a channel with [`relay_common::LATCH_MEDIA_ONLY`] requires of a packet before it
/// latches its source.
///
/// - RTP (RFC 3550 §5.1): version 2, at least the 12-byte fixed header and its CSRC list.
/// - RTCP (RFC 3550 §6.4, RFC 5761 §4): version 2, a packet type in 192–223, at least the
///   8-byte header, and a length word that fits the datagram.
///
/// On the RTP port either is accepted (RTCP multiplexed on the RTP port, RFC 5761); on the RTCP
/// port only RTCP.
pub fn is_media(payload: &[u8], component: Component) -> bool {
    let rtcp = || {
        payload.len() >= 8
            && payload[0] >> 6 == 2
            && (192..=223).contains(&payload[1])
            && (usize::from(u16::from_be_bytes([payload[2], payload[3]])) + 1) * 4 <= payload.len()
    };
    match component {
        Component::Rtp => {
            let rtp = payload.len() >= 12
                && payload[0] >> 6 == 2
                && 12 + 4 * usize::from(payload[0] & 0x0f) <= payload.len();
            rtp || rtcp()
        }
        Component::Rtcp => rtcp(),
    }
}

/// Whether `leg` may receive a datagram sent to `dst`: it must be addressed to the relay
/// address the leg talks to. A leg without one (the kernel picks the source address) and a
/// datagram whose destination is not known are not checked.
fn addressed_to(leg: &relay_common::Leg, dst: Option<IpAddr>) -> bool {
    match dst {
        Some(dst) if !leg.local_addr.is_unspecified() => {
            IpAddr::from(leg.local_addr).to_canonical() == dst.to_canonical()
        }
        _ => true,
    }
}

/// Applies the forwarding rule to `dgram`, which arrived on relay port `relay_port` at
/// `now_ns` (`CLOCK_MONOTONIC`), latching in `channel` when its policy says so.
///
/// Before anything is learnt or forwarded, the datagram must be addressed to the relay address
/// of the leg it comes from ([`DropReason::NotRelayAddress`]), and on a media-only channel a
/// source latches only with RTP or RTCP ([`is_media`], [`DropReason::NotMedia`]). A dropped
/// datagram never changes the channel.
///
/// `last_seen(leg)` is the `CLOCK_MONOTONIC` time of the last packet forwarded *from* `leg`
/// by either data path (0 = never). It is called only for a Handover channel, for a packet
/// from no latched source, and at most once per leg and silence period: the hot path (a
/// latched source) never calls it.
pub fn decide(
    channel: &mut Channel,
    state: &mut LatchState,
    relay_port: u16,
    dgram: &Datagram<'_>,
    now_ns: u64,
    mut last_seen: impl FnMut(usize) -> u64,
) -> Decision {
    let src = dgram.src;
    let component = Component::of_port(relay_port);
    let policy = channel.latching;
    let mode = policy.mode();
    let mut latched = false;

    // 1. A latched endpoint that matches: the common case, and the only one the fast path takes.
    let from_leg = match [LEG_A, LEG_B].into_iter().find(|&i| {
        let ep = component.endpoint(&channel.legs[i]);
        ep.is_latched() && ep.matches(src)
    }) {
        Some(i) if !addressed_to(&channel.legs[i], dgram.dst) => {
            return Decision::Drop(DropReason::NotRelayAddress);
        }
        Some(i) => i,
        // A source no reply could reach (port 0, or no address) is never learnt: it would
        // make an endpoint that no later packet matches here but that the fast path, which
        // compares the raw address and port, would.
        None if src.port() == 0 || src.ip().to_canonical().is_unspecified() => {
            return Decision::Drop(DropReason::UnknownSource);
        }
        None => {
            // 2. An expected (announced, not yet confirmed) endpoint that matches exactly.
            let unlatched =
                [LEG_A, LEG_B].map(|i| !component.endpoint(&channel.legs[i]).is_latched());
            let exact = [LEG_A, LEG_B]
                .into_iter()
                .find(|&i| unlatched[i] && component.endpoint(&channel.legs[i]).matches(src));
            let (leg, handover) = match (exact, unlatched, mode) {
                (Some(i), _, _) => (i, false),
                // Strict: nothing but the control plane's addresses.
                (None, _, LatchMode::Strict) => return Decision::Drop(DropReason::UnknownSource),
                // 3. Exactly one leg left to learn: this source is its real (NATed) address.
                (None, [true, false], _) => (LEG_A, false),
                (None, [false, true], _) => (LEG_B, false),
                (None, [true, true], _) => return Decision::Drop(DropReason::Ambiguous),
                // 4. Both latched: only a Handover channel may move a silent leg.
                (None, [false, false], LatchMode::Handover) => {
                    let silence_ns = u64::from(policy.duration_ms) * 1_000_000;
                    let silent = [LEG_A, LEG_B].map(|i| {
                        if now_ns < state.alive_until_ns[i] {
                            return false;
                        }
                        let seen = last_seen(i);
                        if now_ns.saturating_sub(seen) >= silence_ns {
                            return true;
                        }
                        state.alive_until_ns[i] = seen.saturating_add(silence_ns);
                        false
                    });
                    match silent {
                        [true, false] => (LEG_A, true),
                        [false, true] => (LEG_B, true),
                        [false, false] => return Decision::Drop(DropReason::UnknownSource),
                        [true, true] => return Decision::Drop(DropReason::Ambiguous),
                    }
                }
                (None, [false, false], _) => return Decision::Drop(DropReason::UnknownSource),
            };
            // Nothing is learnt from a datagram sent elsewhere, or (media only) from one that
            // is not RTP or RTCP: a stray or crafted packet cannot take a leg.
            if !addressed_to(&channel.legs[leg], dgram.dst) {
                return Decision::Drop(DropReason::NotRelayAddress);
            }
            if policy.media_only() && !is_media(dgram.payload, component) {
                return Decision::Drop(DropReason::NotMedia);
            }
            if exact.is_none()
                && mode == LatchMode::After
                && !learnt(state, leg, component, src, now_ns, policy)
            {
                return Decision::Drop(DropReason::Learning);
            }
            if handover {
                // The peer moved: its other component re-learns its new source.
                component.other().endpoint_mut(&mut channel.legs[leg]).flags &=
                    !relay_common::ENDPOINT_LATCHED;
                state.alive_until_ns[leg] = 0;
            }
            *component.endpoint_mut(&mut channel.legs[leg]) = Endpoint::new(src, true);
            latched = true;
            leg
        }
    };

    let to_leg = &channel.legs[1 - from_leg];
    let Some(to) = component.endpoint(to_leg).socket_addr() else {
        return Decision::Drop(DropReason::DestinationUnknown);
    };
    let from = SocketAddr::new(
        to_leg.local_addr.into(),
        to_leg.local_port.get().wrapping_add(component.offset()),
    );
    Decision::Forward {
        from_leg,
        from,
        to,
        latched,
    }
}

/// After: counts a packet from `src` towards learning `leg`'s `component`; true when it is
/// learnt (the candidate is then forgotten).
fn learnt(
    state: &mut LatchState,
    leg: usize,
    component: Component,
    src: SocketAddr,
    now_ns: u64,
    policy: relay_common::Latching,
) -> bool {
    let slot = &mut state.candidates[leg][component.offset() as usize];
    let c = match slot {
        Some(c) if c.src == src => {
            c.packets = c.packets.saturating_add(1);
            *c
        }
        _ => *slot.insert(Candidate {
            src,
            first_ns: now_ns,
            packets: 1,
        }),
    };
    let by_packets = policy.packets != 0 && c.packets >= policy.packets;
    let by_time = policy.duration_ms != 0
        && now_ns.saturating_sub(c.first_ns) >= u64::from(policy.duration_ms) * 1_000_000;
    let unconditional = policy.packets == 0 && policy.duration_ms == 0;
    if by_packets || by_time || unconditional {
        *slot = None;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::{Latching, Leg};

    const MS: u64 = 1_000_000;

    /// The rule for a datagram from `src` whose destination is not known (not checked) and
    /// whose payload is empty (the channels here latch any payload).
    fn rule(
        ch: &mut Channel,
        st: &mut LatchState,
        port: u16,
        src: SocketAddr,
        now: u64,
        last_seen: impl FnMut(usize) -> u64,
    ) -> Decision {
        let dgram = Datagram {
            src,
            dst: None,
            payload: &[],
        };
        super::decide(ch, st, port, &dgram, now, last_seen)
    }

    /// The rule for policies that need no state or clock.
    fn decide(ch: &mut Channel, port: u16, src: SocketAddr) -> Decision {
        rule(ch, &mut LatchState::default(), port, src, MS, |_| {
            panic!("only Handover looks at last-seen times")
        })
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Home leg A expected at a private address (useless behind NAT), office leg B strict.
    fn channel() -> Channel {
        let a = Leg::new(
            sa("198.51.100.1:30528"),
            Endpoint::new(sa("10.0.0.5:5004"), false),
            Endpoint::new(sa("10.0.0.5:5005"), false),
        );
        let b = Leg::new(
            sa("192.0.2.1:30528"),
            Endpoint::new(sa("192.0.2.10:6000"), true),
            Endpoint::new(sa("192.0.2.10:6001"), true),
        );
        Channel {
            legs: [a, b],
            ..Channel::default()
        }
    }

    #[test]
    fn first_packet_from_nat_latches_the_only_unlatched_leg() {
        let mut ch = channel();
        let d = decide(&mut ch, 30528, sa("198.51.100.20:40007"));
        assert_eq!(
            d,
            Decision::Forward {
                from_leg: LEG_A,
                from: sa("192.0.2.1:30528"),
                to: sa("192.0.2.10:6000"),
                latched: true
            }
        );
        assert!(ch.legs[LEG_A].rtp.is_latched());
        assert!(ch.legs[LEG_A].rtp.matches(sa("198.51.100.20:40007")));
        // RTCP is learnt separately.
        assert!(!ch.legs[LEG_A].rtcp.is_latched());
        // The office now reaches the learnt address.
        let d = decide(&mut ch, 30528, sa("192.0.2.10:6000"));
        assert_eq!(
            d,
            Decision::Forward {
                from_leg: LEG_B,
                from: sa("198.51.100.1:30528"),
                to: sa("198.51.100.20:40007"),
                latched: false
            }
        );
    }

    #[test]
    fn after_latching_other_sources_are_dropped() {
        let mut ch = channel();
        decide(&mut ch, 30528, sa("198.51.100.20:40007"));
        let before = ch;
        assert_eq!(
            decide(&mut ch, 30528, sa("198.51.100.66:40007")),
            Decision::Drop(DropReason::UnknownSource)
        );
        assert_eq!(ch, before, "a dropped packet must not change the channel");
    }

    #[test]
    fn rtcp_uses_odd_port_and_rtcp_endpoints() {
        let mut ch = channel();
        let d = decide(&mut ch, 30529, sa("198.51.100.20:40011"));
        assert_eq!(
            d,
            Decision::Forward {
                from_leg: LEG_A,
                from: sa("192.0.2.1:30529"),
                to: sa("192.0.2.10:6001"),
                latched: true
            }
        );
        assert!(ch.legs[LEG_A].rtcp.matches(sa("198.51.100.20:40011")));
    }

    /// Found by the forward fuzz target: a source with port 0 (or no address) latched, making
    /// an endpoint no later packet matched in user space but the fast path would match.
    #[test]
    fn a_source_no_reply_could_reach_is_never_learnt() {
        for src in [
            "198.51.100.20:0",
            "0.0.0.0:40000",
            "[::ffff:0.0.0.0]:40000",
            "[::]:1",
        ] {
            let mut ch = channel();
            let before = ch;
            assert_eq!(
                decide(&mut ch, 30528, sa(src)),
                Decision::Drop(DropReason::UnknownSource),
                "{src}"
            );
            assert_eq!(ch, before, "{src}");
        }
        // Handover does not move a silent leg to such a source either.
        let mut ch = channel();
        ch.latching = Latching::new(LatchMode::Handover, 0, 1);
        ch.legs[LEG_A].rtp = Endpoint::new(sa("198.51.100.20:40000"), true);
        let before = ch;
        let d = rule(
            &mut ch,
            &mut LatchState::default(),
            30528,
            sa("198.51.100.30:0"),
            10 * MS,
            |_| 0,
        );
        assert_eq!(d, Decision::Drop(DropReason::UnknownSource));
        assert_eq!(ch, before);
    }

    #[test]
    fn destination_unknown_is_dropped_but_source_still_latches() {
        let mut ch = channel();
        ch.legs[LEG_A].rtp = Endpoint::UNKNOWN;
        // From the office (latched) to a home leg nobody has heard from yet.
        assert_eq!(
            decide(&mut ch, 30528, sa("192.0.2.10:6000")),
            Decision::Drop(DropReason::DestinationUnknown)
        );
    }

    #[test]
    fn two_unlatched_legs_and_no_exact_match_is_ambiguous() {
        let mut ch = channel();
        ch.legs[LEG_B].rtp.flags = 0;
        assert_eq!(
            decide(&mut ch, 30528, sa("203.0.113.99:1000")),
            Decision::Drop(DropReason::Ambiguous)
        );
        // An exact match of an expected address latches that leg.
        let d = decide(&mut ch, 30528, sa("192.0.2.10:6000"));
        assert!(matches!(
            d,
            Decision::Forward {
                from_leg: LEG_B,
                latched: true,
                ..
            }
        ));
    }

    /// A home leg latched at a NAT address and the office leg latched: for the policies that
    /// act after latching.
    fn latched_channel(latching: Latching) -> Channel {
        let mut ch = channel();
        ch.legs[LEG_A].rtp = Endpoint::new(sa("198.51.100.20:40007"), true);
        ch.legs[LEG_A].rtcp = Endpoint::new(sa("198.51.100.20:40008"), true);
        ch.latching = latching;
        ch
    }

    #[test]
    fn after_n_packets_latches_with_the_nth_consecutive_packet() {
        let mut ch = channel();
        ch.latching = Latching::new(LatchMode::After, 3, 0);
        let mut st = LatchState::default();
        let nat = sa("198.51.100.20:40007");
        let spoof = sa("198.51.100.66:1234");
        let mut d = |ch: &mut Channel, src, t| rule(ch, &mut st, 30528, src, t, |_| unreachable!());
        assert_eq!(d(&mut ch, nat, MS), Decision::Drop(DropReason::Learning));
        assert_eq!(
            d(&mut ch, nat, 2 * MS),
            Decision::Drop(DropReason::Learning)
        );
        // Another source restarts the count: one spoofed packet cannot win the race.
        assert_eq!(
            d(&mut ch, spoof, 3 * MS),
            Decision::Drop(DropReason::Learning)
        );
        assert_eq!(
            d(&mut ch, nat, 4 * MS),
            Decision::Drop(DropReason::Learning)
        );
        assert_eq!(
            d(&mut ch, nat, 5 * MS),
            Decision::Drop(DropReason::Learning)
        );
        assert!(!ch.legs[LEG_A].rtp.is_latched());
        assert!(matches!(
            d(&mut ch, nat, 6 * MS),
            Decision::Forward {
                from_leg: LEG_A,
                latched: true,
                ..
            }
        ));
        assert!(ch.legs[LEG_A].rtp.matches(nat));
        // Latched now: the spoofer is an unknown source like on any channel.
        assert_eq!(
            d(&mut ch, spoof, 7 * MS),
            Decision::Drop(DropReason::UnknownSource)
        );
        // RTCP learns on its own (its first packet starts its own count).
        let r = rule(
            &mut ch,
            &mut st,
            30529,
            sa("198.51.100.20:40008"),
            8 * MS,
            |_| 0,
        );
        assert_eq!(r, Decision::Drop(DropReason::Learning));
    }

    #[test]
    fn after_t_ms_latches_the_first_packet_past_the_delay() {
        let mut ch = channel();
        ch.latching = Latching::new(LatchMode::After, 0, 100);
        let mut st = LatchState::default();
        let nat = sa("198.51.100.20:40007");
        let mut d = |ch: &mut Channel, t| rule(ch, &mut st, 30528, nat, t, |_| 0);
        assert_eq!(d(&mut ch, 1_000 * MS), Decision::Drop(DropReason::Learning));
        assert_eq!(d(&mut ch, 1_099 * MS), Decision::Drop(DropReason::Learning));
        assert!(matches!(
            d(&mut ch, 1_100 * MS),
            Decision::Forward { latched: true, .. }
        ));
    }

    #[test]
    fn after_latches_an_announced_address_at_once_and_zero_parameters_mean_first_packet() {
        let mut ch = channel();
        ch.latching = Latching::new(LatchMode::After, 5, 1000);
        assert!(matches!(
            decide(&mut ch, 30528, sa("10.0.0.5:5004")),
            Decision::Forward { latched: true, .. }
        ));
        let mut ch = channel();
        ch.latching = Latching::new(LatchMode::After, 0, 0);
        assert!(matches!(
            decide(&mut ch, 30528, sa("198.51.100.20:40007")),
            Decision::Forward { latched: true, .. }
        ));
    }

    #[test]
    fn strict_never_learns() {
        let mut ch = channel();
        ch.latching = Latching::new(LatchMode::Strict, 0, 0);
        let before = ch;
        assert_eq!(
            decide(&mut ch, 30528, sa("198.51.100.20:40007")),
            Decision::Drop(DropReason::UnknownSource)
        );
        assert_eq!(ch, before);
        // The address the control plane gave is accepted (and confirmed).
        assert!(matches!(
            decide(&mut ch, 30528, sa("10.0.0.5:5004")),
            Decision::Forward {
                from_leg: LEG_A,
                latched: true,
                ..
            }
        ));
        assert!(matches!(
            decide(&mut ch, 30528, sa("192.0.2.10:6000")),
            Decision::Forward {
                from_leg: LEG_B,
                latched: false,
                ..
            }
        ));
    }

    #[test]
    fn handover_moves_a_silent_leg_to_the_new_source() {
        let mut ch = latched_channel(Latching::new(LatchMode::Handover, 0, 500));
        let mut st = LatchState::default();
        let moved = sa("203.0.113.50:41000");
        // Leg A (home) last heard at 1.0 s, the office at 1.9 s.
        let lookups = std::cell::Cell::new(0);
        let seen = |leg: usize| {
            lookups.set(lookups.get() + 1);
            if leg == LEG_A { 1_000 * MS } else { 1_900 * MS }
        };
        // 1.2 s: nobody silent for 500 ms yet — an injection attempt.
        assert_eq!(
            rule(&mut ch, &mut st, 30528, moved, 1_200 * MS, seen),
            Decision::Drop(DropReason::UnknownSource)
        );
        // Until 1.5 s the lookup is not repeated.
        assert_eq!(
            rule(&mut ch, &mut st, 30528, moved, 1_300 * MS, seen),
            Decision::Drop(DropReason::UnknownSource)
        );
        assert_eq!(lookups.get(), 2, "one lookup per leg, then cached");
        // 1.6 s: home silent for 600 ms, office for 0 — the home phone moved.
        let d = rule(&mut ch, &mut st, 30528, moved, 1_600 * MS, seen);
        assert_eq!(
            d,
            Decision::Forward {
                from_leg: LEG_A,
                from: sa("192.0.2.1:30528"),
                to: sa("192.0.2.10:6000"),
                latched: true
            }
        );
        assert!(ch.legs[LEG_A].rtp.matches(moved) && ch.legs[LEG_A].rtp.is_latched());
        // Its RTCP re-learns: unlatched, the old address kept as the expected one.
        assert!(!ch.legs[LEG_A].rtcp.is_latched());
        assert!(ch.legs[LEG_A].rtcp.matches(sa("198.51.100.20:40008")));
        let r = rule(
            &mut ch,
            &mut st,
            30529,
            sa("203.0.113.50:41001"),
            1_700 * MS,
            |_| 0,
        );
        assert!(matches!(
            r,
            Decision::Forward {
                from_leg: LEG_A,
                latched: true,
                ..
            }
        ));
        // The old source is now the stranger.
        assert_eq!(
            rule(
                &mut ch,
                &mut st,
                30528,
                sa("198.51.100.20:40007"),
                1_700 * MS,
                |_| 1_650 * MS
            ),
            Decision::Drop(DropReason::UnknownSource)
        );
    }

    #[test]
    fn handover_refuses_when_both_legs_are_silent() {
        let mut ch = latched_channel(Latching::new(LatchMode::Handover, 0, 500));
        let d = rule(
            &mut ch,
            &mut LatchState::default(),
            30528,
            sa("203.0.113.50:41000"),
            10_000 * MS,
            |_| 0,
        );
        assert_eq!(d, Decision::Drop(DropReason::Ambiguous));
    }

    #[test]
    fn first_packet_never_relatches_however_long_the_silence() {
        let mut ch = latched_channel(Latching::default());
        let d = rule(
            &mut ch,
            &mut LatchState::default(),
            30528,
            sa("203.0.113.50:41000"),
            10_000 * MS,
            |_| panic!("no lookup outside Handover"),
        );
        assert_eq!(d, Decision::Drop(DropReason::UnknownSource));
    }

    /// An RTP packet: version 2, PT 0, one CSRC.
    const RTP: [u8; 16] = [0x81, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 7, 0, 0, 0, 9];
    /// An RTCP receiver report without blocks (RFC 3550 §6.4.2): length 1 (8 bytes).
    const RTCP_RR: [u8; 8] = [0x80, 201, 0, 1, 0, 0, 0, 7];

    #[test]
    fn media_is_recognised_by_the_rfc_3550_headers() {
        use Component::{Rtcp, Rtp};
        let table: &[(&[u8], Component, bool)] = &[
            (&RTP, Rtp, true),
            (&RTP[..12], Rtp, false), // the CSRC it announces is missing
            (&RTCP_RR, Rtp, true),    // RTCP multiplexed on the RTP port (RFC 5761)
            (&RTCP_RR, Rtcp, true),
            (&RTP, Rtcp, false),                           // RTP is not RTCP
            (&[0x80, 201, 0, 2, 0, 0, 0, 7], Rtcp, false), // length word beyond the datagram
            (&[0x40, 201, 0, 1, 0, 0, 0, 7], Rtcp, false), // version 1
            (&[0x80, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 7], Rtp, true), // minimal RTP
            (&[0x00, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 7], Rtp, false), // version 0
            (
                &[0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                Rtp,
                false,
            ), // DTLS
            (
                &[0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0],
                Rtp,
                false,
            ), // STUN
            (b"hello", Rtp, false),
            (&[], Rtp, false),
            (&[], Rtcp, false),
        ];
        for (i, &(payload, component, media)) in table.iter().enumerate() {
            assert_eq!(
                is_media(payload, component),
                media,
                "row {i}: {payload:02x?}"
            );
        }
    }

    #[test]
    fn a_media_only_channel_latches_only_on_rtp_or_rtcp() {
        let mut ch = channel();
        ch.latching = Latching::default().with_flags(relay_common::LATCH_MEDIA_ONLY);
        let nat = sa("198.51.100.20:40007");
        let before = ch;
        for junk in [&b"hello"[..], &[], &RTCP_RR[..4]] {
            let d = super::decide(
                &mut ch,
                &mut LatchState::default(),
                30528,
                &Datagram {
                    src: nat,
                    dst: None,
                    payload: junk,
                },
                MS,
                |_| 0,
            );
            assert_eq!(d, Decision::Drop(DropReason::NotMedia), "{junk:02x?}");
            assert_eq!(ch, before, "nothing learnt from {junk:02x?}");
        }
        let dgram = Datagram {
            src: nat,
            dst: None,
            payload: &RTP,
        };
        let d = super::decide(
            &mut ch,
            &mut LatchState::default(),
            30528,
            &dgram,
            MS,
            |_| 0,
        );
        assert!(
            matches!(d, Decision::Forward { latched: true, .. }),
            "{d:?}"
        );
        // Once latched, the source's packets are not inspected (the fast path cannot either).
        let any = Datagram {
            payload: b"anything",
            ..dgram
        };
        let d = super::decide(&mut ch, &mut LatchState::default(), 30528, &any, MS, |_| 0);
        assert!(
            matches!(d, Decision::Forward { latched: false, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn only_datagrams_to_the_legs_relay_address_are_taken() {
        // Leg A talks to 198.51.100.1, leg B to 192.0.2.1 (see `channel`).
        let nat = sa("198.51.100.20:40007");
        let office = sa("192.0.2.10:6000");
        let to = |src, dst: &str| Datagram {
            src,
            dst: Some(dst.parse().expect("address")),
            payload: &RTP,
        };
        let mut ch = channel();
        let before = ch;
        let run = |ch: &mut Channel, d: Datagram<'_>| {
            super::decide(ch, &mut LatchState::default(), 30528, &d, MS, |_| 0)
        };
        // Sent to another address of the host (or routed through it): nothing is learnt.
        for dst in ["192.0.2.1", "203.0.113.9", "127.0.0.1"] {
            assert_eq!(
                run(&mut ch, to(nat, dst)),
                Decision::Drop(DropReason::NotRelayAddress),
                "{dst}"
            );
            assert_eq!(ch, before);
        }
        assert!(matches!(
            run(&mut ch, to(nat, "198.51.100.1")),
            Decision::Forward { latched: true, .. }
        ));
        // A latched source too, and an IPv4-mapped destination is the same address.
        assert_eq!(
            run(&mut ch, to(office, "198.51.100.1")),
            Decision::Drop(DropReason::NotRelayAddress)
        );
        assert!(matches!(
            run(&mut ch, to(office, "::ffff:192.0.2.1")),
            Decision::Forward { latched: false, .. }
        ));
        // A leg without a relay address takes what the kernel delivered.
        let mut ch = channel();
        ch.legs[LEG_A].local_addr = relay_common::Addr16::UNSPECIFIED;
        assert!(matches!(
            run(&mut ch, to(nat, "203.0.113.9")),
            Decision::Forward { latched: true, .. }
        ));
    }
}
