//! RTP reception quality of one direction of a channel: the one implementation both data paths
//! run (the XDP program on the packets it forwards, the user-space worker on the rest).
//!
//! Sequence accounting follows RFC 3550 A.1 (`update_seq`): an extended highest sequence
//! number (16-bit cycles count above the 16-bit sequence number), `expected = extended max −
//! base + 1`, `lost = expected − received` clamped at 0 (duplicates count as received, so the
//! raw difference can go negative). Differences from A.1, deliberately: no probation
//! (`MIN_SEQUENTIAL = 0`) — the source is already vetted by latching, and a call's first packets
//! count; a restart after a very large jump (two consecutive packets, A.1's `bad_seq`) keeps the
//! loss of the previous run in [`RtpState::lost_prior`] instead of forgetting it. A packet
//! *older* than the highest sequence number seen (within `MAX_MISORDER`) counts as reordered;
//! an old duplicate is indistinguishable from a late packet and counts as reordered too.
//!
//! Interarrival jitter follows RFC 3550 6.4.1 / A.8 in its integer form (`jitter` scaled by
//! 16): `D = (Rj − Ri) − (Sj − Si)` in RTP timestamp units, `J += (|D| − J)/16`. The arrival
//! difference `Rj − Ri` is taken in nanoseconds and converted with the channel's clock rate, so
//! no absolute arrival time is ever multiplied (no overflow for any uptime); a gap longer than
//! [`MAX_GAP_NS`] is clamped (a silence of a minute says nothing about jitter anyway).
//!
//! Invariant: everything here is plain integer arithmetic on a `#[repr(C)]` value with no
//! allocation, no floating point and no loops, so the verifier accepts it inside the XDP
//! program unchanged. The state is updated read-modify-write; see `relay-ebpf` for what a race
//! between CPUs can cost.

/// The clock rate assumed when a channel sets none: 8000 Hz, G.711 (RFC 3551 §4.5.14).
pub const DEFAULT_CLOCK_RATE: u32 = 8000;
/// The highest clock rate used for jitter; higher configured rates are clamped (keeps the
/// arrival-gap conversion within 64 bits: `MAX_GAP_NS × MAX_CLOCK_RATE < 2^64`).
pub const MAX_CLOCK_RATE: u32 = 1 << 20;
/// Longest arrival gap the jitter calculation uses (2^36 ns ≈ 68.7 s).
pub const MAX_GAP_NS: u64 = 1 << 36;
/// Length of the fixed RTP header (RFC 3550 §5.1); shorter payloads are not RTP.
pub const RTP_HEADER_LEN: usize = 12;
/// A.1: a forward jump below this many sequence numbers is in order (packets lost on the way).
const MAX_DROPOUT: u16 = 3000;
/// A.1: a packet at most this many sequence numbers behind the highest is late (reordered).
const MAX_MISORDER: u16 = 100;
/// Largest |D| fed into the jitter estimator, so `16 × |D|` fits the 32-bit state.
const MAX_JITTER_STEP: u64 = 1 << 27;
/// [`RtpState::bad_seq`] when no large jump is pending (not a 16-bit sequence number).
const NO_BAD_SEQ: u32 = 1 << 16 | 1;

/// The fields of an RTP header the quality statistics need.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RtpHeader {
    pub seq: u16,
    pub timestamp: u32,
}

impl RtpHeader {
    /// The header of a UDP payload of `payload_len` bytes starting with `head`, if it is RTP:
    /// at least a fixed header long and version 2 (RFC 3550 §5.1). RTCP never reaches this (it
    /// goes to the odd port), so the version check is the whole test.
    #[inline(always)]
    pub fn parse(head: &[u8; 8], payload_len: usize) -> Option<Self> {
        if payload_len < RTP_HEADER_LEN || head[0] >> 6 != 2 {
            return None;
        }
        Some(Self {
            seq: u16::from_be_bytes([head[2], head[3]]),
            timestamp: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        })
    }
}

