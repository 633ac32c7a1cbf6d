//! `stun-load`: STUN Binding responses per second, homerelay's STUN server and coturn's
//! `turnserver` (STUN only) side by side in one run, on loopback.
//!
//! Both servers run as their real programs: `homerelay run` with a `[stun]` section, and
//! `turnserver --stun-only`, each started once per profile, pinned to the same cores
//! (`taskset`), and measured in alternation (round 1: homerelay, coturn; round 2: homerelay,
//! coturn; …) so that noise from other work on the machine hits both. The load generator is one
//! thread on a core of its own: several UDP sockets, each with a bounded number of requests
//! outstanding (a new request as soon as an answer arrives, `sendmmsg`/`recvmmsg` batches).
//!
//! The invariant a reader must know: **only valid answers count**. A response counts if it is
//! a Binding success response with the magic cookie, a length field matching the datagram, the
//! transaction id of a request still outstanding on that socket, from the server's address, and
//! an XOR-MAPPED-ADDRESS equal to the address and port the request was sent from. Anything else
//! is counted by kind and makes the process exit nonzero; a request unanswered for `--timeout`
//! is counted as a timeout and replaced.
//!
//! Profiles (homerelay's per-source rate limit is always in the path):
//! - `one-source`: every socket on 127.0.0.1; homerelay's `rate_per_source` and
//!   `burst_per_source` raised to 1,000,000,000, so the limiter runs but never limits.
//! - `many-sources`: each request from the next of `--sources` loopback addresses
//!   (127.1.0.1 upwards, `IP_PKTINFO` on sockets bound to `lo`), homerelay with the default
//!   limit (10 requests/s and a burst of 20 per source, 65,536 sources tracked): each source
//!   stays under its budget while the limiter's table holds every source.
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bench::cpu::{self, CpuSample};
use bench::histogram::{Histogram, Percentiles};
use clap::{Parser, ValueEnum};
use serde::Serialize;

