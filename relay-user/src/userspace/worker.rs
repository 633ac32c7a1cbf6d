//! One forwarding thread: an epoll loop over the sockets of the channels it owns.
//!
//! The invariant: **a channel's sockets and its forwarding state are touched only by this
//! thread.** Other threads send [`Command`]s through a queue and wake the loop with an eventfd;
//! the hot path ([`Worker::service`]) therefore takes no lock and logs nothing, and its own
//! buffers are preallocated: `recvmmsg` into them, [`forward::decide`] per datagram, one
//! `sendmmsg` from the same socket. The only lock it ever takes is the channel snapshot, when a
//! packet latches an endpoint (once per leg and component, not per packet).
use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, PoisonError};

use relay_common::Channel;
use socket2::{Domain, Protocol, Socket, Type};

use super::cmsg::{self, CMSG_CAP, CmsgBuf};
use super::{ChannelObserver, ChannelShared, WorkerCounters, drop_index};
use crate::DataPathError;
use crate::forward::{self, Decision, DropReason};

/// Receive buffer per datagram. RTP over UDP stays below the path MTU; anything longer is cut
/// by the kernel (`MSG_TRUNC`), dropped and counted.
pub(crate) const BUF_LEN: usize = 2048;
/// Requested `SO_RCVBUF`/`SO_SNDBUF`: absorbs bursts while the worker serves other sockets.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Batches read from one socket per wakeup before moving on, so a flood on one channel cannot
/// starve the others (epoll is level-triggered: the socket is reported again).
const MAX_BATCHES_PER_WAKE: usize = 8;
/// epoll events handled per `epoll_wait`.
const MAX_EVENTS: usize = 64;
/// The epoll token of the eventfd; socket tokens never have the top bit set ([`token`]).
const WAKE_TOKEN: u64 = u64::MAX;
/// How long a full send buffer (`EAGAIN`) may hold the loop before the rest of a batch is
/// dropped: one wait per batch, so a stuck socket costs at most this per batch.
const SEND_WAIT_MS: libc::c_int = 1;

type Reply = SyncSender<Result<(), DataPathError>>;

/// A request from another thread, answered on `reply`.
pub(crate) enum Command {
    Install {
        port: u16,
        channel: Channel,
        shared: Arc<ChannelShared>,
        reply: Reply,
    },
    Remove {
        port: u16,
        reply: Reply,
    },
    Shutdown,
}

/// What a worker thread is started with.
pub(crate) struct WorkerInit {
    pub(crate) epoll: OwnedFd,
    pub(crate) wake: Arc<OwnedFd>,
    pub(crate) commands: Receiver<Command>,
    pub(crate) counters: Arc<WorkerCounters>,
    pub(crate) bind_addr: Ipv4Addr,
    pub(crate) batch: usize,
    pub(crate) observer: Option<ChannelObserver>,
}

/// A channel owned by this worker.
struct ChannelState {
    /// Even RTP port.
    port: u16,
    /// The live channel, latched in place by [`forward::decide`].
    channel: Channel,
    shared: Arc<ChannelShared>,
    /// RTP socket (`port`) and RTCP socket (`port + 1`).
    sockets: [Socket; 2],
}

struct Slot {
    /// Bumped on removal, so an epoll token of a removed channel never matches its successor.
    generation: u32,
    state: Option<ChannelState>,
}

/// Counter increments of one batch, added to the shared atomics once per batch.
#[derive(Default)]
struct Tally {
    rx_packets: u64,
    rx_batches: u64,
    forwarded_packets: u64,
    forwarded_bytes: u64,
    latched: u64,
    dropped: [u64; DropReason::ALL.len()],
    no_channel: u64,
    send_errors: u64,
    truncated: u64,
    empty: u64,
    rx_errors: u64,
}

impl Tally {
    fn flush(&mut self, c: &WorkerCounters) {
        fn add(a: &std::sync::atomic::AtomicU64, v: &mut u64) {
            if *v != 0 {
                a.fetch_add(*v, Relaxed);
                *v = 0;
            }
        }
        add(&c.rx_packets, &mut self.rx_packets);
        add(&c.rx_batches, &mut self.rx_batches);
        add(&c.forwarded_packets, &mut self.forwarded_packets);
        add(&c.forwarded_bytes, &mut self.forwarded_bytes);
        add(&c.latched, &mut self.latched);
        for (a, v) in c.dropped.iter().zip(self.dropped.iter_mut()) {
            add(a, v);
        }
        add(&c.no_channel, &mut self.no_channel);
        add(&c.send_errors, &mut self.send_errors);
        add(&c.truncated, &mut self.truncated);
        add(&c.empty, &mut self.empty);
        add(&c.rx_errors, &mut self.rx_errors);
    }
}

