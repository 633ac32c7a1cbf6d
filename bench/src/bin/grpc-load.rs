//! `grpc-load`: the control plane under load. Starts the real server in-process (the daemon's
//! configuration with a custom layout, a user-space-only relay that really binds each
//! channel's two sockets, the channel service, the gRPC API on 127.0.0.1:0, metrics recorded as
//! `homerelay run` does by default), then drives it with concurrent clients that each loop
//! Allocate → Release over real HTTP/2 connections, and reports pairs per second and the
//! client-side latency percentiles of each RPC, median of several runs, as text and JSON.
//!
//! Server and clients share this process and its cores but run on separate tokio runtimes
//! (threads `hr-server`, `load-client`), so the CPU each side used is reported per thread
//! group (scheduler nanoseconds from `/proc/self/task/*/schedstat`).
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bench::cpu::{self, CpuSample};
use bench::histogram::{Histogram, Percentiles};
use clap::Parser;
use control::config::{Config, Overrides};
use control::daemon::DaemonBuilder;
use control::metrics::Metrics;
use control::server::{self, Security};
use control::service::{Dataplane, Service};
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use relay_user::Relay;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

/// Allocate+Release pairs per second and latency percentiles over gRPC, against an in-process
/// homerelay server with a user-space relay on loopback.
#[derive(Debug, Parser)]
#[command(name = "grpc-load", version)]
struct Cli {
    /// Concurrent clients; each loops Allocate then Release of its own call legs.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// HTTP/2 connections the clients share (client i uses connection i mod N).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before each measurement (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Runs, each on a fresh server; the median run (by pairs/s) is the result.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Relay port range of the custom layout (20000-39999: 10,000 channels).
    #[arg(long, default_value = "20000-39999")]
    ports: String,
    /// User-space relay workers (0: one per CPU, the daemon's default).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Worker threads of the server's runtime (default: one per CPU, as `homerelay run`).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of the clients' runtime: one keeps the load generator to at most one
    /// core's worth of CPU, so it does not starve the server it measures.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Do not record metrics in the server (the daemon records them by default).
    #[arg(long)]
    no_metrics: bool,
    /// Replace the relay by a data path that only remembers channels (no sockets): what the
    /// API and the service cost without the relay's socket work.
    #[arg(long)]
    null_dataplane: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds of the data-path-alone measurement (install + remove on the relay, one at a
    /// time, no service, no gRPC); 0 skips it.
    #[arg(long, default_value_t = 2.0)]
    data_path_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine: Machine,
    settings: Settings,
    /// The run with the median pairs/s.
    median: RunResult,
    runs: Vec<RunResult>,
    aims: Aims,
    /// The relay alone: what one install + remove costs the service while it holds its lock.
    data_path_alone: Option<DataPathAlone>,
}

#[derive(Debug, Serialize)]
struct DataPathAlone {
    /// Sequential install + remove pairs per second (one caller, like the service's lock).
    pairs_per_s: f64,
    install: Percentiles,
    remove: Percentiles,
}

/// Installs and removes channels on the relay directly, one at a time, from a plain thread.
fn data_path_alone(cli: &Cli, seconds: f64) -> anyhow::Result<DataPathAlone> {
    use relay_user::DataPath as _;
    let mut config = Config::default();
    config.apply(Overrides {
        ports: Some(cli.ports.clone()),
        workers: Some(cli.workers),
        listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        ..Overrides::default()
    })?;
    let opts = config.relay_options();
    let relay = Relay::start(opts.clone())?;
    let (mut install, mut remove) = (Histogram::default(), Histogram::default());
    let pairs = u32::from(opts.port_max - opts.port_min).div_ceil(2);
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let port = opts.port_min + 2 * u16::try_from(n % u64::from(pairs)).unwrap_or(0);
        let channel =
            relay_core::build_channel(&relay_core::ChannelSpec::default(), port, &[None, None]);
        let t0 = Instant::now();
        relay.install(port, &channel)?;
        let t1 = Instant::now();
        relay.remove(port)?;
        let t2 = Instant::now();
        install.record(ns(t1 - t0));
        remove.record(ns(t2 - t1));
        n += 1;
    }
    Ok(DataPathAlone {
        pairs_per_s: n as f64 / start.elapsed().as_secs_f64(),
        install: install.percentiles_us(),
        remove: remove.percentiles_us(),
    })
}

#[derive(Debug, Serialize)]
struct Machine {
    kernel: String,
    cpu: String,
    cores: usize,
    load_average_before: String,
}

