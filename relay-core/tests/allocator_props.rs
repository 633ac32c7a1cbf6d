//! Property tests of the channel allocator through its public API: random sequences of
//! operations checked step by step against a small reference model, then drained to show that
//! nothing leaks. Also measures the memory of 100,000 resident channels.

use std::{
    alloc::{GlobalAlloc, Layout as MemLayout, System},
    cell::Cell,
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use proptest::prelude::*;
use relay_core::allocator::{
    AllocError, Allocator, Codec, Config, Kind, Layout, ReleaseReason, Request, Slot, Status,
};

// ---------------------------------------------------------------------------------------------
// The operation sequences.

#[derive(Clone, Debug)]
enum Op {
    Allocate {
        call: u8,
        leg: u8,
        kind: usize,
        internet: bool,
        timeout_s: Option<u64>,
    },
    /// Release the `pick`-th slot of the layout (live or not), or a slot outside the layout.
    Release {
        pick: usize,
        outside: bool,
    },
    ReleaseLeg {
        call: u8,
        leg: u8,
    },
    Touch {
        pick: usize,
    },
    SetTimeout {
        pick: usize,
        secs: u64,
    },
    Advance {
        ms: u64,
    },
    Expire,
    /// Snapshot every live channel, start a new allocator and restore them into it.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..6u8, 0..3u8, 0..Kind::COUNT, any::<bool>(), prop::option::of(1..=30u64))
            .prop_map(|(call, leg, kind, internet, timeout_s)| Op::Allocate {
                call, leg, kind, internet, timeout_s,
            }),
        2 => (any::<usize>(), prop::bool::weighted(0.1))
            .prop_map(|(pick, outside)| Op::Release { pick, outside }),
        2 => (0..6u8, 0..3u8).prop_map(|(call, leg)| Op::ReleaseLeg { call, leg }),
        2 => any::<usize>().prop_map(|pick| Op::Touch { pick }),
        1 => (any::<usize>(), 1..=30u64).prop_map(|(pick, secs)| Op::SetTimeout { pick, secs }),
        3 => (0..=20_000u64).prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::Expire),
        1 => Just(Op::Restart),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    layout: Layout,
    upstream_kbps: Option<u32>,
    quarantine: Duration,
    media_timeout: Duration,
    seed: u64,
}

fn setup() -> impl Strategy<Value = Setup> {
    // Small custom layouts make a full pool and early quarantine reuse common; `x` has more
    // slots than capacity.
    let custom = (1..=4u16, 1..=2u16, 1..=8u32).prop_map(|(pairs, addresses, cap)| {
        let slots = u32::from(pairs) * u32::from(addresses);
        Layout::custom(20_000, 20_000 + 2 * pairs - 1, cap.min(slots), addresses)
    });
    let layout = prop_oneof![
        3 => custom.prop_filter_map("valid layout", Result::ok),
        1 => Just(Layout::X),
    ];
    (
        layout,
        prop::option::of(80..=400u32),
        0..=15u64,
        1..=30u64,
        any::<u64>(),
    )
        .prop_map(|(layout, upstream_kbps, q, t, seed)| Setup {
            layout,
            upstream_kbps,
            quarantine: Duration::from_secs(q),
            media_timeout: Duration::from_secs(t),
            seed,
        })
}

// ---------------------------------------------------------------------------------------------
// The reference model: what should be live, and when each slot was last released.

#[derive(Clone, Debug)]
struct Live {
    slot: Slot,
    kind: Kind,
    internet: bool,
    last: Duration,
    timeout: Duration,
}

impl Live {
    fn deadline(&self) -> Duration {
        self.last + self.timeout
    }
}

struct Model {
    setup: Setup,
    all_slots: Vec<Slot>,
    live: BTreeMap<(String, String), Live>,
    /// Slot → (release time, release order) for slots not live.
    released: HashMap<Slot, (Duration, u64)>,
    releases: u64,
    now: Duration,
    early_reuses: u64,
    /// Highest channel id handed out, over every restart.
    max_id: u64,
}

impl Model {
    fn new(setup: Setup) -> Model {
        let l = setup.layout;
        let all_slots = (0..l.addresses())
            .flat_map(|addr_index| {
                (0..l.pairs_per_address()).map(move |p| Slot {
                    addr_index,
                    port: l.first_port() + 2 * p as u16,
                })
            })
            .collect();
        Model {
            setup,
            all_slots,
            live: BTreeMap::new(),
            released: HashMap::new(),
            releases: 0,
            now: Duration::ZERO,
            early_reuses: 0,
            max_id: 0,
        }
    }

