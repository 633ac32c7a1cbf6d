//! The relay as the control plane sees it: the user-space path always, the XDP fast path when
//! configured and usable, behind one [`DataPath`].
//!
//! The contract between the two paths (the invariant of this module): user space binds every
//! installed channel's ports and so receives whatever the fast path passes up. It forwards a new
//! flow first, latches the source, then pushes the learnt channel into the XDP maps, after
//! which the fast path carries the following packets. A channel is always installed in user
//! space before the fast path and removed from the fast path first, so no packet is ever
//! forwarded by XDP for a channel user space does not know. If the fast path fails (load,
//! attach, map update) the relay keeps working in user space and says why.
//!
//! Ordering (the second invariant): every change of a channel — install, update, removal,
//! adoption, and the push of a latched channel into the fast path — happens under one lock
//! over the relay's per-port table, which gives each channel a *generation* when it is
//! installed (a new generation for every new channel on a port, kept by updates). Removal takes
//! the channel out of the fast path and out of user space under that lock, as one step. A
//! worker that latches never takes the lock (a control-plane call holds it while waiting for
//! that worker): it hands a [`LatchNotice`] to the *fast-path pusher* thread, which takes the
//! lock, drops the notice unless its generation is still the port's current one, and only then
//! writes the worker's current view of the channel into the XDP map. So no latch can bring back
//! a removed channel, and none can overwrite a newer update with an older channel.
//!
//! Counters of the two paths are merged in [`Relay::stats`]: packets, bytes, RTP loss and
//! reordering add up; the RTP sequence and jitter state come from the path that saw the
//! direction's latest RTP packet (`relay_common::RtpState::merge`). A new channel on a port
//! starts from zero on both paths; an update keeps them.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;

use anyhow::Context as _;
use relay_common::{Channel, ChannelStats};

use crate::{
    datapath::{DataPath, DataPathError},
    forward::Component,
    userspace::{FastPathLastSeen, LatchNotice, LatchObserver, UserspaceConfig, UserspaceRelay},
    xdp::{XdpDataPath, XdpOptions},
};

/// What the data path reports as it happens (see [`DataPathEvents`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPathEvent {
    /// User space latched an endpoint of the channel on `port` (generation `generation`):
    /// `addr` is now the confirmed source of `leg`'s `component`.
    Latched {
        port: u16,
        generation: u64,
        /// [`relay_common::LEG_A`] or [`relay_common::LEG_B`].
        leg: usize,
        component: Component,
        addr: SocketAddr,
    },
    /// The channel on `port` (generation `generation`) is in the XDP map with both legs' RTP
    /// endpoints latched, and the next hop of every latched destination is resolved: from now
    /// on the fast path forwards it. Sent after a latch is pushed, and after an install, update
    /// or adoption that leaves the fast path holding such a channel — or, when a next hop was
    /// not resolved then, once the next-hop refresh has resolved it (within about one
    /// [`crate::xdp::FIB_REFRESH`] of the kernel resolving the neighbour).
    FastPath { port: u16, generation: u64 },
}

/// The sink of [`DataPathEvent`]s, called from the relay's own threads (the fast-path pusher,
/// or the caller of install/update/adopt) **while the relay's channel lock is held**.
///
/// It must not block and must not call back into the [`Relay`]: forward the event into a
/// channel (an unbounded one, or drop on full) and return. In exchange, events of one port
/// arrive in causal order (a `Latched` before the `FastPath` it led to), carry the generation
/// of the channel they are about, and none arrives for a generation after the `remove` that
/// ended it has returned.
pub type DataPathEvents = Arc<dyn Fn(DataPathEvent) + Send + Sync>;

