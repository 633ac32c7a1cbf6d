//! The XDP fast path seen from user space: loads the program, attaches it, owns its maps.
//!
//! Invariant: the maps named in `relay_common` are pinned under a bpffs directory (default
//! `/sys/fs/bpf/homerelay`), so channels survive a restart of the process; a new process reuses
//! them and [`XdpDataPath::channels`] lists what it finds. The program itself is detached when
//! the [`XdpDataPath`] is dropped: user space owns the decision to run the fast path.
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    ffi::CString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use relay_common::{
    CHANNEL_STATS_MAP, CHANNELS_MAP, CONFIG_MAP, COUNTERS_MAP, Channel, ChannelKey, ChannelState,
    ChannelStats, Counter, EGRESS_MAP, NEXTHOPS_MAP, Neighbour, NextHopKey, RelayConfig,
    XDP_PROGRAM, channel_index,
};

use crate::datapath::{DataPath, DataPathError};
use crate::nexthop::{Resolver, Unresolved};

/// The compiled XDP object, built by `build.rs`.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay-ebpf"));

/// Name of the always-pass program in the object.
const PASS_PROGRAM: &str = "homerelay_pass";

/// Default directory for pinned maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/homerelay";

/// How to attach the program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode; fail if the driver does not support it.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Generic,
    /// Native, falling back to generic per interface (the log says which and why).
    #[default]
    Auto,
}

impl XdpMode {
    /// A stable lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Auto => "auto",
        }
    }
}

impl std::str::FromStr for XdpMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "native" | "driver" => Ok(XdpMode::Native),
            "generic" | "skb" => Ok(XdpMode::Generic),
            "auto" => Ok(XdpMode::Auto),
            _ => bail!("unknown XDP mode {s:?} (expected native, generic or auto)"),
        }
    }
}

/// Where and how to run the fast path.
#[derive(Clone, Debug)]
pub struct XdpOptions {
    /// Interfaces to attach to (the relay's Internet- and LAN-facing interfaces).
    pub interfaces: Vec<String>,
    pub mode: XdpMode,
    /// bpffs directory for the pinned maps; `None` = [`DEFAULT_PIN_DIR`].
    pub pin_dir: Option<PathBuf>,
}

impl Default for XdpOptions {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            mode: XdpMode::Auto,
            pin_dir: None,
        }
    }
}

/// One attached interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    /// `Native` or `Generic`: what actually worked.
    pub mode: XdpMode,
}

struct Maps {
    channels: HashMap<MapData, ChannelKey, Channel>,
    state: Array<MapData, ChannelState>,
}

impl Maps {
    fn zero_state(&mut self, port: u16) -> Result<(), DataPathError> {
        self.state
            .set(channel_index(port), ChannelState::default(), 0)
            .map_err(|source| DataPathError::Map {
                map: CHANNEL_STATS_MAP,
                source,
            })
    }

    /// Writes the channel; the flag says whether an element was freed (a value replaced).
    fn write_channel(&mut self, port: u16, channel: &Channel) -> (Result<(), DataPathError>, bool) {
        let key = ChannelKey::for_port(port);
        // Replacing a value frees the old element (into the map's free list); adding a key
        // frees nothing.
        let replaces = self.channels.get(&key, 0).is_ok();
        let r = self
            .channels
            .insert(key, *channel, 0)
            .map_err(|source| DataPathError::Map {
                map: CHANNELS_MAP,
                source,
            });
        let failed = r.is_err();
        (r, replaces || failed)
    }

    fn delete_channel(&mut self, port: u16) -> (Result<(), DataPathError>, bool) {
        let r = self
            .channels
            .remove(&ChannelKey::for_port(port))
            .map_err(|_| DataPathError::NotFound(port));
        (r, true)
    }
}

/// The (relay address, destination) pairs the fast path needs next hops for to forward `ch`:
/// one per latched IPv4 endpoint of a leg with an IPv4 relay address to send from.
pub fn next_hop_keys(ch: &Channel) -> impl Iterator<Item = NextHopKey> + '_ {
    ch.legs.iter().flat_map(|leg| {
        [leg.rtp, leg.rtcp]
            .into_iter()
            .filter(move |ep| {
                ep.is_latched()
                    && ep.addr.is_ipv4()
                    && leg.local_addr.is_ipv4()
                    && !leg.local_addr.is_unspecified()
            })
            .map(move |ep| NextHopKey {
                saddr: leg.local_addr.ipv4_raw(),
                daddr: ep.addr.ipv4_raw(),
            })
    })
}

