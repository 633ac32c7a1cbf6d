//! End-to-end runs of the load generator on a real namespace testbed: every mode carries
//! a small call load without loss, the receiver's accounting adds up, and a flood through the
//! naive relay is measured. Needs root: without it these tests fail (they are not skipped).
//!
//! These are correctness tests on a shared, possibly busy 2-core machine: they assert that
//! every packet arrived once, intact, at the right address from the right source, and what
//! the pacer guarantees by construction — never latency, loss to a deadline, or a rate. The
//! late threshold is therefore far beyond any scheduling delay, and the run drains until
//! every packet is in (bounded by `DRAIN`). Speed is measured by `rtp-load` (BENCHMARKS.md).
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::time::Duration;

use bench::run::{self, Mode, RunResult, RunSpec};
use bench::scenario::Profile;

/// The runs pin threads to the same cores and measure time: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn require_root() -> std::sync::MutexGuard<'static, ()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the rtp-load end-to-end tests need root (namespaces, raw sockets, XDP)"
    );
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A packet still in flight this long after the sender stopped is lost, not late.
const DRAIN: Duration = Duration::from_secs(10);

fn spec(mode: Mode, profile: Profile) -> RunSpec {
    RunSpec {
        mode,
        profile,
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(500),
        drain: DRAIN,
        seed: 42,
        pinning: run::default_pinning(),
        relay_workers: 1,
        port_min: 20_000,
        port_max: 29_999,
        // Delivery, not timeliness: only a packet that never arrives counts as lost.
        late: DRAIN,
        bpf_stats: false,
        batch: 64,
        min_sleep: Duration::from_micros(50),
    }
}

/// Everything sent in the window arrived once, intact, at the right address, from the right
/// source (the receiver checks addresses and checksums of every packet).
fn assert_clean(r: &RunResult) {
    assert!(run::problems(r).is_empty(), "{:?}", run::problems(r));
    assert!(r.sender.sent > 0);
    let sent: u64 = r.paths.iter().map(|p| p.sent).sum();
    assert_eq!(
        sent, r.sender.sent,
        "per-path sent counts add up to the sender's"
    );
    for p in &r.paths {
        assert_eq!(p.lost, 0, "{} lost packets: {p:?}", p.path);
        assert_eq!(p.late, 0, "{}: {p:?}", p.path);
        assert_eq!(p.delivered, p.sent);
        assert_eq!(p.duplicate, 0);
        // Every delivered packet got a latency sample (the value is the benchmark's business).
        assert!(p.latency.p50_us > 0.0, "{:?}", p.latency);
    }
    assert_eq!(r.receiver_unknown_flow, 0);
}

/// What the pacer guarantees on any machine: packet `k` is never sent before `k / rate`, so the
/// whole run (warm-up included) holds at most `rate × (warm-up + duration)` packets, rounded up.
/// (How close it comes to that rate on a busy machine is a benchmark figure, not a test.)
fn assert_paced(r: &RunResult, s: &RunSpec, rate: f64) {
    let bound = (rate * (s.warmup + s.duration).as_secs_f64()).ceil() as u64 + 1;
    assert!(
        r.sender.sent_total <= bound,
        "the pacer ran ahead: {} packets sent, at most {bound} were due",
        r.sender.sent_total
    );
    assert!(r.sender.sent <= r.sender.sent_total);
}

#[test]
fn every_mode_carries_calls_without_loss() {
    let _serial = require_root();
    let tb = run::bench_testbed().unwrap();
    for mode in Mode::ALL {
        // 100 calls: 200 flows, 10,000 packets/s — far below any mode's capacity.
        let s = spec(mode, Profile::Calls { calls: 100 });
        let r = run::run(&tb, &s).unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
        assert_eq!(r.paths.len(), 2, "{mode:?}: both directions");
        assert_eq!(r.flows, 200);
        assert!(r.sender.sent > 0, "{mode:?}: nothing sent");
        assert_paced(&r, &s, 10_000.0);
        assert_clean(&r);
        if let Some(relay) = &r.relay {
            // The relay counted warm-up packets too: at least what the window carried.
            assert!(
                relay.channel_packets >= r.sender.sent,
                "{mode:?}: {relay:?}"
            );
            if matches!(mode, Mode::XdpNative | Mode::XdpGeneric) {
                let redirected = relay.xdp_counters.iter().find(|c| c.0 == "redirect");
                assert!(
                    redirected.is_some_and(|c| c.1 >= r.sender.sent),
                    "{relay:?}"
                );
            }
        }
        if let Some(naive) = &r.naive {
            assert!(naive.forwarded >= r.sender.sent);
            assert_eq!(naive.dropped, 0);
        }
    }
}

#[test]
fn fixed_rate_flood_is_paced_and_measured() {
    let _serial = require_root();
    let tb = run::bench_testbed().unwrap();
    let s = spec(
        Mode::Naive,
        Profile::Flood {
            flows: 4,
            rate_pps: Some(20_000.0),
        },
    );
    let r = run::run(&tb, &s).unwrap();
    assert_clean(&r);
    assert_eq!(r.paths.len(), 1);
    assert_paced(&r, &s, 20_000.0);
    assert!(
        r.threads.relay > 0.0,
        "the naive relay's thread used CPU: {:?}",
        r.threads
    );
    assert!(r.sender.cpu.total_cores > 0.0);
}

#[test]
fn xdp_bpf_stats_give_ns_per_packet_and_restore_the_sysctl() {
    let _serial = require_root();
    let before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    let tb = run::bench_testbed().unwrap();
    let mut s = spec(
        Mode::XdpGeneric,
        Profile::Flood {
            flows: 1,
            rate_pps: Some(20_000.0),
        },
    );
    s.bpf_stats = true;
    let r = run::run(&tb, &s).unwrap();
    assert_clean(&r);
    let relay = r.relay.unwrap();
    let ns = relay.xdp_ns_per_packet.unwrap();
    assert!(ns > 0.0 && ns < 100_000.0, "{ns} ns per packet");
    assert!(relay.xdp_prog_runs.unwrap() >= r.sender.sent);
    let after = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    assert_eq!(before, after);
}
