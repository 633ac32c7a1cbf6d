//! `rtp-load`: RTP load generator and side-by-side benchmark of homerelay's data paths.
//! Needs root: it builds network namespaces, raw and packet sockets, and XDP programs.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bench::run::{self, Mode, Pinning, RunSpec};
use bench::scenario::Profile;
use bench::suite::{self, SuiteConfig};
use clap::{Args, Parser, Subcommand};

/// RTP load generator and side-by-side benchmark of homerelay's data paths (no relay, XDP
/// native, XDP generic, the socket relay, a naive relay) on a namespace testbed.
///
/// Every probe is a 200-byte IPv4/UDP/RTP packet (G.711, 160-byte payload) carrying its flow,
/// a sequence number and its send time; an AF_PACKET ring on the sink checks checksums and
/// addresses and counts loss (a probe more than --late-ms late is lost), reordering,
/// duplicates and latency percentiles. Needs root.
#[derive(Debug, Parser)]
#[command(name = "rtp-load", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One run of one mode and profile on a fresh testbed; prints a summary.
    Run(RunArgs),
    /// Every mode on a fresh testbed each: flat-out flood, fixed-rate CPU run, call-count
    /// search. Writes JSON with every run and regenerates a Markdown table section.
    Suite(SuiteArgs),
    /// The XDP program's own cost per packet with BPF_PROG_TEST_RUN (forward, no channel,
    /// floor); prints JSON.
    XdpCost {
        /// Program runs per sample (in the kernel).
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Samples; the median is reported.
        #[arg(long, default_value_t = 7)]
        samples: usize,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Seed for SSRCs, RTP timestamps and peer ports.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Core of the sender thread [default: 0].
    #[arg(long)]
    sender_core: Option<usize>,
    /// Core of the receiver thread [default: last core].
    #[arg(long)]
    receiver_core: Option<usize>,
    /// Core of the relay's threads [default: last core].
    #[arg(long)]
    relay_core: Option<usize>,
    /// Pin nothing (the core options are ignored).
    #[arg(long)]
    no_pin: bool,
    /// Lowest relay port; call i uses port_min + 2i.
    #[arg(long, default_value_t = 20_000)]
    port_min: u16,
    /// Highest relay port (20000-39999 holds 10000 channels).
    #[arg(long, default_value_t = 39_999)]
    port_max: u16,
    /// Worker threads of homerelay's socket relay.
    #[arg(long, default_value_t = 1)]
    relay_workers: usize,
    /// A probe delivered later than this after its send time counts as lost (ms).
    #[arg(long, default_value_t = 20.0)]
    late_ms: f64,
    /// Messages per sendmmsg call at most.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Shortest sleep of the paced sender between rounds (µs); it never spins.
    #[arg(long, default_value_t = 50)]
    min_sleep_us: u64,
}

impl Common {
    fn pinning(&self) -> Pinning {
        if self.no_pin {
            return Pinning {
                sender: None,
                receiver: None,
                relay: None,
            };
        }
        let d = run::default_pinning();
        Pinning {
            sender: self.sender_core.or(d.sender),
            receiver: self.receiver_core.or(d.receiver),
            relay: self.relay_core.or(d.relay),
        }
    }

