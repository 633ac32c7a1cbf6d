//! Unit tests of the allocator's rules, one per rule.

use std::collections::HashSet;

use super::*;

const SEED: u64 = 0x5eed;
const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn allocator(config: Config) -> (Allocator, Instant) {
    let t0 = Instant::now();
    (Allocator::new(config, t0).expect("valid config"), t0)
}

fn with_layout(layout: Layout) -> (Allocator, Instant) {
    allocator(Config::new(layout, SEED))
}

fn req(call: &str, leg: &str) -> Request {
    Request::new(call, leg, Kind::ItspCall)
}

fn alloc(a: &mut Allocator, call: &str, leg: &str, now: Instant) -> Allocation {
    a.allocate(req(call, leg), now).expect("allocation")
}

fn fill(a: &mut Allocator, n: u32, now: Instant) -> Vec<Slot> {
    (0..n)
        .map(|i| alloc(a, &format!("call-{i}"), "a", now).channel.slot)
        .collect()
}

#[test]
fn layout_x_gives_exactly_60_even_channels_in_its_range() {
    let (mut a, t0) = with_layout(Layout::X);
    let slots = fill(&mut a, 60, t0);
    assert_eq!(slots.iter().collect::<HashSet<_>>().len(), 60);
    for s in &slots {
        assert_eq!(s.addr_index, 0);
        assert_eq!(s.rtp_port() % 2, 0, "{s}");
        assert!((30274..=30528).contains(&s.rtp_port()), "{s}");
        assert!(s.rtcp_port() <= 30529, "{s}");
    }
    let err = a.allocate(req("one-more", "a"), t0).expect_err("full");
    assert_eq!(
        err.to_string(),
        "channel pool full: 60 of 60 channels in use"
    );
}

#[test]
fn layout_s_gives_exactly_180_even_channels_in_its_range() {
    let (mut a, t0) = with_layout(Layout::S);
    let slots = fill(&mut a, 180, t0);
    assert_eq!(slots.iter().collect::<HashSet<_>>().len(), 180);
    for s in &slots {
        assert_eq!(s.rtp_port() % 2, 0, "{s}");
        assert!((30528..=30886).contains(&s.rtp_port()), "{s}");
        assert!(s.rtcp_port() <= 30887, "{s}");
    }
    let err = a.allocate(req("one-more", "a"), t0).expect_err("full");
    assert_eq!(
        err,
        AllocError::PoolFull {
            in_use: 180,
            capacity: 180
        }
    );
    assert_eq!(
        err.to_string(),
        "channel pool full: 180 of 180 channels in use"
    );
}

#[test]
fn slots_are_drawn_at_random_and_reproducibly() {
    let order = |seed| {
        let (mut a, t0) = allocator(Config::new(Layout::S, seed));
        fill(&mut a, 20, t0)
    };
    assert_eq!(order(1), order(1));
    assert_ne!(order(1), order(2));
    let ports: Vec<u16> = order(1).iter().map(|s| s.port).collect();
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    assert_ne!(ports, sorted, "slots handed out in port order");
}

#[test]
fn a_repeated_request_returns_the_same_channel_as_not_new() {
    let (mut a, t0) = with_layout(Layout::S);
    let first = alloc(&mut a, "c1", "tag", t0);
    assert!(first.new);
    assert!(first.event().is_some());
    let again = alloc(&mut a, "c1", "tag", t0 + SEC);
    assert!(!again.new);
    assert_eq!(again.event(), None);
    assert_eq!(again.channel, first.channel);
    assert_eq!(a.status(t0).in_use, 1);
    // Another leg of the same call, or the same tag on another call, is another channel.
    let other_leg = alloc(&mut a, "c1", "tag2", t0);
    let other_call = alloc(&mut a, "c2", "tag", t0);
    assert!(other_leg.new && other_call.new);
    assert_eq!(a.status(t0).in_use, 3);
    // The key is the pair, not the concatenation.
    assert!(alloc(&mut a, "c1t", "ag", t0).new);
}

#[test]
fn a_repeat_succeeds_even_when_the_pool_is_full() {
    let layout = Layout::custom(20000, 20003, 2, 1).expect("valid");
    let (mut a, t0) = with_layout(layout);
    let first = alloc(&mut a, "c1", "a", t0);
    alloc(&mut a, "c2", "a", t0);
    let again = alloc(&mut a, "c1", "a", t0);
    assert_eq!((again.new, again.channel.slot), (false, first.channel.slot));
}