/// How to run the relay.
#[derive(Clone)]
pub struct RelayOptions {
    /// Lowest relay port (inclusive); channels use even ports, RTCP the odd port above.
    pub port_min: u16,
    /// Highest relay port (inclusive).
    pub port_max: u16,
    /// User-space forwarding threads; 0 = one per CPU.
    pub workers: usize,
    /// Run the XDP fast path on these interfaces; `None` = user space only.
    pub xdp: Option<XdpOptions>,
    /// Fail to start if the fast path cannot be loaded (tests, benchmarks); otherwise the relay
    /// falls back to user space and logs why.
    pub require_xdp: bool,
    /// Where latches and moves to the fast path are reported; `None` = nowhere.
    pub events: Option<DataPathEvents>,
}

impl std::fmt::Debug for RelayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayOptions")
            .field("port_min", &self.port_min)
            .field("port_max", &self.port_max)
            .field("workers", &self.workers)
            .field("xdp", &self.xdp)
            .field("require_xdp", &self.require_xdp)
            .field("events", &self.events.is_some())
            .finish()
    }
}

impl Default for RelayOptions {
    /// The 180-channel layout (UDP 30528–30887), user space only.
    fn default() -> Self {
        Self {
            port_min: 30528,
            port_max: 30887,
            workers: 0,
            xdp: None,
            require_xdp: false,
            events: None,
        }
    }
}

/// The relay's per-port table, changed only under [`Core::table`].
#[derive(Default)]
struct Table {
    /// The last generation handed out (the first channel gets 1).
    last_generation: u64,
    /// Current generation of every installed channel, by even port.
    ports: HashMap<u16, u64>,
    /// Per installed channel, the sources known to the sink: given latched by the caller, or
    /// reported in a `Latched` event ([leg][RTP, RTCP]). A removal reports what user space
    /// latched beyond these, so no latch goes unreported because the pusher had not got to it.
    reported: HashMap<u16, Latched>,
    /// Channels found in the pinned maps at start, neither adopted nor removed yet. The fast
    /// path keeps forwarding them meanwhile; user space does not know them.
    inherited: BTreeMap<u16, Channel>,
}

/// The latched sources of a channel, [leg][RTP, RTCP].
type Latched = [[Option<SocketAddr>; 2]; 2];

fn latched(ch: &Channel) -> Latched {
    let ep = |e: relay_common::Endpoint| {
        if e.is_latched() {
            e.socket_addr()
        } else {
            None
        }
    };
    [
        [ep(ch.legs[0].rtp), ep(ch.legs[0].rtcp)],
        [ep(ch.legs[1].rtp), ep(ch.legs[1].rtcp)],
    ]
}

fn component(c: usize) -> Component {
    if c == 0 {
        Component::Rtp
    } else {
        Component::Rtcp
    }
}

impl Table {
    fn next_generation(&mut self) -> u64 {
        self.last_generation += 1;
        self.last_generation
    }
}

/// What the relay's threads share.
struct Core {
    userspace: UserspaceRelay,
    xdp: Option<Arc<XdpDataPath>>,
    events: Option<DataPathEvents>,
    table: Mutex<Table>,
    /// Channels in the fast path waiting for a next hop before `FastPath` is reported, with
    /// their generation. Changed only with the table lock held (taken after it).
    pending: Mutex<HashMap<u16, u64>>,
}

