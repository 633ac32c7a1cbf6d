//! The channel allocator: one shared pool of relay channels (an even RTP port and the odd RTCP
//! port above it, on one of the relay's addresses) for every kind of call leg, as a sans-IO
//! state machine — no I/O, no clock reads; every input carries its `now: Instant`.
//!
//! Invariant: each slot of the layout is in exactly one state — **live** (held by one
//! (call id, leg tag); at most `capacity` at once, and at most the upstream's internet-call limit
//! of them flagged internet), **quarantined** (released less than `quarantine` ago) or **free**.
//! New channels are drawn at random from the free slots; only when none is free is the oldest
//! quarantined slot reused early, so the layout's full capacity stays usable under churn.
//!
//! Time: instants are stored as nanoseconds since the instant given to [`Allocator::new`] and
//! never run backwards — an input older than the newest seen counts as the newest.
//!
//! Idle timeouts use a min-heap with lazy deletion and one entry per live channel: `touch` only
//! writes the channel's last-activity time; when an entry comes due and the channel was active
//! since, the entry is pushed again with the real deadline. Entries of released channels are
//! dropped when they surface and the heap is compacted when stale entries outnumber live ones.
//!
//! Memory, all preallocated at construction: per slot 64 bytes (`Option<Channel>`, asserted
//! below) + 4 (free list) + 16 (quarantine queue); per channel of capacity 24 (deadline heap) and
//! ≈ 6.5 (hash index); per live channel one heap allocation holding its call id and leg tag.
//! Measured by `allocator_props.rs`: 114 bytes per channel at 100,000 channels, plus the strings
//! (160 bytes with a 36-byte Call-ID and a 10-byte tag; malloc's own overhead not counted).

mod bandwidth;
mod error;
mod layout;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    fmt,
    hash::{BuildHasher, RandomState},
    time::{Duration, Instant},
};

use hashbrown::HashTable;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

pub use bandwidth::{Codec, HEADER_BYTES, PACKETS_PER_SECOND, PTIME_MS, internet_call_limit};
pub use error::{AllocError, ConfigError};
pub use layout::{Layout, MAX_CAPACITY, MAX_SLOTS, MIN_PORT, Slot};

pub use crate::names::{EventKind, ReleaseReason};

/// Longest call id or leg tag stored, in bytes (SIP Call-IDs and tags are far shorter; the bound
/// keeps a misbehaving client from growing memory).
pub const MAX_ID_LEN: usize = 256;
/// Shortest media inactivity timeout accepted.
pub const MIN_MEDIA_TIMEOUT: Duration = Duration::from_millis(1);
/// Longest media inactivity timeout accepted.
pub const MAX_MEDIA_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest reuse quarantine accepted.
pub const MAX_QUARANTINE: Duration = Duration::from_secs(3600);

/// What a channel is used for. One pool serves them all; they are counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// A call to or from an ITSP (SIP trunk).
    ItspCall,
    /// A call through Circuit.
    CircuitCall,
    /// A system device (the PBX's own phone) at home.
    SystemDevice,
    /// A third-party SIP device at home.
    SipDevice,
    /// A mobile or app client at home or on the road.
    MobileClient,
}

impl Kind {
    /// Number of kinds.
    pub const COUNT: usize = 5;
    /// Every kind, in the order of [`KindCounts`].
    pub const ALL: [Kind; Kind::COUNT] = [
        Kind::ItspCall,
        Kind::CircuitCall,
        Kind::SystemDevice,
        Kind::SipDevice,
        Kind::MobileClient,
    ];

    /// Stable lowercase name, for metric labels and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::ItspCall => "itsp_call",
            Kind::CircuitCall => "circuit_call",
            Kind::SystemDevice => "system_device",
            Kind::SipDevice => "sip_device",
            Kind::MobileClient => "mobile_client",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A count per [`Kind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounts([u32; Kind::COUNT]);

impl KindCounts {
    /// The count for `kind`.
    pub const fn get(&self, kind: Kind) -> u32 {
        self.0[kind as usize]
    }

    /// `(kind, count)` for every kind, in [`Kind::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Kind, u32)> + '_ {
        Kind::ALL.into_iter().zip(self.0)
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u32 {
        self.0.iter().sum()
    }
}