#[test]
fn a_request_differing_in_kind_or_internet_flag_conflicts() {
    let (mut a, t0) = with_layout(Layout::S);
    alloc(&mut a, "c1", "a", t0);
    let err = a
        .allocate(Request::new("c1", "a", Kind::SipDevice), t0)
        .expect_err("conflict");
    assert_eq!(
        err.to_string(),
        "call id \"c1\" leg tag \"a\" already holds a channel of kind itsp_call (internet: true); \
         a repeated request must match it"
    );
    assert!(matches!(
        a.allocate(req("c1", "a").with_internet(false), t0),
        Err(AllocError::Conflict { .. })
    ));
    assert_eq!(a.status(t0).in_use, 1);
}

#[test]
fn bad_requests_are_refused() {
    let (mut a, t0) = with_layout(Layout::S);
    assert_eq!(
        a.allocate(req("", "a"), t0).map_err(|e| e.to_string()),
        Err("call id is empty".to_owned())
    );
    let long = "x".repeat(MAX_ID_LEN + 1);
    assert_eq!(
        a.allocate(req(&long, "a"), t0).map_err(|e| e.to_string()),
        Err("call id is 257 bytes long, more than 256".to_owned())
    );
    assert_eq!(
        a.allocate(req("c", &long), t0).map_err(|e| e.to_string()),
        Err("leg tag is 257 bytes long, more than 256".to_owned())
    );
    assert_eq!(
        a.allocate(req("c", "a").with_timeout(Duration::ZERO), t0)
            .map_err(|e| e.to_string()),
        Err("media timeout 0ns is outside 1ms..=86400s".to_owned())
    );
    // Empty leg tags and ids at the limit are fine.
    let ok = "y".repeat(MAX_ID_LEN);
    let got = alloc(&mut a, &ok, "", t0);
    assert_eq!(
        (got.channel.call_id.len(), got.channel.leg_tag.as_str()),
        (256, "")
    );
    assert_eq!(a.status(t0).in_use, 1);
}

#[test]
fn the_internet_call_limit_follows_the_upstream_and_codec() {
    let mut config = Config::new(Layout::S, SEED);
    config.upstream_kbps = Some(1000);
    assert_eq!(config.internet_call_limit(), Some(12));
    config.codec = Codec::G729;
    assert_eq!(config.internet_call_limit(), Some(41));
    config.upstream_kbps = None;
    assert_eq!(config.internet_call_limit(), None);
}

#[test]
fn internet_calls_beyond_the_upstream_are_refused_with_the_arithmetic() {
    let mut config = Config::new(Layout::S, SEED);
    config.upstream_kbps = Some(1000);
    let (mut a, t0) = allocator(config);
    fill(&mut a, 12, t0);
    let err = a.allocate(req("13th", "a"), t0).expect_err("limit");
    assert_eq!(
        err.to_string(),
        "internet call limit reached: 12 calls at 80 kbit/s fit the 1000 kbit/s upstream"
    );
    // Legs that stay off the upstream still get channels.
    let local = a
        .allocate(req("local", "a").with_internet(false), t0)
        .expect("not an internet call");
    let status = a.status(t0);
    assert_eq!((status.internet_calls, status.in_use), (12, 13));
    assert_eq!(status.internet_call_limit, Some(12));
    // Releasing an internet call makes room for one; releasing a local one does not.
    a.release(local.channel.slot, t0).expect("release");
    assert!(a.allocate(req("13th", "a"), t0).is_err());
    a.release_leg("call-0", "a", t0).expect("release");
    assert!(a.allocate(req("13th", "a"), t0).expect("room").new);
}

#[test]
fn a_full_pool_is_reported_before_the_internet_limit() {
    let layout = Layout::custom(20000, 20003, 2, 1).expect("valid");
    let mut config = Config::new(layout, SEED);
    config.upstream_kbps = Some(160);
    let (mut a, t0) = allocator(config);
    fill(&mut a, 2, t0);
    assert!(matches!(
        a.allocate(req("x", "a"), t0),
        Err(AllocError::PoolFull { .. })
    ));
}