/// A destination the fast path cannot send to, and why (see [`XdpDataPath::unresolved`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnresolvedNextHop {
    /// The relay address packets are sent from.
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub why: Unresolved,
}

/// The next-hop map with what user space knows about each pair it resolved.
struct NextHops {
    map: HashMap<MapData, NextHopKey, Neighbour>,
    resolver: Resolver,
    /// What the map holds (read at load, then kept in step with every write).
    present: StdHashMap<NextHopKey, Neighbour>,
    /// Pairs that could not be resolved at the last attempt.
    unresolved: StdHashMap<NextHopKey, Unresolved>,
    /// Whether the last write replaced or deleted an element (see [`rcu_grace_period`]).
    freed: bool,
}

impl NextHops {
    /// Writes `key`'s resolution into the map if it changed.
    fn apply(&mut self, key: NextHopKey, r: Result<Neighbour, Unresolved>) {
        match r {
            Ok(hop) => {
                self.unresolved.remove(&key);
                if self.present.get(&key) == Some(&hop) {
                    return;
                }
                if std::mem::take(&mut self.freed) {
                    rcu_grace_period();
                }
                let replaces = self.present.contains_key(&key);
                match self.map.insert(key, hop, 0) {
                    Ok(()) => {
                        self.present.insert(key, hop);
                        self.freed = replaces;
                    }
                    Err(e) => {
                        log::warn!("cannot write a next hop into the fast path: {e}");
                        self.freed = true;
                    }
                }
            }
            Err(why) => {
                self.unresolved.insert(key, why);
                self.delete(key);
            }
        }
    }

    fn delete(&mut self, key: NextHopKey) {
        if self.present.remove(&key).is_some() {
            // The map entry goes whether or not the delete reports an error (already gone).
            let _ = self.map.remove(&key);
            self.freed = true;
        }
    }

    /// Resolves `keys` now, with fresh link and neighbour tables, and writes them.
    fn ensure(&mut self, keys: impl IntoIterator<Item = NextHopKey>) {
        if let Err(e) = self.resolver.refresh() {
            log::warn!("reading the routing tables: {e}");
        }
        for key in keys {
            let r = self.resolver.resolve(key);
            self.apply(key, r);
        }
    }

    /// Resolves every pair in `wanted` and removes every other entry.
    fn sync(&mut self, wanted: &HashSet<NextHopKey>) {
        self.ensure(wanted.iter().copied());
        let stale: Vec<NextHopKey> = self
            .present
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in stale {
            self.delete(key);
        }
        self.unresolved.retain(|k, _| wanted.contains(k));
        self.resolver.retain(|k| wanted.contains(k));
    }
}

/// Waits for an RCU grace period: `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()`
/// in the kernel, and every XDP program run is an RCU read-side critical section. Where the
/// command is refused (`nohz_full` kernels), a generous sleep stands in for it.
fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integer arguments and touches no memory of this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_long,
        )
    };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// An exclusive `flock` on the pin directory, held while the fast path runs: two processes
/// writing one set of pinned maps would undo each other's channels.
fn lock_pin_dir(dir: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .with_context(|| format!("opening pin directory {}", dir.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "pin directory {} is in use by another homerelay process (or relay) on this \
                 host; give each relay its own pin directory",
                dir.display()
            );
        }
        return Err(e).with_context(|| format!("locking pin directory {}", dir.display()));
    }
    Ok(file.into())
}

/// How often the next-hop map is refreshed from the kernel's routing and neighbour tables and
/// the per-channel next-hop caches are invalidated (the program then reads the map again on the
/// next packet of each direction): the longest a changed route or neighbour MAC can be ignored
/// by the fast path, and the longest a newly resolved neighbour waits to be used.
pub const FIB_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// How often at most the fast path's degradation is logged as a warning.
const DEGRADED_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Pass reasons that are a problem of the host (routing, neighbours, interfaces), not of the
/// traffic: packets of installed, latched channels that user space had to carry.
pub const HOST_PASS_REASONS: [Counter; 3] = [
    Counter::PassNoNeighbour,
    Counter::PassFibFailed,
    Counter::PassEgressUnavailable,
];

/// What the refresher thread shares with the data path.
struct Shared {
    maps: Arc<Mutex<Maps>>,
    nexthops: Arc<Mutex<NextHops>>,
    counters: Arc<PerCpuArray<MapData, u64>>,
}

