//! Whether this kernel loads the fast path and whether it forwards, found out without touching
//! an interface or a running relay: a private copy of the XDP program with maps of its own is
//! loaded (so the verifier has its say), a test channel is installed in those maps, and frames
//! run through the program with `BPF_PROG_TEST_RUN` as if they had arrived on the relay's
//! interfaces. A relay-port frame for the test channel must come out `XDP_TX` (or
//! `XDP_REDIRECT` towards another interface) with addresses, ports, TTL and checksums rewritten
//! exactly as the forwarding rule says; an unknown frame must come out `XDP_PASS`, untouched.
//!
//! The invariant a reader must know: **the probe attaches nothing and shares no map.** Its
//! maps are created under a throw-away pin directory (removed as soon as they exist), never
//! under a relay's pin directory, and `BPF_PROG_TEST_RUN` without live frames neither sends nor
//! receives a packet. Used by `homerelay doctor`.
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};

use aya::maps::{Array, DevMapHash, HashMap, Map, MapData};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use relay_common::{
    CHANNELS_MAP, CONFIG_MAP, COUNTER_COUNT, Channel, ChannelKey, ChannelState, DEFAULT_TTL,
    EGRESS_MAP, Endpoint, Leg, MAX_CHANNELS, MAX_EGRESS_INTERFACES, MAX_NEXTHOPS, NEXTHOPS_MAP,
    Neighbour, NextHopKey, RelayConfig, XDP_PROGRAM,
};

/// `enum xdp_action`.
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The probe's own relay port range (its maps are private, so any range will do).
const PORT_MIN: u16 = 30528;
const PORT_MAX: u16 = 30887;
/// Test addresses (TEST-NET-1/2/3, RFC 5737): map contents only, never a packet on a wire.
const RELAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SENDER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The receiver of run `k` is 203.0.113.(10 + k).
const RECEIVER_BASE: u8 = 10;
/// Documentation MACs (RFC 7042 §2.1.2).
const NEIGHBOUR_MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x53, 0x02];
const OWN_MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x53, 0x01];

/// Where the probe stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeStage {
    /// No bpffs to create the maps in.
    BpfFs,
    /// Creating the maps (and loading BTF).
    Maps,
    /// The verifier refused the program.
    Verify,
    /// Writing the test channel into the probe's maps.
    Setup,
    /// `BPF_PROG_TEST_RUN` failed.
    TestRun,
    /// The program ran but did not do what the forwarding rule says.
    Forwarding,
}

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProbeError {
    pub stage: ProbeStage,
    pub message: String,
    /// The system call's error number, where one caused it (`EPERM`…).
    pub errno: Option<i32>,
}

impl ProbeError {
    fn new(stage: ProbeStage, e: impl Into<anyhow::Error>) -> Self {
        let e: anyhow::Error = e.into();
        let errno = e
            .chain()
            .find_map(|c| c.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error);
        // Each cause once: some errors repeat their source's text in their own.
        let mut parts: Vec<String> = Vec::new();
        for cause in e.chain().map(ToString::to_string) {
            if parts.last().is_none_or(|last| !last.contains(&cause)) {
                parts.push(cause);
            }
        }
        Self {
            stage,
            message: parts.join(": "),
            errno,
        }
    }

    fn forwarding(message: String) -> Self {
        Self {
            stage: ProbeStage::Forwarding,
            message,
            errno: None,
        }
    }
}

/// One frame through the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeRun {
    /// The interface the frame came in on.
    pub ingress: String,
    /// The interface the next hop is on (the same one: `XDP_TX`).
    pub egress: String,
    /// The action for the test channel's frame ([`XDP_TX`] or [`XDP_REDIRECT`]), its output
    /// checked byte for byte.
    pub forwarded: u32,
    /// The action for a frame to a port without a channel ([`XDP_PASS`], output untouched).
    pub unknown: u32,
}

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReport {
    /// Instructions the verifier went through (Linux ≥ 5.16 reports it).
    pub verified_instructions: Option<u32>,
    /// Whether the JIT compiled the program (else the kernel interprets it); `None`: unknown.
    pub jitted: Option<bool>,
    /// Memory the kernel charged for the program and its maps (`memlock` of each descriptor's
    /// fdinfo): what RLIMIT_MEMLOCK (before Linux 5.11) or the memory cgroup must allow.
    pub memory: u64,
    pub runs: Vec<ProbeRun>,
}

