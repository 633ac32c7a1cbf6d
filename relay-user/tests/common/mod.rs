//! Helpers shared by the privileged integration tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use etherparse::{
    EtherType, Ethernet2Header, IpDscp, IpNumber, Ipv4Header, Ipv4Options, UdpHeader,
};

/// Privileged tests need root (BPF, XDP, network namespaces). Without it they fail loudly:
/// a skipped data-plane test would make a green run mean nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, XDP, network namespaces); run the README's test command as root"
    );
}

/// How to build a test frame.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub dscp: u8,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    pub options: Vec<u8>,
    /// `None`: compute the UDP checksum; `Some(v)`: write `v` (0 = no checksum).
    pub udp_checksum: Option<u16>,
    pub protocol: IpNumber,
}

impl FrameSpec {
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0xaa, 0xaa],
            dst_mac: [0x02, 0, 0, 0, 0xbb, 0xbb],
            src,
            dst,
            payload: payload.to_vec(),
            ttl: 57,
            dscp: 46, // EF, as phones mark voice
            id: 0x1234,
            dont_fragment: true,
            more_fragments: false,
            options: Vec::new(),
            udp_checksum: None,
            protocol: IpNumber::UDP,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: EtherType::IPV4,
        }
        .write(&mut out)
        .unwrap();
        let l4_len = if self.protocol == IpNumber::UDP { 8 } else { 0 } + self.payload.len();
        let mut ip = Ipv4Header::new(
            l4_len as u16,
            self.ttl,
            self.protocol,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .unwrap();
        ip.dscp = IpDscp::try_new(self.dscp).unwrap();
        ip.identification = self.id;
        ip.dont_fragment = self.dont_fragment;
        ip.more_fragments = self.more_fragments;
        ip.options = Ipv4Options::try_from(self.options.as_slice()).unwrap();
        ip.total_len = (ip.header_len() + l4_len) as u16;
        ip.header_checksum = ip.calc_header_checksum();
        ip.write(&mut out).unwrap();
        if self.protocol == IpNumber::UDP {
            let mut udp =
                UdpHeader::with_ipv4_checksum(self.src.port(), self.dst.port(), &ip, &self.payload)
                    .unwrap();
            if let Some(c) = self.udp_checksum {
                udp.checksum = c;
            }
            udp.write(&mut out).unwrap();
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// An RTP packet (RFC 3550 §5.1): version 2, PCMU, given sequence number, 160-byte payload.
pub fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend((0..160).map(|i| (i as u8) ^ (seq as u8)));
    p
}

/// Parsed view of a forwarded IPv4/UDP frame, with both checksums verified independently.
#[derive(Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub ttl: u8,
    pub payload: Vec<u8>,
    pub udp_checksum: u16,
}

pub fn parse_forwarded(frame: &[u8]) -> Forwarded {
    let (eth, rest) = Ethernet2Header::from_slice(frame).unwrap();
    let (ip, rest) = Ipv4Header::from_slice(rest).unwrap();
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (udp, payload) = UdpHeader::from_slice(rest).unwrap();
    let payload = &payload[..usize::from(udp.length) - 8];
    if udp.checksum != 0 {
        assert_eq!(
            udp.checksum,
            udp.calc_checksum_ipv4(&ip, payload).unwrap(),
            "UDP checksum after rewrite"
        );
    }
    Forwarded {
        src_mac: eth.source,
        dst_mac: eth.destination,
        src: SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(ip.source),
            udp.source_port,
        )),
        dst: SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(ip.destination),
            udp.destination_port,
        )),
        ttl: ip.time_to_live,
        payload: payload.to_vec(),
        udp_checksum: udp.checksum,
    }
}

/// A unique bpffs directory for one test's pinned maps, removed on drop (also on panic).
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(
            format!(
                "/sys/fs/bpf/homerelay-test-{tag}-{}-{n}",
                std::process::id()
            )
            .into(),
        )
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
