//! The channel service: the logic between the gRPC layer and the relay. It owns the
//! [`Allocator`] and drives the data path through [`Dataplane`]: allocate → build the channel
//! ([`build_channel`]) → install; release → final counters → remove → free the slot; idle
//! timeouts; and a stream of [`Event`]s.
//!
//! The invariant a reader must know: **a channel is in the allocator if and only if it is
//! installed in the data path and recorded in the store** (between requests). The record is
//! written before the data path changes; an install that fails releases the allocation and
//! deletes the record; a remove that fails leaves the allocation in place (the client may
//! retry). At start, stored channels are restored — adopted from the pinned maps where the
//! data path inherited them, installed again otherwise — and inherited channels no record
//! explains are removed ([`Owner::restore`]).
//!
//! Concurrency: **one owner.** A dedicated thread (`channel-owner`) owns the allocator, the
//! channel records and every call into the data path; [`Service`] is a cheap handle that sends
//! it messages and awaits the answer on a oneshot channel. So the allocator and the data path
//! change together, no release can overtake the install of the same channel, and a data-path
//! call that blocks (a user-space install waits for its worker) blocks the owner thread — never
//! a thread of the async runtime, and never a lock anyone else waits on. The owner takes the
//! messages queued since its last round together (at most [`BATCH`]), then looks at its timers.
//! Every event is emitted by the owner, so every watcher sees one order: a channel's
//! `Allocated` before its `Latched` before its `Released`.
//!
//! Events: the data path pushes `Latched` and `FastPath` (with the channel's generation) into
//! the owner's queue through the sink [`Queue::events`]; the owner drops those of a generation
//! it no longer holds, and takes pending ones before it reports a channel `Released`.
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

use relay_common::{CHANNEL_USERSPACE_ONLY, Channel, ChannelStats};
use relay_user::forward::Component;
use relay_user::{DataPath, DataPathError, DataPathEvent, DataPathEvents, Relay};
use tokio::sync::{broadcast, oneshot, watch};

use relay_core::allocator::{
    AllocError, Allocator, ChannelId, ChannelInfo, Codec, Kind, Layout, Request, Slot, Status,
    check_timeout,
};
use relay_core::{
    ChannelSpec, ChannelState, EventKind, HostAddresses, LatchingPolicy, LegSpec, ReleaseReason,
    SpecError, build_channel,
};

use relay_store::{ChannelOp, ChannelRow, Store};

use crate::clock::Clock;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::persist::StoredChannel;

/// What the channel service needs from the data plane. Implemented by [`Relay`]; tests may run
/// a user-space-only `Relay` on loopback, and the gRPC benchmark a data path that does nothing.
///
/// Every call is made by the owner thread only, so the data path sees one caller; a call may
/// block (a user-space install waits for its worker).
pub trait Dataplane: DataPath + 'static {
    /// Installs a new channel on `port` (zeroed counters and state); its generation, which the
    /// data path's events carry.
    fn install_new(&self, port: u16, channel: &Channel) -> Result<u64, DataPathError>;
    /// Changes the channel on `port`: legs flagged in `replace` take `channel`'s, the others
    /// keep what the data path learnt (decided inside the data path, so no latch is lost).
    fn update(&self, port: u16, channel: &Channel, replace: [bool; 2])
    -> Result<(), DataPathError>;
    /// Why the fast path is not running; `None` when it is.
    fn fast_path_unavailable(&self) -> Option<String>;
    /// Why the running fast path cannot forward some installed channels itself; `None` when it
    /// forwards every channel it should (or does not run).
    fn fast_path_degraded(&self) -> Option<String> {
        None
    }
    /// Channels a previous process left in the pinned maps, not yet adopted or removed.
    fn inherited(&self) -> Vec<(u16, Channel)>;
    /// Takes over an inherited channel as it is (latched endpoints, counters); its generation.
    fn adopt(&self, port: u16) -> Result<u64, DataPathError>;
}

impl Dataplane for Relay {
    fn install_new(&self, port: u16, channel: &Channel) -> Result<u64, DataPathError> {
        self.install_channel(port, channel)
    }

    fn update(
        &self,
        port: u16,
        channel: &Channel,
        replace: [bool; 2],
    ) -> Result<(), DataPathError> {
        self.update_channel(port, channel, replace).map(|_| ())
    }

    fn fast_path_unavailable(&self) -> Option<String> {
        self.xdp_unavailable().map(str::to_owned)
    }

    fn fast_path_degraded(&self) -> Option<String> {
        let xdp = self.xdp()?;
        let unresolved = xdp.unresolved();
        if let Some(first) = unresolved.first() {
            return Some(format!(
                "{} destination(s) without a next hop, e.g. {} -> {}: {}",
                unresolved.len(),
                first.src,
                first.dst,
                first.why
            ));
        }
        match self.fast_path_waiting() {
            0 => None,
            n => Some(format!("{n} latched channel(s) waiting for a next hop")),
        }
    }

    fn inherited(&self) -> Vec<(u16, Channel)> {
        Relay::inherited(self)
    }