/// Allocator configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Port layout and capacity.
    pub layout: Layout,
    /// Upstream bandwidth in kbit/s that internet calls share; `None`: no internet-call limit.
    pub upstream_kbps: Option<u32>,
    /// Codec the internet-call limit is budgeted with.
    pub codec: Codec,
    /// How long a released slot waits before it is handed out again, so late packets of the old
    /// call never reach a new one.
    pub quarantine: Duration,
    /// Media inactivity timeout of channels allocated without an override.
    pub media_timeout: Duration,
    /// Seed of the random slot choice. The shell seeds it from the OS; tests fix it.
    pub seed: u64,
}

impl Config {
    /// Default reuse quarantine.
    pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(10);
    /// Default media inactivity timeout.
    pub const DEFAULT_MEDIA_TIMEOUT: Duration = Duration::from_secs(60);

    /// The defaults for `layout`: no upstream limit, G.711, 10 s quarantine, 60 s timeout.
    pub fn new(layout: Layout, seed: u64) -> Config {
        Config {
            layout,
            upstream_kbps: None,
            codec: Codec::default(),
            quarantine: Config::DEFAULT_QUARANTINE,
            media_timeout: Config::DEFAULT_MEDIA_TIMEOUT,
            seed,
        }
    }

    /// Checks what the types do not (layouts are valid by construction).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstream_kbps == Some(0) {
            return Err(ConfigError::ZeroUpstream);
        }
        if !(MIN_MEDIA_TIMEOUT..=MAX_MEDIA_TIMEOUT).contains(&self.media_timeout) {
            return Err(ConfigError::DurationOutOfRange {
                what: "media timeout",
                value: self.media_timeout,
                min: MIN_MEDIA_TIMEOUT,
                max: MAX_MEDIA_TIMEOUT,
            });
        }
        if self.quarantine > MAX_QUARANTINE {
            return Err(ConfigError::DurationOutOfRange {
                what: "quarantine",
                value: self.quarantine,
                min: Duration::ZERO,
                max: MAX_QUARANTINE,
            });
        }
        Ok(())
    }

    /// Simultaneous internet calls the upstream holds, or `None` without a limit.
    pub fn internet_call_limit(&self) -> Option<u32> {
        self.upstream_kbps
            .map(|kbps| internet_call_limit(kbps, self.codec))
    }
}

/// A request for a channel for one call leg.
///
/// Whether the leg is an internet call (counted against the upstream limit) is said here rather
/// than derived from the kind: every kind can reach the relay from the Internet (ITSP trunks,
/// Circuit, devices at home), but the caller may know that a given leg stays off the upstream
/// (e.g. a trunk on a private line). [`Request::new`] counts it, the safe default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// SIP Call-ID (non-empty).
    pub call_id: String,
    /// Leg tag (e.g. the SIP tag of the leg); may be empty.
    pub leg_tag: String,
    /// What the channel is for.
    pub kind: Kind,
    /// Counts against the internet-call limit.
    pub internet: bool,
    /// Media inactivity timeout; `None`: the configured default.
    pub timeout: Option<Duration>,
}

impl Request {
    /// An internet-call request with the default timeout.
    pub fn new(call_id: impl Into<String>, leg_tag: impl Into<String>, kind: Kind) -> Request {
        Request {
            call_id: call_id.into(),
            leg_tag: leg_tag.into(),
            kind,
            internet: true,
            timeout: None,
        }
    }

    /// Sets whether the leg counts against the internet-call limit.
    pub fn with_internet(mut self, internet: bool) -> Request {
        self.internet = internet;
        self
    }

    /// Overrides the media inactivity timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }
}

/// Identifies one allocation: unique over the allocator's life, unlike a slot, which is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u64);

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A live (or just released) channel as seen from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub id: ChannelId,
    pub slot: Slot,
    pub call_id: String,
    pub leg_tag: String,
    pub kind: Kind,
    pub internet: bool,
    pub timeout: Duration,
    pub allocated_at: Instant,
    pub last_activity: Instant,
}

