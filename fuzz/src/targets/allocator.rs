//! The channel allocator (`relay_core::allocator`) under arbitrary operation sequences —
//! allocate (repeated call legs, any kind, internet or not, odd timeouts), release by slot or
//! leg, touch, set timeouts, clock steps (backwards too), expiry, restarts restoring every live
//! channel — checked against a small model of the live channels after every step:
//!
//! - the live set is exactly the model's: `get` and `find` agree with it, and a repeated
//!   request returns the leg's own slot;
//! - `in_use + quarantined + free == slots`, `in_use` is the model's count and at most the
//!   capacity, internet calls within their limit;
//! - no slot is held by two legs.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use relay_core::allocator::{Allocator, Codec, Config, Kind, Layout, Request, Slot};

use crate::{Input, Target};

pub const TARGET: Target = Target {
    name: "allocator",
    run,
    seeds,
};

fn layout(i: &mut Input) -> Layout {
    match i.below(4) {
        0 => Layout::X,
        _ => {
            let first = 20_000 + 2 * u16::from(i.u8());
            let pairs = 1 + u16::from(i.u8() % 6);
            let addresses = 1 + u16::from(i.u8() % 3);
            let cap = u32::from(i.u8() % 12);
            match Layout::custom(first, first + 2 * pairs - 1, cap, addresses) {
                Ok(l) => l,
                Err(_) => Layout::X,
            }
        }
    }
}

pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    let layout = layout(&mut i);
    let mut config = Config::new(layout, i.u64());
    config.upstream_kbps = i.bool().then(|| u32::from(i.u16() % 1000));
    config.codec = Codec::default();
    config.quarantine = Duration::from_millis(u64::from(i.u16()) * 100);
    config.media_timeout = Duration::from_millis(1 + u64::from(i.u16()) * 100);
    let t0 = Instant::now();
    let mut now = t0;
    let Ok(mut alloc) = Allocator::new(config.clone(), now) else {
        return;
    };
    // Model: live channels by slot, with their call leg.
    let mut live: BTreeMap<Slot, (String, String)> = BTreeMap::new();
    for _ in 0..128 {
        if i.is_empty() {
            break;
        }
        match i.below(9) {
            0..=2 => {
                let call = format!("c{}", i.below(6));
                let leg = format!("l{}", i.below(2));
                let kind = Kind::ALL[i.below(Kind::COUNT)];
                let mut req = Request::new(call.clone(), leg.clone(), kind).with_internet(i.bool());
                if i.bool() {
                    req = req.with_timeout(Duration::from_millis(u64::from(i.u32())));
                }
                let held = live
                    .iter()
                    .find(|(_, v)| **v == (call.clone(), leg.clone()));
                let held = held.map(|(s, _)| *s);
                if let Ok(a) = alloc.allocate(req, now) {
                    let slot = a.channel.slot;
                    if let Some(h) = held {
                        assert_eq!((slot, a.new), (h, false), "a repeated request moved");
                    } else {
                        assert!(a.new);
                        assert!(!live.contains_key(&slot), "slot {slot:?} handed out twice");
                        live.insert(slot, (call, leg));
                    }
                }
            }
            3 => {
                let slot = pick_slot(&mut i, &live);
                let ok = alloc.release(slot, now).is_ok();
                assert_eq!(ok, live.remove(&slot).is_some(), "release of {slot:?}");
            }
            4 => {
                let call = format!("c{}", i.below(6));
                let leg = format!("l{}", i.below(2));
                let r = alloc.release_leg(&call, &leg, now);
                let held = live
                    .iter()
                    .find(|(_, v)| **v == (call.clone(), leg.clone()));
                let held = held.map(|(s, _)| *s);
                assert_eq!(r.as_ref().ok().map(|r| r.channel.slot), held);
                if let Some(s) = held {
                    live.remove(&s);
                }
            }
            5 => {
                let slot = pick_slot(&mut i, &live);
                assert_eq!(alloc.touch(slot, now).is_ok(), live.contains_key(&slot));
            }
            6 => {
                let slot = pick_slot(&mut i, &live);
                let t = Duration::from_millis(u64::from(i.u32()));
                let _ = alloc.set_timeout(slot, t, now);
            }
            7 => {
                now = match i.below(4) {
                    0 => now
                        .checked_sub(Duration::from_millis(u64::from(i.u16())))
                        .unwrap_or(now),
                    _ => now + Duration::from_millis(u64::from(i.u32() % 100_000_000)),
                };
                for r in alloc.expire(now) {
                    assert!(
                        live.remove(&r.channel.slot).is_some(),
                        "expired a dead slot"
                    );
                }
            }
            _ => {
                // Restart: restore every live channel into a fresh allocator.
                let infos: Vec<_> = live.keys().map(|s| alloc.get(*s).unwrap()).collect();
                let next = alloc.next_id();
                let mut fresh = Allocator::new(config.clone(), now).unwrap();
                for info in infos {
                    fresh.restore(info, now).unwrap();
                }
                fresh.set_next_id(next);
                alloc = fresh;
            }
        }
        let status = alloc.status(now);
        assert_eq!(status.in_use as usize, live.len());
        assert!(status.in_use <= status.capacity);
        assert_eq!(
            status.in_use + status.quarantined + status.free,
            status.slots
        );
        if let Some(limit) = status.internet_call_limit {
            assert!(status.internet_calls <= limit, "{status:?}");
        }
        for (slot, (call, leg)) in &live {
            let info = alloc.get(*slot).expect("a live slot is known");
            assert_eq!((&info.call_id, &info.leg_tag), (call, leg));
            assert_eq!(alloc.find(call, leg), Some(*slot));
        }
    }
}

fn pick_slot(i: &mut Input, live: &BTreeMap<Slot, (String, String)>) -> Slot {
    if !live.is_empty() && i.bool() {
        *live.keys().nth(i.below(live.len())).unwrap()
    } else {
        Slot {
            addr_index: u16::from(i.u8() % 4),
            port: 20_000 + u16::from(i.u8()) * 2,
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        vec![
            1, 0, 0, 3, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 10, 0,
        ],
        [
            0u8, 0, 1, 0, 1, 0, 0, 0, 1, 0, 7, 0, 0, 0, 0, 0, 0, 0x10, 8, 0,
        ]
        .repeat(10),
        (0..=255).collect(),
    ]
}
