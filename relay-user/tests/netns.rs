//! End-to-end checks of the namespace testbed: kernel forwarding through Relay, the NAT's port
//! rewriting, the settings the XDP path relies on, and cleanup. Needs root: without it these
//! tests fail (they are not skipped).
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use relay_user::netns::{self, Host, Testbed, TestbedOptions};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the netns tests need root (network namespaces, veths); run them as root"
    );
}

fn namespaces() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Binds a UDP socket at `addr` inside `host`, with a receive timeout.
fn bind_in(tb: &Testbed, host: Host, addr: SocketAddrV4) -> UdpSocket {
    tb.run_in(host, move || {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    })
}

/// Sends `payload` from `from` (inside `host`) to `to`, then receives on `rx`.
fn send_and_receive(
    tb: &Testbed,
    host: Host,
    from: SocketAddrV4,
    to: SocketAddrV4,
    rx: &UdpSocket,
    payload: &'static [u8],
) -> SocketAddr {
    let tx = bind_in(tb, host, from);
    tx.send_to(payload, to).unwrap();
    let mut buf = [0u8; 1500];
    let (n, src) = rx.recv_from(&mut buf).expect("datagram did not arrive");
    assert_eq!(&buf[..n], payload);
    src
}

#[test]
fn home_reaches_office_through_kernel_forwarding() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).unwrap();
    // This test is about kernel forwarding itself: switch it on in Relay.
    tb.set_forwarding(Host::Relay, true).unwrap();
    let office = SocketAddrV4::new(netns::OFFICE_ADDR, 5004);
    let rx = bind_in(&tb, Host::Office, office);
    let src = send_and_receive(
        &tb,
        Host::Home,
        SocketAddrV4::new(netns::HOME_ADDR, 6000),
        office,
        &rx,
        b"hello office",
    );
    assert_eq!(
        src,
        SocketAddr::V4(SocketAddrV4::new(netns::HOME_ADDR, 6000))
    );

    // And back, with the address defaulted by the route (Office's own).
    let home = SocketAddrV4::new(netns::HOME_ADDR, 6002);
    let rx = bind_in(&tb, Host::Home, home);
    let src = send_and_receive(
        &tb,
        Host::Office,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        home,
        &rx,
        b"hello home",
    );
    assert_eq!(src.ip(), netns::OFFICE_ADDR);
}

#[test]
fn nat_rewrites_source_port_into_its_range() {
    require_root();
    let tb = Testbed::create(TestbedOptions::default()).unwrap();
    // Office is reached through Relay by kernel forwarding here.
    tb.set_forwarding(Host::Relay, true).unwrap();
    let office = SocketAddrV4::new(netns::OFFICE_ADDR, 5006);
    let rx = bind_in(&tb, Host::Office, office);
    let src = send_and_receive(
        &tb,
        Host::HomeBehindNat,
        SocketAddrV4::new(netns::HOME_BEHIND_NAT_ADDR, 5004),
        office,
        &rx,
        b"from behind nat",
    );
    assert_eq!(src.ip(), netns::NAT_WAN_ADDR);
    let (lo, hi) = netns::NAT_PORT_RANGE;
    assert!(
        (lo..=hi).contains(&src.port()),
        "NAT mapped to port {}",
        src.port()
    );
}