    fn adopt(&self, port: u16) -> Result<u64, DataPathError> {
        Relay::adopt(self, port)
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
    /// Where a peer on the Internet sends leg A's RTP: the relay's public address on the
    /// channel's port, as of the view ([`crate::public_address::PublicStatus::media_address`]).
    pub public_media: Option<SocketAddr>,
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
    /// Why the running fast path cannot forward some channels itself (see
    /// [`Dataplane::fast_path_degraded`]).
    pub fast_path_degraded: Option<String>,
    /// This run of the daemon.
    pub instance: Instance,
}

/// One run of the daemon, as PoolStatus reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Random, new at every start (the store's instance id; without a store, a random one).
    pub id: String,
    pub started_at: SystemTime,
    /// Channels taken over from the previous run at start (restored from the store: adopted
    /// from the pinned maps with their calls, or installed again from their records).
    pub adopted: u32,
}

/// Settings of the service that are not the allocator's.
#[derive(Clone)]
pub struct ServiceOptions {
    /// Relay addresses of legs A and B when a request names none.
    pub relay_addresses: [Option<Ipv4Addr>; 2],
    /// Events buffered per watcher.
    pub event_buffer: usize,
    /// Name of the layout, for the pool status.
    pub layout_name: &'static str,
    /// The host's addresses: a request's relay address must be one, a peer must not.
    pub host: Arc<dyn HostAddresses + Send + Sync>,
    /// Let peers be on loopback or at the host's own addresses (`relay.allow_local_peers`, for
    /// labs where everything runs on one machine).
    pub allow_local_peers: bool,
    /// The remote devices.
    pub devices: Arc<crate::devices::Registry>,
    /// The relay's public address, reported with every channel.
    pub public_address: crate::public_address::PublicAddress,
}

impl std::fmt::Debug for ServiceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceOptions")
            .field("relay_addresses", &self.relay_addresses)
            .field("event_buffer", &self.event_buffer)
            .field("layout_name", &self.layout_name)
            .field("allow_local_peers", &self.allow_local_peers)
            .finish_non_exhaustive()
    }
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            relay_addresses: [None, None],
            event_buffer: 4096,
            layout_name: "s",
            host: Arc::new(crate::host::HostTable::new()),
            allow_local_peers: false,
            devices: Arc::new(crate::devices::Registry::in_memory(
                crate::devices::RegistryPolicy::default(),
            )),
            public_address: crate::public_address::PublicAddress::default(),
        }
    }
}

impl ServiceOptions {
    /// Validates `spec` and checks its addresses against the host's.
    fn check(&self, spec: &ChannelSpec) -> Result<(), SpecError> {
        spec.validate()?;
        spec.check_addresses(self.host.as_ref(), self.allow_local_peers)
    }
}

/// What the owner remembers of a live channel besides the allocator's record.
#[derive(Debug)]
struct Record {
    spec: ChannelSpec,
    /// The idle deadline as of the last look (its entry in `Owner::due`).
    deadline: Instant,
    /// Newest packet time seen in the counters (`CLOCK_MONOTONIC` ns; 0 = none).
    last_seen_ns: u64,
    /// The channel as last installed (shown if the data path cannot be read).
    seen: Channel,
    /// The data path's generation of this channel: its events carry it, and events of an
    /// older generation (a released channel's) are dropped.
    generation: u64,
    /// Whether the data path reported the fast path holding it latched (since the last
    /// update).
    fast: bool,
}

/// A request to the owner, with where to send the answer.
enum Msg {
    Allocate {
        request: Request,
        spec: ChannelSpec,
        reply: oneshot::Sender<Result<(ChannelView, bool), ServiceError>>,
    },
    Update {
        target: ChannelRef,
        update: Update,
        reply: oneshot::Sender<Result<ChannelView, ServiceError>>,
    },
    Release {
        target: ChannelRef,
        reply: oneshot::Sender<Result<(ChannelView, SystemTime), ServiceError>>,
    },
    Get {
        target: ChannelRef,
        reply: oneshot::Sender<Result<ChannelView, ServiceError>>,
    },
    List {
        query: ListQuery,
        reply: oneshot::Sender<Result<Page, ServiceError>>,
    },
    Pool {
        reply: oneshot::Sender<PoolView>,
    },
    /// What the data path reported (pushed from its threads, never blocking them).
    DataPath(DataPathEvent),
    /// Stop; with `release`, release every channel first. Answers how many were released.
    Shutdown {
        release: bool,
        reply: oneshot::Sender<usize>,
    },
}

/// One request of a group (see `Owner::handle_group`) between its two phases.
#[allow(
    clippy::large_enum_variant,
    reason = "a handful live at once, for one group, on the owner's stack"
)]
enum Step {
    /// The leg already had this channel.
    Existing {
        port: u16,
        reply: oneshot::Sender<Result<(ChannelView, bool), ServiceError>>,
    },
    /// A new allocation, recorded, to install.
    Install {
        info: ChannelInfo,
        spec: ChannelSpec,
        reply: oneshot::Sender<Result<(ChannelView, bool), ServiceError>>,
    },
    /// A release, its record deleted, to take out of the data path.
    Release {
        port: u16,
        reply: oneshot::Sender<Result<(ChannelView, SystemTime), ServiceError>>,
    },
}