    fn limit(&self) -> Option<u32> {
        self.setup.upstream_kbps.map(|k| k / Codec::G711.kbps())
    }

    fn in_quarantine(&self, slot: &Slot) -> bool {
        self.released
            .get(slot)
            .is_some_and(|(at, _)| *at + self.setup.quarantine > self.now)
    }

    fn live_by_slot(&self, slot: Slot) -> Option<(String, String)> {
        self.live
            .iter()
            .find(|(_, l)| l.slot == slot)
            .map(|(k, _)| k.clone())
    }

    fn release(&mut self, key: &(String, String)) -> Option<Live> {
        let live = self.live.remove(key)?;
        self.released.insert(live.slot, (self.now, self.releases));
        self.releases += 1;
        Some(live)
    }

    fn pick(&self, pick: usize) -> Slot {
        self.all_slots[pick % self.all_slots.len()]
    }
}

fn key(call: u8, leg: u8) -> (String, String) {
    (format!("call-{call}@pbx.example"), format!("tag{leg}"))
}

fn check_status(a: &Allocator, m: &Model, t0: Instant) -> Result<Status, TestCaseError> {
    let s = a.status(t0 + m.now);
    let layout = m.setup.layout;
    prop_assert_eq!(s.in_use as usize, m.live.len());
    prop_assert!(s.in_use <= layout.capacity());
    prop_assert_eq!(s.in_use_by_kind.total(), s.in_use);
    for kind in Kind::ALL {
        let n = m.live.values().filter(|l| l.kind == kind).count();
        prop_assert_eq!(s.in_use_by_kind.get(kind) as usize, n, "{}", kind);
    }
    let internet = m.live.values().filter(|l| l.internet).count();
    prop_assert_eq!(s.internet_calls as usize, internet);
    prop_assert_eq!(s.internet_call_limit, m.limit());
    if let Some(limit) = s.internet_call_limit {
        prop_assert!(s.internet_calls <= limit);
    }
    prop_assert_eq!(s.slots as usize, m.all_slots.len());
    prop_assert_eq!(s.in_use + s.quarantined + s.free, s.slots);
    let quarantined = m.released.keys().filter(|s| m.in_quarantine(s)).count();
    prop_assert_eq!(s.quarantined as usize, quarantined);
    prop_assert_eq!(s.early_reuses, m.early_reuses);

    // Never one slot for two live channels, and the allocator agrees on who holds which.
    let mut seen = HashSet::new();
    for ((call, leg), l) in &m.live {
        prop_assert!(seen.insert(l.slot), "slot {} held twice", l.slot);
        prop_assert_eq!(a.find(call, leg), Some(l.slot));
        let info = a
            .get(l.slot)
            .ok_or_else(|| TestCaseError::fail("live slot missing"))?;
        prop_assert_eq!((&info.call_id, &info.leg_tag), (call, leg));
        prop_assert_eq!(info.timeout, l.timeout);
    }

    // The shell is woken no later than the earliest idle deadline.
    match m.live.values().map(Live::deadline).min() {
        Some(earliest) => {
            let next = a.next_deadline();
            prop_assert!(
                next.is_some_and(|d| d <= t0 + earliest),
                "{next:?} > {earliest:?}"
            );
        }
        None => prop_assert_eq!(a.next_deadline(), None),
    }
    Ok(s)
}

