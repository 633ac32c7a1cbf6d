//! The benchmark's only contact with homerelay's relay API (`relay_user::relay`,
//! `relay_user::xdp`): start the relay inside Relay's namespace with the benchmark's port
//! range, install one latched channel per call, attach XDP_PASS programs to the peer veths in
//! native mode, read the fast path's counters, stop. When that API changes, only this file
//! changes.
//!
//! Every run pins the relay's maps in a directory of its own (and removes it afterwards):
//! the default pin directory is shared with anything else running on the machine, and a relay
//! adopts the channels it finds pinned there.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use relay_common::Channel;
use relay_user::DataPath;
use relay_user::netns::{self, Host, Testbed};
use relay_user::relay::{Relay, RelayOptions};
use relay_user::xdp::{XdpMode, XdpOptions, attach_pass_program};
use serde::Serialize;

use crate::bpfstats::{self, ProgStats, StatsEnabled};
use crate::cpu;

/// Which of homerelay's data paths to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayKind {
    /// Socket relay only (no XDP program).
    Userspace,
    /// XDP in driver mode on the relay's veths, socket relay behind it.
    XdpNative,
    /// XDP in generic (skb) mode, socket relay behind it.
    XdpGeneric,
}

/// How to start the relay.
#[derive(Clone, Debug)]
pub struct RelayParams {
    pub port_min: u16,
    pub port_max: u16,
    pub workers: usize,
    /// Core for the relay's threads (they inherit the starting thread's affinity).
    pub core: Option<usize>,
    /// Channels to install, by even relay port, both legs latched.
    pub channels: Vec<(u16, Channel)>,
    /// Enable BPF run-time statistics for this run and report ns per program run.
    pub bpf_stats: bool,
}

/// What the relay reported at the end of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayReport {
    /// Interfaces and the XDP mode that actually attached.
    pub xdp_attachments: Vec<(String, String)>,
    /// Fast-path counters by name (XDP modes; only non-zero ones).
    pub xdp_counters: Vec<(String, u64)>,
    /// Packets the relay counted as forwarded, over all channels and both directions.
    pub channel_packets: u64,
    /// XDP program cost from `bpf_stats` (only when asked for).
    pub xdp_ns_per_packet: Option<f64>,
    pub xdp_prog_runs: Option<u64>,
    /// Reference point from the same run (native mode): ns per run of the empty XDP_PASS
    /// program on Office's veth.
    pub xdp_pass_ns_per_packet: Option<f64>,
}

/// Why the relay modes cannot run in this build, if they cannot.
pub fn unavailable_reason() -> Option<&'static str> {
    None
}

/// The relay's interfaces the fast path attaches to.
const RELAY_IFACES: [&str; 2] = [netns::RELAY_IF_HOME, netns::RELAY_IF_OFFICE];

/// Keeps something alive on a thread inside a namespace until told to finish (XDP_PASS guards
/// and the relay need not be `Send`).
#[derive(Debug)]
struct Holder<T> {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<T>>>,
}

impl<T: Send + 'static> Holder<T> {
    /// Runs `setup` in `host`; once it succeeded, waits for the stop signal and then runs
    /// `finish` on what `setup` made.
    fn start<S: 'static>(
        tb: &Testbed,
        host: Host,
        setup: impl FnOnce() -> anyhow::Result<S> + Send + 'static,
        finish: impl FnOnce(S) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<Holder<T>> {
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let handle = tb.spawn_in(host, move || {
            let state = setup()?;
            let _ = ready_tx.send(());
            let _ = stop_rx.recv();
            finish(state)
        });
        if ready_rx.recv().is_err() {
            return match handle.join() {
                Ok(Err(e)) => Err(e),
                _ => bail!("setup thread in {host:?} died"),
            };
        }
        Ok(Holder {
            stop: Some(stop_tx),
            handle: Some(handle),
        })
    }

    fn finish(mut self) -> anyhow::Result<T> {
        drop(self.stop.take());
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => bail!("holder thread panicked"),
        }
    }
}

impl<T> Drop for Holder<T> {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A running relay and what keeps the fast path working around it.
#[derive(Debug)]
pub struct RunningRelay {
    // Field order is drop order: the relay goes before the peers' XDP_PASS programs.
    relay: Option<Holder<RelayReport>>,
    pass: Vec<Holder<()>>,
    tids: Vec<i32>,
    bpf: Option<BpfWatch>,
    pin_dir: PathBuf,
}

/// Program statistics being collected: the relay's programs and the peers' pass programs.
#[derive(Debug)]
struct BpfWatch {
    guard: StatsEnabled,
    relay: (Vec<u32>, ProgStats),
    pass: Option<(Vec<u32>, ProgStats)>,
}

impl RunningRelay {
    /// The relay's own threads (created by `Relay::start`).
    pub fn thread_ids(&self) -> &[i32] {
        &self.tids
    }

