//! The receiver: an AF_PACKET socket with a TPACKET_V3 ring on each sink interface, read by
//! one pinned thread. It keeps only our probes (IPv4, UDP, 200 bytes, magic) addressed to the
//! flow's expected destination, verifies the IPv4 header and UDP checksums, and keeps per-flow
//! sequence state.
//!
//! The invariant: **a probe counts as delivered only if it arrived with valid checksums, from
//! and to the expected addresses, not as a duplicate, and at most `late_ns` (20 ms by default)
//! after its send time**; everything else sent in the measurement window is lost. Latency is
//! the ring's per-packet kernel receive timestamp minus the send time embedded by the sender
//! (same host, same clock: `CLOCK_REALTIME` stamps are converted to `CLOCK_MONOTONIC`), so it
//! does not include the ring's block-retire delay or the receiver's own scheduling.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;

use crate::cpu;
use crate::histogram::Histogram;
use crate::packet;
use crate::scenario::{Flow, Path};
use crate::sender::setsockopt;

const BLOCK_SIZE: usize = 1 << 20;
/// The ring holds `BLOCK_NR` blocks; the kernel drops a packet only when all of them are
/// waiting for the receiver. Each block fills (about 5,000 small packets) or times out
/// first, so a receiver starved by a busy machine loses nothing for at least
/// `BLOCK_NR * min(BLOCK_TIMEOUT_MS, fill time)`: 6.4 s here, longer than a test's whole run.
const BLOCK_NR: usize = 64;
const FRAME_SIZE: usize = 2048;
/// A block is handed to user space when full or after this many milliseconds. Latency does
/// not depend on it (packets carry the kernel's receive timestamp); a short timeout only
/// makes the ring retire near-empty blocks, and with 2 ms a receiver starved for 64 ms by
/// a CPU-bound neighbour dropped packets (a flaky test).
const BLOCK_TIMEOUT_MS: u32 = 100;
/// Sequence numbers remembered behind the highest one, for duplicate detection.
const WINDOW: u64 = 1024;

/// A TPACKET_V3 receive ring bound to one interface.
#[derive(Debug)]
pub struct Ring {
    fd: OwnedFd,
    map: *mut u8,
    next_block: usize,
}

// SAFETY: the mapping belongs to this ring alone; it is used by one thread at a time.
unsafe impl Send for Ring {}

impl Ring {
    /// Opens a ring on `iface`. Call it inside the interface's namespace.
    pub fn open(iface: &str) -> anyhow::Result<Ring> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: `name` is a valid C string for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {iface}");
        // Protocol 0: receive nothing until bound, so the ring starts clean.
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let v3 = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &v3).context("PACKET_VERSION")?;
        let one: libc::c_int = 1;
        // Office also sends (calls profile): its own outgoing packets are not for us.
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)
            .context("PACKET_IGNORE_OUTGOING")?;
        let req = libc::tpacket_req3 {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: BLOCK_NR as u32,
            tp_frame_size: FRAME_SIZE as u32,
            tp_frame_nr: (BLOCK_SIZE / FRAME_SIZE * BLOCK_NR) as u32,
            tp_retire_blk_tov: BLOCK_TIMEOUT_MS,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req).context("PACKET_RX_RING")?;
        // SAFETY: mapping the ring just configured on `fd`, with its exact size.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BLOCK_SIZE * BLOCK_NR,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_LOCKED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the packet ring");
        }
        let ring = Ring {
            fd,
            map: map.cast(),
            next_block: 0,
        };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid before the fields are set.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        // ETH_P_ALL makes the socket a tap, which sees packets before the sinks' ingress drop
        // (a socket bound to ETH_P_IP would be served after it).
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                ring.fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("binding to {iface}"));
        }
        Ok(ring)
    }

    /// The next block if the kernel has handed it over.
    fn block(&self) -> Option<*mut libc::tpacket_block_desc> {
        // SAFETY: next_block < BLOCK_NR, so the offset is inside the mapping.
        let desc = unsafe { self.map.add(self.next_block * BLOCK_SIZE) }
            .cast::<libc::tpacket_block_desc>();
        // SAFETY: `desc` points at the block header; the kernel writes block_status, so read
        // it volatile, then fence so the packets are read after the status.
        let status = unsafe { std::ptr::read_volatile(&raw const (*desc).hdr.bh1.block_status) };
        std::sync::atomic::fence(Ordering::Acquire);
        (status & libc::TP_STATUS_USER != 0).then_some(desc)
    }

    /// Returns the current block to the kernel and moves on.
    fn release(&mut self, desc: *mut libc::tpacket_block_desc) {
        std::sync::atomic::fence(Ordering::Release);
        // SAFETY: `desc` is the current block header, owned by user space until this write.
        unsafe {
            std::ptr::write_volatile(
                &raw mut (*desc).hdr.bh1.block_status,
                libc::TP_STATUS_KERNEL,
            )
        };
        self.next_block = (self.next_block + 1) % BLOCK_NR;
    }

    /// Packets the kernel dropped because the ring was full (since the last call).
    fn drops(&self) -> u64 {
        // SAFETY: tpacket_stats_v3 is plain data.
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` and `len` are valid for writing; the kernel writes at most `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut st).cast(),
                &mut len,
            )
        };
        if rc == 0 { u64::from(st.tp_drops) } else { 0 }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `open`, not used after this.
        unsafe { libc::munmap(self.map.cast(), BLOCK_SIZE * BLOCK_NR) };
    }
}

