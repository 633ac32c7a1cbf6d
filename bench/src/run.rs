//! One measured run: start the relay of the chosen mode, open the sinks' rings and the
//! senders' raw sockets inside their namespaces, send for warm-up + duration, let in-flight
//! packets drain, and turn the counters into per-path results.
//!
//! Threads: the receiver (one thread for every sink ring) and the sender (one thread for every
//! source socket) are pinned to the cores given; a socket keeps the namespace it was created
//! in, so one thread serves Home's and Office's sockets alike.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use relay_user::netns::{self, Host, Testbed};
use serde::Serialize;

use crate::cpu;
use crate::histogram::Percentiles;
use crate::naive::{NaiveRelay, NaiveStats};
use crate::receiver::{self, Expect, ReceiverConfig, Ring};
use crate::relay_modes::{self, RelayKind, RelayParams, RelayReport, RunningRelay};
use crate::scenario::{Path, Profile, Scenario};
use crate::sender::{self, SenderConfig, SenderReport};

/// The data path under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No relay: peers send to each other, Relay only forwards in the kernel (baseline).
    None,
    /// homerelay with its XDP program in driver mode.
    XdpNative,
    /// homerelay with its XDP program in generic (skb) mode.
    XdpGeneric,
    /// homerelay's socket relay alone.
    Userspace,
    /// A one-packet-per-syscall relay written for comparison (`naive.rs`).
    Naive,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::None,
        Mode::XdpNative,
        Mode::XdpGeneric,
        Mode::Userspace,
        Mode::Naive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::XdpNative => "xdp-native",
            Mode::XdpGeneric => "xdp-generic",
            Mode::Userspace => "userspace",
            Mode::Naive => "naive",
        }
    }

    fn relay_kind(self) -> Option<RelayKind> {
        match self {
            Mode::XdpNative => Some(RelayKind::XdpNative),
            Mode::XdpGeneric => Some(RelayKind::XdpGeneric),
            Mode::Userspace => Some(RelayKind::Userspace),
            Mode::None | Mode::Naive => None,
        }
    }

    /// Why this mode cannot run in this build, if it cannot.
    pub fn unavailable_reason(self) -> Option<&'static str> {
        self.relay_kind()
            .and_then(|_| relay_modes::unavailable_reason())
    }
}

/// Cores for the threads of a run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Pinning {
    pub sender: Option<usize>,
    pub receiver: Option<usize>,
    pub relay: Option<usize>,
}

/// Everything that defines one run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub mode: Mode,
    pub profile: Profile,
    pub warmup: Duration,
    pub duration: Duration,
    /// The longest wait after the last packet for in-flight packets; the receiver stops
    /// earlier as soon as every measurement-window packet has arrived. Benchmarks keep it
    /// short (what has not arrived by then is lost anyway); tests set it long, so a busy
    /// machine delays a run instead of failing it.
    pub drain: Duration,
    pub seed: u64,
    pub pinning: Pinning,
    pub relay_workers: usize,
    pub port_min: u16,
    pub port_max: u16,
    /// Probes delivered later than this after their send time count as lost.
    pub late: Duration,
    /// XDP modes: enable `bpf_stats` for this run (costs two clock reads per packet).
    pub bpf_stats: bool,
    pub batch: usize,
    pub min_sleep: Duration,
}

/// One direction of traffic, as the sink saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PathResult {
    pub path: &'static str,
    pub flows: usize,
    pub sent: u64,
    /// Delivered within the late threshold with valid checksums, not duplicated.
    pub delivered: u64,
    /// Of the lost ones: delivered, but too late.
    pub late: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    pub delivered_pps: f64,
    pub reordered: u64,
    pub duplicate: u64,
    pub bad_ip_checksum: u64,
    pub bad_udp_checksum: u64,
    pub no_udp_checksum: u64,
    pub misaddressed: u64,
    pub latency: Percentiles,
    pub flows_with_loss: usize,
    pub worst_flow_loss_ratio: f64,
}