    /// Stops the relay and returns what it counted.
    pub fn stop(mut self) -> anyhow::Result<RelayReport> {
        let bpf = match self.bpf.take() {
            Some(w) => {
                let after = ProgStats::read(&w.relay.0);
                let pass = w.pass.map(|(ids, before)| (before, ProgStats::read(&ids)));
                drop(w.guard);
                Some((w.relay.1, after?, pass))
            }
            None => None,
        };
        let mut report = match self.relay.take() {
            Some(r) => r.finish()?,
            None => RelayReport::default(),
        };
        for p in self.pass.drain(..) {
            p.finish()?;
        }
        if let Some((before, after, pass)) = bpf {
            report.xdp_ns_per_packet = before.ns_per_run_until(&after);
            report.xdp_prog_runs = Some(after.run_cnt.saturating_sub(before.run_cnt));
            if let Some((before, Ok(after))) = pass {
                report.xdp_pass_ns_per_packet = before.ns_per_run_until(&after);
            }
        }
        Ok(report)
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        drop(self.relay.take());
        self.pass.clear();
        // Unpin this run's maps (removing a bpffs file unpins it).
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Removes pin directories left by `rtp-load` processes that no longer exist (killed before
/// they could clean up).
pub fn remove_stale_pin_dirs() {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("rtp-load-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Starts homerelay in Relay's namespace and installs `p.channels`.
pub fn start(tb: &Testbed, kind: RelayKind, p: RelayParams) -> anyhow::Result<RunningRelay> {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let mode = match kind {
        RelayKind::Userspace => None,
        RelayKind::XdpNative => Some(XdpMode::Native),
        RelayKind::XdpGeneric => Some(XdpMode::Generic),
    };
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/rtp-load-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let mut running = RunningRelay {
        relay: None,
        pass: Vec::new(),
        tids: Vec::new(),
        bpf: None,
        pin_dir: pin_dir.clone(),
    };
    // Native mode on veth: the receiving peer needs an XDP program of its own, or redirected
    // frames are dropped.
    if mode == Some(XdpMode::Native) {
        for iface in RELAY_IFACES {
            let peer = netns::relay_peer(iface).context("relay interface without a peer")?;
            let h = Holder::start(
                tb,
                peer.host,
                move || attach_pass_program(peer.iface, XdpMode::Native),
                |_guard| Ok(()),
            )
            .with_context(|| format!("attaching XDP_PASS to {}", peer.iface))?;
            running.pass.push(h);
        }
    }
    let bpf_guard = if p.bpf_stats && mode.is_some() {
        Some(StatsEnabled::enable()?)
    } else {
        None
    };
    let (tids_tx, tids_rx) = mpsc::channel();
    let relay = Holder::start(
        tb,
        Host::Relay,
        move || {
            if let Some(core) = p.core {
                cpu::pin_to(core)?;
            }
            let before: Vec<i32> = cpu::all_threads_cpu_ns().iter().map(|t| t.0).collect();
            let xdp = mode.map(|mode| XdpOptions {
                interfaces: RELAY_IFACES.iter().map(|s| s.to_string()).collect(),
                mode,
                pin_dir: Some(pin_dir),
            });
            let relay = Relay::start(RelayOptions {
                port_min: p.port_min,
                port_max: p.port_max,
                workers: p.workers,
                xdp,
                require_xdp: true,
                events: None,
            })
            .context("starting the relay")?;
            let tids: Vec<i32> = cpu::all_threads_cpu_ns()
                .iter()
                .map(|t| t.0)
                .filter(|t| !before.contains(t))
                .collect();
            let _ = tids_tx.send(tids);
            let mut ports = Vec::with_capacity(p.channels.len());
            for (port, ch) in &p.channels {
                relay
                    .install(*port, ch)
                    .with_context(|| format!("installing channel {port}"))?;
                ports.push(*port);
            }
            Ok((relay, ports))
        },
        |(relay, ports): (Relay, Vec<u16>)| {
            let mut report = RelayReport::default();
            if let Some(xdp) = relay.xdp() {
                report.xdp_attachments = xdp
                    .attachments()
                    .iter()
                    .map(|a| (a.interface.clone(), a.mode.name().to_owned()))
                    .collect();
                report.xdp_counters = xdp
                    .counters()?
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(c, n)| (c.name().to_owned(), n))
                    .collect();
            }
            for port in &ports {
                let st = relay.stats(*port)?;
                report.channel_packets += st.from_leg.iter().map(|d| d.packets).sum::<u64>();
            }
            Ok(report)
        },
    )?;
    running.relay = Some(relay);
    running.tids = tids_rx.try_recv().unwrap_or_default();
    if let Some(guard) = bpf_guard {
        let ids = bpfstats::xdp_prog_ids(tb, Host::Relay, &RELAY_IFACES)?;
        anyhow::ensure!(
            !ids.is_empty(),
            "no XDP program found on the relay interfaces"
        );
        let before = ProgStats::read(&ids)?;
        let pass = if mode == Some(XdpMode::Native) {
            let ids = bpfstats::xdp_prog_ids(tb, Host::Office, &[netns::OFFICE_IF])?;
            let before = ProgStats::read(&ids)?;
            Some((ids, before))
        } else {
            None
        };
        running.bpf = Some(BpfWatch {
            guard,
            relay: (ids, before),
            pass,
        });
    }
    Ok(running)
}