/// Sequence and delivery state of one flow (measurement-window packets only are counted).
#[derive(Clone, Debug, Default)]
struct FlowRx {
    max_seq: Option<u64>,
    seen: [u64; (WINDOW / 64) as usize],
    on_time: u64,
    late: u64,
    reordered: u64,
    duplicate: u64,
}

impl FlowRx {
    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Records `seq`; returns (duplicate, reordered).
    fn track(&mut self, seq: u64) -> (bool, bool) {
        let Some(max) = self.max_seq else {
            self.max_seq = Some(seq);
            let (w, b) = Self::bit(seq);
            self.seen[w] |= b;
            return (false, false);
        };
        if seq > max {
            if seq - max >= WINDOW {
                self.seen = Default::default();
            } else {
                for s in max + 1..seq {
                    let (w, b) = Self::bit(s);
                    self.seen[w] &= !b;
                }
            }
            let (w, b) = Self::bit(seq);
            self.seen[w] |= b;
            self.max_seq = Some(seq);
            return (false, false);
        }
        if max - seq >= WINDOW {
            return (false, true); // too old to tell: count it as reordered
        }
        let (w, b) = Self::bit(seq);
        let dup = self.seen[w] & b != 0;
        self.seen[w] |= b;
        (dup, !dup)
    }
}

/// What the sink must see for each flow.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub path: Path,
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
}

impl From<&Flow> for Expect {
    fn from(f: &Flow) -> Self {
        Expect {
            path: f.path,
            src: f.expect_src,
            dst: f.expect_dst,
        }
    }
}

#[derive(Debug)]
pub struct ReceiverConfig {
    /// One ring per sink interface.
    pub rings: Vec<Ring>,
    /// By flow id.
    pub flows: Vec<Expect>,
    pub late_ns: u64,
    pub core: Option<usize>,
    /// Set by the caller once the sender is done and in-flight packets had time to arrive.
    pub stop: Arc<AtomicBool>,
    /// Measurement-window probes of this run's flows seen so far, whatever their fate (on
    /// time, late, duplicate, damaged): the caller stops draining once it reaches what was
    /// sent. Published after every ring block.
    pub arrived: Arc<AtomicU64>,
}

/// Per-path counters of measurement-window probes.
#[derive(Clone, Debug, Default)]
pub struct PathRx {
    pub on_time: u64,
    pub late: u64,
    pub reordered: u64,
    pub duplicate: u64,
    pub bad_ip_checksum: u64,
    pub bad_udp_checksum: u64,
    pub no_udp_checksum: u64,
    /// Our probe, right flow, but wrong source or destination address/port.
    pub misaddressed: u64,
    pub latency: Histogram,
}

#[derive(Debug, Default)]
pub struct ReceiverReport {
    pub paths: [PathRx; 2],
    /// On-time deliveries by flow id.
    pub on_time_per_flow: Vec<u64>,
    /// Probes with a flow id this run does not have.
    pub unknown_flow: u64,
    /// Ring overflows (the receiver could not keep up: results are receiver-bound).
    pub ring_drops: u64,
    /// Packets whose kernel timestamp was unusable; the read time was used instead.
    pub timestamp_fallbacks: u64,
    /// Measurement-window probes of known flows, whatever their fate.
    pub arrived: u64,
    pub tid: i32,
}