/// CPU of groups of threads over the measurement window, in cores (1.0 = one core busy).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ThreadCpu {
    /// The sender thread, including the softirq work it triggers (on veth: the whole
    /// forwarding path, XDP included).
    pub sender: f64,
    pub receiver: f64,
    /// The relay's own threads (userspace/naive work, and the softirq work their sends
    /// trigger).
    pub relay: f64,
    /// The `ksoftirqd` threads (deferred network work).
    pub ksoftirqd: f64,
    /// Every thread of this process plus `ksoftirqd`: the run's own CPU.
    pub run_total: f64,
}

/// The result of one run.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub mode: Mode,
    pub profile: String,
    pub calls: Option<u32>,
    pub flows: usize,
    pub target_pps: Option<f64>,
    pub sender: SenderReport,
    pub paths: Vec<PathResult>,
    /// Delivered packets per second, all paths.
    pub delivered_pps: f64,
    /// Worst loss ratio over the paths.
    pub max_loss_ratio: f64,
    pub threads: ThreadCpu,
    pub receiver_ring_drops: u64,
    pub receiver_unknown_flow: u64,
    pub receiver_timestamp_fallbacks: u64,
    pub relay: Option<RelayReport>,
    pub naive: Option<NaiveStats>,
}

enum Relay {
    None,
    Naive(NaiveRelay),
    Homerelay(RunningRelay),
}

