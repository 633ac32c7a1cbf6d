//! The socket relay: forwards each channel's RTP and RTCP between its two legs with batched
//! `recvmmsg`/`sendmmsg`, applying [`forward::decide`](crate::forward::decide) to every
//! datagram.
//!
//! It carries all traffic when XDP is unavailable, and otherwise what the XDP program passes up
//! (new flows, unlatched legs, unknown sources). The invariant a reader must know: **a channel,
//! its two sockets and its live forwarding state belong to exactly one worker thread**
//! (`(port / 2) % workers`). Other threads reach them only through that worker's command queue
//! (woken by an eventfd in its epoll set), so the hot loop takes no lock; they read counters
//! from atomics and the latched channel from a snapshot the worker publishes on each latch.
//! Sockets are created by the worker itself, so they live in the network namespace the relay
//! was started in, whichever thread calls [`DataPath::install`].
mod cmsg;
mod worker;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Duration;

use relay_common::quality::{RtpHeader, RtpState};
use relay_common::{Channel, ChannelStats, DirectionStats};

use crate::forward::DropReason;
use crate::{DataPath, DataPathError};
use worker::{Command, Worker, WorkerInit};

/// The control-message codec, reachable by the fuzz targets (`fuzz/`): not an API.
#[doc(hidden)]
pub mod cmsg_codec {
    use std::net::{Ipv4Addr, SocketAddrV4};

    pub use super::cmsg::CMSG_CAP;
    use super::cmsg::{self, CmsgBuf};

    /// [`cmsg::decode_tos`] on the first `CMSG_CAP` bytes of `bytes` (zero-padded), with the
    /// `msg_controllen` `len` the kernel would have returned.
    pub fn decode_tos(bytes: &[u8], len: usize) -> Option<u8> {
        let mut buf = CmsgBuf::ZERO;
        let n = bytes.len().min(CMSG_CAP);
        buf.0[..n].copy_from_slice(&bytes[..n]);
        cmsg::decode_tos(&buf, len)
    }

    /// [`cmsg::encode_tx`] into a fresh buffer: the buffer and `msg_controllen`.
    pub fn encode_tx(src: Option<Ipv4Addr>, tos: Option<u8>) -> ([u8; CMSG_CAP], usize) {
        let mut buf = CmsgBuf::ZERO;
        let len = cmsg::encode_tx(&mut buf, src, tos);
        (buf.0, len)
    }

    /// `sockaddr_in` round trip: what [`cmsg::from_sockaddr`] reads back from
    /// [`cmsg::to_sockaddr`], with the family and the name length given.
    pub fn sockaddr_round_trip(addr: SocketAddrV4, family: u16, len: u32) -> Option<SocketAddrV4> {
        let mut sa = cmsg::to_sockaddr(addr);
        sa.sin_family = family as libc::sa_family_t;
        cmsg::from_sockaddr(&sa, len as libc::socklen_t)
    }
}

/// How long a control-plane call waits for the owning worker to answer. Binding two sockets
/// takes microseconds; this only bounds the damage of a stuck worker.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// `UIO_MAXIOV`: the most messages one `recvmmsg`/`sendmmsg` takes.
const MAX_BATCH: usize = 1024;

/// Configuration of [`UserspaceRelay`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserspaceConfig {
    /// Lowest relay port (inclusive). Channels are keyed by an even RTP port in range; RTCP
    /// uses the port above it, which must be in range too.
    pub port_min: u16,
    /// Highest relay port (inclusive).
    pub port_max: u16,
    /// Address the relay sockets bind to. With the wildcard, each datagram is sent from the
    /// destination leg's `local_addr` (`IP_PKTINFO`), so a multi-homed relay answers from the
    /// address the peer talks to.
    pub bind_addr: Ipv4Addr,
    /// Forwarding threads.
    pub workers: usize,
    /// Datagrams per `recvmmsg`/`sendmmsg` (1..=1024).
    pub batch: usize,
}

impl Default for UserspaceConfig {
    fn default() -> Self {
        Self {
            port_min: 30528,
            port_max: 30887,
            bind_addr: Ipv4Addr::UNSPECIFIED,
            workers: thread::available_parallelism().map_or(1, |n| n.get()),
            batch: 32,
        }
    }
}

/// Called (from a worker thread) after a packet latched an endpoint, with the channel's even
/// RTP port and the updated channel. The latching packet has already been forwarded. It runs
/// on the hot path of that worker: keep it short, and do not call
/// [`DataPath::install`]/[`DataPath::remove`] from it (they return an error there).
pub type ChannelObserver = Arc<dyn Fn(u16, &Channel) + Send + Sync>;

