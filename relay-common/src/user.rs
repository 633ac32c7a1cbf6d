//! User-space conveniences: `aya::Pod` for the map types, conversions to and from `std::net`.
extern crate std;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    Addr16, Be16, Channel, ChannelKey, ChannelState, ChannelStats, DEFAULT_CLOCK_RATE,
    DirectionStats, ENDPOINT_LATCHED, Endpoint, Leg, Neighbour, NextHop, NextHopKey, RelayConfig,
    RtpState,
};

// SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers, has no implicit
// padding (sizes asserted in lib.rs) and is valid for any bit pattern.
unsafe impl aya::Pod for ChannelKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Channel {}
// SAFETY: as above.
unsafe impl aya::Pod for ChannelState {}
// SAFETY: as above.
unsafe impl aya::Pod for NextHop {}
// SAFETY: as above.
unsafe impl aya::Pod for NextHopKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Neighbour {}
// SAFETY: as above.
unsafe impl aya::Pod for ChannelStats {}
// SAFETY: as above.
unsafe impl aya::Pod for DirectionStats {}
// SAFETY: as above.
unsafe impl aya::Pod for RelayConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for RtpState {}

impl From<IpAddr> for Addr16 {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Addr16::from_ipv4_octets(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Addr16::from_ipv4_octets(v4.octets()),
                None => Addr16::from_octets(v6.octets()),
            },
        }
    }
}

impl From<Addr16> for IpAddr {
    fn from(a: Addr16) -> Self {
        let o = a.octets();
        if a.is_ipv4() {
            IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
        } else {
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }
}

impl Endpoint {
    /// An endpoint at `addr`, latched or only expected.
    pub fn new(addr: SocketAddr, latched: bool) -> Self {
        Self {
            addr: addr.ip().into(),
            port: Be16::new(addr.port()),
            flags: if latched { ENDPOINT_LATCHED } else { 0 },
            reserved: 0,
        }
    }
    /// The endpoint as a socket address, if known.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.is_known()
            .then(|| SocketAddr::new(self.addr.into(), self.port.get()))
    }
    /// Whether this endpoint's address and port equal `addr`.
    pub fn matches(&self, addr: SocketAddr) -> bool {
        self.is_known() && self.addr == Addr16::from(addr.ip()) && self.port.get() == addr.port()
    }
}

impl Leg {
    /// A leg whose peer sends RTP from `rtp` and RTCP from `rtp.port() + 1` unless told
    /// otherwise, talking to the relay at `local`.
    pub fn new(local: SocketAddr, rtp: Endpoint, rtcp: Endpoint) -> Self {
        Self {
            rtp,
            rtcp,
            local_addr: local.ip().into(),
            local_port: Be16::new(local.port()),
            reserved: 0,
            ifindex: 0,
        }
    }
    /// The relay address this leg talks to (RTP port).
    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(self.local_addr.into(), self.local_port.get())
    }
}

impl ChannelStats {
    /// Adds `other` into `self` (e.g. to merge the fast-path and user-space counters): packets,
    /// bytes, lost and reordered add up; the RTP sequence and jitter state are those of the
    /// path that saw the latest RTP packet ([`RtpState::merge`]).
    pub fn merge(&mut self, other: &ChannelStats) {
        for (a, b) in self.from_leg.iter_mut().zip(other.from_leg.iter()) {
            a.packets += b.packets;
            a.bytes += b.bytes;
            a.last_seen_ns = a.last_seen_ns.max(b.last_seen_ns);
            a.rtp.merge(&b.rtp);
        }
    }
}

impl RtpState {
    /// Interarrival jitter in milliseconds at `clock_rate` Hz (0 = [`DEFAULT_CLOCK_RATE`]).
    pub fn jitter_ms(&self, clock_rate: u32) -> f64 {
        let rate = if clock_rate == 0 {
            DEFAULT_CLOCK_RATE
        } else {
            clock_rate
        };
        f64::from(self.jitter_q4) / 16.0 * 1000.0 / f64::from(rate)
    }
}