/// Runs `spec` on `tb` (which must have no relay running).
pub fn run(tb: &Testbed, spec: &RunSpec) -> anyhow::Result<RunResult> {
    if cpu::interrupted() {
        bail!("interrupted");
    }
    let uses_relay = spec.mode != Mode::None;
    // The "no relay" baseline is plain kernel forwarding through Relay; every relay mode runs
    // with forwarding off, as on a stock host.
    tb.set_forwarding(Host::Relay, !uses_relay)?;
    let scenario = Scenario::build(
        spec.profile,
        uses_relay,
        spec.seed,
        spec.port_min,
        spec.port_max,
    )?;
    let relay = match spec.mode {
        Mode::None => Relay::None,
        Mode::Naive => Relay::Naive(NaiveRelay::start(
            tb,
            scenario.channels.clone(),
            spec.pinning.relay,
        )?),
        m => {
            let Some(kind) = m.relay_kind() else {
                bail!("mode {m:?} has no relay")
            };
            let params = RelayParams {
                port_min: spec.port_min,
                port_max: spec.port_max,
                workers: spec.relay_workers,
                core: spec.pinning.relay,
                channels: scenario.channels.clone(),
                bpf_stats: spec.bpf_stats,
            };
            Relay::Homerelay(relay_modes::start(tb, kind, params)?)
        }
    };
    let relay_tids: Vec<i32> = match &relay {
        Relay::None => Vec::new(),
        Relay::Naive(n) => vec![n.tid],
        Relay::Homerelay(r) => r.thread_ids().to_vec(),
    };
    let traffic = send_and_receive(tb, spec, &scenario);
    // Stop the relay whatever happened to the traffic.
    let (relay_report, naive_stats) = match relay {
        Relay::None => (None, None),
        Relay::Naive(n) => (None, Some(n.stop()?)),
        Relay::Homerelay(r) => (Some(r.stop()?), None),
    };
    let (sent, received) = traffic?;
    if cpu::interrupted() {
        bail!("interrupted");
    }

    let window = sent.window_s.max(1e-9);
    let mut paths = Vec::new();
    for path in Path::ALL {
        if !scenario.has_path(path) {
            continue;
        }
        let rx = &received.paths[path.index()];
        let mut r = PathResult {
            path: path.name(),
            ..Default::default()
        };
        let mut worst: f64 = 0.0;
        for (id, flow) in scenario.flows.iter().enumerate() {
            if flow.path != path {
                continue;
            }
            r.flows += 1;
            let s = sent.sent_per_flow[id];
            let d = received.on_time_per_flow[id];
            r.sent += s;
            if d < s {
                r.flows_with_loss += 1;
                worst = worst.max((s - d) as f64 / s as f64);
            }
        }
        r.delivered = rx.on_time;
        r.late = rx.late;
        r.lost = r.sent.saturating_sub(r.delivered);
        r.loss_ratio = if r.sent > 0 {
            r.lost as f64 / r.sent as f64
        } else {
            0.0
        };
        r.delivered_pps = r.delivered as f64 / window;
        r.reordered = rx.reordered;
        r.duplicate = rx.duplicate;
        r.bad_ip_checksum = rx.bad_ip_checksum;
        r.bad_udp_checksum = rx.bad_udp_checksum;
        r.no_udp_checksum = rx.no_udp_checksum;
        r.misaddressed = rx.misaddressed;
        r.latency = rx.latency.percentiles_us();
        r.worst_flow_loss_ratio = worst;
        paths.push(r);
    }
    let cores_of = |tids: &[i32]| {
        let ns: u64 = sent
            .thread_cpu_ns
            .iter()
            .filter(|(t, _)| tids.contains(t))
            .map(|(_, ns)| ns)
            .sum();
        ns as f64 / 1e9 / window
    };
    let ksoftirqd = sent.watched_cpu_ns as f64 / 1e9 / window;
    let own: u64 = sent.thread_cpu_ns.iter().map(|(_, ns)| ns).sum();
    let threads = ThreadCpu {
        sender: cores_of(&[sent.tid]),
        receiver: cores_of(&[received.tid]),
        relay: cores_of(&relay_tids),
        ksoftirqd,
        run_total: own as f64 / 1e9 / window + ksoftirqd,
    };
    let (profile, calls) = match spec.profile {
        Profile::Calls { calls } => (format!("calls {calls}"), Some(calls)),
        Profile::Flood {
            flows,
            rate_pps: None,
        } => (format!("flood {flows} flows flat-out"), None),
        Profile::Flood {
            flows,
            rate_pps: Some(r),
        } => (format!("flood {flows} flows at {r:.0} pps"), None),
    };
    Ok(RunResult {
        mode: spec.mode,
        profile,
        calls,
        flows: scenario.flows.len(),
        target_pps: scenario.rate_pps,
        delivered_pps: paths.iter().map(|p| p.delivered_pps).sum(),
        max_loss_ratio: paths.iter().map(|p| p.loss_ratio).fold(0.0, f64::max),
        paths,
        threads,
        receiver_ring_drops: received.ring_drops,
        receiver_unknown_flow: received.unknown_flow,
        receiver_timestamp_fallbacks: received.timestamp_fallbacks,
        sender: sent,
        relay: relay_report,
        naive: naive_stats,
    })
}