fn step(a: &mut Allocator, m: &mut Model, t0: Instant, op: &Op) -> Result<(), TestCaseError> {
    let now = t0 + m.now;
    match *op {
        Op::Allocate {
            call,
            leg,
            kind,
            internet,
            timeout_s,
        } => {
            let kind = Kind::ALL[kind];
            let k = key(call, leg);
            let mut request = Request::new(k.0.clone(), k.1.clone(), kind).with_internet(internet);
            if let Some(secs) = timeout_s {
                request = request.with_timeout(Duration::from_secs(secs));
            }
            let before = a.status(now);
            let got = a.allocate(request, now);
            if let Some(l) = m.live.get(&k) {
                // A repeat: same channel, nothing consumed (or a conflict if it differs).
                if l.kind == kind && l.internet == internet {
                    let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(!got.new);
                    prop_assert_eq!(got.channel.slot, l.slot);
                } else {
                    let is_conflict = matches!(got, Err(AllocError::Conflict { .. }));
                    prop_assert!(is_conflict, "{got:?}");
                }
                prop_assert_eq!(a.status(now), before);
                return Ok(());
            }
            let capacity = m.setup.layout.capacity();
            let internet_calls = m.live.values().filter(|l| l.internet).count() as u32;
            if m.live.len() as u32 == capacity {
                prop_assert_eq!(
                    got,
                    Err(AllocError::PoolFull {
                        in_use: capacity,
                        capacity
                    })
                );
            } else if internet && m.limit().is_some_and(|limit| internet_calls >= limit) {
                let is_limit = matches!(got, Err(AllocError::InternetCallLimit { .. }));
                prop_assert!(is_limit, "{got:?}");
            } else {
                let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(got.new);
                prop_assert!(got.channel.id.0 > m.max_id, "id {} reused", got.channel.id);
                m.max_id = got.channel.id.0;
                let slot = got.channel.slot;
                prop_assert!(m.all_slots.contains(&slot), "{} not in layout", slot);
                prop_assert!(m.live_by_slot(slot).is_none(), "{} handed out twice", slot);
                if m.in_quarantine(&slot) {
                    // Early reuse only when nothing is free, and then the oldest release.
                    let free_now = m
                        .all_slots
                        .iter()
                        .filter(|s| m.live_by_slot(**s).is_none() && !m.in_quarantine(s))
                        .count();
                    prop_assert_eq!(
                        free_now,
                        0,
                        "quarantined {} reused while slots were free",
                        slot
                    );
                    let oldest = m
                        .released
                        .iter()
                        .filter(|(s, _)| m.in_quarantine(s))
                        .min_by_key(|(_, order)| **order)
                        .map(|(s, _)| *s);
                    prop_assert_eq!(Some(slot), oldest);
                    m.early_reuses += 1;
                }
                m.released.remove(&slot);
                let timeout = timeout_s.map_or(m.setup.media_timeout, Duration::from_secs);
                m.live.insert(
                    k,
                    Live {
                        slot,
                        kind,
                        internet,
                        last: m.now,
                        timeout,
                    },
                );
            }
        }
        Op::Release { pick, outside } => {
            let slot = if outside {
                // Odd port, or a port past the range: never part of the layout.
                let l = m.setup.layout;
                if pick % 2 == 0 {
                    Slot {
                        addr_index: 0,
                        port: l.first_port() + 1,
                    }
                } else {
                    Slot {
                        addr_index: l.addresses(),
                        port: l.first_port(),
                    }
                }
            } else {
                m.pick(pick)
            };
            let got = a.release(slot, now);
            match m.live_by_slot(slot) {
                Some(k) => {
                    let l = m.release(&k).ok_or_else(|| TestCaseError::fail("model"))?;
                    let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(got.reason, ReleaseReason::Requested);
                    prop_assert_eq!((got.channel.call_id, got.channel.leg_tag), k);
                    prop_assert_eq!((got.channel.kind, got.channel.slot), (l.kind, l.slot));
                }
                None => prop_assert_eq!(got, Err(AllocError::UnknownSlot(slot))),
            }
        }
        Op::ReleaseLeg { call, leg } => {
            let k = key(call, leg);
            let got = a.release_leg(&k.0, &k.1, now);
            match m.release(&k) {
                Some(l) => {
                    let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(got.channel.slot, l.slot);
                }
                None => {
                    let not_found = matches!(got, Err(AllocError::UnknownLeg { .. }));
                    prop_assert!(not_found, "{got:?}");
                }
            }
        }
        Op::Touch { pick } => {
            let slot = m.pick(pick);
            let got = a.touch(slot, now);
            match m.live_by_slot(slot) {
                Some(k) => {
                    prop_assert_eq!(got, Ok(()));
                    if let Some(l) = m.live.get_mut(&k) {
                        l.last = m.now;
                    }
                }
                None => prop_assert_eq!(got, Err(AllocError::UnknownSlot(slot))),
            }
        }
        Op::SetTimeout { pick, secs } => {
            let slot = m.pick(pick);
            let timeout = Duration::from_secs(secs);
            let got = a.set_timeout(slot, timeout, now);
            match m.live_by_slot(slot) {
                Some(k) => {
                    prop_assert_eq!(got, Ok(()));
                    if let Some(l) = m.live.get_mut(&k) {
                        l.timeout = timeout;
                    }
                }
                None => prop_assert_eq!(got, Err(AllocError::UnknownSlot(slot))),
            }
        }
        Op::Advance { ms } => m.now += Duration::from_millis(ms),
        Op::Restart => restart(a, m, t0)?,
        Op::Expire => {
            let expired = a.expire(now);
            let mut due: Vec<_> = m
                .live
                .iter()
                .filter(|(_, l)| l.deadline() <= m.now)
                .map(|(k, l)| (k.clone(), l.slot))
                .collect();
            due.sort();
            let mut got: Vec<_> = expired
                .iter()
                .map(|r| {
                    let c = &r.channel;
                    ((c.call_id.clone(), c.leg_tag.clone()), c.slot)
                })
                .collect();
            got.sort();
            prop_assert_eq!(got, due, "expired exactly the idle channels");
            let mut last_deadline = Duration::ZERO;
            for r in &expired {
                prop_assert_eq!(r.reason, ReleaseReason::IdleTimeout);
                prop_assert_eq!(r.released_at, now);
                let k = (r.channel.call_id.clone(), r.channel.leg_tag.clone());
                let l = m.release(&k).ok_or_else(|| TestCaseError::fail("model"))?;
                prop_assert!(
                    l.deadline() >= last_deadline,
                    "expired out of deadline order"
                );
                last_deadline = l.deadline();
            }
        }
    }
    Ok(())
}

