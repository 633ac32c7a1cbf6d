//! One forwarding thread: an epoll loop over the sockets of the channels it owns.
//!
//! The invariant: **a channel's sockets and its forwarding state are touched only by this
//! thread.** Other threads send [`Command`]s through a queue and wake the loop with an eventfd;
//! the hot path ([`Worker::service`]) therefore takes no lock and logs nothing, and its own
//! buffers are preallocated: `recvmmsg` into them, [`forward::decide`] per datagram, one
//! `sendmmsg` from the same socket. The only lock it ever takes is the channel snapshot, when a
//! packet latches an endpoint (once per leg and component, not per packet).
//!
//! Sockets are registered edge-triggered: a socket is reported once per arrival edge, so the
//! worker reads it until the kernel has nothing left (a short batch) or, when it stops early for
//! fairness, remembers it and comes back after the other ready sockets.
use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, PoisonError};

use relay_common::Channel;
use socket2::{Domain, Protocol, Socket, Type};

use super::cmsg::{self, CMSG_CAP, CmsgBuf};
use super::{
    ChannelShared, FastPathLastSeen, LatchNotice, LatchObserver, WorkerCounters, drop_index,
};
use crate::DataPathError;
use crate::datapath::monotonic_ns;
use crate::forward::{self, Datagram, Decision, DropReason, LatchState};

/// Receive buffer per datagram. RTP over UDP stays below the path MTU; anything longer is cut
/// by the kernel (`MSG_TRUNC`), dropped and counted.
pub(crate) const BUF_LEN: usize = 2048;
/// Requested `SO_RCVBUF` (the kernel doubles it for its bookkeeping). It bounds the queue a
/// socket can build while its worker is busy, and so the delay an overloaded worker adds:
/// datagrams that do not fit are dropped by the kernel on arrival instead of being forwarded
/// too late to be played. 1 MiB holds about 2,500 datagrams of 200 bytes (about 830 bytes of
/// kernel memory each on loopback, 1,100 on veth): a stalled worker's backlog, or about 8 ms of
/// a flood at 250 kpps. 4 MiB let an overloaded socket queue over 30 ms, all of it late.
const RECV_BUFFER: libc::c_int = 1 << 20;
/// Requested `SO_SNDBUF`: only datagrams still queued on the way out (qdisc, device) count
/// against it, so it adds no delay and costs memory only under transmit congestion.
const SEND_BUFFER: libc::c_int = 4 << 20;
/// Batches read from one socket per visit before moving on, so a flood on one channel cannot
/// starve the others; a socket left with data is visited again after the other ready sockets.
const MAX_BATCHES_PER_WAKE: usize = 8;
/// epoll events handled per `epoll_wait`.
const MAX_EVENTS: usize = 256;
/// The epoll token of the eventfd; socket tokens never have the top bit set ([`token`]).
const WAKE_TOKEN: u64 = u64::MAX;

type Reply = SyncSender<Result<(), DataPathError>>;
/// The answer to an install: the channel as the worker now holds it.
type InstallReply = SyncSender<Result<Channel, DataPathError>>;