/// What [`RtpState::update`] did with a packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Counted {
    /// Counted as received (in order, late or duplicate).
    Yes,
    /// Not counted: the first packet after a very large sequence jump (A.1 `bad_seq`); a
    /// second packet that continues it restarts the sequence state.
    Jump,
}

/// RFC 3550 A.1/A.8 state of one direction (part of a `DirectionStats`). All zero = no RTP seen.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct RtpState {
    /// `CLOCK_MONOTONIC` ns of the last counted RTP packet (fine clock); 0 = none yet.
    pub last_arrival_ns: u64,
    /// RTP packets counted as received (duplicates included), over every sequence run.
    pub received: u64,
    /// Packets older than the highest sequence number seen.
    pub reordered: u64,
    /// Packets lost in earlier sequence runs (before a restart), or merged in from the other
    /// data path ([`RtpState::merge`]).
    pub lost_prior: u64,
    /// Extended highest sequence number: cycles (high 16 bits) and sequence number.
    pub ext_max_seq: u32,
    /// First sequence number of the current run.
    pub base_seq: u32,
    /// A.1 `bad_seq`: the sequence number that would confirm a large jump.
    pub bad_seq: u32,
    /// RTP timestamp of the last counted packet.
    pub last_timestamp: u32,
    /// Interarrival jitter × 16, in RTP timestamp units (A.8).
    pub jitter_q4: u32,
    /// Packets received in the current run (A.1 `received`).
    pub run_received: u32,
}

impl RtpState {
    /// Accounts one RTP packet that arrived at `arrival_ns` (`CLOCK_MONOTONIC`), with the
    /// channel's clock rate (0 = [`DEFAULT_CLOCK_RATE`]).
    #[inline(always)]
    pub fn update(&mut self, hdr: RtpHeader, arrival_ns: u64, clock_rate: u32) -> Counted {
        let arrival_ns = if arrival_ns == 0 { 1 } else { arrival_ns };
        let seq = hdr.seq;
        if self.last_arrival_ns == 0 {
            self.start_run(seq);
            self.received += 1;
            self.last_arrival_ns = arrival_ns;
            self.last_timestamp = hdr.timestamp;
            return Counted::Yes;
        }
        let max = self.ext_max_seq as u16;
        let udelta = seq.wrapping_sub(max);
        let mut restarted = false;
        if udelta < MAX_DROPOUT {
            // In order, possibly with a gap; a smaller number means the 16 bits wrapped.
            let cycles = (self.ext_max_seq & 0xffff_0000) + if seq < max { 1 << 16 } else { 0 };
            self.ext_max_seq = cycles | u32::from(seq);
            self.run_received = self.run_received.wrapping_add(1);
        } else if udelta <= (1u32 << 16).wrapping_sub(u32::from(MAX_MISORDER)) as u16 {
            // A very large jump: believe it only when the next packet follows it.
            if u32::from(seq) != self.bad_seq {
                self.bad_seq = u32::from(seq.wrapping_add(1));
                return Counted::Jump;
            }
            self.lost_prior += self.run_lost();
            self.start_run(seq);
            restarted = true;
        } else {
            // Behind the highest sequence number: late (or an old duplicate).
            self.reordered += 1;
            self.run_received = self.run_received.wrapping_add(1);
        }
        self.received += 1;
        if !restarted {
            self.jitter_step(hdr.timestamp, arrival_ns, clock_rate);
        }
        self.last_arrival_ns = arrival_ns;
        self.last_timestamp = hdr.timestamp;
        Counted::Yes
    }

    /// A.1 `init_seq` (the packet itself counts as the run's first).
    #[inline(always)]
    fn start_run(&mut self, seq: u16) {
        self.base_seq = u32::from(seq);
        self.ext_max_seq = u32::from(seq);
        self.bad_seq = NO_BAD_SEQ;
        self.run_received = 1;
    }

