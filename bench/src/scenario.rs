//! What one run sends: the flows (addresses, SSRCs, ports, chosen from a seed), the relay
//! channels they use, and the packet rate.
//!
//! A call is two flows, one per direction: Home → relay → Office and Office → relay → Home,
//! 50 packets/s each (G.711, 20 ms). Call `i` uses relay port `port_min + 2i` on both relay
//! addresses. Without a relay (`none`) the same flows go straight to the peer's address
//! through Relay's kernel forwarding.
use std::net::SocketAddrV4;

use anyhow::bail;
use relay_common::{Channel, Endpoint, Leg};
use relay_user::netns;
use serde::Serialize;

use crate::packet::FlowSpec;

/// Packets per second of one G.711 flow (one packet per 20 ms).
pub const CALL_FLOW_PPS: f64 = 50.0;

/// Which way a flow goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Path {
    #[serde(rename = "home->office")]
    HomeToOffice,
    #[serde(rename = "office->home")]
    OfficeToHome,
}

impl Path {
    pub const ALL: [Path; 2] = [Path::HomeToOffice, Path::OfficeToHome];

    pub fn name(self) -> &'static str {
        match self {
            Path::HomeToOffice => "home->office",
            Path::OfficeToHome => "office->home",
        }
    }
    pub fn index(self) -> usize {
        match self {
            Path::HomeToOffice => 0,
            Path::OfficeToHome => 1,
        }
    }
}

/// The traffic profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Profile {
    /// `calls` concurrent G.711 calls: 2 flows each, 50 packets/s per flow, evenly spread.
    Calls { calls: u32 },
    /// `flows` flows Home → Office, flat out (`rate_pps: None`) or at a fixed total rate.
    Flood { flows: u32, rate_pps: Option<f64> },
}

impl Profile {
    /// Total packets per second (`None`: flat out).
    pub fn rate_pps(&self) -> Option<f64> {
        match *self {
            Profile::Calls { calls } => Some(f64::from(calls) * 2.0 * CALL_FLOW_PPS),
            Profile::Flood { rate_pps, .. } => rate_pps,
        }
    }
}

/// One flow of the run.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub path: Path,
    /// Headers as sent.
    pub spec: FlowSpec,
    /// Source and destination the sink must see.
    pub expect_src: SocketAddrV4,
    pub expect_dst: SocketAddrV4,
}

/// Flows, channels and rate of one run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Indexed by flow id (the id carried in every probe).
    pub flows: Vec<Flow>,
    /// Channels to install, by even relay port (empty without a relay).
    pub channels: Vec<(u16, Channel)>,
    pub rate_pps: Option<f64>,
}

/// SplitMix64: a tiny seeded generator for reproducible SSRCs and ports.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// An even port in 10000..60000 (RTP ports are even, RFC 3550 §11).
    fn rtp_port(&mut self) -> u16 {
        10_000 + 2 * (self.next_u64() % 25_000) as u16
    }
}

