//! End-to-end tests of the user-space data path over real UDP sockets on 127.0.0.1.
//!
//! Each test owns a sub-range of ports 41000-41999 so the tests run in parallel. Peers are
//! plain sockets on ephemeral ports: leg B is the "office" (strict, latched in the channel),
//! leg A the "home" device whose address the relay learns from its first packet. Waits are
//! bounded (a socket read timeout, a deadline on counters); nothing asserts on timing.
use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use relay_common::{Channel, Endpoint, LEG_A, LEG_B, Leg};
use relay_user::forward::DropReason;
use relay_user::userspace::{ChannelObserver, UserspaceConfig, UserspaceCounters, UserspaceRelay};
use relay_user::{DataPath, DataPathError};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Upper bound of every wait: generous, only reached when something is broken.
const WAIT: Duration = Duration::from_secs(5);

fn start(port_min: u16, port_max: u16, bind_addr: Ipv4Addr) -> UserspaceRelay {
    start_with(port_min, port_max, bind_addr, 2, None)
}

fn start_with(
    port_min: u16,
    port_max: u16,
    bind_addr: Ipv4Addr,
    workers: usize,
    observer: Option<ChannelObserver>,
) -> UserspaceRelay {
    let cfg = UserspaceConfig {
        port_min,
        port_max,
        bind_addr,
        workers,
        batch: 32,
    };
    UserspaceRelay::start(cfg, observer).expect("start the relay")
}

/// Observer calls, in order.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(u16, Channel)>>>);

impl Events {
    fn observer(&self) -> ChannelObserver {
        let ev = self.0.clone();
        Arc::new(move |port, ch: &Channel| ev.lock().expect("events lock").push((port, *ch)))
    }
    fn get(&self) -> Vec<(u16, Channel)> {
        self.0.lock().expect("events lock").clone()
    }
}

/// `N` peer sockets on 127.0.0.1 ports `first..first + N`. Fixed ports from the test's own
/// sub-range: an ephemeral port could land in another test's relay range.
fn peers<const N: usize>(first: u16) -> [UdpSocket; N] {
    std::array::from_fn(|i| {
        let port = first + i as u16;
        let s = UdpSocket::bind((LO, port)).unwrap_or_else(|e| panic!("bind peer {port}: {e}"));
        s.set_read_timeout(Some(WAIT)).expect("read timeout");
        s
    })
}

fn addr(s: &UdpSocket) -> SocketAddr {
    s.local_addr().expect("local address")
}

fn relay_addr(port: u16) -> SocketAddr {
    SocketAddr::from((LO, port))
}

/// Receives one datagram; fails the test if none arrives within [`WAIT`].
fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 4096];
    let (n, from) = s
        .recv_from(&mut buf)
        .expect("a datagram within the timeout");
    (buf[..n].to_vec(), from)
}

/// An RTP-like datagram: 12-byte header with `seq`, then `len - 12` payload bytes.
fn rtp(seq: u16, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(12)];
    p[0] = 0x80;
    p[1] = 0; // PCMU
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&u32::from(seq).wrapping_mul(160).to_be_bytes());
    p[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    for (i, b) in p[12..].iter_mut().enumerate() {
        *b = (i as u8) ^ (seq as u8);
    }
    p
}

/// Leg A unknown (learnt from traffic), leg B strict at the office sockets. Both legs talk to
/// the relay at `local:port`.
fn channel(local: Ipv4Addr, port: u16, b_rtp: SocketAddr, b_rtcp: SocketAddr) -> Channel {
    let relay = SocketAddr::from((local, port));
    let a = Leg::new(relay, Endpoint::UNKNOWN, Endpoint::UNKNOWN);
    let b = Leg::new(
        relay,
        Endpoint::new(b_rtp, true),
        Endpoint::new(b_rtcp, true),
    );
    Channel {
        legs: [a, b],
        flags: 0,
        ..Channel::default()
    }
}

