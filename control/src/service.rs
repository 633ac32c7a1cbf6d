//! The channel service: the logic between the gRPC layer and the relay. It owns the
//! [`Allocator`] and drives the data path through [`Dataplane`]: allocate → build the channel
//! ([`build_channel`]) → install; release → final counters → remove → free the slot; idle
//! timeouts; and a stream of [`Event`]s.
//!
//! The invariant a reader must know: **a channel is in the allocator if and only if it is
//! installed in the data path** (between requests). An install that fails releases the
//! allocation; a remove that fails leaves the allocation in place (the client may retry); a
//! channel the data path inherited from a previous process is removed at start, because the
//! allocator's state is not persisted.
//!
//! Concurrency: one `tokio::sync::Mutex` around the allocator and the per-channel records.
//! Every operation holds it across its data-path calls, so the allocator and the data path
//! change together and no release can overtake the install of the same channel. Those calls are
//! synchronous (binding two sockets, a map update: microseconds, bounded by the data path's own
//! reply timeout), and nothing is awaited while the lock is held. The tokio mutex rather than
//! `std`'s: requests queued behind a slow data-path call park as tasks instead of blocking
//! runtime threads. A dedicated task with a command channel would serialise the same way with
//! an extra hop per request.
//!
//! Events: the data path has no event callback, so latching and the move to the fast path are
//! found by a periodic diff ([`crate::config::EventsSection::poll_interval`], 250 ms by
//! default) of each channel against the last view: one snapshot read per channel per tick, plus
//! one fast-path map lookup for channels latched but not yet seen in the fast path.
//!
//! Idle timeouts: at the earliest idle deadline, each due channel's last packet time (from the
//! data path's counters, `CLOCK_MONOTONIC`) is converted to an `Instant` with one
//! [`Clock`] sample and given to [`Allocator::touch`] if media flowed since the last look; then
//! [`Allocator::expire`] releases what stayed idle. The allocator never moves time backwards, so
//! a touch with a packet time older than its newest input counts at that newest input: a channel
//! may outlive its timeout by at most the time since that input, never expire early.
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use relay_common::{
    Addr16, Be16, CHANNEL_USERSPACE_ONLY, Channel, ChannelStats, Endpoint, LEG_A, LEG_B, LatchMode,
    Latching, Leg, quality::MAX_CLOCK_RATE,
};
use relay_user::forward::Component;
use relay_user::{DataPath, DataPathError, Relay};
use tokio::sync::{Mutex, Notify, broadcast, watch};
use tokio::task::JoinHandle;

use crate::allocator::{
    AllocError, Allocator, ChannelInfo, Codec, Kind, Layout, MAX_MEDIA_TIMEOUT, MIN_MEDIA_TIMEOUT,
    Request, Slot, Status,
};
use crate::clock::Clock;
use crate::error::ServiceError;
use crate::metrics::{Metrics, Release};

/// What the channel service needs from the data plane: the [`DataPath`] it installs channels
/// in, and a view of the XDP fast path for events. Implemented by [`Relay`]; tests may run a
/// user-space-only `Relay` on loopback.
pub trait Dataplane: DataPath + 'static {
    /// The channel as the fast path holds it, if the fast path runs and holds it.
    fn fast_path_channel(&self, port: u16) -> Option<Channel>;
    /// Why the fast path is not running; `None` when it is.
    fn fast_path_unavailable(&self) -> Option<String>;
    /// Ports of channels installed before the control plane started (a previous process's
    /// pinned maps).
    fn inherited_ports(&self) -> Vec<u16>;
}

impl Dataplane for Relay {
    fn fast_path_channel(&self, port: u16) -> Option<Channel> {
        self.xdp().and_then(|x| x.channel(port).ok())
    }

    fn fast_path_unavailable(&self) -> Option<String> {
        self.xdp_unavailable().map(str::to_owned)
    }

    fn inherited_ports(&self) -> Vec<u16> {
        self.inherited().into_iter().map(|(port, _)| port).collect()
    }
}

/// How the relay learns a leg's media source. More policies come with the latching work; each
/// is applied in [`build_channel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LatchingPolicy {
    /// The first packet from a leg that is not latched yet latches it.
    #[default]
    FirstPacket,
    /// A new source latches after `packets` consecutive packets or `duration` since its first
    /// packet, whichever comes first (0 / zero: not a criterion); until then it is dropped.
    After { packets: u32, duration: Duration },
    /// Only the addresses given in the legs; nothing is learnt from traffic.
    Strict,
    /// Like `FirstPacket`; a new source takes over a leg silent for `silence`.
    Handover { silence: Duration },
}

/// Longest duration a latching policy takes (it is stored in milliseconds, as a `u32`).
pub const MAX_LATCH_DURATION: Duration = Duration::from_secs(24 * 3600);