/// Every [`FIB_REFRESH`]: resolves the next hops of every channel in the map, writes them, then
/// bumps the configuration's FIB generation; warns (rate-limited) while the fast path passes
/// packets up for host reasons. Stops when dropped.
struct FibRefresher {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each operation under these locks is one syscall or a completed table update, so a
    // poisoned lock still guards consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn host_passes(counters: &PerCpuArray<MapData, u64>) -> [u64; 3] {
    HOST_PASS_REASONS.map(|c| {
        counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    })
}

impl Shared {
    fn refresh(&self) {
        let wanted: HashSet<NextHopKey> = {
            let maps = lock(&self.maps);
            maps.channels
                .iter()
                .filter_map(Result::ok)
                .flat_map(|(_, ch)| next_hop_keys(&ch).collect::<Vec<_>>())
                .collect()
        };
        lock(&self.nexthops).sync(&wanted);
    }
}

impl FibRefresher {
    fn start(
        shared: Shared,
        mut config: Array<MapData, RelayConfig>,
        mut current: RelayConfig,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hr-fib-refresh".into())
            .spawn(move || {
                let mut passed = host_passes(&shared.counters);
                let mut last_warning: Option<Instant> = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(FIB_REFRESH)
                {
                    shared.refresh();
                    current.fib_generation = current.fib_generation.wrapping_add(1).max(1);
                    if let Err(e) = config.set(0, current, 0) {
                        log::warn!("cannot refresh the fast path's next hops: {e}");
                    }
                    let now = host_passes(&shared.counters);
                    let delta: Vec<String> = HOST_PASS_REASONS
                        .iter()
                        .zip(now.iter().zip(passed))
                        .filter(|(_, (n, p))| *n > p)
                        .map(|(c, (n, p))| format!("{} {}", n - p, c.name()))
                        .collect();
                    passed = now;
                    let unresolved: Vec<String> = lock(&shared.nexthops)
                        .unresolved
                        .iter()
                        .take(4)
                        .map(|(k, why)| {
                            let (s, d) = (
                                Ipv4Addr::from(k.saddr.to_ne_bytes()),
                                Ipv4Addr::from(k.daddr.to_ne_bytes()),
                            );
                            format!("{s} -> {d}: {why}")
                        })
                        .collect();
                    if (delta.is_empty() && unresolved.is_empty())
                        || last_warning.is_some_and(|t| t.elapsed() < DEGRADED_LOG_INTERVAL)
                    {
                        continue;
                    }
                    last_warning = Some(Instant::now());
                    log::warn!(
                        "fast path degraded: packets of installed channels passed up to user                          space for host reasons in the last {FIB_REFRESH:?} [{}]; unresolved next                          hops [{}] (warned at most every {DEGRADED_LOG_INTERVAL:?})",
                        delta.join(", "),
                        unresolved.join("; ")
                    );
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for FibRefresher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The loaded and attached XDP program with its maps.
pub struct XdpDataPath {
    maps: Arc<Mutex<Maps>>,
    nexthops: Arc<Mutex<NextHops>>,
    /// Serialises writes to the channel map and says whether the last one may have freed an
    /// element a running program still reads ([`XdpDataPath::write`]). Separate from `maps`,
    /// so readers (counters, the Handover policy's look-ups from a worker) never wait for a
    /// grace period.
    writes: Mutex<bool>,
    counters: Arc<PerCpuArray<MapData, u64>>,
    // Declared before the maps' users are gone: dropping it joins the refresher thread.
    fib_refresher: Option<FibRefresher>,
    attachments: Vec<Attachment>,
    pin_dir: PathBuf,
    port_min: u16,
    port_max: u16,
    // Declared last: dropping it detaches the program, after the maps above are released.
    ebpf: Mutex<Ebpf>,
    links: Vec<XdpLinkId>,
    /// The network namespace the program was attached in: detaching (netlink, for kernels or
    /// drivers without XDP links) must happen there, whichever thread drops this.
    netns: Option<std::fs::File>,
    /// The exclusive lock on the pin directory; released last.
    _pin_lock: std::os::fd::OwnedFd,
}

impl std::fmt::Debug for XdpDataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpDataPath")
            .field("attachments", &self.attachments)
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("invalid interface name {name:?}");
    }
    let c = CString::new(name).with_context(|| format!("invalid interface name {name:?}"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {name:?} in this network namespace");
    }
    Ok(idx)
}

/// Mounts a bpffs at `/sys/fs/bpf` if none is there, and creates `dir` in it.
fn ensure_pin_dir(dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs = |p: &Path| -> bool {
        let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: `statfs` is plain data; zeroed is a valid initial value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated, `st` is a valid out-pointer.
        let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
    };
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).context("creating /sys/fs/bpf")?;
        let src = CString::new("bpf")?;
        let target = CString::new("/sys/fs/bpf")?;
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
            return Err(std::io::Error::last_os_error()).context("mounting bpffs on /sys/fs/bpf");
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpffs: cannot pin the relay's maps there",
            dir.display()
        );
    }
    Ok(())
}

impl XdpDataPath {
    /// Loads the program, writes the configuration for relay ports `port_min..=port_max`, and
    /// attaches to every interface in `opts` (in the calling thread's network namespace).
    pub fn load(opts: &XdpOptions, port_min: u16, port_max: u16) -> anyhow::Result<Self> {
        if opts.interfaces.is_empty() {
            bail!("no interfaces to attach the XDP program to");
        }
        if port_min > port_max {
            bail!("empty relay port range {port_min}-{port_max}");
        }
        let pin_dir = opts
            .pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
        ensure_pin_dir(&pin_dir)?;
        let pin_lock = lock_pin_dir(&pin_dir)?;
        let ifindexes = opts
            .interfaces
            .iter()
            .map(|i| ifindex(i))
            .collect::<anyhow::Result<Vec<_>>>()?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(OBJECT)
            .with_context(|| {
                format!(
                    "loading the XDP program (if maps pinned in {} are from an incompatible \
                     version, remove that directory)",
                    pin_dir.display()
                )
            })?;

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        };
        let channels = HashMap::try_from(take(&mut ebpf, CHANNELS_MAP)?)?;
        let state = Array::try_from(take(&mut ebpf, CHANNEL_STATS_MAP)?)?;
        let counters = Arc::new(PerCpuArray::try_from(take(&mut ebpf, COUNTERS_MAP)?)?);
        let nexthop_map: HashMap<MapData, NextHopKey, Neighbour> =
            HashMap::try_from(take(&mut ebpf, NEXTHOPS_MAP)?)?;
        let present = nexthop_map
            .iter()
            .filter_map(Result::ok)
            .collect::<StdHashMap<_, _>>();
        let nexthops = Arc::new(Mutex::new(NextHops {
            map: nexthop_map,
            resolver: Resolver::open().context("opening rtnetlink to resolve next hops")?,
            present,
            unresolved: StdHashMap::new(),
            freed: false,
        }));
        let maps = Arc::new(Mutex::new(Maps { channels, state }));
        let shared = Shared {
            maps: Arc::clone(&maps),
            nexthops: Arc::clone(&nexthops),
            counters: Arc::clone(&counters),
        };
        // Channels inherited from the pinned maps get their next hops before anything else.
        shared.refresh();
        let mut config: Array<MapData, RelayConfig> =
            Array::try_from(take(&mut ebpf, CONFIG_MAP)?)?;
        let mut relay_config = RelayConfig::new(port_min, port_max);
        // A new generation: no next hop cached by a previous process is trusted.
        relay_config.fib_generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32)
            .max(1);
        config
            .set(0, relay_config, 0)
            .context("writing the relay configuration map")?;
        let fib_refresher = FibRefresher::start(shared, config, relay_config)
            .context("starting the next-hop refresher")?;
        let mut egress: DevMapHash<MapData> = DevMapHash::try_from(take(&mut ebpf, EGRESS_MAP)?)?;
        for &idx in &ifindexes {
            egress
                .insert(idx, idx, None, 0)
                .context("adding an interface to the egress map")?;
        }

        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing from the object"))?
            .try_into()?;
        program.load().context("verifying the XDP program")?;
        let mut links = Vec::new();
        let mut attachments = Vec::new();
        for (name, &idx) in opts.interfaces.iter().zip(&ifindexes) {
            let (link, mode) = attach(program, name, idx, opts.mode)?;
            links.push(link);
            attachments.push(Attachment {
                interface: name.clone(),
                ifindex: idx,
                mode,
            });
        }
        Ok(Self {
            maps,
            nexthops,
            writes: Mutex::new(false),
            counters,
            fib_refresher: Some(fib_refresher),
            attachments,
            pin_dir,
            port_min,
            port_max,
            ebpf: Mutex::new(ebpf),
            links,
            netns: current_netns(),
            _pin_lock: pin_lock,
        })
    }

    /// Installs `channel` on `port` as a new channel: its state entry (counters, RTP quality,
    /// next-hop cache) is zeroed first, whatever a previous channel on the port left there.
    pub fn install_new(&self, port: u16, channel: &Channel) -> Result<(), DataPathError> {
        self.check_port(port)?;
        self.resolve_for(channel);
        self.write(|maps| match maps.zero_state(port) {
            Ok(()) => maps.write_channel(port, channel),
            Err(e) => (Err(e), false),
        })
    }

    /// Writes `channel` on `port` and keeps the state entry (an update of a live channel; the
    /// next-hop cache revalidates against the new addresses by itself).
    pub fn replace(&self, port: u16, channel: &Channel) -> Result<(), DataPathError> {
        self.check_port(port)?;
        self.resolve_for(channel);
        self.write(|maps| maps.write_channel(port, channel))
    }

    /// Resolves the next hops `channel` needs now and writes them into the next-hop map, so
    /// they are there when the channel becomes visible to the program.
    fn resolve_for(&self, channel: &Channel) {
        let keys: Vec<NextHopKey> = next_hop_keys(channel).collect();
        if !keys.is_empty() {
            lock(&self.nexthops).ensure(keys);
        }
    }

    /// Whether the fast path can send every packet of `channel` it would forward now: the next
    /// hop of each latched destination is resolved (as of the last resolution).
    pub fn next_hops_ready(&self, channel: &Channel) -> bool {
        let nh = lock(&self.nexthops);
        next_hop_keys(channel).all(|k| nh.present.contains_key(&k))
    }

    /// Destinations of installed channels the fast path cannot send to now, and why: their
    /// packets go up to user space. Empty when the fast path is healthy.
    pub fn unresolved(&self) -> Vec<UnresolvedNextHop> {
        let mut v: Vec<UnresolvedNextHop> = lock(&self.nexthops)
            .unresolved
            .iter()
            .map(|(k, why)| UnresolvedNextHop {
                src: Ipv4Addr::from(k.saddr.to_ne_bytes()),
                dst: Ipv4Addr::from(k.daddr.to_ne_bytes()),
                why: why.clone(),
            })
            .collect();
        v.sort_by_key(|u| (u.src, u.dst));
        v
    }

    /// Resolves the next hops of every installed channel now (as the refresher does every
    /// [`FIB_REFRESH`]), e.g. after a route or neighbour change a caller wants taken at once.
    pub fn refresh_next_hops(&self) {
        Shared {
            maps: Arc::clone(&self.maps),
            nexthops: Arc::clone(&self.nexthops),
            counters: Arc::clone(&self.counters),
        }
        .refresh();
    }

    /// The interfaces the program runs on, and in which mode.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The directory holding the pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Global counters, summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = self.counters.get(&(c as u32), 0)?;
                Ok((c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Every channel in the (possibly inherited) channel map, with its key port.
    pub fn channels(&self) -> Result<Vec<(u16, Channel)>, DataPathError> {
        let maps = self.lock();
        maps.channels
            .iter()
            .map(|r| r.map(|(k, v)| (k.port.get(), v)))
            .collect::<Result<_, _>>()
            .map_err(|source| DataPathError::Map {
                map: CHANNELS_MAP,
                source,
            })
    }

    /// Runs one Ethernet frame through the loaded program with `BPF_PROG_TEST_RUN`, as if it had
    /// arrived on `ingress_ifindex` (which must exist in the calling thread's network namespace:
    /// the FIB lookup runs there). Returns the XDP action and the frame as the program left it.
    /// For fixture tests and diagnostics; the maps are the live ones.
    pub fn test_run(&self, frame: &[u8], ingress_ifindex: u32) -> anyhow::Result<(u32, Vec<u8>)> {
        self.test_run_repeat(frame, ingress_ifindex, 1)
            .map(|(action, out, _)| (action, out))
    }

    /// Like [`Self::test_run`], but runs the program `repeat` times in the kernel and also
    /// returns the mean time per run: the program's own cost per packet, free of any I/O.
    /// Each run sees the original frame; the map side effects (counters) happen every time.
    pub fn test_run_repeat(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> anyhow::Result<(u32, Vec<u8>, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let len = u32::try_from(frame.len()).context("frame too large")?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel requires data = data_meta = 0 and data_end = len.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&len.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing"))?
            .try_into()?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat.max(1);
        let result = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    /// Detaches the program and removes the pinned maps (the relay's state is gone for good).
    pub fn unpin_and_close(self) -> anyhow::Result<()> {
        let dir = self.pin_dir.clone();
        drop(self);
        for name in [
            CHANNELS_MAP,
            CHANNEL_STATS_MAP,
            CONFIG_MAP,
            EGRESS_MAP,
            NEXTHOPS_MAP,
        ] {
            let p = dir.join(name);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
            }
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    /// Runs one write (`f` returns its result and whether it freed an element). If the
    /// previous write freed one, first waits for an RCU grace period: every program run that
    /// could still read the freed element, or count into a state entry about to be zeroed for
    /// a removed channel, has finished, so the write can neither reuse memory a program reads
    /// nor race a late counter update. See ARCHITECTURE.md (the channel map).
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Maps) -> (Result<T, DataPathError>, bool),
    ) -> Result<T, DataPathError> {
        let mut freed = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut *freed) {
            rcu_grace_period();
        }
        let (r, f) = f(&mut self.lock());
        *freed = f;
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        lock(&self.maps)
    }

    fn check_port(&self, port: u16) -> Result<(), DataPathError> {
        if port & 1 != 0 || port < self.port_min || port >= self.port_max {
            return Err(DataPathError::PortOutOfRange {
                port,
                min: self.port_min,
                max: self.port_max,
            });
        }
        Ok(())
    }
}

impl Drop for XdpDataPath {
    fn drop(&mut self) {
        drop(self.fib_refresher.take());
        let links: Vec<XdpLinkId> = self.links.drain(..).collect();
        let ebpf = &self.ebpf;
        in_netns(self.netns.as_ref(), || {
            let mut ebpf = ebpf.lock().unwrap_or_else(|e| e.into_inner());
            let Some(p) = ebpf.program_mut(XDP_PROGRAM) else {
                return;
            };
            let p: Result<&mut Xdp, _> = p.try_into();
            let Ok(p) = p else { return };
            for link in links {
                if let Err(e) = p.detach(link) {
                    log::warn!("detaching the XDP program: {e}");
                }
            }
        });
    }
}

/// The calling thread's network namespace, kept open.
fn current_netns() -> Option<std::fs::File> {
    std::fs::File::open("/proc/thread-self/ns/net").ok()
}

/// Runs `f` in network namespace `ns` (on a scoped thread that enters it), or right here when
/// this thread is already there or `ns` is unknown.
fn in_netns(ns: Option<&std::fs::File>, f: impl FnOnce() + Send) {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    let Some(ns) = ns else { return f() };
    let same = match (ns.metadata(), std::fs::metadata("/proc/thread-self/ns/net")) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    if same {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns reads the open descriptor and changes only this new thread's
            // network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                log::warn!(
                    "entering the relay's network namespace to detach: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            f();
        });
    });
}

