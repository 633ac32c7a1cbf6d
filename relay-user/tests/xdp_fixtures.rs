//! One specification, two data paths: packet fixtures (input frame → expected verdict and
//! output frame) run through the XDP program with `BPF_PROG_TEST_RUN` and through the
//! user-space forwarding rule, which must agree.
//!
//! The program runs in the relay namespace of a testbed, so its FIB lookups see real routes and
//! (static) neighbours. For every fixture the test checks: the XDP action; the one counter that
//! must move; the output frame byte for byte against one built independently (fresh checksums);
//! that a passed frame is untouched; and that the user-space rule, fed what the kernel would
//! deliver to the relay's socket, reaches the same outcome (same source, destination, payload).
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

mod common;

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use common::{FrameSpec, PinDir, parse_forwarded, require_root, rtp};
use etherparse::IpNumber;
use relay_common::{
    CHANNEL_USERSPACE_ONLY, Channel, Counter, Endpoint, LEG_A, LatchMode, Latching, Leg,
};
use relay_user::{
    DataPath,
    forward::{Datagram, Decision, DropReason, LatchState, decide},
    netns::{self, Host, Testbed, TestbedOptions},
    xdp::{XdpDataPath, XdpMode, XdpOptions},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const PORT_MIN: u16 = 30528;
const PORT_MAX: u16 = 30887;

fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}
fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn leg(local: &str, rtp: &str, rtcp: &str, latched: bool) -> Leg {
    Leg::new(
        sa(local),
        Endpoint::new(sa(rtp), latched),
        Endpoint::new(sa(rtcp), latched),
    )
}

/// The channels the fixtures run against.
fn channels() -> Vec<(u16, Channel)> {
    let home_office = Channel {
        legs: [
            leg(
                "198.51.100.1:30528",
                "198.51.100.10:5004",
                "198.51.100.10:5005",
                true,
            ),
            leg(
                "192.0.2.1:30528",
                "192.0.2.10:6000",
                "192.0.2.10:6001",
                true,
            ),
        ],
        flags: 0,
        ..Channel::default()
    };
    // Home leg announced a private address (it is behind NAT) and is not latched yet.
    let unlatched_home = Channel {
        legs: [
            leg(
                "198.51.100.129:30530",
                "10.0.0.5:5004",
                "10.0.0.5:5005",
                false,
            ),
            leg(
                "192.0.2.1:30530",
                "192.0.2.10:6002",
                "192.0.2.10:6003",
                true,
            ),
        ],
        flags: 0,
        ..Channel::default()
    };
    // Two devices reached through the same interface: hairpin, XDP_TX.
    let hairpin = Channel {
        legs: [
            leg(
                "198.51.100.1:30532",
                "198.51.100.10:7000",
                "198.51.100.10:7001",
                true,
            ),
            leg(
                "198.51.100.1:30532",
                "198.51.100.10:7002",
                "198.51.100.10:7003",
                true,
            ),
        ],
        flags: 0,
        ..Channel::default()
    };
    let mut userspace_only = home_office;
    userspace_only.flags = CHANNEL_USERSPACE_ONLY;
    for l in &mut userspace_only.legs {
        l.local_port = relay_common::Be16::new(30534);
    }
    // Office leg announced but not confirmed yet.
    let unlatched_office = Channel {
        legs: [
            leg(
                "198.51.100.1:30536",
                "198.51.100.10:5010",
                "198.51.100.10:5011",
                true,
            ),
            leg(
                "192.0.2.1:30536",
                "192.0.2.10:6010",
                "192.0.2.10:6011",
                false,
            ),
        ],
        flags: 0,
        ..Channel::default()
    };
    // One channel per latching policy: the fast path treats them all alike (latched → latched
    // only); user space applies the policy.
    let policy = |port: u16, latching: Latching, home_latched: bool| {
        let local = |addr: &str| format!("{addr}:{port}");
        Channel {
            legs: [
                leg(
                    &local("198.51.100.1"),
                    &format!("198.51.100.10:{}", port - 25000),
                    &format!("198.51.100.10:{}", port - 24999),
                    home_latched,
                ),
                leg(
                    &local("192.0.2.1"),
                    &format!("192.0.2.10:{}", port - 24000),
                    &format!("192.0.2.10:{}", port - 23999),
                    true,
                ),
            ],
            latching,
            ..Channel::default()
        }
    };
    vec![
        (30528, home_office),
        (30530, unlatched_home),
        (30532, hairpin),
        (30534, userspace_only),
        (30536, unlatched_office),
        (
            30538,
            policy(30538, Latching::new(LatchMode::After, 2, 0), false),
        ),
        (
            30540,
            policy(30540, Latching::new(LatchMode::Strict, 0, 0), true),
        ),
        (
            30542,
            policy(30542, Latching::new(LatchMode::Handover, 0, 500), true),
        ),
        (
            30544,
            policy(30544, Latching::new(LatchMode::FirstPacket, 0, 0), true),
        ),
    ]
}

