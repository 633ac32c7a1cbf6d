//! The channel service over the real XDP fast path (generic mode) in the namespace testbed: a
//! home device whose address the relay learns, an office phone given strictly. The watch stream
//! must report the latch and the move to the fast path, and the final counters must include
//! what XDP forwarded. Needs root (BPF, XDP, network namespaces) and fails loudly without it.
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use common::within;
use control::config::LayoutName;
use control::daemon::DaemonBuilder;
use control::host::HostTable;
use control::service::{Latch, Watcher};
use relay_common::LEG_A;
use relay_core::allocator::{Kind, Request};
use relay_core::{ChannelSpec, ChannelState, EventKind, LegSpec};
use relay_user::Relay;
use relay_user::forward::Component;
use relay_user::netns::{self, Host, Testbed, TestbedOptions};
use relay_user::xdp::XdpMode;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, XDP, network namespaces); run the README's test command as root"
    );
}

/// Removes the bpffs pin directory on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn next_event(w: &mut Watcher) -> control::service::Event {
    within(w.next())
        .await
        .expect("the stream is open")
        .expect("no lag")
}

/// Sends `n` datagrams from `from` to `to` and receives them at `at`, checking the source.
async fn relay_through(
    from: &UdpSocket,
    to: SocketAddr,
    at: &UdpSocket,
    expect_from: SocketAddr,
    n: u32,
) {
    let (from, at) = (
        from.try_clone().expect("clone"),
        at.try_clone().expect("clone"),
    );
    within(tokio::task::spawn_blocking(move || {
        at.set_read_timeout(Some(common::WAIT)).expect("timeout");
        let mut buf = [0u8; 256];
        for i in 0..n {
            // RTP (a source latches only with RTP or RTCP) numbered `i`.
            let packet = common::rtp(i as u8, 16 + (i as usize % 64));
            from.send_to(&packet, to).expect("send");
            let (len, src) = at.recv_from(&mut buf).expect("relayed within the timeout");
            assert_eq!((&buf[..len], src), (&packet[..], expect_from));
        }
    }))
    .await
    .expect("join");
}