fn config(setup: &Setup) -> Config {
    let mut config = Config::new(setup.layout, setup.seed);
    config.upstream_kbps = setup.upstream_kbps;
    config.quarantine = setup.quarantine;
    config.media_timeout = setup.media_timeout;
    config
}

/// A restart with persisted allocations: a new allocator (same epoch, so the model's times stay
/// exact) into which every live channel is restored. Quarantines are not persisted: afterwards
/// every slot not restored is free.
fn restart(a: &mut Allocator, m: &mut Model, t0: Instant) -> Result<(), TestCaseError> {
    let now = t0 + m.now;
    let infos: Vec<_> = m.live.values().filter_map(|l| a.get(l.slot)).collect();
    prop_assert_eq!(infos.len(), m.live.len());
    let mut fresh =
        Allocator::new(config(&m.setup), t0).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for info in &infos {
        fresh
            .restore(info.clone(), now)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(fresh.get(info.slot), Some(info.clone()));
    }
    fresh.set_next_id(a.next_id());
    prop_assert!(fresh.next_id().0 > m.max_id);

    if let Some(first) = infos.first() {
        // A restored slot or call leg cannot be restored twice, nor a slot outside the layout.
        prop_assert_eq!(
            fresh.restore(first.clone(), now),
            Err(AllocError::SlotTaken(first.slot))
        );
        if let Some(&vacant) = m.all_slots.iter().find(|s| m.live_by_slot(**s).is_none()) {
            let mut moved = first.clone();
            moved.slot = vacant;
            let taken = matches!(
                fresh.restore(moved, now),
                Err(AllocError::LegTaken { slot, .. }) if slot == first.slot
            );
            prop_assert!(taken);
        }
        let mut outside = first.clone();
        outside.slot.addr_index = m.setup.layout.addresses();
        outside.call_id.push_str("-outside");
        prop_assert_eq!(
            fresh.restore(outside.clone(), now),
            Err(AllocError::OutsideLayout(outside.slot))
        );
    }
    *a = fresh;
    m.released.clear();
    m.early_reuses = 0;
    Ok(())
}