    fn spec(
        &self,
        mode: Mode,
        profile: Profile,
        warmup: f64,
        duration: f64,
        drain: f64,
    ) -> RunSpec {
        RunSpec {
            mode,
            profile,
            warmup: Duration::from_secs_f64(warmup),
            duration: Duration::from_secs_f64(duration),
            drain: Duration::from_secs_f64(drain),
            seed: self.seed,
            pinning: self.pinning(),
            relay_workers: self.relay_workers,
            port_min: self.port_min,
            port_max: self.port_max,
            late: Duration::from_secs_f64(self.late_ms / 1e3),
            bpf_stats: false,
            batch: self.batch.max(1),
            min_sleep: Duration::from_micros(self.min_sleep_us),
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Data path under test.
    #[arg(long, value_enum, default_value = "none")]
    mode: Mode,
    /// Warm-up before the measurement window (s).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Measurement window (s).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Wait for in-flight packets after sending stops (s).
    #[arg(long, default_value_t = 0.3)]
    drain: f64,
    /// XDP modes: also measure the program's ns per packet with bpf_stats.
    #[arg(long)]
    bpf_stats: bool,
    /// Write the full result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    profile: ProfileCmd,
}

#[derive(Debug, Subcommand)]
enum ProfileCmd {
    /// N concurrent G.711 calls: 2 flows each (Home→Office, Office→Home), 50 packets/s per
    /// flow, evenly spread.
    Calls {
        /// Number of calls.
        calls: u32,
    },
    /// Home→Office flows, flat out or at a fixed total rate.
    Flood {
        /// Number of flows (each its own relay channel).
        #[arg(long, default_value_t = 1)]
        flows: u32,
        /// Total packets per second; flat out if absent.
        #[arg(long)]
        rate: Option<f64>,
    },
}

#[derive(Debug, Args)]
struct SuiteArgs {
    /// JSON results file.
    #[arg(long, default_value = "bench/results/latest.json")]
    out: PathBuf,
    /// Markdown file whose generated section is replaced (e.g. BENCHMARKS.md).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Smoke run: short runs, one repeat, two call steps (well under a minute).
    #[arg(long)]
    quick: bool,
    /// Modes to run, in order (`none` first: the others' CPU is relative to it).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "none,xdp-native,xdp-generic,userspace,naive"
    )]
    modes: Vec<Mode>,
    /// Repeats of every run [default: 3, quick: 1].
    #[arg(long)]
    repeats: Option<usize>,
    /// Warm-up per run (s) [default: 1, quick: 0.2].
    #[arg(long)]
    warmup: Option<f64>,
    /// Measurement window per run (s) [default: 3, quick: 0.5].
    #[arg(long)]
    duration: Option<f64>,
    /// Flows of the flood runs.
    #[arg(long, default_value_t = 1)]
    flood_flows: u32,
    /// Rate of the fixed-rate CPU runs (packets/s) [default: 200000, quick: 50000].
    #[arg(long)]
    fixed_rate: Option<f64>,
    /// Call counts to try, in order [default: 250,500,1000,2000,3000,4000,6000 (capped by the
    /// port range), quick: 250,1000].
    #[arg(long, value_delimiter = ',')]
    calls: Option<Vec<u32>>,
    /// A call count passes if every path loses less than this fraction.
    #[arg(long, default_value_t = 0.001)]
    loss_threshold: f64,
    #[command(flatten)]
    common: Common,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("rtp-load needs root (network namespaces, raw and packet sockets, XDP)");
    }
    bench::cpu::raise_fd_limit();
    bench::cpu::stop_on_signals();
    bench::relay_modes::remove_stale_pin_dirs();
    match cli.cmd {
        Cmd::Run(a) => run_one(a),
        Cmd::Suite(a) => run_suite(a),
        Cmd::XdpCost { repeat, samples } => {
            let cost = bench::xdp_cost::measure(repeat, samples.max(1))?;
            println!("{}", serde_json::to_string_pretty(&cost)?);
            Ok(())
        }
    }
}

