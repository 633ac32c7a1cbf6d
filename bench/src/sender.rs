//! The sender: builds every IPv4/UDP/RTP packet itself and hands them to the kernel in batches
//! with `sendmmsg` on raw sockets (`IPPROTO_RAW`, which implies `IP_HDRINCL`), so thousands of
//! calls need no sockets and any source port costs nothing.
//!
//! Pacing: packet `k` of the run is due at `start + k / rate` and belongs to flow
//! `k mod flows`, so with equal-rate flows (calls) every flow gets exactly `rate / flows`
//! packets per second, evenly spread — a perfect timer wheel for identical periods. The
//! thread sends whatever is due, then sleeps (absolute `clock_nanosleep`, 1 ns timer slack)
//! until the next packet is due, at least `min_sleep` later: it never spins, so the CPU it
//! uses is the cost of sending, which keeps the CPU-per-packet figures honest.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::Context;
use serde::Serialize;

use crate::cpu::{self, CpuBusy, CpuSample};
use crate::packet::{self, FlowSpec, IP_PACKET_LEN, Probe};

/// Opens a raw IPv4 socket for sending complete IPv4 packets. Call it inside the sending
/// host's namespace: the socket routes in the namespace it was created in.
pub fn open_raw_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_INET, SOCK_RAW)");
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    setsockopt(&fd, libc::IPPROTO_IP, libc::IP_HDRINCL, &one).context("IP_HDRINCL")?;
    // A large send buffer so a batch never blocks on socket memory (root may force it).
    let sndbuf: libc::c_int = 8 << 20;
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &sndbuf).context("SO_SNDBUFFORCE")?;
    Ok(fd)
}

pub(crate) fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: `value` points to a live `T` of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What the sender does.
#[derive(Debug)]
pub struct SenderConfig {
    /// Flows by id, each with the index of the socket it is sent on.
    pub flows: Vec<(FlowSpec, usize)>,
    pub sockets: Vec<OwnedFd>,
    /// Total packets per second; `None` = as fast as possible.
    pub rate_pps: Option<f64>,
    pub warmup_ns: u64,
    pub duration_ns: u64,
    /// Core to pin the sending thread to.
    pub core: Option<usize>,
    /// Messages per `sendmmsg` call at most.
    pub batch: usize,
    /// Shortest sleep between paced rounds.
    pub min_sleep_ns: u64,
    /// Other tasks whose CPU to measure over the window (the `ksoftirqd` threads).
    pub watch_pids: Vec<i32>,
}

/// What the sender did. Counts are of the measurement window unless said otherwise.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SenderReport {
    /// Packets sent in the measurement window, by flow id.
    #[serde(skip)]
    pub sent_per_flow: Vec<u64>,
    pub sent: u64,
    /// Including warm-up.
    pub sent_total: u64,
    pub send_errors: u64,
    pub sendmmsg_calls: u64,
    pub window_s: f64,
    pub achieved_pps: f64,
    /// How far behind schedule a paced sender fell at worst (µs): large = sender-bound.
    pub max_lag_us: f64,
    /// Busy fraction of every core over the measurement window (`/proc/stat`).
    pub cpu: CpuBusy,
    /// CPU of every thread of the process over the window, by tid (ns).
    #[serde(skip)]
    pub thread_cpu_ns: Vec<(i32, u64)>,
    /// CPU of the watched tasks over the window (ns).
    #[serde(skip)]
    pub watched_cpu_ns: u64,
    #[serde(skip)]
    pub tid: i32,
}

/// One batch for one socket: packet buffers, addresses and the `mmsghdr`s pointing at them.
/// The vectors are allocated once and never resized, so the pointers stay valid.
struct Batch {
    bufs: Vec<[u8; IP_PACKET_LEN]>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    len: usize,
}

// SAFETY: the raw pointers inside `iovs`/`msgs` point into this batch's own heap buffers,
// which move with it; nothing else refers to them.
unsafe impl Send for Batch {}

impl Batch {
    fn new(cap: usize) -> Batch {
        let mut b = Batch {
            bufs: vec![[0u8; IP_PACKET_LEN]; cap],
            // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; cap],
            iovs: Vec::with_capacity(cap),
            msgs: Vec::with_capacity(cap),
            len: 0,
        };
        for i in 0..cap {
            b.iovs.push(libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: IP_PACKET_LEN,
            });
        }
        for i in 0..cap {
            // SAFETY: msghdr is plain data; all-zero is valid (no control data, no flags).
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_name = (&raw mut b.addrs[i]).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = &raw mut b.iovs[i];
            hdr.msg_iovlen = 1;
            b.msgs.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
        b
    }

    fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    fn push(&mut self, flow: &FlowSpec, probe: &Probe) {
        let i = self.len;
        packet::build(&mut self.bufs[i], flow, probe);
        let a = &mut self.addrs[i];
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_port = 0; // ignored by raw IPPROTO_RAW sockets
        a.sin_addr = libc::in_addr {
            s_addr: u32::from_ne_bytes(flow.dst.ip().octets()),
        };
        self.len += 1;
    }