/// Whether the fast path forwards `ch`'s RTP: both legs' RTP endpoints latched and the channel
/// not reserved for user space.
fn forwardable(ch: &Channel) -> bool {
    ch.flags & relay_common::CHANNEL_USERSPACE_ONLY == 0
        && ch.legs.iter().all(|l| l.rtp.is_latched())
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every change under the lock is completed or undone before a fallible step returns,
        // so a poisoned lock still guards a consistent table.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, e: DataPathEvent) {
        if let Some(sink) = &self.events {
            sink(e);
        }
    }

    /// Writes `ch` into the fast path (as a new channel, zeroing its state, or as an update)
    /// and reports `FastPath` when the fast path now forwards it. Fail open: a refused write
    /// leaves the channel to user space. Called with the table lock held.
    fn push(&self, port: u16, generation: u64, ch: &Channel, new: bool) {
        let Some(xdp) = &self.xdp else { return };
        let r = if new {
            xdp.install_new(port, ch)
        } else {
            xdp.replace(port, ch)
        };
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.remove(&port);
        match r {
            Ok(()) if forwardable(ch) => {
                if xdp.next_hops_ready(ch) {
                    self.emit(DataPathEvent::FastPath { port, generation });
                } else {
                    log::info!(
                        "channel {port}: in the fast path, waiting for a next hop (user space \
                         forwards meanwhile)"
                    );
                    pending.insert(port, generation);
                }
            }
            Ok(()) => {}
            Err(e) => log::warn!("channel {port} stays in user space: {e}"),
        }
    }

    /// Reports `FastPath` for pending channels whose next hops are now resolved; forgets
    /// those removed or replaced since.
    fn retry_pending(&self) {
        let Some(xdp) = &self.xdp else { return };
        let table = self.lock();
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.retain(|&port, &mut generation| {
            if table.ports.get(&port) != Some(&generation) {
                return false;
            }
            match xdp.channel(port) {
                Ok(ch) if forwardable(&ch) => {
                    if xdp.next_hops_ready(&ch) {
                        self.emit(DataPathEvent::FastPath { port, generation });
                        false
                    } else {
                        true
                    }
                }
                _ => false,
            }
        });
    }

    /// An update of the live channel on `port`; the table lock is held by the caller.
    fn update_locked(
        &self,
        table: &mut Table,
        port: u16,
        generation: u64,
        channel: &Channel,
        replace: [bool; 2],
    ) -> Result<Channel, DataPathError> {
        let installed = self
            .userspace
            .install_with(port, channel, replace, generation)?;
        // Replaced legs start from what the caller gave; kept legs keep what was reported
        // (a latch of theirs still on its way to the pusher is reported by it).
        let given = latched(&installed);
        let r = table.reported.entry(port).or_default();
        for (leg, replaced) in replace.into_iter().enumerate() {
            if replaced {
                r[leg] = given[leg];
            }
        }
        self.push(port, generation, &installed, false);
        Ok(installed)
    }

    /// The fast-path pusher's handling of one latch.
    fn on_latch(&self, n: &LatchNotice) {
        let mut table = self.lock();
        if table.ports.get(&n.port) != Some(&n.generation) {
            // Removed, or replaced by a new channel, since the worker latched.
            return;
        }
        // The worker's current view, not the notice's copy: an update that ran after this
        // latch (and went to the worker first) must not be overwritten by an older channel,
        // nor reported with a latch it replaced.
        let current = match self.userspace.channel(n.port) {
            Ok(ch) => ch,
            Err(e) => {
                log::warn!("channel {} vanished from user space: {e}", n.port);
                return;
            }
        };
        let endpoint = |ch: &Channel, leg: usize, c: usize| {
            let l = &ch.legs[leg];
            if c == 0 { l.rtp } else { l.rtcp }
        };
        for (leg, c) in n.latched() {
            let ep = endpoint(&n.channel, leg, c);
            if endpoint(&current, leg, c) != ep {
                continue;
            }
            if let Some(addr) = ep.socket_addr() {
                self.emit(DataPathEvent::Latched {
                    port: n.port,
                    generation: n.generation,
                    leg,
                    component: component(c),
                    addr,
                });
                if let Some(r) = table.reported.get_mut(&n.port) {
                    r[leg][c] = Some(addr);
                }
            }
        }
        self.push(n.port, n.generation, &current, false);
        drop(table);
    }
}

/// Messages to the fast-path pusher.
enum PusherMsg {
    Latch(Box<LatchNotice>),
    Stop,
}