fn attach(
    program: &mut Xdp,
    name: &str,
    ifindex: u32,
    mode: XdpMode,
) -> anyhow::Result<(XdpLinkId, XdpMode)> {
    match mode {
        XdpMode::Native => program
            .attach_to_if_index(ifindex, AyaXdpMode::Driver)
            .map(|l| (l, XdpMode::Native))
            .with_context(|| format!("attaching XDP in native mode to {name}")),
        XdpMode::Generic => program
            .attach_to_if_index(ifindex, AyaXdpMode::Skb)
            .map(|l| (l, XdpMode::Generic))
            .with_context(|| format!("attaching XDP in generic mode to {name}")),
        XdpMode::Auto => match program.attach_to_if_index(ifindex, AyaXdpMode::Driver) {
            Ok(l) => {
                log::info!("XDP attached to {name} in native mode");
                Ok((l, XdpMode::Native))
            }
            Err(e) => {
                log::warn!("native XDP unavailable on {name} ({e}); falling back to generic mode");
                program
                    .attach_to_if_index(ifindex, AyaXdpMode::Skb)
                    .map(|l| (l, XdpMode::Generic))
                    .with_context(|| format!("attaching XDP in generic mode to {name}"))
            }
        },
    }
}

impl DataPath for XdpDataPath {
    fn name(&self) -> &'static str {
        "xdp"
    }

    fn install(&self, port: u16, channel: &Channel) -> Result<(), DataPathError> {
        self.check_port(port)?;
        self.resolve_for(channel);
        let key = ChannelKey::for_port(port);
        // A new channel starts with fresh counters and an empty next-hop cache; a replaced one
        // keeps them (the cache revalidates against the new addresses by itself).
        self.write(|maps| {
            if maps.channels.get(&key, 0).is_err()
                && let Err(e) = maps.zero_state(port)
            {
                return (Err(e), false);
            }
            maps.write_channel(port, channel)
        })
    }

    fn remove(&self, port: u16) -> Result<(), DataPathError> {
        self.check_port(port)?;
        self.write(|maps| maps.delete_channel(port))
    }

    fn channel(&self, port: u16) -> Result<Channel, DataPathError> {
        self.check_port(port)?;
        self.lock()
            .channels
            .get(&ChannelKey::for_port(port), 0)
            .map_err(|_| DataPathError::NotFound(port))
    }

    fn stats(&self, port: u16) -> Result<ChannelStats, DataPathError> {
        self.check_port(port)?;
        let maps = self.lock();
        let key = ChannelKey::for_port(port);
        if maps.channels.get(&key, 0).is_err() {
            return Err(DataPathError::NotFound(port));
        }
        maps.state
            .get(&channel_index(port), 0)
            .map(|s| s.stats)
            .map_err(|source| DataPathError::Map {
                map: CHANNEL_STATS_MAP,
                source,
            })
    }
}