/// STUN Binding responses per second from homerelay (`homerelay run` with `[stun]`) and coturn
/// (`turnserver --stun-only`), measured alternately in one run on loopback.
///
/// Needs `turnserver` (Debian package coturn, installed by scripts/bootstrap.sh) and the
/// `homerelay` binary (default: next to this program; `cargo build --release -p control`).
/// Exits nonzero if any response was invalid.
#[derive(Debug, Parser)]
#[command(name = "stun-load", version)]
struct Cli {
    /// Servers, measured in this order within every round.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "homerelay,coturn"
    )]
    servers: Vec<ServerKind>,
    /// Profiles, each with its own server processes and rounds (see the program's header).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "one-source,many-sources"
    )]
    profiles: Vec<Profile>,
    /// Rounds per profile; each measures every server once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Measured seconds per server and round.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before each measurement (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Client UDP sockets.
    #[arg(long, default_value_t = 8)]
    sockets: usize,
    /// Requests outstanding per socket. The total (sockets × outstanding) stays well below what
    /// a server socket's default receive buffer holds (about 200 small datagrams on loopback),
    /// so neither server drops for lack of buffer.
    #[arg(long, default_value_t = 16)]
    outstanding: usize,
    /// Source addresses of the many-sources profile (127.1.0.1 upwards, at most 65,000).
    #[arg(long, default_value_t = 60_000)]
    sources: u32,
    /// A request unanswered this long (ms) counts as a timeout and is replaced.
    #[arg(long, default_value_t = 250)]
    timeout_ms: u64,
    /// Cores of both servers (a taskset list, e.g. `1` or `0,1`); default: every core but the
    /// load generator's (all cores on a one-core machine).
    #[arg(long)]
    server_cpus: Option<String>,
    /// Core of the load generator.
    #[arg(long, default_value_t = 0)]
    client_cpu: usize,
    /// Do not pin anything (servers and generator float over every core).
    #[arg(long)]
    no_pin: bool,
    /// coturn's relay threads (`-m`); default: the number of server cores, which is also how
    /// many worker threads homerelay's runtime starts on them.
    #[arg(long)]
    coturn_threads: Option<usize>,
    /// The homerelay binary.
    #[arg(long)]
    homerelay: Option<PathBuf>,
    /// The turnserver binary.
    #[arg(long, default_value = "turnserver")]
    turnserver: PathBuf,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum ServerKind {
    Homerelay,
    Coturn,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Homerelay => "homerelay",
            ServerKind::Coturn => "coturn",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Profile {
    OneSource,
    ManySources,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::OneSource => "one-source",
            Profile::ManySources => "many-sources",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// STUN messages
// ---------------------------------------------------------------------------------------------

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const HEADER_LEN: usize = 20;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A bare Binding request (20 bytes): what a phone's keep-alive sends.
fn binding_request(txid: &[u8; 12]) -> [u8; HEADER_LEN] {
    let mut m = [0u8; HEADER_LEN];
    m[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    m[4..8].copy_from_slice(&MAGIC_COOKIE);
    m[8..20].copy_from_slice(txid);
    m
}

/// The transaction id: socket index, slot index, sequence number of the slot's request.
fn txid(socket: u16, slot: u16, seq: u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[0..2].copy_from_slice(&socket.to_be_bytes());
    t[2..4].copy_from_slice(&slot.to_be_bytes());
    t[4..12].copy_from_slice(&seq.to_be_bytes());
    t
}

fn parse_txid(t: &[u8]) -> (u16, u16, u64) {
    let socket = u16::from_be_bytes([t[0], t[1]]);
    let slot = u16::from_be_bytes([t[2], t[3]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&t[4..12]);
    (socket, slot, u64::from_be_bytes(seq))
}

/// Why a response does not count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Invalid {
    /// Not from the server's address and port.
    WrongSource,
    /// Shorter than a header, a length field not matching, no magic cookie, truncated.
    Malformed,
    /// A STUN message other than a Binding success response (an error response…).
    NotSuccess,
    /// A transaction id this socket never sent.
    UnknownTransaction,
    /// No XOR-MAPPED-ADDRESS, or one for another family.
    NoMappedAddress,
    /// An XOR-MAPPED-ADDRESS other than the request's source address and port.
    WrongMappedAddress,
}

impl Invalid {
    const ALL: [Invalid; 6] = [
        Invalid::WrongSource,
        Invalid::Malformed,
        Invalid::NotSuccess,
        Invalid::UnknownTransaction,
        Invalid::NoMappedAddress,
        Invalid::WrongMappedAddress,
    ];

    fn name(self) -> &'static str {
        match self {
            Invalid::WrongSource => "wrong_source",
            Invalid::Malformed => "malformed",
            Invalid::NotSuccess => "not_success",
            Invalid::UnknownTransaction => "unknown_transaction",
            Invalid::NoMappedAddress => "no_mapped_address",
            Invalid::WrongMappedAddress => "wrong_mapped_address",
        }
    }
}

/// Checks the framing of a Binding success response and returns its transaction id.
fn check_header(m: &[u8]) -> Result<&[u8], Invalid> {
    if m.len() < HEADER_LEN
        || m[0] & 0xc0 != 0
        || usize::from(u16::from_be_bytes([m[2], m[3]])) + HEADER_LEN != m.len()
        || m.len() % 4 != 0
        || m[4..8] != MAGIC_COOKIE
    {
        return Err(Invalid::Malformed);
    }
    if m[0..2] != [0x01, 0x01] {
        return Err(Invalid::NotSuccess);
    }
    Ok(&m[8..20])
}

/// The XOR-MAPPED-ADDRESS (IPv4) of a response whose header [`check_header`] accepted.
fn mapped_address(m: &[u8]) -> Result<SocketAddrV4, Invalid> {
    let mut at = HEADER_LEN;
    while at + 4 <= m.len() {
        let kind = u16::from_be_bytes([m[at], m[at + 1]]);
        let len = usize::from(u16::from_be_bytes([m[at + 2], m[at + 3]]));
        let value = m.get(at + 4..at + 4 + len).ok_or(Invalid::Malformed)?;
        if kind == XOR_MAPPED_ADDRESS {
            // Reserved, family 0x01 (IPv4), X-Port, X-Address (RFC 8489 §14.2).
            if len != 8 || value[1] != 0x01 {
                return Err(Invalid::NoMappedAddress);
            }
            let port = u16::from_be_bytes([value[2], value[3]]) ^ 0x2112;
            let mut ip = [0u8; 4];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ MAGIC_COOKIE[i];
            }
            return Ok(SocketAddrV4::new(Ipv4Addr::from(ip), port));
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    Err(Invalid::NoMappedAddress)
}

// ---------------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------------

const BATCH: usize = 64;
const RECV_BUF: usize = 512;

#[derive(Clone, Copy)]
struct Slot {
    /// Sequence number of the request outstanding, if `busy`.
    seq: u64,
    sent_ns: u64,
    busy: bool,
    /// The address the request was sent from.
    source: Ipv4Addr,
}

const IDLE: Slot = Slot {
    seq: 0,
    sent_ns: 0,
    busy: false,
    source: Ipv4Addr::UNSPECIFIED,
};

struct Client {
    socket: UdpSocket,
    port: u16,
    slots: Vec<Slot>,
    next_seq: u64,
}

/// What one measurement saw.
#[derive(Default)]
struct Tally {
    valid: u64,
    response_bytes: u64,
    timeouts: u64,
    /// Valid-looking answers to a request already timed out and replaced.
    stale: u64,
    invalid: [u64; Invalid::ALL.len()],
    sent: u64,
    rtt: Histogram,
}

/// Where requests come from.
#[derive(Clone, Copy, Debug)]
enum Sources {
    /// Every socket on 127.0.0.1.
    One,
    /// Request k comes from 127.1.0.1 + (k mod n), sent with `IP_PKTINFO`.
    Many(u32),
}

fn source_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + i)
}

/// A received datagram and when it arrived.
struct Datagram<'a> {
    bytes: &'a [u8],
    from: SocketAddrV4,
    truncated: bool,
    at: u64,
}

/// Checks an answer on `client` (socket `index`) to requests sent to `server`; a valid one
/// frees its slot and, if `count`, is counted with its round-trip time.
fn check(
    client: &mut Client,
    index: usize,
    server: SocketAddrV4,
    d: &Datagram<'_>,
    count: bool,
    tally: &mut Tally,
) -> Result<(), Invalid> {
    if d.from != server {
        return Err(Invalid::WrongSource);
    }
    if d.truncated {
        return Err(Invalid::Malformed);
    }
    let (socket, slot, seq) = parse_txid(check_header(d.bytes)?);
    if usize::from(socket) != index {
        return Err(Invalid::UnknownTransaction);
    }
    let Some(s) = client.slots.get_mut(usize::from(slot)) else {
        return Err(Invalid::UnknownTransaction);
    };
    if seq == 0 || seq >= client.next_seq {
        return Err(Invalid::UnknownTransaction);
    }
    if !s.busy || s.seq != seq {
        // Sent, timed out and replaced: late, not wrong.
        if count {
            tally.stale += 1;
        }
        return Ok(());
    }
    let mapped = mapped_address(d.bytes)?;
    if mapped != SocketAddrV4::new(s.source, client.port) {
        return Err(Invalid::WrongMappedAddress);
    }
    s.busy = false;
    if count {
        tally.valid += 1;
        tally.response_bytes += d.bytes.len() as u64;
        tally.rtt.record(d.at.saturating_sub(s.sent_ns));
    }
    Ok(())
}

