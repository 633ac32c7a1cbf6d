//! The probe packets: IPv4/UDP/RTP frames the sender builds itself, and the parser the
//! receiver uses on what the AF_PACKET ring hands it.
//!
//! Every probe is a G.711 (PCMU) RTP packet (RFC 3550 §5.1, payload type 0, 20 ms = 160
//! samples per packet) whose 160-byte payload starts with a [`Probe`]: magic, flow id, a
//! 64-bit sequence number and the `CLOCK_MONOTONIC` send time. The invariant: **an IPv4
//! packet is always [`IP_PACKET_LEN`] (200) bytes**, so the receiver can reject anything else
//! cheaply, and the relay forwards RTP payloads unchanged, so the probe survives relaying.
use std::net::SocketAddrV4;

use etherparse::{IpNumber, Ipv4Header, Ipv4HeaderSlice, UdpHeader, UdpHeaderSlice};

/// RTP fixed header (no CSRC, no extension).
pub const RTP_HEADER_LEN: usize = 12;
/// PCMU payload of 20 ms at 8 kHz.
pub const RTP_PAYLOAD_LEN: usize = 160;
/// RTP timestamp increment per packet (samples in 20 ms at 8 kHz).
pub const RTP_TS_STEP: u32 = 160;
/// UDP payload: RTP header + payload.
pub const UDP_PAYLOAD_LEN: usize = RTP_HEADER_LEN + RTP_PAYLOAD_LEN;
/// Whole IPv4 packet: 20 + 8 + 172.
pub const IP_PACKET_LEN: usize = Ipv4Header::MIN_LEN + UdpHeader::LEN + UDP_PAYLOAD_LEN;
/// Ethernet II header on the sink's interface.
pub const ETH_HEADER_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

/// First bytes of every probe payload.
pub const MAGIC: [u8; 4] = *b"hrld";
/// [`Probe::measured`]: sent inside the measurement window (not warm-up).
const FLAG_MEASURED: u8 = 1;
/// PCMU silence, to fill the rest of the payload like a real (quiet) call.
const PCMU_SILENCE: u8 = 0xff;

/// The information every probe carries in its RTP payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub flow: u32,
    pub seq: u64,
    /// `CLOCK_MONOTONIC` nanoseconds just before the batch holding it was handed to the kernel.
    pub send_ns: u64,
    /// Sent in the measurement window; warm-up packets only keep the sequence tracking going.
    pub measured: bool,
}

/// Addresses and RTP identity of one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSpec {
    /// Source written into the IPv4/UDP header.
    pub src: SocketAddrV4,
    /// Destination written into the IPv4/UDP header (the relay, or the peer without a relay).
    pub dst: SocketAddrV4,
    pub ssrc: u32,
    /// RTP timestamp of sequence 0.
    pub ts_base: u32,
}

/// Writes one complete IPv4/UDP/RTP packet for `probe` on `flow` into `buf`; returns its
/// length ([`IP_PACKET_LEN`]).
pub fn build(buf: &mut [u8; IP_PACKET_LEN], flow: &FlowSpec, probe: &Probe) -> usize {
    let mut payload = [PCMU_SILENCE; UDP_PAYLOAD_LEN];
    // RTP: V=2, no padding/extension/CSRC, marker clear, PT 0 (PCMU).
    payload[0] = 0x80;
    payload[1] = 0;
    payload[2..4].copy_from_slice(&(probe.seq as u16).to_be_bytes());
    let ts = flow
        .ts_base
        .wrapping_add((probe.seq as u32).wrapping_mul(RTP_TS_STEP));
    payload[4..8].copy_from_slice(&ts.to_be_bytes());
    payload[8..12].copy_from_slice(&flow.ssrc.to_be_bytes());
    let body = &mut payload[RTP_HEADER_LEN..];
    body[0..4].copy_from_slice(&MAGIC);
    body[4..8].copy_from_slice(&probe.flow.to_be_bytes());
    body[8..16].copy_from_slice(&probe.seq.to_be_bytes());
    body[16..24].copy_from_slice(&probe.send_ns.to_be_bytes());
    body[24] = if probe.measured { FLAG_MEASURED } else { 0 };

    const IP_PAYLOAD_LEN: u16 = (UdpHeader::LEN + UDP_PAYLOAD_LEN) as u16;
    let src = flow.src.ip().octets();
    let dst = flow.dst.ip().octets();
    let ip = match Ipv4Header::new(IP_PAYLOAD_LEN, 64, IpNumber::UDP, src, dst) {
        Ok(ip) => ip,
        Err(_) => unreachable!("a 180-byte payload always fits"),
    };
    let udp = match UdpHeader::with_ipv4_checksum(flow.src.port(), flow.dst.port(), &ip, &payload) {
        Ok(udp) => udp,
        Err(_) => unreachable!("a 172-byte payload always fits"),
    };
    let mut out: &mut [u8] = &mut buf[..];
    // Writing into a slice of exactly the right size cannot fail; `write` fills in the IPv4
    // header checksum.
    let written = ip.write(&mut out).and_then(|()| udp.write(&mut out));
    debug_assert!(written.is_ok());
    buf[Ipv4Header::MIN_LEN + UdpHeader::LEN..].copy_from_slice(&payload);
    IP_PACKET_LEN
}

/// A probe as received, with what the receiver checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub probe: Probe,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ip_checksum_ok: bool,
    /// `None`: the sender put no UDP checksum (0).
    pub udp_checksum_ok: Option<bool>,
}

