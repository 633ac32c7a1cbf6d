//! Hostile and broken API clients against a real server on loopback: oversized requests,
//! unbounded filters, too many connections, silent TLS clients, shutdown with many open
//! streams, credentials rotated while the server runs, and channels naming addresses that would
//! turn the relay on itself. Relay ports 42400–42499.
mod common;

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Setup, TestServer, WAIT, allocate_request, within};
use control::client::Connection;
use control::config::{ApiSection, TlsSection};
use control::server::{self, Credentials, Security, ServeError};
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A temporary directory, deleted on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("homerelay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("write");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and a server certificate for `localhost` signed by it: (CA PEM, cert PEM, key PEM).
fn pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("sign");
    (ca_pem, cert.pem(), key.serialize_pem())
}

/// A TLS connection to `port` on localhost trusting `ca`, with `token`.
fn tls_connection(port: u16, ca: &Path, token: Option<&str>) -> Connection {
    Connection {
        server: format!("https://localhost:{port}"),
        token: token.map(str::to_owned),
        token_file: None,
        token_flag: None,
        ca_cert: Some(ca.to_owned()),
        cert: None,
        key: None,
        json: false,
    }
}

async fn plain_channel(server: &TestServer) -> Channel {
    within(
        Endpoint::from_shared(server.url.clone())
            .expect("url")
            .connect(),
    )
    .await
    .expect("connect")
}