struct Generator {
    server: SocketAddrV4,
    clients: Vec<Client>,
    sources: Sources,
    next_source: u32,
    timeout_ns: u64,
    /// Receive buffers, allocated once.
    rx: Box<[[u8; RECV_BUF]; BATCH]>,
}

impl Generator {
    fn new(
        server: SocketAddrV4,
        sockets: usize,
        outstanding: usize,
        sources: Sources,
        timeout: Duration,
    ) -> anyhow::Result<Generator> {
        anyhow::ensure!(
            (1..=u16::MAX as usize).contains(&sockets)
                && (1..=u16::MAX as usize).contains(&outstanding),
            "--sockets and --outstanding must be 1 to 65535"
        );
        let mut clients = Vec::with_capacity(sockets);
        for _ in 0..sockets {
            let socket = match sources {
                Sources::One => UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?,
                Sources::Many(_) => {
                    // Any local address (the answers go to 127.1.x.y), but only on loopback.
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    bind_to_loopback(&s)?;
                    s
                }
            };
            socket.set_nonblocking(true)?;
            let port = socket.local_addr()?.port();
            clients.push(Client {
                socket,
                port,
                slots: vec![IDLE; outstanding],
                next_seq: 1,
            });
        }
        Ok(Generator {
            server,
            clients,
            sources,
            next_source: 0,
            timeout_ns: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            rx: Box::new([[0; RECV_BUF]; BATCH]),
        })
    }

    /// Sends a request on every idle slot of client `c`.
    fn refill(&mut self, c: usize, now: u64, tally: &mut Tally) -> anyhow::Result<()> {
        let slots = self.clients[c].slots.len();
        let pktinfo = matches!(self.sources, Sources::Many(_));
        let mut i = 0;
        while i < slots {
            let mut chunk = [0usize; BATCH];
            let mut bufs = [[0u8; HEADER_LEN]; BATCH];
            let mut sources = [Ipv4Addr::LOCALHOST; BATCH];
            let mut n = 0;
            while i < slots && n < BATCH {
                if !self.clients[c].slots[i].busy {
                    let source = match self.sources {
                        Sources::One => Ipv4Addr::LOCALHOST,
                        Sources::Many(count) => {
                            let a = source_address(self.next_source);
                            self.next_source = (self.next_source + 1) % count.max(1);
                            a
                        }
                    };
                    let client = &mut self.clients[c];
                    let seq = client.next_seq;
                    client.next_seq += 1;
                    // Both fit u16: checked in `new`.
                    let id = txid(c as u16, i as u16, seq);
                    bufs[n] = binding_request(&id);
                    sources[n] = source;
                    chunk[n] = i;
                    client.slots[i] = Slot {
                        seq,
                        sent_ns: now,
                        busy: true,
                        source,
                    };
                    n += 1;
                }
                i += 1;
            }
            if n == 0 {
                return Ok(());
            }
            let sent = send_batch(
                &self.clients[c].socket,
                self.server,
                &bufs[..n],
                pktinfo.then_some(&sources[..n]),
            )?;
            tally.sent += sent as u64;
            if sent < n {
                // The socket's send queue is full: the rest stay idle until the next turn.
                for &slot in &chunk[sent..n] {
                    self.clients[c].slots[slot].busy = false;
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// Receives and checks every answer waiting on client `c`; `count` says whether they fall
    /// in the measured window.
    fn drain(&mut self, c: usize, count: bool, tally: &mut Tally) -> anyhow::Result<()> {
        let mut got = [(0usize, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), false); BATCH];
        loop {
            let n = recv_batch(&self.clients[c].socket, &mut self.rx, &mut got)?;
            let now = cpu::mono_ns();
            for (k, &(len, from, truncated)) in got[..n].iter().enumerate() {
                let datagram = Datagram {
                    bytes: &self.rx[k][..len],
                    from,
                    truncated,
                    at: now,
                };
                let client = &mut self.clients[c];
                if let Err(kind) = check(client, c, self.server, &datagram, count, tally) {
                    // Invalid answers count in the warm-up too: they fail the run.
                    tally.invalid[kind as usize] += 1;
                }
            }
            if n < BATCH {
                return Ok(());
            }
        }
    }

    /// Replaces requests outstanding longer than the timeout.
    fn expire(&mut self, now: u64, count: bool, tally: &mut Tally) {
        for client in &mut self.clients {
            for s in &mut client.slots {
                if s.busy && now.saturating_sub(s.sent_ns) > self.timeout_ns {
                    s.busy = false;
                    if count {
                        tally.timeouts += 1;
                    }
                }
            }
        }
    }

    /// Keeps every slot busy for `duration`; counts what arrives if `count` (else it is
    /// warm-up, where only invalid answers are counted, so that they fail the run too).
    fn run(&mut self, duration: Duration, count: bool) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        let start = cpu::mono_ns();
        let until = start + u64::try_from(duration.as_nanos())?;
        let mut fds: Vec<libc::pollfd> = self
            .clients
            .iter()
            .map(|c| libc::pollfd {
                fd: c.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        for c in 0..self.clients.len() {
            self.refill(c, start, &mut tally)?;
        }
        let mut last_expire = start;
        loop {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("poll");
                }
            }
            let now = cpu::mono_ns();
            if now >= until {
                break;
            }
            for (c, fd) in fds.iter().enumerate() {
                if fd.revents & libc::POLLIN != 0 {
                    self.drain(c, count, &mut tally)?;
                    self.refill(c, now, &mut tally)?;
                }
            }
            if now.saturating_sub(last_expire) > 10_000_000 {
                last_expire = now;
                self.expire(now, count, &mut tally);
                for c in 0..self.clients.len() {
                    self.refill(c, now, &mut tally)?;
                }
            }
        }
        Ok(tally)
    }
}

/// `SO_BINDTODEVICE lo`: a socket bound to the wildcard address that only sees loopback.
fn bind_to_loopback(s: &UdpSocket) -> anyhow::Result<()> {
    let dev = b"lo\0";
    // SAFETY: `dev` is a valid buffer of the length passed; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            dev.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("SO_BINDTODEVICE lo (the many-sources profile needs root)");
    }
    Ok(())
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Room for one `IP_PKTINFO` control message (CMSG_SPACE of an `in_pktinfo`), 8-aligned.
type PktinfoBuf = [u64; 4];

/// `sendmmsg` of `bufs` to `to`; with `sources`, each from its address (`IP_PKTINFO`).
/// Returns how many the kernel took.
fn send_batch(
    socket: &UdpSocket,
    to: SocketAddrV4,
    bufs: &[[u8; HEADER_LEN]],
    sources: Option<&[Ipv4Addr]>,
) -> anyhow::Result<usize> {
    let mut name = sockaddr_in(to);
    let mut iov: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    let mut control: [PktinfoBuf; BATCH] = [[0; 4]; BATCH];
    // SAFETY: an all-zero mmsghdr is a valid empty header.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let n = bufs.len().min(BATCH);
    for k in 0..n {
        iov[k] = libc::iovec {
            iov_base: bufs[k].as_ptr() as *mut libc::c_void,
            iov_len: HEADER_LEN,
        };
        let h = &mut msgs[k].msg_hdr;
        h.msg_name = (&raw mut name).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &raw mut iov[k];
        h.msg_iovlen = 1;
        if let Some(sources) = sources {
            let info_len = std::mem::size_of::<libc::in_pktinfo>() as u32;
            h.msg_control = control[k].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(info_len) } as _;
            // SAFETY: msg_control points to `control[k]`, 32 bytes, 8-aligned, which holds
            // CMSG_SPACE(sizeof in_pktinfo) = 32 bytes; CMSG_FIRSTHDR is therefore non-null and
            // CMSG_DATA points inside that buffer.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(h);
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(info_len) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(sources[k]).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>(), info);
            }
        }
    }
    // SAFETY: `msgs[..n]` are initialized headers whose pointers (name, iov, buffers, control)
    // live until the call returns.
    let rc = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(e).context("sendmmsg");
    }
    Ok(rc as usize)
}