/// The owner: the one thread that holds the allocator, the channel records and the data path.
/// Every front end sends it [`Msg`]s; nothing else changes a channel.
struct Owner {
    allocator: Allocator,
    /// Live channels by RTP port (one relay address: the port is the key).
    records: BTreeMap<u16, Record>,
    /// Idle deadlines, earliest first.
    due: BTreeSet<(Instant, u16)>,
    relay: Arc<dyn Dataplane>,
    events: broadcast::Sender<Event>,
    options: ServiceOptions,
    metrics: Metrics,
    /// This run, for the pool status.
    instance: Instance,
    /// The queue every front end and the data path feed.
    rx: std::sync::mpsc::Receiver<Msg>,
    /// Messages taken from `rx` but not handled yet (see `take_data_path_events`).
    deferred: std::collections::VecDeque<Msg>,
    /// The crash-safe record of live channels, written before the data path changes; `None`:
    /// channels are not persisted (a restart ends the calls).
    store: Option<Store>,
}

/// The channel service: a handle to the owner thread. Cheap to clone; every clone talks to the
/// same owner.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Handle>,
}

struct Handle {
    tx: std::sync::mpsc::Sender<Msg>,
    events: broadcast::Sender<Event>,
    /// Flips to true at shutdown: ends every watch stream and the servers.
    stopping: watch::Sender<bool>,
    options: ServiceOptions,
    metrics: Metrics,
    owner: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Handle {
    /// The last handle gone without a shutdown: the owner releases every channel and stops
    /// (not waited for here: this may run on the async runtime).
    fn drop(&mut self) {
        let (reply, _) = oneshot::channel();
        let _ = self.tx.send(Msg::Shutdown {
            release: true,
            reply,
        });
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn delete(port: u16) -> ChannelOp {
    ChannelOp::Delete {
        addr_index: 0,
        port,
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

/// The owner's message queue, made before the data path starts so that the data path's event
/// sink ([`Queue::events`]) feeds it from the first packet on.
#[derive(Debug)]
pub struct Queue {
    tx: std::sync::mpsc::Sender<Msg>,
    rx: std::sync::mpsc::Receiver<Msg>,
}

impl Default for Queue {
    fn default() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        Queue { tx, rx }
    }
}

impl Queue {
    /// The sink for [`relay_user::RelayOptions::events`]: it only enqueues (never blocks the
    /// data path's threads); the owner handles the events in order with everything else.
    pub fn events(&self) -> DataPathEvents {
        let tx = self.tx.clone();
        Arc::new(move |event| {
            // The owner is gone only at shutdown, when nobody needs the event.
            let _ = tx.send(Msg::DataPath(event));
        })
    }
}

/// What the service runs with.
#[derive(Debug)]
pub struct ServiceParts {
    pub allocator: Allocator,
    pub relay: Arc<dyn Dataplane>,
    pub options: ServiceOptions,
    pub metrics: Metrics,
    /// Where live channels are recorded; `None`: not at all (a restart ends every call, and
    /// channels the data path inherited are removed).
    pub store: Option<Store>,
}

impl std::fmt::Debug for dyn Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A random instance id for a service without a store (the store makes its own).
fn random_instance_id() -> String {
    let h = |salt: u64| {
        std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), (salt, Instant::now()))
    };
    format!("{:016x}{:016x}", h(1), h(2))
}

impl Service {
    /// Starts the service: takes the store's records and the data path's inherited channels
    /// over (see [`Owner::restore`]), then spawns the owner thread that `queue` feeds.
    pub fn start(queue: Queue, parts: ServiceParts) -> Result<Service, ServiceError> {
        let ServiceParts {
            mut allocator,
            relay,
            options,
            metrics,
            mut store,
        } = parts;
        let instance = match &mut store {
            Some(store) => {
                let run = store.start_instance()?;
                let ids = run.channel_ids();
                let newest = store.max_channel_id()?;
                if newest >= ids.start {
                    // Only a database copied back from an older backup can hold ids of a later
                    // run; ids stay unique all the same, as the epoch was written first.
                    log::warn!(
                        "the state database holds channel id {newest}, at or above this run's first id {}: was it restored from a backup?",
                        ids.start
                    );
                }
                allocator.set_next_id(ChannelId(ids.start));
                Instance {
                    id: run.id,
                    started_at: run.started_at,
                    adopted: 0,
                }
            }
            None => Instance {
                id: random_instance_id(),
                started_at: SystemTime::now(),
                adopted: 0,
            },
        };
        let (events, _) = broadcast::channel(options.event_buffer.max(1));
        let (stopping, _) = watch::channel(false);
        let Queue { tx, rx } = queue;
        let mut owner = Owner {
            allocator,
            records: BTreeMap::new(),
            due: BTreeSet::new(),
            relay,
            events: events.clone(),
            options: options.clone(),
            metrics: metrics.clone(),
            instance,
            store,
            rx,
            deferred: std::collections::VecDeque::new(),
        };
        owner.restore()?;
        let thread = std::thread::Builder::new()
            .name("channel-owner".into())
            .spawn(move || owner.run())
            .map_err(|e| {
                ServiceError::Internal(format!("starting the channel owner thread: {e}"))
            })?;
        Ok(Service {
            inner: Arc::new(Handle {
                tx,
                events,
                stopping,
                options,
                metrics,
                owner: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }

    /// The device registry.
    pub fn devices(&self) -> &Arc<crate::devices::Registry> {
        &self.inner.options.devices
    }

    /// The relay's public address.
    pub fn public_address(&self) -> &crate::public_address::PublicAddress {
        &self.inner.options.public_address
    }

    /// Sends a message to the owner and waits for its answer.
    async fn call<T>(
        &self,
        msg: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, ServiceError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .tx
            .send(msg(reply))
            .map_err(|_| ServiceError::ShuttingDown)?;
        answer.await.map_err(|_| ServiceError::ShuttingDown)
    }

    /// Allocates a channel for the call leg and installs it; `(channel, created)`. A repeated
    /// request returns the leg's channel unchanged with `created == false`.
    pub async fn allocate(
        &self,
        request: Request,
        spec: ChannelSpec,
    ) -> Result<(ChannelView, bool), ServiceError> {
        self.inner.options.check(&spec)?;
        self.call(|reply| Msg::Allocate {
            request,
            spec,
            reply,
        })
        .await?
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
        self.call(|reply| Msg::Update {
            target,
            update,
            reply,
        })
        .await?
    }

    /// Releases a channel; returns it with its final counters, and when it was released.
    pub async fn release(
        &self,
        target: ChannelRef,
    ) -> Result<(ChannelView, SystemTime), ServiceError> {
        self.call(|reply| Msg::Release { target, reply }).await?
    }

    /// One channel.
    pub async fn get(&self, target: ChannelRef) -> Result<ChannelView, ServiceError> {
        self.call(|reply| Msg::Get { target, reply }).await?
    }

    /// A page of channels in port order.
    pub async fn list(&self, query: ListQuery) -> Result<Page, ServiceError> {
        self.call(|reply| Msg::List { query, reply }).await?
    }

    /// The pool.
    pub async fn pool(&self) -> Result<PoolView, ServiceError> {
        self.call(|reply| Msg::Pool { reply }).await
    }

    /// A subscription to the event stream, from now on.
    pub fn watch(&self) -> Watcher {
        Watcher {
            events: self.inner.events.subscribe(),
            stopping: self.inner.stopping.subscribe(),
        }
    }

    /// Stops taking requests, ends every watch stream, and releases every channel from the
    /// data path (emitting `Released` events). Returns how many were released. Idempotent.
    pub async fn shutdown(&self) -> usize {
        self.stop(true).await
    }

    /// Stops like [`Service::shutdown`] but leaves every channel where it is: in the data
    /// path's pinned maps and in the store, for the next start to take over (a restart that
    /// keeps the calls). While no daemon runs, the XDP program is detached and media stops.
    pub async fn shutdown_keeping_channels(&self) {
        self.stop(false).await;
    }

    async fn stop(&self, release: bool) -> usize {
        let inner = &self.inner;
        inner.stopping.send_replace(true);
        let released = self
            .call(|reply| Msg::Shutdown { release, reply })
            .await
            .unwrap_or(0);
        let thread = inner
            .owner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The owner has answered and is leaving its loop: joining takes microseconds, but
            // stays off the runtime's threads all the same.
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                log::error!("the channel owner thread panicked");
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

/// Most messages the owner takes in one round before it looks at its timers again.
const BATCH: usize = 256;

impl Owner {
    /// The owner's loop: messages as they come, idle deadlines and data-path diffs when due.
    /// Ends after `Shutdown`, or when every [`Service`] handle is gone.
    fn run(mut self) {
        loop {
            let first = if let Some(m) = self.deferred.pop_front() {
                Some(m)
            } else {
                match self.due.first() {
                    None => match self.rx.recv() {
                        Ok(m) => Some(m),
                        // Every sender is gone.
                        Err(_) => return,
                    },
                    Some(&(at, _)) => {
                        match self
                            .rx
                            .recv_timeout(at.saturating_duration_since(Instant::now()))
                        {
                            Ok(m) => Some(m),
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
            };
            let mut next = first;
            let mut handled = 0;
            // Allocations and releases queued together are written in one transaction
            // (group commit), then applied to the data path in order.
            let mut group = Vec::new();
            while let Some(msg) = next {
                match msg {
                    Msg::Allocate { .. } | Msg::Release { .. } => group.push(msg),
                    // A data-path event concerns an installed channel, which no request of the
                    // group has changed yet: handle it now, before a release in the group
                    // reports the channel gone.
                    Msg::DataPath(event) => self.on_data_path(event),
                    Msg::Shutdown { release, reply } => {
                        self.handle_group(std::mem::take(&mut group));
                        let released = if release { self.release_all() } else { 0 };
                        let _ = reply.send(released);
                        // Whatever else is queued finds the service gone.
                        return;
                    }
                    other => {
                        self.handle_group(std::mem::take(&mut group));
                        self.handle(other);
                    }
                }
                handled += 1;
                if handled == BATCH {
                    break;
                }
                next = self
                    .deferred
                    .pop_front()
                    .or_else(|| self.rx.try_recv().ok());
            }
            self.handle_group(group);
            if self
                .due
                .first()
                .is_some_and(|&(at, _)| at <= Instant::now())
            {
                self.sweep();
            }
        }
    }

    /// Handles the data-path events queued so far, ahead of the requests queued with them
    /// (those wait in `deferred`, in order). Called right after a channel leaves the data path:
    /// the data path reports a latch it had not reported yet at the removal, and it must reach
    /// the watchers before the channel's `Released`.
    fn take_data_path_events(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.deferred.push_back(m);
        }
        let mut rest = std::collections::VecDeque::with_capacity(self.deferred.len());
        for m in std::mem::take(&mut self.deferred) {
            match m {
                Msg::DataPath(e) => self.on_data_path(e),
                other => rest.push_back(other),
            }
        }
        self.deferred = rest;
    }

    /// Takes over what the previous run left: each stored channel is restored in the
    /// allocator and, if the data path inherited it in the pinned maps, adopted as it is
    /// (latched endpoints, counters: the call goes on); otherwise installed afresh from its
    /// record (media latches again). A record that cannot be restored is deleted with the
    /// reason logged; an inherited channel no record explains is removed.
    fn restore(&mut self) -> Result<(), ServiceError> {
        let clock = Clock::now();
        let inherited: BTreeMap<u16, Channel> = self.relay.inherited().into_iter().collect();
        let rows = match &self.store {
            Some(store) => store.channels()?,
            None => Vec::new(),
        };
        let mut dropped = Vec::new();
        let mut adopted = 0u32;
        for row in rows {
            let port = row.port;
            match self.restore_one(&row, inherited.contains_key(&port), clock) {
                Ok(true) => adopted += 1,
                Ok(false) => {}
                Err(why) => {
                    tracing::warn!(
                        port,
                        id = row.id,
                        "channel from the state database dropped: {why}"
                    );
                    dropped.push(delete(port));
                }
            }
        }
        self.persist(&dropped)?;
        for port in inherited.keys() {
            if self.records.contains_key(port) {
                continue;
            }
            match self.relay.remove(*port) {
                Ok(()) => log::info!(
                    "removed channel {port} inherited from a previous process: no record explains it"
                ),
                Err(e) => log::warn!("cannot remove inherited channel {port}: {e}"),
            }
        }
        if !self.records.is_empty() {
            log::info!(
                "{} channel(s) restored from the state database, {adopted} of them adopted from the pinned maps with their calls",
                self.records.len()
            );
        }
        self.instance.adopted = u32::try_from(self.records.len()).unwrap_or(u32::MAX);
        Ok(())
    }

    /// One stored channel (see [`Owner::restore`]); whether it was adopted.
    fn restore_one(
        &mut self,
        row: &ChannelRow,
        inherited: bool,
        clock: Clock,
    ) -> Result<bool, String> {
        let stored = StoredChannel::from_json(&row.record).map_err(|e| e.to_string())?;
        let kind = stored.kind().map_err(|e| e.to_string())?;
        let spec = stored.spec();
        spec.validate().map_err(|e| e.to_string())?;
        let now = clock.instant();
        let ago = clock
            .wall()
            .duration_since(stored.allocated())
            .unwrap_or_default();
        let info = ChannelInfo {
            id: ChannelId(row.id),
            slot: Slot {
                addr_index: row.addr_index,
                port: row.port,
            },
            call_id: stored.call_id.clone(),
            leg_tag: stored.leg_tag.clone(),
            kind,
            internet: stored.internet,
            timeout: stored.timeout(),
            allocated_at: now.checked_sub(ago).unwrap_or(now),
            // A fresh idle timer: the previous run's packet times are not ours to read.
            last_activity: now,
        };
        let port = row.port;
        self.allocator
            .restore(info.clone(), now)
            .map_err(|e| e.to_string())?;
        let placed = if inherited {
            self.relay.adopt(port).map(|g| (g, true))
        } else {
            let channel = build_channel(&spec, port, &self.options.relay_addresses);
            self.relay.install_new(port, &channel).map(|g| (g, false))
        };
        let (generation, adopted) = match placed {
            Ok(p) => p,
            Err(e) => {
                let _ = self.allocator.release(info.slot, now);
                return Err(format!("the data path refused it: {e}"));
            }
        };
        let seen = self
            .relay
            .channel(port)
            .unwrap_or_else(|_| build_channel(&spec, port, &self.options.relay_addresses));
        self.track(&info, spec, seen, generation);
        Ok(adopted)
    }

    /// Allocations and releases in the order they came, with one store transaction for all
    /// of them, written before any of them touches the data path (see the module invariant).
    fn handle_group(&mut self, group: Vec<Msg>) {
        if group.is_empty() {
            return;
        }
        if group.len() == 1 {
            // Nothing to share a transaction with.
            for msg in group {
                self.handle(msg);
            }
            return;
        }
        let clock = Clock::now();
        let mut ops = Vec::new();
        let mut steps = Vec::with_capacity(group.len());
        // Phase 1: the allocator decides, the records are prepared.
        for msg in group {
            match msg {
                Msg::Allocate {
                    request,
                    spec,
                    reply,
                } => match self.allocator.allocate(request, clock.instant()) {
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                    Ok(allocation) if !allocation.new => {
                        steps.push(Step::Existing {
                            port: allocation.channel.slot.port,
                            reply,
                        });
                    }
                    Ok(allocation) => {
                        ops.push(self.put(&allocation.channel, &spec, clock));
                        steps.push(Step::Install {
                            info: allocation.channel,
                            spec,
                            reply,
                        });
                    }
                },
                Msg::Release { target, reply } => {
                    // A channel allocated earlier in this group is in the allocator already.
                    let port = match &target {
                        ChannelRef::Port(port) if self.allocator.get(slot(*port)).is_some() => {
                            Ok(*port)
                        }
                        _ => self.resolve(&target),
                    };
                    match port {
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                        Ok(port) => {
                            ops.push(delete(port));
                            steps.push(Step::Release { port, reply });
                        }
                    }
                }
                other => self.handle(other),
            }
        }
        // One transaction for the group.
        if let Err(e) = self.persist(&ops) {
            let why = match e {
                ServiceError::Store(why) => why,
                other => other.to_string(),
            };
            tracing::error!("state database: {why}: {} request(s) refused", steps.len());
            for step in steps {
                match step {
                    Step::Install { info, reply, .. } => {
                        let _ = self.allocator.release(info.slot, clock.instant());
                        let _ = reply.send(Err(ServiceError::Store(why.clone())));
                    }
                    Step::Existing { port, reply } => {
                        let _ = reply.send(self.view(port, clock).map(|v| (v, false)));
                    }
                    Step::Release { reply, .. } => {
                        let _ = reply.send(Err(ServiceError::Store(why.clone())));
                    }
                }
            }
            return;
        }
        // Phase 2: the data path, in order.
        let mut undo = Vec::new();
        for step in steps {
            match step {
                Step::Existing { port, reply } => {
                    let _ = reply.send(self.view(port, clock).map(|v| (v, false)));
                }
                Step::Install { info, spec, reply } => {
                    let port = info.slot.port;
                    let result = self.install(info, spec, clock);
                    if result.is_err() {
                        undo.push(delete(port));
                    }
                    let _ = reply.send(result.map(|v| (v, true)));
                }
                Step::Release { port, reply } => {
                    let result = self.take_out(port, clock).map(|view| {
                        self.metrics.released(ReleaseReason::Requested);
                        self.emit(EventKind::Released, None, view.clone());
                        (view, clock.wall())
                    });
                    let _ = reply.send(result);
                }
            }
        }
        if let Err(e) = self.persist(&undo) {
            log::error!("deleting the records of channels whose install failed: {e}");
        }
    }

    fn handle(&mut self, msg: Msg) {
        // A requester that gave up (its call was cancelled) does not need the answer.
        match msg {
            Msg::Allocate {
                request,
                spec,
                reply,
            } => {
                let _ = reply.send(self.allocate(request, spec));
            }
            Msg::Update {
                target,
                update,
                reply,
            } => {
                let _ = reply.send(self.update(&target, update));
            }
            Msg::Release { target, reply } => {
                let _ = reply.send(self.release(&target));
            }
            Msg::Get { target, reply } => {
                let result = self
                    .resolve(&target)
                    .and_then(|port| self.view(port, Clock::now()));
                let _ = reply.send(result);
            }
            Msg::List { query, reply } => {
                let _ = reply.send(self.list(&query));
            }
            Msg::Pool { reply } => {
                let _ = reply.send(self.pool());
            }
            Msg::DataPath(event) => self.on_data_path(event),
            // Taken by `run` before it reaches here.
            Msg::Shutdown { reply, .. } => {
                let _ = reply.send(0);
            }
        }
    }

    /// A latch or a fast-path takeover, as the data path pushed it. Events of a generation
    /// the owner no longer holds (a released or replaced channel's) are dropped.
    fn on_data_path(&mut self, event: DataPathEvent) {
        let (port, generation) = match event {
            DataPathEvent::Latched {
                port, generation, ..
            }
            | DataPathEvent::FastPath { port, generation } => (port, generation),
        };
        let Some(record) = self.records.get_mut(&port) else {
            return;
        };
        if record.generation != generation {
            return;
        }
        let (kind, latch) = match event {
            DataPathEvent::Latched {
                leg,
                component,
                addr,
                ..
            } => (
                EventKind::Latched,
                Some(Latch {
                    leg,
                    component,
                    source: addr,
                }),
            ),
            DataPathEvent::FastPath { .. } => {
                record.fast = true;
                (EventKind::FastPath, None)
            }
        };
        if let Ok(view) = self.view(port, Clock::now()) {
            self.emit(kind, latch, view);
        }
    }

    fn allocate(
        &mut self,
        request: Request,
        spec: ChannelSpec,
    ) -> Result<(ChannelView, bool), ServiceError> {
        let clock = Clock::now();
        let allocation = self.allocator.allocate(request, clock.instant())?;
        let port = allocation.channel.slot.port;
        if !allocation.new {
            return Ok((self.view(port, clock)?, false));
        }
        // The record first, then the data path: a crash in between leaves a record the next
        // start installs (or drops), never a channel no record explains.
        if let Err(e) = self.persist(&[self.put(&allocation.channel, &spec, clock)]) {
            let _ = self
                .allocator
                .release(allocation.channel.slot, clock.instant());
            return Err(e);
        }
        match self.install(allocation.channel, spec, clock) {
            Ok(view) => Ok((view, true)),
            Err(e) => {
                if let Err(r) = self.persist(&[delete(port)]) {
                    log::error!(
                        "deleting the record of channel {port} after a failed install: {r}"
                    );
                }
                Err(e)
            }
        }
    }

    /// Starts keeping the record of a channel the data path now holds (generation
    /// `generation`), with its idle deadline.
    fn track(&mut self, info: &ChannelInfo, spec: ChannelSpec, seen: Channel, generation: u64) {
        let port = info.slot.port;
        let deadline = info.last_activity + info.timeout;
        self.due.insert((deadline, port));
        self.records.insert(
            port,
            Record {
                spec,
                deadline,
                last_seen_ns: 0,
                seen,
                generation,
                fast: false,
            },
        );
    }

    /// Installs a recorded new allocation in the data path and reports it `Allocated`; on a
    /// refusal the allocation is released (its record is the caller's to delete).
    fn install(
        &mut self,
        info: ChannelInfo,
        spec: ChannelSpec,
        clock: Clock,
    ) -> Result<ChannelView, ServiceError> {
        let port = info.slot.port;
        let channel = build_channel(&spec, port, &self.options.relay_addresses);
        let generation = match self.relay.install_new(port, &channel) {
            Ok(generation) => generation,
            Err(e) => {
                // Never leak: the allocation goes with the failed install.
                if let Err(r) = self.allocator.release(info.slot, clock.instant()) {
                    log::error!("releasing channel {port} after a failed install: {r}");
                }
                return Err(e.into());
            }
        };
        self.track(&info, spec, channel, generation);
        let view = self.view(port, clock)?;
        self.emit(EventKind::Allocated, None, view.clone());
        Ok(view)
    }

    fn update(&mut self, target: &ChannelRef, update: Update) -> Result<ChannelView, ServiceError> {
        let clock = Clock::now();
        let port = self.resolve(target)?;
        let record = self
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
        self.options.check(&spec)?;
        // Legs not replaced keep what the data path learnt: it merges them itself, so a latch
        // between a read here and the write could not be lost.
        let channel = build_channel(&spec, port, &self.options.relay_addresses);
        let replace = [update.legs[0].is_some(), update.legs[1].is_some()];
        if let Some(t) = update.timeout {
            self.allocator.set_timeout(slot(port), t, clock.instant())?;
            self.reschedule(port);
        }
        let info = self
            .allocator
            .get(slot(port))
            .ok_or(AllocError::UnknownSlot(slot(port)))?;
        self.persist(&[self.put(&info, &spec, clock)])?;
        if let Some(r) = self.records.get_mut(&port) {
            // The data path says again (FastPath) if the updated channel stays in the fast path.
            r.fast = false;
        }
        self.relay.update(port, &channel, replace)?;
        if let Some(r) = self.records.get_mut(&port) {
            r.spec = spec;
            r.seen = self.relay.channel(port).unwrap_or(channel);
        }
        self.view(port, clock)
    }

    fn release(&mut self, target: &ChannelRef) -> Result<(ChannelView, SystemTime), ServiceError> {
        let clock = Clock::now();
        let port = self.resolve(target)?;
        let view = self.release_port(port, clock)?;
        self.metrics.released(ReleaseReason::Requested);
        self.emit(EventKind::Released, None, view.clone());
        Ok((view, clock.wall()))
    }

    fn list(&self, query: &ListQuery) -> Result<Page, ServiceError> {
        let clock = Clock::now();
        let start = query.after.map_or(0, |p| u32::from(p) + 1);
        let limit = query.limit.max(1);
        let mut channels = Vec::new();
        let mut next_after = None;
        for &port in self.records.keys().filter(|&&p| u32::from(p) >= start) {
            let view = self.view(port, clock)?;
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

    fn pool(&self) -> PoolView {
        let config = self.allocator.config();
        PoolView {
            status: self.allocator.status(Instant::now()),
            layout: config.layout,
            layout_name: self.options.layout_name,
            upstream_kbps: config.upstream_kbps,
            codec: config.codec,
            data_path: self.relay.name(),
            fast_path_unavailable: self.relay.fast_path_unavailable(),
            fast_path_degraded: self.relay.fast_path_degraded(),
            instance: self.instance.clone(),
        }
    }

    /// Releases every channel (shutdown), emitting `Released` events; how many.
    fn release_all(&mut self) -> usize {
        let clock = Clock::now();
        let ports: Vec<u16> = self.records.keys().copied().collect();
        let mut released = 0;
        for port in ports {
            match self.release_port(port, clock) {
                Ok(view) => {
                    released += 1;
                    self.metrics.released(ReleaseReason::Shutdown);
                    self.emit(EventKind::Released, None, view);
                }
                Err(e) => log::warn!("releasing channel {port} at shutdown: {e}"),
            }
        }
        released
    }

    /// Writes `ops` to the store in one transaction (nothing without a store).
    fn persist(&mut self, ops: &[ChannelOp]) -> Result<(), ServiceError> {
        match &mut self.store {
            Some(store) if !ops.is_empty() => Ok(store.apply(ops)?),
            _ => Ok(()),
        }
    }

    /// The store's record of a live channel.
    fn put(&self, info: &ChannelInfo, spec: &ChannelSpec, clock: Clock) -> ChannelOp {
        let stored = StoredChannel::new(info, spec, clock.wall_of_instant(info.allocated_at));
        ChannelOp::Put(ChannelRow {
            port: info.slot.port,
            addr_index: info.slot.addr_index,
            id: info.id.0,
            record: stored.to_json(),
        })
    }

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

    fn emit(&self, kind: EventKind, latch: Option<Latch>, channel: ChannelView) {
        let info = &channel.info;
        match &latch {
            Some(l) => tracing::debug!(
                port = info.slot.port,
                call_id = %info.call_id,
                leg_tag = %info.leg_tag,
                id = info.id.0,
                leg = l.leg,
                component = ?l.component,
                source = %l.source,
                "channel {}",
                kind.name()
            ),
            None => tracing::debug!(
                port = info.slot.port,
                call_id = %info.call_id,
                leg_tag = %info.leg_tag,
                id = info.id.0,
                kind = %info.kind,
                state = channel.state.name(),
                "channel {}",
                kind.name()
            ),
        }
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
    fn view(&self, port: u16, clock: Clock) -> Result<ChannelView, ServiceError> {
        let info = self
            .allocator
            .get(slot(port))
            .ok_or(AllocError::UnknownSlot(slot(port)))?;
        let record = self
            .records
            .get(&port)
            .ok_or(AllocError::UnknownSlot(slot(port)))?;
        let channel = self.relay.channel(port).unwrap_or(record.seen);
        let stats = self.relay.stats(port).unwrap_or_default();
        let state = if !rtp_latched(&channel) {
            ChannelState::Waiting
        } else if record.fast && fast_path_eligible(&channel) {
            ChannelState::FastPath
        } else {
            ChannelState::Latched
        };
        let public_media = self
            .options
            .public_address
            .media_address(channel.legs[relay_common::LEG_A].local());
        Ok(ChannelView {
            info,
            latching: record.spec.latching,
            channel,
            state,
            stats,
            clock,
            public_media,
        })
    }

    /// Final view, remove from the data path, release the allocation.
    fn release_port(&mut self, port: u16, clock: Clock) -> Result<ChannelView, ServiceError> {
        self.persist(&[delete(port)])?;
        self.take_out(port, clock)
    }

    /// Final view, remove from the data path, release the allocation (the record is already
    /// deleted).
    fn take_out(&mut self, port: u16, clock: Clock) -> Result<ChannelView, ServiceError> {
        let view = self.view(port, clock)?;
        match self.relay.remove(port) {
            Ok(()) | Err(DataPathError::NotFound(_)) => {}
            // The channel stays allocated and installed: the client may retry.
            Err(e) => return Err(e.into()),
        }
        self.take_data_path_events();
        self.allocator.release(slot(port), clock.instant())?;
        self.forget(port);
        Ok(view)
    }

    /// Idle timeouts (see the module summary).
    fn sweep(&mut self) {
        let clock = Clock::now();
        let now = clock.instant();
        let due: Vec<u16> = self
            .due
            .range(..=(now, u16::MAX))
            .map(|&(_, port)| port)
            .collect();
        for &port in &due {
            let Ok(stats) = self.relay.stats(port) else {
                continue;
            };
            let seen = last_seen_ns(&stats);
            let Some(record) = self.records.get_mut(&port) else {
                continue;
            };
            if seen > record.last_seen_ns {
                record.last_seen_ns = seen;
                if let Err(e) = self.allocator.touch(slot(port), clock.instant_of_ns(seen)) {
                    log::warn!("touching channel {port}: {e}");
                }
            }
        }
        // The final view must be taken before the allocator forgets the channel.
        let mut views: BTreeMap<u16, ChannelView> = due
            .iter()
            .filter_map(|&port| self.view(port, clock).ok().map(|v| (port, v)))
            .collect();
        let expired = self.allocator.expire(now);
        let deletes: Vec<ChannelOp> = expired
            .iter()
            .map(|r| delete(r.channel.slot.port))
            .collect();
        if let Err(e) = self.persist(&deletes) {
            // The channels end all the same; their records are dropped at the next start,
            // which finds no channel for them in the data path.
            log::error!("deleting the records of idle channels: {e}");
        }
        for released in expired {
            let port = released.channel.slot.port;
            if let Err(e) = self.relay.remove(port) {
                if !matches!(e, DataPathError::NotFound(_)) {
                    log::warn!("removing idle channel {port} from the data path: {e}");
                }
            }
            self.take_data_path_events();
            self.forget(port);
            self.metrics.released(ReleaseReason::IdleTimeout);
            tracing::info!(
                port,
                call_id = %released.channel.call_id,
                id = released.channel.id.0,
                kind = %released.channel.kind,
                "channel released after {:?} without media",
                released.channel.timeout
            );
            if let Some(view) = views.remove(&port) {
                self.emit(EventKind::IdleTimeout, None, view);
            }
        }
        for port in due {
            if self.records.contains_key(&port) {
                self.reschedule(port);
            }
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