#[test]
fn release_returns_what_was_released() {
    let (mut a, t0) = with_layout(Layout::S);
    let got = a
        .allocate(
            Request::new("c1", "leg", Kind::MobileClient).with_internet(false),
            t0,
        )
        .expect("allocation");
    a.touch(got.channel.slot, t0 + 3 * SEC).expect("touch");
    let released = a.release(got.channel.slot, t0 + 5 * SEC).expect("release");
    assert_eq!(released.reason, ReleaseReason::Requested);
    assert_eq!(released.released_at, t0 + 5 * SEC);
    let c = &released.channel;
    assert_eq!((c.call_id.as_str(), c.leg_tag.as_str()), ("c1", "leg"));
    assert_eq!(
        (c.kind, c.internet, c.slot),
        (Kind::MobileClient, false, got.channel.slot)
    );
    assert_eq!((c.allocated_at, c.last_activity), (t0, t0 + 3 * SEC));
    assert_eq!(c.id, got.channel.id);
    assert!(matches!(Event::from(released), Event::Released(_)));
    assert_eq!(a.status(t0).in_use, 0);
    assert_eq!(a.get(got.channel.slot), None);
    assert_eq!(a.find("c1", "leg"), None);
}

#[test]
fn releasing_the_unknown_is_not_found() {
    let (mut a, t0) = with_layout(Layout::S);
    let got = alloc(&mut a, "c1", "a", t0);
    let free_slot = Slot {
        addr_index: 0,
        port: if got.channel.slot.port == 30528 {
            30530
        } else {
            30528
        },
    };
    let foreign = [
        free_slot,
        Slot {
            addr_index: 0,
            port: 30529,
        },
        Slot {
            addr_index: 1,
            port: 30528,
        },
        Slot {
            addr_index: 0,
            port: 1024,
        },
    ];
    for slot in foreign {
        assert_eq!(a.release(slot, t0), Err(AllocError::UnknownSlot(slot)));
        assert_eq!(a.touch(slot, t0), Err(AllocError::UnknownSlot(slot)));
        assert_eq!(
            a.set_timeout(slot, SEC, t0),
            Err(AllocError::UnknownSlot(slot))
        );
    }
    assert_eq!(
        a.release(
            Slot {
                addr_index: 1,
                port: 30528
            },
            t0
        )
        .map_err(|e| e.to_string()),
        Err("no channel in use on port 30528 on relay address #1".to_owned())
    );
    assert_eq!(
        a.release_leg("c1", "b", t0).map_err(|e| e.to_string()),
        Err("no channel for call id \"c1\" leg tag \"b\"".to_owned())
    );
    a.release(got.channel.slot, t0).expect("release");
    assert_eq!(
        a.release(got.channel.slot, t0),
        Err(AllocError::UnknownSlot(got.channel.slot))
    );
    assert!(a.release_leg("c1", "a", t0).is_err());
    assert_eq!(a.status(t0).in_use, 0);
}

#[test]
fn a_released_slot_is_quarantined_while_others_are_free() {
    // Two slots, one channel: the released slot must not come back within the quarantine.
    let layout = Layout::custom(20000, 20003, 1, 1).expect("valid");
    let (mut a, t0) = with_layout(layout);
    for round in 0..10u32 {
        let now = t0 + round * 11 * SEC; // each round starts with the quarantine over
        assert_eq!(a.status(now).free, 2);
        let first = alloc(&mut a, &format!("c{round}"), "a", now).channel.slot;
        a.release(first, now).expect("release");
        let second = alloc(&mut a, &format!("d{round}"), "a", now).channel.slot;
        assert_ne!(first, second, "round {round}");
        a.release(second, now).expect("release");
        let status = a.status(now);
        assert_eq!((status.quarantined, status.free), (2, 0));
        // Both quarantined: the one released first is reused early, and it is counted.
        let third = alloc(&mut a, &format!("e{round}"), "a", now).channel.slot;
        assert_eq!(third, first);
        assert_eq!(a.status(now).early_reuses, u64::from(round) + 1);
        a.release(third, now).expect("release");
    }
}