/// The name of an XDP action.
pub fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "an unknown action",
    }
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` is plain data; zeroed is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated, `st` is a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// A throw-away pin directory: in the bpffs at `/sys/fs/bpf` if one is mounted there, else on
/// a private bpffs mounted for the probe alone. Removed (unmounted) on drop.
struct ProbeDir {
    path: PathBuf,
    mounted: bool,
}

impl ProbeDir {
    fn create() -> Result<Self, ProbeError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let leaf = format!("homerelay-probe-{}-{n}", std::process::id());
        let root = Path::new("/sys/fs/bpf");
        let bpffs_err = |e: io::Error, what: String| ProbeError {
            stage: ProbeStage::BpfFs,
            errno: e.raw_os_error(),
            message: format!("{what}: {e}"),
        };
        if is_bpffs(root) {
            let path = root.join(leaf);
            std::fs::create_dir(&path)
                .map_err(|e| bpffs_err(e, format!("creating {}", path.display())))?;
            return Ok(Self {
                path,
                mounted: false,
            });
        }
        // No bpffs on /sys/fs/bpf: mount a private one rather than the system's.
        let path = std::env::temp_dir().join(leaf);
        std::fs::create_dir(&path)
            .map_err(|e| bpffs_err(e, format!("creating {}", path.display())))?;
        let (src, target) = (
            std::ffi::CString::new("bpf").map_err(|e| ProbeError::new(ProbeStage::BpfFs, e))?,
            std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|e| ProbeError::new(ProbeStage::BpfFs, e))?,
        );
        // SAFETY: all pointers are valid NUL-terminated strings; data is null.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(bpffs_err(
                e,
                "no bpffs on /sys/fs/bpf, and mounting a private one".into(),
            ));
        }
        Ok(Self {
            path,
            mounted: true,
        })
    }
}

impl Drop for ProbeDir {
    fn drop(&mut self) {
        if self.mounted {
            if let Ok(c) = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()) {
                // SAFETY: `c` is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_dir(&self.path);
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The `memlock:` line of a descriptor's fdinfo.
fn fdinfo_memlock(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::HashMap(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::DevMapHash(d) => Some(d),
        _ => None,
    }
}

/// What the maps of the fast path take in kernel memory, estimated from their capacities and
/// value sizes with the kernel's layouts (preallocated hash elements with a 48-byte header and
/// one spare per CPU, a bucket array of the next power of two, arrays of 8-byte-aligned values,
/// per-CPU counters): the figure to judge limits by when the program cannot be loaded to
/// measure it.
pub fn map_memory_estimate(possible_cpus: u32) -> u64 {
    let cpus = u64::from(possible_cpus.max(1));
    let round8 = |n: usize| (n as u64).next_multiple_of(8);
    let hash = |entries: u32, key: usize, value: usize| {
        let elem = 48 + round8(key) + round8(value);
        elem * (u64::from(entries) + cpus) + u64::from(entries).next_power_of_two() * 16
    };
    let array = |entries: u32, value: usize| u64::from(entries) * round8(value);
    hash(MAX_CHANNELS, size_of::<ChannelKey>(), size_of::<Channel>())
        + array(MAX_CHANNELS, size_of::<ChannelState>())
        + array(1, size_of::<RelayConfig>())
        + u64::from(COUNTER_COUNT) * 8 * cpus
        + u64::from(MAX_EGRESS_INTERFACES).next_power_of_two() * 8
        + hash(
            MAX_NEXTHOPS,
            size_of::<NextHopKey>(),
            size_of::<Neighbour>(),
        )
}

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-1`): per-CPU maps
/// take memory for each.
pub fn possible_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse_cpu_list(&s))
        .unwrap_or(1)
}

/// The number of CPUs in a kernel CPU list (`0-3,8-11`).
pub fn parse_cpu_list(s: &str) -> Option<u32> {
    s.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a).map(|d| d + 1)
            }
            None => part.parse::<u32>().ok().map(|_| 1),
        })
        .sum()
}