/// The relay namespace's addresses (the daemon runs here, its relay there).
fn relay_host(tb: &Testbed) -> HostTable {
    let ns = tb.ns(Host::Relay).to_owned();
    HostTable::with_reader(Box::new(move || {
        netns::run_in_named(&ns, if_addrs::get_if_addrs)
            .map_err(std::io::Error::other)
            .and_then(|r| r)
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latching_moves_the_channel_to_the_fast_path_and_the_watch_stream_says_so() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir(format!("/sys/fs/bpf/homerelay-control-test-{}", std::process::id()).into());
    let state = tempfile::tempdir().expect("state directory");
    let config = testbed_config(&pin.0, state.path());
    // The relay's sockets and XDP attachments live in the relay namespace.
    let daemon = DaemonBuilder::new(config)
        .seed(3)
        .start_relay_with(|options| tb.run_in(Host::Relay, move || Relay::start(options)))
        .host_addresses(relay_host(&tb))
        .build()
        .expect("the daemon with its fast path");
    let service = daemon.service;
    let relay = daemon.relay.expect("a relay");
    assert_eq!(service.pool().await.unwrap().data_path, "xdp");
    let mut watcher = service.watch();

    let home_addr: SocketAddr = (netns::HOME_ADDR, 5004).into();
    let office_addr: SocketAddr = (netns::OFFICE_ADDR, 6000).into();
    let home = tb.run_in(Host::Home, move || {
        UdpSocket::bind(home_addr).expect("bind home")
    });
    let office = tb.run_in(Host::Office, move || {
        UdpSocket::bind(office_addr).expect("bind office")
    });

    let (view, created) = service
        .allocate(
            Request::new("fast-call", "t", Kind::SystemDevice),
            home_learnt_office_strict(office_addr),
        )
        .await
        .expect("allocate");
    assert!(created);
    assert_eq!(view.state, ChannelState::Waiting);
    let port = view.port();
    assert_eq!(next_event(&mut watcher).await.kind, EventKind::Allocated);

    let relay_home: SocketAddr = (netns::RELAY_HOME_ADDR, port).into();
    let relay_office: SocketAddr = (netns::RELAY_OFFICE_ADDR, port).into();
    // The first packet latches the home leg in user space; the rest may take the fast path.
    relay_through(&home, relay_home, &office, relay_office, 5).await;

    let latched = next_event(&mut watcher).await;
    assert_eq!(latched.kind, EventKind::Latched);
    assert_eq!(
        latched.latch,
        Some(Latch {
            leg: LEG_A,
            component: Component::Rtp,
            source: home_addr,
        })
    );
    let fast = next_event(&mut watcher).await;
    assert_eq!(fast.kind, EventKind::FastPath, "{fast:?}");
    assert_eq!(fast.channel.state, ChannelState::FastPath);

    relay_through(&office, relay_office, &home, relay_home, 50).await;
    let xdp = relay.xdp().expect("fast path running");
    let forwarded: u64 = xdp
        .counters()
        .expect("counters")
        .iter()
        .filter(|(c, _)| c.is_forwarded())
        .map(|(_, n)| n)
        .sum();
    assert!(
        forwarded >= 50,
        "the fast path forwarded {forwarded} packets"
    );

    let (released, _) = service
        .release(control::service::ChannelRef::Port(port))
        .await
        .expect("release");
    let stats = released.stats.from_leg;
    assert_eq!(
        (stats[0].packets, stats[1].packets),
        (5, 50),
        "both paths counted"
    );
    assert_eq!(next_event(&mut watcher).await.kind, EventKind::Released);

    service.shutdown().await;
    drop(service);
    let relay = Arc::try_unwrap(relay).expect("the service let go of the relay");
    drop(relay);
    drop(pin);
    drop(tb);
}

/// A call whose home leg is learnt from traffic and whose office leg is given strictly.
fn home_learnt_office_strict(office: SocketAddr) -> ChannelSpec {
    ChannelSpec {
        legs: [
            LegSpec::default(),
            LegSpec {
                rtp: Some(office),
                strict: true,
                ..LegSpec::default()
            },
        ],
        ..ChannelSpec::default()
    }
}

/// Retries `f` while its error says a lock (state database, pin directory) is held: between
/// `fork` and `exec` of a command another test runs (the testbeds run `ip`), the child holds a
/// copy of every descriptor, so a lock just released by the previous run stays held for a
/// moment. The daemon itself never forks.
fn retry_while_held<T, E: std::fmt::Display>(mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        match f() {
            Err(e)
                if format!("{e:#}").contains("in use") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// The daemon's configuration for the testbed: XDP (generic) on the relay's two links.
fn testbed_config(pin_dir: &std::path::Path, state: &std::path::Path) -> control::config::Config {
    let mut config = control::config::Config::default();
    config.relay.layout = Some(LayoutName::Custom);
    config.relay.ports = Some("30528-30547".into());
    config.relay.capacity = Some(10);
    config.relay.workers = 1;
    config.relay.internet_address = Some(netns::RELAY_HOME_ADDR);
    config.relay.lan_address = Some(netns::RELAY_OFFICE_ADDR);
    config.xdp.interfaces = vec![netns::RELAY_IF_HOME.into(), netns::RELAY_IF_OFFICE.into()];
    config.xdp.mode = XdpMode::Generic;
    config.xdp.pin_dir = pin_dir.to_owned();
    config.xdp.require = true;
    config.store.path = state.join("homerelay.db");
    config
}

fn forwarded_by_xdp(relay: &Relay) -> u64 {
    relay
        .xdp()
        .expect("fast path running")
        .counters()
        .expect("counters")
        .iter()
        .filter(|(c, _)| c.is_forwarded())
        .map(|(_, n)| n)
        .sum()
}

/// A restart keeps the call: the daemon stops keeping its channels (pinned maps + state
/// database), a new one takes the channel over from the pinned maps with its latched source,
/// the same id and port, and the fast path forwards its media at once, without a new latch.
/// A channel in the pinned maps that no record explains is removed; ids stay unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_adopts_the_pinned_channel_and_the_call_goes_on_in_the_fast_path() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir(
        format!(
            "/sys/fs/bpf/homerelay-control-restart-{}",
            std::process::id()
        )
        .into(),
    );
    let state = tempfile::tempdir().expect("state directory");
    let config = testbed_config(&pin.0, state.path());

    let home_addr: SocketAddr = (netns::HOME_ADDR, 5004).into();
    let office_addr: SocketAddr = (netns::OFFICE_ADDR, 6000).into();
    let home = tb.run_in(Host::Home, move || {
        UdpSocket::bind(home_addr).expect("bind home")
    });
    let office = tb.run_in(Host::Office, move || {
        UdpSocket::bind(office_addr).expect("bind office")
    });
    let spec = home_learnt_office_strict;

    // First run: a latched call in the fast path, and a second channel.
    let first = DaemonBuilder::new(config.clone())
        .seed(5)
        .start_relay_with(|options| tb.run_in(Host::Relay, move || Relay::start(options)))
        .host_addresses(relay_host(&tb))
        .build()
        .expect("first daemon");
    let service = first.service;
    let mut watcher = service.watch();
    let (call, _) = service
        .allocate(
            Request::new("kept-call", "t", Kind::SystemDevice),
            spec(office_addr),
        )
        .await
        .expect("allocate");
    let (stray, _) = service
        .allocate(
            Request::new("stray-call", "t", Kind::SystemDevice),
            spec((netns::OFFICE_ADDR, 6002).into()),
        )
        .await
        .expect("allocate");
    let port = call.port();
    let relay_home: SocketAddr = (netns::RELAY_HOME_ADDR, port).into();
    let relay_office: SocketAddr = (netns::RELAY_OFFICE_ADDR, port).into();
    relay_through(&home, relay_home, &office, relay_office, 3).await;
    loop {
        let e = next_event(&mut watcher).await;
        if e.kind == EventKind::FastPath && e.channel.port() == port {
            break;
        }
    }
    let instance = service.pool().await.expect("pool").instance.id;
    service.shutdown_keeping_channels().await;
    drop(service);
    let relay = Arc::try_unwrap(first.relay.expect("relay")).expect("the service let go");
    drop(relay);

    // Between the runs the stray channel's record goes (as if its release was the last
    // thing written): the next run must remove it from the pinned maps.
    {
        let mut store = retry_while_held(|| relay_store::Store::open(&config.store.path))
            .expect("the store is free");
        store
            .apply(&[relay_store::ChannelOp::Delete {
                addr_index: 0,
                port: stray.port(),
            }])
            .expect("delete");
    }

    // Second run on the same pin directory and state database.
    let second = retry_while_held(|| {
        DaemonBuilder::new(config.clone())
            .seed(6)
            .start_relay_with(|options| tb.run_in(Host::Relay, move || Relay::start(options)))
            .host_addresses(relay_host(&tb))
            .host_addresses(relay_host(&tb))
            .build()
    })
    .expect("second daemon");
    let service = second.service;
    let relay = second.relay.expect("relay");
    let pool = service.pool().await.expect("pool");
    assert_ne!(pool.instance.id, instance, "a new instance");
    assert_eq!(pool.instance.adopted, 1);
    assert_eq!(pool.status.in_use, 1);
    assert!(
        relay.inherited().is_empty(),
        "every inherited channel was decided"
    );
    assert!(
        relay_user::DataPath::channel(relay.xdp().expect("xdp"), stray.port()).is_err(),
        "the channel no record explains left the fast path"
    );
    let kept = service
        .get(control::service::ChannelRef::Port(port))
        .await
        .expect("the call's channel is kept");
    assert_eq!(kept.info.id, call.info.id);
    assert_eq!(kept.info.call_id, "kept-call");
    assert_eq!(kept.state, ChannelState::FastPath, "{kept:?}");
    assert_eq!(
        kept.channel.legs[LEG_A].rtp.socket_addr(),
        Some(home_addr),
        "the latched source is kept"
    );

    // The media goes on through XDP, both ways, without a new latch.
    let before = forwarded_by_xdp(&relay);
    relay_through(&office, relay_office, &home, relay_home, 20).await;
    relay_through(&home, relay_home, &office, relay_office, 20).await;
    assert!(
        forwarded_by_xdp(&relay) - before >= 40,
        "the fast path forwards the kept call"
    );
    let (next, _) = service
        .allocate(
            Request::new("new-call", "t", Kind::SystemDevice),
            spec((netns::OFFICE_ADDR, 6004).into()),
        )
        .await
        .expect("allocate");
    assert!(
        next.info.id > call.info.id && next.info.id > stray.info.id,
        "ids are never reused"
    );

    service.shutdown().await;
    drop(service);
    drop(Arc::try_unwrap(relay).expect("the service let go of the relay"));
    drop(pin);
    drop(tb);
}

/// The fast path's health as the gRPC health service reports it; -1 before its first
/// reading (the service is registered a moment after the server starts).
async fn fast_path_health(
    health: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
) -> i32 {
    match health
        .check(tonic_health::pb::HealthCheckRequest {
            service: control::server::FAST_PATH_HEALTH.into(),
        })
        .await
    {
        Ok(r) => r.into_inner().status,
        Err(s) if s.code() == tonic::Code::NotFound => -1,
        Err(s) => panic!("health check: {s:?}"),
    }
}

/// Polls `f` every 100 ms until it returns true, for at most [`common::WAIT`].
async fn eventually<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
    let deadline = std::time::Instant::now() + common::WAIT;
    while std::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_without_a_next_hop_degrades_the_fast_path_in_status_and_health() {
    use tonic_health::pb::health_check_response::ServingStatus;
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let pin = PinDir(
        format!(
            "/sys/fs/bpf/homerelay-control-degraded-{}",
            std::process::id()
        )
        .into(),
    );
    let state = tempfile::tempdir().expect("state directory");
    let daemon = DaemonBuilder::new(testbed_config(&pin.0, state.path()))
        .seed(5)
        .start_relay_with(|options| tb.run_in(Host::Relay, move || Relay::start(options)))
        .host_addresses(relay_host(&tb))
        .build()
        .expect("the daemon with its fast path");
    let service = daemon.service;
    let _relay = daemon.relay.expect("a relay");
    // The API (health included) on this namespace's loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the API");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control::server::serve_with(
        listener,
        service.clone(),
        control::server::Credentials::new(&control::server::Security::default())
            .expect("credentials"),
        control::server::Limits::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    );
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    assert!(
        eventually(|| {
            let mut h = health.clone();
            async move { fast_path_health(&mut h).await == serving }
        })
        .await,
        "the fast path never reported SERVING"
    );
    assert_eq!(service.pool().await.expect("pool").fast_path_degraded, None);

    // An office peer on the relay's subnet that does not exist: its neighbour never resolves,
    // so the fast path cannot send to it and the channel's packets would go up.
    let ghost: SocketAddr = (std::net::Ipv4Addr::new(192, 0, 2, 99), 6000).into();
    let (view, _) = service
        .allocate(
            Request::new("ghost-call", "t", Kind::SystemDevice),
            home_learnt_office_strict(ghost),
        )
        .await
        .expect("allocate");
    let svc = service.clone();
    assert!(
        eventually(|| {
            let svc = svc.clone();
            async move {
                svc.pool().await.is_ok_and(|p| {
                    p.fast_path_degraded
                        .is_some_and(|w| w.contains("192.0.2.99"))
                })
            }
        })
        .await,
        "PoolStatus never said the fast path is degraded: {:?}",
        service.pool().await
    );
    assert!(
        eventually(|| {
            let mut h = health.clone();
            async move { fast_path_health(&mut h).await == not_serving }
        })
        .await,
        "health never reported the degraded fast path"
    );
    // The API's own health does not depend on it.
    let api = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(api, serving);

    // Released: healthy again.
    service
        .release(control::service::ChannelRef::Port(view.port()))
        .await
        .expect("release");
    assert!(
        eventually(|| {
            let mut h = health.clone();
            async move { fast_path_health(&mut h).await == serving }
        })
        .await,
        "the fast path never reported SERVING again: {:?}",
        service.pool().await
    );
    let _ = stop.send(());
    server.await.expect("join").expect("serve");
    service.shutdown().await;
}