/// Runs the receiver on the calling thread until `cfg.stop` is set and the rings are empty.
pub fn run(mut cfg: ReceiverConfig) -> anyhow::Result<ReceiverReport> {
    if let Some(core) = cfg.core {
        cpu::pin_to(core)?;
    }
    let mut flows = vec![FlowRx::default(); cfg.flows.len()];
    let mut report = ReceiverReport {
        tid: cpu::gettid(),
        ..Default::default()
    };
    // Ring timestamps are CLOCK_REALTIME; probes carry CLOCK_MONOTONIC.
    let real_minus_mono = cpu::real_ns() as i64 - cpu::mono_ns() as i64;
    let mut pollfds: Vec<libc::pollfd> = cfg
        .rings
        .iter()
        .map(|r| libc::pollfd {
            fd: r.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let stopping = cfg.stop.load(Ordering::Acquire);
        let mut progressed = false;
        for ring in &mut cfg.rings {
            while let Some(desc) = ring.block() {
                progressed = true;
                // SAFETY: the block is ours until released; headers and packets lie inside
                // it at the offsets the kernel wrote.
                unsafe {
                    let bh = &(*desc).hdr.bh1;
                    let mut off = bh.offset_to_first_pkt as usize;
                    for _ in 0..bh.num_pkts {
                        let hdr = desc.cast::<u8>().add(off).cast::<libc::tpacket3_hdr>();
                        let h = &*hdr;
                        let frame = std::slice::from_raw_parts(
                            hdr.cast::<u8>().add(usize::from(h.tp_mac)),
                            h.tp_snaplen as usize,
                        );
                        let rx_real = u64::from(h.tp_sec) * 1_000_000_000 + u64::from(h.tp_nsec);
                        let rx_ns = (rx_real as i64 - real_minus_mono) as u64;
                        handle(
                            &cfg.flows,
                            &mut flows,
                            &mut report,
                            cfg.late_ns,
                            frame,
                            rx_ns,
                        );
                        off += h.tp_next_offset as usize;
                    }
                }
                ring.release(desc);
                cfg.arrived.store(report.arrived, Ordering::Release);
            }
        }
        if stopping && !progressed {
            break;
        }
        if !progressed {
            // SAFETY: `pollfds` is a valid array of the length passed.
            unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 10) };
        }
    }
    report.ring_drops = cfg.rings.iter().map(Ring::drops).sum();
    report.on_time_per_flow = flows.iter().map(|f| f.on_time).collect();
    Ok(report)
}

fn handle(
    expect: &[Expect],
    flows: &mut [FlowRx],
    report: &mut ReceiverReport,
    late_ns: u64,
    frame: &[u8],
    rx_ns: u64,
) {
    let Some(rx) = packet::parse_frame(frame) else {
        return;
    };
    let id = rx.probe.flow as usize;
    let (Some(exp), Some(state)) = (expect.get(id), flows.get_mut(id)) else {
        report.unknown_flow += 1;
        return;
    };
    let path = &mut report.paths[exp.path.index()];
    let measured = rx.probe.measured;
    if measured {
        report.arrived += 1;
    }
    let count = |c: &mut u64| {
        if measured {
            *c += 1;
        }
    };
    if rx.src != exp.src || rx.dst != exp.dst {
        count(&mut path.misaddressed);
        return;
    }
    if !rx.ip_checksum_ok {
        count(&mut path.bad_ip_checksum);
        return;
    }
    match rx.udp_checksum_ok {
        Some(true) => {}
        Some(false) => {
            count(&mut path.bad_udp_checksum);
            return;
        }
        None => {
            count(&mut path.no_udp_checksum);
            return;
        }
    }
    let (dup, reordered) = state.track(rx.probe.seq);
    if !measured {
        return;
    }
    if dup {
        state.duplicate += 1;
        path.duplicate += 1;
        return;
    }
    if reordered {
        state.reordered += 1;
        path.reordered += 1;
    }
    let mut rx_ns = rx_ns;
    // A kernel stamp before the send time, or far in the future, is not usable.
    if rx_ns < rx.probe.send_ns || rx_ns > rx.probe.send_ns + 60_000_000_000 {
        report.timestamp_fallbacks += 1;
        rx_ns = cpu::mono_ns();
    }
    let latency = rx_ns - rx.probe.send_ns;
    path.latency.record(latency);
    if latency > late_ns {
        state.late += 1;
        path.late += 1;
    } else {
        state.on_time += 1;
        path.on_time += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_tracking_spots_duplicates_and_reordering() {
        let mut f = FlowRx::default();
        assert_eq!(f.track(10), (false, false));
        assert_eq!(f.track(12), (false, false));
        assert_eq!(f.track(11), (false, true));
        assert_eq!(f.track(11), (true, false));
        assert_eq!(f.track(12), (true, false));
        assert_eq!(f.track(10 + WINDOW + 5), (false, false));
        assert_eq!(
            f.track(12),
            (false, true),
            "too old: reordered, not a duplicate"
        );
        // A slot reused after the window moved is not a false duplicate.
        assert_eq!(f.track(11 + WINDOW), (false, true));
    }
}
