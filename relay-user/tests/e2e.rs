//! End to end through network namespaces: a home device, a home device behind an nftables
//! masquerade NAT (its source port rewritten), the relay host and an office phone, with real
//! UDP sockets sending RTP both ways through the relay — in user space only, with XDP in
//! generic mode and with XDP in native mode. Receivers check payloads, sequence numbers and
//! source addresses; the relay's counters show which path carried the packets.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use common::{PinDir, require_root, rtp};
use relay_common::{Channel, Counter, Endpoint, LEG_A, LEG_B, Leg};
use relay_user::{
    DataPath, Relay, RelayOptions,
    netns::{self, Host, Testbed, TestbedOptions},
    xdp::{XdpMode, XdpOptions, attach_pass_program},
};

const PACKETS: u16 = 200;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Userspace,
    Xdp(XdpMode),
}

/// Sends `count` RTP packets from `from` to `to`, 1 ms apart, tagging each with `ssrc`.
fn send_rtp(from: &UdpSocket, to: SocketAddr, ssrc: u32, count: u16) {
    send_rtp_from(from, to, ssrc, 0..count);
}

fn send_rtp_from(from: &UdpSocket, to: SocketAddr, ssrc: u32, seqs: std::ops::Range<u16>) {
    for seq in seqs {
        from.send_to(&rtp(seq, ssrc), to).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends the first packet of a flow whose source the relay must learn, waits until the
/// latched channel is in the fast path (when there is one), then sends the rest. The packets
/// user space carries are then exactly one per latching flow, whatever the machine's load:
/// the test counts paths, not races.
fn send_rtp_latching(
    relay: &Relay,
    port: u16,
    from: &UdpSocket,
    to: SocketAddr,
    ssrc: u32,
    count: u16,
) {
    send_rtp_from(from, to, ssrc, 0..1);
    if let Some(x) = relay.xdp() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !x
            .channel(port)
            .is_ok_and(|c| c.legs[LEG_A].rtp.is_latched())
        {
            assert!(
                Instant::now() < deadline,
                "channel {port}: the latch never reached the fast path"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    send_rtp_from(from, to, ssrc, 1..count);
}

/// Receives until `count` packets with `ssrc` arrived (or 5 s passed); checks every packet's
/// source and content. Returns the sequence numbers seen, in arrival order.
fn recv_rtp(sock: &UdpSocket, expect_from: SocketAddr, ssrc: u32, count: u16) -> Vec<u16> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seqs = Vec::new();
    let mut buf = [0u8; 2048];
    while seqs.len() < usize::from(count) && Instant::now() < deadline {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let p = &buf[..n];
        assert!(n >= 12, "short datagram of {n} bytes");
        let got_ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        assert_eq!(
            got_ssrc, ssrc,
            "a packet from another stream leaked through (from {from})"
        );
        assert_eq!(from, expect_from, "relayed packet from the wrong source");
        let seq = u16::from_be_bytes([p[2], p[3]]);
        assert_eq!(
            p,
            rtp(seq, ssrc).as_slice(),
            "payload of seq {seq} changed in transit"
        );
        seqs.push(seq);
    }
    seqs
}

fn bind_in(tb: &Testbed, host: Host, addr: &str) -> UdpSocket {
    let addr = sa(addr);
    tb.run_in(host, move || UdpSocket::bind(addr).unwrap())
}

fn channel(home_local: &str, home_announced: &str, office_local: &str, office: &str) -> Channel {
    let h = sa(home_announced);
    let o = sa(office);
    let ep = |a: SocketAddr, off: u16, latched| {
        Endpoint::new(SocketAddr::new(a.ip(), a.port() + off), latched)
    };
    Channel {
        legs: [
            // The home device: learnt from its first packets (NAT latching).
            Leg::new(sa(home_local), ep(h, 0, false), ep(h, 1, false)),
            // The office phone: strict, the address given by the control plane.
            Leg::new(sa(office_local), ep(o, 0, true), ep(o, 1, true)),
        ],
        flags: 0,
        ..Channel::default()
    }
}

fn run(path: Path) {
    require_root();
    let _ = env_logger::builder().is_test(true).try_init();
    let tb = Testbed::create(TestbedOptions { nat: true }).expect("testbed");
    let pin = PinDir::new("e2e");

    // Native XDP on veth: the receiving peers need an XDP program of their own.
    let mut guards = Vec::new();
    if path == Path::Xdp(XdpMode::Native) {
        for (host, iface) in [
            (Host::Home, netns::HOME_IF),
            (Host::Office, netns::OFFICE_IF),
            (Host::Nat, netns::NAT_WAN_IF),
        ] {
            guards.push(tb.run_in(host, move || {
                attach_pass_program(iface, XdpMode::Native).unwrap()
            }));
        }
    }
    let xdp = match path {
        Path::Userspace => None,
        Path::Xdp(mode) => Some(XdpOptions {
            interfaces: vec![
                netns::RELAY_IF_HOME.into(),
                netns::RELAY_IF_OFFICE.into(),
                netns::RELAY_IF_NAT.into(),
            ],
            mode,
            pin_dir: Some(pin.0.clone()),
        }),
    };
    let relay = tb.run_in(Host::Relay, move || {
        Relay::start(RelayOptions {
            port_min: 30528,
            port_max: 30887,
            workers: 2,
            xdp,
            require_xdp: true,
            events: None,
        })
        .expect("relay")
    });
    if let (Path::Xdp(mode), Some(x)) = (path, relay.xdp()) {
        assert!(
            x.attachments().iter().all(|a| a.mode == mode),
            "{:?}",
            x.attachments()
        );
    }

    // Channel 30528: home device on the Internet side, announced correctly but unconfirmed.
    relay
        .install(
            30528,
            &channel(
                "198.51.100.1:30528",
                "198.51.100.10:5004",
                "192.0.2.1:30528",
                "192.0.2.10:6000",
            ),
        )
        .unwrap();
    // Channel 30530: home device behind NAT; it announced its private address.
    relay
        .install(
            30530,
            &channel(
                "198.51.100.129:30530",
                "203.0.113.10:5004",
                "192.0.2.1:30530",
                "192.0.2.10:6002",
            ),
        )
        .unwrap();

    let home = bind_in(&tb, Host::Home, "198.51.100.10:5004");
    let intruder = bind_in(&tb, Host::Home, "198.51.100.10:5999");
    let natted = bind_in(&tb, Host::HomeBehindNat, "203.0.113.10:5004");
    let office1 = bind_in(&tb, Host::Office, "192.0.2.10:6000");
    let office2 = bind_in(&tb, Host::Office, "192.0.2.10:6002");

    // Home → office, then office → home (the home leg is latched by then).
    let rx = std::thread::spawn({
        let office1 = office1.try_clone().unwrap();
        move || recv_rtp(&office1, sa("192.0.2.1:30528"), 0x1111, PACKETS)
    });
    send_rtp_latching(
        &relay,
        30528,
        &home,
        sa("198.51.100.1:30528"),
        0x1111,
        PACKETS,
    );
    let seqs = rx.join().unwrap();
    assert_eq!(
        seqs,
        (0..PACKETS).collect::<Vec<_>>(),
        "home → office: loss or reordering"
    );

    let rx = std::thread::spawn({
        let home = home.try_clone().unwrap();
        move || recv_rtp(&home, sa("198.51.100.1:30528"), 0x2222, PACKETS)
    });
    send_rtp(&office1, sa("192.0.2.1:30528"), 0x2222, PACKETS);
    assert_eq!(
        rx.join().unwrap(),
        (0..PACKETS).collect::<Vec<_>>(),
        "office → home"
    );

    // Injection from another source on the latched channel: never reaches the office.
    send_rtp(&intruder, sa("198.51.100.1:30528"), 0x6666, 5);
    office1
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        office1.recv_from(&mut buf).is_err(),
        "an injected packet was relayed"
    );

    // Behind NAT: the relay learns the translated address and port.
    let rx = std::thread::spawn({
        let office2 = office2.try_clone().unwrap();
        move || recv_rtp(&office2, sa("192.0.2.1:30530"), 0x3333, PACKETS)
    });
    send_rtp_latching(
        &relay,
        30530,
        &natted,
        sa("198.51.100.129:30530"),
        0x3333,
        PACKETS,
    );
    assert_eq!(
        rx.join().unwrap(),
        (0..PACKETS).collect::<Vec<_>>(),
        "NATed home → office"
    );
    let latched = relay.channel(30530).unwrap().legs[LEG_A].rtp;
    assert!(latched.is_latched());
    let learnt = latched.socket_addr().unwrap();
    assert_eq!(
        learnt.ip(),
        std::net::IpAddr::from(netns::NAT_WAN_ADDR),
        "latched {learnt}"
    );
    assert!(
        (netns::NAT_PORT_RANGE.0..=netns::NAT_PORT_RANGE.1).contains(&learnt.port()),
        "the NAT did not rewrite the source port: latched {learnt}"
    );
    let rx = std::thread::spawn({
        let natted = natted.try_clone().unwrap();
        move || recv_rtp(&natted, sa("198.51.100.129:30530"), 0x4444, PACKETS)
    });
    send_rtp(&office2, sa("192.0.2.1:30530"), 0x4444, PACKETS);
    assert_eq!(
        rx.join().unwrap(),
        (0..PACKETS).collect::<Vec<_>>(),
        "office → NATed home"
    );

    // Per-channel counters cover both paths.
    for port in [30528, 30530] {
        let s = relay.stats(port).unwrap();
        assert_eq!(
            s.from_leg[LEG_A].packets,
            u64::from(PACKETS),
            "channel {port}: {s:?}"
        );
        assert_eq!(
            s.from_leg[LEG_B].packets,
            u64::from(PACKETS),
            "channel {port}: {s:?}"
        );
        assert_eq!(s.from_leg[LEG_A].bytes, u64::from(PACKETS) * 172);
    }

    // Quality: home → office again, continuing the sequence with every 10th number left out
    // (RTP loss as a receiver sees it); both paths' statistics together show exactly that loss.
    let lossy: Vec<u16> = (PACKETS..2 * PACKETS).filter(|s| s % 10 != 0).collect();
    let rx = std::thread::spawn({
        let office1 = office1.try_clone().unwrap();
        let n = lossy.len() as u16;
        move || recv_rtp(&office1, sa("192.0.2.1:30528"), 0x1111, n)
    });
    for &seq in &lossy {
        home.send_to(&rtp(seq, 0x1111), sa("198.51.100.1:30528"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        rx.join().unwrap(),
        lossy,
        "lossy stream: extra loss or reordering"
    );
    let skipped = u64::from(PACKETS / 10);
    let q = relay.stats(30528).unwrap().from_leg[LEG_A].rtp;
    assert_eq!(q.lost(), skipped, "{q:?}");
    assert_eq!(q.reordered, 0, "{q:?}");
    assert_eq!(q.received, u64::from(PACKETS) + lossy.len() as u64, "{q:?}");
    assert_eq!(q.ext_max_seq, u32::from(2 * PACKETS - 1), "{q:?}");
    // The path that carried the lossy stream saw the loss itself.
    let carrier = match relay.xdp() {
        Some(x) => x.stats(30528).unwrap().from_leg[LEG_A].rtp,
        None => relay.userspace().stats(30528).unwrap().from_leg[LEG_A].rtp,
    };
    assert_eq!(carrier.lost(), skipped, "{path:?}: {carrier:?}");
    // The other direction lost nothing.
    assert_eq!(relay.stats(30528).unwrap().from_leg[LEG_B].rtp.lost(), 0);

    // Which path carried the traffic.
    let total = 4 * u64::from(PACKETS) + lossy.len() as u64;
    match relay.xdp() {
        None => assert_eq!(path, Path::Userspace),
        Some(x) => {
            let c = x.counters().unwrap();
            let get = |k: Counter| c.iter().find(|(n, _)| *n == k).unwrap().1;
            let fast = get(Counter::Redirect) + get(Counter::Tx);
            // Only the first packet of each latching flow (two: home and NATed home, sent
            // before their source was known) and the injected ones go up.
            assert_eq!(fast, total - 2, "XDP forwarded {fast} of {total}: {c:?}");
            assert_eq!(get(Counter::PassUnknownSource), 5 + 2, "{c:?}");
        }
    }
    let us = relay.userspace().counters();
    assert!(
        us.dropped(relay_user::forward::DropReason::UnknownSource) >= 5,
        "{us:?}"
    );

    drop(relay);
    drop(guards);
}

#[test]
fn userspace_only() {
    run(Path::Userspace);
}

#[test]
fn xdp_generic() {
    run(Path::Xdp(XdpMode::Generic));
}

#[test]
fn xdp_native() {
    run(Path::Xdp(XdpMode::Native));
}