/// `recvmmsg` into `bufs` without waiting; (length, source, truncated) of each datagram go to
/// `got`. Returns how many arrived.
fn recv_batch(
    socket: &UdpSocket,
    bufs: &mut [[u8; RECV_BUF]; BATCH],
    got: &mut [(usize, SocketAddrV4, bool); BATCH],
) -> anyhow::Result<usize> {
    // SAFETY: all-zero sockaddr_in values are valid.
    let mut names: [libc::sockaddr_in; BATCH] = unsafe { std::mem::zeroed() };
    let mut iov: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: an all-zero mmsghdr is a valid empty header.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for k in 0..BATCH {
        iov[k] = libc::iovec {
            iov_base: bufs[k].as_mut_ptr().cast(),
            iov_len: RECV_BUF,
        };
        let h = &mut msgs[k].msg_hdr;
        h.msg_name = (&raw mut names[k]).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &raw mut iov[k];
        h.msg_iovlen = 1;
    }
    // SAFETY: the headers point to buffers and names that live until the call returns.
    let rc = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ) {
            return Ok(0);
        }
        return Err(e).context("recvmmsg");
    }
    let n = rc as usize;
    for k in 0..n {
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(names[k].sin_addr.s_addr)),
            u16::from_be(names[k].sin_port),
        );
        let truncated = msgs[k].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        got[k] = (msgs[k].msg_len as usize, from, truncated);
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------------

/// A server process started by this program; stopped (SIGTERM, then SIGKILL) on drop.
struct Server {
    kind: ServerKind,
    child: Child,
    addr: SocketAddrV4,
    command: Vec<String>,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signals the child this program started, by its pid (not yet reaped).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the run records about a server process.
#[derive(Clone, Debug, Serialize)]
struct ServerInfo {
    profile: Profile,
    server: ServerKind,
    command: String,
    address: String,
    /// Threads of the process once serving, by name (`comm`).
    threads: BTreeMap<String, usize>,
    /// The cores it may run on (`taskset -c`), or `all`.
    cpus: String,
}

impl Server {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    fn info(&self, profile: Profile, cpus: &str) -> ServerInfo {
        let mut threads = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for e in dir.flatten() {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                *threads.entry(comm.trim().to_owned()).or_default() += 1;
            }
        }
        ServerInfo {
            profile,
            server: self.kind,
            command: self.command.join(" "),
            address: self.addr.to_string(),
            threads,
            cpus: cpus.to_owned(),
        }
    }