/// What a worker reports after a packet latched an endpoint: the channel before and after,
/// and the generation the channel was installed or last updated with
/// ([`UserspaceRelay::install_with`]; 0 for [`DataPath::install`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatchNotice {
    /// Even RTP port.
    pub port: u16,
    pub generation: u64,
    /// The channel before the packet.
    pub before: Channel,
    /// The channel with the newly latched endpoint.
    pub channel: Channel,
}

impl LatchNotice {
    /// The endpoints this latch confirmed, as (leg, component index: 0 RTP, 1 RTCP).
    pub fn latched(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..2).flat_map(move |leg| {
            (0..2).filter_map(move |c| {
                let pick = |ch: &Channel| {
                    let l = &ch.legs[leg];
                    if c == 0 { l.rtp } else { l.rtcp }
                };
                let (old, new) = (pick(&self.before), pick(&self.channel));
                (new.is_latched() && new != old).then_some((leg, c))
            })
        })
    }
}

/// Like [`ChannelObserver`], with the whole [`LatchNotice`]. The same rules apply: it runs on
/// the worker's hot path and must neither block nor change channels.
pub type LatchObserver = Arc<dyn Fn(&LatchNotice) + Send + Sync>;

/// Called (from a worker thread) with a channel's even RTP port for the `CLOCK_MONOTONIC`
/// time of the last packet the *fast path* forwarded from each leg (0 = never), or `None`.
/// The Handover latching policy needs it to tell a silent leg from one the fast path carries;
/// it is asked only for packets from no latched source, at most once per leg and silence
/// period ([`forward::decide`](crate::forward::decide)).
pub type FastPathLastSeen = Arc<dyn Fn(u16) -> Option<[u64; 2]> + Send + Sync>;

/// A snapshot of the relay's global counters, summed over the workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserspaceCounters {
    /// Datagrams read from relay sockets (all of them, including dropped ones).
    pub rx_packets: u64,
    /// `recvmmsg` calls that returned datagrams (`rx_packets / rx_batches` = mean batch).
    pub rx_batches: u64,
    /// Datagrams sent to a peer.
    pub forwarded_packets: u64,
    /// UDP payload bytes sent to peers.
    pub forwarded_bytes: u64,
    /// Latching events (an endpoint learnt from traffic); one observer call each.
    pub latched: u64,
    /// Datagrams dropped by the forwarding rule, indexed like [`DropReason::ALL`]; see
    /// [`Self::dropped`].
    pub dropped: [u64; DropReason::ALL.len()],
    /// Readiness reported for a channel already removed (its datagrams die with the socket).
    pub no_channel: u64,
    /// Datagrams the forwarding rule accepted but the kernel refused to send (full buffers,
    /// source address not local, unreachable...), or addressed to an IPv6 peer.
    pub send_errors: u64,
    /// Datagrams longer than the receive buffer, dropped.
    pub truncated: u64,
    /// Zero-length datagrams (forwarded or dropped by the rule like any other; counted here too).
    pub empty: u64,
    /// Receive errors: `recvmmsg` failures other than `EAGAIN`/`EINTR`, datagrams without an
    /// IPv4 source.
    pub rx_errors: u64,
}

impl UserspaceCounters {
    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[drop_index(reason)]
    }
}

/// Index of `reason` in [`DropReason::ALL`] (and [`UserspaceCounters::dropped`]).
fn drop_index(reason: DropReason) -> usize {
    match reason {
        DropReason::UnknownSource => 0,
        DropReason::Ambiguous => 1,
        DropReason::DestinationUnknown => 2,
        DropReason::Learning => 3,
        DropReason::NotRelayAddress => 4,
        DropReason::NotMedia => 5,
    }
}

/// Global counters of one worker, written by it alone (Relaxed adds once per batch).
#[derive(Default)]
#[repr(align(64))] // one cache line per worker: no false sharing between writers
struct WorkerCounters {
    rx_packets: AtomicU64,
    rx_batches: AtomicU64,
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    latched: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    no_channel: AtomicU64,
    send_errors: AtomicU64,
    truncated: AtomicU64,
    empty: AtomicU64,
    rx_errors: AtomicU64,
}