/// The running relay.
pub struct Relay {
    core: Arc<Core>,
    pusher: Option<(mpsc::Sender<PusherMsg>, JoinHandle<()>)>,
    xdp_unavailable: Option<String>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("xdp", &self.core.xdp)
            .field("xdp_unavailable", &self.xdp_unavailable)
            .finish_non_exhaustive()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some((tx, thread)) = self.pusher.take() {
            let _ = tx.send(PusherMsg::Stop);
            if thread.join().is_err() {
                log::error!("the fast-path pusher panicked");
            }
        }
    }
}

impl Relay {
    /// Starts the relay in the calling thread's network namespace.
    ///
    /// Channels found in the pinned maps of a previous process are neither adopted nor
    /// removed: the fast path keeps forwarding them, and [`Relay::inherited`] lists them until
    /// the owner decides, per channel, to [`Relay::adopt`] or [`DataPath::remove`] it.
    pub fn start(opts: RelayOptions) -> anyhow::Result<Relay> {
        if opts.port_min > opts.port_max {
            anyhow::bail!("empty relay port range {}-{}", opts.port_min, opts.port_max);
        }
        let (xdp, xdp_unavailable) = match &opts.xdp {
            None => (None, Some("no XDP interfaces configured".to_owned())),
            Some(x) => match XdpDataPath::load(x, opts.port_min, opts.port_max) {
                Ok(dp) => {
                    for a in dp.attachments() {
                        log::info!("fast path: XDP on {} ({} mode)", a.interface, a.mode.name());
                    }
                    (Some(Arc::new(dp)), None)
                }
                Err(e) if opts.require_xdp => return Err(e.context("starting the XDP fast path")),
                Err(e) => {
                    let why = format!("{e:#}");
                    log::warn!("fast path unavailable, relaying in user space only: {why}");
                    (None, Some(why))
                }
            },
        };
        // Latches go to the pusher whenever someone needs them: the fast path or the sink.
        let pusher_channel =
            (xdp.is_some() || opts.events.is_some()).then(mpsc::channel::<PusherMsg>);
        let observer: Option<LatchObserver> = pusher_channel.as_ref().map(|(tx, _)| {
            let tx = tx.clone();
            let o: LatchObserver = Arc::new(move |n: &LatchNotice| {
                // Unbounded: the worker never waits for the pusher.
                let _ = tx.send(PusherMsg::Latch(Box::new(*n)));
            });
            o
        });
        let workers = if opts.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.workers
        };
        let cfg = UserspaceConfig {
            port_min: opts.port_min,
            port_max: opts.port_max,
            workers,
            ..UserspaceConfig::default()
        };
        // The Handover policy's view of what the fast path forwarded: one map lookup, made only
        // for packets from no latched source (forward::decide caches it per silence period).
        let last_seen: Option<FastPathLastSeen> = xdp.clone().map(|x| {
            let f: FastPathLastSeen = Arc::new(move |port: u16| {
                x.stats(port)
                    .ok()
                    .map(|s| s.from_leg.map(|d| d.last_seen_ns))
            });
            f
        });
        let userspace = UserspaceRelay::start_with_hooks(cfg, observer, last_seen)
            .context("starting the user-space relay")?;
        let mut table = Table::default();
        if let Some(x) = &xdp {
            match x.channels() {
                Ok(found) => {
                    for (port, ch) in found {
                        log::info!("channel {port} inherited from the pinned maps");
                        table.inherited.insert(port, ch);
                    }
                }
                Err(e) => log::warn!("cannot read inherited channels: {e}"),
            }
        }
        let core = Arc::new(Core {
            userspace,
            xdp,
            events: opts.events,
            table: Mutex::new(table),
            pending: Mutex::new(HashMap::new()),
        });
        let pusher = match pusher_channel {
            None => None,
            Some((tx, rx)) => {
                let c = Arc::clone(&core);
                let thread = std::thread::Builder::new()
                    .name("hr-fast-push".into())
                    .spawn(move || {
                        loop {
                            match rx.recv_timeout(crate::xdp::FIB_REFRESH / 2) {
                                Ok(PusherMsg::Latch(n)) => c.on_latch(&n),
                                Err(mpsc::RecvTimeoutError::Timeout) => {}
                                Ok(PusherMsg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                                    break;
                                }
                            }
                            let waiting = !c
                                .pending
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .is_empty();
                            if waiting {
                                c.retry_pending();
                            }
                        }
                    })
                    .context("starting the fast-path pusher")?;
                Some((tx, thread))
            }
        };
        Ok(Relay {
            core,
            pusher,
            xdp_unavailable,
        })
    }

    /// Channels the fast path holds but cannot forward yet because a next hop is unresolved
    /// (their packets go up to user space): the fast path is degraded while this is not 0.
    pub fn fast_path_waiting(&self) -> usize {
        self.core
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The fast path, if it is running.
    pub fn xdp(&self) -> Option<&XdpDataPath> {
        self.core.xdp.as_deref()
    }

    /// Why the fast path is not running, if it is not.
    pub fn xdp_unavailable(&self) -> Option<&str> {
        self.xdp_unavailable.as_deref()
    }

    /// The user-space path.
    pub fn userspace(&self) -> &UserspaceRelay {
        &self.core.userspace
    }

    /// Channels a previous process left in the pinned maps that have been neither adopted nor
    /// removed yet, by even port, as the fast path holds them (with their latched endpoints).
    /// Empty without the fast path.
    pub fn inherited(&self) -> Vec<(u16, Channel)> {
        self.core
            .lock()
            .inherited
            .iter()
            .map(|(&p, &c)| (p, c))
            .collect()
    }

    /// Takes over the inherited channel on `port` ([`Relay::inherited`]): binds its user-space
    /// sockets with the pinned channel as it is (latched endpoints kept), and leaves the fast
    /// path's copy and its state (counters, RTP quality, next hops) untouched. User-space
    /// counters start at zero. Returns the channel's new generation. `NotFound` if the port
    /// holds no inherited channel; a bind failure leaves it inherited (remove it then).
    pub fn adopt(&self, port: u16) -> Result<u64, DataPathError> {
        let core = &self.core;
        let mut table = core.lock();
        let ch = *table
            .inherited
            .get(&port)
            .ok_or(DataPathError::NotFound(port))?;
        let generation = table.next_generation();
        let installed = core
            .userspace
            .install_with(port, &ch, [true; 2], generation)?;
        table.inherited.remove(&port);
        table.ports.insert(port, generation);
        table.reported.insert(port, latched(&installed));
        if forwardable(&installed) {
            let ready = core
                .xdp
                .as_ref()
                .is_none_or(|x| x.next_hops_ready(&installed));
            if ready {
                core.emit(DataPathEvent::FastPath { port, generation });
            } else {
                core.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(port, generation);
            }
        }
        Ok(generation)
    }

    /// The generation of the channel installed on `port`, if any: a new one for every channel
    /// installed (or adopted) on the port, kept by updates. Events carry it.
    pub fn generation(&self, port: u16) -> Option<u64> {
        self.core.lock().ports.get(&port).copied()
    }

    /// Installs a new channel on `port`, or updates the one there (see
    /// [`Relay::update_channel`] with both legs replaced). A new channel, also one replacing
    /// an inherited channel, starts with zeroed counters and state on both paths. Returns its
    /// generation.
    pub fn install_channel(&self, port: u16, channel: &Channel) -> Result<u64, DataPathError> {
        let core = &self.core;
        let mut table = core.lock();
        if let Some(&generation) = table.ports.get(&port) {
            core.update_locked(&mut table, port, generation, channel, [true; 2])?;
            return Ok(generation);
        }
        if table.inherited.remove(&port).is_some()
            && let Some(xdp) = &core.xdp
            && let Err(e) = xdp.remove(port)
        {
            log::warn!("removing inherited channel {port} from the fast path: {e}");
        }
        let generation = table.next_generation();
        let installed = core
            .userspace
            .install_with(port, channel, [true; 2], generation)?;
        table.ports.insert(port, generation);
        table.reported.insert(port, latched(&installed));
        core.push(port, generation, &installed, true);
        Ok(generation)
    }

    /// Updates the channel on `port`: legs whose `replace` flag is set take `channel`'s legs;
    /// the others keep what the relay holds, latched endpoints included (decided by the
    /// owning worker, so no latch is lost in between); policy, clock rate and flags come from
    /// `channel`. Counters and state are kept, and so is the generation. The resulting channel
    /// goes to the fast path at once (so a channel that keeps its latched legs stays there)
    /// and is returned. `NotFound` if no channel is installed on `port`.
    pub fn update_channel(
        &self,
        port: u16,
        channel: &Channel,
        replace: [bool; 2],
    ) -> Result<Channel, DataPathError> {
        let core = &self.core;
        let mut table = core.lock();
        let generation = *table
            .ports
            .get(&port)
            .ok_or(DataPathError::NotFound(port))?;
        let installed = core.update_locked(&mut table, port, generation, channel, replace);
        drop(table);
        installed
    }
}

