//! `channel-memory`: memory per resident channel, measured two ways.
//!
//! 1. The allocator alone with 100,000 channels (its largest capacity: a multi-address custom
//!    layout, 10,000 port pairs on each of 10 relay addresses), each with a 36-byte Call-ID and
//!    a 10-byte leg tag.
//! 2. The whole service as `homerelay run` builds it — allocator, channel service, the
//!    user-space relay binding each channel's two sockets — with as many channels as this
//!    host allows. The data path keys channels by port on one relay address, so a relay holds
//!    at most 32,256 channels, and two sockets per channel must fit `RLIMIT_NOFILE`.
//!
//! Heap bytes come from a counting wrapper around the system allocator (every thread; bytes
//! requested, malloc's own overhead not included); RSS from `/proc/self/statm` (includes
//! malloc overhead and anything else the process touched meanwhile); the kernel's socket
//! memory from `/proc/meminfo` slab totals (machine-wide: approximate on a busy host).
use std::alloc::{GlobalAlloc, Layout as MemLayout, System};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use control::config::{Config, Overrides};
use control::daemon::DaemonBuilder;
use relay_core::allocator::{self, Allocator, Kind, Layout, Request};
use relay_core::{ChannelSpec, LegSpec};
use serde::Serialize;

static HEAP: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the counting is one atomic add, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: MemLayout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: MemLayout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (all allocations go through us).
        unsafe { System.dealloc(ptr, layout) };
        HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: MemLayout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s size rules.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn heap() -> i64 {
    HEAP.load(Ordering::Relaxed) as i64
}

/// Resident set size in bytes.
fn rss() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64
}

