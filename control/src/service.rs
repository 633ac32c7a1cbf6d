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
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use relay_common::{CHANNEL_USERSPACE_ONLY, Channel, ChannelStats, LEG_A, LEG_B};
use relay_user::forward::Component;
use relay_user::{DataPath, DataPathError, Relay};
use tokio::sync::{Mutex, Notify, broadcast, watch};
use tokio::task::JoinHandle;

use relay_core::allocator::{
    AllocError, Allocator, ChannelInfo, Codec, Kind, Layout, Request, Slot, Status, check_timeout,
};
use relay_core::{
    ChannelSpec, ChannelState, EventKind, LatchingPolicy, LegSpec, ReleaseReason, build_channel,
};

use crate::clock::Clock;
use crate::error::ServiceError;
use crate::metrics::Metrics;

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
        self.xdp()
            .and_then(|x| x.channels().ok())
            .map(|c| c.into_iter().map(|(port, _)| port).collect())
            .unwrap_or_default()
    }
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

/// Where a [`EventKind::Latched`] event's endpoint latched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latch {
    /// [`relay_common::LEG_A`] or [`relay_common::LEG_B`].
    pub leg: usize,
    pub component: Component,
    /// The source the endpoint latched to.
    pub source: SocketAddr,
}

/// One event of the watch stream. Metrics can count them by [`EventKind::name`] and channel kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The endpoint that latched, for [`EventKind::Latched`]; `None` for every other kind.
    pub latch: Option<Latch>,
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
        inner.emit(EventKind::Allocated, None, view.clone());
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
        inner.metrics.released(ReleaseReason::Requested);
        inner.emit(EventKind::Released, None, view.clone());
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
                    inner.metrics.released(ReleaseReason::Shutdown);
                    inner.emit(EventKind::Released, None, view);
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
    fn emit(&self, kind: EventKind, latch: Option<Latch>, channel: ChannelView) {
        log::debug!("channel {} {}", channel.port(), kind.name());
        self.metrics.event(kind);
        let at = channel.clock.wall();
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(Event {
            kind,
            latch,
            channel,
            at,
        });
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
            self.metrics.released(ReleaseReason::IdleTimeout);
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
            self.emit(EventKind::IdleTimeout, None, view);
        }
    }

    /// Latch and fast-path events (see the module summary).
    async fn diff(&self) {
        let mut st = self.state.lock().await;
        let clock = Clock::now();
        let mut found: Vec<(u16, EventKind, Option<Latch>)> = Vec::new();
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
                                    EventKind::Latched,
                                    Some(Latch {
                                        leg,
                                        component,
                                        source,
                                    }),
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
                found.push((port, EventKind::FastPath, None));
            }
            record.seen = now;
            record.fast = fast;
        }
        let events: Vec<(EventKind, Option<Latch>, ChannelView)> = found
            .into_iter()
            .filter_map(|(port, kind, latch)| {
                self.view(&st, port, clock).ok().map(|v| (kind, latch, v))
            })
            .collect();
        drop(st);
        for (kind, latch, view) in events {
            self.emit(kind, latch, view);
        }
    }
}

#[cfg(test)]
mod tests {
    use relay_common::{Addr16, Endpoint};

    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn only_latched_channels_with_relay_addresses_are_fast_path_eligible() {
        let ch = build_channel(&ChannelSpec::default(), 42000, &[None, None]);
        assert!(!rtp_latched(&ch));
        assert!(!fast_path_eligible(&ch));
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
    fn spec_errors_are_invalid_arguments_naming_the_field() {
        let spec = ChannelSpec {
            latching: LatchingPolicy::Strict,
            ..ChannelSpec::default()
        };
        let e = ServiceError::from(spec.validate().expect_err("strict needs addresses"));
        assert_eq!(crate::error::code(&e), tonic::Code::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "leg_a.rtp_address: a strict latching policy needs both legs' addresses"
        );
    }
}