/// The answer to [`Allocator::allocate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub channel: ChannelInfo,
    /// `false` when the call leg already held this channel (a repeated request).
    pub new: bool,
}

impl Allocation {
    /// The event for a watch stream: `Some` only for a new channel.
    pub fn event(&self) -> Option<Event> {
        self.new.then(|| Event::Allocated(self.channel.clone()))
    }
}

/// A released channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub channel: ChannelInfo,
    pub reason: ReleaseReason,
    pub released_at: Instant,
}

/// Changes to the pool, for a watch stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Allocated(ChannelInfo),
    Released(Released),
}

impl Event {
    /// The watch-stream event this change is reported as.
    pub const fn kind(&self) -> EventKind {
        match self {
            Event::Allocated(_) => EventKind::Allocated,
            Event::Released(r) => EventKind::released(r.reason),
        }
    }
}

impl From<Released> for Event {
    fn from(released: Released) -> Event {
        Event::Released(released)
    }
}

/// A snapshot of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Channels that may be in use at once.
    pub capacity: u32,
    /// Port pairs of the layout (≥ capacity): `in_use + quarantined + free == slots`.
    pub slots: u32,
    pub in_use: u32,
    pub in_use_by_kind: KindCounts,
    /// Released slots still waiting out the quarantine.
    pub quarantined: u32,
    /// Slots neither in use nor quarantined.
    pub free: u32,
    /// `None` without an upstream limit.
    pub internet_call_limit: Option<u32>,
    pub internet_calls: u32,
    /// Allocations that had to take a quarantined slot early because no slot was free.
    pub early_reuses: u64,
}

/// Nanoseconds since the allocator's epoch.
type Tick = u64;

/// A live channel. Kept to 64 bytes: 100,000 of them are resident.
#[derive(Debug)]
struct Channel {
    /// The call id followed by the leg tag: one heap allocation for both.
    key: Box<str>,
    /// Length of the call id in `key` (≤ [`MAX_ID_LEN`]).
    split: u16,
    kind: Kind,
    internet: bool,
    id: u64,
    allocated_at: Tick,
    last_activity: Tick,
    timeout: Tick,
    /// Deadline of this channel's current heap entry (≤ the real deadline).
    heap_deadline: Tick,
}

const _: () = assert!(size_of::<Option<Channel>>() <= 64);

impl Channel {
    fn call_id(&self) -> &str {
        self.key.get(..usize::from(self.split)).unwrap_or_default()
    }

    fn leg_tag(&self) -> &str {
        self.key.get(usize::from(self.split)..).unwrap_or_default()
    }

    fn deadline(&self) -> Tick {
        self.last_activity.saturating_add(self.timeout)
    }
}

/// A heap entry: channel `id` on slot index `slot` may be idle from `at` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Tick,
    id: u64,
    slot: u32,
}

#[derive(Clone, Copy, Debug)]
struct Quarantined {
    slot: u32,
    since: Tick,
}

/// The channel allocator. See the module summary.
pub struct Allocator {
    config: Config,
    internet_limit: Option<u32>,
    epoch: Instant,
    /// Newest time seen.
    now: Tick,
    quarantine: Tick,
    default_timeout: Tick,
    rng: StdRng,
    /// Indexed by slot index.
    slots: Box<[Option<Channel>]>,
    /// Free slot indices, in no order (the choice is random).
    free: Vec<u32>,
    /// Released slot indices, oldest first (`since` never decreases).
    quarantined: VecDeque<Quarantined>,
    /// Slot indices of live channels, by (call id, leg tag).
    index: HashTable<u32>,
    hasher: RandomState,
    deadlines: BinaryHeap<Reverse<Deadline>>,
    in_use: u32,
    by_kind: KindCounts,
    internet_calls: u32,
    next_id: u64,
    early_reuses: u64,
    /// `free` or `quarantined` may hold slots taken by [`Allocator::restore`] since; tidied at
    /// the next other input (so a batch of restores costs one pass over the slots).
    stale: bool,
}