/// Polls `f` until it holds; fails the test after [`WAIT`].
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_counters(
    relay: &UserspaceRelay,
    what: &str,
    f: impl Fn(&UserspaceCounters) -> bool,
) -> UserspaceCounters {
    wait_until(what, || f(&relay.counters()));
    relay.counters()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn setsockopt_int(s: &UdpSocket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call; the length is that of a c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `port` and `port + 1` can be bound on 127.0.0.1 (i.e. the relay closed them).
fn ports_free(port: u16) -> bool {
    UdpSocket::bind((LO, port)).is_ok() && UdpSocket::bind((LO, port + 1)).is_ok()
}

#[test]
fn forwards_both_ways_and_latches_the_unknown_leg() {
    const P: u16 = 41000;
    let events = Events::default();
    let relay = start_with(41000, 41049, LO, 2, Some(events.observer()));
    assert_eq!(relay.name(), "userspace");
    let [a, b, b_rtcp] = peers(41040);
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");

    let hello = rtp(1, 172);
    a.send_to(&hello, relay_addr(P)).expect("send");
    assert_eq!(
        recv(&b),
        (hello, relay_addr(P)),
        "B gets A's payload from the relay port"
    );

    let c = wait_counters(&relay, "the latch", |c| c.latched == 1);
    assert_eq!(c.forwarded_packets, 1);
    let ch = relay.channel(P).expect("channel");
    assert!(ch.legs[LEG_A].rtp.is_latched() && ch.legs[LEG_A].rtp.matches(addr(&a)));
    assert!(
        !ch.legs[LEG_A].rtcp.is_latched(),
        "RTCP is latched separately"
    );
    assert_eq!(
        events.get(),
        vec![(P, ch)],
        "one observer call with the latched channel"
    );

    let reply = rtp(7, 100);
    b.send_to(&reply, relay_addr(P)).expect("send");
    assert_eq!(
        recv(&a),
        (reply, relay_addr(P)),
        "B reaches A at the learnt address"
    );
    for seq in 2..5 {
        a.send_to(&rtp(seq, 172), relay_addr(P)).expect("send");
        assert_eq!(recv(&b).0, rtp(seq, 172));
    }
    let c = wait_counters(&relay, "all forwarded", |c| {
        c.forwarded_packets == 5 && c.rx_packets == 5
    });
    assert_eq!(c.rx_packets, 5);
    assert_eq!(c.latched, 1);
    assert_eq!(events.get().len(), 1, "no further latches");
    assert_eq!(relay.channel(P).expect("channel"), ch);
    relay.shutdown();
}

#[test]
fn rtcp_latches_separately_on_the_port_above() {
    const P: u16 = 41050;
    let events = Events::default();
    let relay = start_with(41050, 41099, LO, 2, Some(events.observer()));
    let [a, a_rtcp, b, b_rtcp] = peers(41090);
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");

    a.send_to(&rtp(1, 60), relay_addr(P)).expect("send");
    assert_eq!(recv(&b).1, relay_addr(P));
    let report = b"\x81\xc8\x00\x06 an RTCP sender report".to_vec();
    a_rtcp.send_to(&report, relay_addr(P + 1)).expect("send");
    assert_eq!(
        recv(&b_rtcp),
        (report, relay_addr(P + 1)),
        "RTCP goes to B's RTCP socket"
    );

    wait_until("two latches", || events.get().len() == 2);
    let ev = events.get();
    assert!(ev[0].1.legs[LEG_A].rtp.matches(addr(&a)) && !ev[0].1.legs[LEG_A].rtcp.is_latched());
    assert!(ev[1].1.legs[LEG_A].rtcp.is_latched());
    let ch = relay.channel(P).expect("channel");
    assert!(ch.legs[LEG_A].rtp.matches(addr(&a)));
    assert!(ch.legs[LEG_A].rtcp.matches(addr(&a_rtcp)));
    assert_eq!(ev[1], (P, ch));

    b_rtcp
        .send_to(b"rtcp back", relay_addr(P + 1))
        .expect("send");
    assert_eq!(recv(&a_rtcp), (b"rtcp back".to_vec(), relay_addr(P + 1)));
    b.send_to(b"rtp back", relay_addr(P)).expect("send");
    assert_eq!(recv(&a), (b"rtp back".to_vec(), relay_addr(P)));
    assert_eq!(
        wait_counters(&relay, "forwarding", |c| c.forwarded_packets == 4).latched,
        2
    );
}

#[test]
fn injected_datagrams_are_dropped_and_counted() {
    const P: u16 = 41100;
    let events = Events::default();
    let relay = start_with(41100, 41149, LO, 2, Some(events.observer()));
    let [a, b, b_rtcp, intruder] = peers(41140);
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");
    a.send_to(&rtp(1, 172), relay_addr(P)).expect("send");
    recv(&b);
    wait_until("the latch", || events.get().len() == 1);
    let latched = relay.channel(P).expect("channel");

    for seq in 0..3 {
        intruder
            .send_to(&rtp(900 + seq, 172), relay_addr(P))
            .expect("send");
    }
    // Same socket, same order: once the marker arrives, the injections were handled.
    a.send_to(b"marker", relay_addr(P)).expect("send");
    assert_eq!(recv(&b).0, b"marker", "nothing injected reaches B");
    let c = wait_counters(&relay, "drops", |c| {
        c.dropped(DropReason::UnknownSource) == 3 && c.rx_packets == 5 && c.forwarded_packets == 2
    });
    assert_eq!(
        c.dropped(DropReason::Ambiguous) + c.dropped(DropReason::DestinationUnknown),
        0
    );
    assert_eq!((c.rx_packets, c.forwarded_packets), (5, 2));
    assert_eq!(
        relay.channel(P).expect("channel"),
        latched,
        "the channel is unchanged"
    );
    assert_eq!(events.get().len(), 1);
    let st = relay.stats(P).expect("stats");
    assert_eq!(
        st.from_leg[LEG_A].packets, 2,
        "dropped datagrams are not counted as traffic"
    );
}

#[test]
fn peer_not_heard_yet_is_dropped_as_destination_unknown() {
    const P: u16 = 41150;
    let events = Events::default();
    let relay = start_with(41150, 41199, LO, 2, Some(events.observer()));
    let [a, b, b_rtcp] = peers(41190);
    let ch = channel(LO, P, addr(&b), addr(&b_rtcp));
    relay.install(P, &ch).expect("install");
    b.send_to(b"too early", relay_addr(P)).expect("send");
    wait_counters(&relay, "drop", |c| {
        c.dropped(DropReason::DestinationUnknown) == 1
    });
    assert_eq!(relay.channel(P).expect("channel"), ch);
    assert!(events.get().is_empty());
    a.send_to(b"hello", relay_addr(P)).expect("send");
    assert_eq!(recv(&b).0, b"hello");
    b.send_to(b"now", relay_addr(P)).expect("send");
    assert_eq!(recv(&a).0, b"now");
}

#[test]
fn a_source_learnt_by_a_dropped_datagram_is_still_published() {
    // B's RTCP is only expected (announced, not confirmed) and A's RTCP is unknown: B's first
    // RTCP packet confirms B's address, but there is nowhere to send it yet.
    const P: u16 = 41750;
    let events = Events::default();
    let relay = start_with(41750, 41799, LO, 2, Some(events.observer()));
    let [b, b_rtcp] = peers(41790);
    let mut ch = channel(LO, P, addr(&b), addr(&b_rtcp));
    ch.legs[LEG_B].rtcp = Endpoint::new(addr(&b_rtcp), false);
    relay.install(P, &ch).expect("install");
    b_rtcp
        .send_to(b"early report", relay_addr(P + 1))
        .expect("send");
    let c = wait_counters(&relay, "the drop", |c| {
        c.dropped(DropReason::DestinationUnknown) == 1 && c.latched == 1
    });
    assert_eq!(c.forwarded_packets, 0);
    let now = relay.channel(P).expect("channel");
    assert!(now.legs[LEG_B].rtcp.is_latched());
    assert_eq!(events.get(), vec![(P, now)]);
}

#[test]
fn stats_count_packets_and_bytes_per_direction() {
    const P: u16 = 41200;
    let relay = start(41200, 41249, LO);
    let [a, b, b_rtcp] = peers(41240);
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");
    assert_eq!(relay.stats(P).expect("stats"), Default::default());
    let t0 = monotonic_ns();
    for len in [100, 200, 300] {
        a.send_to(&rtp(1, len), relay_addr(P)).expect("send");
        assert_eq!(recv(&b).0.len(), len);
    }
    for len in [50, 70] {
        b.send_to(&rtp(2, len), relay_addr(P)).expect("send");
        assert_eq!(recv(&a).0.len(), len);
    }
    b_rtcp.send_to(&[0u8; 40], relay_addr(P + 1)).expect("send"); // A's RTCP unknown: dropped
    wait_counters(&relay, "the RTCP drop", |c| {
        c.dropped(DropReason::DestinationUnknown) == 1
    });
    let s = relay.stats(P).expect("stats");
    let t1 = monotonic_ns();
    assert_eq!(
        (s.from_leg[LEG_A].packets, s.from_leg[LEG_A].bytes),
        (3, 600)
    );
    assert_eq!(
        (s.from_leg[LEG_B].packets, s.from_leg[LEG_B].bytes),
        (2, 120)
    );
    for d in s.from_leg {
        assert!(
            (t0..=t1).contains(&d.last_seen_ns),
            "CLOCK_MONOTONIC ns: {d:?}"
        );
    }
    let c = relay.counters();
    assert_eq!((c.forwarded_packets, c.forwarded_bytes), (5, 720));
    assert!(matches!(relay.stats(P + 2), Err(DataPathError::NotFound(p)) if p == P + 2));
}

#[test]
fn remove_closes_the_sockets_and_forgets_the_channel() {
    const P: u16 = 41250;
    let relay = start(41250, 41299, LO);
    let [b, b_rtcp] = peers(41290);
    let ch = channel(LO, P, addr(&b), addr(&b_rtcp));
    relay.install(P, &ch).expect("install");
    assert!(!ports_free(P), "installed ports are bound");
    relay.remove(P).expect("remove");
    assert!(ports_free(P), "removed ports can be bound again at once");
    assert!(matches!(relay.channel(P), Err(DataPathError::NotFound(p)) if p == P));
    assert!(matches!(relay.stats(P), Err(DataPathError::NotFound(_))));
    assert!(matches!(relay.remove(P), Err(DataPathError::NotFound(_))));
    // And the port can be installed again, fresh.
    relay.install(P, &ch).expect("install again");
    assert_eq!(relay.stats(P).expect("stats"), Default::default());
}

#[test]
fn install_rejects_odd_and_out_of_range_ports() {
    let relay = start(41300, 41310, LO);
    let ch = channel(LO, 41300, relay_addr(9), relay_addr(9));
    // Odd; below; above; the top even port whose RTCP port (41311) is out of range.
    for port in [41301, 41298, 41312, 41310, 1] {
        match relay.install(port, &ch) {
            Err(DataPathError::PortOutOfRange {
                port: p,
                min: 41300,
                max: 41310,
            }) => {
                assert_eq!(p, port)
            }
            other => panic!("port {port}: expected PortOutOfRange, got {other:?}"),
        }
    }
    relay.install(41308, &ch).expect("the highest usable pair");
    assert!(matches!(
        relay.remove(41301),
        Err(DataPathError::NotFound(_))
    ));
}

#[test]
fn install_on_a_taken_port_is_a_bind_error() {
    const P: u16 = 41350;
    let relay = start(41350, 41399, LO);
    let ch = channel(LO, P, relay_addr(9), relay_addr(9));

    let taken = UdpSocket::bind((LO, P)).expect("take the RTP port");
    match relay.install(P, &ch) {
        Err(DataPathError::Bind { port, source }) => {
            assert_eq!(port, P);
            assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
        }
        other => panic!("expected Bind, got {other:?}"),
    }
    drop(taken);

    let taken = UdpSocket::bind((LO, P + 1)).expect("take the RTCP port");
    assert!(
        matches!(relay.install(P, &ch), Err(DataPathError::Bind { port, .. }) if port == P + 1)
    );
    assert!(
        UdpSocket::bind((LO, P)).is_ok(),
        "the RTP socket of a failed install is closed"
    );
    assert!(matches!(relay.channel(P), Err(DataPathError::NotFound(_))));
    drop(taken);
    relay
        .install(P, &ch)
        .expect("install once the port is free");
}

#[test]
fn reinstall_replaces_the_channel_but_keeps_sockets_and_counters() {
    const P: u16 = 41400;
    let relay = start(41400, 41449, LO);
    let [a, a2, b, b_rtcp] = peers(41440);
    let ch = channel(LO, P, addr(&b), addr(&b_rtcp));
    relay.install(P, &ch).expect("install");
    a.send_to(b"one", relay_addr(P)).expect("send");
    assert_eq!(recv(&b).0, b"one");
    wait_counters(&relay, "the latch", |c| c.latched == 1);
    assert!(
        relay.channel(P).expect("channel").legs[LEG_A]
            .rtp
            .matches(addr(&a))
    );

    // Re-binding would fail (the sockets are still open): success means they were kept.
    relay
        .install(P, &ch)
        .expect("reinstall: A is unknown again");
    assert_eq!(relay.channel(P).expect("channel"), ch);
    assert_eq!(
        relay.stats(P).expect("stats").from_leg[LEG_A].packets,
        1,
        "counters kept"
    );
    // The worker uses the new configuration: a new source latches instead of being dropped.
    a2.send_to(b"two", relay_addr(P)).expect("send");
    assert_eq!(recv(&b), (b"two".to_vec(), relay_addr(P)));
    let c = wait_counters(&relay, "the second latch", |c| c.latched == 2);
    assert_eq!(c.dropped(DropReason::UnknownSource), 0);
    assert!(
        relay.channel(P).expect("channel").legs[LEG_A]
            .rtp
            .matches(addr(&a2))
    );
    assert_eq!(relay.stats(P).expect("stats").from_leg[LEG_A].packets, 2);
}

#[test]
fn empty_and_oversize_datagrams_are_counted_never_fatal() {
    const P: u16 = 41450;
    let relay = start(41450, 41499, LO);
    let [a, b, b_rtcp] = peers(41490);
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");
    a.send_to(&[], relay_addr(P)).expect("send");
    assert_eq!(
        recv(&b),
        (vec![], relay_addr(P)),
        "zero-length datagrams follow the rule"
    );
    a.send_to(&[0x80; 3000], relay_addr(P)).expect("send");
    a.send_to(&rtp(1, 2048), relay_addr(P)).expect("send");
    assert_eq!(
        recv(&b).0,
        rtp(1, 2048),
        "the oversize one was dropped, the largest fits"
    );
    let c = wait_counters(&relay, "counters", |c| {
        c.rx_packets == 3 && c.forwarded_packets == 2
    });
    assert_eq!((c.empty, c.truncated), (1, 1));
    assert_eq!(c.forwarded_bytes, 2048);
}

#[test]
fn send_errors_are_counted_and_not_fatal() {
    // Wildcard bind: each datagram is sent from the destination leg's local address with
    // IP_PKTINFO. Leg B's is an address this host does not have (TEST-NET-1, never sent to), so
    // sending to B fails; sending to A (local 127.0.0.1) works.
    const P: u16 = 41500;
    let relay = start(41500, 41549, Ipv4Addr::UNSPECIFIED);
    let [a, b, b_rtcp] = peers(41540);
    let mut ch = channel(LO, P, addr(&b), addr(&b_rtcp));
    ch.legs[LEG_B].local_addr = relay_common::Addr16::from_ipv4_octets([192, 0, 2, 1]);
    relay.install(P, &ch).expect("install");
    a.send_to(b"lost", relay_addr(P)).expect("send");
    let c = wait_counters(&relay, "the send error", |c| c.send_errors == 1);
    assert_eq!(
        (c.forwarded_packets, c.latched),
        (0, 1),
        "latched even though the send failed"
    );
    // B's datagram to 127.0.0.1 is not addressed to B's relay address: dropped, counted.
    b.send_to(b"elsewhere", relay_addr(P)).expect("send");
    wait_counters(&relay, "the drop", |c| {
        c.dropped(DropReason::NotRelayAddress) == 1
    });
    // The worker goes on: with B's relay address on this host, B's media reaches A.
    ch.legs[LEG_B].local_addr = relay_common::Addr16::from_ipv4_octets(LO.octets());
    relay.remove(P).expect("remove");
    relay.install(P, &ch).expect("install again");
    a.send_to(b"latch", relay_addr(P)).expect("send");
    assert_eq!(recv(&b).0, b"latch".to_vec());
    b.send_to(b"works", relay_addr(P)).expect("send");
    assert_eq!(
        recv(&a),
        (b"works".to_vec(), relay_addr(P)),
        "sent from 127.0.0.1 (IP_PKTINFO)"
    );
    assert_eq!(relay.counters().send_errors, 1);
}

#[test]
fn only_datagrams_to_the_legs_relay_address_are_relayed() {
    // The relay binds the wildcard; leg A talks to 127.0.0.1, leg B to 127.0.0.2. A datagram
    // from A's peer to 127.0.0.2 (another address of this host) is not A's: dropped, and it
    // latches nothing.
    const P: u16 = 41560;
    let relay = start(41560, 41569, Ipv4Addr::UNSPECIFIED);
    let [a, b, b_rtcp] = peers(41565);
    let mut ch = channel(LO, P, addr(&b), addr(&b_rtcp));
    let other = Ipv4Addr::new(127, 0, 0, 2);
    ch.legs[LEG_B].local_addr = relay_common::Addr16::from_ipv4_octets(other.octets());
    relay.install(P, &ch).expect("install");
    a.send_to(b"wrong door", SocketAddr::from((other, P)))
        .expect("send");
    let c = wait_counters(&relay, "the drop", |c| {
        c.dropped(DropReason::NotRelayAddress) == 1
    });
    assert_eq!((c.latched, c.forwarded_packets), (0, 0));
    assert!(
        !relay.channel(P).expect("channel").legs[LEG_A]
            .rtp
            .is_latched()
    );
    // The right door: relayed, and B's answer is sent from B's relay address.
    a.send_to(b"hello", relay_addr(P)).expect("send");
    assert_eq!(recv(&b), (b"hello".to_vec(), SocketAddr::from((other, P))));
    b.send_to(b"back", SocketAddr::from((other, P)))
        .expect("send");
    assert_eq!(recv(&a), (b"back".to_vec(), relay_addr(P)));
}

/// Receives one datagram with its TOS byte (`IP_RECVTOS` must be on).
fn recv_with_tos(s: &UdpSocket) -> (Vec<u8>, Option<u8>) {
    let mut buf = [0u8; 2048];
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: `msg` points at live buffers of the stated sizes; SO_RCVTIMEO bounds the wait.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
    assert!(n >= 0, "recvmsg: {}", io::Error::last_os_error());
    let mut tos = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `control`; the macros stay inside.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TOS {
                tos = Some(*libc::CMSG_DATA(c));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    (buf[..n as usize].to_vec(), tos)
}

#[test]
fn dscp_and_ecn_byte_is_preserved_per_datagram() {
    const P: u16 = 41550;
    let relay = start(41550, 41599, LO);
    let [a, b, b_rtcp] = peers(41590);
    setsockopt_int(&b, libc::IPPROTO_IP, libc::IP_RECVTOS, 1).expect("IP_RECVTOS");
    setsockopt_int(&a, libc::IPPROTO_IP, libc::IP_RECVTOS, 1).expect("IP_RECVTOS");
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");
    // EF (46 << 2), AF41 with ECT(0), and best effort: each datagram keeps its own byte.
    for (seq, tos) in [(1u16, 0xb8u8), (2, 0x8a), (3, 0x00)] {
        setsockopt_int(&a, libc::IPPROTO_IP, libc::IP_TOS, i32::from(tos)).expect("IP_TOS");
        a.send_to(&rtp(seq, 172), relay_addr(P)).expect("send");
        assert_eq!(recv_with_tos(&b), (rtp(seq, 172), Some(tos)));
    }
    setsockopt_int(&b, libc::IPPROTO_IP, libc::IP_TOS, 0x28).expect("IP_TOS");
    b.send_to(b"back", relay_addr(P)).expect("send");
    assert_eq!(recv_with_tos(&a), (b"back".to_vec(), Some(0x28)));
}

#[test]
fn burst_of_20000_is_forwarded_without_loss_in_batches() {
    const P: u16 = 41600;
    const TOTAL: u32 = 20_000;
    const GATED: u32 = 2_000;
    const WINDOW: u64 = 1_000;
    const LEN: usize = 172;

    // The observer holds the worker on the first latch until the test has queued GATED
    // datagrams on the relay socket: the next recvmmsg then reads full batches, deterministically.
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(Some((entered_tx, gate)));
    let observer: ChannelObserver = Arc::new(move |_, _: &Channel| {
        let taken = gate.lock().expect("gate lock").take();
        if let Some((entered_tx, gate)) = taken {
            let _ = entered_tx.send(());
            let _ = gate.recv_timeout(WAIT);
        }
    });
    let relay = start_with(41600, 41649, LO, 2, Some(observer));
    let [a, b, b_rtcp] = peers(41640);
    for s in [&a, &b] {
        // Root may exceed rmem_max; otherwise rmem_max applies. Only B's matters for loss.
        if setsockopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20).is_err() {
            setsockopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20).expect("SO_RCVBUF");
        }
    }
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");

    let reader = std::thread::spawn(move || {
        let mut seen = HashSet::new();
        let mut bad = 0u32;
        let mut buf = [0u8; 4096];
        while seen.len() < TOTAL as usize {
            let Ok((n, from)) = b.recv_from(&mut buf) else {
                break;
            };
            let seq = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
            if n != LEN || from != relay_addr(P) || !seen.insert(seq) {
                bad += 1;
            }
        }
        (seen, bad)
    });

    let datagram = |seq: u32| {
        let mut p = rtp(seq as u16, LEN);
        p[12..16].copy_from_slice(&seq.to_be_bytes());
        p
    };
    a.send_to(&datagram(0), relay_addr(P)).expect("send");
    entered
        .recv_timeout(WAIT)
        .expect("the first datagram latches A");
    for seq in 1..GATED {
        a.send_to(&datagram(seq), relay_addr(P)).expect("send");
    }
    release.send(()).expect("release the worker");
    for seq in GATED..TOTAL {
        // A modest rate: at most WINDOW datagrams in flight inside the relay.
        if u64::from(seq) % 100 == 0 {
            wait_counters(&relay, "the relay to keep up", |c| {
                c.forwarded_packets + WINDOW >= u64::from(seq)
            });
        }
        a.send_to(&datagram(seq), relay_addr(P)).expect("send");
    }

    let (seen, bad) = reader.join().expect("reader");
    assert_eq!(
        bad, 0,
        "every datagram arrives once, intact, from the relay port"
    );
    assert_eq!(seen.len(), TOTAL as usize, "no loss");
    let c = wait_counters(&relay, "counters", |c| {
        c.forwarded_packets == u64::from(TOTAL) && c.rx_packets == u64::from(TOTAL)
    });
    assert_eq!(c.rx_packets, u64::from(TOTAL));
    assert_eq!(c.forwarded_bytes, u64::from(TOTAL) * LEN as u64);
    assert_eq!((c.latched, c.send_errors, c.truncated), (1, 0, 0));
    assert!(
        c.rx_batches * 2 <= c.rx_packets,
        "multi-datagram batches: {c:?}"
    );
    let s = relay.stats(P).expect("stats");
    assert_eq!(s.from_leg[LEG_A].packets, u64::from(TOTAL));
}

#[test]
fn many_channels_spread_over_workers_and_shutdown_frees_every_port() {
    let ports: Vec<u16> = (41650..41670).step_by(2).collect();
    let relay = start_with(41650, 41699, LO, 3, None);
    let mut legs = Vec::new();
    for (i, &p) in ports.iter().enumerate() {
        let [a, b, b_rtcp] = peers(41670 + 3 * i as u16);
        relay
            .install(p, &channel(LO, p, addr(&b), addr(&b_rtcp)))
            .expect("install");
        legs.push((p, a, b));
    }
    for (p, a, b) in &legs {
        a.send_to(&p.to_be_bytes(), relay_addr(*p)).expect("send");
        assert_eq!(recv(b), (p.to_be_bytes().to_vec(), relay_addr(*p)));
        b.send_to(b"back", relay_addr(*p)).expect("send");
        assert_eq!(recv(a).0, b"back");
    }
    wait_counters(&relay, "all latched", |c| c.latched == ports.len() as u64);
    relay.shutdown();
    for &p in &ports {
        assert!(ports_free(p), "port {p} closed by shutdown");
    }

    // Dropping the relay does the same.
    let relay = start(41650, 41699, LO);
    relay
        .install(41650, &channel(LO, 41650, relay_addr(9), relay_addr(9)))
        .expect("install");
    drop(relay);
    assert!(ports_free(41650));
}

#[test]
fn channel_changes_from_the_observer_are_refused_not_deadlocked() {
    let slot: Arc<OnceLock<Weak<UserspaceRelay>>> = Arc::default();
    let (result_tx, results) = mpsc::channel::<Result<(), String>>();
    let result_tx = Mutex::new(result_tx);
    let observer: ChannelObserver = {
        let slot = slot.clone();
        Arc::new(move |port, ch: &Channel| {
            if let Some(relay) = slot.get().and_then(Weak::upgrade) {
                let r = relay.install(port, ch).map_err(|e| e.to_string());
                let _ = result_tx.lock().expect("lock").send(r);
                // Reading is fine from here: no round trip to the worker.
                assert!(relay.channel(port).is_ok());
            }
        })
    };
    let relay = Arc::new(start_with(41700, 41749, LO, 1, Some(observer)));
    slot.set(Arc::downgrade(&relay)).expect("set once");
    let [a, b, b_rtcp] = peers(41740);
    relay
        .install(41700, &channel(LO, 41700, addr(&b), addr(&b_rtcp)))
        .expect("install");
    a.send_to(b"latch", relay_addr(41700)).expect("send");
    let r = results.recv_timeout(WAIT).expect("the observer ran");
    assert!(
        r.is_err(),
        "install from the owning worker must be refused, got {r:?}"
    );
    assert_eq!(recv(&b).0, b"latch");
    // The worker is still alive.
    b.send_to(b"back", relay_addr(41700)).expect("send");
    assert_eq!(recv(&a).0, b"back");
}

#[test]
fn a_backlog_longer_than_one_visit_is_drained_without_further_traffic() {
    // Sockets are edge-triggered and one visit reads at most 8 batches, so the rest of a long
    // backlog must be read in later rounds although no new datagram reports the socket again.
    const P: u16 = 41800;
    const BACKLOG: u16 = 1_000;
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(Some((entered_tx, gate)));
    let observer: ChannelObserver = Arc::new(move |_, _: &Channel| {
        let taken = gate.lock().expect("gate lock").take();
        if let Some((entered_tx, gate)) = taken {
            let _ = entered_tx.send(());
            let _ = gate.recv_timeout(WAIT);
        }
    });
    let relay = start_with(41800, 41849, LO, 1, Some(observer));
    let [a, b, b_rtcp] = peers(41840);
    // B holds the whole backlog until the test reads it.
    if setsockopt_int(&b, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20).is_err() {
        setsockopt_int(&b, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20).expect("SO_RCVBUF");
    }
    relay
        .install(P, &channel(LO, P, addr(&b), addr(&b_rtcp)))
        .expect("install");
    a.send_to(&rtp(0, 172), relay_addr(P)).expect("send");
    entered
        .recv_timeout(WAIT)
        .expect("the first datagram latches A");
    // Queued on the relay socket while its worker is held: 1,000 datagrams, 32 per batch.
    for seq in 1..=BACKLOG {
        a.send_to(&rtp(seq, 172), relay_addr(P)).expect("send");
    }
    release.send(()).expect("release the worker");
    let total = u64::from(BACKLOG) + 1;
    let c = wait_counters(&relay, "the whole backlog", |c| {
        c.forwarded_packets == total
    });
    assert_eq!((c.rx_packets, c.send_errors), (total, 0));
    for seq in 0..=BACKLOG {
        assert_eq!(recv(&b), (rtp(seq, 172), relay_addr(P)), "in order, intact");
    }
}
