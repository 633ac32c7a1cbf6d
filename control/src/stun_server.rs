//! The STUN server's sockets (docs/stun.md): UDP and TCP (RFC 5389 framing) on `[stun] listen`,
//! and with `other_address` the four UDP combinations of the two IPs and ports that RFC 5780
//! behaviour discovery needs (TCP listens on both addresses). Every decision is
//! `relay_core::stun`'s; this module only moves bytes and counts what became of them
//! (`homerelay_stun_*` metrics).
//!
//! The UDP hot path: one task per socket takes up to 64 datagrams (`mmsg::BATCH`) per
//! `recvmmsg`, decides them all under one lock of the core, writing each response into a
//! buffer allocated once, and sends them with one `sendmmsg` (a CHANGE-REQUEST answer that
//! leaves from another socket goes out through that socket). No allocation per datagram; the
//! counters are added once per batch.

mod mmsg;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use relay_core::stun::{
    Addresses, DropReason, HEADER_LEN, MAX_REQUEST_LEN, MAX_RESPONSE_LEN, Outcome, Server,
    Transport, Verdict,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::config::StunSection;
use crate::metrics::{Metrics, StunCounters, StunTally};

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
    counters: StunCounters,
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
            if addr.is_ipv4() {
                if let Err(e) = mmsg::dont_fragment(s.as_raw_fd()) {
                    log::debug!("STUN on UDP {addr}: IP_MTU_DISCOVER: {e}");
                }
            }
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
            counters: StunCounters::noop(),
        })
    }

    /// Counts requests and bytes in `metrics` (`homerelay_stun_*`); without this call
    /// nothing is counted.
    pub fn with_metrics(mut self, metrics: &Metrics) -> StunServer {
        self.counters = metrics.stun();
        self
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
                self.counters.clone(),
            ));
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
        for listener in self.tcp {
            tasks.spawn(serve_tcp(
                listener,
                permits.clone(),
                self.core.clone(),
                self.start,
                self.counters.clone(),
            ));
        }
        shutdown.await;
        tasks.abort_all();
    }
}

fn lock(core: &Mutex<Server>) -> std::sync::MutexGuard<'_, Server> {
    match core.lock() {
        Ok(c) => c,
        Err(poisoned) => poisoned.into_inner(),
    }
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    by_local: Arc<HashMap<SocketAddr, Arc<UdpSocket>>>,
    core: Arc<Mutex<Server>>,
    start: Instant,
    counters: StunCounters,
) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let fd = socket.as_raw_fd();
    let mut rx = mmsg::RecvBatch::new();
    let mut tx = mmsg::SendBatch::new();
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let n = match socket.try_io(Interest::READABLE, || rx.recv(fd)) {
            Ok(n) => n,
            // WouldBlock: spurious readiness; anything else (an ICMP error reported on the
            // socket, say) concerns one datagram, not the socket.
            Err(_) => continue,
        };
        let mut tally = StunTally::default();
        {
            let mut core = lock(&core);
            let now = start.elapsed();
            for i in 0..n {
                let (request, whole_len, source) = rx.get(i);
                let Some(source) = source else { continue };
                let v =
                    core.handle_into(request, source, local, Transport::Udp, now, tx.next_buf());
                let sent = match v {
                    Verdict::Respond { len, from, .. } => {
                        tx.push(len, source, from);
                        len
                    }
                    Verdict::Drop(reason) => {
                        log::trace!("STUN from {source}: dropped ({})", reason.name());
                        0
                    }
                };
                tally.record(v.outcome(), whole_len, sent);
            }
        }
        counters.add(Transport::Udp, &tally);
        send_all(&socket, fd, local, &by_local, &tx).await;
        tx.clear();
    }
}

/// Sends every response of `tx`: runs leaving from `local` with `sendmmsg`, others (RFC 5780
/// CHANGE-REQUEST) one by one from their own socket. A response the kernel refuses (an
/// unreachable destination) is skipped.
async fn send_all(
    socket: &UdpSocket,
    fd: std::os::fd::RawFd,
    local: SocketAddr,
    by_local: &HashMap<SocketAddr, Arc<UdpSocket>>,
    tx: &mmsg::SendBatch,
) {
    let mut i = 0;
    while i < tx.len() {
        let (bytes, to, from) = tx.get(i);
        if from != local {
            if let Some(out) = by_local.get(&from) {
                let _ = out.send_to(bytes, to).await;
            }
            i += 1;
            continue;
        }
        match socket.try_io(Interest::WRITABLE, || tx.send_from(fd, i, local)) {
            Ok(sent) => i += sent.max(1),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                log::trace!("STUN response to {to}: {e}");
                i += 1;
            }
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    core: Arc<Mutex<Server>>,
    start: Instant,
    counters: StunCounters,
) {
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, source)) = listener.accept().await else {
            continue;
        };
        let core = core.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve_tcp_connection(stream, source, &core, start, &counters).await;
        });
    }
}

/// One TCP connection: STUN messages framed by their own length field (RFC 5389 §7.2.2).
/// Anything the core drops ends the connection; so does a frame longer than the longest
/// request (counted as `too_long` without being read).
async fn serve_tcp_connection(
    mut stream: TcpStream,
    source: SocketAddr,
    core: &Mutex<Server>,
    start: Instant,
    counters: &StunCounters,
) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    let mut buf = vec![0u8; MAX_REQUEST_LEN];
    let mut out = [0u8; MAX_RESPONSE_LEN];
    loop {
        let header = &mut buf[..HEADER_LEN];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(header)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let body = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if HEADER_LEN + body > MAX_REQUEST_LEN {
            let mut tally = StunTally::default();
            tally.record(Outcome::Dropped(DropReason::TooLong), HEADER_LEN + body, 0);
            counters.add(Transport::Tcp, &tally);
            return Ok(());
        }
        let rest = &mut buf[HEADER_LEN..HEADER_LEN + body];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(rest)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let request = &buf[..HEADER_LEN + body];
        let v = lock(core).handle_into(
            request,
            source,
            local,
            Transport::Tcp,
            start.elapsed(),
            &mut out,
        );
        let mut tally = StunTally::default();
        let sent = match v {
            Verdict::Respond { len, .. } => len,
            Verdict::Drop(_) => 0,
        };
        tally.record(v.outcome(), request.len(), sent);
        counters.add(Transport::Tcp, &tally);
        match v {
            Verdict::Respond { len, .. } => stream.write_all(&out[..len]).await?,
            Verdict::Drop(reason) => {
                log::trace!("STUN over TCP from {source}: dropped ({})", reason.name());
                return Ok(());
            }
        }
    }
}