impl LatchingPolicy {
    /// The policy as the data path stores it.
    pub fn to_latching(self) -> Latching {
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        match self {
            LatchingPolicy::FirstPacket => Latching::new(LatchMode::FirstPacket, 0, 0),
            LatchingPolicy::After { packets, duration } => {
                Latching::new(LatchMode::After, packets, ms(duration))
            }
            LatchingPolicy::Strict => Latching::new(LatchMode::Strict, 0, 0),
            LatchingPolicy::Handover { silence } => {
                Latching::new(LatchMode::Handover, 0, ms(silence))
            }
        }
    }
}

/// One leg as requested.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegSpec {
    /// The peer's RTP address; `None`: learnt from traffic.
    pub rtp: Option<SocketAddr>,
    /// The peer's RTCP address; `None`: RTP port + 1 if `rtp` is set, else learnt.
    pub rtcp: Option<SocketAddr>,
    /// Install the addresses latched: accept media only from them.
    pub strict: bool,
    /// The relay address the peer talks to; `None`: the configured one for this leg.
    pub relay_addr: Option<Ipv4Addr>,
}

/// A channel as requested: both legs and the latching policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelSpec {
    /// Leg A ([`LEG_A`]) and leg B ([`LEG_B`]).
    pub legs: [LegSpec; 2],
    pub latching: LatchingPolicy,
    /// RTP clock rate in Hz for jitter; 0 = 8000 (G.711).
    pub clock_rate: u32,
}

const LEG_FIELDS: [&str; 2] = ["leg_a", "leg_b"];

impl ChannelSpec {
    /// Checks what the types do not; errors name the API field.
    pub fn validate(&self) -> Result<(), ServiceError> {
        if self.clock_rate > MAX_CLOCK_RATE {
            return Err(ServiceError::invalid(
                "clock_rate",
                format!("{} Hz is above {MAX_CLOCK_RATE} Hz", self.clock_rate),
            ));
        }
        match self.latching {
            LatchingPolicy::Strict => {
                if let Some((_, field)) = self
                    .legs
                    .iter()
                    .zip(LEG_FIELDS)
                    .find(|(l, _)| l.rtp.is_none())
                {
                    return Err(ServiceError::invalid(
                        format!("{field}.rtp_address"),
                        "a strict latching policy needs both legs' addresses",
                    ));
                }
            }
            LatchingPolicy::Handover { silence } if silence < Duration::from_millis(1) => {
                return Err(ServiceError::invalid(
                    "latching.duration",
                    "handover needs a silence of at least 1 ms",
                ));
            }
            LatchingPolicy::Handover { silence: d } | LatchingPolicy::After { duration: d, .. }
                if d > MAX_LATCH_DURATION =>
            {
                return Err(ServiceError::invalid(
                    "latching.duration",
                    "must be at most 24 h",
                ));
            }
            _ => {}
        }
        for (leg, field) in self.legs.iter().zip(LEG_FIELDS) {
            for (addr, name) in [(leg.rtp, "rtp_address"), (leg.rtcp, "rtcp_address")] {
                let Some(addr) = addr else { continue };
                let field = format!("{field}.{name}");
                if !is_ipv4(addr.ip()) {
                    return Err(ServiceError::invalid(
                        field,
                        format!("{addr}: IPv6 peers are not supported yet"),
                    ));
                }
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(ServiceError::invalid(
                        field,
                        format!("{addr}: a peer needs an address and a port"),
                    ));
                }
            }
            if leg.rtp.is_none() && leg.rtcp.is_some() {
                return Err(ServiceError::invalid(
                    format!("{field}.rtcp_address"),
                    "an RTCP address needs the RTP address too",
                ));
            }
            if leg.strict && leg.rtp.is_none() {
                return Err(ServiceError::invalid(
                    format!("{field}.strict"),
                    "a strict leg needs rtp_address",
                ));
            }
            if leg.relay_addr.is_some_and(|a| a.is_unspecified()) {
                return Err(ServiceError::invalid(
                    format!("{field}.relay_address"),
                    "0.0.0.0 is not a relay address (leave it empty for the default)",
                ));
            }
        }
        Ok(())
    }
}

fn is_ipv4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    }
}

/// The data-path channel for `spec` on relay port `port`: the one place a request becomes a
/// [`Channel`] (latching policy, and later clock rate, are applied here).
///
/// A leg without a relay address (neither in the request nor configured) gets `::`: user space
/// then lets the kernel choose the source address, and the fast path leaves the channel to
/// user space, since it cannot rewrite a packet's source to "any".
pub fn build_channel(
    spec: &ChannelSpec,
    port: u16,
    relay_addresses: &[Option<Ipv4Addr>; 2],
) -> Channel {
    let mut channel = Channel::default();
    for (i, leg_spec) in spec.legs.iter().enumerate() {
        // Strict: the given addresses are the only ones, confirmed from the start.
        let latched = match spec.latching {
            LatchingPolicy::Strict => true,
            LatchingPolicy::FirstPacket
            | LatchingPolicy::After { .. }
            | LatchingPolicy::Handover { .. } => leg_spec.strict,
        };
        // RFC 3550 §11: RTCP on the port above RTP unless the peer said otherwise.
        let rtcp = leg_spec.rtcp.or_else(|| {
            leg_spec
                .rtp
                .and_then(|a| a.port().checked_add(1).map(|p| SocketAddr::new(a.ip(), p)))
        });
        channel.legs[i] = Leg {
            rtp: leg_spec
                .rtp
                .map_or(Endpoint::UNKNOWN, |a| Endpoint::new(a, latched)),
            rtcp: rtcp.map_or(Endpoint::UNKNOWN, |a| Endpoint::new(a, latched)),
            local_addr: leg_spec
                .relay_addr
                .or(relay_addresses[i])
                .map_or(Addr16::UNSPECIFIED, |a| Addr16::from(IpAddr::V4(a))),
            local_port: Be16::new(port),
            ..Leg::default()
        };
    }
    channel.latching = spec.latching.to_latching();
    channel.clock_rate = spec.clock_rate;
    channel
}