impl fmt::Debug for Allocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allocator")
            .field("config", &self.config)
            .field("in_use", &self.in_use)
            .field("by_kind", &self.by_kind)
            .field("internet_calls", &self.internet_calls)
            .field("free", &self.free.len())
            .field("quarantined", &self.quarantined.len())
            .finish_non_exhaustive()
    }
}

fn ticks(d: Duration) -> Tick {
    u64::try_from(d.as_nanos()).unwrap_or(Tick::MAX)
}

fn hash_key(hasher: &RandomState, call_id: &str, leg_tag: &str) -> u64 {
    // `str`'s Hash ends each string with a terminator, so ("ab", "c") ≠ ("a", "bc").
    hasher.hash_one((call_id, leg_tag))
}

fn slot_hash(hasher: &RandomState, slots: &[Option<Channel>], index: u32) -> u64 {
    slots
        .get(index as usize)
        .and_then(Option::as_ref)
        .map_or(0, |c| hash_key(hasher, c.call_id(), c.leg_tag()))
}

/// Checks a call id and leg tag: a call id is non-empty, neither is longer than
/// [`MAX_ID_LEN`].
fn check_leg(call_id: &str, leg_tag: &str) -> Result<(), AllocError> {
    if call_id.is_empty() {
        return Err(AllocError::EmptyCallId);
    }
    for (field, value) in [("call id", call_id), ("leg tag", leg_tag)] {
        if value.len() > MAX_ID_LEN {
            return Err(AllocError::TooLong {
                field,
                len: value.len(),
                max: MAX_ID_LEN,
            });
        }
    }
    Ok(())
}

/// Checks a media inactivity timeout against [`MIN_MEDIA_TIMEOUT`]`..=`[`MAX_MEDIA_TIMEOUT`].
pub fn check_timeout(timeout: Duration) -> Result<(), AllocError> {
    if (MIN_MEDIA_TIMEOUT..=MAX_MEDIA_TIMEOUT).contains(&timeout) {
        Ok(())
    } else {
        Err(AllocError::Timeout {
            value: timeout,
            min: MIN_MEDIA_TIMEOUT,
            max: MAX_MEDIA_TIMEOUT,
        })
    }
}

