//! The NAT lab's kinds behave as they claim: mapping and filtering observed with plain sockets
//! on both sides of the router, the switch of public address, and cleanup. Needs root: without
//! it these tests fail (they are not skipped).
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use relay_user::natlab::{
    INSIDE_ADDR, NatKind, NatLab, Node, PUBLIC_ADDR, PUBLIC_ADDR_2, SERVER_ADDR, SERVER_ADDR_2,
};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the NAT lab tests need root (network namespaces, nftables); run them as root"
    );
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A UDP socket bound to `addr` inside `node`, with a receive timeout.
fn bind_in(lab: &NatLab, node: Node, addr: SocketAddr) -> UdpSocket {
    lab.run_in(node, move || {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    })
    .unwrap()
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 1500];
    let (n, from) = s
        .recv_from(&mut buf)
        .expect("a datagram should have arrived");
    (buf[..n].to_vec(), from)
}

/// Sends from `inside` to the Outside socket `server` and returns the source it saw: the
/// NAT's mapping towards `server`.
fn mapping_towards(inside: &UdpSocket, server: &UdpSocket) -> SocketAddr {
    inside
        .send_to(b"out", server.local_addr().unwrap())
        .unwrap();
    let (data, from) = recv(server);
    assert_eq!(data, b"out");
    from
}

/// Whether a datagram `probe` sends to `mapping` reaches `inside`. Decided without waiting
/// for a timeout: `marker` (an endpoint the inside socket has contacted, always let in) sends
/// right after, over the same path; whatever arrives first tells.
fn passes(inside: &UdpSocket, probe: &UdpSocket, marker: &UdpSocket, mapping: SocketAddr) -> bool {
    probe.send_to(b"probe", mapping).unwrap();
    marker.send_to(b"marker", mapping).unwrap();
    let (first, from) = recv(inside);
    if first == b"probe" {
        assert_eq!(
            from,
            probe.local_addr().unwrap(),
            "the remote source is kept"
        );
        let (second, _) = recv(inside);
        assert_eq!(second, b"marker");
        true
    } else {
        assert_eq!(first, b"marker");
        false
    }
}

fn check_kind(kind: NatKind) {
    let lab = NatLab::create(kind).unwrap();
    assert_eq!(lab.kind(), kind);
    let server = bind_in(&lab, Node::Outside, v4(SERVER_ADDR, 3478));
    let same_ip_other_port = bind_in(&lab, Node::Outside, v4(SERVER_ADDR, 3479));
    let other_ip = bind_in(&lab, Node::Outside, v4(SERVER_ADDR_2, 3478));
    let other_ip_other_port = bind_in(&lab, Node::Outside, v4(SERVER_ADDR_2, 3479));

    // Filtering, on a socket that has contacted `server` only.
    let inside = bind_in(&lab, Node::Inside, v4(INSIDE_ADDR, 5000));
    let mapping = mapping_towards(&inside, &server);
    match mapping {
        SocketAddr::V4(m) => assert_eq!(*m.ip(), PUBLIC_ADDR, "{kind:?}"),
        SocketAddr::V6(m) => panic!("IPv6 mapping {m}"),
    }
    server.send_to(b"reply", mapping).unwrap();
    assert_eq!(
        recv(&inside),
        (b"reply".to_vec(), server.local_addr().unwrap())
    );
    let (other_port_passes, other_ip_passes) = (
        passes(&inside, &same_ip_other_port, &server, mapping),
        passes(&inside, &other_ip, &server, mapping),
    );
    let expected = match kind {
        NatKind::EndpointIndependent => (true, true),
        NatKind::AddressDependent => (true, false),
        NatKind::Symmetric => (false, false),
    };
    assert_eq!(
        (other_port_passes, other_ip_passes),
        expected,
        "{kind:?}: (same IP other port, other IP) let in"
    );

    // Mapping, on a fresh socket: towards other destinations.
    let inside = bind_in(&lab, Node::Inside, v4(INSIDE_ADDR, 5002));
    let first = mapping_towards(&inside, &server);
    let to_other_ip = mapping_towards(&inside, &other_ip);
    let to_other_port = mapping_towards(&inside, &other_ip_other_port);
    match kind {
        NatKind::EndpointIndependent | NatKind::AddressDependent => {
            assert_eq!(to_other_ip, first, "{kind:?}: endpoint-independent mapping");
            assert_eq!(
                to_other_port, first,
                "{kind:?}: endpoint-independent mapping"
            );
        }
        NatKind::Symmetric => {
            assert_ne!(to_other_ip, first, "symmetric: a new mapping per address");
            assert_ne!(
                to_other_port, to_other_ip,
                "symmetric: a new mapping per port"
            );
        }
    }
    // Replies come back on every mapping, from where they were sent.
    for (peer, m) in [
        (&server, first),
        (&other_ip, to_other_ip),
        (&other_ip_other_port, to_other_port),
    ] {
        peer.send_to(b"back", m).unwrap();
        assert_eq!(
            recv(&inside),
            (b"back".to_vec(), peer.local_addr().unwrap())
        );
    }
}

