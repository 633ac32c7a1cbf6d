//! Channel specs: a channel as a client requests it (both legs and the latching policy), its
//! validation, and [`build_channel`], the one place a spec becomes the data path's [`Channel`].
//!
//! Invariant: [`ChannelSpec::validate`] checks everything the types do not, and every error names
//! the API field at fault ([`SpecError::field`]); [`build_channel`] is total — it never fails and
//! never panics, for valid and invalid specs alike (validation is the caller's step before).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use relay_common::{
    Addr16, Be16, Channel, ENDPOINT_LATCHED, Endpoint, LatchMode, Latching, Leg,
    quality::MAX_CLOCK_RATE,
};

/// A channel spec that cannot work: the API field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The field's name in the API (`leg_a.rtp_address`, `latching.duration`, `clock_rate`...).
    pub field: String,
    /// Why its value is refused (lowercase, no trailing period).
    pub reason: String,
}

impl SpecError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
        SpecError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// How the relay learns a leg's media source; each policy is applied in [`build_channel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LatchingPolicy {
    /// The first packet from a leg that is not latched yet latches it.
    #[default]
    FirstPacket,
    /// A new source latches after `packets` consecutive packets or `duration` since its first
    /// packet, whichever comes first (0 / zero: not a criterion); until then it is dropped.
    After { packets: u32, duration: Duration },
    /// Only the addresses given in the legs; nothing is learnt from traffic.
    Strict,
    /// Like `FirstPacket`; a new source takes over a leg silent for `silence`.
    Handover { silence: Duration },
}

/// Longest duration a latching policy takes (it is stored in milliseconds, as a `u32`).
pub const MAX_LATCH_DURATION: Duration = Duration::from_secs(24 * 3600);

impl LatchingPolicy {
    /// The policy as the data path stores it.
    pub fn to_latching(self) -> Latching {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        match self {
            LatchingPolicy::FirstPacket => Latching::new(LatchMode::FirstPacket, 0, 0),
            LatchingPolicy::After { packets, duration } => {
                Latching::new(LatchMode::After, packets, ms(duration))
            }
            LatchingPolicy::Strict => Latching::new(LatchMode::Strict, 0, 0),
            LatchingPolicy::Handover { silence } => {
                Latching::new(LatchMode::Handover, 0, ms(silence))
            }
        }
    }
}

/// One leg as requested.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegSpec {
    /// The peer's RTP address; `None`: learnt from traffic.
    pub rtp: Option<SocketAddr>,
    /// The peer's RTCP address; `None`: RTP port + 1 if `rtp` is set, else learnt.
    pub rtcp: Option<SocketAddr>,
    /// Install the addresses latched: accept media only from them.
    pub strict: bool,
    /// The relay address the peer talks to; `None`: the configured one for this leg.
    pub relay_addr: Option<Ipv4Addr>,
}

/// A channel as requested: both legs and the latching policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelSpec {
    /// Leg A ([`relay_common::LEG_A`]) and leg B ([`relay_common::LEG_B`]).
    pub legs: [LegSpec; 2],
    pub latching: LatchingPolicy,
    /// Let any payload latch a source; `false` (the default): only RTP or RTCP version 2 may
    /// (`relay_common::LATCH_MEDIA_ONLY`). A channel whose peers speak something else before
    /// their media (DTLS-SRTP's handshake, ICE checks) needs `true`.
    pub latch_any_payload: bool,
    /// RTP clock rate in Hz for jitter; 0 = 8000 (G.711).
    pub clock_rate: u32,
}

/// What the host knows about its own addresses, for [`ChannelSpec::check_addresses`]
/// (the shell reads them from the kernel).
pub trait HostAddresses {
    /// Whether `ip` is an address of this host (of any interface, loopback included).
    fn is_local(&self, ip: Ipv4Addr) -> bool;
    /// Whether `ip` is the directed broadcast address of one of the host's subnets.
    fn is_broadcast(&self, ip: Ipv4Addr) -> bool;
}

/// The API names of legs A and B.
pub const LEG_FIELDS: [&str; 2] = ["leg_a", "leg_b"];