/// What the kernel hands the user-space relay for this frame: `(source, relay port, payload)`,
/// or `None` when no relay socket receives it (not IPv4/UDP, malformed, or no channel bound on
/// that port). Options are stripped and fragments reassembled by the kernel first.
fn socket_view(frame: &[u8], bound: &[u16]) -> Option<(SocketAddr, IpAddr, u16, Vec<u8>)> {
    let (eth, rest) = etherparse::Ethernet2Header::from_slice(frame).ok()?;
    if eth.ether_type != etherparse::EtherType::IPV4 {
        return None;
    }
    let (ip, rest) = etherparse::Ipv4Header::from_slice(rest).ok()?;
    if ip.protocol != IpNumber::UDP || usize::from(ip.total_len) > ip.header_len() + rest.len() {
        return None;
    }
    let (udp, payload) = etherparse::UdpHeader::from_slice(rest).ok()?;
    let ulen = usize::from(udp.length);
    if ulen < 8 || ulen - 8 > payload.len() {
        return None;
    }
    let port = udp.destination_port;
    if !bound.contains(&(port & !1)) {
        return None;
    }
    let src = SocketAddr::V4(SocketAddrV4::new(ip.source.into(), udp.source_port));
    let dst = IpAddr::V4(ip.destination.into());
    Some((src, dst, port, payload[..ulen - 8].to_vec()))
}

struct Fixture {
    name: &'static str,
    ingress: &'static str,
    frame: Vec<u8>,
    action: u32,
    counter: Counter,
    /// For forwarded frames: the exact expected output.
    output: Option<Vec<u8>>,
    /// The whole relay's outcome: what user space decides for what the kernel delivers, or
    /// `None` when the packet never reaches a relay socket.
    userspace: Option<Decision>,
    /// When each leg was last heard (for the Handover policy), as of [`NOW`].
    last_seen: [u64; 2],
}

/// The user-space rule's clock in the fixtures (`CLOCK_MONOTONIC` ns).
const NOW: u64 = 100_000_000_000;
/// Both legs heard just now.
const ALIVE: [u64; 2] = [NOW, NOW];

/// The frame the relay must emit: built from scratch, so its checksums are computed fresh.
fn expected_output(input: &FrameSpec, src: &str, dst: &str, to_if: &str) -> Vec<u8> {
    let relay_end = netns::LINKS.iter().find(|l| l.near.iface == to_if).unwrap();
    let mut out = input.clone();
    out.src_mac = relay_end.near.mac;
    out.dst_mac = relay_end.far.mac;
    out.src = v4(src);
    out.dst = v4(dst);
    out.ttl = 64;
    if input.udp_checksum == Some(0) {
        out.udp_checksum = Some(0);
    } else {
        out.udp_checksum = None;
    }
    out.build()
}