/// Preallocated `recvmmsg`/`sendmmsg` state for one batch. The kernel-facing pointers are
/// rebuilt before every call from the vectors' current addresses, so no stored pointer can go
/// stale.
struct Batch {
    cap: usize,
    bufs: Vec<[u8; BUF_LEN]>,
    rx_names: Vec<libc::sockaddr_in>,
    rx_iov: Vec<libc::iovec>,
    rx_cmsg: Vec<CmsgBuf>,
    rx_msgs: Vec<libc::mmsghdr>,
    tx_names: Vec<libc::sockaddr_in>,
    tx_iov: Vec<libc::iovec>,
    tx_cmsg: Vec<CmsgBuf>,
    tx_msgs: Vec<libc::mmsghdr>,
    /// Direction (`from_leg`) of each queued datagram, for the per-channel counters.
    tx_leg: Vec<usize>,
    /// Datagrams queued in `tx_*`.
    queued: usize,
}

fn zeroed_sockaddr() -> libc::sockaddr_in {
    cmsg::to_sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: `mmsghdr` is a C struct of integers and raw pointers; all-zero is valid (null
    // pointers, zero lengths).
    unsafe { std::mem::zeroed() }
}

impl Batch {
    fn new(cap: usize) -> Self {
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Self {
            cap,
            bufs: vec![[0; BUF_LEN]; cap],
            rx_names: vec![zeroed_sockaddr(); cap],
            rx_iov: vec![iov; cap],
            rx_cmsg: vec![CmsgBuf::ZERO; cap],
            rx_msgs: (0..cap).map(|_| zeroed_mmsghdr()).collect(),
            tx_names: vec![zeroed_sockaddr(); cap],
            tx_iov: vec![iov; cap],
            tx_cmsg: vec![CmsgBuf::ZERO; cap],
            tx_msgs: (0..cap).map(|_| zeroed_mmsghdr()).collect(),
            tx_leg: vec![0; cap],
            queued: 0,
        }
    }

    /// Points every receive message at its buffer, name and control buffer, with full lengths
    /// (the kernel overwrites `msg_namelen`, `msg_controllen` and `msg_flags` on return).
    fn prepare_rx(&mut self) {
        let bufs = self.bufs.as_mut_ptr();
        let names = self.rx_names.as_mut_ptr();
        let iovs = self.rx_iov.as_mut_ptr();
        let cmsgs = self.rx_cmsg.as_mut_ptr();
        for i in 0..self.cap {
            // SAFETY: `i < cap`, the length of every vector here, so each `add(i)` stays in its
            // allocation; the pointers are only stored, not dereferenced, here.
            let (buf, name, iov, cm) =
                unsafe { (bufs.add(i), names.add(i), iovs.add(i), cmsgs.add(i)) };
            self.rx_iov[i] = libc::iovec {
                iov_base: buf.cast(),
                iov_len: BUF_LEN,
            };
            let h = &mut self.rx_msgs[i].msg_hdr;
            h.msg_name = name.cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            h.msg_control = cm.cast();
            h.msg_controllen = CMSG_CAP as _;
            h.msg_flags = 0;
            self.rx_msgs[i].msg_len = 0;
        }
    }

    /// Queues received datagram `i` (its first `len` bytes) for sending to `to`.
    fn queue(
        &mut self,
        i: usize,
        len: usize,
        to: SocketAddrV4,
        src: Option<Ipv4Addr>,
        tos: Option<u8>,
        leg: usize,
    ) {
        let q = self.queued;
        self.tx_names[q] = cmsg::to_sockaddr(to);
        let clen = cmsg::encode_tx(&mut self.tx_cmsg[q], src, tos);
        self.tx_leg[q] = leg;
        // SAFETY: `i` and `q` are below `cap`, the length of every vector here; the pointers
        // are stored for the next `sendmmsg`, which runs before the buffers are reused.
        let (buf, name, iov, cm) = unsafe {
            (
                self.bufs.as_mut_ptr().add(i),
                self.tx_names.as_mut_ptr().add(q),
                self.tx_iov.as_mut_ptr().add(q),
                self.tx_cmsg.as_mut_ptr().add(q),
            )
        };
        self.tx_iov[q] = libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        };
        let h = &mut self.tx_msgs[q].msg_hdr;
        h.msg_name = name.cast();
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = iov;
        h.msg_iovlen = 1;
        h.msg_control = if clen == 0 {
            std::ptr::null_mut()
        } else {
            cm.cast()
        };
        h.msg_controllen = clen as _;
        h.msg_flags = 0;
        self.queued += 1;
    }
}