impl ChannelSpec {
    /// Checks what the types do not; errors name the API field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.clock_rate > MAX_CLOCK_RATE {
            return Err(SpecError::new(
                "clock_rate",
                format!("{} Hz is above {MAX_CLOCK_RATE} Hz", self.clock_rate),
            ));
        }
        match self.latching {
            LatchingPolicy::Strict => {
                if let Some((_, field)) = self
                    .legs
                    .iter()
                    .zip(LEG_FIELDS)
                    .find(|(l, _)| l.rtp.is_none())
                {
                    return Err(SpecError::new(
                        format!("{field}.rtp_address"),
                        "a strict latching policy needs both legs' addresses",
                    ));
                }
            }
            LatchingPolicy::Handover { silence } if silence < Duration::from_millis(1) => {
                return Err(SpecError::new(
                    "latching.duration",
                    "handover needs a silence of at least 1 ms",
                ));
            }
            LatchingPolicy::Handover { silence: d } | LatchingPolicy::After { duration: d, .. }
                if d > MAX_LATCH_DURATION =>
            {
                return Err(SpecError::new("latching.duration", "must be at most 24 h"));
            }
            _ => {}
        }
        for (leg, field) in self.legs.iter().zip(LEG_FIELDS) {
            for (addr, name) in [(leg.rtp, "rtp_address"), (leg.rtcp, "rtcp_address")] {
                let Some(addr) = addr else { continue };
                let field = format!("{field}.{name}");
                if !is_ipv4(addr.ip()) {
                    return Err(SpecError::new(
                        field,
                        format!("{addr}: IPv6 peers are not supported yet"),
                    ));
                }
                // Canonical form: `::ffff:0.0.0.0` is the unspecified IPv4 address too.
                if addr.ip().to_canonical().is_unspecified() || addr.port() == 0 {
                    return Err(SpecError::new(
                        field,
                        format!("{addr}: a peer needs an address and a port"),
                    ));
                }
            }
            if leg.rtp.is_none() && leg.rtcp.is_some() {
                return Err(SpecError::new(
                    format!("{field}.rtcp_address"),
                    "an RTCP address needs the RTP address too",
                ));
            }
            if leg.strict && leg.rtp.is_none() {
                return Err(SpecError::new(
                    format!("{field}.strict"),
                    "a strict leg needs rtp_address",
                ));
            }
            if leg.relay_addr.is_some_and(|a| a.is_unspecified()) {
                return Err(SpecError::new(
                    format!("{field}.relay_address"),
                    "0.0.0.0 is not a relay address (leave it empty for the default)",
                ));
            }
        }
        Ok(())
    }
}

impl ChannelSpec {
    /// The latching policy as the data path stores it, flags included.
    pub fn data_path_latching(&self) -> Latching {
        let latching = self.latching.to_latching();
        if self.latch_any_payload {
            latching
        } else {
            latching.with_flags(relay_common::LATCH_MEDIA_ONLY)
        }
    }