impl WorkerCounters {
    fn add_into(&self, s: &mut UserspaceCounters) {
        s.rx_packets += self.rx_packets.load(Relaxed);
        s.rx_batches += self.rx_batches.load(Relaxed);
        s.forwarded_packets += self.forwarded_packets.load(Relaxed);
        s.forwarded_bytes += self.forwarded_bytes.load(Relaxed);
        s.latched += self.latched.load(Relaxed);
        for (d, a) in s.dropped.iter_mut().zip(self.dropped.iter()) {
            *d += a.load(Relaxed);
        }
        s.no_channel += self.no_channel.load(Relaxed);
        s.send_errors += self.send_errors.load(Relaxed);
        s.truncated += self.truncated.load(Relaxed);
        s.empty += self.empty.load(Relaxed);
        s.rx_errors += self.rx_errors.load(Relaxed);
    }
}

/// Forwarded traffic in one direction of a channel.
#[derive(Default)]
struct DirectionCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    last_seen_ns: AtomicU64,
    /// RTP quality, written by the owning worker alone ([`AtomicRtp`]).
    rtp: AtomicRtp,
}

/// An [`RtpState`] other threads can read while the owning worker updates it: one atomic per
/// 8-byte word, plain loads and stores (single writer). A reader may see words of two
/// consecutive updates, i.e. statistics one packet apart, never a torn word.
#[derive(Default)]
struct AtomicRtp([AtomicU64; RTP_WORDS]);

const RTP_WORDS: usize = size_of::<RtpState>() / 8;
const _: () = assert!(size_of::<RtpState>() % 8 == 0);

impl AtomicRtp {
    fn load(&self) -> RtpState {
        let mut bytes = [0u8; size_of::<RtpState>()];
        for (b, w) in bytes.chunks_exact_mut(8).zip(self.0.iter()) {
            b.copy_from_slice(&w.load(Relaxed).to_ne_bytes());
        }
        relay_common::from_bytes(&bytes).unwrap_or_default()
    }
    fn store(&self, s: &RtpState) {
        for (b, w) in relay_common::as_bytes(s).chunks_exact(8).zip(self.0.iter()) {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            w.store(u64::from_ne_bytes(word), Relaxed);
        }
    }
}

/// What other threads can see of a channel: counters (written by the owning worker without
/// locks) and the channel as last published (on install and on each latch).
struct ChannelShared {
    stats: [DirectionCounters; 2],
    channel: Mutex<Channel>,
}

impl ChannelShared {
    fn new(channel: Channel) -> Self {
        Self {
            stats: Default::default(),
            channel: Mutex::new(channel),
        }
    }
    /// Accounts an RTP-port datagram forwarded from `from_leg` that arrived at `now` (owning
    /// worker only). Anything but an RTP version 2 header counts packets and bytes only.
    fn record_rtp(&self, from_leg: usize, payload: &[u8], now: u64, clock_rate: u32) {
        let Some(hdr) = payload
            .first_chunk::<8>()
            .and_then(|head| RtpHeader::parse(head, payload.len()))
        else {
            return;
        };
        let dir = &self.stats[from_leg & 1];
        let mut q = dir.rtp.load();
        q.update(hdr, now, clock_rate);
        dir.rtp.store(&q);
    }

    fn stats(&self) -> ChannelStats {
        let mut s = ChannelStats::default();
        for (out, c) in s.from_leg.iter_mut().zip(self.stats.iter()) {
            *out = DirectionStats {
                packets: c.packets.load(Relaxed),
                bytes: c.bytes.load(Relaxed),
                last_seen_ns: c.last_seen_ns.load(Relaxed),
                rtp: c.rtp.load(),
            };
        }
        s
    }
}

struct WorkerHandle {
    commands: Sender<Command>,
    wake: Arc<OwnedFd>,
    counters: Arc<WorkerCounters>,
    thread_id: ThreadId,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to the eventfd; it cannot block (EFD_NONBLOCK) and
        // a saturated counter (EAGAIN) still leaves the worker woken.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// The user-space data path. See the [module documentation](self).
pub struct UserspaceRelay {
    cfg: UserspaceConfig,
    workers: Vec<WorkerHandle>,
    /// Channels by even RTP port, for reads from any thread; changed only under `control`.
    channels: RwLock<HashMap<u16, Arc<ChannelShared>>>,
    /// Serialises install/remove so the registry and the workers agree.
    control: Mutex<()>,
}

impl fmt::Debug for UserspaceRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserspaceRelay")
            .field("cfg", &self.cfg)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

fn invalid(msg: &'static str) -> DataPathError {
    DataPathError::Io(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

/// Raises `RLIMIT_NOFILE` to its hard limit: every channel holds two sockets.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        log::warn!("cannot raise RLIMIT_NOFILE: {}", io::Error::last_os_error());
    }
}

fn new_fd(rc: libc::c_int) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `rc` is a new file descriptor this process owns and nothing else closes.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

impl UserspaceRelay {
    /// Starts the workers. Call it from the thread (and network namespace) the relay sockets
    /// must live in: workers inherit it and create every socket themselves.
    pub fn start(
        cfg: UserspaceConfig,
        observer: Option<ChannelObserver>,
    ) -> Result<Self, DataPathError> {
        Self::start_with_fast_path(cfg, observer, None)
    }