fn fixtures() -> Vec<Fixture> {
    let mut f = Vec::new();
    let payload = rtp(7, 0xdead_beef);
    let fwd = |from_leg, from: &str, to: &str, latched| {
        Some(Decision::Forward {
            from_leg,
            from: sa(from),
            to: sa(to),
            latched,
        })
    };

    let a_to_b = FrameSpec::udp(v4("198.51.100.10:5004"), v4("198.51.100.1:30528"), &payload);
    f.push(Fixture {
        name: "A to B (home to office), redirect between interfaces",
        ingress: netns::RELAY_IF_HOME,
        output: Some(expected_output(
            &a_to_b,
            "192.0.2.1:30528",
            "192.0.2.10:6000",
            netns::RELAY_IF_OFFICE,
        )),
        frame: a_to_b.build(),
        action: XDP_REDIRECT,
        counter: Counter::Redirect,
        userspace: fwd(0, "192.0.2.1:30528", "192.0.2.10:6000", false),
        last_seen: ALIVE,
    });

    let b_to_a = FrameSpec::udp(v4("192.0.2.10:6000"), v4("192.0.2.1:30528"), &payload);
    f.push(Fixture {
        name: "B to A (office to home)",
        ingress: netns::RELAY_IF_OFFICE,
        output: Some(expected_output(
            &b_to_a,
            "198.51.100.1:30528",
            "198.51.100.10:5004",
            netns::RELAY_IF_HOME,
        )),
        frame: b_to_a.build(),
        action: XDP_REDIRECT,
        counter: Counter::Redirect,
        userspace: fwd(1, "198.51.100.1:30528", "198.51.100.10:5004", false),
        last_seen: ALIVE,
    });

    let rtcp = FrameSpec::udp(
        v4("198.51.100.10:5005"),
        v4("198.51.100.1:30529"),
        &[
            0x81, 0xc9, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
            20, 21, 22, 23, 24, 25, 26, 27, 28,
        ],
    );
    f.push(Fixture {
        name: "RTCP to the odd port uses the RTCP endpoints",
        ingress: netns::RELAY_IF_HOME,
        output: Some(expected_output(
            &rtcp,
            "192.0.2.1:30529",
            "192.0.2.10:6001",
            netns::RELAY_IF_OFFICE,
        )),
        frame: rtcp.build(),
        action: XDP_REDIRECT,
        counter: Counter::Redirect,
        userspace: fwd(0, "192.0.2.1:30529", "192.0.2.10:6001", false),
        last_seen: ALIVE,
    });

    let hairpin = FrameSpec::udp(v4("198.51.100.10:7000"), v4("198.51.100.1:30532"), &payload);
    f.push(Fixture {
        name: "both legs behind the ingress interface: XDP_TX",
        ingress: netns::RELAY_IF_HOME,
        output: Some(expected_output(
            &hairpin,
            "198.51.100.1:30532",
            "198.51.100.10:7002",
            netns::RELAY_IF_HOME,
        )),
        frame: hairpin.build(),
        action: XDP_TX,
        counter: Counter::Tx,
        userspace: fwd(0, "198.51.100.1:30532", "198.51.100.10:7002", false),
        last_seen: ALIVE,
    });

    let mut zero = FrameSpec::udp(v4("192.0.2.10:6000"), v4("192.0.2.1:30528"), &payload);
    zero.udp_checksum = Some(0);
    f.push(Fixture {
        name: "zero UDP checksum stays zero",
        ingress: netns::RELAY_IF_OFFICE,
        output: Some(expected_output(
            &zero,
            "198.51.100.1:30528",
            "198.51.100.10:5004",
            netns::RELAY_IF_HOME,
        )),
        frame: zero.build(),
        action: XDP_REDIRECT,
        counter: Counter::Redirect,
        userspace: fwd(1, "198.51.100.1:30528", "198.51.100.10:5004", false),
        last_seen: ALIVE,
    });

    // Payload variants: different starting checksums exercise the carries of the update.
    for (i, odd) in [[0u8, 0], [0xff, 0xff], [0x12, 0x34], [0xfe, 0xdc]]
        .iter()
        .enumerate()
    {
        let mut p = payload.clone();
        p[12..14].copy_from_slice(odd);
        let spec = FrameSpec::udp(v4("198.51.100.10:5004"), v4("198.51.100.1:30528"), &p);
        f.push(Fixture {
            name: [
                "checksum variant 0",
                "checksum variant 1",
                "checksum variant 2",
                "checksum variant 3",
            ][i],
            ingress: netns::RELAY_IF_HOME,
            output: Some(expected_output(
                &spec,
                "192.0.2.1:30528",
                "192.0.2.10:6000",
                netns::RELAY_IF_OFFICE,
            )),
            frame: spec.build(),
            action: XDP_REDIRECT,
            counter: Counter::Redirect,
            userspace: fwd(0, "192.0.2.1:30528", "192.0.2.10:6000", false),
            last_seen: ALIVE,
        });
    }

    let unknown = FrameSpec::udp(v4("198.51.100.10:5999"), v4("198.51.100.1:30528"), &payload);
    f.push(Fixture {
        name: "unknown source on a latched channel: passed up, dropped by user space",
        ingress: netns::RELAY_IF_HOME,
        frame: unknown.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassUnknownSource,
        userspace: Some(Decision::Drop(DropReason::UnknownSource)),
        last_seen: ALIVE,
    });

    // The home peer (latched on leg A, relay address 198.51.100.1) sends to leg B's relay
    // address: not its door. On a routing host the same check keeps transit traffic to another
    // host's port in the relay range out of the fast path.
    let wrong_door = FrameSpec::udp(v4("198.51.100.10:5004"), v4("192.0.2.1:30528"), &payload);
    f.push(Fixture {
        name: "latched source to another relay address: passed up, dropped by user space",
        ingress: netns::RELAY_IF_HOME,
        frame: wrong_door.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassNotRelayAddress,
        userspace: Some(Decision::Drop(DropReason::NotRelayAddress)),
        last_seen: ALIVE,
    });
    let transit = FrameSpec::udp(v4("198.51.100.10:5004"), v4("203.0.113.9:30528"), &payload);
    f.push(Fixture {
        name: "latched source to another host (transit): passed up, never rewritten",
        ingress: netns::RELAY_IF_HOME,
        frame: transit.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassNotRelayAddress,
        userspace: Some(Decision::Drop(DropReason::NotRelayAddress)),
        last_seen: ALIVE,
    });

    let natted = FrameSpec::udp(
        v4("198.51.100.130:40001"),
        v4("198.51.100.129:30530"),
        &payload,
    );
    f.push(Fixture {
        name: "unlatched leg: passed up, user space latches the NAT address and forwards",
        ingress: netns::RELAY_IF_NAT,
        frame: natted.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassUnknownSource,
        userspace: fwd(0, "192.0.2.1:30530", "192.0.2.10:6002", true),
        last_seen: ALIVE,
    });

    let to_unlatched = FrameSpec::udp(v4("198.51.100.10:5010"), v4("198.51.100.1:30536"), &payload);
    f.push(Fixture {
        name: "destination leg not latched: passed up, user space sends to the announced address",
        ingress: netns::RELAY_IF_HOME,
        frame: to_unlatched.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassDestinationUnlatched,
        userspace: fwd(0, "192.0.2.1:30536", "192.0.2.10:6010", false),
        last_seen: ALIVE,
    });

    let us_only = FrameSpec::udp(v4("198.51.100.10:5004"), v4("198.51.100.1:30534"), &payload);
    f.push(Fixture {
        name: "channel marked user space only",
        ingress: netns::RELAY_IF_HOME,
        frame: us_only.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassUserspaceOnly,
        userspace: fwd(0, "192.0.2.1:30534", "192.0.2.10:6000", false),
        last_seen: ALIVE,
    });

    for (name, port, counter) in [
        ("port below the range", 30526, Counter::PassPortOutOfRange),
        ("port above the range", 30888, Counter::PassPortOutOfRange),
        (
            "relay port without a channel",
            30600,
            Counter::PassNoChannel,
        ),
    ] {
        let spec = FrameSpec::udp(
            v4("198.51.100.10:5004"),
            SocketAddrV4::new([198, 51, 100, 1].into(), port),
            &payload,
        );
        f.push(Fixture {
            name,
            ingress: netns::RELAY_IF_HOME,
            frame: spec.build(),
            output: None,
            action: XDP_PASS,
            counter,
            userspace: None,
            last_seen: ALIVE,
        });
    }

    let mut icmp = FrameSpec::udp(
        v4("198.51.100.10:0"),
        v4("198.51.100.1:0"),
        &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
    );
    icmp.protocol = IpNumber::ICMP;
    f.push(Fixture {
        name: "non-UDP (ICMP echo)",
        ingress: netns::RELAY_IF_HOME,
        frame: icmp.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassNotUdp,
        userspace: None,
        last_seen: ALIVE,
    });

    let mut frag = FrameSpec::udp(v4("198.51.100.10:5004"), v4("198.51.100.1:30528"), &payload);
    frag.more_fragments = true;
    frag.dont_fragment = false;
    f.push(Fixture {
        name: "fragment (MF set): passed up for reassembly",
        ingress: netns::RELAY_IF_HOME,
        frame: frag.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassFragment,
        userspace: fwd(0, "192.0.2.1:30528", "192.0.2.10:6000", false),
        last_seen: ALIVE,
    });

    let mut opts = FrameSpec::udp(v4("198.51.100.10:5004"), v4("198.51.100.1:30528"), &payload);
    opts.options = vec![1, 1, 1, 0]; // NOP, NOP, NOP, end of options
    f.push(Fixture {
        name: "IPv4 options",
        ingress: netns::RELAY_IF_HOME,
        frame: opts.build(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassIpOptions,
        userspace: fwd(0, "192.0.2.1:30528", "192.0.2.10:6000", false),
        last_seen: ALIVE,
    });

    let whole = a_to_b_frame(&payload);
    f.push(Fixture {
        name: "truncated UDP header",
        ingress: netns::RELAY_IF_HOME,
        frame: whole[..14 + 20 + 5].to_vec(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassTruncated,
        userspace: None,
        last_seen: ALIVE,
    });
    f.push(Fixture {
        name: "IPv4 total length beyond the frame",
        ingress: netns::RELAY_IF_HOME,
        frame: whole[..whole.len() - 10].to_vec(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassTruncated,
        userspace: None,
        last_seen: ALIVE,
    });
    f.push(Fixture {
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, as NICs do.
        name: "Ethernet header only (IPv4 ethertype, no IP header)",
        ingress: netns::RELAY_IF_HOME,
        frame: whole[..14].to_vec(),
        output: None,
        action: XDP_PASS,
        counter: Counter::PassTruncated,
        userspace: None,
        last_seen: ALIVE,
    });

    let mut ipv6 = whole.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    f.push(Fixture {
        name: "IPv6 ethertype",
        ingress: netns::RELAY_IF_HOME,
        frame: ipv6,
        output: None,
        action: XDP_PASS,
        counter: Counter::PassNotIpv4,
        userspace: None,
        last_seen: ALIVE,
    });

    policy_fixtures(&mut f, &payload);
    f
}

/// Each latching policy: a latched source takes the fast path whatever the policy; a new
/// source is passed up and user space applies the policy.
fn policy_fixtures(f: &mut Vec<Fixture>, payload: &[u8]) {
    let fwd = |from_leg, from: &str, to: &str, latched| {
        Some(Decision::Forward {
            from_leg,
            from: sa(from),
            to: sa(to),
            latched,
        })
    };
    // A source the channel has not latched, on the Internet side.
    let stranger = |port: u16| {
        FrameSpec::udp(
            v4("198.51.100.10:7777"),
            SocketAddrV4::new(netns::RELAY_HOME_ADDR, port),
            payload,
        )
    };
    for (name, port) in [
        ("Strict: the given address takes the fast path", 30540),
        ("Handover: the latched source takes the fast path", 30542),
        ("FirstPacket: the latched source takes the fast path", 30544),
    ] {
        let spec = FrameSpec::udp(
            SocketAddrV4::new(netns::HOME_ADDR, port - 25000),
            SocketAddrV4::new(netns::RELAY_HOME_ADDR, port),
            payload,
        );
        let office = format!("192.0.2.10:{}", port - 24000);
        let relay_office = format!("192.0.2.1:{port}");
        f.push(Fixture {
            name,
            ingress: netns::RELAY_IF_HOME,
            output: Some(expected_output(
                &spec,
                &relay_office,
                &office,
                netns::RELAY_IF_OFFICE,
            )),
            frame: spec.build(),
            action: XDP_REDIRECT,
            counter: Counter::Redirect,
            userspace: fwd(LEG_A, &relay_office, &office, false),
            last_seen: ALIVE,
        });
    }
    let cases: [(&'static str, u16, [u64; 2], Option<Decision>); 5] = [
        (
            "After: a new source's first packet is passed up and dropped while learning",
            30538,
            ALIVE,
            Some(Decision::Drop(DropReason::Learning)),
        ),
        (
            "Strict: any other source is passed up and dropped",
            30540,
            ALIVE,
            Some(Decision::Drop(DropReason::UnknownSource)),
        ),
        (
            "Handover: a new source while the latched one is alive is dropped",
            30542,
            [NOW - 100_000_000, NOW],
            Some(Decision::Drop(DropReason::UnknownSource)),
        ),
        (
            "Handover: a new source after 500 ms of silence takes over the leg",
            30542,
            [NOW - 600_000_000, NOW],
            fwd(LEG_A, "192.0.2.1:30542", "192.0.2.10:6542", true),
        ),
        (
            "FirstPacket: after latching another source is dropped however long the silence",
            30544,
            [0, NOW],
            Some(Decision::Drop(DropReason::UnknownSource)),
        ),
    ];
    for (name, port, last_seen, userspace) in cases {
        f.push(Fixture {
            name,
            ingress: netns::RELAY_IF_HOME,
            frame: stranger(port).build(),
            output: None,
            action: XDP_PASS,
            counter: Counter::PassUnknownSource,
            userspace,
            last_seen,
        });
    }
}

fn a_to_b_frame(payload: &[u8]) -> Vec<u8> {
    FrameSpec::udp(v4("198.51.100.10:5004"), v4("198.51.100.1:30528"), payload).build()
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

#[test]
fn fixtures_agree_on_xdp_and_userspace() {
    require_root();
    let _ = env_logger::builder().is_test(true).try_init();
    let tb = Testbed::create(TestbedOptions { nat: true }).expect("testbed");
    let pin = PinDir::new("fixtures");
    let pin_path = pin.0.clone();
    let failures = tb.run_in(Host::Relay, move || {
        let opts = XdpOptions {
            interfaces: vec![
                netns::RELAY_IF_HOME.into(),
                netns::RELAY_IF_OFFICE.into(),
                netns::RELAY_IF_NAT.into(),
            ],
            mode: XdpMode::Generic,
            pin_dir: Some(pin_path),
        };
        let xdp = XdpDataPath::load(&opts, PORT_MIN, PORT_MAX).expect("load XDP");
        let chans = channels();
        for (port, ch) in &chans {
            xdp.install(*port, ch).unwrap();
        }
        let bound: Vec<u16> = chans.iter().map(|(p, _)| *p).collect();
        let mut failures = Vec::new();
        for fx in fixtures() {
            let before = xdp.counters().unwrap();
            let (action, out) = xdp
                .test_run(&fx.frame, ifindex(fx.ingress))
                .unwrap_or_else(|e| panic!("{}: {e:#}", fx.name));
            let after = xdp.counters().unwrap();
            let mut errs = Vec::new();
            if action != fx.action {
                errs.push(format!("XDP action {action}, expected {}", fx.action));
            }
            let moved: Vec<_> = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| a.1 != b.1)
                .map(|(b, a)| (b.0, a.1 - b.1))
                .collect();
            if moved != vec![(fx.counter, 1)] {
                errs.push(format!(
                    "counters moved {moved:?}, expected [({:?}, 1)]",
                    fx.counter
                ));
            }
            match &fx.output {
                Some(expected) if out != *expected => errs.push(format!(
                    "output frame differs:\n  got      {:02x?}\n  expected {:02x?}",
                    out, expected
                )),
                None if out != fx.frame => errs.push("a passed frame was modified".into()),
                _ => {}
            }
            // The user-space path on what the kernel would deliver.
            let mut ch_by_port = chans.clone();
            let us = socket_view(&fx.frame, &bound).map(|(src, dst, port, payload)| {
                let ch = &mut ch_by_port
                    .iter_mut()
                    .find(|(p, _)| *p == port & !1)
                    .unwrap()
                    .1;
                let seen = fx.last_seen;
                let dgram = Datagram {
                    src,
                    dst: Some(dst),
                    payload: &payload,
                };
                let d = decide(ch, &mut LatchState::default(), port, &dgram, NOW, |leg| {
                    seen[leg]
                });
                (d, payload)
            });
            if us.as_ref().map(|(d, _)| *d) != fx.userspace {
                errs.push(format!(
                    "user space decided {:?}, expected {:?}",
                    us.as_ref().map(|u| u.0),
                    fx.userspace
                ));
            }
            // Where XDP forwarded, user space must produce the very same datagram.
            if fx.output.is_some() && errs.is_empty() {
                let got = parse_forwarded(&out);
                match us {
                    Some((Decision::Forward { from, to, .. }, payload)) => {
                        if got.src != from || got.dst != to || got.payload != payload {
                            errs.push(format!(
                                "XDP sent {}→{} ({} bytes), user space {from}→{to} ({} bytes)",
                                got.src,
                                got.dst,
                                got.payload.len(),
                                payload.len()
                            ));
                        }
                        if fx.frame[14 + 26..14 + 28] != [0, 0] && got.udp_checksum == 0 {
                            errs.push("UDP checksum became zero".into());
                        }
                    }
                    other => errs.push(format!("XDP forwarded but user space: {other:?}")),
                }
            }
            if !errs.is_empty() {
                failures.push(format!("{}:\n    {}", fx.name, errs.join("\n    ")));
            }
        }
        // Per-channel counters: the forwarded fixtures on 30528.
        let s = xdp.stats(30528).unwrap();
        if s.from_leg[0].packets != 6 || s.from_leg[1].packets != 2 {
            failures.push(format!(
                "channel 30528 stats {s:?}, expected 6 from A and 2 from B"
            ));
        }
        if s.from_leg[1].bytes != 2 * 172 || s.from_leg[0].last_seen_ns == 0 {
            failures.push(format!("channel 30528 bytes/last_seen wrong: {s:?}"));
        }
        xdp.unpin_and_close().unwrap();
        failures
    });
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn redirect_to_an_interface_outside_the_egress_map_is_passed_up() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir::new("egress");
    let pin_path = pin.0.clone();
    tb.run_in(Host::Relay, move || {
        // Attached to the home side only: the office interface is not a fast-path egress.
        let opts = XdpOptions {
            interfaces: vec![netns::RELAY_IF_HOME.into()],
            mode: XdpMode::Generic,
            pin_dir: Some(pin_path),
        };
        let xdp = XdpDataPath::load(&opts, PORT_MIN, PORT_MAX).unwrap();
        let (port, ch) = channels().remove(0);
        xdp.install(port, &ch).unwrap();
        let frame = a_to_b_frame(&rtp(1, 1));
        let (action, out) = xdp.test_run(&frame, ifindex(netns::RELAY_IF_HOME)).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame);
        let c = xdp.counters().unwrap();
        assert_eq!(
            c.iter()
                .find(|(k, _)| *k == Counter::PassEgressUnavailable)
                .unwrap()
                .1,
            1
        );
        // And a channel whose leg pins another egress interface than the FIB's.
        let mut pinned = ch;
        pinned.legs[1].ifindex = ifindex(netns::RELAY_IF_HOME);
        xdp.install(port, &pinned).unwrap();
        let (action, _) = xdp.test_run(&frame, ifindex(netns::RELAY_IF_HOME)).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_ne!(action, XDP_DROP);
        xdp.unpin_and_close().unwrap();
    });
}

#[test]
fn cached_next_hops_follow_a_changed_neighbour() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir::new("nexthop");
    let pin_path = pin.0.clone();
    let tb = std::sync::Arc::new(tb);
    let tb2 = tb.clone();
    tb.run_in(Host::Relay, move || {
        let opts = XdpOptions {
            interfaces: vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()],
            mode: XdpMode::Generic,
            pin_dir: Some(pin_path),
        };
        let xdp = XdpDataPath::load(&opts, PORT_MIN, PORT_MAX).unwrap();
        let (port, ch) = channels().remove(0);
        xdp.install(port, &ch).unwrap();
        let frame = a_to_b_frame(&rtp(1, 1));
        let dmac = |xdp: &XdpDataPath| {
            let (action, out) = xdp.test_run(&frame, ifindex(netns::RELAY_IF_HOME)).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            <[u8; 6]>::try_from(&out[..6]).unwrap()
        };
        let office = netns::LINKS
            .iter()
            .find(|l| l.near.iface == netns::RELAY_IF_OFFICE)
            .unwrap();
        assert_eq!(dmac(&xdp), office.far.mac);
        // The office phone is replaced: same address, new MAC.
        tb2.exec(
            Host::Relay,
            &[
                "ip",
                "neigh",
                "replace",
                "192.0.2.10",
                "lladdr",
                "02:00:00:00:02:99",
                "dev",
                netns::RELAY_IF_OFFICE,
                "nud",
                "permanent",
            ],
        )
        .unwrap();
        let deadline = std::time::Instant::now() + 4 * relay_user::xdp::FIB_REFRESH;
        loop {
            if dmac(&xdp) == [2, 0, 0, 0, 2, 0x99] {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the fast path still sends to the old MAC after {:?}",
                4 * relay_user::xdp::FIB_REFRESH
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        xdp.unpin_and_close().unwrap();
    });
}

/// The fast path's RTP quality: a crafted sequence with a gap and a late packet, run through
/// the program, read back from the state map.
#[test]
fn xdp_counts_rtp_loss_reordering_and_jitter() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir::new("quality");
    let pin_path = pin.0.clone();
    tb.run_in(Host::Relay, move || {
        let opts = XdpOptions {
            interfaces: vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()],
            mode: XdpMode::Generic,
            pin_dir: Some(pin_path),
        };
        let xdp = XdpDataPath::load(&opts, PORT_MIN, PORT_MAX).unwrap();
        let (port, mut ch) = channels().into_iter().find(|(p, _)| *p == 30528).unwrap();
        ch.clock_rate = 16_000;
        xdp.install(port, &ch).unwrap();
        let home = netns::RELAY_IF_HOME;
        let send = |payload: &[u8], dport: u16| {
            // RTCP comes from the peer's RTCP port.
            let sport = if dport % 2 == 1 { 5005 } else { 5004 };
            let spec = FrameSpec::udp(
                SocketAddrV4::new(netns::HOME_ADDR, sport),
                SocketAddrV4::new(netns::RELAY_HOME_ADDR, dport),
                payload,
            );
            let (action, _) = xdp.test_run(&spec.build(), ifindex(home)).unwrap();
            assert_eq!(action, XDP_REDIRECT);
        };
        // 0 1 2 _ 4 5 3 6: seq 3 arrives late (reordered), nothing is lost in the end...
        // then 9: 7 and 8 are lost.
        for seq in [0u16, 1, 2, 4, 5, 3, 6, 9] {
            send(&rtp(seq, 0x5151), 30528);
        }
        // Not RTP: RTCP on the odd port, and a version-0 payload on the RTP port. They count
        // as packets and bytes of the direction, not in the RTP statistics.
        send(&[0x81, 0xc9, 0, 1, 0, 0, 0, 1], 30529);
        send(&[0u8; 40], 30528);

        let s = xdp.stats(port).unwrap().from_leg[LEG_A];
        assert_eq!(s.packets, 10, "{s:?}");
        assert_eq!(s.rtp.received, 8, "{s:?}");
        assert_eq!(s.rtp.ext_max_seq, 9, "{s:?}");
        assert_eq!(s.rtp.run_expected(), 10, "{s:?}");
        assert_eq!(s.rtp.lost(), 2, "{s:?}");
        assert_eq!(s.rtp.reordered, 1, "{s:?}");
        assert!(s.rtp.last_arrival_ns > 0 && s.last_seen_ns > 0, "{s:?}");
        // The frames arrive microseconds apart while their timestamps step by 160 units, so
        // every |D| is between 0 and 3 × 160 (the late packet's step): the estimate is
        // positive and below the largest step.
        assert!(s.rtp.jitter() > 0, "{s:?}");
        assert!(s.rtp.jitter() <= 3 * 160, "{s:?}");
        let other = xdp.stats(port).unwrap().from_leg[1];
        assert_eq!(other.rtp, relay_common::RtpState::default());
        xdp.unpin_and_close().unwrap();
    });
}
