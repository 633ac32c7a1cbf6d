//! The STUN server's sockets (docs/stun.md): UDP and TCP (RFC 5389 framing) on `[stun] listen`,
//! and with `other_address` the four UDP combinations of the two IPs and ports that RFC 5780
//! behaviour discovery needs (TCP listens on both addresses). Every decision is
//! `relay_core::stun`'s; this module only moves bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use relay_core::stun::{Addresses, Decision, HEADER_LEN, MAX_REQUEST_LEN, Server, Transport};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::config::StunSection;

/// TCP connections served at once; more wait in the kernel's backlog.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection idle this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// The bound sockets, ready to serve.
#[derive(Debug)]
pub struct StunServer {
    core: Arc<Mutex<Server>>,
    start: Instant,
    udp: HashMap<SocketAddr, Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
}

impl StunServer {
    /// Binds every socket of `section` (which must have `listen`).
    pub async fn bind(section: &StunSection) -> anyhow::Result<StunServer> {
        let listen = section.listen.context("stun.listen is not set")?;
        let mut udp_addrs = vec![listen];
        let mut tcp_addrs = vec![listen];
        if let Some(other) = section.other_address {
            udp_addrs.extend([
                SocketAddr::new(listen.ip(), other.port()),
                SocketAddr::new(other.ip(), listen.port()),
                other,
            ]);
            tcp_addrs.push(other);
        }
        let mut udp = HashMap::new();
        for addr in udp_addrs {
            let s = UdpSocket::bind(addr).await.with_context(|| {
                format!("binding STUN on UDP {addr} (stun.listen/other_address)")
            })?;
            udp.insert(addr, Arc::new(s));
        }
        let mut tcp = Vec::new();
        for addr in tcp_addrs {
            tcp.push(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding STUN on TCP {addr}"))?,
            );
        }
        // With port 0 in the configuration (tests), `listen` is what the kernel chose.
        let primary = udp
            .get(&listen)
            .map(|s| s.local_addr())
            .transpose()?
            .unwrap_or(listen);
        let addresses = Addresses {
            primary,
            other: section.other_address,
        };
        Ok(StunServer {
            core: Arc::new(Mutex::new(Server::new(addresses, section.rate()))),
            start: Instant::now(),
            udp,
            tcp,
        })
    }

    /// The UDP addresses bound.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .values()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// The TCP addresses bound.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut tasks = tokio::task::JoinSet::new();
        let by_local: Arc<HashMap<SocketAddr, Arc<UdpSocket>>> = Arc::new(
            self.udp
                .values()
                .filter_map(|s| Some((s.local_addr().ok()?, s.clone())))
                .collect(),
        );
        for socket in self.udp.values() {
            tasks.spawn(serve_udp(
                socket.clone(),
                by_local.clone(),
                self.core.clone(),
                self.start,
            ));
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
        for listener in self.tcp {
            tasks.spawn(serve_tcp(
                listener,
                permits.clone(),
                self.core.clone(),
                self.start,
            ));
        }
        shutdown.await;
        tasks.abort_all();
    }
}

fn decide(
    core: &Mutex<Server>,
    start: Instant,
    request: &[u8],
    source: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) -> Decision {
    let mut core = match core.lock() {
        Ok(c) => c,
        Err(poisoned) => poisoned.into_inner(),
    };
    core.handle(request, source, local, transport, start.elapsed())
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    by_local: Arc<HashMap<SocketAddr, Arc<UdpSocket>>>,
    core: Arc<Mutex<Server>>,
    start: Instant,
) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    // One byte more than the largest request, so a longer datagram is seen as too long.
    let mut buf = vec![0u8; MAX_REQUEST_LEN + 1];
    loop {
        let Ok((n, source)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        match decide(&core, start, &buf[..n], source, local, Transport::Udp) {
            Decision::Respond { bytes, from } => {
                if let Some(out) = by_local.get(&from) {
                    let _ = out.send_to(&bytes, source).await;
                }
            }
            Decision::Drop(reason) => {
                log::trace!("STUN from {source}: dropped ({})", reason.name())
            }
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    core: Arc<Mutex<Server>>,
    start: Instant,
) {
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, source)) = listener.accept().await else {
            continue;
        };
        let core = core.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve_tcp_connection(stream, source, &core, start).await;
        });
    }
}

/// One TCP connection: STUN messages framed by their own length field (RFC 5389 §7.2.2).
/// Anything the core drops ends the connection.
async fn serve_tcp_connection(
    mut stream: TcpStream,
    source: SocketAddr,
    core: &Mutex<Server>,
    start: Instant,
) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let mut buf = vec![0u8; MAX_REQUEST_LEN];
    loop {
        let header = &mut buf[..HEADER_LEN];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(header)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let body = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if HEADER_LEN + body > MAX_REQUEST_LEN {
            return Ok(());
        }
        let rest = &mut buf[HEADER_LEN..HEADER_LEN + body];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(rest)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let request = &buf[..HEADER_LEN + body];
        match decide(core, start, request, source, local, Transport::Tcp) {
            Decision::Respond { bytes, .. } => stream.write_all(&bytes).await?,
            Decision::Drop(reason) => {
                log::trace!("STUN over TCP from {source}: dropped ({})", reason.name());
                return Ok(());
            }
        }
    }
}