#[test]
fn relay_settings_for_the_fast_path() {
    require_root();
    let tb = Testbed::create(TestbedOptions::default()).unwrap();
    // Permanent neighbours on both ends of every link.
    for link in tb.links() {
        for (end, other) in [(link.near, link.far), (link.far, link.near)] {
            let out = tb
                .exec(end.host, &["ip", "neigh", "show", "dev", end.iface])
                .unwrap();
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{} ", other.addr)))
                .unwrap_or_else(|| panic!("no neighbour {} on {}: {out}", other.addr, end.iface));
            assert!(line.contains("PERMANENT"), "{line}");
        }
        for end in [link.near, link.far] {
            let out = tb.exec(end.host, &["ethtool", "-k", end.iface]).unwrap();
            assert!(out.contains("tx-checksumming: off"), "{}: {out}", end.iface);
        }
    }
    let sysctl = |host, key| {
        tb.exec(host, &["sysctl", "-n", key])
            .unwrap()
            .trim()
            .to_owned()
    };
    // The relay is not a router: the stock default.
    assert_eq!(sysctl(Host::Relay, "net.ipv4.ip_forward"), "0");
    assert_eq!(sysctl(Host::Relay, "net.ipv4.conf.all.rp_filter"), "0");
    assert_eq!(sysctl(Host::Relay, "net.ipv4.conf.r-home.rp_filter"), "0");
    assert_eq!(sysctl(Host::Nat, "net.ipv4.ip_forward"), "1");
    // Interfaces the XDP tests attach to exist and have distinct indexes.
    let home = tb.ifindex(Host::Relay, netns::RELAY_IF_HOME).unwrap();
    let office = tb.ifindex(Host::Relay, netns::RELAY_IF_OFFICE).unwrap();
    assert_ne!(home, office);
    assert_eq!(
        netns::relay_peer(netns::RELAY_IF_HOME).unwrap().iface,
        netns::HOME_IF
    );
    assert!(tb.ifindex(Host::Home, netns::HOME_IF).is_ok());
    assert!(tb.ifindex(Host::Home, "nonexistent0").is_err());
}

#[test]
fn drop_deletes_every_namespace() {
    require_root();
    let tb = Testbed::create(TestbedOptions::default()).unwrap();
    let names: Vec<String> = tb.hosts().map(|h| tb.ns(h).to_owned()).collect();
    assert_eq!(names.len(), 5);
    let listed = namespaces();
    for n in &names {
        assert!(
            listed.contains(n.as_str()),
            "{n} missing from `ip netns list`: {listed}"
        );
    }
    drop(tb);
    let listed = namespaces();
    for n in &names {
        assert!(
            !listed.contains(n.as_str()),
            "{n} still listed after drop: {listed}"
        );
    }
}

#[test]
fn two_testbeds_coexist() {
    require_root();
    let a = Testbed::create(TestbedOptions { nat: false }).unwrap();
    let b = Testbed::create(TestbedOptions { nat: false }).unwrap();
    assert_ne!(a.ns(Host::Relay), b.ns(Host::Relay));
    assert!(!a.has(Host::Nat));
    // Home reaches Office by kernel forwarding through each Relay.
    a.set_forwarding(Host::Relay, true).unwrap();
    b.set_forwarding(Host::Relay, true).unwrap();
    // Same addresses, same ports, separate worlds.
    for (tb, payload) in [(&a, b"in a" as &'static [u8]), (&b, b"in b")] {
        let office = SocketAddrV4::new(netns::OFFICE_ADDR, 7000);
        let rx = bind_in(tb, Host::Office, office);
        send_and_receive(
            tb,
            Host::Home,
            SocketAddrV4::new(netns::HOME_ADDR, 7002),
            office,
            &rx,
            payload,
        );
    }
}

#[test]
fn run_in_propagates_panics_and_results() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).unwrap();
    // The thread is really in the namespace: it sees Office's interface (`/proc/self/net` would
    // show the main thread's namespace).
    let has_office_if = tb.run_in(Host::Office, || {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap()
            .contains(netns::OFFICE_IF)
    });
    assert!(has_office_if);
    let out = tb.exec(Host::Office, &["ip", "-br", "addr"]).unwrap();
    assert!(out.contains("192.0.2.10/24"), "{out}");
    let err = tb
        .exec(Host::Office, &["ip", "link", "show", "nonexistent0"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("nonexistent0"), "{err:#}");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tb.run_in(Host::Home, || panic!("boom"));
    }));
    assert!(panicked.is_err());
}
