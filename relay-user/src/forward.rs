//! The forwarding rule shared by both data paths, as a pure function (no I/O, no clock).
//!
//! Given a channel and a datagram that arrived on one of its relay ports from `src`, decide
//! where it goes and which endpoint it latches. The XDP program implements the subset of this
//! rule that needs no state change (source latched, destination latched) and passes every other
//! packet up; [`decide`] is the whole rule, applied by the user-space path. Fixture tests run
//! the same packets through both and require the same outcome.
//!
//! Latching (NAT traversal, "symmetric RTP"): a device behind a home router does not know its
//! public address, so the address it announced is useless. The first packet of a component
//! (RTP or RTCP) from a leg that is not latched yet teaches the relay its real source; from then
//! on only that source is accepted for that leg — anything else is dropped and counted, which is
//! the protection against RTP injection.
use std::net::SocketAddr;

use relay_common::{Channel, Endpoint, LEG_A, LEG_B};

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
    /// Both legs' endpoints for this component are latched and the source is neither: an
    /// injection attempt or a stale peer.
    UnknownSource,
    /// The source matched no endpoint and more than one leg could be learnt: refusing to guess.
    Ambiguous,
    /// The destination leg's address for this component is not known yet.
    DestinationUnknown,
}

impl DropReason {
    /// Every reason, for counters.
    pub const ALL: [DropReason; 3] = [
        DropReason::UnknownSource,
        DropReason::Ambiguous,
        DropReason::DestinationUnknown,
    ];

    /// A stable lowercase name, used as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown_source",
            DropReason::Ambiguous => "ambiguous_source",
            DropReason::DestinationUnknown => "destination_unknown",
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

/// Applies the forwarding rule to a datagram from `src` that arrived on relay port
/// `relay_port`, latching in `channel` when the rule says so.
pub fn decide(channel: &mut Channel, relay_port: u16, src: SocketAddr) -> Decision {
    let component = Component::of_port(relay_port);
    let mut latched = false;

    // 1. A latched endpoint that matches: the common case, and the only one the fast path takes.
    let from_leg = match [LEG_A, LEG_B].into_iter().find(|&i| {
        let ep = component.endpoint(&channel.legs[i]);
        ep.is_latched() && ep.matches(src)
    }) {
        Some(i) => i,
        None => {
            // 2. An expected (announced, not yet confirmed) endpoint that matches exactly.
            let unlatched =
                [LEG_A, LEG_B].map(|i| !component.endpoint(&channel.legs[i]).is_latched());
            let exact = [LEG_A, LEG_B]
                .into_iter()
                .find(|&i| unlatched[i] && component.endpoint(&channel.legs[i]).matches(src));
            let leg = match (exact, unlatched) {
                (Some(i), _) => i,
                // 3. Exactly one leg left to learn: this source is its real (NATed) address.
                (None, [true, false]) => LEG_A,
                (None, [false, true]) => LEG_B,
                (None, [false, false]) => return Decision::Drop(DropReason::UnknownSource),
                (None, [true, true]) => return Decision::Drop(DropReason::Ambiguous),
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use relay_common::Leg;

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
            flags: 0,
            reserved: 0,
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
}
