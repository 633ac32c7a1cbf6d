//! Ordering between the control plane's changes and what the data path learns by itself:
//! latches racing removals, updates that keep learnt legs, pushed events, inherited channels
//! adopted or removed one by one, and one process per pin directory. Privileged: each test
//! builds its own namespaces (TEST-NET addresses) and runs XDP in generic mode.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PinDir, require_root, rtp};
use relay_common::{Channel, ChannelStats, Endpoint, LEG_A, LEG_B, Leg};
use relay_user::{
    Component, DataPath, DataPathError, DataPathEvent, DataPathEvents, Relay, RelayOptions,
    netns::{self, Host, Testbed, TestbedOptions},
    xdp::{XdpDataPath, XdpMode, XdpOptions},
};

const HOME: &str = "198.51.100.10:5004";
const HOME_RTCP: &str = "198.51.100.10:5005";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Waits (generously: CI is a noisy 2-core machine) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A channel on `port`: leg A (home, 198.51.100.10) learnt from traffic unless `home_latched`,
/// leg B (office) strict at `office`.
fn channel(port: u16, home_latched: bool, office: &str) -> Channel {
    let o = sa(office);
    Channel {
        legs: [
            Leg::new(
                SocketAddr::new(netns::RELAY_HOME_ADDR.into(), port),
                Endpoint::new(sa(HOME), home_latched),
                Endpoint::new(sa(HOME_RTCP), home_latched),
            ),
            Leg::new(
                SocketAddr::new(netns::RELAY_OFFICE_ADDR.into(), port),
                Endpoint::new(o, true),
                Endpoint::new(SocketAddr::new(o.ip(), o.port() + 1), true),
            ),
        ],
        ..Channel::default()
    }
}

/// Every event, in the order the sink saw them.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<DataPathEvent>>>);

impl Recorder {
    fn sink(&self) -> DataPathEvents {
        let log = Arc::clone(&self.0);
        Arc::new(move |e| log.lock().unwrap().push(e))
    }
    fn events(&self) -> Vec<DataPathEvent> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

fn port_and_generation(e: &DataPathEvent) -> (u16, u64) {
    match *e {
        DataPathEvent::Latched {
            port, generation, ..
        }
        | DataPathEvent::FastPath { port, generation } => (port, generation),
    }
}

struct Setup {
    tb: Testbed,
    pin: PinDir,
    events: Recorder,
}

impl Setup {
    fn new(tag: &str) -> Self {
        require_root();
        let _ = env_logger::builder().is_test(true).try_init();
        Self {
            tb: Testbed::create(TestbedOptions { nat: false }).expect("testbed"),
            pin: PinDir::new(tag),
            events: Recorder::default(),
        }
    }

    fn options(&self) -> RelayOptions {
        RelayOptions {
            port_min: 30528,
            port_max: 30887,
            workers: 1,
            xdp: Some(XdpOptions {
                interfaces: vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()],
                mode: XdpMode::Generic,
                pin_dir: Some(self.pin.0.clone()),
            }),
            require_xdp: true,
            events: Some(self.events.sink()),
        }
    }

    /// A relay on this setup's pin directory, retried while a forked child of another test
    /// still holds the previous relay's lock for a moment (see [`transient`]).
    fn relay(&self) -> Relay {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.options();
            match self.tb.run_in(Host::Relay, move || Relay::start(o)) {
                Ok(relay) => return relay,
                Err(e) if transient(&format!("{e:#}")) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("starting the relay: {e:#}"),
            }
        }
    }

    /// The home device's RTP socket (198.51.100.10:5004).
    fn home(&self) -> UdpSocket {
        self.tb
            .run_in(Host::Home, || UdpSocket::bind(sa(HOME)).unwrap())
    }
}

/// Whether an error is one a forked child of another test thread causes for a moment: between
/// `fork` and `exec` (the testbeds run `ip`) the child holds a copy of every descriptor, so a
/// socket closed by the relay keeps its port, and a closed pin-directory lock stays held, until
/// the child execs (close-on-exec).
fn transient(msg: &str) -> bool {
    msg.contains("Address already in use") || msg.contains("is in use by another homerelay")
}

/// [`Relay::install_channel`], retried while the port is held for a moment (see [`transient`]).
fn install(relay: &Relay, port: u16, ch: &Channel) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match relay.install_channel(port, ch) {
            Ok(g) => return g,
            Err(e) if transient(&e.to_string()) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("installing channel {port}: {e}"),
        }
    }
}

fn relay_home(port: u16) -> SocketAddr {
    SocketAddr::new(netns::RELAY_HOME_ADDR.into(), port)
}