/// Where a channel's media stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChannelState {
    /// At least one leg's RTP source is not latched.
    Waiting,
    /// Both legs' RTP sources are latched; user space forwards.
    Latched,
    /// Latched, and the XDP fast path forwards.
    FastPath,
}

fn rtp_latched(ch: &Channel) -> bool {
    ch.legs.iter().all(|l| l.rtp.is_latched())
}

/// Whether the fast path can forward `ch` at all (both RTP ends latched, IPv4 relay addresses to
/// send from, not reserved for user space).
fn fast_path_eligible(ch: &Channel) -> bool {
    ch.flags & CHANNEL_USERSPACE_ONLY == 0
        && rtp_latched(ch)
        && ch
            .legs
            .iter()
            .all(|l| l.local_addr.is_ipv4() && !l.local_addr.is_unspecified())
}

/// A channel as the service reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelView {
    /// The allocator's record (id, port, call leg, kind, timeout...).
    pub info: ChannelInfo,
    pub latching: LatchingPolicy,
    /// The channel as the data path holds it (with latched endpoints).
    pub channel: Channel,
    pub state: ChannelState,
    /// Counters of both data paths added up.
    pub stats: ChannelStats,
    /// The clock sample the view was taken with (to convert its times).
    pub clock: Clock,
}

impl ChannelView {
    /// The channel's RTP port.
    pub fn port(&self) -> u16 {
        self.info.slot.port
    }
}

/// What happened to a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Allocated,
    /// An endpoint latched to `source`.
    Latched {
        leg: usize,
        component: Component,
        source: SocketAddr,
    },
    /// The fast path took the channel over.
    FastPath,
    /// Released after its media timeout (final counters).
    IdleTimeout,
    /// Released by a request or at shutdown (final counters).
    Released,
}

impl EventKind {
    /// Stable lowercase name (logs, metric labels).
    pub const fn name(&self) -> &'static str {
        match self {
            EventKind::Allocated => "allocated",
            EventKind::Latched { .. } => "latched",
            EventKind::FastPath => "fast_path",
            EventKind::IdleTimeout => "idle_timeout",
            EventKind::Released => "released",
        }
    }
}

/// One event of the watch stream. Metrics can count them by [`EventKind::name`] and channel kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The channel as of the event.
    pub channel: ChannelView,
    pub at: SystemTime,
}

/// Identifies a channel in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelRef {
    Port(u16),
    Leg { call_id: String, leg_tag: String },
}

/// A change to a channel; `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub legs: [Option<LegSpec>; 2],
    pub latching: Option<LatchingPolicy>,
    pub timeout: Option<Duration>,
    /// RTP clock rate in Hz (0 = 8000).
    pub clock_rate: Option<u32>,
}

/// A page request of [`Service::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Most channels returned (≥ 1).
    pub limit: usize,
    /// Only channels on ports above this one (the previous page's last).
    pub after: Option<u16>,
    /// Only these kinds; empty: all.
    pub kinds: Vec<Kind>,
    /// Only these states; empty: all.
    pub states: Vec<ChannelState>,
}

/// A page of channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub channels: Vec<ChannelView>,
    /// The last port of this page when more channels follow.
    pub next_after: Option<u16>,
}

/// The pool as the service reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolView {
    pub status: Status,
    pub layout: Layout,
    /// `x`, `s` or `custom`.
    pub layout_name: &'static str,
    pub upstream_kbps: Option<u32>,
    pub codec: Codec,
    /// `xdp` or `userspace`.
    pub data_path: &'static str,
    pub fast_path_unavailable: Option<String>,
}

/// Settings of the service that are not the allocator's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceOptions {
    /// Relay addresses of legs A and B when a request names none.
    pub relay_addresses: [Option<Ipv4Addr>; 2],
    /// How often the data path is diffed for latch and fast-path events.
    pub poll_interval: Duration,
    /// Events buffered per watcher.
    pub event_buffer: usize,
    /// Name of the layout, for the pool status.
    pub layout_name: &'static str,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            relay_addresses: [None, None],
            poll_interval: Duration::from_millis(250),
            event_buffer: 4096,
            layout_name: "s",
        }
    }
}