fn run(setup: Setup, ops: &[Op]) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let mut a =
        Allocator::new(config(&setup), t0).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut m = Model::new(setup);
    for op in ops {
        step(&mut a, &mut m, t0, op)?;
        check_status(&a, &m, t0)?;
    }

    // Drain: release half by leg, let the rest time out; nothing may leak.
    let keys: Vec<_> = m.live.keys().cloned().collect();
    for (i, k) in keys.iter().enumerate() {
        if i % 2 == 0 {
            a.release_leg(&k.0, &k.1, t0 + m.now)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            m.release(k);
        }
    }
    m.now += Duration::from_secs(30); // every timeout in the test is ≤ 30 s
    step(&mut a, &mut m, t0, &Op::Expire)?;
    let s = check_status(&a, &m, t0)?;
    prop_assert_eq!(s.in_use, 0);
    prop_assert_eq!(s.free + s.quarantined, s.slots);
    if s.slots == s.capacity {
        prop_assert_eq!(s.free + s.quarantined, s.capacity);
    }
    m.now += m.setup.quarantine;
    let s = check_status(&a, &m, t0)?;
    prop_assert_eq!((s.free, s.quarantined), (s.slots, 0));

    // The whole capacity is usable again, without early reuse.
    let early = s.early_reuses;
    for i in 0..s.capacity {
        let request = Request::new(format!("again-{i}"), "", Kind::SipDevice).with_internet(false);
        let got = a
            .allocate(request, t0 + m.now)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(got.new);
    }
    let s = a.status(t0 + m.now);
    prop_assert_eq!((s.in_use, s.early_reuses), (s.capacity, early));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_operation_sequences_keep_every_invariant(
        setup in setup(),
        ops in prop::collection::vec(op(), 0..120),
    ) {
        run(setup, &ops)?;
    }

    #[test]
    fn idempotent_repeats_never_consume_a_channel(
        seed in any::<u64>(),
        calls in prop::collection::vec((0..20u8, 0..3u8), 1..200),
    ) {
        let t0 = Instant::now();
        let mut a = Allocator::new(Config::new(Layout::S, seed), t0)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut held = HashMap::new();
        for (i, (call, leg)) in calls.into_iter().enumerate() {
            let k = key(call, leg);
            let now = t0 + Duration::from_millis(i as u64);
            let got = a
                .allocate(Request::new(k.0.clone(), k.1.clone(), Kind::ItspCall), now)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            match held.get(&k) {
                Some(slot) => {
                    prop_assert!(!got.new);
                    prop_assert_eq!(got.channel.slot, *slot);
                }
                None => {
                    prop_assert!(got.new);
                    held.insert(k, got.channel.slot);
                }
            }
            prop_assert_eq!(a.status(now).in_use as usize, held.len());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Memory: bytes this thread holds on the heap, counted by a wrapper around the system allocator.

struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
}

fn held_bytes() -> isize {
    HELD.with(Cell::get)
}

fn count(delta: isize) {
    // `try_with`: thread-local storage may already be gone while a thread exits.
    let _ = HELD.try_with(|held| held.set(held.get() + delta));
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the counting touches only a const-initialized thread-local `Cell`, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: MemLayout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: MemLayout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (all allocations go through us).
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: MemLayout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s size rules.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

#[test]
fn a_hundred_thousand_resident_channels_stay_compact() {
    const N: u32 = 100_000;
    // 25,000 pairs on each of 4 addresses: as many slots as channels.
    let layout = Layout::custom(1024, 1024 + 50_000 - 1, N, 4).expect("valid layout");
    assert_eq!(layout.slots(), N);
    let t0 = Instant::now();
    let start = held_bytes();
    let mut a = Allocator::new(Config::new(layout, 7), t0).expect("valid config");
    let empty = held_bytes() - start;
    // A typical SIP Call-ID (36 bytes) and tag (10 bytes).
    const ID_BYTES: isize = 36 + 10;
    for i in 0..N {
        let call_id = format!("{i:08x}-7c3e-4b1a-9f00-1d2e3f4a5b6c");
        let request = Request::new(call_id, format!("{:010x}", i), Kind::SystemDevice);
        a.allocate(request, t0).expect("allocation");
    }
    let full = held_bytes() - start;
    let per_channel = full / N as isize;
    eprintln!(
        "allocator for {N} channels: {} bytes empty, {} bytes full = {per_channel} bytes per \
         channel including {ID_BYTES} bytes of call id and leg tag (malloc overhead not counted)",
        empty, full
    );
    assert_eq!(a.status(t0).in_use, N);
    // 64 (channel) + 4 (free list) + 16 (quarantine) + 24 (deadline heap) + ≈ 10 (hash index at
    // its power-of-two size) + the strings.
    assert!(
        per_channel <= 120 + ID_BYTES,
        "{per_channel} bytes per channel"
    );
}
