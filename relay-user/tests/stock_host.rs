//! The fast path on a stock host: the relay's namespace keeps `net.ipv4.ip_forward=0`, and XDP
//! still forwards latched channels, with next hops resolved in user space from the routing and
//! neighbour tables. `FastPath` is reported only once the next hops are known; a neighbour the
//! kernel has not resolved sends packets up to user space until it is, then the fast path takes
//! over by itself.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use common::{PinDir, require_root, rtp};
use relay_common::{Channel, Counter, Endpoint, LEG_A, Leg};
use relay_user::{
    DataPath, DataPathEvent, DataPathEvents, Relay, RelayOptions,
    netns::{self, Host, Testbed, TestbedOptions},
    nexthop::Unresolved,
    xdp::{XdpMode, XdpOptions},
};

const PORT: u16 = 30528;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn channel() -> Channel {
    let ep = |s: &str, latched| Endpoint::new(sa(s), latched);
    Channel {
        legs: [
            // Home: learnt from its first packet.
            Leg::new(
                sa("198.51.100.1:30528"),
                ep("198.51.100.10:5004", false),
                ep("198.51.100.10:5005", false),
            ),
            // Office: given by the control plane.
            Leg::new(
                sa("192.0.2.1:30528"),
                ep("192.0.2.10:6000", true),
                ep("192.0.2.10:6001", true),
            ),
        ],
        flags: 0,
        ..Channel::default()
    }
}

struct Bed {
    tb: Testbed,
    _pin: PinDir,
    relay: Relay,
    events: mpsc::Receiver<DataPathEvent>,
    home: UdpSocket,
    office: UdpSocket,
}

fn start(tag: &str, before_relay: impl FnOnce(&Testbed)) -> Bed {
    require_root();
    let _ = env_logger::builder().is_test(true).try_init();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let fwd = tb
        .exec(Host::Relay, &["sysctl", "-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(fwd.trim(), "0", "the relay namespace must not route");
    before_relay(&tb);
    let pin = PinDir::new(tag);
    let (tx, events) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let sink: DataPathEvents = Arc::new(move |e| {
        let _ = tx.lock().unwrap().send(e);
    });
    let xdp = XdpOptions {
        interfaces: vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()],
        mode: XdpMode::Generic,
        pin_dir: Some(pin.0.clone()),
    };
    let relay = tb.run_in(Host::Relay, move || {
        Relay::start(RelayOptions {
            port_min: 30528,
            port_max: 30887,
            workers: 1,
            xdp: Some(xdp),
            require_xdp: true,
            events: Some(sink),
        })
        .expect("relay")
    });
    let home = tb.run_in(Host::Home, || {
        UdpSocket::bind("198.51.100.10:5004").unwrap()
    });
    let office = tb.run_in(Host::Office, || UdpSocket::bind("192.0.2.10:6000").unwrap());
    office
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    Bed {
        tb,
        _pin: pin,
        relay,
        events,
        home,
        office,
    }
}

impl Bed {
    fn forwarded_by_xdp(&self) -> u64 {
        let c = self.relay.xdp().unwrap().counters().unwrap();
        c.iter()
            .filter(|(k, _)| k.is_forwarded())
            .map(|&(_, n)| n)
            .sum()
    }

    fn counter(&self, which: Counter) -> u64 {
        let c = self.relay.xdp().unwrap().counters().unwrap();
        c.iter().find(|(k, _)| *k == which).unwrap().1
    }

    /// Sends packet `seq` home → office and waits until the office received it.
    fn relay_one(&self, seq: u16) {
        self.home
            .send_to(&rtp(seq, 0x5151), sa("198.51.100.1:30528"))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 2048];
        loop {
            assert!(Instant::now() < deadline, "packet {seq} never arrived");
            if let Ok((n, from)) = self.office.recv_from(&mut buf) {
                assert_eq!(from, sa("192.0.2.1:30528"));
                if buf[..n] == rtp(seq, 0x5151)[..] {
                    return;
                }
            }
        }
    }

    /// Waits for the `FastPath` event of the channel on [`PORT`].
    fn wait_fast_path(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(DataPathEvent::FastPath { port: PORT, .. }) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    /// Sends `n` packets home → office (1 ms apart), receives them all, and returns how many
    /// the fast path forwarded meanwhile.
    fn send_counted(&self, first: u16, n: u16) -> u64 {
        let before = self.forwarded_by_xdp();
        let rx = {
            let office = self.office.try_clone().unwrap();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut got = 0u16;
                let mut buf = [0u8; 2048];
                while got < n && Instant::now() < deadline {
                    if let Ok((len, _)) = office.recv_from(&mut buf) {
                        let seq = u16::from_be_bytes([buf[2], buf[3]]);
                        if len >= 12 && (first..first + n).contains(&seq) {
                            got += 1;
                        }
                    }
                }
                got
            })
        };
        for seq in first..first + n {
            self.home
                .send_to(&rtp(seq, 0x5151), sa("198.51.100.1:30528"))
                .unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(rx.join().unwrap(), n, "packets lost");
        self.forwarded_by_xdp() - before
    }
}