/// What the service remembers of a live channel besides the allocator's record.
#[derive(Debug)]
struct Record {
    spec: ChannelSpec,
    /// The idle deadline as of the last look (its entry in `State::due`).
    deadline: Instant,
    /// Newest packet time seen in the counters (`CLOCK_MONOTONIC` ns; 0 = none).
    last_seen_ns: u64,
    /// The channel as of the last diff.
    seen: Channel,
    /// Whether the fast path held it latched at the last diff.
    fast: bool,
}

#[derive(Debug)]
struct State {
    allocator: Allocator,
    /// Live channels by RTP port (one relay address: the port is the key).
    records: BTreeMap<u16, Record>,
    /// Idle deadlines, earliest first.
    due: BTreeSet<(Instant, u16)>,
    /// No new channels: shutting down.
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    relay: Arc<dyn Dataplane>,
    events: broadcast::Sender<Event>,
    /// Wakes the timer task when the earliest deadline may have moved.
    timers: Notify,
    /// Flips to true at shutdown: ends the timer task and every watch stream.
    stopping: watch::Sender<bool>,
    options: ServiceOptions,
    metrics: Metrics,
}

/// The channel service. Cheap to clone; all clones share one allocator.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
    timer_task: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn slot(port: u16) -> Slot {
    Slot {
        addr_index: 0,
        port,
    }
}

fn last_seen_ns(stats: &ChannelStats) -> u64 {
    stats
        .from_leg
        .iter()
        .map(|d| d.last_seen_ns)
        .max()
        .unwrap_or(0)
}

impl Service {
    /// Starts the service on `relay` (inside a tokio runtime: it spawns the timer task).
    /// Channels the relay inherited from a previous process are removed (see the module
    /// invariant).
    pub fn start(
        allocator: Allocator,
        relay: Arc<dyn Dataplane>,
        options: ServiceOptions,
    ) -> Service {
        Service::start_with_metrics(allocator, relay, options, Metrics::disabled())
    }