impl Scenario {
    /// Builds the flows of `profile`; `relay` says whether peers talk to a relay (channels are
    /// made for relay ports from `port_min`, which must leave room for every call or flow).
    pub fn build(
        profile: Profile,
        relay: bool,
        seed: u64,
        port_min: u16,
        port_max: u16,
    ) -> anyhow::Result<Scenario> {
        let (sessions, both_ways) = match profile {
            Profile::Calls { calls } => (calls, true),
            Profile::Flood { flows, .. } => (flows, false),
        };
        if sessions == 0 {
            bail!("a run needs at least one call or flow");
        }
        let first = port_min.next_multiple_of(2);
        let last_needed = u32::from(first) + 2 * (sessions - 1) + 1;
        if relay && last_needed > u32::from(port_max) {
            bail!(
                "{sessions} channels need relay ports {first}-{last_needed}, beyond the range \
                 {port_min}-{port_max}"
            );
        }
        let mut rng = Rng::new(seed);
        let mut flows = Vec::new();
        let mut channels = Vec::new();
        for i in 0..sessions {
            let relay_port = first + 2 * i as u16;
            let home = SocketAddrV4::new(netns::HOME_ADDR, rng.rtp_port());
            let office = SocketAddrV4::new(netns::OFFICE_ADDR, rng.rtp_port());
            let relay_home = SocketAddrV4::new(netns::RELAY_HOME_ADDR, relay_port);
            let relay_office = SocketAddrV4::new(netns::RELAY_OFFICE_ADDR, relay_port);
            let mut flow = |path, src: SocketAddrV4, dst: SocketAddrV4, relay_in, relay_out| {
                let spec = FlowSpec {
                    src,
                    dst: if relay { relay_in } else { dst },
                    ssrc: rng.next_u64() as u32,
                    ts_base: rng.next_u64() as u32,
                };
                flows.push(Flow {
                    path,
                    spec,
                    expect_src: if relay { relay_out } else { src },
                    expect_dst: dst,
                });
            };
            flow(Path::HomeToOffice, home, office, relay_home, relay_office);
            if both_ways {
                flow(Path::OfficeToHome, office, home, relay_office, relay_home);
            }
            if relay {
                let latched = |a: SocketAddrV4| {
                    let rtcp = SocketAddrV4::new(*a.ip(), a.port() + 1);
                    (
                        Endpoint::new(a.into(), true),
                        Endpoint::new(rtcp.into(), true),
                    )
                };
                let (a_rtp, a_rtcp) = latched(home);
                let (b_rtp, b_rtcp) = latched(office);
                let channel = Channel {
                    legs: [
                        Leg::new(relay_home.into(), a_rtp, a_rtcp),
                        Leg::new(relay_office.into(), b_rtp, b_rtcp),
                    ],
                    flags: 0,
                    ..Channel::default()
                };
                channels.push((relay_port, channel));
            }
        }
        Ok(Scenario {
            flows,
            channels,
            rate_pps: profile.rate_pps(),
        })
    }

    pub fn has_path(&self, path: Path) -> bool {
        self.flows.iter().any(|f| f.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_user::forward::{Datagram, Decision, LatchState, decide};

    #[test]
    fn calls_make_two_flows_and_one_channel_each() {
        let s = Scenario::build(Profile::Calls { calls: 3 }, true, 7, 20_000, 29_999).unwrap();
        assert_eq!(s.flows.len(), 6);
        assert_eq!(s.channels.len(), 3);
        assert_eq!(s.rate_pps, Some(300.0));
        assert_eq!(s.channels[2].0, 20_004);
        // The shared forwarding rule sends each flow where the sink expects it.
        for (i, f) in s.flows.iter().enumerate() {
            let (port, mut ch) = s.channels[i / 2];
            assert_eq!(f.spec.dst.port(), port);
            match decide(
                &mut ch,
                &mut LatchState::default(),
                port,
                &Datagram {
                    src: f.spec.src.into(),
                    dst: Some((*f.spec.dst.ip()).into()),
                    payload: &[0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 7],
                },
                0,
                |_| 0,
            ) {
                Decision::Forward {
                    from, to, latched, ..
                } => {
                    assert_eq!(from, f.expect_src.into());
                    assert_eq!(to, f.expect_dst.into());
                    assert!(!latched);
                }
                d => panic!("{d:?}"),
            }
        }
        // Same seed, same flows.
        let again = Scenario::build(Profile::Calls { calls: 3 }, true, 7, 20_000, 29_999).unwrap();
        assert_eq!(again.flows[5].spec, s.flows[5].spec);
    }

    #[test]
    fn without_relay_flows_go_straight_to_the_peer() {
        let s = Scenario::build(
            Profile::Flood {
                flows: 2,
                rate_pps: None,
            },
            false,
            1,
            1,
            1,
        )
        .unwrap();
        assert!(s.channels.is_empty());
        assert!(!s.has_path(Path::OfficeToHome));
        assert_eq!(s.flows[0].spec.dst, s.flows[0].expect_dst);
        assert_eq!(s.flows[0].spec.src, s.flows[0].expect_src);
    }

    #[test]
    fn port_range_must_fit() {
        assert!(Scenario::build(Profile::Calls { calls: 5001 }, true, 1, 20_000, 29_999).is_err());
        assert!(Scenario::build(Profile::Calls { calls: 5000 }, true, 1, 20_000, 29_999).is_ok());
    }
}