/// Slab memory of the whole machine (SReclaimable + SUnreclaim), bytes.
fn slab() -> i64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .filter(|l| l.starts_with("SReclaimable:") || l.starts_with("SUnreclaim:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
        .sum::<i64>()
        * 1024
}

/// Memory per channel, measured two ways (see the module summary).
#[derive(Debug, Parser)]
#[command(name = "channel-memory", version)]
struct Cli {
    /// Channels resident in the allocator-only measurement (at most 100,000).
    #[arg(long, default_value_t = 100_000)]
    allocator_channels: u32,
    /// Channels resident in the whole-service measurement (capped by RLIMIT_NOFILE: two
    /// sockets per channel).
    #[arg(long, default_value_t = 9_000)]
    service_channels: u32,
    /// Relay port range of the whole-service measurement.
    #[arg(long, default_value = "20000-39999")]
    ports: String,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct AllocatorMemory {
    channels: u32,
    layout: String,
    id_bytes_per_channel: usize,
    /// Heap of the empty allocator (everything is preallocated for the capacity).
    empty_heap_bytes: i64,
    full_heap_bytes: i64,
    heap_bytes_per_channel: f64,
    rss_bytes_per_channel: f64,
    allocations_per_s: f64,
}

#[derive(Debug, Serialize)]
struct ServiceMemory {
    channels: u32,
    layout: String,
    relay_workers: usize,
    /// Heap per channel: allocator + service records + user-space relay (whole process, all
    /// threads).
    heap_bytes_per_channel: f64,
    rss_bytes_per_channel: f64,
    /// Kernel slab per channel (two UDP sockets, their files and epoll entries);
    /// machine-wide, so approximate.
    kernel_slab_bytes_per_channel: f64,
    allocations_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    kernel: String,
    allocator: AllocatorMemory,
    service: ServiceMemory,
}

/// A typical SIP Call-ID (36 bytes) and leg tag (10 bytes) for channel `i`.
fn ids(i: u32) -> (String, String) {
    (
        format!("{i:08x}-7c3e-4b1a-9f00-1d2e3f4a5b6c"),
        format!("{i:010x}"),
    )
}

fn allocator_memory(n: u32) -> anyhow::Result<AllocatorMemory> {
    let addresses = 10;
    let (first, last) = (20_000, 39_999);
    let layout = Layout::custom(first, last, n, addresses).context("layout")?;
    let t0 = Instant::now();
    let (heap0, rss0) = (heap(), rss());
    let mut a = Allocator::new(allocator::Config::new(layout, 7), t0)?;
    let empty = heap() - heap0;
    let start = Instant::now();
    for i in 0..n {
        let (call_id, tag) = ids(i);
        a.allocate(Request::new(call_id, tag, Kind::SipDevice), t0)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    anyhow::ensure!(a.status(t0).in_use == n, "not every channel is in use");
    let (full, rss1) = (heap() - heap0, rss() - rss0);
    let r = AllocatorMemory {
        channels: n,
        layout: format!("custom {first}-{last} on {addresses} addresses, capacity {n}"),
        id_bytes_per_channel: 46,
        empty_heap_bytes: empty,
        full_heap_bytes: full,
        heap_bytes_per_channel: full as f64 / f64::from(n),
        rss_bytes_per_channel: rss1 as f64 / f64::from(n),
        allocations_per_s: f64::from(n) / elapsed,
    };
    drop(a);
    Ok(r)
}

fn service_memory(cli: &Cli) -> anyhow::Result<ServiceMemory> {
    let mut config = Config::default();
    config.apply(Overrides {
        ports: Some(cli.ports.clone()),
        listen: Some((Ipv4Addr::LOCALHOST, 0).into()),
        ..Overrides::default()
    })?;
    let (layout, _) = config.layout()?;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let by_files = u32::try_from(lim.rlim_max.saturating_sub(512) / 2).unwrap_or(u32::MAX);
    let n = cli.service_channels.min(layout.capacity()).min(by_files);
    if n < cli.service_channels {
        eprintln!(
            "whole service: {n} channels (capacity {}, RLIMIT_NOFILE {} allows {by_files})",
            layout.capacity(),
            lim.rlim_max
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let workers = std::thread::available_parallelism().map_or(1, |p| p.get());
        let state = tempfile::tempdir()?;
        let mut config = config.clone();
        config.store.path = state.path().join("homerelay.db");
        let service = DaemonBuilder::new(config).seed(3).build()?.service;
        // One warm-up channel, so the first-use costs (thread-locals, lazily grown tables of
        // the runtime) are not charged to the channels.
        let spec = |i: u32| ChannelSpec {
            legs: [
                LegSpec::default(),
                LegSpec {
                    rtp: Some((Ipv4Addr::new(192, 0, 2, 10), 6000 + (i % 1000) as u16 * 2).into()),
                    strict: true,
                    ..LegSpec::default()
                },
            ],
            ..ChannelSpec::default()
        };
        let (call_id, tag) = ids(u32::MAX);
        let (warm, _) = service
            .allocate(Request::new(call_id, tag, Kind::SipDevice), spec(0))
            .await?;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (heap0, rss0, slab0) = (heap(), rss(), slab());
        let start = Instant::now();
        for i in 0..n - 1 {
            let (call_id, tag) = ids(i);
            service
                .allocate(
                    Request::new(call_id, tag, Kind::SipDevice).with_internet(false),
                    spec(i),
                )
                .await
                .with_context(|| format!("allocating channel {i}"))?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        // Let the event poller run over the full set once (its per-tick buffers count too).
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        let (heap1, rss1, slab1) = (heap(), rss(), slab());
        let in_use = service.pool().await?.status.in_use;
        anyhow::ensure!(in_use == n, "{in_use} channels in use, not {n}");
        let per = |d: i64| d as f64 / f64::from(n - 1);
        let r = ServiceMemory {
            channels: n,
            layout: format!(
                "custom {} ({} port pairs, one relay address)",
                cli.ports,
                layout.slots()
            ),
            relay_workers: workers,
            heap_bytes_per_channel: per(heap1 - heap0),
            rss_bytes_per_channel: per(rss1 - rss0),
            kernel_slab_bytes_per_channel: per(slab1 - slab0),
            allocations_per_s: f64::from(n - 1) / elapsed,
        };
        let _ = warm;
        service.shutdown().await;
        anyhow::Ok(r)
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let allocator = allocator_memory(cli.allocator_channels)?;
    println!(
        "allocator, {} channels ({}): {:.0} heap bytes per channel ({} bytes of ids; {} bytes \
         preallocated when empty), RSS {:.0} bytes per channel; {:.0} allocations/s",
        allocator.channels,
        allocator.layout,
        allocator.heap_bytes_per_channel,
        allocator.id_bytes_per_channel,
        allocator.empty_heap_bytes,
        allocator.rss_bytes_per_channel,
        allocator.allocations_per_s
    );
    let service = service_memory(&cli)?;
    println!(
        "whole service, {} channels ({}, {} relay workers): {:.0} heap bytes per channel, RSS \
         {:.0} bytes per channel, kernel slab ≈ {:.0} bytes per channel; {:.0} allocations/s \
         (in-process, no gRPC)",
        service.channels,
        service.layout,
        service.relay_workers,
        service.heap_bytes_per_channel,
        service.rss_bytes_per_channel,
        service.kernel_slab_bytes_per_channel,
        service.allocations_per_s
    );
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        allocator,
        service,
    };
    if let Some(out) = &cli.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