/// A request from another thread, answered on `reply`.
pub(crate) enum Command {
    /// Installs a new channel, or updates an existing one: legs whose `replace` flag is false
    /// keep what the worker holds (latched endpoints included), decided here, so no latch
    /// can fall between a caller's read and its write.
    Install {
        port: u16,
        channel: Channel,
        replace: [bool; 2],
        generation: u64,
        shared: Arc<ChannelShared>,
        reply: InstallReply,
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
    pub(crate) observer: Option<LatchObserver>,
    pub(crate) fast_path_last_seen: Option<FastPathLastSeen>,
}

/// A channel owned by this worker.
struct ChannelState {
    /// Even RTP port.
    port: u16,
    /// The caller's generation of this channel, echoed in latch notices.
    generation: u64,
    /// The live channel, latched in place by [`forward::decide`].
    channel: Channel,
    /// The latching policy's memory (sources being learnt, silence checks).
    latch: LatchState,
    shared: Arc<ChannelShared>,
    /// RTP socket (`port`) and RTCP socket (`port + 1`).
    sockets: [Socket; 2],
}

struct Slot {
    /// Bumped on removal, so an epoll token of a removed channel never matches its successor.
    generation: u32,
    /// Whether the RTP/RTCP socket is in [`Worker::pending`] (left with data by a visit).
    pending: [bool; 2],
    state: Option<ChannelState>,
}

/// Counter increments of one round, added to the shared atomics once per round.
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

/// Adds `v` to a counter this thread alone writes: a plain load and store, no locked
/// read-modify-write (readers on other threads still see whole values).
fn bump(a: &AtomicU64, v: u64) {
    a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
}

impl Tally {
    fn flush(&mut self, c: &WorkerCounters) {
        fn add(a: &AtomicU64, v: &mut u64) {
            if *v != 0 {
                bump(a, *v);
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

/// Preallocated `recvmmsg`/`sendmmsg` state for one batch.
///
/// The message headers point into the other arrays, once and for all ([`Batch::new`]): boxed
/// slices cannot grow, so their heap memory never moves (moving the `Batch` moves only the
/// boxes). Per call only lengths and addresses change.
struct Batch {
    cap: usize,
    bufs: Box<[[u8; BUF_LEN]]>,
    rx_names: Box<[libc::sockaddr_in]>,
    rx_iov: Box<[libc::iovec]>,
    rx_cmsg: Box<[CmsgBuf]>,
    rx_msgs: Box<[libc::mmsghdr]>,
    tx_names: Box<[libc::sockaddr_in]>,
    tx_iov: Box<[libc::iovec]>,
    tx_cmsg: Box<[CmsgBuf]>,
    tx_msgs: Box<[libc::mmsghdr]>,
    /// Direction (`from_leg`) of each queued datagram, for the per-channel counters.
    tx_leg: Box<[usize]>,
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

const SOCKADDR_IN_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;

impl Batch {
    fn new(cap: usize) -> Self {
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut b = Self {
            cap,
            bufs: vec![[0; BUF_LEN]; cap].into(),
            rx_names: vec![zeroed_sockaddr(); cap].into(),
            rx_iov: vec![iov; cap].into(),
            rx_cmsg: vec![CmsgBuf::ZERO; cap].into(),
            rx_msgs: (0..cap).map(|_| zeroed_mmsghdr()).collect(),
            tx_names: vec![zeroed_sockaddr(); cap].into(),
            tx_iov: vec![iov; cap].into(),
            tx_cmsg: vec![CmsgBuf::ZERO; cap].into(),
            tx_msgs: (0..cap).map(|_| zeroed_mmsghdr()).collect(),
            tx_leg: vec![0; cap].into(),
            queued: 0,
        };
        for i in 0..cap {
            b.rx_iov[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: BUF_LEN,
            };
            let h = &mut b.rx_msgs[i].msg_hdr;
            h.msg_name = (&raw mut b.rx_names[i]).cast();
            h.msg_iov = &raw mut b.rx_iov[i];
            h.msg_iovlen = 1;
            h.msg_control = (&raw mut b.rx_cmsg[i]).cast();
            let h = &mut b.tx_msgs[i].msg_hdr;
            h.msg_name = (&raw mut b.tx_names[i]).cast();
            h.msg_namelen = SOCKADDR_IN_LEN;
            h.msg_iov = &raw mut b.tx_iov[i];
            h.msg_iovlen = 1;
            h.msg_control = (&raw mut b.tx_cmsg[i]).cast();
        }
        b.reset_rx(cap);
        b
    }

    /// Restores the full name and control lengths of the first `n` receive messages, which the
    /// kernel overwrote with what it returned (it writes nothing into messages it did not fill).
    fn reset_rx(&mut self, n: usize) {
        for m in &mut self.rx_msgs[..n] {
            m.msg_hdr.msg_namelen = SOCKADDR_IN_LEN;
            m.msg_hdr.msg_controllen = CMSG_CAP as _;
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
        self.tx_iov[q] = libc::iovec {
            iov_base: self.bufs[i].as_mut_ptr().cast(),
            iov_len: len,
        };
        // The sockets never set IP_TOS, so they send with TOS 0 unless told otherwise: a zero
        // byte needs no control message.
        let tos = tos.filter(|&t| t != 0);
        self.tx_msgs[q].msg_hdr.msg_controllen =
            cmsg::encode_tx(&mut self.tx_cmsg[q], src, tos) as _;
        self.tx_leg[q] = leg;
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

/// A relay socket: non-blocking, close-on-exec, bounded buffers, TOS (and on the wildcard the
/// destination address) reported, bound to `addr`
/// (no `SO_REUSEADDR`/`SO_REUSEPORT`: a port in use is an error, not a shared port).
fn open_socket(addr: SocketAddrV4) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    let fd = s.as_raw_fd();
    // Best effort: the *FORCE variants exceed net.core.[rw]mem_max but need CAP_NET_ADMIN;
    // otherwise the kernel caps the plain request at the sysctl.
    for (force, plain, size) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RECV_BUFFER),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SEND_BUFFER),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, size).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, size);
        }
    }
    setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1)?;
    if addr.ip().is_unspecified() {
        // Which of the host's addresses each datagram was sent to: the rule takes only those
        // addressed to the relay address of their leg.
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    s.bind(&SocketAddr::V4(addr).into())?;
    Ok(s)
}

fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call; both fds are open.
    let rc = unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers a relay socket in `epoll` for readability under `token`, edge-triggered.
fn epoll_add_socket(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    epoll_ctl(
        epoll,
        libc::EPOLL_CTL_ADD,
        fd,
        (libc::EPOLLIN | libc::EPOLLET) as u32,
        token,
    )
}

/// Registers the eventfd of a worker (level-triggered: it stays reported until read).
pub(crate) fn epoll_add_wake(epoll: RawFd, wake: RawFd) -> io::Result<()> {
    epoll_ctl(
        epoll,
        libc::EPOLL_CTL_ADD,
        wake,
        libc::EPOLLIN as u32,
        WAKE_TOKEN,
    )
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

/// What a visit left on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Visit {
    /// Read until the kernel had nothing more (or the channel is gone).
    Drained,
    /// Stopped after [`MAX_BATCHES_PER_WAKE`] batches: there may be more.
    More,
}

pub(crate) struct Worker {
    epoll: OwnedFd,
    wake: Arc<OwnedFd>,
    commands: Receiver<Command>,
    counters: Arc<WorkerCounters>,
    bind_addr: Ipv4Addr,
    observer: Option<LatchObserver>,
    fast_path_last_seen: Option<FastPathLastSeen>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    by_port: HashMap<u16, usize>,
    batch: Batch,
    tally: Tally,
    /// Sockets a visit left with data, to visit again after the other ready sockets.
    pending: Vec<u64>,
    /// `CLOCK_MONOTONIC` when the current round's events arrived (one clock read per round).
    now: u64,
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
            fast_path_last_seen: init.fast_path_last_seen,
            slots: Vec::new(),
            free: Vec::new(),
            by_port: HashMap::new(),
            batch: Batch::new(init.batch),
            tally: Tally::default(),
            pending: Vec::new(),
            now: 0,
        }
    }