/// The `IP_PKTINFO` source for a datagram the rule sends from `from`, when the socket is bound
/// to the wildcard: the leg's relay address, unless it is unset or not IPv4.
fn source_for(from: SocketAddr) -> Option<Ipv4Addr> {
    match from.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

#[allow(
    clippy::unnecessary_cast,
    reason = "size_t with glibc, socklen_t with musl"
)]
fn controllen(h: &libc::msghdr) -> usize {
    h.msg_controllen as usize
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` outlives the call and the length is that of a c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A relay socket: non-blocking, close-on-exec, large buffers, TOS reported, bound to `addr`
/// (no `SO_REUSEADDR`/`SO_REUSEPORT`: a port in use is an error, not a shared port).
fn open_socket(addr: SocketAddrV4) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    let fd = s.as_raw_fd();
    // Best effort: the *FORCE variants exceed net.core.[rw]mem_max but need CAP_NET_ADMIN;
    // otherwise the kernel caps the plain request at the sysctl.
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
    setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1)?;
    s.bind(&SocketAddr::V4(addr).into())?;
    Ok(s)
}

fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call; both fds are open.
    let rc = unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers `fd` in `epoll` for readability under `token` (level-triggered).
pub(crate) fn epoll_add(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, token)
}

/// Registers the eventfd of a worker.
pub(crate) fn epoll_add_wake(epoll: RawFd, wake: RawFd) -> io::Result<()> {
    epoll_add(epoll, wake, WAKE_TOKEN)
}

/// Generations are compared modulo 2^31 so a socket token never has the top bit set, which
/// keeps it distinct from [`WAKE_TOKEN`].
const GENERATION_MASK: u32 = 0x7fff_ffff;

fn token(generation: u32, slot: usize, component: usize) -> u64 {
    (u64::from(generation & GENERATION_MASK) << 32) | ((slot as u64) << 1) | component as u64
}

fn untoken(token: u64) -> (u32, usize, usize) {
    (
        (token >> 32) as u32 & GENERATION_MASK,
        ((token & 0xffff_ffff) >> 1) as usize,
        (token & 1) as usize,
    )
}

pub(crate) struct Worker {
    epoll: OwnedFd,
    wake: Arc<OwnedFd>,
    commands: Receiver<Command>,
    counters: Arc<WorkerCounters>,
    bind_addr: Ipv4Addr,
    observer: Option<ChannelObserver>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    by_port: HashMap<u16, usize>,
    batch: Batch,
    tally: Tally,
}

impl Worker {
    pub(crate) fn new(init: WorkerInit) -> Self {
        Self {
            epoll: init.epoll,
            wake: init.wake,
            commands: init.commands,
            counters: init.counters,
            bind_addr: init.bind_addr,
            observer: init.observer,
            slots: Vec::new(),
            free: Vec::new(),
            by_port: HashMap::new(),
            batch: Batch::new(init.batch),
            tally: Tally::default(),
        }
    }

    /// The event loop; returns on shutdown (dropping the worker closes every socket).
    pub(crate) fn run(mut self) {
        // SAFETY: an all-zero epoll_event is valid.
        let mut events = [unsafe { std::mem::zeroed::<libc::epoll_event>() }; MAX_EVENTS];
        loop {
            // SAFETY: `events` is writable for MAX_EVENTS entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    MAX_EVENTS as i32,
                    -1,
                )
            };
            if n < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                // EBADF/EINVAL/EFAULT: a bug, not a network condition. Exiting drops the command
                // queue, so control-plane calls fail with `ShutDown` instead of hanging.
                log::error!(
                    "userspace relay worker: epoll_wait: {}",
                    io::Error::last_os_error()
                );
                return;
            }
            let mut woken = false;
            for ev in &events[..n as usize] {
                let t = ev.u64;
                if t == WAKE_TOKEN {
                    woken = true;
                } else {
                    self.service(t);
                }
            }
            self.tally.flush(&self.counters);
            // Commands run after the events of this round, so no event refers to a socket
            // closed in the same round.
            if woken && !self.run_commands() {
                return;
            }
        }
    }

    /// Handles queued commands; false on shutdown.
    fn run_commands(&mut self) -> bool {
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into `value`; the eventfd is non-blocking (EAGAIN is harmless).
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        loop {
            match self.commands.try_recv() {
                Ok(Command::Install {
                    port,
                    channel,
                    shared,
                    reply,
                }) => {
                    let _ = reply.send(self.install(port, channel, shared));
                }
                Ok(Command::Remove { port, reply }) => {
                    let _ = reply.send(self.remove(port));
                }
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn install(
        &mut self,
        port: u16,
        channel: Channel,
        shared: Arc<ChannelShared>,
    ) -> Result<(), DataPathError> {
        if let Some(st) = self
            .by_port
            .get(&port)
            .and_then(|&s| self.slots[s].state.as_mut())
        {
            // Replace the configuration; sockets (and their queued datagrams) stay.
            st.channel = channel;
            st.shared = shared;
            *st.shared
                .channel
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = channel;
            return Ok(());
        }
        let rtp = open_socket(SocketAddrV4::new(self.bind_addr, port))
            .map_err(|source| DataPathError::Bind { port, source })?;
        let rtcp = open_socket(SocketAddrV4::new(self.bind_addr, port + 1)).map_err(|source| {
            DataPathError::Bind {
                port: port + 1,
                source,
            }
        })?;
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    state: None,
                });
                self.slots.len() - 1
            }
        };
        let generation = self.slots[slot].generation;
        let ep = self.epoll.as_raw_fd();
        let registered = epoll_add(ep, rtp.as_raw_fd(), token(generation, slot, 0))
            .and_then(|()| epoll_add(ep, rtcp.as_raw_fd(), token(generation, slot, 1)));
        if let Err(e) = registered {
            // Closing the sockets (on return) also removes them from the epoll set.
            self.slots[slot].generation = generation.wrapping_add(1);
            self.free.push(slot);
            return Err(DataPathError::Io(e));
        }
        *shared
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = channel;
        self.slots[slot].state = Some(ChannelState {
            port,
            channel,
            shared,
            sockets: [rtp, rtcp],
        });
        self.by_port.insert(port, slot);
        Ok(())
    }

    fn remove(&mut self, port: u16) -> Result<(), DataPathError> {
        let slot = self
            .by_port
            .remove(&port)
            .ok_or(DataPathError::NotFound(port))?;
        let s = &mut self.slots[slot];
        s.generation = s.generation.wrapping_add(1);
        if let Some(st) = s.state.take() {
            for sock in &st.sockets {
                let _ = epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    sock.as_raw_fd(),
                    0,
                );
            }
            // Dropping `st` closes both sockets now, so the ports can be bound again at once.
        }
        self.free.push(slot);
        Ok(())
    }

    /// Reads, decides and forwards everything waiting on the socket behind `token`.
    fn service(&mut self, token: u64) {
        let (generation, slot, component) = untoken(token);
        let Self {
            slots,
            batch,
            tally,
            counters,
            observer,
            bind_addr,
            ..
        } = self;
        let Some(st) = slots
            .get_mut(slot)
            .filter(|s| s.generation & GENERATION_MASK == generation)
            .and_then(|s| s.state.as_mut())
        else {
            // Cannot happen while commands run between rounds; kept so a stale token is
            // counted rather than read from a recycled slot.
            tally.no_channel += 1;
            return;
        };
        let wildcard = bind_addr.is_unspecified();
        let fd = st.sockets[component].as_raw_fd();
        let relay_port = st.port + component as u16;
        for _ in 0..MAX_BATCHES_PER_WAKE {
            batch.prepare_rx();
            // SAFETY: `rx_msgs` holds `cap` headers pointing at live buffers of the stated sizes
            // (prepare_rx); MSG_DONTWAIT makes the call non-blocking; no timeout pointer.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    batch.rx_msgs.as_mut_ptr(),
                    batch.cap as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                match errno() {
                    libc::EINTR => continue,
                    libc::EAGAIN => break,
                    // E.g. a pending ICMP error: reading it clears it; nothing was received.
                    _ => {
                        tally.rx_errors += 1;
                        break;
                    }
                }
            }
            let n = n as usize;
            if n == 0 {
                break;
            }
            tally.rx_batches += 1;
            tally.rx_packets += n as u64;
            let now = monotonic_ns();
            for i in 0..n {
                let m = &batch.rx_msgs[i];
                let len = m.msg_len as usize;
                if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > BUF_LEN {
                    tally.truncated += 1;
                    continue;
                }
                let Some(src) = cmsg::from_sockaddr(&batch.rx_names[i], m.msg_hdr.msg_namelen)
                else {
                    tally.rx_errors += 1;
                    continue;
                };
                if len == 0 {
                    tally.empty += 1;
                }
                let tos = cmsg::decode_tos(&batch.rx_cmsg[i], controllen(&m.msg_hdr));
                let before = st.channel;
                let latched =
                    match forward::decide(&mut st.channel, relay_port, SocketAddr::V4(src)) {
                        Decision::Forward {
                            from_leg,
                            from,
                            to,
                            latched,
                        } => {
                            match to {
                                SocketAddr::V4(to) => {
                                    let src = if wildcard { source_for(from) } else { None };
                                    batch.queue(i, len, to, src, tos, from_leg);
                                }
                                // An IPv6 peer cannot be reached from an IPv4 socket.
                                SocketAddr::V6(_) => tally.send_errors += 1,
                            }
                            latched
                        }
                        Decision::Drop(reason) => {
                            tally.dropped[drop_index(reason)] += 1;
                            // DestinationUnknown may still have learnt the source.
                            st.channel != before
                        }
                    };
                if latched {
                    // Forward first (the packet that taught us the address), then publish.
                    flush_tx(fd, batch, st, tally, now);
                    tally.latched += 1;
                    tally.flush(counters);
                    *st.shared
                        .channel
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = st.channel;
                    if let Some(obs) = observer.as_ref() {
                        obs(st.port, &st.channel);
                    }
                }
            }
            flush_tx(fd, batch, st, tally, now);
            if n < batch.cap {
                break;
            }
        }
    }
}

/// Sends every queued datagram with as few `sendmmsg` calls as the kernel allows, then credits
/// what was sent to the channel's and the worker's counters. A failed datagram is counted and
/// skipped; it never stops the batch.
fn flush_tx(fd: RawFd, batch: &mut Batch, st: &ChannelState, tally: &mut Tally, now: u64) {
    let total = batch.queued;
    if total == 0 {
        return;
    }
    let mut sent = [(0u64, 0u64); 2];
    let mut off = 0;
    let mut waited = false;
    while off < total {
        // SAFETY: messages `off..total` were filled by `queue` and point at live buffers.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                batch.tx_msgs.as_mut_ptr().add(off),
                (total - off) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r > 0 {
            for k in off..off + r as usize {
                let s = &mut sent[batch.tx_leg[k]];
                s.0 += 1;
                s.1 += batch.tx_iov[k].iov_len as u64;
            }
            off += r as usize;
            continue;
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN if !waited => {
                // Send buffer full: give the device queue a moment, once per batch.
                waited = true;
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; bounded timeout.
                unsafe { libc::poll(&mut pfd, 1, SEND_WAIT_MS) };
            }
            libc::EAGAIN => {
                tally.send_errors += (total - off) as u64;
                break;
            }
            // ENOBUFS, EINVAL (e.g. a source address not on this host), unreachable...: this
            // datagram is lost, the rest of the batch still goes.
            _ => {
                tally.send_errors += 1;
                off += 1;
            }
        }
    }
    batch.queued = 0;
    for (dir, &(p, b)) in st.shared.stats.iter().zip(sent.iter()) {
        if p != 0 {
            dir.packets.fetch_add(p, Relaxed);
            dir.bytes.fetch_add(b, Relaxed);
            dir.last_seen_ns.store(now, Relaxed);
            tally.forwarded_packets += p;
            tally.forwarded_bytes += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_collide_with_the_wake_token() {
        for (g, s, c) in [(0, 0, 0), (1, 5, 1), (GENERATION_MASK, (1 << 31) - 1, 1)] {
            let t = token(g, s, c);
            assert_eq!(untoken(t), (g, s, c));
            assert_ne!(t, WAKE_TOKEN);
        }
        // Generations are compared masked, and the largest ones still differ from the wake token.
        assert_eq!(untoken(token(u32::MAX, 3, 0)), (GENERATION_MASK, 3, 0));
        assert_ne!(token(u32::MAX, (1 << 31) - 1, 1), WAKE_TOKEN);
    }
}