#[test]
fn quarantine_ends_after_the_configured_time() {
    let layout = Layout::custom(20000, 20007, 4, 1).expect("valid");
    let mut config = Config::new(layout, SEED);
    config.quarantine = 5 * SEC;
    let (mut a, t0) = allocator(config);
    let slots = fill(&mut a, 4, t0);
    for s in &slots {
        a.release(*s, t0 + SEC).expect("release");
    }
    let status = a.status(t0 + 6 * SEC - Duration::from_nanos(1));
    assert_eq!((status.quarantined, status.free), (4, 0));
    let status = a.status(t0 + 6 * SEC);
    assert_eq!((status.quarantined, status.free), (0, 4));
    // After the quarantine a fresh allocation is no early reuse.
    alloc(&mut a, "after", "a", t0 + 6 * SEC);
    assert_eq!(a.status(t0 + 6 * SEC).early_reuses, 0);
}

#[test]
fn the_timeout_fires_exactly_at_the_deadline_not_before() {
    let (mut a, t0) = with_layout(Layout::S);
    let slot = alloc(&mut a, "c1", "a", t0).channel.slot;
    let deadline = t0 + Config::DEFAULT_MEDIA_TIMEOUT;
    assert_eq!(a.next_deadline(), Some(deadline));
    assert!(a.expire(deadline - Duration::from_nanos(1)).is_empty());
    assert_eq!(a.get(slot).map(|c| c.slot), Some(slot));
    let expired = a.expire(deadline);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].reason, ReleaseReason::IdleTimeout);
    assert_eq!(expired[0].channel.slot, slot);
    assert_eq!(expired[0].released_at, deadline);
    assert_eq!(a.status(deadline).in_use, 0);
    assert_eq!(a.next_deadline(), None);
    assert!(a.expire(deadline + 100 * SEC).is_empty());
}

#[test]
fn touch_restarts_the_timeout() {
    let (mut a, t0) = with_layout(Layout::S);
    let slot = alloc(&mut a, "c1", "a", t0).channel.slot;
    a.touch(slot, t0 + 50 * SEC).expect("touch");
    // The heap entry is still the old one: next_deadline may be early, never late.
    assert!(a.next_deadline() <= Some(t0 + 110 * SEC));
    assert!(a.expire(t0 + 60 * SEC).is_empty());
    assert_eq!(a.next_deadline(), Some(t0 + 110 * SEC));
    assert!(a.expire(t0 + 110 * SEC - MS).is_empty());
    assert_eq!(a.expire(t0 + 110 * SEC).len(), 1);
}

#[test]
fn the_timeout_can_be_overridden_at_allocation() {
    let (mut a, t0) = with_layout(Layout::S);
    let short = a
        .allocate(req("short", "a").with_timeout(5 * SEC), t0)
        .expect("allocation");
    assert_eq!(short.channel.timeout, 5 * SEC);
    let default = alloc(&mut a, "default", "a", t0);
    assert_eq!(default.channel.timeout, 60 * SEC);
    assert_eq!(a.next_deadline(), Some(t0 + 5 * SEC));
    let expired = a.expire(t0 + 5 * SEC);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].channel.call_id, "short");
    assert_eq!(a.next_deadline(), Some(t0 + 60 * SEC));
}

#[test]
fn the_timeout_can_be_changed_later() {
    let (mut a, t0) = with_layout(Layout::S);
    let one = alloc(&mut a, "one", "a", t0).channel.slot;
    let two = alloc(&mut a, "two", "a", t0).channel.slot;
    // Shorter: due earlier, counted from the last activity.
    a.touch(one, t0 + 2 * SEC).expect("touch");
    a.set_timeout(one, 3 * SEC, t0 + 3 * SEC).expect("set");
    assert_eq!(a.next_deadline(), Some(t0 + 5 * SEC));
    assert!(a.expire(t0 + 5 * SEC - MS).is_empty());
    let expired = a.expire(t0 + 5 * SEC);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].channel.slot, one);
    // Longer: not due at the old deadline.
    a.set_timeout(two, 100 * SEC, t0 + 6 * SEC).expect("set");
    assert!(a.expire(t0 + 60 * SEC).is_empty());
    assert_eq!(a.get(two).map(|c| c.timeout), Some(100 * SEC));
    assert_eq!(a.expire(t0 + 100 * SEC).len(), 1);
    assert_eq!(
        a.set_timeout(two, Duration::ZERO, t0),
        Err(AllocError::Timeout {
            value: Duration::ZERO,
            min: MIN_MEDIA_TIMEOUT,
            max: MAX_MEDIA_TIMEOUT
        })
    );
}