#[derive(Debug, Serialize)]
struct Settings {
    clients: usize,
    connections: usize,
    duration_s: f64,
    warmup_s: f64,
    ports: String,
    capacity: u32,
    relay_workers: usize,
    server_threads: usize,
    client_threads: usize,
    metrics: bool,
    data_path: &'static str,
    request: &'static str,
}

#[derive(Clone, Debug, Serialize)]
struct RunResult {
    pairs: u64,
    pairs_per_s: f64,
    allocate: Percentiles,
    release: Percentiles,
    pair: Percentiles,
    /// Failed RPCs by status code (the run is invalid unless empty).
    errors: BTreeMap<String, u64>,
    /// CPU over the measured window, in cores (1.0 = one core busy), by thread group.
    cpu_cores: BTreeMap<String, f64>,
    /// Server CPU (runtime + relay workers) per pair, µs.
    server_cpu_us_per_pair: f64,
    /// The whole machine (wall − idle − iowait), in cores.
    machine_busy_cores: f64,
}

#[derive(Debug, Serialize)]
struct Aims {
    pairs_per_s: f64,
    pairs_per_s_met: bool,
    p99_ms: f64,
    allocate_p99_met: bool,
    release_p99_met: bool,
}

/// What every client sends: a SIP device at home (leg A learnt from traffic) talking to an
/// office phone given strictly (leg B), as a PBX would ask; not counted as an internet call.
fn allocate_request(client: usize, n: u64) -> pb::AllocateRequest {
    pb::AllocateRequest {
        call_leg: Some(pb::CallLeg {
            call_id: format!("grpc-load-{client}-{n}@pbx.example"),
            leg_tag: "home".into(),
        }),
        kind: pb::ChannelKind::SipDevice as i32,
        internet: Some(false),
        leg_b: Some(pb::LegSpec {
            rtp_address: "192.0.2.10:6000".into(),
            strict: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[derive(Default)]
struct ClientResult {
    pairs: u64,
    allocate: Histogram,
    release: Histogram,
    pair: Histogram,
    errors: BTreeMap<String, u64>,
}

fn error(errors: &mut BTreeMap<String, u64>, rpc: &str, s: &tonic::Status) {
    *errors.entry(format!("{rpc}: {:?}", s.code())).or_default() += 1;
}

/// One client: Allocate → Release until `stop`; only pairs started at or after `from` and
/// finished by `until` count.
async fn client(
    mut c: ChannelServiceClient<Channel>,
    id: usize,
    from: Instant,
    until: Instant,
    stop: Arc<AtomicBool>,
) -> ClientResult {
    let mut r = ClientResult::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let t0 = Instant::now();
        let port = match c.allocate(allocate_request(id, n)).await {
            Ok(resp) => resp.into_inner().channel.map_or(0, |ch| ch.port),
            Err(s) => {
                error(&mut r.errors, "allocate", &s);
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let t1 = Instant::now();
        let release = c
            .release(pb::ReleaseRequest {
                channel: Some(pb::ChannelRef {
                    target: Some(pb::channel_ref::Target::Port(port)),
                }),
            })
            .await;
        let t2 = Instant::now();
        if let Err(s) = release {
            error(&mut r.errors, "release", &s);
            continue;
        }
        if t0 >= from && t2 <= until {
            let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            r.allocate.record(ns(t1 - t0));
            r.release.record(ns(t2 - t1));
            r.pair.record(ns(t2 - t0));
            r.pairs += 1;
        }
    }
    r
}

/// CPU nanoseconds of this process's threads, by group (thread name).
fn cpu_by_group() -> BTreeMap<String, u64> {
    let mut groups = BTreeMap::new();
    for (tid, ns) in cpu::all_threads_cpu_ns() {
        let name =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
        let name = name.trim();
        let group = if name.starts_with("hr-server") {
            "server runtime"
        } else if name.starts_with("hr-user") {
            "relay workers"
        } else if name.starts_with("load-client") {
            "clients"
        } else {
            "other"
        };
        *groups.entry(group.to_owned()).or_default() += ns;
    }
    groups
}

/// A data path that keeps channels in a map: no sockets, no relay threads.
#[derive(Debug, Default)]
struct NullDataplane {
    channels: std::sync::Mutex<std::collections::HashMap<u16, relay_common::Channel>>,
}

impl NullDataplane {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u16, relay_common::Channel>> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl relay_user::DataPath for NullDataplane {
    fn name(&self) -> &'static str {
        "null"
    }

    fn install(
        &self,
        port: u16,
        channel: &relay_common::Channel,
    ) -> Result<(), relay_user::DataPathError> {
        self.map().insert(port, *channel);
        Ok(())
    }

    fn remove(&self, port: u16) -> Result<(), relay_user::DataPathError> {
        self.map()
            .remove(&port)
            .map(|_| ())
            .ok_or(relay_user::DataPathError::NotFound(port))
    }

    fn channel(&self, port: u16) -> Result<relay_common::Channel, relay_user::DataPathError> {
        self.map()
            .get(&port)
            .copied()
            .ok_or(relay_user::DataPathError::NotFound(port))
    }

    fn stats(&self, port: u16) -> Result<relay_common::ChannelStats, relay_user::DataPathError> {
        self.channel(port)
            .map(|_| relay_common::ChannelStats::default())
    }
}

impl Dataplane for NullDataplane {
    fn install_new(
        &self,
        port: u16,
        channel: &relay_common::Channel,
    ) -> Result<u64, relay_user::DataPathError> {
        self.map().insert(port, *channel);
        Ok(1)
    }

    fn update(
        &self,
        port: u16,
        channel: &relay_common::Channel,
        _replace: [bool; 2],
    ) -> Result<(), relay_user::DataPathError> {
        self.map().insert(port, *channel);
        Ok(())
    }

    fn fast_path_unavailable(&self) -> Option<String> {
        Some("null data path".to_owned())
    }

    fn inherited(&self) -> Vec<(u16, relay_common::Channel)> {
        Vec::new()
    }

    fn adopt(&self, port: u16) -> Result<u64, relay_user::DataPathError> {
        Err(relay_user::DataPathError::NotFound(port))
    }
}

struct Server {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    service: Service,
    _state: tempfile::TempDir,
    capacity: u32,
    server_threads: usize,
}

fn start_server(cli: &Cli) -> anyhow::Result<Server> {
    let mut config = Config::default();
    config
        .apply(Overrides {
            ports: Some(cli.ports.clone()),
            workers: Some(cli.workers),
            listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            ..Overrides::default()
        })
        .context("configuration")?;
    let (layout, _) = config.layout()?;
    let server_threads = cli.server_threads.unwrap_or_else(cpu::online_cores).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads)
        .thread_name("hr-server")
        .enable_all()
        .build()?;
    // The service as `homerelay run` builds it, with its state database in a temporary
    // directory (every allocation and release is written there before the data path moves).
    let state = tempfile::tempdir().context("a temporary state directory")?;
    config.store.path = state.path().join("homerelay.db");
    let (addr, service) = runtime.block_on(async {
        let metrics = if cli.no_metrics {
            Metrics::disabled()
        } else {
            Metrics::new()
        };
        let mut builder = DaemonBuilder::new(config.clone()).seed(1).metrics(metrics);
        if cli.null_dataplane {
            builder = builder.dataplane(Arc::new(NullDataplane::default()));
        }
        let service = builder.build()?.service;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(server::serve(
            listener,
            service.clone(),
            Security::default(),
            service.stopping(),
        ));
        anyhow::Ok((addr, service))
    })?;
    Ok(Server {
        runtime,
        addr,
        service,
        _state: state,
        capacity: layout.capacity(),
        server_threads,
    })
}

fn one_run(cli: &Cli, client_threads: usize) -> anyhow::Result<(RunResult, u32, usize)> {
    let server = start_server(cli)?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .thread_name("load-client")
        .enable_all()
        .build()?;
    let url = format!("http://{}", server.addr);
    let result = clients_rt.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..cli.connections.max(1) {
            channels.push(Endpoint::from_shared(url.clone())?.connect().await?);
        }
        let start = Instant::now();
        let from = start + Duration::from_secs_f64(cli.warmup);
        let until = from + Duration::from_secs_f64(cli.duration);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..cli.clients)
            .map(|i| {
                let c = ChannelServiceClient::new(channels[i % channels.len()].clone());
                tokio::spawn(client(c, i, from, until, Arc::clone(&stop)))
            })
            .collect();
        tokio::time::sleep_until(from.into()).await;
        let (cpu0, busy0) = (cpu_by_group(), CpuSample::read()?);
        tokio::time::sleep_until(until.into()).await;
        let (cpu1, busy1) = (cpu_by_group(), CpuSample::read()?);
        stop.store(true, Ordering::Relaxed);
        let mut total = ClientResult::default();
        for t in tasks {
            let r = t.await?;
            total.pairs += r.pairs;
            total.allocate.merge(&r.allocate);
            total.release.merge(&r.release);
            total.pair.merge(&r.pair);
            for (k, v) in r.errors {
                *total.errors.entry(k).or_default() += v;
            }
        }
        let window = busy0.busy_until(&busy1);
        let cpu_cores: BTreeMap<String, f64> = cpu1
            .iter()
            .map(|(g, &ns)| {
                let used = ns.saturating_sub(cpu0.get(g).copied().unwrap_or(0));
                (g.clone(), used as f64 / 1e9 / window.window_s)
            })
            .collect();
        let server_cores = cpu_cores.get("server runtime").copied().unwrap_or(0.0)
            + cpu_cores.get("relay workers").copied().unwrap_or(0.0);
        let pairs_per_s = total.pairs as f64 / cli.duration;
        anyhow::Ok(RunResult {
            pairs: total.pairs,
            pairs_per_s,
            allocate: total.allocate.percentiles_us(),
            release: total.release.percentiles_us(),
            pair: total.pair.percentiles_us(),
            errors: total.errors,
            server_cpu_us_per_pair: if pairs_per_s > 0.0 {
                server_cores * 1e6 / pairs_per_s
            } else {
                0.0
            },
            cpu_cores,
            machine_busy_cores: window.total_cores,
        })
    })?;
    drop(clients_rt);
    let leaked = server.runtime.block_on(async {
        let in_use = server.service.pool().await.map(|p| p.status.in_use);
        server.service.shutdown().await;
        in_use
    })?;
    anyhow::ensure!(leaked == 0, "{leaked} channels still in use after the run");
    drop(server.runtime);
    Ok((result, server.capacity, server.server_threads))
}

fn print_run(i: usize, r: &RunResult) {
    let p = |x: &Percentiles| {
        format!(
            "{:.0}/{:.0}/{:.0}/{:.0} µs",
            x.p50_us, x.p90_us, x.p99_us, x.p999_us
        )
    };
    println!(
        "run {i}: {:.0} pairs/s; allocate p50/p90/p99/p99.9 {}; release {}; server CPU {:.1} µs/pair; machine busy {:.2} cores; errors {:?}",
        r.pairs_per_s,
        p(&r.allocate),
        p(&r.release),
        r.server_cpu_us_per_pair,
        r.machine_busy_cores,
        r.errors
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let client_threads = cli.client_threads.max(1);
    let machine = Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpu: std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        cores: cpu::online_cores(),
        load_average_before: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    let mut runs = Vec::new();
    let (mut capacity, mut server_threads) = (0, 0);
    for i in 0..cli.runs.max(1) {
        let (r, cap, threads) = one_run(&cli, client_threads)?;
        print_run(i + 1, &r);
        (capacity, server_threads) = (cap, threads);
        runs.push(r);
    }
    let data_path = if cli.data_path_seconds > 0.0 && !cli.null_dataplane {
        let d = data_path_alone(&cli, cli.data_path_seconds)?;
        println!(
            "data path alone (relay install + remove, one at a time): {:.0} pairs/s; install p50/p99 {:.0}/{:.0} µs, remove p50/p99 {:.0}/{:.0} µs",
            d.pairs_per_s, d.install.p50_us, d.install.p99_us, d.remove.p50_us, d.remove.p99_us
        );
        Some(d)
    } else {
        None
    };
    let mut sorted = runs.clone();
    sorted.sort_by(|a, b| a.pairs_per_s.total_cmp(&b.pairs_per_s));
    let median = sorted[sorted.len() / 2].clone();
    let report = Report {
        command,
        machine,
        settings: Settings {
            clients: cli.clients,
            connections: cli.connections,
            duration_s: cli.duration,
            warmup_s: cli.warmup,
            ports: cli.ports.clone(),
            capacity,
            relay_workers: cli.workers,
            server_threads,
            client_threads,
            metrics: !cli.no_metrics,
            data_path: if cli.null_dataplane {
                "null (channels kept in a map, no sockets)"
            } else {
                "user-space relay (binds and closes each channel's two sockets)"
            },
            request: "SIP device, leg B strict (192.0.2.10:6000), not an internet call",
        },
        aims: Aims {
            pairs_per_s: 10_000.0,
            pairs_per_s_met: median.pairs_per_s >= 10_000.0,
            p99_ms: 5.0,
            allocate_p99_met: median.allocate.p99_us < 5_000.0,
            release_p99_met: median.release.p99_us < 5_000.0,
        },
        median,
        runs,
        data_path_alone: data_path,
    };
    println!(
        "median: {:.0} pairs/s (aim ≥ 10000: {}); allocate p99 {:.0} µs, release p99 {:.0} µs (aim < 5 ms: {})",
        report.median.pairs_per_s,
        if report.aims.pairs_per_s_met {
            "met"
        } else {
            "NOT met"
        },
        report.median.allocate.p99_us,
        report.median.release.p99_us,
        if report.aims.allocate_p99_met && report.aims.release_p99_met {
            "met"
        } else {
            "NOT met"
        },
    );
    if let Some(out) = &cli.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