    /// The event loop; returns on shutdown (dropping the worker closes every socket).
    pub(crate) fn run(mut self) {
        // SAFETY: an all-zero epoll_event is valid.
        let mut events = [unsafe { std::mem::zeroed::<libc::epoll_event>() }; MAX_EVENTS];
        let mut revisit = Vec::new();
        loop {
            // With sockets still pending, only look for new events; otherwise sleep.
            let timeout = if self.pending.is_empty() { -1 } else { 0 };
            // SAFETY: `events` is writable for MAX_EVENTS entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    MAX_EVENTS as i32,
                    timeout,
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
            self.now = monotonic_ns();
            let mut woken = false;
            // Sockets left over from the last round first, then the newly ready ones.
            std::mem::swap(&mut revisit, &mut self.pending);
            for t in revisit.drain(..) {
                let (_, slot, component) = untoken(t);
                self.slots[slot].pending[component] = false;
                self.visit(t);
            }
            for ev in &events[..n as usize] {
                let t = ev.u64;
                if t == WAKE_TOKEN {
                    woken = true;
                } else {
                    self.visit(t);
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

    /// Services the socket behind `t`, and queues it for the next round if it may have more.
    fn visit(&mut self, t: u64) {
        if self.service(t) == Visit::More {
            let (_, slot, component) = untoken(t);
            let s = &mut self.slots[slot];
            if !s.pending[component] {
                s.pending[component] = true;
                self.pending.push(t);
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
                    replace,
                    generation,
                    shared,
                    reply,
                }) => {
                    let _ = reply.send(self.install(port, channel, replace, generation, shared));
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
        mut channel: Channel,
        replace: [bool; 2],
        generation: u64,
        shared: Arc<ChannelShared>,
    ) -> Result<Channel, DataPathError> {
        if let Some(st) = self
            .by_port
            .get(&port)
            .and_then(|&s| self.slots[s].state.as_mut())
        {
            // Replace the configuration; sockets (and their queued datagrams) stay. Legs not
            // replaced keep what this worker learnt, and their learning progress.
            for (leg, &r) in replace.iter().enumerate() {
                if r {
                    st.latch.forget_leg(leg);
                } else {
                    channel.legs[leg] = st.channel.legs[leg];
                }
            }
            if channel.latching != st.channel.latching {
                st.latch = LatchState::default();
            }
            st.channel = channel;
            st.generation = generation;
            st.shared = shared;
            *st.shared
                .channel
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = channel;
            return Ok(channel);
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
                    pending: [false; 2],
                    state: None,
                });
                self.slots.len() - 1
            }
        };
        let slot_gen = self.slots[slot].generation;
        let ep = self.epoll.as_raw_fd();
        let registered = epoll_add_socket(ep, rtp.as_raw_fd(), token(slot_gen, slot, 0))
            .and_then(|()| epoll_add_socket(ep, rtcp.as_raw_fd(), token(slot_gen, slot, 1)));
        if let Err(e) = registered {
            // Closing the sockets (on return) also removes them from the epoll set.
            self.slots[slot].generation = slot_gen.wrapping_add(1);
            self.free.push(slot);
            return Err(DataPathError::Io(e));
        }
        *shared
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = channel;
        self.slots[slot].state = Some(ChannelState {
            port,
            generation,
            channel,
            latch: LatchState::default(),
            shared,
            sockets: [rtp, rtcp],
        });
        self.by_port.insert(port, slot);
        Ok(channel)
    }

    fn remove(&mut self, port: u16) -> Result<(), DataPathError> {
        let slot = self
            .by_port
            .remove(&port)
            .ok_or(DataPathError::NotFound(port))?;
        let s = &mut self.slots[slot];
        s.generation = s.generation.wrapping_add(1);
        if s.pending != [false; 2] {
            s.pending = [false; 2];
            self.pending.retain(|&t| untoken(t).1 != slot);
        }
        if let Some(st) = s.state.take() {
            for sock in &st.sockets {
                let _ = epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    sock.as_raw_fd(),
                    0,
                    0,
                );
            }
            // Dropping `st` closes both sockets now, so the ports can be bound again at once.
        }
        self.free.push(slot);
        Ok(())
    }

    /// Reads, decides and forwards what is waiting on the socket behind `token`: until the
    /// kernel has no more, or for at most [`MAX_BATCHES_PER_WAKE`] batches.
    fn service(&mut self, token: u64) -> Visit {
        let (generation, slot, component) = untoken(token);
        let Self {
            slots,
            batch,
            tally,
            counters,
            observer,
            fast_path_last_seen,
            bind_addr,
            now,
            ..
        } = self;
        let now = *now;
        let Some(st) = slots
            .get_mut(slot)
            .filter(|s| s.generation & GENERATION_MASK == generation)
            .and_then(|s| s.state.as_mut())
        else {
            // Cannot happen while commands run between rounds; kept so a stale token is
            // counted rather than read from a recycled slot.
            tally.no_channel += 1;
            return Visit::Drained;
        };
        let pktinfo = bind_addr.is_unspecified();
        let fd = st.sockets[component].as_raw_fd();
        let relay_port = st.port + component as u16;
        for _ in 0..MAX_BATCHES_PER_WAKE {
            // SAFETY: `rx_msgs` holds `cap` headers pointing at live buffers of the stated sizes
            // (Batch::new, reset_rx); MSG_DONTWAIT makes the call non-blocking; no timeout.
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
                    libc::EAGAIN => return Visit::Drained,
                    libc::EINTR => continue,
                    // E.g. a pending ICMP error: reading it clears it; datagrams may follow.
                    _ => {
                        tally.rx_errors += 1;
                        continue;
                    }
                }
            }
            let n = n as usize;
            tally.rx_batches += 1;
            tally.rx_packets += n as u64;
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
                let rx = cmsg::decode_rx(&batch.rx_cmsg[i], controllen(&m.msg_hdr));
                // A socket bound to one address receives only what was sent to it.
                let dst = if pktinfo { rx.dst } else { Some(*bind_addr) };
                let before = st.channel;
                // Handover only, for a packet from no latched source: when was each leg last
                // heard on either path.
                let (shared, port) = (&st.shared, st.port);
                let last_seen = |leg: usize| {
                    let fast = fast_path_last_seen
                        .as_ref()
                        .and_then(|f| f(port))
                        .map_or(0, |t| t[leg & 1]);
                    shared.stats[leg & 1].last_seen_ns.load(Relaxed).max(fast)
                };
                let dgram = Datagram {
                    src: SocketAddr::V4(src),
                    dst: dst.map(IpAddr::V4),
                    payload: &batch.bufs[i][..len],
                };
                let decision = forward::decide(
                    &mut st.channel,
                    &mut st.latch,
                    relay_port,
                    &dgram,
                    now,
                    last_seen,
                );
                let latched = match decision {
                    Decision::Forward {
                        from_leg,
                        from,
                        to,
                        latched,
                    } => {
                        match to {
                            SocketAddr::V4(to) => {
                                if component == 0 {
                                    st.shared.record_rtp(
                                        from_leg,
                                        &batch.bufs[i][..len],
                                        now,
                                        st.channel.clock_rate,
                                    );
                                }
                                let src = if pktinfo { source_for(from) } else { None };
                                batch.queue(i, len, to, src, rx.tos, from_leg);
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
                    // The learnt source is visible to readers before the packet that taught
                    // it leaves (whoever sees the packet relayed sees the latch), while the
                    // fast path hears of it only after that packet left, so it cannot
                    // overtake it.
                    *st.shared
                        .channel
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = st.channel;
                    flush_tx(fd, batch, st, tally, now);
                    tally.latched += 1;
                    tally.flush(counters);
                    if let Some(obs) = observer.as_ref() {
                        obs(&LatchNotice {
                            port: st.port,
                            generation: st.generation,
                            before,
                            channel: st.channel,
                        });
                    }
                }
            }
            flush_tx(fd, batch, st, tally, now);
            batch.reset_rx(n);
            // A short batch: the kernel ran out of datagrams (the next arrival is a new edge).
            if n < batch.cap {
                return Visit::Drained;
            }
        }
        Visit::More
    }
}

/// Sends every queued datagram with as few `sendmmsg` calls as the kernel allows, then credits
/// what was sent to the channel's and the worker's counters. A failed datagram is counted and
/// skipped; it never stops the batch. A full send buffer (`EAGAIN`) drops the rest of the
/// batch: waiting for room would hold up every other channel of this worker.
fn flush_tx(fd: RawFd, batch: &mut Batch, st: &ChannelState, tally: &mut Tally, now: u64) {
    let total = batch.queued;
    if total == 0 {
        return;
    }
    let mut sent = [(0u64, 0u64); 2];
    let mut off = 0;
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
            bump(&dir.packets, p);
            bump(&dir.bytes, b);
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