    /// CPU nanoseconds of every thread of the process so far.
    fn cpu_ns(&self) -> u64 {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        dir.flatten()
            .filter_map(|e| {
                let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
                s.split_ascii_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until the server answers a Binding request (or fails: exited, no answer in 30 s).
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let probe = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        probe.set_read_timeout(Some(Duration::from_millis(100)))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; RECV_BUF];
        let mut seq = 0u64;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before serving:\n{}",
                    self.kind.name(),
                    self.log_tail()
                );
            }
            seq += 1;
            let request = binding_request(&txid(u16::MAX, u16::MAX, seq));
            probe.send_to(&request, self.addr)?;
            if let Ok((n, _)) = probe.recv_from(&mut buf) {
                if check_header(&buf[..n]).is_ok_and(|t| t == &request[8..20]) {
                    return Ok(());
                }
            }
        }
        bail!(
            "{} did not answer a Binding request on {} within 30 s:\n{}",
            self.kind.name(),
            self.addr,
            self.log_tail()
        )
    }
}

/// `taskset -c CPUS PROGRAM` (or PROGRAM alone without pinning).
fn pinned(cpus: Option<&str>, program: &Path) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn command_line(c: &Command) -> Vec<String> {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// homerelay's `[stun]` rate limit for a profile: (rate_per_source, burst_per_source).
fn homerelay_limit(profile: Profile) -> Option<(u32, u32)> {
    match profile {
        Profile::OneSource => Some((1_000_000_000, 1_000_000_000)),
        // The defaults (docs/stun.md): 10/s, burst 20, 65,536 sources.
        Profile::ManySources => None,
    }
}

fn start_homerelay(
    binary: &Path,
    profile: Profile,
    dir: &Path,
    cpus: Option<&str>,
) -> anyhow::Result<Server> {
    let config = dir.join("homerelay.toml");
    let log = dir.join("homerelay.log");
    let limit = homerelay_limit(profile)
        .map(|(rate, burst)| format!("rate_per_source = {rate}\nburst_per_source = {burst}\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "# stun-load: the STUN server of `homerelay run`; every other listener on port 0.\n\
             [relay]\nports = \"47290-47299\"\nworkers = 1\n\
             [api]\nlisten = \"127.0.0.1:0\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [store]\npath = \"{}\"\n\
             [stun]\nlisten = \"127.0.0.1:0\"\n{limit}",
            dir.join("homerelay.db").display()
        ),
    )?;
    let mut c = pinned(cpus, binary);
    c.arg("run").arg("--config").arg(&config);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HOMERELAY_") {
            c.env_remove(k);
        }
    }
    c.env("HOMERELAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let command = command_line(&c);
    let child = c
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut server = Server {
        kind: ServerKind::Homerelay,
        child,
        addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        command,
        log,
    };
    // The port the kernel chose, from the log line "STUN on UDP [127.0.0.1:N] and TCP [...]".
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&server.log).unwrap_or_default();
        let addr = text.lines().find_map(|l| {
            let rest = &l[l.find("STUN on UDP [")? + "STUN on UDP [".len()..];
            rest[..rest.find(']')?].parse::<SocketAddrV4>().ok()
        });
        if let Some(addr) = addr {
            server.addr = addr;
            break;
        }
        if let Some(status) = server.child.try_wait()? {
            bail!("homerelay exited ({status}):\n{}", server.log_tail());
        }
        if Instant::now() > deadline {
            bail!(
                "homerelay logged no STUN address in 30 s:\n{}",
                server.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_ready()?;
    Ok(server)
}

fn start_coturn(
    binary: &Path,
    dir: &Path,
    cpus: Option<&str>,
    threads: usize,
) -> anyhow::Result<Server> {
    // An empty configuration file: Debian's /etc/turnserver.conf would apply otherwise.
    let config = dir.join("turnserver.conf");
    std::fs::write(&config, "")?;
    let port = {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        s.local_addr()?.port()
    };
    let log = dir.join("turnserver.log");
    let mut c = pinned(cpus, binary);
    c.arg("-c")
        .arg(&config)
        .args(["--stun-only", "-L", "127.0.0.1", "--listening-port"])
        .arg(port.to_string())
        .arg("--relay-threads")
        .arg(threads.to_string())
        .args([
            "--no-cli",
            "--no-tcp",
            "--no-tls",
            "--no-dtls",
            // Debian's shipped settings: no MAPPED-ADDRESS, no RFC 3489 answers, no
            // RESPONSE-ORIGIN without RFC 5780 (as homerelay).
            "--no-stun-backward-compatibility",
            "--response-origin-only-with-rfc5780",
            "--simple-log",
            "--no-stdout-log",
            "--log-file",
        ])
        .arg(&log)
        .arg("--pidfile")
        .arg(dir.join("turnserver.pid"))
        .arg("--userdb")
        .arg(dir.join("turndb"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let command = command_line(&c);
    let child = c.spawn().with_context(|| {
        format!(
            "starting {} (Debian package coturn; scripts/bootstrap.sh installs it)",
            binary.display()
        )
    })?;
    let mut server = Server {
        kind: ServerKind::Coturn,
        child,
        addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        command,
        log,
    };
    server.wait_ready()?;
    Ok(server)
}

// ---------------------------------------------------------------------------------------------
// Rounds and the report
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
struct RoundResult {
    profile: Profile,
    round: usize,
    server: ServerKind,
    /// Valid responses received in the measured window.
    responses: u64,
    responses_per_s: f64,
    /// Requests sent in the window.
    sent: u64,
    timeouts: u64,
    /// Answers to requests already timed out and replaced.
    stale: u64,
    /// Invalid responses by kind, warm-up included (the run fails unless empty).
    invalid: BTreeMap<String, u64>,
    mean_response_bytes: f64,
    /// Request → valid response, at the generator.
    rtt: Percentiles,
    /// The server process's CPU over the window, in cores (1.0 = one core busy).
    server_cpu_cores: f64,
    server_cpu_us_per_response: f64,
    /// The generator thread's CPU, in cores.
    client_cpu_cores: f64,
    /// The whole machine (wall − idle − iowait), in cores.
    machine_busy_cores: f64,
}

fn measure(
    cli: &Cli,
    server: &Server,
    profile: Profile,
    round: usize,
) -> anyhow::Result<RoundResult> {
    let sources = match profile {
        Profile::OneSource => Sources::One,
        Profile::ManySources => Sources::Many(cli.sources),
    };
    let mut generator = Generator::new(
        server.addr,
        cli.sockets,
        cli.outstanding,
        sources,
        Duration::from_millis(cli.timeout_ms),
    )?;
    let warm = generator.run(Duration::from_secs_f64(cli.warmup), false)?;
    let tid = cpu::gettid();
    let (server0, client0, machine0) = (
        server.cpu_ns(),
        cpu::thread_cpu_ns(tid).unwrap_or(0),
        CpuSample::read()?,
    );
    let t0 = Instant::now();
    let tally = generator.run(Duration::from_secs_f64(cli.duration), true)?;
    let window = t0.elapsed().as_secs_f64();
    let (server1, client1, machine1) = (
        server.cpu_ns(),
        cpu::thread_cpu_ns(tid).unwrap_or(0),
        CpuSample::read()?,
    );
    drop(generator);
    let server_cpu_s = server1.saturating_sub(server0) as f64 / 1e9;
    let invalid = Invalid::ALL
        .iter()
        .zip(tally.invalid.iter().zip(warm.invalid))
        .filter(|(_, (a, b))| **a + *b > 0)
        .map(|(k, (a, b))| (k.name().to_owned(), *a + b))
        .collect();
    let per = |x: f64| {
        if tally.valid > 0 {
            x / tally.valid as f64
        } else {
            0.0
        }
    };
    Ok(RoundResult {
        profile,
        round,
        server: server.kind,
        responses: tally.valid,
        responses_per_s: tally.valid as f64 / window,
        sent: tally.sent,
        timeouts: tally.timeouts,
        stale: tally.stale,
        invalid,
        mean_response_bytes: per(tally.response_bytes as f64),
        rtt: tally.rtt.percentiles_us(),
        server_cpu_cores: server_cpu_s / window,
        server_cpu_us_per_response: per(server_cpu_s * 1e6),
        client_cpu_cores: client1.saturating_sub(client0) as f64 / 1e9 / window,
        machine_busy_cores: machine0.busy_until(&machine1).total_cores,
    })
}

#[derive(Debug, Serialize)]
struct Summary {
    profile: Profile,
    server: ServerKind,
    responses_per_s_median: f64,
    responses_per_s_min: f64,
    responses_per_s_max: f64,
    server_cpu_us_per_response_median: f64,
    server_cpu_cores_median: f64,
    rtt_p50_us_median: f64,
    rtt_p99_us_median: f64,
    mean_response_bytes: f64,
    timeouts: u64,
    invalid: u64,
}

#[derive(Debug, Serialize)]
struct Ratio {
    profile: Profile,
    /// Median responses/s of homerelay ÷ coturn's.
    of_medians: f64,
    /// The median of the per-round ratios (each round measures both servers back to back).
    median_of_rounds: f64,
    /// coturn's server CPU per response ÷ homerelay's (medians): how much less CPU homerelay
    /// needs per answer.
    cpu_efficiency: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(profile: Profile, server: ServerKind, rounds: &[RoundResult]) -> Summary {
    let mine: Vec<&RoundResult> = rounds
        .iter()
        .filter(|r| r.profile == profile && r.server == server)
        .collect();
    let of = |f: &dyn Fn(&RoundResult) -> f64| median(mine.iter().map(|r| f(r)).collect());
    let rates: Vec<f64> = mine.iter().map(|r| r.responses_per_s).collect();
    Summary {
        profile,
        server,
        responses_per_s_median: median(rates.clone()),
        responses_per_s_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        responses_per_s_max: rates.iter().copied().fold(0.0, f64::max),
        server_cpu_us_per_response_median: of(&|r| r.server_cpu_us_per_response),
        server_cpu_cores_median: of(&|r| r.server_cpu_cores),
        rtt_p50_us_median: of(&|r| r.rtt.p50_us),
        rtt_p99_us_median: of(&|r| r.rtt.p99_us),
        mean_response_bytes: of(&|r| r.mean_response_bytes),
        timeouts: mine.iter().map(|r| r.timeouts).sum(),
        invalid: mine.iter().flat_map(|r| r.invalid.values()).sum(),
    }
}

fn ratio(profile: Profile, summary: &[Summary], rounds: &[RoundResult]) -> Option<Ratio> {
    let get = |k| {
        summary
            .iter()
            .find(|s| s.profile == profile && s.server == k)
    };
    let (ours, theirs) = (get(ServerKind::Homerelay)?, get(ServerKind::Coturn)?);
    let per_round: Vec<f64> = rounds
        .iter()
        .filter(|r| r.profile == profile && r.server == ServerKind::Homerelay)
        .filter_map(|a| {
            let b = rounds.iter().find(|b| {
                b.profile == profile && b.round == a.round && b.server == ServerKind::Coturn
            })?;
            (b.responses_per_s > 0.0).then(|| a.responses_per_s / b.responses_per_s)
        })
        .collect();
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Some(Ratio {
        profile,
        of_medians: div(ours.responses_per_s_median, theirs.responses_per_s_median),
        median_of_rounds: median(per_round),
        cpu_efficiency: div(
            theirs.server_cpu_us_per_response_median,
            ours.server_cpu_us_per_response_median,
        ),
    })
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine: Machine,
    settings: Settings,
    servers: Vec<ServerInfo>,
    summary: Vec<Summary>,
    ratios: Vec<Ratio>,
    rounds: Vec<RoundResult>,
}

#[derive(Debug, Serialize)]
struct Machine {
    kernel: String,
    cpu: String,
    cores: usize,
    load_average_before: String,
    load_average_after: String,
}

#[derive(Debug, Serialize)]
struct Settings {
    rounds: usize,
    duration_s: f64,
    warmup_s: f64,
    sockets: usize,
    outstanding_per_socket: usize,
    request_bytes: usize,
    sources_many: u32,
    timeout_ms: u64,
    client_cpu: Option<usize>,
    server_cpus: Option<String>,
    coturn_threads: usize,
    /// homerelay's `[stun]` limit per profile: (rate_per_source, burst_per_source); absent:
    /// the defaults (10, 20).
    homerelay_limits: BTreeMap<String, Option<(u32, u32)>>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn print_round(r: &RoundResult) {
    println!(
        "{:<12} round {} {:<9} {:>8.0} responses/s; rtt p50/p99 {:.0}/{:.0} µs; server {:.2} cores, {:.2} µs/response; generator {:.2} cores; machine {:.2} cores; {} B/response; timeouts {}, stale {}, invalid {:?}",
        r.profile.name(),
        r.round,
        r.server.name(),
        r.responses_per_s,
        r.rtt.p50_us,
        r.rtt.p99_us,
        r.server_cpu_cores,
        r.server_cpu_us_per_response,
        r.client_cpu_cores,
        r.machine_busy_cores,
        r.mean_response_bytes,
        r.timeouts,
        r.stale,
        r.invalid
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    anyhow::ensure!(
        !cli.servers.is_empty() && !cli.profiles.is_empty(),
        "--servers and --profiles: at least one each"
    );
    anyhow::ensure!((1..=65_000).contains(&cli.sources), "--sources: 1 to 65000");
    let homerelay = match &cli.homerelay {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program's directory")?
            .join("homerelay"),
    };
    if cli.servers.contains(&ServerKind::Homerelay) && !homerelay.is_file() {
        bail!(
            "{} not found: build it (cargo build --release -p control) or pass --homerelay",
            homerelay.display()
        );
    }
    let cores = cpu::online_cores();
    let (client_cpu, server_cpus) = if cli.no_pin {
        (None, None)
    } else {
        let servers = cli.server_cpus.clone().unwrap_or_else(|| {
            let others: Vec<String> = (0..cores)
                .filter(|&c| c != cli.client_cpu || cores == 1)
                .map(|c| c.to_string())
                .collect();
            others.join(",")
        });
        (Some(cli.client_cpu), Some(servers))
    };
    let server_cores = server_cpus
        .as_deref()
        .map_or(cores, |s| s.split(',').filter(|c| !c.is_empty()).count())
        .max(1);
    let coturn_threads = cli.coturn_threads.unwrap_or(server_cores);
    if let Some(core) = client_cpu {
        cpu::pin_to(core)?;
    }
    let load_before = loadavg();
    let mut rounds = Vec::new();
    let mut servers_info = Vec::new();
    for &profile in &cli.profiles {
        let dir = tempfile::tempdir()?;
        let mut servers = Vec::new();
        for &kind in &cli.servers {
            let sub = dir.path().join(kind.name());
            std::fs::create_dir_all(&sub)?;
            let server = match kind {
                ServerKind::Homerelay => {
                    start_homerelay(&homerelay, profile, &sub, server_cpus.as_deref())?
                }
                ServerKind::Coturn => start_coturn(
                    &cli.turnserver,
                    &sub,
                    server_cpus.as_deref(),
                    coturn_threads,
                )?,
            };
            let info = server.info(profile, server_cpus.as_deref().unwrap_or("all"));
            println!(
                "{:<12} {:<9} on {} (cpus {}; threads {:?}): {}",
                profile.name(),
                kind.name(),
                info.address,
                info.cpus,
                info.threads,
                info.command
            );
            servers_info.push(info);
            servers.push(server);
        }
        for round in 1..=cli.rounds.max(1) {
            for server in &servers {
                let r = measure(&cli, server, profile, round)?;
                print_round(&r);
                rounds.push(r);
                // Let answers to the closed sockets die out before the next server's turn.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        drop(servers);
    }
    let mut summary = Vec::new();
    for &profile in &cli.profiles {
        for &server in &cli.servers {
            summary.push(summarize(profile, server, &rounds));
        }
    }
    let ratios: Vec<Ratio> = cli
        .profiles
        .iter()
        .filter_map(|&p| ratio(p, &summary, &rounds))
        .collect();
    for s in &summary {
        println!(
            "{:<12} {:<9} median {:.0} responses/s (rounds {:.0}–{:.0}); server {:.2} µs/response, {:.2} cores; rtt p50/p99 {:.0}/{:.0} µs; {} B/response; timeouts {}, invalid {}",
            s.profile.name(),
            s.server.name(),
            s.responses_per_s_median,
            s.responses_per_s_min,
            s.responses_per_s_max,
            s.server_cpu_us_per_response_median,
            s.server_cpu_cores_median,
            s.rtt_p50_us_median,
            s.rtt_p99_us_median,
            s.mean_response_bytes,
            s.timeouts,
            s.invalid
        );
    }
    for r in &ratios {
        println!(
            "{:<12} homerelay / coturn: {:.2}× (median of per-round ratios {:.2}×); coturn needs {:.2}× homerelay's CPU per response",
            r.profile.name(),
            r.of_medians,
            r.median_of_rounds,
            r.cpu_efficiency
        );
    }
    let invalid: u64 = summary.iter().map(|s| s.invalid).sum();
    let report = Report {
        command,
        machine: Machine {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            cores,
            load_average_before: load_before,
            load_average_after: loadavg(),
        },
        settings: Settings {
            rounds: cli.rounds.max(1),
            duration_s: cli.duration,
            warmup_s: cli.warmup,
            sockets: cli.sockets,
            outstanding_per_socket: cli.outstanding,
            request_bytes: HEADER_LEN,
            sources_many: cli.sources,
            timeout_ms: cli.timeout_ms,
            client_cpu,
            server_cpus,
            coturn_threads,
            homerelay_limits: cli
                .profiles
                .iter()
                .map(|&p| (p.name().to_owned(), homerelay_limit(p)))
                .collect(),
        },
        servers: servers_info,
        summary,
        ratios,
        rounds,
    };
    println!(
        "load average before / after: {} / {}",
        report.machine.load_average_before, report.machine.load_average_after
    );
    if let Some(out) = &cli.out {
        let mut f = std::fs::File::create(out).with_context(|| format!("{}", out.display()))?;
        f.write_all((serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
        println!("wrote {}", out.display());
    }
    anyhow::ensure!(
        invalid == 0,
        "{invalid} invalid responses (see the rounds above)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Binding success response as a server would send it: XOR-MAPPED-ADDRESS of `mapped`,
    /// then SOFTWARE.
    fn response(id: &[u8; 12], mapped: SocketAddrV4) -> Vec<u8> {
        let mut m = vec![0x01, 0x01, 0, 0];
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(id);
        m.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
        m.extend_from_slice(&8u16.to_be_bytes());
        m.extend_from_slice(&[0, 0x01]);
        m.extend_from_slice(&(mapped.port() ^ 0x2112).to_be_bytes());
        for (i, b) in mapped.ip().octets().iter().enumerate() {
            m.push(b ^ MAGIC_COOKIE[i]);
        }
        m.extend_from_slice(&[0x80, 0x22, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0]);
        let len = u16::try_from(m.len() - HEADER_LEN).unwrap_or(0);
        m[2..4].copy_from_slice(&len.to_be_bytes());
        m
    }

    #[test]
    fn a_well_formed_answer_passes_and_every_defect_is_caught() {
        let id = txid(3, 7, 42);
        let mapped = SocketAddrV4::new(Ipv4Addr::new(127, 1, 2, 3), 40000);
        let good = response(&id, mapped);
        assert_eq!(check_header(&good), Ok(&id[..]));
        assert_eq!(mapped_address(&good), Ok(mapped));
        assert_eq!(parse_txid(&id), (3, 7, 42));

        let mut error = good.clone();
        error[1] = 0x11;
        assert_eq!(check_header(&error), Err(Invalid::NotSuccess));
        let mut cookie = good.clone();
        cookie[4] ^= 1;
        assert_eq!(check_header(&cookie), Err(Invalid::Malformed));
        assert_eq!(
            check_header(&good[..good.len() - 4]),
            Err(Invalid::Malformed)
        );
        let mut other = good.clone();
        other[HEADER_LEN + 7] ^= 1;
        assert_ne!(mapped_address(&other), Ok(mapped));
        let mut no_attr = good.clone();
        no_attr[HEADER_LEN + 1] = 0x01; // MAPPED-ADDRESS, not XOR-MAPPED-ADDRESS
        assert_eq!(mapped_address(&no_attr), Err(Invalid::NoMappedAddress));
        let request = binding_request(&id);
        assert_eq!(check_header(&request), Err(Invalid::NotSuccess));
    }

    #[test]
    fn the_generator_rejects_answers_it_did_not_ask_for() {
        let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3478);
        let mut g = Generator::new(server, 1, 2, Sources::One, Duration::from_secs(1))
            .expect("a socket on loopback");
        let port = g.clients[0].port;
        g.clients[0].slots[1] = Slot {
            seq: 5,
            sent_ns: 0,
            busy: true,
            source: Ipv4Addr::LOCALHOST,
        };
        g.clients[0].next_seq = 6;
        let me = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let mut t = Tally::default();
        let mut check = |g: &mut Generator, m: &[u8], from| {
            let d = Datagram {
                bytes: m,
                from,
                truncated: false,
                at: 1,
            };
            check(&mut g.clients[0], 0, g.server, &d, true, &mut t)
        };
        let stranger = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9);
        assert_eq!(
            check(&mut g, &response(&txid(0, 1, 5), me), stranger),
            Err(Invalid::WrongSource)
        );
        assert_eq!(
            check(&mut g, &response(&txid(0, 1, 9), me), server),
            Err(Invalid::UnknownTransaction)
        );
        assert_eq!(
            check(&mut g, &response(&txid(1, 1, 5), me), server),
            Err(Invalid::UnknownTransaction)
        );
        let elsewhere = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port.wrapping_add(1));
        assert_eq!(
            check(&mut g, &response(&txid(0, 1, 5), elsewhere), server),
            Err(Invalid::WrongMappedAddress)
        );
        assert_eq!(check(&mut g, &response(&txid(0, 1, 5), me), server), Ok(()));
        // The same answer again is late (its slot is idle now), not counted twice.
        assert_eq!(check(&mut g, &response(&txid(0, 1, 5), me), server), Ok(()));
        assert_eq!((t.valid, t.stale), (1, 1));
    }
}
