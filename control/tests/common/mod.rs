//! A homerelay API server for tests: a user-space-only relay on a test-specific UDP port range
//! on loopback, the channel service, and the gRPC server on 127.0.0.1:0.
//!
//! Each test owns a sub-range of UDP 42000–42999 (relay ports) and of 43000–43999 (peer
//! sockets), so tests run in parallel. Waits are bounded by [`WAIT`]; nothing asserts on timing.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the helpers"
)]

pub mod unit;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use control::config::{Config, LayoutName};
use control::daemon::DaemonBuilder;
use control::server::{self, Credentials, Limits, Security};
use control::service::Service;
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Upper bound of every wait: generous, reached only when something is broken.
pub const WAIT: Duration = Duration::from_secs(10);

/// What a test server is started with.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Relay port range (a custom layout) and capacity.
    pub first_port: u16,
    pub last_port: u16,
    pub capacity: u32,
    pub upstream_kbps: Option<u32>,
    pub media_timeout: Duration,
    pub security: Security,
    /// Live credentials (e.g. read from files, to reload); `None`: from `security`.
    pub credentials: Option<Credentials>,
    pub limits: Limits,
    /// `relay.allow_local_peers`: on, since the peers of these tests are loopback sockets.
    pub allow_local_peers: bool,
}

impl Setup {
    /// Every port pair of `first..=last` usable, no limits, default timeout.
    pub fn new(first_port: u16, last_port: u16) -> Setup {
        Setup {
            first_port,
            last_port,
            capacity: u32::from(last_port - first_port + 1) / 2,
            upstream_kbps: None,
            media_timeout: Duration::from_secs(60),
            security: Security::default(),
            credentials: None,
            limits: Limits::default(),
            allow_local_peers: true,
        }
    }

    /// The daemon configuration of this setup: a user-space relay with one worker, released
    /// ports reusable at once (tests check them by binding), the state database in `state`.
    pub fn config(&self, state: &std::path::Path) -> Config {
        let mut c = Config::default();
        c.relay.layout = Some(LayoutName::Custom);
        c.relay.ports = Some(format!("{}-{}", self.first_port, self.last_port));
        c.relay.capacity = Some(self.capacity);
        c.relay.workers = 1;
        c.pool.upstream_kbps = self.upstream_kbps;
        c.pool.media_timeout = self.media_timeout;
        c.pool.quarantine = Duration::ZERO;
        c.store.path = state.join("homerelay.db");
        c.relay.allow_local_peers = self.allow_local_peers;
        // The fewest key-derivation rounds SCRAM allows: tests create devices in debug builds.
        c.devices.password_iterations = 4096;
        c
    }
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub service: Service,
    /// The state database's directory (removed on drop).
    pub state: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::ServeError>>>,
}

impl TestServer {
    pub async fn start(setup: Setup) -> TestServer {
        let state = tempfile::tempdir().expect("a temporary state directory");
        let service = DaemonBuilder::new(setup.config(state.path()))
            .seed(7)
            .build()
            .expect("start the daemon")
            .service;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the API on loopback");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let credentials = match setup.credentials.clone() {
            Some(c) => c,
            None => Credentials::new(&setup.security).expect("valid test credentials"),
        };
        let task = tokio::spawn(server::serve_with(
            listener,
            service.clone(),
            credentials,
            setup.limits.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            addr,
            url: format!("http://{addr}"),
            service,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A client without credentials.
    pub async fn client(&self) -> ChannelServiceClient<Channel> {
        within(ChannelServiceClient::connect(self.url.clone()))
            .await
            .expect("connect to the test server")
    }

    /// Stops the server and releases every channel.
    pub async fn stop(mut self) {
        self.service.shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            within(task)
                .await
                .expect("server task")
                .expect("server ran cleanly");
        }
    }
}

/// Awaits `f`, failing the test after [`WAIT`].
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("timed out: something is stuck")
}

/// An Allocate request for `call_id` of `kind`, legs learnt from traffic.
pub fn allocate_request(call_id: &str, kind: pb::ChannelKind) -> pb::AllocateRequest {
    pb::AllocateRequest {
        call_leg: Some(pb::CallLeg {
            call_id: call_id.into(),
            leg_tag: "tag".into(),
        }),
        kind: kind as i32,
        ..Default::default()
    }
}

/// A reference to the channel on `port`.
pub fn by_port(port: u32) -> Option<pb::ChannelRef> {
    Some(pb::ChannelRef {
        target: Some(pb::channel_ref::Target::Port(port)),
    })
}

/// Whether a UDP socket can bind `port` on 127.0.0.1 (the relay binds the wildcard address
/// without SO_REUSEADDR, so a bound relay port makes this fail).
pub fn udp_port_free(port: u16) -> bool {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A peer socket on 127.0.0.1:`port` with a read timeout.
pub fn peer(port: u16) -> UdpSocket {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("bind peer {port}: {e}"));
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s
}

/// An RTP packet (version 2, PT 0) of `len` bytes (at least the 12-byte header) with sequence
/// number `seq`: channels latch only on RTP or RTCP unless asked otherwise.
pub fn rtp(seq: u8, len: usize) -> Vec<u8> {
    let mut p = vec![seq; len.max(12)];
    p[..12].copy_from_slice(&[0x80, 0, 0, seq, 0, 0, 0, seq, 0, 0, 0, 7]);
    p
}

/// Receives one datagram (within [`WAIT`]).
pub fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = s
        .recv_from(&mut buf)
        .expect("a datagram within the timeout");
    (buf[..n].to_vec(), from)
}