/// RFC 1071 ones'-complement sum of `data`, folded.
fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn udp_pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, udp_len: u16) -> u32 {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 17;
    pseudo[10..].copy_from_slice(&udp_len.to_be_bytes());
    ones_sum(0, &pseudo)
}

/// An Ethernet/IPv4/UDP frame with correct checksums.
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let tot_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + usize::from(tot_len));
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[4..6].copy_from_slice(&0x4d2u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = ttl;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&from.0.octets());
    ip[16..20].copy_from_slice(&to.0.octets());
    let check = !(ones_sum(0, &ip) as u16);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&from.1.to_be_bytes());
    udp.extend_from_slice(&to.1.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = !(ones_sum(udp_pseudo_sum(from.0, to.0, udp_len), &udp) as u16);
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// An RTP packet (version 2, PCMU) with a 160-byte payload.
fn rtp_payload() -> Vec<u8> {
    let mut p = vec![0x80, 0x00, 0x12, 0x34];
    p.extend_from_slice(&0x0001_e240u32.to_be_bytes());
    p.extend_from_slice(&0xdead_beefu32.to_be_bytes());
    p.extend((0..160u32).map(|i| (i * 7) as u8));
    p
}

/// The test channel of run `k` on port `port`: the sender latched on leg A, the receiver of
/// run `k` latched on leg B, both legs on [`RELAY`].
fn test_channel(port: u16, receiver: Ipv4Addr) -> Channel {
    let at = |ip: Ipv4Addr, p: u16| SocketAddr::from((ip, p));
    Channel {
        legs: [
            Leg::new(
                at(RELAY, port),
                Endpoint::new(at(SENDER, 5004), true),
                Endpoint::new(at(SENDER, 5005), true),
            ),
            Leg::new(
                at(RELAY, port),
                Endpoint::new(at(receiver, 6000), true),
                Endpoint::new(at(receiver, 6001), true),
            ),
        ],
        ..Channel::default()
    }
}

/// What is wrong with `out`, the program's output for `input` forwarded to `receiver:6000`
/// from `RELAY:port`; `None` when it is exactly right.
fn check_forwarded(input: &[u8], out: &[u8], port: u16, receiver: Ipv4Addr) -> Option<String> {
    if out.len() != input.len() {
        return Some(format!(
            "the frame changed length ({} → {} bytes)",
            input.len(),
            out.len()
        ));
    }
    let ip = &out[14..34];
    let udp = &out[34..];
    let mut wrong = Vec::new();
    if out[..6] != NEIGHBOUR_MAC || out[6..12] != OWN_MAC {
        wrong.push("Ethernet addresses not the next hop's");
    }
    if ip[12..16] != RELAY.octets() || ip[16..20] != receiver.octets() {
        wrong.push("IP addresses not rewritten");
    }
    if ip[8] != DEFAULT_TTL {
        wrong.push("TTL not set");
    }
    if ones_sum(0, ip) != 0xffff {
        wrong.push("IPv4 header checksum wrong");
    }
    if udp[..2] != port.to_be_bytes() || udp[2..4] != 6000u16.to_be_bytes() {
        wrong.push("UDP ports not rewritten");
    }
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
    if ones_sum(udp_pseudo_sum(RELAY, receiver, udp_len), udp) != 0xffff {
        wrong.push("UDP checksum wrong");
    }
    if udp[8..] != input[42..] {
        wrong.push("payload changed");
    }
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

/// Runs one frame through `program` as if it had arrived on `ingress_ifindex`.
fn test_run(
    program: &Xdp,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<(u32, Vec<u8>), ProbeError> {
    let len = u32::try_from(frame.len()).map_err(|e| ProbeError::new(ProbeStage::TestRun, e))?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. The kernel requires data = data_meta = 0 and data_end = len.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&len.to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let result = program
        .test_run(opts)
        .map_err(|e| ProbeError::new(ProbeStage::TestRun, e))?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

fn setup<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl Fn(E) -> ProbeError {
    move |e| ProbeError::new(ProbeStage::Setup, anyhow::Error::new(e).context(what))
}

/// Loads a private copy of the program and runs frames through it as if they had arrived on
/// `interfaces` (names in the calling thread's network namespace; at least one): on each, a
/// frame of a test channel whose next hop is on the following interface (the same one when
/// there is only one: `XDP_TX`), and a frame to a port without a channel.
pub fn probe(interfaces: &[String]) -> Result<ProbeReport, ProbeError> {
    let indexes = interfaces
        .iter()
        .map(|name| {
            crate::xdp_links::ifindex(name).ok_or_else(|| {
                ProbeError::new(
                    ProbeStage::Setup,
                    anyhow::anyhow!("no interface {name:?} in this network namespace"),
                )
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    if indexes.is_empty() {
        return Err(ProbeError::new(
            ProbeStage::Setup,
            anyhow::anyhow!("no interface to run frames on"),
        ));
    }
    let dir = ProbeDir::create()?;
    let loaded = EbpfLoader::new()
        .default_map_pin_directory(&dir.path)
        .load(crate::xdp::OBJECT);
    // The maps live on while this process holds them; their pins are not needed.
    drop(dir);
    let mut ebpf: Ebpf = loaded.map_err(|e| ProbeError::new(ProbeStage::Maps, e))?;
    let mut memory: u64 = ebpf
        .maps()
        .filter_map(|(_, m)| map_data(m))
        .filter_map(|d| fdinfo_memlock(d.fd().as_fd()))
        .sum();

    let take = |ebpf: &mut Ebpf, name: &'static str| {
        ebpf.take_map(name).ok_or_else(|| {
            ProbeError::new(
                ProbeStage::Setup,
                anyhow::anyhow!("map {name} missing from the object"),
            )
        })
    };
    let mut channels: HashMap<MapData, ChannelKey, Channel> =
        HashMap::try_from(take(&mut ebpf, CHANNELS_MAP)?).map_err(setup("the channel map"))?;
    let mut nexthops: HashMap<MapData, NextHopKey, Neighbour> =
        HashMap::try_from(take(&mut ebpf, NEXTHOPS_MAP)?).map_err(setup("the next-hop map"))?;
    let mut config: Array<MapData, RelayConfig> =
        Array::try_from(take(&mut ebpf, CONFIG_MAP)?).map_err(setup("the configuration map"))?;
    let mut egress: DevMapHash<MapData> =
        DevMapHash::try_from(take(&mut ebpf, EGRESS_MAP)?).map_err(setup("the egress map"))?;

    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .ok_or_else(|| {
            ProbeError::new(
                ProbeStage::Setup,
                anyhow::anyhow!("program {XDP_PROGRAM} missing from the object"),
            )
        })?
        .try_into()
        .map_err(|e| ProbeError::new(ProbeStage::Setup, e))?;
    program
        .load()
        .map_err(|e| ProbeError::new(ProbeStage::Verify, e))?;
    if let Ok(fd) = program.fd() {
        memory += fdinfo_memlock(fd.as_fd()).unwrap_or(0);
    }
    let info = program.info().ok();
    let verified_instructions = info.as_ref().and_then(|i| i.verified_instruction_count());
    let jitted = info.as_ref().map(|i| i.size_jitted() > 0);

    config
        .set(0, RelayConfig::new(PORT_MIN, PORT_MAX), 0)
        .map_err(setup("writing the configuration"))?;
    for &idx in &indexes {
        egress
            .insert(idx, idx, None, 0)
            .map_err(setup("adding an interface to the egress map"))?;
    }
    let n = indexes.len();
    let mut runs = Vec::with_capacity(n);
    let payload = rtp_payload();
    for k in 0..n {
        let (ingress, out_k) = (indexes[k], (k + 1) % n);
        let port = PORT_MIN + 2 * k as u16;
        let receiver = Ipv4Addr::new(203, 0, 113, RECEIVER_BASE + k as u8);
        channels
            .insert(ChannelKey::for_port(port), test_channel(port, receiver), 0)
            .map_err(setup("installing the test channel"))?;
        nexthops
            .insert(
                NextHopKey {
                    saddr: u32::from_ne_bytes(RELAY.octets()),
                    daddr: u32::from_ne_bytes(receiver.octets()),
                },
                Neighbour {
                    dmac: NEIGHBOUR_MAC,
                    smac: OWN_MAC,
                    ifindex: indexes[out_k],
                    mtu: 1500,
                    reserved: [0; 2],
                },
                0,
            )
            .map_err(setup("writing the test next hop"))?;
        let input = frame(
            NEIGHBOUR_MAC,
            OWN_MAC,
            (SENDER, 5004),
            (RELAY, port),
            57,
            &payload,
        );
        let (forwarded, out) = test_run(program, &input, ingress)?;
        let expected = if out_k == k { XDP_TX } else { XDP_REDIRECT };
        if forwarded != expected {
            return Err(ProbeError::forwarding(format!(
                "a frame for the test channel arriving on {} came out {}, not {}",
                interfaces[k],
                action_name(forwarded),
                action_name(expected)
            )));
        }
        if let Some(wrong) = check_forwarded(&input, &out, port, receiver) {
            return Err(ProbeError::forwarding(format!(
                "a frame forwarded from {} to {}: {wrong}",
                interfaces[k], interfaces[out_k]
            )));
        }
        // No run installs a channel on this port.
        let unknown_port = PORT_MIN + 2 * n as u16;
        let input = frame(
            NEIGHBOUR_MAC,
            OWN_MAC,
            (SENDER, 5004),
            (RELAY, unknown_port),
            57,
            &payload,
        );
        let (unknown, out) = test_run(program, &input, ingress)?;
        if unknown != XDP_PASS || out != input {
            return Err(ProbeError::forwarding(format!(
                "a frame to a port without a channel arriving on {} came out {}{}, not \
                 XDP_PASS untouched",
                interfaces[k],
                action_name(unknown),
                if out == input { "" } else { " changed" }
            )));
        }
        runs.push(ProbeRun {
            ingress: interfaces[k].clone(),
            egress: interfaces[out_k].clone(),
            forwarded,
            unknown,
        });
    }
    Ok(ProbeReport {
        verified_instructions,
        jitted,
        memory,
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_carry_valid_checksums() {
        let f = frame(
            OWN_MAC,
            NEIGHBOUR_MAC,
            (SENDER, 5004),
            (RELAY, 30528),
            64,
            &rtp_payload(),
        );
        assert_eq!(ones_sum(0, &f[14..34]), 0xffff);
        let udp_len = u16::from_be_bytes([f[38], f[39]]);
        assert_eq!(
            ones_sum(udp_pseudo_sum(SENDER, RELAY, udp_len), &f[34..]),
            0xffff
        );
    }

    #[test]
    fn the_forwarding_check_names_what_is_wrong() {
        let receiver = Ipv4Addr::new(203, 0, 113, 10);
        let input = frame(
            NEIGHBOUR_MAC,
            OWN_MAC,
            (SENDER, 5004),
            (RELAY, 30528),
            57,
            &rtp_payload(),
        );
        let right = frame(
            OWN_MAC,
            NEIGHBOUR_MAC,
            (RELAY, 30528),
            (receiver, 6000),
            DEFAULT_TTL,
            &rtp_payload(),
        );
        assert_eq!(check_forwarded(&input, &right, 30528, receiver), None);
        let mut bad_udp = right.clone();
        bad_udp[40] ^= 1;
        assert_eq!(
            check_forwarded(&input, &bad_udp, 30528, receiver).as_deref(),
            Some("UDP checksum wrong")
        );
        let wrong = check_forwarded(&input, &input, 30528, receiver).expect("not forwarded");
        assert!(wrong.contains("IP addresses not rewritten"), "{wrong}");
        assert!(check_forwarded(&input, &right[..60], 30528, receiver).is_some());
    }

    #[test]
    fn probe_errors_name_each_cause_once_and_keep_the_errno() {
        let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::EPERM))
            .context("failed to create map `HR_CHAN_STATE`")
            .context("failed to create map `HR_CHAN_STATE`")
            .context("map error");
        let p = ProbeError::new(ProbeStage::Maps, e);
        assert_eq!(p.errno, Some(libc::EPERM));
        assert_eq!(
            p.message,
            "map error: failed to create map `HR_CHAN_STATE`: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_map_estimate_is_dominated_by_the_channel_tables() {
        // 32,768 channels (hash and state array) and 65,536 next hops: about 20 MiB.
        let two = map_memory_estimate(2);
        assert!((18 << 20..24 << 20).contains(&two), "{two}");
        assert!(map_memory_estimate(64) > two);
    }
}
