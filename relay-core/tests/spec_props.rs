//! Property tests of channel specs (the later fuzz target's properties): any spec either
//! validates or is refused with an error naming a field, never a panic; and `build_channel` on a
//! valid spec gives a channel whose legs are exactly what the spec asks for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;
use relay_common::{Addr16, Endpoint, quality::MAX_CLOCK_RATE};
use relay_core::spec::LEG_FIELDS;
use relay_core::{ChannelSpec, LatchingPolicy, LegSpec, MAX_LATCH_DURATION, build_channel};

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        1 => Just(Ipv4Addr::UNSPECIFIED),
        8 => any::<[u8; 4]>().prop_map(Ipv4Addr::from),
    ]
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    let port = prop_oneof![1 => Just(0u16), 1 => Just(u16::MAX), 8 => any::<u16>()];
    let ip = prop_oneof![
        6 => ipv4().prop_map(IpAddr::V4),
        2 => ipv4().prop_map(|v4| IpAddr::V6(v4.to_ipv6_mapped())),
        1 => any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
    ];
    (ip, port).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn leg() -> impl Strategy<Value = LegSpec> {
    (
        prop::option::of(socket_addr()),
        prop::option::of(socket_addr()),
        any::<bool>(),
        prop::option::of(ipv4()),
    )
        .prop_map(|(rtp, rtcp, strict, relay_addr)| LegSpec {
            rtp,
            rtcp,
            strict,
            relay_addr,
        })
}

fn duration() -> impl Strategy<Value = Duration> {
    let max = MAX_LATCH_DURATION.as_millis() as u64;
    prop_oneof![
        1 => Just(Duration::ZERO),
        1 => Just(MAX_LATCH_DURATION),
        1 => Just(MAX_LATCH_DURATION + Duration::from_nanos(1)),
        4 => (0..=2 * max).prop_map(Duration::from_millis),
        1 => any::<u64>().prop_map(Duration::from_nanos),
    ]
}

fn policy() -> impl Strategy<Value = LatchingPolicy> {
    prop_oneof![
        Just(LatchingPolicy::FirstPacket),
        (any::<u32>(), duration())
            .prop_map(|(packets, duration)| LatchingPolicy::After { packets, duration }),
        Just(LatchingPolicy::Strict),
        duration().prop_map(|silence| LatchingPolicy::Handover { silence }),
    ]
}

fn spec() -> impl Strategy<Value = ChannelSpec> {
    let clock_rate = prop_oneof![
        2 => Just(0u32),
        1 => Just(MAX_CLOCK_RATE),
        1 => Just(MAX_CLOCK_RATE + 1),
        4 => any::<u32>(),
    ];
    (leg(), leg(), policy(), clock_rate, any::<bool>()).prop_map(
        |(a, b, latching, clock_rate, latch_any_payload)| ChannelSpec {
            legs: [a, b],
            latching,
            latch_any_payload,
            clock_rate,
        },
    )
}

/// The data path's form of a peer address of a valid spec (IPv4, maybe IPv4-mapped).
fn addr16(ip: IpAddr) -> Option<Addr16> {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
    };
    Some(Addr16::from_ipv4_octets(v4.octets()))
}

fn check_endpoint(
    got: Endpoint,
    want: Option<SocketAddr>,
    latched: bool,
) -> Result<(), TestCaseError> {
    match want {
        None => prop_assert_eq!(got, Endpoint::UNKNOWN),
        Some(a) => {
            prop_assert_eq!(Some(got.addr), addr16(a.ip()));
            prop_assert_eq!(got.port.get(), a.port());
            prop_assert_eq!(got.is_latched(), latched);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn any_spec_validates_or_names_a_field_and_builds_what_it_asks_for(
        spec in spec(),
        port in any::<u16>(),
        defaults in (prop::option::of(ipv4()), prop::option::of(ipv4())),
    ) {
        let defaults = [defaults.0, defaults.1];
        // Invalid specs build too (the builder is total); only valid ones are checked below.
        let channel = build_channel(&spec, port, &defaults);
        if let Err(e) = spec.validate() {
            prop_assert!(!e.field.is_empty() && !e.reason.is_empty());
            let known = e.field == "clock_rate"
                || e.field == "latching.duration"
                || LEG_FIELDS.iter().any(|l| e.field.starts_with(&format!("{l}.")));
            prop_assert!(known, "unknown field {}", e.field);
            prop_assert_eq!(e.to_string(), format!("{}: {}", e.field, e.reason));
            return Ok(());
        }

        prop_assert_eq!(channel.latching, spec.data_path_latching());
        prop_assert_eq!(channel.clock_rate, spec.clock_rate);
        prop_assert_eq!(channel.flags, 0);
        for ((got, want), default) in channel.legs.iter().zip(&spec.legs).zip(defaults) {
            let latched = want.strict || spec.latching == LatchingPolicy::Strict;
            check_endpoint(got.rtp, want.rtp, latched)?;
            // RTCP: as given, else on the port above RTP (if there is one).
            let rtcp = want.rtcp.or_else(|| {
                want.rtp
                    .and_then(|a| a.port().checked_add(1).map(|p| SocketAddr::new(a.ip(), p)))
            });
            check_endpoint(got.rtcp, rtcp, latched)?;
            let relay = want
                .relay_addr
                .or(default)
                .map_or(Addr16::UNSPECIFIED, |a| Addr16::from_ipv4_octets(a.octets()));
            prop_assert_eq!(got.local_addr, relay);
            prop_assert_eq!(got.local_port.get(), port);
        }
    }
}