#[test]
fn a_bearer_token_on_a_public_address_needs_tls() {
    let public: SocketAddr = "192.0.2.1:4080".parse().expect("addr");
    let token = Credentials::new(&Security {
        token: Some("test-token-0123456789abcdef".into()),
        ..Security::default()
    })
    .expect("credentials");
    let e = server::check_exposure(public, &token).expect_err("token in clear");
    assert!(matches!(e, ServeError::TokenWithoutTls { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(
            "refusing to serve the API on 192.0.2.1:4080 with a bearer token but without TLS: \
             plain HTTP/2 would carry the token in clear"
        ),
        "{e}"
    );
    // On loopback the token never leaves the host.
    server::check_exposure("127.0.0.1:4080".parse().expect("addr"), &token).expect("loopback");
    let (_, cert, key) = pki();
    let with_tls = Credentials::new(&Security {
        token: Some("test-token-0123456789abcdef".into()),
        tls: Some(server::TlsPem {
            cert: cert.into_bytes(),
            key: key.into_bytes(),
            client_ca: None,
        }),
        ..Security::default()
    })
    .expect("credentials");
    server::check_exposure(public, &with_tls).expect("token over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_resource_exhausted() {
    let server = TestServer::start(Setup::new(42400, 42409)).await;
    let mut client = server.client().await;
    let mut request = allocate_request(&"x".repeat(100 * 1024), pb::ChannelKind::SipDevice);
    let e = client
        .allocate(request.clone())
        .await
        .expect_err("100 KiB request");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(
        e.message(),
        "request message too large: the limit is 65536 bytes"
    );
    // Streams and the open health service have the same limit.
    let e = client
        .watch(pb::WatchRequest {
            kinds: vec![1; 70 * 1024],
        })
        .await
        .expect_err("70 KiB watch request");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let mut health = HealthClient::new(plain_channel(&server).await);
    let e = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "h".repeat(80 * 1024),
        })
        .await
        .expect_err("80 KiB health check");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // The same connection goes on serving requests of a sane size.
    if let Some(leg) = request.call_leg.as_mut() {
        leg.call_id = "small".into();
    }
    client.allocate(request).await.expect("a normal request");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_watch_filters_are_bounded() {
    let server = TestServer::start(Setup::new(42410, 42419)).await;
    let mut client = server.client().await;
    let cases = [
        (
            pb::ListRequest {
                kinds: vec![pb::ChannelKind::SipDevice as i32; 6],
                ..Default::default()
            },
            "kinds: 6 entries, more than the 5 kinds there are",
        ),
        (
            pb::ListRequest {
                states: vec![pb::ChannelState::Waiting as i32; 1000],
                ..Default::default()
            },
            "states: 1000 entries, more than the 3 states there are",
        ),
        (
            pb::ListRequest {
                page_size: 1_000_000,
                ..Default::default()
            },
            "page_size: 1000000 is more than 1000",
        ),
    ];
    for (request, message) in cases {
        let e = client.list(request).await.expect_err(message);
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
    }
    let e = client
        .watch(pb::WatchRequest {
            kinds: vec![pb::ChannelKind::ItspCall as i32; 100],
        })
        .await
        .expect_err("100 kinds");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "kinds: 100 entries, more than the 5 kinds there are"
        )
    );
    // Every kind once is fine.
    client
        .list(pb::ListRequest {
            kinds: (1..=5).collect(),
            states: (1..=3).collect(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("a full filter");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed() {
    let mut setup = Setup::new(42420, 42429);
    setup.limits.max_connections = 2;
    let server = TestServer::start(setup).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = ChannelServiceClient::new(plain_channel(&server).await);
        c.pool_status(pb::PoolStatusRequest {})
            .await
            .expect("within the cap");
        held.push(c);
    }
    // A third connection is closed at once: its call fails, whatever the moment of failure.
    let third = match within(
        Endpoint::from_shared(server.url.clone())
            .expect("url")
            .connect(),
    )
    .await
    {
        Err(_) => true,
        Ok(channel) => {
            within(ChannelServiceClient::new(channel).pool_status(pb::PoolStatusRequest {}))
                .await
                .is_err()
        }
    };
    assert!(
        third,
        "a connection beyond api.max_connections must not be served"
    );
    // The held ones are unaffected.
    held[1]
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect("held connection");
    // A closed connection frees its slot.
    held.remove(0);
    let deadline = Instant::now() + WAIT;
    loop {
        let served = match Endpoint::from_shared(server.url.clone())
            .expect("url")
            .connect()
            .await
        {
            Ok(channel) => ChannelServiceClient::new(channel)
                .pool_status(pb::PoolStatusRequest {})
                .await
                .is_ok(),
            Err(_) => false,
        };
        if served {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    server.stop().await;
}

/// The HTTP/2 stream limit is announced in the server's SETTINGS (clients queue beyond it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_announces_its_stream_limit() {
    let mut setup = Setup::new(42430, 42439);
    setup.limits.max_concurrent_streams = 7;
    let server = TestServer::start(setup).await;
    let addr = server.addr;
    let settings = within(tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .expect("preface");
        // An empty SETTINGS frame.
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).expect("settings");
        let mut header = [0u8; 9];
        s.read_exact(&mut header).expect("frame header");
        assert_eq!(header[3], 4, "the server's first frame is SETTINGS");
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).expect("settings payload");
        payload
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect::<Vec<_>>()
    }))
    .await
    .expect("join");
    // SETTINGS_MAX_CONCURRENT_STREAMS (3) and SETTINGS_MAX_HEADER_LIST_SIZE (6).
    assert!(settings.contains(&(3, 7)), "{settings:?}");
    assert!(
        settings.contains(&(6, server::MAX_HEADER_LIST_SIZE)),
        "{settings:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_speaks_tls_is_dropped_after_the_handshake_timeout() {
    let dir = TempDir::new("handshake");
    let (ca, cert, key) = pki();
    let ca_file = dir.write("ca.pem", &ca);
    let mut setup = Setup::new(42440, 42449);
    setup.security.tls = Some(server::TlsPem {
        cert: cert.into_bytes(),
        key: key.into_bytes(),
        client_ca: None,
    });
    setup.limits.tls_handshake_timeout = Duration::from_millis(200);
    let server = TestServer::start(setup).await;
    let addr = server.addr;
    // Opens TCP and says nothing.
    let silent = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut buf = [0u8; 64];
        // EOF (or a reset): the server closed it. A read timeout would be an error here.
        match s.read(&mut buf) {
            Ok(n) => assert_eq!(
                n, 0,
                "the server sent data to a client that never spoke TLS"
            ),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "the silent connection was not closed: {e}"
            ),
        }
    });
    // Meanwhile a real client is served: handshakes do not wait for each other.
    let mut client = within(control::client::connect(&tls_connection(
        addr.port(),
        &ca_file,
        None,
    )))
    .await
    .expect("TLS client");
    client
        .pool_status(pb::PoolStatusRequest {})
        .await
        .expect("served over TLS");
    within(silent).await.expect("silent client checked");
    server.stop().await;
}