fn run_one(a: RunArgs) -> anyhow::Result<()> {
    if let Some(reason) = a.mode.unavailable_reason() {
        bail!("mode {} is not available: {reason}", a.mode.name());
    }
    let profile = match a.profile {
        ProfileCmd::Calls { calls } => Profile::Calls { calls },
        ProfileCmd::Flood { flows, rate } => Profile::Flood {
            flows,
            rate_pps: rate,
        },
    };
    let mut spec = a
        .common
        .spec(a.mode, profile, a.warmup, a.duration, a.drain);
    spec.bpf_stats = a.bpf_stats;
    let tb = run::bench_testbed()?;
    let r = run::run(&tb, &spec)?;
    drop(tb);
    println!(
        "{} / {}: sent {} ({:.1} kpps, max lag {:.0} µs), busy cores {:.2} {:?}, threads: sender {:.2} receiver {:.2} relay {:.2}",
        r.mode.name(),
        r.profile,
        r.sender.sent,
        r.sender.achieved_pps / 1e3,
        r.sender.max_lag_us,
        r.sender.cpu.total_cores,
        r.sender
            .cpu
            .per_core
            .iter()
            .map(|c| (c * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        r.threads.sender,
        r.threads.receiver,
        r.threads.relay,
    );
    for p in &r.paths {
        println!(
            "  {}: {} flows, sent {}, delivered {} ({:.1} kpps), lost {} ({:.4} %, {} late), reordered {}, dup {}, worst flow loss {:.4} %, latency µs p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
            p.path,
            p.flows,
            p.sent,
            p.delivered,
            p.delivered_pps / 1e3,
            p.lost,
            p.loss_ratio * 100.0,
            p.late,
            p.reordered,
            p.duplicate,
            p.worst_flow_loss_ratio * 100.0,
            p.latency.p50_us,
            p.latency.p90_us,
            p.latency.p99_us,
            p.latency.p999_us,
            p.latency.max_us
        );
    }
    if let Some(x) = &r.relay {
        let counters: Vec<String> = x
            .xdp_counters
            .iter()
            .filter(|c| c.1 > 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        println!(
            "  relay: channel packets {}, xdp {:?}, counters [{}], ns/packet: xdp {:?}, empty pass program {:?}",
            x.channel_packets,
            x.xdp_attachments,
            counters.join(" "),
            x.xdp_ns_per_packet,
            x.xdp_pass_ns_per_packet
        );
    }
    if let Some(n) = &r.naive {
        println!(
            "  naive relay: forwarded {}, dropped {}, send errors {}",
            n.forwarded, n.dropped, n.send_errors
        );
    }
    for p in run::problems(&r) {
        println!("  WARNING: {p}");
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&r)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn run_suite(a: SuiteArgs) -> anyhow::Result<()> {
    let (warmup, duration, drain, repeats) = suite::default_durations(a.quick);
    let warmup = a.warmup.unwrap_or(warmup.as_secs_f64());
    let duration = a.duration.unwrap_or(duration.as_secs_f64());
    let capacity = u32::from(
        a.common
            .port_max
            .saturating_sub(a.common.port_min.next_multiple_of(2))
            / 2
            + 1,
    );
    let call_steps: Vec<u32> = a
        .calls
        .clone()
        .unwrap_or_else(|| {
            if a.quick {
                vec![250, 1000]
            } else {
                vec![250, 500, 1000, 2000, 3000, 4000, 6000]
            }
        })
        .into_iter()
        .filter(|&c| c <= capacity)
        .collect();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = SuiteConfig {
        modes: a.modes.clone(),
        repeats: a.repeats.unwrap_or(repeats).max(1),
        base: a.common.spec(
            Mode::None,
            Profile::Calls { calls: 1 },
            warmup,
            duration,
            drain.as_secs_f64(),
        ),
        flood_flows: a.flood_flows,
        fixed_rate_pps: a
            .fixed_rate
            .unwrap_or(if a.quick { 50_000.0 } else { 200_000.0 }),
        call_steps,
        loss_threshold: a.loss_threshold,
        quick: a.quick,
        command: format!(
            "cargo run --release -p bench --bin rtp-load -- {}",
            args.join(" ")
        ),
    };
    let started = std::time::Instant::now();
    let result = suite::run_suite(&cfg);
    suite::write_json(&result, &a.out)?;
    eprintln!(
        "[rtp-load] wrote {} after {:.0} s",
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(md) = &a.markdown {
        suite::update_markdown(md, &suite::markdown(&result, &a.out.display().to_string()))?;
        eprintln!("[rtp-load] updated {}", md.display());
    }
    if bench::cpu::interrupted() {
        bail!(
            "interrupted: partial results written to {}",
            a.out.display()
        );
    }
    let failed: Vec<&str> = result
        .modes
        .iter()
        .filter(|m| m.status == "error")
        .map(|m| m.mode.name())
        .collect();
    if !failed.is_empty() {
        bail!("modes failed: {}", failed.join(", "));
    }
    Ok(())
}