#[test]
fn expiry_comes_in_deadline_order_and_releases_into_quarantine() {
    let (mut a, t0) = with_layout(Layout::S);
    for (i, secs) in [30u64, 10, 20].into_iter().enumerate() {
        a.allocate(
            req(&format!("c{i}"), "a").with_timeout(Duration::from_secs(secs)),
            t0,
        )
        .expect("allocation");
    }
    let expired = a.expire(t0 + 100 * SEC);
    let order: Vec<&str> = expired.iter().map(|r| r.channel.call_id.as_str()).collect();
    assert_eq!(order, ["c1", "c2", "c0"]);
    let status = a.status(t0 + 100 * SEC);
    assert_eq!(
        (status.in_use, status.quarantined, status.free),
        (0, 3, 177)
    );
}

#[test]
fn status_counts_by_kind() {
    let (mut a, t0) = with_layout(Layout::X);
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        for j in 0..=i {
            a.allocate(Request::new(format!("{kind}-{j}"), "a", kind), t0)
                .expect("allocation");
        }
    }
    let status = a.status(t0);
    assert_eq!(status.capacity, 60);
    assert_eq!(status.slots, 128);
    assert_eq!(status.in_use, 15);
    assert_eq!(status.in_use_by_kind.total(), 15);
    for (i, (kind, n)) in status.in_use_by_kind.iter().enumerate() {
        assert_eq!(n, i as u32 + 1, "{kind}");
        assert_eq!(status.in_use_by_kind.get(kind), n);
    }
    assert_eq!(status.free, 128 - 15);
    assert_eq!(status.internet_calls, 15);
    assert_eq!(status.internet_call_limit, None);
}

#[test]
fn kind_names_are_stable() {
    let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(
        names,
        [
            "itsp_call",
            "circuit_call",
            "system_device",
            "sip_device",
            "mobile_client"
        ]
    );
    for (i, k) in Kind::ALL.into_iter().enumerate() {
        assert_eq!(k as usize, i);
    }
    assert_eq!(ReleaseReason::IdleTimeout.name(), "idle_timeout");
}

#[test]
fn time_never_runs_backwards() {
    let (mut a, t0) = with_layout(Layout::S);
    let slot = alloc(&mut a, "c1", "a", t0 + 10 * SEC).channel.slot;
    // An older `now` counts as the newest seen: the channel was not active before it existed.
    a.touch(slot, t0).expect("touch");
    assert_eq!(a.get(slot).map(|c| c.last_activity), Some(t0 + 10 * SEC));
    assert!(a.expire(t0).is_empty());
    assert_eq!(a.expire(t0 + 70 * SEC).len(), 1);
    // Instants before the epoch do not panic either.
    let before = t0.checked_sub(SEC).unwrap_or(t0);
    assert!(a.expire(before).is_empty());
}

#[test]
fn configurations_are_validated() {
    let t0 = Instant::now();
    let mut config = Config::new(Layout::S, SEED);
    config.upstream_kbps = Some(0);
    assert_eq!(
        Allocator::new(config.clone(), t0).map(|_| ()),
        Err(ConfigError::ZeroUpstream)
    );
    config.upstream_kbps = None;
    config.media_timeout = Duration::ZERO;
    assert_eq!(
        config.validate().map_err(|e| e.to_string()),
        Err("media timeout 0ns is outside 1ms..=86400s".to_owned())
    );
    config.media_timeout = SEC;
    config.quarantine = MAX_QUARANTINE + MS;
    assert!(matches!(
        config.validate(),
        Err(ConfigError::DurationOutOfRange {
            what: "quarantine",
            ..
        })
    ));
    config.quarantine = Duration::ZERO;
    assert_eq!(config.validate(), Ok(()));
}

#[test]
fn without_quarantine_a_released_slot_is_free_at_once() {
    let layout = Layout::custom(20000, 20001, 1, 1).expect("valid");
    let mut config = Config::new(layout, SEED);
    config.quarantine = Duration::ZERO;
    let (mut a, t0) = allocator(config);
    let slot = alloc(&mut a, "c1", "a", t0).channel.slot;
    a.release(slot, t0).expect("release");
    assert_eq!(a.status(t0).free, 1);
    alloc(&mut a, "c2", "a", t0);
    assert_eq!(a.status(t0).early_reuses, 0);
}