    /// Sends everything queued; returns (syscalls, failed messages).
    fn flush(&mut self, fd: &OwnedFd) -> (u64, u64) {
        let (mut calls, mut errors, mut off) = (0, 0, 0);
        while off < self.len {
            // SAFETY: msgs[off..len] are initialised and point at live buffers and addresses
            // owned by `self`, which outlives the call.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.msgs.as_mut_ptr().add(off),
                    (self.len - off) as libc::c_uint,
                    0,
                )
            };
            calls += 1;
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // The first remaining message failed (e.g. no route): skip it.
                errors += 1;
                off += 1;
            } else {
                off += n as usize;
            }
        }
        self.len = 0;
        (calls, errors)
    }
}

/// Runs the sender on the calling thread (pin it first via `cfg.core`).
pub fn run(cfg: SenderConfig) -> anyhow::Result<SenderReport> {
    if let Some(core) = cfg.core {
        cpu::pin_to(core)?;
    }
    cpu::precise_timers();
    let flows = &cfg.flows;
    let nflows = flows.len() as u64;
    anyhow::ensure!(nflows > 0, "no flows to send");
    let mut batches: Vec<Batch> = cfg.sockets.iter().map(|_| Batch::new(cfg.batch)).collect();
    let mut seq = vec![0u64; flows.len()];
    let mut report = SenderReport {
        sent_per_flow: vec![0; flows.len()],
        tid: cpu::gettid(),
        ..Default::default()
    };
    // At most this many packets per round, so the clock and the deadline are checked often.
    let round = (cfg.batch * 4) as u64;
    let ns_per_packet = cfg.rate_pps.map(|r| 1e9 / r);

    let t0 = cpu::mono_ns();
    let warm_end = t0 + cfg.warmup_ns;
    let end = warm_end + cfg.duration_ns;
    let watched = |pids: &[i32]| -> u64 { pids.iter().filter_map(|p| cpu::task_cpu_ns(*p)).sum() };
    // CPU readings at the start of the measurement window: machine, own threads, watched.
    type WindowStart = (CpuSample, Vec<(i32, u64)>, u64);
    let mut window_start: Option<WindowStart> = None;
    let mut k: u64 = 0;
    loop {
        let now = cpu::mono_ns();
        if now >= end || cpu::interrupted() {
            break;
        }
        let measured = now >= warm_end;
        if measured && window_start.is_none() {
            let w = watched(&cfg.watch_pids);
            window_start = Some((CpuSample::read()?, cpu::all_threads_cpu_ns(), w));
        }
        let due = match ns_per_packet {
            Some(step) => ((now - t0) as f64 / step) as u64 + 1,
            None => k + round,
        };
        if k >= due {
            let step = ns_per_packet.unwrap_or(0.0);
            let next = t0 + (k as f64 * step) as u64;
            cpu::sleep_until(next.max(now + cfg.min_sleep_ns).min(end));
            continue;
        }
        if let Some(step) = ns_per_packet {
            let lag = now.saturating_sub(t0 + (k as f64 * step) as u64);
            report.max_lag_us = report.max_lag_us.max(lag as f64 / 1e3);
        }
        let n = (due - k).min(round);
        for _ in 0..n {
            let f = (k % nflows) as usize;
            let (spec, sock) = &flows[f];
            let probe = Probe {
                flow: f as u32,
                seq: seq[f],
                send_ns: cpu::mono_ns(),
                measured,
            };
            seq[f] += 1;
            if measured {
                report.sent_per_flow[f] += 1;
                report.sent += 1;
            }
            report.sent_total += 1;
            let batch = &mut batches[*sock];
            batch.push(spec, &probe);
            if batch.is_full() {
                let (c, e) = batch.flush(&cfg.sockets[*sock]);
                report.sendmmsg_calls += c;
                report.send_errors += e;
            }
            k += 1;
        }
        for (batch, fd) in batches.iter_mut().zip(&cfg.sockets) {
            if batch.len > 0 {
                let (c, e) = batch.flush(fd);
                report.sendmmsg_calls += c;
                report.send_errors += e;
            }
        }
    }
    let end_sample = CpuSample::read()?;
    let end_threads = cpu::all_threads_cpu_ns();
    let end_watched = watched(&cfg.watch_pids);
    if let Some((start, start_threads, start_watched)) = window_start {
        report.watched_cpu_ns = end_watched.saturating_sub(start_watched);
        report.cpu = start.busy_until(&end_sample);
        report.window_s = report.cpu.window_s;
        report.achieved_pps = if report.window_s > 0.0 {
            report.sent as f64 / report.window_s
        } else {
            0.0
        };
        report.thread_cpu_ns = end_threads
            .iter()
            .map(|&(tid, ns)| {
                let before = start_threads
                    .iter()
                    .find(|(t, _)| *t == tid)
                    .map_or(0, |p| p.1);
                (tid, ns.saturating_sub(before))
            })
            .collect();
    }
    Ok(report)
}
