//! RTP statistics (`relay_common::quality`) on arbitrary sequence numbers, timestamps, arrival
//! times and clock rates. Properties after every packet:
//!
//! - `received` is the number of packets counted (`Counted::Yes`); a `Jump` changes nothing
//!   but the pending-jump marker;
//! - `reordered ≤ received`, the current run's count ≤ `received`;
//! - the extended highest sequence number never falls below the run's base (the run's range is
//!   never negative), and the run's loss never exceeds that range;
//! - jitter stays within its bound (16 × 2^27 scaled);
//! - merging two directions' states adds received, reordered and lost exactly.
//!
//! (Received ≤ the extended range does not hold for arbitrary input: duplicates, and late
//! packets from before the run's first one, count as received by design — RFC 3550 A.1 — which
//! is why loss is clamped at zero. What holds is checked.)
use relay_common::quality::{Counted, RtpHeader, RtpState};

use crate::{Input, Target};

pub const TARGET: Target = Target {
    name: "quality",
    run,
    seeds,
};

fn stream(i: &mut Input, s: &mut RtpState) {
    let rate = i.pick(&[0, 8000, 48000, 90000, 1 << 20, u32::MAX]);
    let (mut seq, mut ts, mut at) = (i.u16(), i.u32(), u64::from(i.u32()));
    let mut counted = s.received;
    for _ in 0..96 {
        if i.is_empty() {
            break;
        }
        seq = match i.below(6) {
            0 => i.u16(),
            1 => seq.wrapping_sub(u16::from(i.u8())),
            2 => seq.wrapping_add(i.u16() % 4000),
            _ => seq.wrapping_add(u16::from(i.u8() % 4)),
        };
        ts = match i.below(4) {
            0 => i.u32(),
            _ => ts.wrapping_add(u32::from(i.u16())),
        };
        at = match i.below(5) {
            0 => i.u64(),
            1 => at,
            _ => at.saturating_add(u64::from(i.u32())),
        };
        let before = *s;
        let r = s.update(RtpHeader { seq, timestamp: ts }, at, rate);
        match r {
            Counted::Yes => counted += 1,
            Counted::Jump => assert_eq!(
                RtpState {
                    bad_seq: s.bad_seq,
                    ..before
                },
                *s,
                "a jump changed more than bad_seq"
            ),
        }
        assert_eq!(s.received, counted);
        assert!(s.reordered <= s.received);
        assert!(u64::from(s.run_received) <= s.received);
        assert!(s.ext_max_seq >= s.base_seq, "{s:?}");
        assert!(s.run_lost() <= s.run_expected());
        assert!(s.jitter_q4 <= 1 << 31, "jitter out of bounds: {s:?}");
        assert_ne!(s.last_arrival_ns, 0);
    }
}

pub fn run(data: &[u8]) {
    let mut i = Input::new(data);
    let head: [u8; 8] = std::array::from_fn(|_| i.u8());
    let len = usize::from(i.u16());
    let parsed = RtpHeader::parse(&head, len);
    assert_eq!(parsed.is_some(), len >= 12 && head[0] >> 6 == 2);

    let mut a = RtpState::default();
    stream(&mut i, &mut a);
    let mut b = RtpState::default();
    stream(&mut i, &mut b);
    let mut m = a;
    m.merge(&b);
    assert_eq!(m.received, a.received + b.received);
    assert_eq!(m.reordered, a.reordered + b.reordered);
    assert_eq!(m.lost(), a.lost() + b.lost());
    // The merged state keeps counting.
    stream(&mut i, &mut m);
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        vec![0x80, 0, 0, 1, 0, 0, 0, 160, 172, 0],
        [3u8, 1, 0, 160, 0, 2, 0, 0, 0x40, 0x42, 0x0f, 0].repeat(30),
        (0..=255).rev().collect(),
    ]
}