impl Allocator {
    /// An allocator with every slot free; `now` becomes its epoch.
    pub fn new(config: Config, now: Instant) -> Result<Allocator, ConfigError> {
        config.validate()?;
        let layout = config.layout;
        let slots = layout.slots();
        let capacity = layout.capacity() as usize;
        Ok(Allocator {
            internet_limit: config.internet_call_limit(),
            epoch: now,
            now: 0,
            quarantine: ticks(config.quarantine),
            default_timeout: ticks(config.media_timeout),
            rng: StdRng::seed_from_u64(config.seed),
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).collect(),
            quarantined: VecDeque::with_capacity(slots as usize),
            index: HashTable::with_capacity(capacity),
            hasher: RandomState::new(),
            deadlines: BinaryHeap::with_capacity(capacity),
            in_use: 0,
            by_kind: KindCounts::default(),
            internet_calls: 0,
            next_id: 1,
            early_reuses: 0,
            stale: false,
            config,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Allocates a channel for the call leg, or returns the one it already holds
    /// (`new: false`; the repeat changes nothing, not even the timeout).
    ///
    /// Fails with [`AllocError::PoolFull`] when `capacity` channels are in use and with
    /// [`AllocError::InternetCallLimit`] when an internet call would exceed the upstream.
    pub fn allocate(&mut self, request: Request, now: Instant) -> Result<Allocation, AllocError> {
        let now = self.advance(now);
        let Request {
            call_id,
            leg_tag,
            kind,
            internet,
            timeout,
        } = request;
        check_leg(&call_id, &leg_tag)?;
        if let Some(timeout) = timeout {
            check_timeout(timeout)?;
        }

        let hash = hash_key(&self.hasher, &call_id, &leg_tag);
        if let Some(index) = self.lookup(hash, &call_id, &leg_tag) {
            let Some(channel) = self.slot_channel(index) else {
                return Err(AllocError::UnknownLeg { call_id, leg_tag });
            };
            if channel.kind != kind || channel.internet != internet {
                return Err(AllocError::Conflict {
                    kind: channel.kind,
                    internet: channel.internet,
                    call_id,
                    leg_tag,
                });
            }
            return Ok(Allocation {
                channel: self.info(index, channel),
                new: false,
            });
        }

        let capacity = self.config.layout.capacity();
        self.check_room(internet)?;

        let index = if self.free.is_empty() {
            // Only quarantined slots are left (possible only when slots == capacity, or almost):
            // refusing would shrink the usable capacity under churn, so take the slot released
            // longest ago.
            let Some(oldest) = self.quarantined.pop_front() else {
                return Err(AllocError::PoolFull {
                    in_use: self.in_use,
                    capacity,
                });
            };
            self.early_reuses += 1;
            oldest.slot
        } else {
            let pick = self.rng.random_range(0..self.free.len());
            self.free.swap_remove(pick)
        };

        let timeout = timeout.map_or(self.default_timeout, ticks);
        let id = self.next_id;
        // Saturates only after `set_next_id`/`restore` with an absurd id; never in practice.
        self.next_id = self.next_id.saturating_add(1);
        let split = call_id.len() as u16; // ≤ MAX_ID_LEN, checked above
        let mut key = call_id;
        key.push_str(&leg_tag);
        let channel = Channel {
            key: key.into_boxed_str(),
            split,
            kind,
            internet,
            id,
            allocated_at: now,
            last_activity: now,
            timeout,
            heap_deadline: now.saturating_add(timeout),
        };
        let info = self.insert(index, hash, channel);
        Ok(Allocation {
            channel: info,
            new: true,
        })
    }

    /// Re-inserts a live allocation found in a persistent store (at start, after
    /// [`Allocator::new`]): the channel gets back its slot, id, call id and leg tag, kind,
    /// internet flag and timeout. Its allocation and activity times are `info`'s, but never
    /// later than `now` nor earlier than the allocator's epoch, so a channel idle for longer
    /// than its timeout is released at the next [`Allocator::expire`].
    ///
    /// Ids handed out afterwards are above `info.id` (see [`Allocator::set_next_id`]). The
    /// store is trusted for the uniqueness of ids; everything else is checked as on
    /// [`Allocator::allocate`], and a slot outside the layout ([`AllocError::OutsideLayout`]),
    /// a slot in use ([`AllocError::SlotTaken`]) or a call leg that already holds a channel
    /// ([`AllocError::LegTaken`]) is refused. A quarantined slot may be restored: the stored
    /// allocation is what the slot carried last.
    pub fn restore(&mut self, info: ChannelInfo, now: Instant) -> Result<(), AllocError> {
        // No tidying of `free` here (see `stale`): a batch of restores stays linear.
        let now = self.advance_clock(now);
        let ChannelInfo {
            id,
            slot,
            call_id,
            leg_tag,
            kind,
            internet,
            timeout,
            allocated_at,
            last_activity,
        } = info;
        check_leg(&call_id, &leg_tag)?;
        check_timeout(timeout)?;
        let index = self
            .config
            .layout
            .index_of(slot)
            .ok_or(AllocError::OutsideLayout(slot))?;
        if self.slot_channel(index).is_some() {
            return Err(AllocError::SlotTaken(slot));
        }
        let hash = hash_key(&self.hasher, &call_id, &leg_tag);
        if let Some(held) = self.lookup(hash, &call_id, &leg_tag) {
            return Err(AllocError::LegTaken {
                call_id,
                leg_tag,
                slot: self.config.layout.slot_at(held),
            });
        }
        self.check_room(internet)?;

        let allocated_at = self.tick(allocated_at).min(now);
        let last_activity = self.tick(last_activity).clamp(allocated_at, now);
        let timeout = ticks(timeout);
        let split = call_id.len() as u16; // ≤ MAX_ID_LEN, checked above
        let mut key = call_id;
        key.push_str(&leg_tag);
        let channel = Channel {
            key: key.into_boxed_str(),
            split,
            kind,
            internet,
            id: id.0,
            allocated_at,
            last_activity,
            timeout,
            heap_deadline: last_activity.saturating_add(timeout),
        };
        self.insert(index, hash, channel);
        self.next_id = self.next_id.max(id.0.saturating_add(1));
        self.stale = true;
        Ok(())
    }

    /// Ids handed out from now on are at least `next` (and still above every id handed out or
    /// restored: the larger bound wins). A restarted service passes one above every id it ever
    /// handed out, so ids stay unique across restarts.
    pub fn set_next_id(&mut self, next: ChannelId) {
        self.next_id = self.next_id.max(next.0);
    }

    /// The id the next new channel gets: above every id handed out or restored so far.
    pub fn next_id(&self) -> ChannelId {
        ChannelId(self.next_id)
    }

    /// Refuses a new channel when the pool is full or an internet call would exceed the
    /// upstream.
    fn check_room(&self, internet: bool) -> Result<(), AllocError> {
        let capacity = self.config.layout.capacity();
        if self.in_use >= capacity {
            return Err(AllocError::PoolFull {
                in_use: self.in_use,
                capacity,
            });
        }
        if let (true, Some(limit), Some(upstream_kbps)) =
            (internet, self.internet_limit, self.config.upstream_kbps)
        {
            if self.internet_calls >= limit {
                return Err(AllocError::InternetCallLimit {
                    limit,
                    per_call_kbps: self.config.codec.kbps(),
                    upstream_kbps,
                });
            }
        }
        Ok(())
    }

    /// Puts `channel` live on the (vacant, no longer free) slot index `index`.
    fn insert(&mut self, index: u32, hash: u64, channel: Channel) -> ChannelInfo {
        self.deadlines.push(Reverse(Deadline {
            at: channel.heap_deadline,
            id: channel.id,
            slot: index,
        }));
        let (kind, internet) = (channel.kind, channel.internet);
        let info = self.info(index, &channel);
        if let Some(place) = self.slots.get_mut(index as usize) {
            *place = Some(channel);
        }
        let (hasher, slots) = (&self.hasher, &self.slots);
        self.index
            .insert_unique(hash, index, |&i| slot_hash(hasher, slots, i));
        self.in_use += 1;
        self.by_kind.0[kind as usize] += 1;
        if internet {
            self.internet_calls += 1;
        }
        info
    }

    /// Releases the channel on `slot`; its slot goes into quarantine.
    pub fn release(&mut self, slot: Slot, now: Instant) -> Result<Released, AllocError> {
        let now = self.advance(now);
        let index = self.live_index(slot).ok_or(AllocError::UnknownSlot(slot))?;
        self.remove(index, now, ReleaseReason::Requested)
            .ok_or(AllocError::UnknownSlot(slot))
    }

    /// Releases the channel the call leg holds; its slot goes into quarantine.
    pub fn release_leg(
        &mut self,
        call_id: &str,
        leg_tag: &str,
        now: Instant,
    ) -> Result<Released, AllocError> {
        let now = self.advance(now);
        let hash = hash_key(&self.hasher, call_id, leg_tag);
        self.lookup(hash, call_id, leg_tag)
            .and_then(|index| self.remove(index, now, ReleaseReason::Requested))
            .ok_or_else(|| AllocError::UnknownLeg {
                call_id: call_id.to_owned(),
                leg_tag: leg_tag.to_owned(),
            })
    }

    /// Records media activity on `slot` at `now`: its idle timeout starts again.
    pub fn touch(&mut self, slot: Slot, now: Instant) -> Result<(), AllocError> {
        let now = self.advance(now);
        let channel = self
            .live_index(slot)
            .and_then(|index| self.slots.get_mut(index as usize))
            .and_then(Option::as_mut)
            .ok_or(AllocError::UnknownSlot(slot))?;
        channel.last_activity = now;
        Ok(())
    }

    /// Changes the media inactivity timeout of the channel on `slot`; it counts from the last
    /// activity, so a shorter timeout may make the channel due at once (at the next `expire`).
    pub fn set_timeout(
        &mut self,
        slot: Slot,
        timeout: Duration,
        now: Instant,
    ) -> Result<(), AllocError> {
        check_timeout(timeout)?;
        self.advance(now);
        let index = self.live_index(slot).ok_or(AllocError::UnknownSlot(slot))?;
        let channel = self
            .slots
            .get_mut(index as usize)
            .and_then(Option::as_mut)
            .ok_or(AllocError::UnknownSlot(slot))?;
        channel.timeout = ticks(timeout);
        let deadline = channel.deadline();
        // A later deadline needs nothing: the current entry comes due early and is pushed again.
        if deadline < channel.heap_deadline {
            channel.heap_deadline = deadline;
            self.deadlines.push(Reverse(Deadline {
                at: deadline,
                id: channel.id,
                slot: index,
            }));
        }
        Ok(())
    }

    /// Releases every channel idle for at least its timeout at `now`, earliest deadline first.
    pub fn expire(&mut self, now: Instant) -> Vec<Released> {
        let now = self.advance(now);
        let mut expired = Vec::new();
        while let Some(&Reverse(due)) = self.deadlines.peek() {
            if due.at > now {
                break;
            }
            self.deadlines.pop();
            let Some(channel) = self.current(due) else {
                continue;
            };
            let deadline = channel.deadline();
            if deadline <= due.at {
                expired.extend(self.remove(due.slot, now, ReleaseReason::IdleTimeout));
            } else {
                // Active since the entry was pushed: queue it again at its real deadline, even
                // if that has passed too, so expiry stays in deadline order.
                channel.heap_deadline = deadline;
                let id = channel.id;
                self.deadlines.push(Reverse(Deadline {
                    at: deadline,
                    id,
                    slot: due.slot,
                }));
            }
        }
        self.tidy_deadlines();
        expired
    }

    /// When [`Allocator::expire`] should run next: never later than the earliest idle deadline,
    /// possibly earlier (if the channel was touched since; that `expire` then finds nothing and
    /// moves the deadline on). `None` while no channel is in use.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines
            .peek()
            .map(|Reverse(due)| self.instant(due.at))
    }

    /// The channel on `slot`, if one is in use there.
    pub fn get(&self, slot: Slot) -> Option<ChannelInfo> {
        let index = self.live_index(slot)?;
        self.slot_channel(index).map(|c| self.info(index, c))
    }

    /// The slot the call leg holds, if any.
    pub fn find(&self, call_id: &str, leg_tag: &str) -> Option<Slot> {
        let hash = hash_key(&self.hasher, call_id, leg_tag);
        self.lookup(hash, call_id, leg_tag)
            .map(|index| self.config.layout.slot_at(index))
    }

    /// The pool as of `now` (or the newest time seen, if later).
    pub fn status(&self, now: Instant) -> Status {
        let now = self.now.max(self.tick(now));
        let waiting = |q: &Quarantined| q.since.saturating_add(self.quarantine) > now;
        let quarantined = if self.stale {
            // Restored slots may still be listed: count only the vacant ones.
            self.quarantined
                .iter()
                .filter(|q| waiting(q) && self.slot_channel(q.slot).is_none())
                .count()
        } else {
            let waited_out = self.quarantined.partition_point(|q| !waiting(q));
            self.quarantined.len() - waited_out
        } as u32;
        let slots = self.config.layout.slots();
        Status {
            capacity: self.config.layout.capacity(),
            slots,
            in_use: self.in_use,
            in_use_by_kind: self.by_kind,
            quarantined,
            // Every slot is live, quarantined or free.
            free: slots - self.in_use - quarantined,
            internet_call_limit: self.internet_limit,
            internet_calls: self.internet_calls,
            early_reuses: self.early_reuses,
        }
    }

    fn tick(&self, now: Instant) -> Tick {
        ticks(now.saturating_duration_since(self.epoch))
    }

    fn instant(&self, tick: Tick) -> Instant {
        // Ticks come from instants that existed (plus at most a day of timeout), so this adds up;
        // the fallback only keeps a corrupt value from panicking.
        self.epoch
            .checked_add(Duration::from_nanos(tick))
            .unwrap_or(self.epoch)
    }

    /// Drops restored slots from the free list and the quarantine, then moves the clock on.
    fn advance(&mut self, now: Instant) -> Tick {
        if self.stale {
            let slots = &self.slots;
            let vacant = |i: u32| slots.get(i as usize).is_some_and(Option::is_none);
            self.free.retain(|&i| vacant(i));
            self.quarantined.retain(|q| vacant(q.slot));
            self.stale = false;
        }
        self.advance_clock(now)
    }

    /// Moves the clock on (never back) and frees the slots whose quarantine is over.
    fn advance_clock(&mut self, now: Instant) -> Tick {
        self.now = self.now.max(self.tick(now));
        while let Some(&oldest) = self.quarantined.front() {
            if oldest.since.saturating_add(self.quarantine) > self.now {
                break;
            }
            self.quarantined.pop_front();
            self.free.push(oldest.slot);
        }
        self.now
    }

    fn lookup(&self, hash: u64, call_id: &str, leg_tag: &str) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| {
                slots
                    .get(i as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.call_id() == call_id && c.leg_tag() == leg_tag)
            })
            .copied()
    }

    fn slot_channel(&self, index: u32) -> Option<&Channel> {
        self.slots.get(index as usize).and_then(Option::as_ref)
    }

    /// The slot index of `slot` if a channel is live there.
    fn live_index(&self, slot: Slot) -> Option<u32> {
        let index = self.config.layout.index_of(slot)?;
        self.slot_channel(index).map(|_| index)
    }

    /// The channel `due` belongs to, if it is still live and `due` is its current entry.
    fn current(&mut self, due: Deadline) -> Option<&mut Channel> {
        self.slots
            .get_mut(due.slot as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.id == due.id && c.heap_deadline == due.at)
    }

    fn is_current(slots: &[Option<Channel>], due: &Deadline) -> bool {
        slots
            .get(due.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.id == due.id && c.heap_deadline == due.at)
    }

    /// Drops stale entries from the top (so `next_deadline` belongs to a live channel) and
    /// compacts the heap when stale entries pile up below.
    fn tidy_deadlines(&mut self) {
        while let Some(Reverse(top)) = self.deadlines.peek() {
            if Self::is_current(&self.slots, top) {
                break;
            }
            self.deadlines.pop();
        }
        if self.deadlines.len() > 2 * self.in_use as usize + 64 {
            let slots = &self.slots;
            self.deadlines
                .retain(|Reverse(due)| Self::is_current(slots, due));
        }
    }

    fn info(&self, index: u32, channel: &Channel) -> ChannelInfo {
        ChannelInfo {
            id: ChannelId(channel.id),
            slot: self.config.layout.slot_at(index),
            call_id: channel.call_id().to_owned(),
            leg_tag: channel.leg_tag().to_owned(),
            kind: channel.kind,
            internet: channel.internet,
            timeout: Duration::from_nanos(channel.timeout),
            allocated_at: self.instant(channel.allocated_at),
            last_activity: self.instant(channel.last_activity),
        }
    }

    /// Takes the channel off slot index `index` and quarantines the slot.
    fn remove(&mut self, index: u32, now: Tick, reason: ReleaseReason) -> Option<Released> {
        let channel = self.slots.get_mut(index as usize)?.take()?;
        let hash = hash_key(&self.hasher, channel.call_id(), channel.leg_tag());
        if let Ok(entry) = self.index.find_entry(hash, |&i| i == index) {
            entry.remove();
        }
        self.in_use -= 1;
        self.by_kind.0[channel.kind as usize] -= 1;
        if channel.internet {
            self.internet_calls -= 1;
        }
        self.quarantined.push_back(Quarantined {
            slot: index,
            since: now,
        });
        let info = self.info(index, &channel);
        self.tidy_deadlines();
        Some(Released {
            channel: info,
            reason,
            released_at: self.instant(now),
        })
    }
}

#[cfg(test)]
mod tests;