/// Parses an Ethernet frame; `None` if it is not one of our probes (ARP, IPv6, other UDP...).
pub fn parse_frame(frame: &[u8]) -> Option<Received> {
    if frame.len() < ETH_HEADER_LEN || frame[12..14] != ETHERTYPE_IPV4 {
        return None;
    }
    parse_ip(&frame[ETH_HEADER_LEN..])
}

/// Parses an IPv4 packet; `None` if it is not one of our probes.
pub fn parse_ip(packet: &[u8]) -> Option<Received> {
    let ip = Ipv4HeaderSlice::from_slice(packet).ok()?;
    if ip.protocol() != IpNumber::UDP || usize::from(ip.total_len()) != IP_PACKET_LEN {
        return None;
    }
    let ihl = ip.slice().len();
    let udp = UdpHeaderSlice::from_slice(packet.get(ihl..)?).ok()?;
    let payload = packet.get(ihl + UdpHeader::LEN..IP_PACKET_LEN)?;
    if payload.len() != UDP_PAYLOAD_LEN || payload[RTP_HEADER_LEN..RTP_HEADER_LEN + 4] != MAGIC {
        return None;
    }
    let body = &payload[RTP_HEADER_LEN..];
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let probe = Probe {
        flow: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        seq: u64_at(8),
        send_ns: u64_at(16),
        measured: body[24] & FLAG_MEASURED != 0,
    };
    let ip_checksum_ok = ip.to_header().calc_header_checksum() == ip.header_checksum();
    let udp_checksum_ok = (udp.checksum() != 0).then(|| {
        udp.to_header()
            .calc_checksum_ipv4_raw(ip.source(), ip.destination(), payload)
            .is_ok_and(|c| c == udp.checksum())
    });
    Some(Received {
        probe,
        src: SocketAddrV4::new(ip.source_addr(), udp.source_port()),
        dst: SocketAddrV4::new(ip.destination_addr(), udp.destination_port()),
        ip_checksum_ok,
        udp_checksum_ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> FlowSpec {
        FlowSpec {
            src: "198.51.100.10:4000".parse().unwrap(),
            dst: "198.51.100.1:20000".parse().unwrap(),
            ssrc: 0xdead_beef,
            ts_base: u32::MAX - 100,
        }
    }

    #[test]
    fn built_packet_parses_back_with_valid_checksums() {
        let probe = Probe {
            flow: 7,
            seq: 70_000,
            send_ns: 123_456_789,
            measured: true,
        };
        let mut buf = [0u8; IP_PACKET_LEN];
        assert_eq!(build(&mut buf, &flow(), &probe), IP_PACKET_LEN);
        let r = parse_ip(&buf).unwrap();
        assert_eq!(r.probe, probe);
        assert_eq!(r.src, flow().src);
        assert_eq!(r.dst, flow().dst);
        assert!(r.ip_checksum_ok);
        assert_eq!(r.udp_checksum_ok, Some(true));
        // RTP header: v2, PT 0, seq low 16 bits, timestamp stepping by 160, SSRC.
        let rtp = &buf[28..40];
        assert_eq!(rtp[0], 0x80);
        assert_eq!(rtp[1], 0);
        assert_eq!(u16::from_be_bytes([rtp[2], rtp[3]]), 70_000u64 as u16);
        let ts = u32::from_be_bytes([rtp[4], rtp[5], rtp[6], rtp[7]]);
        assert_eq!(
            ts,
            (u32::MAX - 100).wrapping_add(70_000u32.wrapping_mul(160))
        );
        assert_eq!(&rtp[8..12], &0xdead_beefu32.to_be_bytes());
    }

    #[test]
    fn corrupted_checksums_are_detected() {
        let probe = Probe {
            flow: 1,
            seq: 1,
            send_ns: 1,
            measured: false,
        };
        let mut buf = [0u8; IP_PACKET_LEN];
        build(&mut buf, &flow(), &probe);
        let mut bad_udp = buf;
        bad_udp[IP_PACKET_LEN - 1] ^= 1;
        let r = parse_ip(&bad_udp).unwrap();
        assert!(r.ip_checksum_ok);
        assert_eq!(r.udp_checksum_ok, Some(false));
        let mut bad_ip = buf;
        bad_ip[8] -= 1; // TTL
        assert!(!parse_ip(&bad_ip).unwrap().ip_checksum_ok);
        let mut no_udp_sum = buf;
        no_udp_sum[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(parse_ip(&no_udp_sum).unwrap().udp_checksum_ok, None);
    }

    #[test]
    fn frames_that_are_not_probes_are_ignored() {
        let mut buf = [0u8; IP_PACKET_LEN];
        build(
            &mut buf,
            &flow(),
            &Probe {
                flow: 1,
                seq: 1,
                send_ns: 1,
                measured: true,
            },
        );
        let mut frame = vec![0u8; ETH_HEADER_LEN];
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV4);
        frame.extend_from_slice(&buf);
        assert!(parse_frame(&frame).is_some());
        frame[12] = 0x86; // IPv6 ethertype
        assert!(parse_frame(&frame).is_none());
        let mut other = buf;
        other[RTP_HEADER_LEN + 28] = b'X';
        assert!(parse_ip(&other).is_none());
        assert!(parse_ip(&buf[..100]).is_none());
    }
}