    /// A.8: `D = (Rj − Ri) − (Sj − Si)`, `J += (|D| − J)/16`, in integers scaled by 16.
    #[inline(always)]
    fn jitter_step(&mut self, timestamp: u32, arrival_ns: u64, clock_rate: u32) {
        let rate = match clock_rate {
            0 => DEFAULT_CLOCK_RATE,
            r if r > MAX_CLOCK_RATE => MAX_CLOCK_RATE,
            r => r,
        };
        let gap = arrival_ns.saturating_sub(self.last_arrival_ns);
        let gap = if gap > MAX_GAP_NS { MAX_GAP_NS } else { gap };
        let arrival_units = (gap * u64::from(rate) / 1_000_000_000) as i64;
        let sent_units = i64::from(timestamp.wrapping_sub(self.last_timestamp) as i32);
        let d = (arrival_units - sent_units).unsigned_abs();
        let d = if d > MAX_JITTER_STEP {
            MAX_JITTER_STEP
        } else {
            d
        } as u32;
        self.jitter_q4 = self.jitter_q4 - ((self.jitter_q4 + 8) >> 4) + d;
    }

    /// Packets expected in the current run (A.1 `extended_max − base_seq + 1`).
    pub fn run_expected(&self) -> u64 {
        if self.last_arrival_ns == 0 {
            return 0;
        }
        u64::from(self.ext_max_seq.wrapping_sub(self.base_seq)) + 1
    }

    /// Packets lost in the current run, never negative.
    pub fn run_lost(&self) -> u64 {
        self.run_expected()
            .saturating_sub(u64::from(self.run_received))
    }

    /// Packets lost, never negative: earlier runs and the current one.
    pub fn lost(&self) -> u64 {
        self.lost_prior + self.run_lost()
    }

    /// Interarrival jitter in RTP timestamp units.
    pub fn jitter(&self) -> u32 {
        self.jitter_q4 >> 4
    }

    /// Combines the state another data path kept for the same direction: received, reordered
    /// and lost add up; the sequence and jitter state are those of the path that saw the
    /// latest packet. (Each path counts gaps only within what it saw itself: when the fast
    /// path takes over a flow from user space, the two runs follow each other and the sum is
    /// right; a path that sees a few packets in the middle of the other's run counts the other's
    /// packets in between as its own loss.)
    pub fn merge(&mut self, other: &RtpState) {
        let lost = self.lost() + other.lost();
        let received = self.received + other.received;
        let reordered = self.reordered + other.reordered;
        if other.last_arrival_ns > self.last_arrival_ns {
            *self = *other;
        }
        self.received = received;
        self.reordered = reordered;
        self.lost_prior = lost - self.run_lost();
    }
}

