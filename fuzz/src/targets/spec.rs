//! Channel specs (`relay_core::spec`): any spec validates or is refused with an error naming an
//! API field; `build_channel` is total and, for a valid spec, applies its policy and clock
//! rate and sets each leg's relay port and address.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use relay_common::Addr16;
use relay_core::spec::LEG_FIELDS;
use relay_core::{ChannelSpec, LatchingPolicy, LegSpec, MAX_LATCH_DURATION, build_channel};

use crate::{Input, Target};

pub const TARGET: Target = Target {
    name: "spec",
    run,
    seeds,
};

fn ipv4(i: &mut Input) -> Ipv4Addr {
    if i.below(4) == 0 {
        i.pick(&[
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::LOCALHOST,
        ])
    } else {
        Ipv4Addr::from(i.u32())
    }
}

fn socket_addr(i: &mut Input) -> Option<SocketAddr> {
    if i.below(4) == 0 {
        return None;
    }
    let ip = match i.below(5) {
        0 => IpAddr::V6(ipv4(i).to_ipv6_mapped()),
        1 => IpAddr::V6(Ipv6Addr::from(
            u128::from(i.u64()) << 64 | u128::from(i.u64()),
        )),
        _ => IpAddr::V4(ipv4(i)),
    };
    let any = i.u16();
    let port = i.pick(&[0, 1, 5004, u16::MAX, any]);
    Some(SocketAddr::new(ip, port))
}

fn duration(i: &mut Input) -> Duration {
    match i.below(4) {
        0 => Duration::ZERO,
        1 => MAX_LATCH_DURATION + Duration::from_nanos(u64::from(i.u8())),
        2 => Duration::from_nanos(i.u64()),
        _ => Duration::from_millis(u64::from(i.u32())),
    }
}

fn leg(i: &mut Input) -> LegSpec {
    LegSpec {
        rtp: socket_addr(i),
        rtcp: socket_addr(i),
        strict: i.bool(),
        relay_addr: i.bool().then(|| ipv4(i)),
    }
}

pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    let legs = [leg(&mut i), leg(&mut i)];
    let latching = match i.below(4) {
        0 => LatchingPolicy::FirstPacket,
        1 => LatchingPolicy::After {
            packets: i.u32(),
            duration: duration(&mut i),
        },
        2 => LatchingPolicy::Strict,
        _ => LatchingPolicy::Handover {
            silence: duration(&mut i),
        },
    };
    let any = i.u32();
    let spec = ChannelSpec {
        legs,
        latching,
        latch_any_payload: i.bool(),
        clock_rate: i.pick(&[0, 8000, 1 << 20, (1 << 20) + 1, any]),
    };
    let port = i.u16();
    let defaults = [
        i.bool().then(|| ipv4(&mut i)),
        i.bool().then(|| ipv4(&mut i)),
    ];
    let channel = build_channel(&spec, port, &defaults);
    match spec.validate() {
        Err(e) => {
            assert!(!e.reason.is_empty());
            let known = e.field == "clock_rate"
                || e.field == "latching.duration"
                || LEG_FIELDS
                    .iter()
                    .any(|l| e.field.starts_with(&format!("{l}.")));
            assert!(known, "unknown field {:?}", e.field);
        }
        Ok(()) => {
            assert_eq!(channel.latching, spec.data_path_latching());
            assert_eq!(channel.clock_rate, spec.clock_rate);
            for ((got, want), default) in channel.legs.iter().zip(&spec.legs).zip(defaults) {
                assert_eq!(got.local_port.get(), port);
                let relay = want
                    .relay_addr
                    .or(default)
                    .map_or(Addr16::UNSPECIFIED, |a| {
                        Addr16::from_ipv4_octets(a.octets())
                    });
                assert_eq!(got.local_addr, relay);
                assert_eq!(
                    got.rtp.socket_addr().is_some(),
                    want.rtp.is_some(),
                    "{spec:?}"
                );
            }
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    vec![vec![0; 32], vec![1; 64], (0..=255).collect()]
}
