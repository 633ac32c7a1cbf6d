//! The fast path's host checks on real interfaces of the namespace testbed: what
//! `xdp_links::inspect` reads from a veth and its peer in another namespace (driver, features,
//! attached programs, TX checksum offload), and `xdp_probe::probe` loading the program and
//! forwarding through `BPF_PROG_TEST_RUN` without attaching anything. Needs root: without it
//! these tests fail (they are not skipped).
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

mod common;

use common::require_root;
use relay_user::netns::{self, Host, Testbed, TestbedOptions};
use relay_user::xdp::{XdpMode, attach_pass_program};
use relay_user::xdp_links::{AttachMode, XdpFeatures, inspect};
use relay_user::xdp_probe::{
    ProbeStage, XDP_PASS, XDP_REDIRECT, XDP_TX, map_memory_estimate, possible_cpus, probe,
};

/// The probe's throw-away pin directories of this process.
fn probe_dirs() -> Vec<String> {
    let prefix = format!("homerelay-probe-{}-", std::process::id());
    std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn a_veth_and_its_peer_in_another_namespace_are_read_as_they_are() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).unwrap();
    let link = tb
        .run_in(Host::Relay, || inspect(netns::RELAY_IF_HOME))
        .unwrap()
        .expect("r-home exists");
    assert!(link.is_veth(), "{link:?}");
    assert_eq!(link.driver.as_deref(), Some("veth"));
    assert!(link.xdp.is_empty(), "{link:?}");
    assert_eq!(link.tx_checksum, Some(false), "the testbed turns it off");
    let features = link.xdp_features.expect("Linux ≥ 6.3 reports XDP features");
    assert!(
        features.has(XdpFeatures::BASIC | XdpFeatures::REDIRECT),
        "{}",
        features.names()
    );
    assert!(
        !features.has(XdpFeatures::NDO_XMIT),
        "no program on the peer yet: {}",
        features.names()
    );
    let peer = link.peer.as_ref().expect("a veth has a peer");
    assert!(peer.netnsid.is_some(), "the peer is in Home's namespace");
    let view = peer
        .view
        .as_ref()
        .expect("the testbed's namespace is named");
    assert_eq!(view.name, netns::HOME_IF);
    assert!(
        view.netns
            .as_deref()
            .is_some_and(|p| p.ends_with(tb.ns(Host::Home))),
        "{view:?}"
    );
    assert!(view.xdp.is_empty());
    assert_eq!(view.tx_checksum, Some(false));

    // A program on the peer: the relay's end can now send frames out in native mode.
    let guard = tb
        .run_in(Host::Home, || {
            attach_pass_program(netns::HOME_IF, XdpMode::Native)
        })
        .unwrap();
    let link = tb
        .run_in(Host::Relay, || inspect(netns::RELAY_IF_HOME))
        .unwrap()
        .unwrap();
    assert!(
        link.xdp_features.unwrap().has(XdpFeatures::NDO_XMIT),
        "{link:?}"
    );
    let view = link.peer.unwrap().view.unwrap();
    assert_eq!(view.xdp.len(), 1);
    assert_eq!(view.xdp[0].mode, AttachMode::Native);
    let programs = relay_user::xdp_links::loaded_programs();
    assert_eq!(
        programs.get(&view.xdp[0].prog_id).map(|p| p.name.as_str()),
        Some("homerelay_pass")
    );
    drop(guard);

    assert_eq!(
        tb.run_in(Host::Relay, || inspect("hr-none0")).unwrap(),
        None
    );
}

#[test]
fn the_probe_forwards_through_test_runs_and_attaches_nothing() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).unwrap();
    let both = vec![
        netns::RELAY_IF_HOME.to_owned(),
        netns::RELAY_IF_OFFICE.to_owned(),
    ];
    let report = tb
        .run_in(Host::Relay, move || probe(&both))
        .expect("the program loads and forwards");
    assert_eq!(report.runs.len(), 2);
    assert_eq!(report.jitted, Some(true), "this kernel has the JIT on");
    for run in &report.runs {
        assert_eq!(
            (run.forwarded, run.unknown),
            (XDP_REDIRECT, XDP_PASS),
            "{run:?}"
        );
        assert_ne!(run.ingress, run.egress);
    }
    // The kernel's own count of the maps' memory, against the estimate from capacities.
    let estimate = map_memory_estimate(possible_cpus());
    assert!(
        report.memory.abs_diff(estimate) < estimate / 10,
        "measured {} bytes, estimated {estimate}",
        report.memory
    );

    let one = vec![netns::RELAY_IF_HOME.to_owned()];
    let report = tb.run_in(Host::Relay, move || probe(&one)).unwrap();
    assert_eq!(report.runs[0].forwarded, XDP_TX);

    // Nothing attached, nothing left pinned.
    for iface in [netns::RELAY_IF_HOME, netns::RELAY_IF_OFFICE] {
        let link = tb
            .run_in(Host::Relay, move || inspect(iface))
            .unwrap()
            .unwrap();
        assert!(link.xdp.is_empty(), "{link:?}");
    }
    assert_eq!(probe_dirs(), Vec::<String>::new());

    let missing = vec!["hr-none0".to_owned()];
    let e = tb
        .run_in(Host::Relay, move || probe(&missing))
        .expect_err("no such interface");
    assert_eq!(e.stage, ProbeStage::Setup);
    assert!(e.message.contains("hr-none0"), "{e}");
}