fn send_and_receive(
    tb: &Testbed,
    spec: &RunSpec,
    scenario: &Scenario,
) -> anyhow::Result<(SenderReport, receiver::ReceiverReport)> {
    // Sinks: Office receives Home → Office, Home receives Office → Home.
    let mut rings = Vec::new();
    for (path, host, iface) in [
        (Path::HomeToOffice, Host::Office, netns::OFFICE_IF),
        (Path::OfficeToHome, Host::Home, netns::HOME_IF),
    ] {
        if scenario.has_path(path) {
            rings.push(tb.try_run_in(host, move || Ring::open(iface))??);
        }
    }
    // Sources: one raw socket per sending host.
    let mut sockets = Vec::new();
    let mut socket_of_path = [0usize; 2];
    for (path, host) in [
        (Path::HomeToOffice, Host::Home),
        (Path::OfficeToHome, Host::Office),
    ] {
        if scenario.has_path(path) {
            socket_of_path[path.index()] = sockets.len();
            sockets.push(tb.try_run_in(host, sender::open_raw_socket)??);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let arrived = Arc::new(AtomicU64::new(0));
    let rx_cfg = ReceiverConfig {
        arrived: arrived.clone(),
        rings,
        flows: scenario.flows.iter().map(Expect::from).collect(),
        late_ns: spec.late.as_nanos() as u64,
        core: spec.pinning.receiver,
        stop: stop.clone(),
    };
    let receiver = tb.spawn_in(Host::Office, move || receiver::run(rx_cfg));

    let tx_cfg = SenderConfig {
        flows: scenario
            .flows
            .iter()
            .map(|f| (f.spec, socket_of_path[f.path.index()]))
            .collect(),
        sockets,
        rate_pps: scenario.rate_pps,
        warmup_ns: spec.warmup.as_nanos() as u64,
        duration_ns: spec.duration.as_nanos() as u64,
        core: spec.pinning.sender,
        batch: spec.batch,
        min_sleep_ns: spec.min_sleep.as_nanos() as u64,
        watch_pids: crate::cpu::ksoftirqd_pids(),
    };
    let sent = tb.spawn_in(Host::Home, move || sender::run(tx_cfg)).join();
    let expected = sent
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref().ok())
        .map(|r| r.sent);
    let drain_end = Instant::now() + spec.drain;
    while Instant::now() < drain_end
        && expected.is_some_and(|n| arrived.load(Ordering::Acquire) < n)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Release);
    let received = receiver.join();
    let sent = match sent {
        Ok(r) => r.context("sender")?,
        Err(_) => bail!("sender thread panicked"),
    };
    let received = match received {
        Ok(r) => r.context("receiver")?,
        Err(_) => bail!("receiver thread panicked"),
    };
    Ok((sent, received))
}

/// Quick sanity check of a run's plumbing, for tests and the `run` command.
pub fn problems(r: &RunResult) -> Vec<String> {
    let mut out = Vec::new();
    if r.receiver_ring_drops > 0 {
        out.push(format!(
            "receiver ring dropped {} packets (receiver-bound)",
            r.receiver_ring_drops
        ));
    }
    for p in &r.paths {
        let bad = p.bad_ip_checksum + p.bad_udp_checksum + p.no_udp_checksum + p.misaddressed;
        if bad > 0 {
            out.push(format!(
                "{}: {} bad packets (ip csum {}, udp csum {}, no udp csum {}, misaddressed {})",
                p.path,
                bad,
                p.bad_ip_checksum,
                p.bad_udp_checksum,
                p.no_udp_checksum,
                p.misaddressed
            ));
        }
    }
    if r.sender.send_errors > 0 {
        out.push(format!("sender: {} send errors", r.sender.send_errors));
    }
    out
}

/// A testbed for the benchmark: no NAT, and the sinks (Home, Office) drop UDP at ingress,
/// after the AF_PACKET tap has seen it. Without that, every probe would also go through the
/// sink's UDP stack and an ICMP port-unreachable route lookup — a quarter of the sender
/// core's time, the same in every mode, spent on nothing the benchmark measures.
pub fn bench_testbed() -> anyhow::Result<Testbed> {
    let tb = Testbed::create(netns::TestbedOptions { nat: false })?;
    for (host, iface) in [
        (Host::Office, netns::OFFICE_IF),
        (Host::Home, netns::HOME_IF),
    ] {
        let chain = format!(
            "add chain netdev rtp_load_sink ingress {{ type filter hook ingress device {iface} \
             priority 0; policy accept; }}"
        );
        tb.exec(host, &["nft", "add table netdev rtp_load_sink"])?;
        tb.exec(host, &["nft", &chain])?;
        tb.exec(
            host,
            &[
                "nft",
                "add rule netdev rtp_load_sink ingress ip protocol udp drop",
            ],
        )?;
    }
    Ok(tb)
}

/// The default cores: sender on 0, receiver and relay on the last core.
pub fn default_pinning() -> Pinning {
    let last = cpu::online_cores().saturating_sub(1);
    Pinning {
        sender: Some(0),
        receiver: Some(last),
        relay: Some(last),
    }
}