/// Shutdown with 1,000 channel Watch streams and health Watch streams open: every stream is
/// ended by the shutdown itself (the grace period is far longer than the bound asserted), and
/// health watchers see NOT_SERVING before their stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_thousand_watch_streams_and_health_watches() {
    const CONNECTIONS: usize = 10;
    const PER_CONNECTION: usize = 100;
    let mut setup = Setup::new(42450, 42459);
    setup.limits.shutdown_grace = Duration::from_millis(200);
    let server = TestServer::start(setup).await;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = plain_channel(&server).await;
        tasks.push(tokio::spawn(async move {
            let mut streams = Vec::new();
            for _ in 0..PER_CONNECTION {
                let stream = ChannelServiceClient::new(channel.clone())
                    .watch(pb::WatchRequest::default())
                    .await
                    .expect("watch")
                    .into_inner();
                streams.push(stream);
            }
            streams
        }));
    }
    let mut watches = Vec::new();
    for t in tasks {
        watches.extend(within(t).await.expect("join"));
    }
    assert_eq!(watches.len(), CONNECTIONS * PER_CONNECTION);
    let health_channel = plain_channel(&server).await;
    let mut health_watches = Vec::new();
    for service in ["", "relay.v1.ChannelService", "", "relay.v1.ChannelService"] {
        let mut stream = HealthClient::new(health_channel.clone())
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let first = within(stream.message())
            .await
            .expect("health status")
            .expect("a first status");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        health_watches.push(stream);
    }

    let start = Instant::now();
    server.stop().await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with 1,000 Watch streams open"
    );
    for mut w in watches {
        // Ended cleanly or with a status, never left open.
        while let Ok(Some(_)) = within(w.message()).await {}
    }
    for mut h in health_watches {
        let mut last = None;
        loop {
            match within(h.message()).await {
                Ok(Some(m)) => last = Some(m.status),
                Ok(None) => break,
                Err(e) => panic!("health watch ended with an error: {e:?}"),
            }
        }
        assert_eq!(last, Some(ServingStatus::NotServing as i32));
    }
}

async fn pool_with(channel: &Channel, token: &'static str) -> Result<(), tonic::Status> {
    let mut client =
        ChannelServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("ascii"),
            );
            Ok(r)
        });
    client
        .pool_status(pb::PoolStatusRequest {})
        .await
        .map(|_| ())
}

const TOKEN_A: &str = "token-a-0123456789abcdef";
const TOKEN_B: &str = "token-b-0123456789abcdef";

/// The token file is read again by the function the SIGHUP handler calls; a bad file leaves the
/// token in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_rotates_the_token_and_keeps_it_on_errors() {
    let dir = TempDir::new("reload-token");
    let token_file = dir.write("token", &format!("{TOKEN_A}\n"));
    let api = ApiSection {
        listen: (Ipv4Addr::LOCALHOST, 0).into(),
        require_auth: true,
        token_file: Some(token_file.clone()),
        ..ApiSection::default()
    };
    let credentials = Credentials::load(&api).expect("credentials");
    let mut setup = Setup::new(42460, 42469);
    setup.credentials = Some(credentials.clone());
    let server = TestServer::start(setup).await;
    let channel = plain_channel(&server).await;
    pool_with(&channel, TOKEN_A).await.expect("token A");
    assert_eq!(
        pool_with(&channel, TOKEN_B).await.expect_err("B").code(),
        Code::Unauthenticated
    );

    std::fs::write(&token_file, TOKEN_B).expect("rewrite");
    credentials.reload_and_log();
    let e = pool_with(&channel, TOKEN_A).await.expect_err("A is gone");
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unauthenticated, "invalid bearer token")
    );
    pool_with(&channel, TOKEN_B).await.expect("token B");

    // A broken file: the reload fails, saying why, and B stays in force.
    std::fs::write(&token_file, "short").expect("rewrite");
    let e = credentials.reload().expect_err("too short");
    assert!(e.to_string().starts_with("api.token_file: "), "{e}");
    std::fs::remove_file(&token_file).expect("remove");
    let e = credentials.reload().expect_err("missing");
    assert!(e.to_string().contains("reading"), "{e}");
    pool_with(&channel, TOKEN_B).await.expect("B still");
    server.stop().await;
}