const _: () = assert!(core::mem::size_of::<RtpState>() == 56);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    const MS: u64 = 1_000_000;

    fn h(seq: u16, timestamp: u32) -> RtpHeader {
        RtpHeader { seq, timestamp }
    }

    /// Feeds (seq, timestamp, arrival ms) at 8 kHz.
    fn run(packets: &[(u16, u32, u64)]) -> RtpState {
        let mut s = RtpState::default();
        for &(seq, ts, ms) in packets {
            s.update(h(seq, ts), 1_000 * MS + ms * MS, 8000);
        }
        s
    }

    #[test]
    fn parse_needs_version_2_and_a_whole_header() {
        let head = [0x80, 0, 0x12, 0x34, 0, 0, 1, 0x40];
        assert_eq!(RtpHeader::parse(&head, 12), Some(h(0x1234, 320)));
        assert_eq!(RtpHeader::parse(&head, 11), None);
        assert_eq!(RtpHeader::parse(&[0x40, 0, 0, 0, 0, 0, 0, 0], 172), None);
        assert_eq!(RtpHeader::parse(&[0, 0, 0, 0, 0, 0, 0, 0], 172), None);
    }

    #[test]
    fn in_order_stream_has_no_loss_and_no_jitter() {
        let p: Vec<_> = (0..50u16)
            .map(|i| (i, u32::from(i) * 160, u64::from(i) * 20))
            .collect();
        let s = run(&p);
        assert_eq!(
            (s.received, s.lost(), s.reordered, s.jitter()),
            (50, 0, 0, 0)
        );
        assert_eq!(s.run_expected(), 50);
    }

    #[test]
    fn gap_counts_as_loss() {
        // 0 1 2 _ _ 5 6: expected 7, received 5.
        let s = run(&[
            (0, 0, 0),
            (1, 160, 20),
            (2, 320, 40),
            (5, 800, 100),
            (6, 960, 120),
        ]);
        assert_eq!((s.run_expected(), s.received, s.lost()), (7, 5, 2));
        assert_eq!(s.reordered, 0);
    }

    #[test]
    fn late_packet_is_reordered_and_fills_the_gap() {
        // 0 1 3 2 4: nothing lost in the end, one reordered.
        let s = run(&[
            (0, 0, 0),
            (1, 160, 20),
            (3, 480, 60),
            (2, 320, 61),
            (4, 640, 80),
        ]);
        assert_eq!((s.lost(), s.reordered, s.received), (0, 1, 5));
        assert_eq!(s.ext_max_seq, 4);
    }

    #[test]
    fn duplicates_never_make_loss_negative() {
        let s = run(&[(7, 0, 0), (7, 0, 0), (8, 160, 20), (8, 160, 20)]);
        assert_eq!((s.run_expected(), s.received, s.lost()), (2, 4, 0));
        assert_eq!(
            s.reordered, 0,
            "a repeat of the highest is not older than it"
        );
    }

    #[test]
    fn sequence_wrap_extends_the_cycles() {
        // 65534 65535 _ 1: one lost across the wrap.
        let s = run(&[(65534, 0, 0), (65535, 160, 20), (1, 480, 60)]);
        assert_eq!(s.ext_max_seq, (1 << 16) | 1);
        assert_eq!((s.run_expected(), s.lost()), (4, 1));
        // A late packet from before the wrap does not wrap again.
        let mut s2 = s;
        s2.update(h(0, 320), 2_000 * MS, 8000);
        assert_eq!(
            (s2.ext_max_seq, s2.lost(), s2.reordered),
            ((1 << 16) | 1, 0, 1)
        );
    }

    #[test]
    fn large_jump_restarts_after_two_packets_and_keeps_earlier_loss() {
        // 10 _ 12, then a new stream at 40000.
        let mut s = run(&[(10, 0, 0), (12, 320, 40)]);
        assert_eq!(s.lost(), 1);
        let t = 2_000 * MS;
        assert_eq!(s.update(h(40000, 9), t, 8000), Counted::Jump);
        assert_eq!(s.received, 2, "the first packet of a jump is not counted");
        assert_eq!(s.update(h(40001, 169), t + 20 * MS, 8000), Counted::Yes);
        assert_eq!((s.base_seq, s.ext_max_seq), (40001, 40001));
        assert_eq!((s.lost(), s.received), (1, 3));
        // A single stray packet does not restart anything.
        assert_eq!(s.update(h(7, 0), t + 40 * MS, 8000), Counted::Jump);
        assert_eq!(s.update(h(40002, 329), t + 40 * MS, 8000), Counted::Yes);
        assert_eq!((s.lost(), s.received, s.ext_max_seq), (1, 4, 40002));
    }

    #[test]
    fn jitter_follows_rfc3550_a8() {
        // 8 kHz, 160-unit (20 ms) steps. Packet 1 arrives 10 ms late (80 units), packet 2 on
        // time again: D1 = 80, D2 = -80 → |D| = 80 twice.
        // J1 = 0 + (80 - 0)/16 = 5; J2 = 5 + (80 - 5)/16 = 9.6875 → integer form:
        // q4: 0 → 80 → 80 - 5 + 80 = 155 → 155 >> 4 = 9.
        let s = run(&[(0, 0, 0), (1, 160, 30), (2, 320, 40)]);
        assert_eq!(s.jitter_q4, 155);
        assert_eq!(s.jitter(), 9);
        // A steady stream lets the estimate decay towards 0.
        let mut p = std::vec![(0u16, 0u32, 0u64), (1, 160, 30), (2, 320, 40)];
        p.extend((3..200u16).map(|i| (i, u32::from(i) * 160, u64::from(i) * 20)));
        assert_eq!(run(&p).jitter(), 0);
    }

    #[test]
    fn jitter_uses_the_clock_rate() {
        // 48 kHz: a 1 ms late arrival is 48 units.
        let mut s = RtpState::default();
        s.update(h(0, 0), MS, 48_000);
        s.update(h(1, 960), 22 * MS, 48_000);
        assert_eq!(s.jitter_q4, 48);
        // A clock rate of 0 means 8 kHz.
        let mut s = RtpState::default();
        s.update(h(0, 0), MS, 0);
        s.update(h(1, 160), 22 * MS, 0);
        assert_eq!(s.jitter_q4, 8);
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_latest_sequence_state() {
        // User space saw 0..=2, the fast path 3..=9 with 6 missing.
        let us = run(&[(0, 0, 0), (1, 160, 20), (2, 320, 40)]);
        let fast = run(&[
            (3, 480, 60),
            (4, 640, 80),
            (5, 800, 100),
            (7, 1120, 140),
            (9, 1440, 175),
            (8, 1280, 176),
        ]);
        let mut m = us;
        m.merge(&fast);
        assert_eq!((m.received, m.lost(), m.reordered), (9, 1, 1));
        assert_eq!(m.ext_max_seq, 9);
        assert_eq!(m.jitter_q4, fast.jitter_q4);
        let mut m2 = fast;
        m2.merge(&us);
        assert_eq!(m2, m, "merge order does not matter");
    }

    proptest! {
        #[test]
        fn counts_are_exact_and_jitter_bounded(
            steps in proptest::collection::vec((0u16..400, 0u32..100_000, 0u64..200_000_000), 1..300),
            start in any::<u16>(),
        ) {
            let mut s = RtpState::default();
            let (mut seq, mut ts, mut t) = (start, 0u32, 1u64);
            let mut counted = 0u64;
            for (dseq, dts, dt) in steps {
                // Mostly forward, sometimes back (late or duplicate).
                seq = if dseq < 300 { seq.wrapping_add(dseq / 10) } else { seq.wrapping_sub(dseq - 300) };
                ts = ts.wrapping_add(dts);
                t += dt;
                if s.update(h(seq, ts), t, 8000) == Counted::Yes {
                    counted += 1;
                }
                prop_assert!(s.jitter_q4 <= 16 * MAX_JITTER_STEP as u32);
            }
            prop_assert_eq!(s.received, counted);
            prop_assert!(s.run_received as u64 <= s.received);
            prop_assert!(s.lost() <= s.lost_prior + s.run_expected());
            // Merging with an empty state changes nothing.
            let mut m = s;
            m.merge(&RtpState::default());
            prop_assert_eq!(m, s);
        }

        #[test]
        fn small_forward_steps_lose_exactly_the_skipped(
            skips in proptest::collection::vec(0u16..5, 1..500),
            start in any::<u16>(),
        ) {
            let mut s = RtpState::default();
            let mut seq = start;
            let mut t = 1u64;
            let mut skipped = 0u64;
            for (i, k) in skips.iter().enumerate() {
                if i > 0 {
                    seq = seq.wrapping_add(k + 1);
                    skipped += u64::from(*k);
                }
                t += 20 * MS;
                prop_assert_eq!(s.update(h(seq, 0), t, 8000), Counted::Yes);
            }
            prop_assert_eq!(s.received, skips.len() as u64);
            prop_assert_eq!(s.lost(), skipped);
            prop_assert_eq!(s.reordered, 0);
        }
    }
}