impl DataPath for Relay {
    fn name(&self) -> &'static str {
        if self.core.xdp.is_some() {
            "xdp"
        } else {
            "userspace"
        }
    }

    /// [`Relay::install_channel`].
    fn install(&self, port: u16, channel: &Channel) -> Result<(), DataPathError> {
        self.install_channel(port, channel).map(|_| ())
    }

    /// Removes the channel on `port` (installed, adopted or inherited) from the fast path and
    /// from user space, as one step under the relay's lock: once this returns, no latch of the
    /// removed channel reaches the fast path and no event of its generation is sent.
    fn remove(&self, port: u16) -> Result<(), DataPathError> {
        let core = &self.core;
        let mut table = core.lock();
        let inherited = table.inherited.remove(&port).is_some();
        let generation = table.ports.remove(&port);
        core.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&port);
        if !inherited && generation.is_none() {
            return Err(DataPathError::NotFound(port));
        }
        let reported = table.reported.remove(&port);
        if let (Some(generation), Some(reported)) = (generation, reported) {
            // A latch whose notice the pusher has not handled yet (it waits for this lock,
            // and will find the generation gone) happened all the same: report it now, before
            // the removal, so every latch of a channel reaches the sink exactly once.
            if let Ok(last) = core.userspace.channel(port) {
                let now = latched(&last);
                for leg in 0..2 {
                    for c in 0..2 {
                        if let Some(addr) = now[leg][c]
                            && reported[leg][c] != Some(addr)
                        {
                            core.emit(DataPathEvent::Latched {
                                port,
                                generation,
                                leg,
                                component: component(c),
                                addr,
                            });
                        }
                    }
                }
            }
        }
        if let Some(xdp) = &core.xdp {
            match xdp.remove(port) {
                Ok(()) | Err(DataPathError::NotFound(_)) => {}
                Err(e) => log::warn!("removing channel {port} from the fast path: {e}"),
            }
        }
        let Some(generation) = generation else {
            return Ok(());
        };
        match core.userspace.remove(port) {
            Ok(()) | Err(DataPathError::NotFound(_)) => Ok(()),
            Err(e) => {
                // Still bound in user space: keep it known so the caller can retry.
                table.ports.insert(port, generation);
                if let Ok(last) = core.userspace.channel(port) {
                    table.reported.insert(port, latched(&last));
                }
                Err(e)
            }
        }
    }

    fn channel(&self, port: u16) -> Result<Channel, DataPathError> {
        self.core.userspace.channel(port)
    }

    fn stats(&self, port: u16) -> Result<ChannelStats, DataPathError> {
        let mut stats = self.core.userspace.stats(port)?;
        if let Some(xdp) = &self.core.xdp
            && let Ok(fast) = xdp.stats(port)
        {
            stats.merge(&fast);
        }
        Ok(stats)
    }
}