#[test]
fn endpoint_independent_nat_maps_and_filters_independently() {
    require_root();
    check_kind(NatKind::EndpointIndependent);
}

#[test]
fn address_dependent_nat_filters_by_address() {
    require_root();
    check_kind(NatKind::AddressDependent);
}

#[test]
fn symmetric_nat_maps_and_filters_per_address_and_port() {
    require_root();
    check_kind(NatKind::Symmetric);
}

#[test]
fn the_public_address_changes_for_the_next_packet() {
    require_root();
    for kind in NatKind::ALL {
        let lab = NatLab::create(kind).unwrap();
        let server = bind_in(&lab, Node::Outside, v4(SERVER_ADDR, 3478));
        let inside = bind_in(&lab, Node::Inside, v4(INSIDE_ADDR, 5004));
        let before = mapping_towards(&inside, &server);
        assert_eq!(before.ip(), PUBLIC_ADDR, "{kind:?}");

        lab.set_public_address(PUBLIC_ADDR_2).unwrap();
        let after = mapping_towards(&inside, &server);
        assert_eq!(after.ip(), PUBLIC_ADDR_2, "{kind:?}");
        server.send_to(b"new", after).unwrap();
        assert_eq!(
            recv(&inside),
            (b"new".to_vec(), server.local_addr().unwrap())
        );

        lab.set_public_address(PUBLIC_ADDR).unwrap();
        assert_eq!(
            mapping_towards(&inside, &server).ip(),
            PUBLIC_ADDR,
            "{kind:?}"
        );

        let e = lab.set_public_address(SERVER_ADDR).unwrap_err().to_string();
        assert!(e.contains("not a public address"), "{e}");
    }
}

#[test]
fn nodes_run_code_and_commands_and_the_lab_cleans_up() {
    require_root();
    let lab = NatLab::create(NatKind::AddressDependent).unwrap();
    let names: Vec<String> = [Node::Inside, Node::Router, Node::Outside]
        .into_iter()
        .map(|n| lab.ns(n).to_owned())
        .collect();
    let addrs = lab
        .exec(Node::Outside, &["ip", "-4", "-o", "addr"])
        .unwrap();
    assert!(addrs.contains(&SERVER_ADDR.to_string()), "{addrs}");
    assert!(addrs.contains(&SERVER_ADDR_2.to_string()), "{addrs}");
    let e = lab.exec(Node::Router, &["false"]).unwrap_err().to_string();
    assert!(e.contains("failed"), "{e}");

    // A thread spawned in Outside serves; the Inside one reaches it through the NAT.
    let server = bind_in(&lab, Node::Outside, v4(SERVER_ADDR_2, 7000));
    let echo = lab
        .spawn_in(Node::Outside, move || {
            let mut buf = [0u8; 64];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            server.send_to(&buf[..n], from).unwrap();
            from
        })
        .unwrap();
    let seen = lab
        .run_in(Node::Inside, || {
            let s = UdpSocket::bind((INSIDE_ADDR, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.send_to(b"ping", (SERVER_ADDR_2, 7000)).unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf).unwrap();
            buf[..n].to_vec()
        })
        .unwrap();
    assert_eq!(seen, b"ping");
    assert_eq!(echo.join().unwrap().ip(), PUBLIC_ADDR);

    drop(lab);
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} left behind");
    }
}