    /// [`Service::start`], counting releases and events in `metrics` (see [`Service::metrics`]).
    pub fn start_with_metrics(
        allocator: Allocator,
        relay: Arc<dyn Dataplane>,
        options: ServiceOptions,
        metrics: Metrics,
    ) -> Service {
        for port in relay.inherited_ports() {
            match relay.remove(port) {
                Ok(()) => log::info!(
                    "removed channel {port} inherited from a previous process (allocations are not persisted)"
                ),
                Err(e) => log::warn!("cannot remove inherited channel {port}: {e}"),
            }
        }
        let (events, _) = broadcast::channel(options.event_buffer.max(1));
        let (stopping, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                allocator,
                records: BTreeMap::new(),
                due: BTreeSet::new(),
                closed: false,
            }),
            relay,
            events,
            timers: Notify::new(),
            stopping,
            options,
            metrics,
        });
        let task = tokio::spawn(Arc::clone(&inner).run_timers());
        Service {
            inner,
            timer_task: Arc::new(std::sync::Mutex::new(Some(task))),
        }
    }

    /// Allocates a channel for the call leg and installs it; `(channel, created)`. A repeated
    /// request returns the leg's channel unchanged with `created == false`.
    pub async fn allocate(
        &self,
        request: Request,
        spec: ChannelSpec,
    ) -> Result<(ChannelView, bool), ServiceError> {
        spec.validate()?;
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        if st.closed {
            return Err(ServiceError::ShuttingDown);
        }
        let clock = Clock::now();
        let allocation = st.allocator.allocate(request, clock.instant())?;
        let port = allocation.channel.slot.port;
        if !allocation.new {
            return Ok((inner.view(&st, port, clock)?, false));
        }
        let channel = build_channel(&spec, port, &inner.options.relay_addresses);
        if let Err(e) = inner.relay.install(port, &channel) {
            // Never leak: the allocation goes with the failed install.
            if let Err(r) = st
                .allocator
                .release(allocation.channel.slot, clock.instant())
            {
                log::error!("releasing channel {port} after a failed install: {r}");
            }
            return Err(e.into());
        }
        let info = &allocation.channel;
        let deadline = info.last_activity + info.timeout;
        st.due.insert((deadline, port));
        st.records.insert(
            port,
            Record {
                spec,
                deadline,
                last_seen_ns: 0,
                seen: channel,
                fast: false,
            },
        );
        // Wake the timer task only for a new earliest deadline: otherwise it wakes in time
        // anyway, and each wake-up takes the lock again (a cost on every allocation).
        let earliest = st.due.first() == Some(&(deadline, port));
        let view = inner.view(&st, port, clock)?;
        drop(st);
        if earliest {
            inner.timers.notify_one();
        }
        inner.emit(EventKind::Allocated, view.clone());
        Ok((view, true))
    }

    /// Changes a channel (see [`Update`]); legs not replaced keep what the relay learnt.
    pub async fn update(
        &self,
        target: ChannelRef,
        update: Update,
    ) -> Result<ChannelView, ServiceError> {
        if let Some(t) = update.timeout {
            check_timeout(t)?;
        }
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        let clock = Clock::now();
        let port = st.resolve(&target)?;
        let record = st
            .records
            .get(&port)
            .ok_or(AllocError::UnknownSlot(slot(port)))?;
        let mut spec = record.spec.clone();
        for (i, leg) in update.legs.iter().enumerate() {
            if let Some(leg) = leg {
                spec.legs[i] = leg.clone();
            }
        }
        if let Some(l) = update.latching {
            spec.latching = l;
        }
        if let Some(c) = update.clock_rate {
            spec.clock_rate = c;
        }
        spec.validate()?;
        let mut channel = build_channel(&spec, port, &inner.options.relay_addresses);
        let current = inner.relay.channel(port).unwrap_or(record.seen);
        for (i, leg) in update.legs.iter().enumerate() {
            if leg.is_none() {
                channel.legs[i] = current.legs[i];
            }
        }
        inner.relay.install(port, &channel)?;
        if let Some(t) = update.timeout {
            st.allocator.set_timeout(slot(port), t, clock.instant())?;
            st.reschedule(port);
            inner.timers.notify_one();
        }
        if let Some(r) = st.records.get_mut(&port) {
            r.spec = spec;
            r.seen = channel;
            r.fast = false;
        }
        inner.view(&st, port, clock)
    }

    /// Releases a channel; returns it with its final counters, and when it was released.
    pub async fn release(
        &self,
        target: ChannelRef,
    ) -> Result<(ChannelView, SystemTime), ServiceError> {
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        let clock = Clock::now();
        let port = st.resolve(&target)?;
        let view = inner.release_locked(&mut st, port, clock)?;
        drop(st);
        inner.metrics.released(Release::Requested);
        inner.emit(EventKind::Released, view.clone());
        Ok((view, clock.wall()))
    }

    /// One channel.
    pub async fn get(&self, target: ChannelRef) -> Result<ChannelView, ServiceError> {
        let st = self.inner.state.lock().await;
        let port = st.resolve(&target)?;
        self.inner.view(&st, port, Clock::now())
    }

    /// A page of channels in port order.
    pub async fn list(&self, query: ListQuery) -> Result<Page, ServiceError> {
        let inner = &self.inner;
        let st = inner.state.lock().await;
        let clock = Clock::now();
        let start = query.after.map_or(0, |p| u32::from(p) + 1);
        let limit = query.limit.max(1);
        let mut channels = Vec::new();
        let mut next_after = None;
        for &port in st.records.keys().filter(|&&p| u32::from(p) >= start) {
            let view = inner.view(&st, port, clock)?;
            if (!query.kinds.is_empty() && !query.kinds.contains(&view.info.kind))
                || (!query.states.is_empty() && !query.states.contains(&view.state))
            {
                continue;
            }
            if channels.len() == limit {
                next_after = channels.last().map(ChannelView::port);
                break;
            }
            channels.push(view);
        }
        Ok(Page {
            channels,
            next_after,
        })
    }

    /// The pool.
    pub async fn pool(&self) -> PoolView {
        let inner = &self.inner;
        let st = inner.state.lock().await;
        let config = st.allocator.config();
        PoolView {
            status: st.allocator.status(Instant::now()),
            layout: config.layout,
            layout_name: inner.options.layout_name,
            upstream_kbps: config.upstream_kbps,
            codec: config.codec,
            data_path: inner.relay.name(),
            fast_path_unavailable: inner.relay.fast_path_unavailable(),
        }
    }

    /// A subscription to the event stream, from now on.
    pub fn watch(&self) -> Watcher {
        Watcher {
            events: self.inner.events.subscribe(),
            stopping: self.inner.stopping.subscribe(),
        }
    }

    /// Stops taking requests, ends the timer task and every watch stream, and releases every
    /// channel from the data path (emitting `Released` events). Returns how many were released.
    pub async fn shutdown(&self) -> usize {
        let inner = &self.inner;
        inner.stopping.send_replace(true);
        let task = self
            .timer_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                log::warn!("timer task: {e}");
            }
        }
        let mut st = inner.state.lock().await;
        st.closed = true;
        let clock = Clock::now();
        let ports: Vec<u16> = st.records.keys().copied().collect();
        let mut released = 0;
        for port in ports {
            match inner.release_locked(&mut st, port, clock) {
                Ok(view) => {
                    released += 1;
                    inner.metrics.released(Release::Shutdown);
                    inner.emit(EventKind::Released, view);
                }
                Err(e) => log::warn!("releasing channel {port} at shutdown: {e}"),
            }
        }
        released
    }

    /// The registry this service counts in (disabled unless started with one).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// A future that completes when [`Service::shutdown`] starts.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