    /// [`Self::start`], with a view of the fast path's last-seen times for the Handover
    /// latching policy (see [`FastPathLastSeen`]).
    pub fn start_with_fast_path(
        cfg: UserspaceConfig,
        observer: Option<ChannelObserver>,
        fast_path_last_seen: Option<FastPathLastSeen>,
    ) -> Result<Self, DataPathError> {
        let observer = observer.map(|o| {
            let l: LatchObserver = Arc::new(move |n: &LatchNotice| o(n.port, &n.channel));
            l
        });
        Self::start_with_hooks(cfg, observer, fast_path_last_seen)
    }

    /// [`Self::start_with_fast_path`] with a [`LatchObserver`].
    pub fn start_with_hooks(
        cfg: UserspaceConfig,
        observer: Option<LatchObserver>,
        fast_path_last_seen: Option<FastPathLastSeen>,
    ) -> Result<Self, DataPathError> {
        if cfg.port_min > cfg.port_max {
            return Err(invalid("port_min is above port_max"));
        }
        if cfg.workers == 0 {
            return Err(invalid("workers must be at least 1"));
        }
        if !(1..=MAX_BATCH).contains(&cfg.batch) {
            return Err(invalid("batch must be within 1..=1024"));
        }
        raise_nofile_limit();
        let mut relay = Self {
            cfg: cfg.clone(),
            workers: Vec::with_capacity(cfg.workers),
            channels: RwLock::default(),
            control: Mutex::new(()),
        };
        // On error, dropping `relay` stops the workers already started.
        for i in 0..cfg.workers {
            // SAFETY: plain syscalls creating new descriptors, checked by `new_fd`.
            let epoll = new_fd(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
            // SAFETY: as above.
            let wake = Arc::new(new_fd(unsafe {
                libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            })?);
            worker::epoll_add_wake(epoll.as_raw_fd(), wake.as_raw_fd())?;
            let (tx, rx) = mpsc::channel();
            let counters = Arc::new(WorkerCounters::default());
            let init = WorkerInit {
                epoll,
                wake: Arc::clone(&wake),
                commands: rx,
                counters: Arc::clone(&counters),
                bind_addr: cfg.bind_addr,
                batch: cfg.batch,
                observer: observer.clone(),
                fast_path_last_seen: fast_path_last_seen.clone(),
            };
            let thread = thread::Builder::new()
                .name(format!("hr-user-{i}"))
                .spawn(move || Worker::new(init).run())?;
            relay.workers.push(WorkerHandle {
                commands: tx,
                wake,
                counters,
                thread_id: thread.thread().id(),
                thread: Some(thread),
            });
        }
        Ok(relay)
    }

    /// A snapshot of the global counters.
    pub fn counters(&self) -> UserspaceCounters {
        let mut s = UserspaceCounters::default();
        for w in &self.workers {
            w.counters.add_into(&mut s);
        }
        s
    }

    /// Stops the workers and closes every socket (also done on drop).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for w in &self.workers {
            let _ = w.commands.send(Command::Shutdown);
            w.wake();
        }
        let me = thread::current().id();
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                // Dropped from an observer: the worker exits after the observer returns.
                if t.thread().id() != me && t.join().is_err() {
                    log::error!("userspace relay worker panicked");
                }
            }
        }
    }

    fn check_port(&self, port: u16) -> Result<(), DataPathError> {
        let (min, max) = (self.cfg.port_min, self.cfg.port_max);
        if port % 2 != 0 || port < min || port >= max {
            return Err(DataPathError::PortOutOfRange { port, min, max });
        }
        Ok(())
    }

    /// Sends a command to the worker owning `port` and waits for its answer.
    fn request<T>(
        &self,
        port: u16,
        make: impl FnOnce(mpsc::SyncSender<Result<T, DataPathError>>) -> Command,
    ) -> Result<T, DataPathError> {
        let w = &self.workers[usize::from(port / 2) % self.workers.len()];
        if w.thread_id == thread::current().id() {
            return Err(DataPathError::Io(io::Error::new(
                io::ErrorKind::WouldBlock,
                "channel changes cannot be made from the worker thread that owns the port",
            )));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        w.commands
            .send(make(tx))
            .map_err(|_| DataPathError::ShutDown)?;
        w.wake();
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(DataPathError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "userspace relay worker did not answer",
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(DataPathError::ShutDown),
        }
    }

    /// Installs the channel on `port`, or updates it: on an existing channel, legs whose
    /// `replace` flag is false keep what the worker holds (latched endpoints, learning
    /// progress), decided by the worker itself so that no latch is lost between a read and a
    /// write. Counters are kept on an update and start at zero on a new channel. `generation`
    /// is echoed in the [`LatchNotice`]s of this channel. Returns the channel as installed.
    pub fn install_with(
        &self,
        port: u16,
        channel: &Channel,
        replace: [bool; 2],
        generation: u64,
    ) -> Result<Channel, DataPathError> {
        self.check_port(port)?;
        let _guard = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = self
            .shared(port)
            .unwrap_or_else(|_| Arc::new(ChannelShared::new(*channel)));
        let channel = *channel;
        let for_worker = Arc::clone(&shared);
        let installed = self.request(port, |reply| Command::Install {
            port,
            channel,
            replace,
            generation,
            shared: for_worker,
            reply,
        })?;
        self.channels
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port, shared);
        Ok(installed)
    }

    fn shared(&self, port: u16) -> Result<Arc<ChannelShared>, DataPathError> {
        let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&port).cloned().ok_or(DataPathError::NotFound(port))
    }
}