impl Channel {
    /// The clock rate for jitter: [`Channel::clock_rate`], or the default when 0.
    pub fn effective_clock_rate(&self) -> u32 {
        if self.clock_rate == 0 {
            DEFAULT_CLOCK_RATE
        } else {
            self.clock_rate
        }
    }
}

impl RelayConfig {
    /// A configuration for relay ports `port_min..=port_max`.
    pub fn new(port_min: u16, port_max: u16) -> Self {
        Self {
            port_min: Be16::new(port_min),
            port_max: Be16::new(port_max),
            ttl: crate::DEFAULT_TTL,
            reserved: [0; 3],
            fib_generation: 1,
        }
    }
}

/// Views a map type as its bytes (for tests and debugging dumps).
pub fn as_bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding and no invalid bit patterns; the slice borrows `v`.
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>()) }
}

/// Reads a map type back from bytes; `None` if the length is wrong.
pub fn from_bytes<T: aya::Pod>(b: &[u8]) -> Option<T> {
    (b.len() == core::mem::size_of::<T>())
        // SAFETY: the length matches and any bit pattern is a valid `T: Pod`.
        .then(|| unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{COUNTER_COUNT, Counter};

    fn sample_channel() -> Channel {
        let a = Leg::new(
            "198.51.100.1:30528".parse().unwrap(),
            Endpoint::new("203.0.113.7:40000".parse().unwrap(), true),
            Endpoint::new("203.0.113.7:40001".parse().unwrap(), false),
        );
        let mut b = Leg::new(
            "192.0.2.1:30528".parse().unwrap(),
            Endpoint::new("[2001:db8::10]:5004".parse().unwrap(), true),
            Endpoint::UNKNOWN,
        );
        b.ifindex = 7;
        Channel {
            legs: [a, b],
            flags: 0,
            clock_rate: 48_000,
            latching: crate::Latching::new(crate::LatchMode::After, 3, 250),
            reserved: 0,
        }
    }

    #[test]
    fn channel_round_trips_through_bytes() {
        let ch = sample_channel();
        let bytes = as_bytes(&ch).to_vec();
        assert_eq!(bytes.len(), 152);
        let back: Channel = from_bytes(&bytes).unwrap();
        assert_eq!(back, ch);
        assert!(from_bytes::<Channel>(&bytes[1..]).is_none());
    }

    #[test]
    fn wire_layout_is_network_order() {
        let ch = sample_channel();
        let b = as_bytes(&ch);
        // leg A, rtp endpoint: ::ffff:203.0.113.7 then port 40000 = 0x9c40 big-endian, flags.
        assert_eq!(
            &b[0..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7]
        );
        assert_eq!(&b[16..18], &[0x9c, 0x40]);
        assert_eq!(b[18], ENDPOINT_LATCHED);
        // leg A local address and port 30528 = 0x7740.
        assert_eq!(
            &b[40..56],
            &Addr16::from_ipv4_octets([198, 51, 100, 1]).octets()
        );
        assert_eq!(&b[56..58], &[0x77, 0x40]);
        // leg B ifindex (host order, as the kernel's bpf_fib_lookup uses it).
        assert_eq!(&b[64 + 60..64 + 64], &7u32.to_ne_bytes());
        // After the legs: flags, clock rate (host order), latching (mode, 3 reserved bytes,
        // packets, duration), reserved.
        assert_eq!(&b[128..132], &0u32.to_ne_bytes());
        assert_eq!(&b[132..136], &48_000u32.to_ne_bytes());
        assert_eq!(&b[136..140], &[crate::LatchMode::After as u8, 0, 0, 0]);
        assert_eq!(&b[140..144], &3u32.to_ne_bytes());
        assert_eq!(&b[144..148], &250u32.to_ne_bytes());
        assert_eq!(&b[148..152], &[0; 4]);
        for m in [
            crate::LatchMode::FirstPacket,
            crate::LatchMode::After,
            crate::LatchMode::Strict,
            crate::LatchMode::Handover,
        ] {
            assert_eq!(crate::LatchMode::from_raw(m as u8), m);
        }
        assert_eq!(
            crate::LatchMode::from_raw(200),
            crate::LatchMode::FirstPacket
        );
        assert_eq!(as_bytes(&ChannelKey::for_port(30529)), &[0x77, 0x40, 0, 0]);
        assert_eq!(crate::channel_index(30529), crate::channel_index(30528));
        assert_eq!(crate::channel_index(30528), 15264);
        assert!(crate::channel_index(u16::MAX) < crate::MAX_CHANNELS);
    }

    #[test]
    fn addresses_convert_both_ways() {
        for s in ["203.0.113.7", "2001:db8::1", "::"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(IpAddr::from(Addr16::from(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(Addr16::from(mapped).is_ipv4());
        assert!(Addr16::from_ipv4_octets([0, 0, 0, 0]).is_unspecified());
        assert!(!Endpoint::new("0.0.0.0:1".parse().unwrap(), false).is_known());
    }

    #[test]
    fn endpoint_matching() {
        let e = Endpoint::new("203.0.113.7:40000".parse().unwrap(), true);
        assert!(e.matches("203.0.113.7:40000".parse().unwrap()));
        assert!(e.matches("[::ffff:203.0.113.7]:40000".parse().unwrap()));
        assert!(!e.matches("203.0.113.7:40001".parse().unwrap()));
        assert!(!Endpoint::UNKNOWN.matches("0.0.0.0:0".parse().unwrap()));
    }

    #[test]
    fn counters_are_dense_and_named() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
        }
        assert_eq!(Counter::ALL.len() as u32, COUNTER_COUNT);
        let mut names: std::vec::Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
    }

    #[test]
    fn stats_merge_adds_and_keeps_latest() {
        let rtp = |first: u16, last: u16, at_ms: u64| {
            let mut s = RtpState::default();
            for seq in first..=last {
                let hdr = crate::quality::RtpHeader {
                    seq,
                    timestamp: u32::from(seq) * 160,
                };
                s.update(hdr, at_ms * 1_000_000 + u64::from(seq) * 20_000_000, 8000);
            }
            s
        };
        let mut a = ChannelStats::default();
        a.from_leg[0] = DirectionStats {
            packets: 2,
            bytes: 320,
            last_seen_ns: 10,
            rtp: rtp(0, 1, 1),
        };
        let mut b = ChannelStats::default();
        b.from_leg[0] = DirectionStats {
            packets: 3,
            bytes: 480,
            last_seen_ns: 5,
            rtp: rtp(3, 5, 1),
        };
        b.from_leg[1] = DirectionStats {
            packets: 1,
            bytes: 160,
            last_seen_ns: 7,
            ..DirectionStats::default()
        };
        a.merge(&b);
        let d = a.from_leg[0];
        assert_eq!((d.packets, d.bytes, d.last_seen_ns), (5, 800, 10));
        // Each path counts gaps within its own run: seq 2, between user space's run and the fast
        // path's, is seen by neither as a gap (documented on `RtpState::merge`).
        assert_eq!((d.rtp.received, d.rtp.lost(), d.rtp.ext_max_seq), (5, 0, 5));
        assert_eq!(a.from_leg[1].packets, 1);
        assert_eq!(a.from_leg[1].rtp, RtpState::default());
    }

    #[test]
    fn channel_state_round_trips_through_bytes() {
        let mut st = ChannelState::default();
        st.stats.from_leg[1].rtp.jitter_q4 = 0x1234_5678;
        st.stats.from_leg[1].rtp.received = 9;
        st.nexthop[1].generation = 3;
        let bytes = as_bytes(&st).to_vec();
        assert_eq!(bytes.len(), 216);
        // from_leg[1] starts at 80; its RtpState at 80 + 24; jitter_q4 at +48 within it.
        assert_eq!(
            &bytes[80 + 24 + 48..80 + 24 + 52],
            &0x1234_5678u32.to_ne_bytes()
        );
        assert_eq!(from_bytes::<ChannelState>(&bytes), Some(st));
    }

    #[test]
    fn jitter_in_milliseconds_uses_the_clock_rate() {
        let s = RtpState {
            jitter_q4: 16 * 80,
            ..RtpState::default()
        };
        assert_eq!(s.jitter_ms(8000), 10.0);
        assert_eq!(s.jitter_ms(0), 10.0);
        assert_eq!(s.jitter_ms(16000), 5.0);
    }
}