/// The TLS certificate and key are read again on reload: new connections get the new
/// certificate; a broken key keeps the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_rotates_the_tls_certificate() {
    let dir = TempDir::new("reload-tls");
    let (ca1, cert1, key1) = pki();
    let (ca2, cert2, key2) = pki();
    let ca1_file = dir.write("ca1.pem", &ca1);
    let ca2_file = dir.write("ca2.pem", &ca2);
    let cert_file = dir.write("cert.pem", &cert1);
    let key_file = dir.write("key.pem", &key1);
    let token_file = dir.write("token", TOKEN_A);
    let api = ApiSection {
        listen: (Ipv4Addr::LOCALHOST, 0).into(),
        token_file: Some(token_file.clone()),
        tls: Some(TlsSection {
            cert: cert_file.clone(),
            key: key_file.clone(),
            client_ca: None,
        }),
        ..ApiSection::default()
    };
    let credentials = Credentials::load(&api).expect("credentials");
    let mut setup = Setup::new(42470, 42479);
    setup.credentials = Some(credentials.clone());
    let server = TestServer::start(setup).await;
    let port = server.addr.port();
    let served = |ca: PathBuf, token: &'static str| async move {
        match within(control::client::connect(&tls_connection(
            port,
            &ca,
            Some(token),
        )))
        .await
        {
            Ok(mut c) => c.pool_status(pb::PoolStatusRequest {}).await.is_ok(),
            Err(_) => false,
        }
    };
    assert!(served(ca1_file.clone(), TOKEN_A).await, "certificate 1");
    assert!(
        !served(ca2_file.clone(), TOKEN_A).await,
        "not yet certificate 2"
    );

    std::fs::write(&cert_file, &cert2).expect("rewrite");
    std::fs::write(&key_file, &key2).expect("rewrite");
    std::fs::write(&token_file, TOKEN_B).expect("rewrite");
    credentials.reload().expect("reload");
    assert!(served(ca2_file.clone(), TOKEN_B).await, "certificate 2");
    assert!(
        !served(ca1_file.clone(), TOKEN_B).await,
        "certificate 1 is gone"
    );
    assert!(!served(ca2_file.clone(), TOKEN_A).await, "token A is gone");

    // A key that does not match the certificate: nothing changes.
    std::fs::write(&key_file, &key1).expect("rewrite");
    let e = credentials.reload().expect_err("mismatched key");
    assert!(e.to_string().starts_with("TLS configuration: "), "{e}");
    assert!(served(ca2_file, TOKEN_B).await, "certificate 2 still");
    server.stop().await;
}

/// A request that never ends (a reflection stream whose client keeps sending nothing) cannot
/// hold the shutdown: after `shutdown_grace` its connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_requests_still_open_after_the_grace_period() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_response};
    let mut setup = Setup::new(42480, 42489);
    setup.limits.shutdown_grace = Duration::from_millis(200);
    let server = TestServer::start(setup).await;
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .expect("queue");
    let mut responses = ServerReflectionClient::new(plain_channel(&server).await)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("reflection stream")
        .into_inner();
    let first = within(responses.message())
        .await
        .expect("answer")
        .expect("one answer");
    assert!(matches!(
        first.message_response,
        Some(server_reflection_response::MessageResponse::ListServicesResponse(_))
    ));
    // `requests` stays open: the server's handler waits for more. `stop` fails the test if the
    // server is not done within its bound.
    server.stop().await;
    while let Ok(Some(_)) = within(responses.message()).await {}
    drop(requests);
}

#[tokio::test]
async fn addresses_that_would_turn_the_relay_on_itself_are_refused() {
    let mut setup = Setup::new(42490, 42499);
    setup.allow_local_peers = false;
    let server = TestServer::start(setup).await;
    let mut client = ChannelServiceClient::connect(server.url.clone())
        .await
        .expect("connect");
    let leg = |rtp: &str, relay: &str| {
        Some(pb::LegSpec {
            rtp_address: rtp.into(),
            relay_address: relay.into(),
            ..Default::default()
        })
    };
    // (leg B, the field the refusal must name)
    let refused = [
        (leg("127.0.0.1:43990", ""), "leg_b.rtp_address"),
        (leg("224.0.0.1:5004", ""), "leg_b.rtp_address"),
        (leg("255.255.255.255:5004", ""), "leg_b.rtp_address"),
        (leg("0.1.2.3:5004", ""), "leg_b.rtp_address"),
        // TEST-NET-3 is never an address of the machine running the tests.
        (leg("", "203.0.113.77"), "leg_b.relay_address"),
    ];
    for (i, (leg_b, field)) in refused.into_iter().enumerate() {
        let mut r = allocate_request(&format!("refused-{i}"), pb::ChannelKind::SipDevice);
        r.leg_b = leg_b;
        let status = client.allocate(r).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    // Nothing was allocated; a peer at another host and a relay address of this host work.
    let mut r = allocate_request("accepted", pb::ChannelKind::SipDevice);
    r.leg_b = leg("192.0.2.10:6000", "127.0.0.1");
    let ch = client.allocate(r).await.expect("allocate").into_inner();
    assert!(ch.created);
    let pool = server.service.pool().await.expect("pool");
    assert_eq!(pool.status.in_use, 1, "{pool:?}");
    server.stop().await;
}