    /// Checks the spec's addresses against the host's: a relay address must be one of the
    /// host's (no spoofed sources), and a peer must be a unicast address of another host —
    /// never loopback, multicast, broadcast, `0.0.0.0/8` or the host's own (which would make
    /// the relay send to itself or flood a subnet). `allow_local_peers` (a lab setting) allows
    /// loopback and the host's own addresses. Call after [`ChannelSpec::validate`].
    pub fn check_addresses(
        &self,
        host: &dyn HostAddresses,
        allow_local_peers: bool,
    ) -> Result<(), SpecError> {
        for (leg, field) in self.legs.iter().zip(LEG_FIELDS) {
            if let Some(relay) = leg.relay_addr
                && !host.is_local(relay)
            {
                return Err(SpecError::new(
                    format!("{field}.relay_address"),
                    format!("{relay} is not an address of this host"),
                ));
            }
            for (addr, name) in [(leg.rtp, "rtp_address"), (leg.rtcp, "rtcp_address")] {
                let Some(ip) = addr.and_then(|a| match a.ip().to_canonical() {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                }) else {
                    continue;
                };
                let why = if ip.is_multicast() {
                    Some("a multicast address")
                } else if ip.is_broadcast() || host.is_broadcast(ip) {
                    Some("a broadcast address")
                } else if ip.octets()[0] == 0 {
                    Some("in 0.0.0.0/8 (\"this network\", RFC 1122)")
                } else if allow_local_peers {
                    None
                } else if ip.is_loopback() {
                    Some("a loopback address (relay.allow_local_peers allows it for labs)")
                } else if host.is_local(ip) {
                    Some(
                        "an address of this host: the relay would send to itself \
                         (relay.allow_local_peers allows it for labs)",
                    )
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(SpecError::new(
                        format!("{field}.{name}"),
                        format!("{ip} is {why}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn is_ipv4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    }
}

/// The data path's form of an IP address (IPv4-mapped for IPv4).
fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => Addr16::from_ipv4_octets(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Addr16::from_ipv4_octets(v4.octets()),
            None => Addr16::from_octets(v6.octets()),
        },
    }
}

/// An endpoint at `addr`, latched or only expected.
fn endpoint(addr: SocketAddr, latched: bool) -> Endpoint {
    Endpoint {
        addr: addr16(addr.ip()),
        port: Be16::new(addr.port()),
        flags: if latched { ENDPOINT_LATCHED } else { 0 },
        ..Endpoint::UNKNOWN
    }
}

/// The data-path channel for `spec` on relay port `port`: the one place a request becomes a
/// [`Channel`] (latching policy and clock rate are applied here).
///
/// A leg without a relay address (neither in the request nor configured) gets `::`: user space
/// then lets the kernel choose the source address, and the fast path leaves the channel to
/// user space, since it cannot rewrite a packet's source to "any".
pub fn build_channel(
    spec: &ChannelSpec,
    port: u16,
    relay_addresses: &[Option<Ipv4Addr>; 2],
) -> Channel {
    let mut channel = Channel::default();
    for ((leg, leg_spec), default_relay) in
        channel.legs.iter_mut().zip(&spec.legs).zip(relay_addresses)
    {
        // Strict: the given addresses are the only ones, confirmed from the start.
        let latched = match spec.latching {
            LatchingPolicy::Strict => true,
            LatchingPolicy::FirstPacket
            | LatchingPolicy::After { .. }
            | LatchingPolicy::Handover { .. } => leg_spec.strict,
        };
        // RFC 3550 §11: RTCP on the port above RTP unless the peer said otherwise.
        let rtcp = leg_spec.rtcp.or_else(|| {
            leg_spec
                .rtp
                .and_then(|a| a.port().checked_add(1).map(|p| SocketAddr::new(a.ip(), p)))
        });
        *leg = Leg {
            rtp: leg_spec
                .rtp
                .map_or(Endpoint::UNKNOWN, |a| endpoint(a, latched)),
            rtcp: rtcp.map_or(Endpoint::UNKNOWN, |a| endpoint(a, latched)),
            local_addr: leg_spec
                .relay_addr
                .or(*default_relay)
                .map_or(Addr16::UNSPECIFIED, |a| addr16(IpAddr::V4(a))),
            local_port: Be16::new(port),
            ..Leg::default()
        };
    }
    channel.latching = spec.data_path_latching();
    channel.clock_rate = spec.clock_rate;
    channel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn ep(s: &str, latched: bool) -> Endpoint {
        endpoint(sa(s), latched)
    }

    fn local(leg: &Leg) -> (Addr16, u16) {
        (leg.local_addr, leg.local_port.get())
    }

    #[test]
    fn build_channel_sets_both_legs_from_the_spec() {
        let spec = ChannelSpec {
            legs: [
                LegSpec {
                    rtp: Some(sa("203.0.113.7:40000")),
                    ..LegSpec::default()
                },
                LegSpec {
                    rtp: Some(sa("192.0.2.10:6000")),
                    rtcp: Some(sa("192.0.2.10:6003")),
                    strict: true,
                    relay_addr: Some(Ipv4Addr::new(192, 0, 2, 2)),
                },
            ],
            latching: LatchingPolicy::FirstPacket,
            latch_any_payload: false,
            clock_rate: 0,
        };
        let defaults = [
            Some(Ipv4Addr::new(198, 51, 100, 1)),
            Some(Ipv4Addr::new(192, 0, 2, 1)),
        ];
        let ch = build_channel(&spec, 30530, &defaults);
        let [a, b] = ch.legs;
        // Leg A: expected (not latched), RTCP on the port above, default relay address.
        assert_eq!(a.rtp, ep("203.0.113.7:40000", false));
        assert_eq!(a.rtcp, ep("203.0.113.7:40001", false));
        assert_eq!(
            local(&a),
            (Addr16::from_ipv4_octets([198, 51, 100, 1]), 30530)
        );
        // Leg B: strict, its own RTCP port and relay address.
        assert_eq!(b.rtp, ep("192.0.2.10:6000", true));
        assert_eq!(b.rtcp, ep("192.0.2.10:6003", true));
        assert_eq!(local(&b), (Addr16::from_ipv4_octets([192, 0, 2, 2]), 30530));
        assert_eq!(ch.flags, 0);
        assert!(a.rtp.is_known() && !a.rtp.is_latched());
    }

    #[test]
    fn build_channel_stores_the_policy_and_clock_rate_and_strict_latches_every_address() {
        let leg = |a: &str| LegSpec {
            rtp: Some(sa(a)),
            ..LegSpec::default()
        };
        let mut spec = ChannelSpec {
            legs: [leg("203.0.113.7:40000"), leg("192.0.2.10:6000")],
            latching: LatchingPolicy::Strict,
            latch_any_payload: false,
            clock_rate: 48_000,
        };
        spec.validate().expect("valid");
        let ch = build_channel(&spec, 30530, &[None, None]);
        assert_eq!(ch.latching.mode(), LatchMode::Strict);
        assert_eq!(ch.clock_rate, 48_000);
        assert!(
            ch.legs
                .iter()
                .all(|l| l.rtp.is_latched() && l.rtcp.is_latched())
        );
        spec.latching = LatchingPolicy::After {
            packets: 3,
            duration: Duration::from_millis(1500),
        };
        let ch = build_channel(&spec, 30530, &[None, None]);
        assert_eq!(
            ch.latching,
            Latching::new(LatchMode::After, 3, 1500).with_flags(relay_common::LATCH_MEDIA_ONLY)
        );
        assert!(!ch.legs[0].rtp.is_latched());
        // Validation: strict needs both addresses, handover a silence, rates are bounded.
        spec.latching = LatchingPolicy::Strict;
        spec.legs[1] = LegSpec::default();
        let e = spec.validate().expect_err("strict");
        assert_eq!(
            e.to_string(),
            "leg_b.rtp_address: a strict latching policy needs both legs' addresses"
        );
        assert_eq!(e.field, "leg_b.rtp_address");
        spec.legs[1] = leg("192.0.2.10:6000");
        spec.latching = LatchingPolicy::Handover {
            silence: Duration::ZERO,
        };
        assert!(spec.validate().is_err());
        spec.latching = LatchingPolicy::Handover {
            silence: Duration::from_secs(2),
        };
        spec.validate().expect("valid handover");
        spec.clock_rate = MAX_CLOCK_RATE + 1;
        assert_eq!(spec.validate().expect_err("rate").field, "clock_rate");
    }

    #[test]
    fn build_channel_without_addresses_learns_from_traffic_and_sends_from_any() {
        let ch = build_channel(&ChannelSpec::default(), 42000, &[None, None]);
        for leg in ch.legs {
            assert_eq!(leg.rtp, Endpoint::UNKNOWN);
            assert_eq!(leg.rtcp, Endpoint::UNKNOWN);
            // `::`, not IPv4 0.0.0.0: the fast path must not send from "any".
            assert_eq!(leg.local_addr, Addr16::UNSPECIFIED);
            assert!(!leg.local_addr.is_ipv4());
            assert_eq!(leg.local_port.get(), 42000);
        }
    }

    #[test]
    fn specs_are_validated_naming_the_field() {
        let leg = |rtp: Option<&str>, rtcp: Option<&str>, strict: bool| LegSpec {
            rtp: rtp.map(sa),
            rtcp: rtcp.map(sa),
            strict,
            relay_addr: None,
        };
        let cases = [
            (
                leg(Some("[2001:db8::1]:5004"), None, false),
                "leg_b.rtp_address: [2001:db8::1]:5004: IPv6 peers are not supported yet",
            ),
            (
                leg(Some("0.0.0.0:5004"), None, false),
                "leg_b.rtp_address: 0.0.0.0:5004: a peer needs an address and a port",
            ),
            (
                // IPv4-mapped 0.0.0.0 (found by the spec fuzz target: it passed, and the
                // channel got an endpoint the data path reads as unknown).
                leg(Some("[::ffff:0.0.0.0]:5004"), None, true),
                "leg_b.rtp_address: [::ffff:0.0.0.0]:5004: a peer needs an address and a port",
            ),
            (
                leg(None, Some("[::ffff:0.0.0.0]:5005"), false),
                "leg_b.rtcp_address: [::ffff:0.0.0.0]:5005: a peer needs an address and a port",
            ),
            (
                leg(Some("192.0.2.1:0"), None, false),
                "leg_b.rtp_address: 192.0.2.1:0: a peer needs an address and a port",
            ),
            (
                leg(None, Some("192.0.2.1:5005"), false),
                "leg_b.rtcp_address: an RTCP address needs the RTP address too",
            ),
            (
                leg(None, None, true),
                "leg_b.strict: a strict leg needs rtp_address",
            ),
        ];
        for (b, message) in cases {
            let spec = ChannelSpec {
                legs: [LegSpec::default(), b],
                latching: LatchingPolicy::FirstPacket,
                latch_any_payload: false,
                clock_rate: 0,
            };
            let e = spec.validate().expect_err(message);
            assert_eq!(e.to_string(), message);
            assert!(message.starts_with(&format!("{}: ", e.field)));
        }
        let mapped = ChannelSpec {
            legs: [
                leg(Some("[::ffff:192.0.2.1]:5004"), None, true),
                LegSpec::default(),
            ],
            latching: LatchingPolicy::FirstPacket,
            latch_any_payload: false,
            clock_rate: 0,
        };
        assert!(mapped.validate().is_ok());
        let ch = build_channel(&mapped, 30530, &[None, None]);
        assert_eq!(ch.legs[0].rtp, ep("192.0.2.1:5004", true));
        assert!(ch.legs[0].rtp.addr.is_ipv4());
    }

    /// A host with 192.0.2.1/24 and 198.51.100.1/25 (and loopback).
    struct Host;
    impl HostAddresses for Host {
        fn is_local(&self, ip: Ipv4Addr) -> bool {
            ip.is_loopback() || [[192, 0, 2, 1], [198, 51, 100, 1]].contains(&ip.octets())
        }
        fn is_broadcast(&self, ip: Ipv4Addr) -> bool {
            [[192, 0, 2, 255], [198, 51, 100, 127]].contains(&ip.octets())
        }
    }

    #[test]
    fn addresses_are_checked_against_the_host() {
        let spec = |leg_b: LegSpec| ChannelSpec {
            legs: [LegSpec::default(), leg_b],
            ..ChannelSpec::default()
        };
        let peer = |a: &str| LegSpec {
            rtp: Some(sa(a)),
            ..LegSpec::default()
        };
        let relay = |a: [u8; 4]| LegSpec {
            relay_addr: Some(Ipv4Addr::from(a)),
            ..LegSpec::default()
        };
        // (leg B, allow local peers, the field at fault if refused)
        let table: &[(LegSpec, bool, Option<&str>)] = &[
            (peer("203.0.113.7:5004"), false, None),
            (peer("192.0.2.10:5004"), false, None),
            (relay([192, 0, 2, 1]), false, None),
            (relay([192, 0, 2, 99]), false, Some("leg_b.relay_address")),
            (relay([127, 0, 0, 1]), false, None),
            (peer("127.0.0.1:5004"), false, Some("leg_b.rtp_address")),
            (peer("127.0.0.1:5004"), true, None),
            (
                peer("[::ffff:127.0.0.9]:5004"),
                false,
                Some("leg_b.rtp_address"),
            ),
            (peer("192.0.2.1:5004"), false, Some("leg_b.rtp_address")),
            (peer("192.0.2.1:5004"), true, None),
            (peer("224.0.0.1:5004"), true, Some("leg_b.rtp_address")),
            (peer("239.1.2.3:5004"), false, Some("leg_b.rtp_address")),
            (
                peer("255.255.255.255:5004"),
                true,
                Some("leg_b.rtp_address"),
            ),
            (peer("192.0.2.255:5004"), true, Some("leg_b.rtp_address")),
            (
                peer("198.51.100.127:5004"),
                false,
                Some("leg_b.rtp_address"),
            ),
            (peer("0.1.2.3:5004"), true, Some("leg_b.rtp_address")),
            (
                LegSpec {
                    rtp: Some(sa("203.0.113.7:5004")),
                    rtcp: Some(sa("224.0.0.5:5005")),
                    ..LegSpec::default()
                },
                false,
                Some("leg_b.rtcp_address"),
            ),
        ];
        for (i, (leg, allow, fault)) in table.iter().enumerate() {
            let got = spec(leg.clone()).check_addresses(&Host, *allow);
            assert_eq!(
                got.as_ref().err().map(|e| e.field.as_str()),
                *fault,
                "row {i}: {got:?}"
            );
        }
        let e = spec(peer("127.0.0.1:5004"))
            .check_addresses(&Host, false)
            .expect_err("loopback");
        assert!(e.reason.contains("relay.allow_local_peers"), "{e}");
    }

    #[test]
    fn channels_latch_only_on_media_unless_asked_otherwise() {
        let relay = [None, None];
        let ch = build_channel(&ChannelSpec::default(), 30528, &relay);
        assert!(ch.latching.media_only());
        let any = ChannelSpec {
            latch_any_payload: true,
            ..ChannelSpec::default()
        };
        assert!(!build_channel(&any, 30528, &relay).latching.media_only());
    }
}