#[test]
fn xdp_forwards_with_forwarding_off() {
    let bed = start("stock", |_| {});
    bed.relay.install(PORT, &channel()).unwrap();
    // Latch home with one packet (user space carries it), then wait until the fast path holds
    // the channel with its next hops.
    bed.relay_one(0);
    assert!(
        bed.wait_fast_path(Duration::from_secs(20)),
        "no FastPath event after the latch"
    );
    assert!(bed.relay.xdp().unwrap().unresolved().is_empty());
    const N: u16 = 1000;
    let fast = bed.send_counted(1, N);
    assert!(
        fast * 100 >= u64::from(N) * 99,
        "XDP forwarded only {fast} of {N} with forwarding off: {:?}",
        bed.relay.xdp().unwrap().counters()
    );
    assert_eq!(bed.counter(Counter::PassFibFailed), 0);
    assert_eq!(bed.counter(Counter::PassNoNeighbour), 0);
    assert_eq!(bed.relay.fast_path_waiting(), 0);
    let s = bed.relay.stats(PORT).unwrap();
    assert_eq!(s.from_leg[LEG_A].packets, u64::from(N) + 1);
}

#[test]
fn unresolved_neighbour_goes_up_then_fast_path_takes_over() {
    // Relay does not know Office's MAC: the kernel must resolve it (ARP) when user space sends.
    let bed = start("stock-arp", |tb| {
        tb.exec(
            Host::Relay,
            &[
                "ip",
                "neigh",
                "del",
                "192.0.2.10",
                "dev",
                netns::RELAY_IF_OFFICE,
            ],
        )
        .unwrap();
    });
    bed.relay.install(PORT, &channel()).unwrap();
    // Office is latched from the start, home is not: nothing to report yet, and the next hop
    // towards Office is unknown.
    let unresolved = bed.relay.xdp().unwrap().unresolved();
    assert!(
        unresolved.iter().any(|u| u.dst == netns::OFFICE_ADDR
            && matches!(u.why, Unresolved::NoNeighbour(n) if n == netns::OFFICE_ADDR)),
        "{unresolved:?}"
    );
    // The first packet latches home; user space sends it on, which makes the kernel resolve
    // Office. The fast path reports itself only once the next hop is known.
    bed.relay_one(0);
    assert!(
        bed.wait_fast_path(Duration::from_secs(20)),
        "the fast path never took over after the neighbour was resolved"
    );
    assert!(bed.relay.xdp().unwrap().unresolved().is_empty());
    assert_eq!(bed.relay.fast_path_waiting(), 0);
    let neigh = bed
        .tb
        .exec(Host::Relay, &["ip", "neigh", "show", "192.0.2.10"])
        .unwrap();
    assert!(!neigh.contains("PERMANENT"), "{neigh}");
    const N: u16 = 200;
    let fast = bed.send_counted(1, N);
    assert!(
        fast * 100 >= u64::from(N) * 99,
        "XDP forwarded only {fast} of {N}: {:?}",
        bed.relay.xdp().unwrap().counters()
    );
}