fn check_timeout(t: Duration) -> Result<(), ServiceError> {
    if (MIN_MEDIA_TIMEOUT..=MAX_MEDIA_TIMEOUT).contains(&t) {
        Ok(())
    } else {
        Err(AllocError::Timeout {
            value: t,
            min: MIN_MEDIA_TIMEOUT,
            max: MAX_MEDIA_TIMEOUT,
        }
        .into())
    }
}

/// One subscriber of the event stream.
#[derive(Debug)]
pub struct Watcher {
    events: broadcast::Receiver<Event>,
    stopping: watch::Receiver<bool>,
}

impl Watcher {
    /// The next event; `None` once the service shuts down; `Err(Lagged)` if this watcher fell
    /// so far behind that events were lost (it should resynchronise and subscribe again).
    pub async fn next(&mut self) -> Option<Result<Event, ServiceError>> {
        if *self.stopping.borrow() {
            return None;
        }
        tokio::select! {
            _ = self.stopping.wait_for(|s| *s) => None,
            r = self.events.recv() => match r {
                Ok(e) => Some(Ok(e)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(ServiceError::Lagged(n))),
                Err(broadcast::error::RecvError::Closed) => None,
            },
        }
    }
}

impl State {
    /// The port of the channel `target` names, if it is live.
    fn resolve(&self, target: &ChannelRef) -> Result<u16, ServiceError> {
        match target {
            ChannelRef::Port(port) => {
                if self.records.contains_key(port) {
                    Ok(*port)
                } else {
                    Err(AllocError::UnknownSlot(slot(*port)).into())
                }
            }
            ChannelRef::Leg { call_id, leg_tag } => self
                .allocator
                .find(call_id, leg_tag)
                .map(|s| s.port)
                .ok_or_else(|| {
                    AllocError::UnknownLeg {
                        call_id: call_id.clone(),
                        leg_tag: leg_tag.clone(),
                    }
                    .into()
                }),
        }
    }

    /// Moves `port`'s entry in `due` to its current idle deadline.
    fn reschedule(&mut self, port: u16) {
        let Some(info) = self.allocator.get(slot(port)) else {
            return;
        };
        let Some(record) = self.records.get_mut(&port) else {
            return;
        };
        let deadline = info.last_activity + info.timeout;
        self.due.remove(&(record.deadline, port));
        record.deadline = deadline;
        self.due.insert((deadline, port));
    }

    fn forget(&mut self, port: u16) {
        if let Some(r) = self.records.remove(&port) {
            self.due.remove(&(r.deadline, port));
        }
    }
}

impl Inner {
    fn emit(&self, kind: EventKind, channel: ChannelView) {
        log::debug!("channel {} {}", channel.port(), kind.name());
        self.metrics.event(&kind);
        let at = channel.clock.wall();
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(Event { kind, channel, at });
    }

    /// The channel on `port` as the allocator and the data path see it now.
    fn view(&self, st: &State, port: u16, clock: Clock) -> Result<ChannelView, ServiceError> {
        let info = st
            .allocator
            .get(slot(port))
            .ok_or(AllocError::UnknownSlot(slot(port)))?;
        let record = st
            .records
            .get(&port)
            .ok_or(AllocError::UnknownSlot(slot(port)))?;
        let channel = self.relay.channel(port).unwrap_or(record.seen);
        let stats = self.relay.stats(port).unwrap_or_default();
        let state = if !rtp_latched(&channel) {
            ChannelState::Waiting
        } else if fast_path_eligible(&channel)
            && (record.fast
                || self
                    .relay
                    .fast_path_channel(port)
                    .is_some_and(|f| fast_path_eligible(&f)))
        {
            ChannelState::FastPath
        } else {
            ChannelState::Latched
        };
        Ok(ChannelView {
            info,
            latching: record.spec.latching,
            channel,
            state,
            stats,
            clock,
        })
    }

    /// Final view, remove from the data path, release the allocation.
    fn release_locked(
        &self,
        st: &mut State,
        port: u16,
        clock: Clock,
    ) -> Result<ChannelView, ServiceError> {
        let view = self.view(st, port, clock)?;
        match self.relay.remove(port) {
            Ok(()) | Err(DataPathError::NotFound(_)) => {}
            // The channel stays allocated and installed: the client may retry.
            Err(e) => return Err(e.into()),
        }
        st.allocator.release(slot(port), clock.instant())?;
        st.forget(port);
        Ok(view)
    }