#[test]
fn stale_heap_entries_do_not_pile_up() {
    let layout = Layout::custom(20000, 20001, 1, 1).expect("valid");
    let (mut a, t0) = with_layout(layout);
    for i in 0..1000u32 {
        let slot = alloc(&mut a, &format!("c{i}"), "a", t0).channel.slot;
        a.set_timeout(slot, SEC, t0).expect("set");
        a.release(slot, t0).expect("release");
    }
    assert!(a.deadlines.len() <= 2 * a.in_use as usize + 64);
    assert_eq!(a.next_deadline(), None);
}

#[test]
fn a_channel_is_at_most_64_bytes() {
    // Also asserted at compile time; this documents the figure.
    assert!(size_of::<Option<Channel>>() <= 64);
    assert_eq!(size_of::<Quarantined>(), 16);
    assert_eq!(size_of::<Reverse<Deadline>>(), 24);
}

#[test]
fn restored_channels_keep_their_slot_and_id_and_new_ids_stay_above() {
    let (mut a, t0) = with_layout(Layout::X);
    let kept = alloc(&mut a, "call-1", "a", t0).channel;
    a.set_timeout(kept.slot, 5 * SEC, t0).expect("timeout");
    let kept = a.get(kept.slot).expect("live");
    let restart = t0 + SEC;

    // Same epoch: the stored instants are kept as they are (earlier ones count as the epoch).
    let mut b = Allocator::new(Config::new(Layout::X, SEED + 1), t0).expect("valid config");
    b.restore(kept.clone(), restart).expect("restore");
    b.set_next_id(ChannelId(10));
    assert_eq!(b.get(kept.slot), Some(kept.clone()));
    assert_eq!(b.find("call-1", "a"), Some(kept.slot));
    let s = b.status(restart);
    assert_eq!((s.in_use, s.free, s.quarantined), (1, 127, 0));

    // Every other slot is handed out before the pool is full; never the restored one.
    let fresh: Vec<Allocation> = (0..59)
        .map(|i| alloc(&mut b, &format!("new-{i}"), "a", restart))
        .collect();
    assert!(fresh.iter().all(|f| f.channel.slot != kept.slot));
    assert!(fresh.iter().all(|f| f.channel.id.0 >= 10));
    assert!(b.allocate(req("full", "a"), restart).is_err());

    // The restored channel times out on its own schedule (5 s after its last activity).
    let expired = b.expire(t0 + 5 * SEC);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].channel.id, kept.id);
}

#[test]
fn restore_refuses_what_allocate_would_and_taken_or_foreign_slots() {
    let (mut a, t0) = with_layout(Layout::S);
    let info = alloc(&mut a, "call-1", "a", t0).channel;
    let (mut b, _) = with_layout(Layout::S);
    b.restore(info.clone(), t0).expect("restore");
    assert_eq!(
        b.restore(info.clone(), t0),
        Err(AllocError::SlotTaken(info.slot))
    );
    let mut moved = info.clone();
    moved.slot.port = if info.slot.port == 30528 {
        30530
    } else {
        30528
    };
    assert!(matches!(
        b.restore(moved.clone(), t0),
        Err(AllocError::LegTaken { slot, .. }) if slot == info.slot
    ));
    moved.call_id = "call-2".into();
    moved.slot.port = 30529;
    assert_eq!(
        b.restore(moved.clone(), t0),
        Err(AllocError::OutsideLayout(moved.slot))
    );
    moved.call_id.clear();
    assert_eq!(b.restore(moved, t0), Err(AllocError::EmptyCallId));
    // A restored id moves the counter past it.
    let mut high = info;
    high.id = ChannelId(1000);
    high.slot.port = 30600;
    high.call_id = "call-3".into();
    b.restore(high, t0).expect("restore");
    assert_eq!(b.next_id(), ChannelId(1001));
    b.set_next_id(ChannelId(5));
    assert_eq!(b.next_id(), ChannelId(1001), "never lowered");
    let s = b.status(t0);
    assert_eq!((s.in_use, s.free), (2, 178));
}