/// Sends one packet from home to `port` and waits until the fast path holds the channel with
/// the home leg latched: every latch notice the worker sent before is then handled too (one
/// worker, one queue, in order).
fn latch_through(relay: &Relay, home: &UdpSocket, port: u16, seq: u16) {
    let x = relay.xdp().unwrap();
    wait_until(
        &format!("channel {port} is latched in the fast path"),
        || {
            home.send_to(&rtp(seq, 7), relay_home(port)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            x.channel(port)
                .is_ok_and(|c| c.legs[LEG_A].rtp.is_latched())
        },
    );
}

#[test]
fn latches_racing_removals_never_bring_a_channel_back() {
    let s = Setup::new("race");
    let relay = s.relay();
    let x = relay.xdp().unwrap();
    const PORT: u16 = 30528;
    const ITERATIONS: usize = 60;

    // A home device sending RTP to the channel port without pause, latching each new channel.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = Arc::clone(&stop);
        s.tb.spawn_in(Host::Home, move || {
            let sock = UdpSocket::bind(sa(HOME)).unwrap();
            let mut seq = 0u16;
            while !stop.load(Ordering::Relaxed) {
                // Refused while the port is unbound: that is part of the race.
                let _ = sock.send_to(&rtp(seq, 1), relay_home(PORT));
                seq = seq.wrapping_add(1);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    // (generation, events recorded when its removal returned)
    let mut removed = Vec::new();
    for i in 0..ITERATIONS {
        let generation = install(&relay, PORT, &channel(PORT, false, "192.0.2.10:6000"));
        if i % 2 == 0 {
            // Half of the time let the latch reach the fast path (so its counters move), the
            // other half remove at once, while the latch is on its way.
            wait_until("the latch reaches the fast path", || {
                x.channel(PORT)
                    .is_ok_and(|c| c.legs[LEG_A].rtp.is_latched())
            });
        }
        relay.remove(PORT).unwrap();
        removed.push((generation, s.events.len()));
        assert!(
            matches!(x.channel(PORT), Err(DataPathError::NotFound(PORT))),
            "iteration {i}: the fast path still holds the removed channel"
        );
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();

    // Drain the pusher: a latch on another port handled after every earlier notice.
    let home = s.home();
    install(&relay, 30530, &channel(30530, false, "192.0.2.10:6000"));
    latch_through(&relay, &home, 30530, 0);

    assert!(
        matches!(x.channel(PORT), Err(DataPathError::NotFound(PORT))),
        "a late latch brought the removed channel back into the fast path"
    );
    assert!(
        x.channels().unwrap().iter().all(|(p, _)| *p != PORT),
        "the channel map still lists the removed channel"
    );
    let events = s.events.events();
    for (generation, mark) in &removed {
        assert!(
            !events[*mark..]
                .iter()
                .any(|e| port_and_generation(e) == (PORT, *generation)),
            "an event of generation {generation} arrived after its removal"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, DataPathEvent::FastPath { port: PORT, .. })),
        "no iteration reached the fast path: the race was not exercised"
    );

    // The port reused: a new channel starts from zero on both paths, even though the removed
    // ones were counted by the fast path.
    install(&relay, PORT, &channel(PORT, true, "192.0.2.10:6000"));
    assert_eq!(x.stats(PORT).unwrap(), ChannelStats::default());
    assert_eq!(relay.stats(PORT).unwrap(), ChannelStats::default());
    assert_eq!(
        relay.channel(PORT).unwrap(),
        channel(PORT, true, "192.0.2.10:6000")
    );
}

#[test]
fn an_update_keeps_learnt_legs_and_the_channel_stays_in_the_fast_path() {
    let s = Setup::new("update");
    let relay = s.relay();
    let x = relay.xdp().unwrap();
    let home = s.home();
    const PORT: u16 = 30600;

    let generation = install(&relay, PORT, &channel(PORT, false, "192.0.2.10:6000"));
    latch_through(&relay, &home, PORT, 0);
    let learnt = relay.channel(PORT).unwrap();
    assert!(learnt.legs[LEG_A].rtp.is_latched());
    let fast_before = x.stats(PORT).unwrap();

    // The control plane moves the office leg; the home leg is not replaced (and the update
    // carries it unlatched, as a stale read would).
    let update = channel(PORT, false, "192.0.2.10:6002");
    let marker = s.events.len();
    let merged = relay.update_channel(PORT, &update, [false, true]).unwrap();
    assert_eq!(
        merged.legs[LEG_A], learnt.legs[LEG_A],
        "the learnt leg was lost"
    );
    assert_eq!(merged.legs[LEG_B], update.legs[LEG_B]);
    assert_eq!(relay.channel(PORT).unwrap(), merged);
    assert_eq!(
        x.channel(PORT).unwrap(),
        merged,
        "the fast path holds another copy than user space"
    );
    assert_eq!(
        relay.generation(PORT),
        Some(generation),
        "an update keeps the generation"
    );
    assert!(
        s.events.events()[marker..].contains(&DataPathEvent::FastPath {
            port: PORT,
            generation
        }),
        "the updated channel was not reported in the fast path"
    );
    let fast_after = x.stats(PORT).unwrap();
    assert!(
        fast_after.from_leg[LEG_A].packets >= fast_before.from_leg[LEG_A].packets,
        "an update reset the fast path's counters"
    );

    // Replacing the home leg unlatched takes it out of the fast path until it latches again,
    // and then it returns there.
    relay
        .update_channel(
            PORT,
            &channel(PORT, false, "192.0.2.10:6002"),
            [true, false],
        )
        .unwrap();
    assert!(!x.channel(PORT).unwrap().legs[LEG_A].rtp.is_latched());
    latch_through(&relay, &home, PORT, 1);
    assert_eq!(x.channel(PORT).unwrap(), relay.channel(PORT).unwrap());
    assert_eq!(relay.generation(PORT), Some(generation));
}

#[test]
fn events_come_in_causal_order_with_the_generation_and_stop_at_removal() {
    let s = Setup::new("events");
    let relay = s.relay();
    let home = s.home();
    let home_rtcp =
        s.tb.run_in(Host::Home, || UdpSocket::bind(sa(HOME_RTCP)).unwrap());
    const PORT: u16 = 30700;

    let first = install(&relay, PORT, &channel(PORT, false, "192.0.2.10:6000"));
    latch_through(&relay, &home, PORT, 0);
    let x = relay.xdp().unwrap();
    wait_until("the RTCP source latches in the fast path", || {
        home_rtcp.send_to(b"rtcp", relay_home(PORT + 1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        x.channel(PORT)
            .is_ok_and(|c| c.legs[LEG_A].rtcp.is_latched())
    });
    let ours: Vec<DataPathEvent> = s
        .events
        .events()
        .into_iter()
        .filter(|e| port_and_generation(e).0 == PORT)
        .collect();
    let latched_rtp = DataPathEvent::Latched {
        port: PORT,
        generation: first,
        leg: LEG_A,
        component: Component::Rtp,
        addr: sa(HOME),
    };
    let latched_rtcp = DataPathEvent::Latched {
        port: PORT,
        generation: first,
        leg: LEG_A,
        component: Component::Rtcp,
        addr: sa(HOME_RTCP),
    };
    let fast = DataPathEvent::FastPath {
        port: PORT,
        generation: first,
    };
    let pos = |e: &DataPathEvent| ours.iter().position(|x| x == e);
    let (rtp_at, fast_at) = (pos(&latched_rtp), pos(&fast));
    assert!(rtp_at.is_some(), "no RTP latch event in {ours:?}");
    assert!(
        pos(&latched_rtcp).is_some(),
        "no RTCP latch event in {ours:?}"
    );
    assert!(fast_at.is_some(), "no fast-path event in {ours:?}");
    assert!(
        rtp_at < fast_at,
        "FastPath before the latch that led to it: {ours:?}"
    );
    assert!(
        ours.iter().all(|e| port_and_generation(e).1 == first),
        "an event with another generation: {ours:?}"
    );

    // After the removal returns, the removed generation is silent whatever still arrives.
    relay.remove(PORT).unwrap();
    let mark = s.events.len();
    for seq in 1..20 {
        home.send_to(&rtp(seq, 7), relay_home(PORT)).unwrap();
    }
    let second = install(&relay, PORT, &channel(PORT, false, "192.0.2.10:6000"));
    assert!(
        second > first,
        "a new channel on the port needs a new generation"
    );
    latch_through(&relay, &home, PORT, 20);
    let after = &s.events.events()[mark..];
    assert!(
        !after
            .iter()
            .any(|e| port_and_generation(e) == (PORT, first)),
        "an event of the removed generation after its removal: {after:?}"
    );
    assert!(after.contains(&DataPathEvent::FastPath {
        port: PORT,
        generation: second
    }));
}

#[test]
fn inherited_channels_are_adopted_or_removed_one_by_one() {
    let s = Setup::new("adopt");
    let home = s.home();
    let kept = channel(30800, true, "192.0.2.10:6000");
    let dropped = channel(30802, true, "192.0.2.10:6000");
    {
        let first = s.relay();
        install(&first, 30800, &kept);
        install(&first, 30802, &dropped);
        // Strict legs: the fast path forwards at once; let it count a few packets.
        let x = first.xdp().unwrap();
        wait_until(
            "the fast path counts traffic on the inherited channel",
            || {
                home.send_to(&rtp(1, 3), relay_home(30800)).unwrap();
                std::thread::sleep(Duration::from_millis(5));
                x.stats(30800).unwrap().from_leg[LEG_A].packets >= 3
            },
        );
    }
    let counted = {
        let stats = xdp_stats_of_pinned(&s, 30800);
        assert!(stats.from_leg[LEG_A].packets >= 3);
        stats
    };

    let second = s.relay();
    assert_eq!(second.inherited(), vec![(30800, kept), (30802, dropped)]);
    // Nothing is decided for the owner: both are still in the fast path, neither in user space.
    let x = second.xdp().unwrap();
    assert_eq!(x.channel(30800).unwrap(), kept);
    assert_eq!(x.channel(30802).unwrap(), dropped);
    assert!(second.channel(30800).is_err() && second.channel(30802).is_err());

    let deadline = Instant::now() + Duration::from_secs(20);
    let generation = loop {
        match second.adopt(30800) {
            Ok(g) => break g,
            Err(e) if transient(&e.to_string()) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("adopting: {e}"),
        }
    };
    second.remove(30802).unwrap();
    assert!(second.inherited().is_empty());
    assert_eq!(second.generation(30800), Some(generation));
    assert_eq!(second.generation(30802), None);
    assert_eq!(
        second.channel(30800).unwrap(),
        kept,
        "latched endpoints kept"
    );
    assert_eq!(x.channel(30800).unwrap(), kept);
    assert!(matches!(
        x.channel(30802),
        Err(DataPathError::NotFound(30802))
    ));
    assert!(matches!(
        second.remove(30802),
        Err(DataPathError::NotFound(30802))
    ));
    assert!(matches!(
        second.adopt(30802),
        Err(DataPathError::NotFound(30802))
    ));
    assert!(
        x.stats(30800).unwrap().from_leg[LEG_A].packets >= counted.from_leg[LEG_A].packets,
        "adoption reset the fast path's counters"
    );
    // The adopted channel's ports are bound again: user space sees what the fast path passes up.
    second.remove(30800).unwrap();
    assert!(second.channel(30800).is_err());
    assert!(x.channels().unwrap().is_empty());
}

/// The fast path's counters of `port` as pinned (no relay running).
fn xdp_stats_of_pinned(s: &Setup, port: u16) -> ChannelStats {
    relay_user::xdp::PinnedStats::open(&s.pin.0)
        .unwrap()
        .get(port)
        .unwrap()
}

#[test]
fn a_second_load_on_one_pin_directory_is_refused() {
    let s = Setup::new("lock");
    let opts = s.options().xdp.unwrap();
    let load = {
        let opts = opts.clone();
        move || XdpDataPath::load(&opts, 30528, 30887)
    };
    let first = s.tb.run_in(Host::Relay, {
        let load = load.clone();
        move || load().unwrap()
    });
    let err = s.tb.run_in(Host::Relay, {
        let load = load.clone();
        move || load().map(|_| ()).unwrap_err()
    });
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&s.pin.0.display().to_string())
            && msg.contains("is in use by another homerelay process"),
        "unclear error: {msg}"
    );
    // A relay on that directory is refused too, even when the fast path is optional.
    let mut relay_opts = s.options();
    relay_opts.require_xdp = false;
    let relay =
        s.tb.run_in(Host::Relay, move || Relay::start(relay_opts).unwrap());
    assert!(
        relay
            .xdp_unavailable()
            .is_some_and(|w| w.contains("is in use by another homerelay process")),
        "{:?}",
        relay.xdp_unavailable()
    );
    drop(relay);
    drop(first);
    // Released with the fast path (once no forked child holds a copy, see `transient`).
    wait_until("the pin directory can be loaded again", || {
        let load = load.clone();
        s.tb.run_in(Host::Relay, move || load().is_ok())
    });
}

#[test]
fn without_the_fast_path_latches_are_reported_and_nothing_claims_the_fast_path() {
    let s = Setup::new("user-events");
    let mut opts = s.options();
    opts.xdp = None;
    opts.require_xdp = false;
    let relay =
        s.tb.run_in(Host::Relay, move || Relay::start(opts).unwrap());
    let home = s.home();
    const PORT: u16 = 30640;
    let generation = install(&relay, PORT, &channel(PORT, false, "192.0.2.10:6000"));
    let latched = DataPathEvent::Latched {
        port: PORT,
        generation,
        leg: LEG_A,
        component: Component::Rtp,
        addr: sa(HOME),
    };
    let mut seq = 0;
    wait_until("the latch is reported", || {
        home.send_to(&rtp(seq, 5), relay_home(PORT)).unwrap();
        seq += 1;
        std::thread::sleep(Duration::from_millis(5));
        s.events.events().contains(&latched)
    });
    assert!(relay.channel(PORT).unwrap().legs[LEG_A].rtp.is_latched());
    relay.remove(PORT).unwrap();
    let events = s.events.events();
    assert_eq!(
        events.iter().filter(|e| **e == latched).count(),
        1,
        "one latch, one event: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, DataPathEvent::FastPath { .. })),
        "a fast-path event without a fast path: {events:?}"
    );
}