    async fn run_timers(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        let mut poll = tokio::time::interval(self.options.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stopping.borrow() {
                return;
            }
            let next_due = self.state.lock().await.due.first().map(|&(at, _)| at);
            let sleep = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopping.changed() => {}
                _ = self.timers.notified() => {}
                _ = poll.tick() => self.diff().await,
                _ = sleep => self.sweep().await,
            }
        }
    }

    /// Idle timeouts (see the module summary).
    async fn sweep(&self) {
        let mut st = self.state.lock().await;
        let clock = Clock::now();
        let now = clock.instant();
        let due: Vec<u16> = st
            .due
            .range(..=(now, u16::MAX))
            .map(|&(_, port)| port)
            .collect();
        for &port in &due {
            let Ok(stats) = self.relay.stats(port) else {
                continue;
            };
            let seen = last_seen_ns(&stats);
            let State {
                allocator, records, ..
            } = &mut *st;
            let Some(record) = records.get_mut(&port) else {
                continue;
            };
            if seen > record.last_seen_ns {
                record.last_seen_ns = seen;
                if let Err(e) = allocator.touch(slot(port), clock.instant_of_ns(seen)) {
                    log::warn!("touching channel {port}: {e}");
                }
            }
        }
        // The final view must be taken before the allocator forgets the channel.
        let views: BTreeMap<u16, ChannelView> = due
            .iter()
            .filter_map(|&port| self.view(&st, port, clock).ok().map(|v| (port, v)))
            .collect();
        let expired = st.allocator.expire(now);
        let mut events = Vec::new();
        for released in expired {
            let port = released.channel.slot.port;
            if let Err(e) = self.relay.remove(port) {
                if !matches!(e, DataPathError::NotFound(_)) {
                    log::warn!("removing idle channel {port} from the data path: {e}");
                }
            }
            st.forget(port);
            self.metrics.released(Release::IdleTimeout);
            log::info!(
                "channel {port} ({} {:?}) released after {:?} without media",
                released.channel.kind,
                released.channel.call_id,
                released.channel.timeout
            );
            if let Some(view) = views.get(&port) {
                events.push(view.clone());
            }
        }
        for port in due {
            if st.records.contains_key(&port) {
                st.reschedule(port);
            }
        }
        drop(st);
        for view in events {
            self.emit(EventKind::IdleTimeout, view);
        }
    }

    /// Latch and fast-path events (see the module summary).
    async fn diff(&self) {
        let mut st = self.state.lock().await;
        let clock = Clock::now();
        let mut found: Vec<(u16, EventKind)> = Vec::new();
        for (&port, record) in st.records.iter_mut() {
            let Ok(now) = self.relay.channel(port) else {
                continue;
            };
            if now != record.seen {
                for leg in [LEG_A, LEG_B] {
                    for component in [Component::Rtp, Component::Rtcp] {
                        let pick = |ch: &Channel| match component {
                            Component::Rtp => ch.legs[leg].rtp,
                            Component::Rtcp => ch.legs[leg].rtcp,
                        };
                        let (old, new) = (pick(&record.seen), pick(&now));
                        if new.is_latched() && (!old.is_latched() || old != new) {
                            if let Some(source) = new.socket_addr() {
                                found.push((
                                    port,
                                    EventKind::Latched {
                                        leg,
                                        component,
                                        source,
                                    },
                                ));
                            }
                        }
                    }
                }
            }
            let fast = fast_path_eligible(&now)
                && (record.fast
                    || self
                        .relay
                        .fast_path_channel(port)
                        .is_some_and(|f| fast_path_eligible(&f)));
            if fast && !record.fast {
                found.push((port, EventKind::FastPath));
            }
            record.seen = now;
            record.fast = fast;
        }
        let events: Vec<(EventKind, ChannelView)> = found
            .into_iter()
            .filter_map(|(port, kind)| self.view(&st, port, clock).ok().map(|v| (kind, v)))
            .collect();
        drop(st);
        for (kind, view) in events {
            self.emit(kind, view);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn build_channel_sets_both_legs_from_the_spec() {
        let spec = ChannelSpec {
            legs: [
                LegSpec {
                    rtp: Some(sa("203.0.113.7:40000")),
                    ..LegSpec::default()
                },
                LegSpec {
                    rtp: Some(sa("192.0.2.10:6000")),
                    rtcp: Some(sa("192.0.2.10:6003")),
                    strict: true,
                    relay_addr: Some(Ipv4Addr::new(192, 0, 2, 2)),
                },
            ],
            latching: LatchingPolicy::FirstPacket,
            clock_rate: 0,
        };
        let defaults = [
            Some(Ipv4Addr::new(198, 51, 100, 1)),
            Some(Ipv4Addr::new(192, 0, 2, 1)),
        ];
        let ch = build_channel(&spec, 30530, &defaults);
        let [a, b] = ch.legs;
        // Leg A: expected (not latched), RTCP on the port above, default relay address.
        assert_eq!(a.rtp, Endpoint::new(sa("203.0.113.7:40000"), false));
        assert_eq!(a.rtcp, Endpoint::new(sa("203.0.113.7:40001"), false));
        assert_eq!(a.local(), sa("198.51.100.1:30530"));
        // Leg B: strict, its own RTCP port and relay address.
        assert_eq!(b.rtp, Endpoint::new(sa("192.0.2.10:6000"), true));
        assert_eq!(b.rtcp, Endpoint::new(sa("192.0.2.10:6003"), true));
        assert_eq!(b.local(), sa("192.0.2.2:30530"));
        assert_eq!(ch.flags, 0);
        assert!(!fast_path_eligible(&ch), "leg A is not latched yet");
    }

    #[test]
    fn build_channel_stores_the_policy_and_clock_rate_and_strict_latches_every_address() {
        let leg = |a: &str| LegSpec {
            rtp: Some(sa(a)),
            ..LegSpec::default()
        };
        let mut spec = ChannelSpec {
            legs: [leg("203.0.113.7:40000"), leg("192.0.2.10:6000")],
            latching: LatchingPolicy::Strict,
            clock_rate: 48_000,
        };
        spec.validate().expect("valid");
        let ch = build_channel(&spec, 30530, &[None, None]);
        assert_eq!(ch.latching.mode(), LatchMode::Strict);
        assert_eq!(ch.clock_rate, 48_000);
        assert!(
            ch.legs
                .iter()
                .all(|l| l.rtp.is_latched() && l.rtcp.is_latched())
        );
        spec.latching = LatchingPolicy::After {
            packets: 3,
            duration: Duration::from_millis(1500),
        };
        let ch = build_channel(&spec, 30530, &[None, None]);
        assert_eq!(ch.latching, Latching::new(LatchMode::After, 3, 1500));
        assert!(!ch.legs[0].rtp.is_latched());
        // Validation: strict needs both addresses, handover a silence, rates are bounded.
        spec.latching = LatchingPolicy::Strict;
        spec.legs[1] = LegSpec::default();
        assert_eq!(
            spec.validate().expect_err("strict").to_string(),
            "leg_b.rtp_address: a strict latching policy needs both legs' addresses"
        );
        spec.legs[1] = leg("192.0.2.10:6000");
        spec.latching = LatchingPolicy::Handover {
            silence: Duration::ZERO,
        };
        assert!(spec.validate().is_err());
        spec.latching = LatchingPolicy::Handover {
            silence: Duration::from_secs(2),
        };
        spec.validate().expect("valid handover");
        spec.clock_rate = MAX_CLOCK_RATE + 1;
        assert!(spec.validate().is_err());
    }

    #[test]
    fn build_channel_without_addresses_learns_and_stays_off_the_fast_path() {
        let ch = build_channel(&ChannelSpec::default(), 42000, &[None, None]);
        for leg in ch.legs {
            assert_eq!(leg.rtp, Endpoint::UNKNOWN);
            assert_eq!(leg.rtcp, Endpoint::UNKNOWN);
            // `::`, not IPv4 0.0.0.0: the fast path must not send from "any".
            assert_eq!(leg.local_addr, Addr16::UNSPECIFIED);
            assert!(!leg.local_addr.is_ipv4());
            assert_eq!(leg.local_port.get(), 42000);
        }
        let mut latched = ch;
        for leg in &mut latched.legs {
            leg.rtp = Endpoint::new(sa("192.0.2.10:6000"), true);
        }
        assert!(rtp_latched(&latched));
        assert!(
            !fast_path_eligible(&latched),
            "no relay address to send from"
        );
        for leg in &mut latched.legs {
            leg.local_addr = Addr16::from_ipv4_octets([192, 0, 2, 1]);
        }
        assert!(fast_path_eligible(&latched));
        latched.flags = CHANNEL_USERSPACE_ONLY;
        assert!(!fast_path_eligible(&latched));
    }

    #[test]
    fn specs_are_validated_naming_the_field() {
        let leg = |rtp: Option<&str>, rtcp: Option<&str>, strict: bool| LegSpec {
            rtp: rtp.map(sa),
            rtcp: rtcp.map(sa),
            strict,
            relay_addr: None,
        };
        let cases = [
            (
                leg(Some("[2001:db8::1]:5004"), None, false),
                "leg_b.rtp_address: [2001:db8::1]:5004: IPv6 peers are not supported yet",
            ),
            (
                leg(Some("0.0.0.0:5004"), None, false),
                "leg_b.rtp_address: 0.0.0.0:5004: a peer needs an address and a port",
            ),
            (
                leg(Some("192.0.2.1:0"), None, false),
                "leg_b.rtp_address: 192.0.2.1:0: a peer needs an address and a port",
            ),
            (
                leg(None, Some("192.0.2.1:5005"), false),
                "leg_b.rtcp_address: an RTCP address needs the RTP address too",
            ),
            (
                leg(None, None, true),
                "leg_b.strict: a strict leg needs rtp_address",
            ),
        ];
        for (b, message) in cases {
            let spec = ChannelSpec {
                legs: [LegSpec::default(), b],
                latching: LatchingPolicy::FirstPacket,
                clock_rate: 0,
            };
            let e = spec.validate().expect_err(message);
            assert_eq!(e.to_string(), message);
            assert_eq!(crate::error::code(&e), tonic::Code::InvalidArgument);
        }
        let mapped = ChannelSpec {
            legs: [
                leg(Some("[::ffff:192.0.2.1]:5004"), None, true),
                LegSpec::default(),
            ],
            latching: LatchingPolicy::FirstPacket,
            clock_rate: 0,
        };
        assert!(mapped.validate().is_ok());
    }
}