impl Drop for UserspaceRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

impl DataPath for UserspaceRelay {
    fn name(&self) -> &'static str {
        "userspace"
    }

    /// Binds the channel's RTP and RTCP sockets (in the owning worker) and returns once they
    /// are bound. On an existing port, replaces the channel and keeps sockets and counters.
    fn install(&self, port: u16, channel: &Channel) -> Result<(), DataPathError> {
        self.install_with(port, channel, [true; 2], 0).map(|_| ())
    }

    /// Removes the channel and closes its sockets before returning.
    fn remove(&self, port: u16) -> Result<(), DataPathError> {
        let _guard = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        self.shared(port)?;
        let r = self.request(port, |reply| Command::Remove { port, reply });
        if matches!(r, Ok(()) | Err(DataPathError::NotFound(_))) {
            self.channels
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&port);
        }
        r
    }

    fn channel(&self, port: u16) -> Result<Channel, DataPathError> {
        let shared = self.shared(port)?;
        let ch = *shared
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(ch)
    }

    fn stats(&self, port: u16) -> Result<ChannelStats, DataPathError> {
        Ok(self.shared(port)?.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_index_follows_drop_reason_all() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(drop_index(*r), i);
        }
        let mut c = UserspaceCounters::default();
        c.dropped[1] = 7;
        assert_eq!(c.dropped(DropReason::Ambiguous), 7);
    }

    #[test]
    fn port_checks_cover_parity_and_both_ends() {
        let cfg = UserspaceConfig {
            port_min: 1000,
            port_max: 1003,
            workers: 1,
            ..Default::default()
        };
        let relay = UserspaceRelay::start(cfg, None).expect("start");
        for port in [998, 999, 1001, 1003, 1004] {
            assert!(matches!(
                relay.check_port(port),
                Err(DataPathError::PortOutOfRange { port: p, min: 1000, max: 1003 }) if p == port
            ));
        }
        assert!(relay.check_port(1000).is_ok());
        assert!(relay.check_port(1002).is_ok());
        relay.shutdown();
    }

    #[test]
    fn bad_configs_are_refused() {
        for cfg in [
            UserspaceConfig {
                port_min: 2,
                port_max: 1,
                ..Default::default()
            },
            UserspaceConfig {
                workers: 0,
                ..Default::default()
            },
            UserspaceConfig {
                batch: 0,
                ..Default::default()
            },
            UserspaceConfig {
                batch: MAX_BATCH + 1,
                ..Default::default()
            },
        ] {
            assert!(matches!(
                UserspaceRelay::start(cfg, None),
                Err(DataPathError::Io(_))
            ));
        }
    }
}