/// An XDP_PASS program attached to one interface; detached on drop.
pub struct PassGuard {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    netns: Option<std::fs::File>,
}

impl std::fmt::Debug for PassGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassGuard").finish_non_exhaustive()
    }
}

impl Drop for PassGuard {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else { return };
        let ebpf = &mut self.ebpf;
        in_netns(self.netns.as_ref(), move || {
            if let Some(p) = ebpf.program_mut(PASS_PROGRAM) {
                let p: Result<&mut Xdp, _> = p.try_into();
                if let Ok(p) = p {
                    let _ = p.detach(link);
                }
            }
        });
    }
}

/// Attaches an XDP program that passes everything to `iface` (in the calling thread's network
/// namespace). Native XDP on veth drops frames redirected to a peer that has no XDP program,
/// so the far ends of the relay's veths need one in tests and benchmarks.
pub fn attach_pass_program(iface: &str, mode: XdpMode) -> anyhow::Result<PassGuard> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let idx = ifindex(iface)?;
    // The object declares pinned maps; give this private copy a throw-away pin directory and
    // unpin at once (the maps live on while the program holds them).
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/homerelay-pass-{}-{n}",
        std::process::id()
    ));
    ensure_pin_dir(&dir)?;
    let loaded = EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(OBJECT);
    let _ = std::fs::remove_dir_all(&dir);
    let mut ebpf = loaded.context("loading the XDP pass program")?;
    let program: &mut Xdp = ebpf
        .program_mut(PASS_PROGRAM)
        .ok_or_else(|| anyhow!("program {PASS_PROGRAM} missing from the object"))?
        .try_into()?;
    program.load()?;
    let (link, _) = attach(program, iface, idx, mode)?;
    Ok(PassGuard {
        ebpf,
        link: Some(link),
        netns: current_netns(),
    })
}

/// A view of the fast path's per-channel counters through the pinned state map of a relay that
/// may run in another process (e.g. `homerelay run`): what the XDP program alone forwarded.
/// Only ever reads; the relay that pinned the map stays its one user-space writer.
pub struct PinnedStats {
    state: Array<MapData, ChannelState>,
}

impl std::fmt::Debug for PinnedStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedStats").finish_non_exhaustive()
    }
}

impl PinnedStats {
    /// Opens `<pin_dir>/HR_CHAN_STATE`; fails if it is missing or not of this version's layout.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(CHANNEL_STATS_MAP);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let state = Array::try_from(aya::maps::Map::Array(data)).with_context(|| {
            format!(
                "{} is not the fast path's state array of this version",
                path.display()
            )
        })?;
        Ok(Self { state })
    }

    /// What the fast path forwarded on the channel owning `port`, by direction.
    pub fn get(&self, port: u16) -> anyhow::Result<ChannelStats> {
        Ok(self
            .state
            .get(&channel_index(port), 0)
            .with_context(|| format!("looking up channel {port} in the fast path's state"))?
            .stats)
    }
}
