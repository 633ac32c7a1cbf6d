//! The fast path's life cycle: attach modes, clean detach, pinned maps that outlive the
//! process's hold on them, and clear errors for bad input.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

mod common;

use std::net::SocketAddr;

use common::{PinDir, require_root};
use relay_common::{Channel, Endpoint, Leg};
use relay_user::{
    DataPath, DataPathError, Relay, RelayOptions,
    netns::{self, Host, Testbed, TestbedOptions},
    xdp::{XdpDataPath, XdpMode, XdpOptions},
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn sample() -> Channel {
    Channel {
        legs: [
            Leg::new(
                sa("198.51.100.1:30600"),
                Endpoint::new(sa("198.51.100.10:5004"), true),
                Endpoint::new(sa("198.51.100.10:5005"), true),
            ),
            Leg::new(
                sa("192.0.2.1:30600"),
                Endpoint::new(sa("192.0.2.10:6000"), true),
                Endpoint::new(sa("192.0.2.10:6001"), true),
            ),
        ],
        flags: 0,
        ..Channel::default()
    }
}

/// The XDP program attached to `iface`, as `ip link` reports it ("xdp", "xdpgeneric"), if any.
fn xdp_attached(tb: &Testbed, iface: &str) -> Option<String> {
    let out = tb
        .exec(Host::Relay, &["ip", "-d", "link", "show", "dev", iface])
        .unwrap();
    ["xdpgeneric", "xdpdrv", "xdp"]
        .into_iter()
        .find(|k| out.split_whitespace().any(|w| w == *k))
        .map(str::to_owned)
}

#[test]
fn attach_modes_and_clean_detach() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    for (mode, expect) in [
        (XdpMode::Native, XdpMode::Native),
        (XdpMode::Generic, XdpMode::Generic),
        // veth supports native mode, so auto picks it.
        (XdpMode::Auto, XdpMode::Native),
    ] {
        let pin = PinDir::new("lifecycle");
        let pin_path = pin.0.clone();
        let xdp = tb.run_in(Host::Relay, move || {
            XdpDataPath::load(
                &XdpOptions {
                    interfaces: vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()],
                    mode,
                    pin_dir: Some(pin_path),
                },
                30528,
                30887,
            )
            .unwrap()
        });
        assert!(
            xdp.attachments().iter().all(|a| a.mode == expect),
            "{mode:?}: {:?}",
            xdp.attachments()
        );
        let shown = xdp_attached(&tb, netns::RELAY_IF_HOME);
        let want = if expect == XdpMode::Generic {
            "xdpgeneric"
        } else {
            "xdp"
        };
        assert_eq!(shown.as_deref(), Some(want), "{mode:?}");
        drop(xdp);
        // The kernel may release an XDP link from a work queue: allow it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while xdp_attached(&tb, netns::RELAY_IF_HOME).is_some()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            xdp_attached(&tb, netns::RELAY_IF_HOME),
            None,
            "{mode:?}: still attached 2 s after drop: {}",
            tb.exec(
                Host::Relay,
                &["ip", "-d", "link", "show", "dev", netns::RELAY_IF_HOME]
            )
            .unwrap()
        );
        assert_eq!(xdp_attached(&tb, netns::RELAY_IF_OFFICE), None);
    }
}

#[test]
fn pinned_channels_survive_a_restart_and_can_be_adopted() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir::new("restart");
    let opts = XdpOptions {
        interfaces: vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()],
        mode: XdpMode::Generic,
        pin_dir: Some(pin.0.clone()),
    };
    let relay_opts = RelayOptions {
        port_min: 30528,
        port_max: 30887,
        workers: 1,
        xdp: Some(opts.clone()),
        require_xdp: true,
        events: None,
    };
    let first = {
        let o = relay_opts.clone();
        tb.run_in(Host::Relay, move || Relay::start(o).unwrap())
    };
    first.install(30600, &sample()).unwrap();
    drop(first);
    assert!(
        pin.0.join(relay_common::CHANNELS_MAP).exists(),
        "channel map not pinned"
    );

    // A new process (here: a new Relay) finds the channel in the pinned map and lists it; it
    // takes it over in user space only when told to, so its ports are bound again.
    // The first relay's lock on the pin directory can outlive it for a moment while a forked
    // child of another test thread (the testbeds run `ip`) still holds a copy of its
    // descriptor, until that child execs: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let second = loop {
        let o = relay_opts.clone();
        match tb.run_in(Host::Relay, move || Relay::start(o)) {
            Ok(r) => break r,
            Err(e)
                if format!("{e:#}").contains("is in use by another homerelay")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("restarting the relay: {e:#}"),
        }
    };
    assert_eq!(second.inherited(), vec![(30600, sample())]);
    assert_eq!(second.xdp().unwrap().channel(30600).unwrap(), sample());
    assert!(second.userspace().channel(30600).is_err());
    // The ports are bound again (the same transient as above can hold them for a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let generation = loop {
        match second.adopt(30600) {
            Ok(g) => break g,
            Err(DataPathError::Bind { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => panic!("adopting: {e}"),
        }
    };
    assert_eq!(second.generation(30600), Some(generation));
    assert!(second.inherited().is_empty());
    assert_eq!(second.userspace().channel(30600).unwrap(), sample());
    second.remove(30600).unwrap();
    assert!(matches!(
        second.xdp().unwrap().channel(30600),
        Err(DataPathError::NotFound(30600))
    ));
    assert!(matches!(
        second.channel(30600),
        Err(DataPathError::NotFound(30600))
    ));
}

#[test]
fn bad_requests_get_clear_errors() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir::new("errors");
    let pin_path = pin.0.clone();
    let messages = tb.run_in(Host::Relay, move || {
        let mut msgs = Vec::new();
        let load = |ifaces: Vec<&str>, min, max| {
            XdpDataPath::load(
                &XdpOptions {
                    interfaces: ifaces.into_iter().map(String::from).collect(),
                    mode: XdpMode::Generic,
                    pin_dir: Some(pin_path.clone()),
                },
                min,
                max,
            )
        };
        msgs.push(format!(
            "{:#}",
            load(vec!["no-such-if"], 30528, 30887).unwrap_err()
        ));
        msgs.push(format!("{:#}", load(vec![], 30528, 30887).unwrap_err()));
        msgs.push(format!(
            "{:#}",
            load(vec![netns::RELAY_IF_HOME], 30887, 30528).unwrap_err()
        ));
        msgs.push(format!(
            "{:#}",
            load(vec!["bad\0name"], 30528, 30887).unwrap_err()
        ));
        let xdp = load(vec![netns::RELAY_IF_HOME], 30528, 30887).unwrap();
        for port in [30529, 30526, 30888, 30887] {
            msgs.push(xdp.install(port, &sample()).unwrap_err().to_string());
        }
        msgs.push(xdp.remove(30600).unwrap_err().to_string());
        msgs.push(xdp.stats(30600).unwrap_err().to_string());
        msgs
    });
    let expect = [
        "no interface \"no-such-if\"",
        "no interfaces",
        "empty relay port range",
        "invalid interface name",
        "port 30529 is not an even port in the relay range 30528-30887",
        "port 30526 is not an even port",
        "port 30888 is not an even port",
        "port 30887 is not an even port",
        "no channel on port 30600",
        "no channel on port 30600",
    ];
    for (m, e) in messages.iter().zip(expect) {
        assert!(m.contains(e), "error {m:?} should say {e:?}");
    }
}
