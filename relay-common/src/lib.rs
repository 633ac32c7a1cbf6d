//! Every byte that crosses the boundary between the XDP program and user space.
//!
//! The XDP program (`relay-ebpf`) and the loader (`relay-user`) both compile these types, so a
//! map key or value can never drift between the two sides. The invariant a reader must know:
//! **every struct here is `#[repr(C)]` with explicit reserved fields and no implicit padding,
//! addresses and ports are stored in network byte order, and the sizes are asserted at compile
//! time.** Reserved fields must be zero (hash map keys are compared bytewise).
//!
//! Addresses are 16 bytes everywhere: an IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`,
//! RFC 4291 §2.5.5.2), so adding IPv6 to the fast path changes the program, not the types.
#![no_std]

use core::mem::size_of;

pub mod quality;
pub use quality::{DEFAULT_CLOCK_RATE, RtpState};

/// Name of the channel table (`HashMap<ChannelKey, Channel>`, preallocated), written by user
/// space only. A hash map, not an array: an update links a fully written element in place of
/// the old one, so the program never sees half of an update (an array value is copied in
/// place and can be read torn). A replaced or deleted element goes back to the map's free
/// list at once and may be reused by the next write while a program still reads it, so user
/// space waits for an RCU grace period after every write before the next one
/// (`relay_user::xdp`; ARCHITECTURE.md explains the choice).
pub const CHANNELS_MAP: &str = "HR_CHANNELS";
/// Name of the per-channel fast-path state (`Array<ChannelState>` indexed by
/// [`channel_index`]): counters and
/// the next-hop cache, written by the XDP program only (user space zeroes an entry when it
/// installs a new channel there). Kept apart from [`CHANNELS_MAP`] so each map value has one
/// writer: user space can rewrite a channel (latching, update) without losing increments.
pub const CHANNEL_STATS_MAP: &str = "HR_CHAN_STATE";
/// Name of the global per-CPU counters (`PerCpuArray<u64>`, indexed by [`Counter`]).
pub const COUNTERS_MAP: &str = "HR_COUNTERS";
/// Name of the one-entry configuration array (`Array<RelayConfig>`).
pub const CONFIG_MAP: &str = "HR_CONFIG";
/// Name of the egress device map (`DevMapHash`, ifindex → ifindex) used for `XDP_REDIRECT`.
pub const EGRESS_MAP: &str = "HR_EGRESS";
/// Name of the next-hop map (`HashMap<NextHopKey, Neighbour>`), written by user space from the
/// kernel's routing and neighbour tables: the fast path's only source of next hops.
pub const NEXTHOPS_MAP: &str = "HR_NEXTHOPS";
/// Name of the XDP program in the object file.
pub const XDP_PROGRAM: &str = "homerelay_xdp";

/// Capacity of [`CHANNELS_MAP`] and [`CHANNEL_STATS_MAP`]: one entry per even UDP port.
///
/// The state table is an array because the verifier inlines array lookups: the fast path pays
/// a bounds check and an add instead of a hash-table helper call for every packet.
pub const MAX_CHANNELS: u32 = 32_768;

/// The table index of the channel owning relay port `port` (RTP or RTCP): `port / 2`.
#[inline(always)]
pub const fn channel_index(port: u16) -> u32 {
    (port >> 1) as u32
}
/// Capacity of [`EGRESS_MAP`]: interfaces the fast path may redirect to.
pub const MAX_EGRESS_INTERFACES: u32 = 64;

/// Capacity of [`NEXTHOPS_MAP`]: one entry per (relay address, destination) pair, at most two
/// destinations per channel.
pub const MAX_NEXTHOPS: u32 = 2 * MAX_CHANNELS;

/// A 16-bit value stored in network byte order.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Be16(u16);

impl Be16 {
    /// Stores a host-order value in network byte order.
    #[inline(always)]
    pub const fn new(host: u16) -> Self {
        Self(host.to_be())
    }
    /// Wraps a value that is already in network byte order (as read from a packet).
    #[inline(always)]
    pub const fn from_raw(raw: u16) -> Self {
        Self(raw)
    }
    /// The value in host byte order.
    #[inline(always)]
    pub const fn get(self) -> u16 {
        u16::from_be(self.0)
    }
    /// The raw network-order representation (as written into a packet).
    #[inline(always)]
    pub const fn raw(self) -> u16 {
        self.0
    }
}

impl core::fmt::Debug for Be16 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// An IPv6 address or an IPv4-mapped IPv4 address, as four words in memory (network) order.
///
/// Word `i` holds bytes `4i..4i+4` of the address exactly as they appear on the wire, so an
/// IPv4 address read raw from a packet header compares equal to `words[3]`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Addr16 {
    pub words: [u32; 4],
}

/// Word 2 of an IPv4-mapped address: bytes `00 00 ff ff`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr16 {
    /// The unspecified address (`::`): "not known yet".
    pub const UNSPECIFIED: Self = Self { words: [0; 4] };

    /// An IPv4 address from its raw network-order representation (as read from a header).
    #[inline(always)]
    pub const fn from_ipv4_raw(raw: u32) -> Self {
        Self {
            words: [0, 0, V4_MAPPED_WORD, raw],
        }
    }
    /// An IPv4 address from its four octets.
    pub const fn from_ipv4_octets(o: [u8; 4]) -> Self {
        Self::from_ipv4_raw(u32::from_ne_bytes(o))
    }
    /// An address from its 16 bytes in network order.
    pub fn from_octets(o: [u8; 16]) -> Self {
        let mut words = [0u32; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
        }
        Self { words }
    }
    /// The 16 bytes in network order.
    pub fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        for (i, w) in self.words.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o
    }
    /// Whether this is an IPv4-mapped address.
    #[inline(always)]
    pub const fn is_ipv4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_WORD
    }
    /// The raw network-order IPv4 address (meaningful only when [`Self::is_ipv4`]).
    #[inline(always)]
    pub const fn ipv4_raw(&self) -> u32 {
        self.words[3]
    }
    /// Whether this is `::` or the IPv4-mapped `0.0.0.0`.
    #[inline(always)]
    pub const fn is_unspecified(&self) -> bool {
        self.words[0] == 0
            && self.words[1] == 0
            && (self.words[2] == 0 || self.words[2] == V4_MAPPED_WORD)
            && self.words[3] == 0
    }
}

impl core::fmt::Debug for Addr16 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let o = self.octets();
        if self.is_ipv4() {
            write!(f, "{}.{}.{}.{}", o[12], o[13], o[14], o[15])
        } else {
            write!(f, "{:02x?}", o)
        }
    }
}

/// [`Endpoint::flags`]: the address was confirmed (learnt from traffic or set as strict by the
/// control plane). The fast path accepts packets only from latched endpoints and sends only to
/// latched endpoints; everything else goes to user space.
pub const ENDPOINT_LATCHED: u8 = 1;

/// A peer's transport address (address, UDP port) and its latching state.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Endpoint {
    /// Peer address; [`Addr16::UNSPECIFIED`] when not known yet.
    pub addr: Addr16,
    /// Peer UDP port, network byte order; 0 when not known yet.
    pub port: Be16,
    /// `ENDPOINT_*` bits.
    pub flags: u8,
    /// Must be zero.
    pub reserved: u8,
}

impl Endpoint {
    /// An endpoint not known yet.
    pub const UNKNOWN: Self = Self {
        addr: Addr16::UNSPECIFIED,
        port: Be16::new(0),
        flags: 0,
        reserved: 0,
    };

    #[inline(always)]
    pub const fn is_latched(&self) -> bool {
        self.flags & ENDPOINT_LATCHED != 0
    }
    /// Whether an address and port are set (latched or only expected).
    #[inline(always)]
    pub const fn is_known(&self) -> bool {
        !self.addr.is_unspecified() && self.port.raw() != 0
    }
}

/// One side of a call as seen from the relay: the peer's RTP and RTCP addresses and the relay
/// address and port that this peer sends to and receives from.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Leg {
    /// Where the peer's RTP comes from and goes to.
    pub rtp: Endpoint,
    /// Where the peer's RTCP comes from and goes to (latched separately: a NAT maps the RTCP
    /// flow to its own public port).
    pub rtcp: Endpoint,
    /// Relay address the peer talks to; packets to this peer are sent from it.
    pub local_addr: Addr16,
    /// Relay RTP port the peer talks to (RTCP is `local_port + 1`), network byte order.
    pub local_port: Be16,
    /// Must be zero.
    pub reserved: u16,
    /// Egress interface towards this peer; 0 lets the routing table decide. When set, the fast
    /// path forwards only if the FIB agrees, and passes the packet up otherwise.
    pub ifindex: u32,
}

/// Index of leg A (conventionally the Internet side) in [`Channel::legs`].
pub const LEG_A: usize = 0;
/// Index of leg B (conventionally the LAN side) in [`Channel::legs`].
pub const LEG_B: usize = 1;

/// A relay channel: two legs; a packet from one leg is sent to the other.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Channel {
    pub legs: [Leg; 2],
    /// `CHANNEL_*` bits.
    pub flags: u32,
    /// RTP clock rate in Hz for the jitter statistics (host order); 0 = [`DEFAULT_CLOCK_RATE`].
    pub clock_rate: u32,
    /// How user space learns the legs' sources. The fast path never reads it: it forwards only
    /// between latched endpoints, whatever the policy.
    pub latching: Latching,
    /// Must be zero.
    pub reserved: u32,
}

/// How a channel learns its legs' media sources ([`Latching::mode`]). Applied by user space
/// alone (`relay_user::forward::decide`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum LatchMode {
    /// The first packet from a leg that is not latched yet latches it (the default).
    FirstPacket = 0,
    /// A new source latches after [`Latching::packets`] consecutive packets or
    /// [`Latching::duration_ms`] since its first packet, whichever comes first; until then its
    /// packets are dropped.
    After = 1,
    /// Only the addresses given by the control plane; nothing is learnt from traffic.
    Strict = 2,
    /// Like `FirstPacket`, and a latched leg that has been silent for
    /// [`Latching::duration_ms`] re-latches to a new source (a phone changing networks, a NAT
    /// rebinding).
    Handover = 3,
}

impl LatchMode {
    /// The mode stored as `raw`; an unknown value (from a newer writer) reads as the default.
    #[inline(always)]
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => LatchMode::After,
            2 => LatchMode::Strict,
            3 => LatchMode::Handover,
            _ => LatchMode::FirstPacket,
        }
    }
}

/// A channel's latching policy. All zero = [`LatchMode::FirstPacket`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Latching {
    /// A [`LatchMode`] as `u8`.
    pub mode: u8,
    /// `LATCH_*` bits.
    pub flags: u8,
    /// Must be zero.
    pub reserved: [u8; 2],
    /// `After`: packets from a new source before it latches (0 = no packet criterion).
    pub packets: u32,
    /// `After`: milliseconds from a new source's first packet until it latches (0 = no time
    /// criterion); `Handover`: silence of the latched source after which a new one latches.
    pub duration_ms: u32,
}

impl Latching {
    /// The policy's mode.
    #[inline(always)]
    pub const fn mode(&self) -> LatchMode {
        LatchMode::from_raw(self.mode)
    }
    /// A policy with `mode` and its parameters (any payload may latch).
    pub const fn new(mode: LatchMode, packets: u32, duration_ms: u32) -> Self {
        Self {
            mode: mode as u8,
            flags: 0,
            reserved: [0; 2],
            packets,
            duration_ms,
        }
    }
    /// This policy with `LATCH_*` bits `flags` set.
    pub const fn with_flags(mut self, flags: u8) -> Self {
        self.flags |= flags;
        self
    }
    /// Whether only packets that parse as RTP or RTCP version 2 may latch a source.
    #[inline(always)]
    pub const fn media_only(&self) -> bool {
        self.flags & LATCH_MEDIA_ONLY != 0
    }
}

/// [`Latching::flags`]: a source latches only with a packet that parses as RTP or RTCP version
/// 2 (RFC 3550; on the RTP port either, as with RTCP multiplexing, RFC 5761); anything else from
/// a source not latched yet is dropped. Packets from a latched source are not inspected.
pub const LATCH_MEDIA_ONLY: u8 = 1;

/// [`Channel::flags`]: user space handles this channel alone (the fast path passes its
/// packets up), e.g. while the control plane changes it.
pub const CHANNEL_USERSPACE_ONLY: u32 = 1;

/// Key of [`CHANNELS_MAP`] and [`CHANNEL_STATS_MAP`]: the channel's even relay RTP port. RTCP
/// packets (to the odd port) look up `port & !1`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct ChannelKey {
    pub port: Be16,
    /// Must be zero.
    pub reserved: u16,
}

impl ChannelKey {
    /// The key for any relay port (RTP or RTCP) of a channel.
    #[inline(always)]
    pub const fn for_port(host_port: u16) -> Self {
        Self {
            port: Be16::new(host_port & !1),
            reserved: 0,
        }
    }
}

/// Traffic in one direction of a channel.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct DirectionStats {
    /// Packets (RTP, RTCP, anything) forwarded.
    pub packets: u64,
    /// UDP payload bytes.
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the last packet; 0 = never. For non-RTP packets the
    /// fast path writes the coarse variant (`bpf_ktime_get_coarse_ns`: the same clock as of the
    /// last scheduler tick), so its values may trail the user-space path's by up to one tick.
    pub last_seen_ns: u64,
    /// RTP quality (RFC 3550 A.1/A.8) of the RTP packets (even port, version 2) among them.
    pub rtp: RtpState,
}

/// Per-channel counters by direction: index [`LEG_A`] counts packets *from* leg A (to B),
/// index [`LEG_B`] packets from leg B (to A).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct ChannelStats {
    pub from_leg: [DirectionStats; 2],
}

/// A cached [`NEXTHOPS_MAP`] entry for one direction of a channel.
///
/// Valid while `generation` equals [`RelayConfig::fib_generation`] and the addresses match the
/// packet being sent; user space bumps the generation every time it has refreshed the next-hop
/// map (and the cache then refills from the map on the next packet), so a changed route or
/// neighbour is picked up within one period. Only entries whose egress passed the checks are
/// cached.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// Source and destination IPv4 addresses (raw, network order) the lookup was made for.
    pub saddr: u32,
    pub daddr: u32,
    /// [`RelayConfig::fib_generation`] at lookup time; 0 = empty.
    pub generation: u32,
}

/// Key of [`NEXTHOPS_MAP`]: the relay address a packet is sent from and its destination (raw
/// IPv4, network order), as a rewritten packet carries them.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct NextHopKey {
    pub saddr: u32,
    pub daddr: u32,
}

/// A resolved next hop (a [`NEXTHOPS_MAP`] value): what the kernel would use to send from
/// `saddr` to `daddr` — egress interface, its MAC and MTU, and the MAC of the gateway (or of
/// the destination on a directly connected subnet). Present only when the neighbour is
/// resolved; a missing entry sends the packet up to user space.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Neighbour {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
    /// MTU of the egress interface; larger packets go up (the stack fragments or refuses).
    pub mtu: u16,
    /// Must be zero.
    pub reserved: [u8; 2],
}

/// The fast path's state of one channel (a [`CHANNEL_STATS_MAP`] value).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct ChannelState {
    pub stats: ChannelStats,
    /// Next hop for packets *to* leg A (index [`LEG_A`]) and to leg B.
    pub nexthop: [NextHop; 2],
}

/// The data plane's configuration (one entry of [`CONFIG_MAP`]). Until user space writes it,
/// `port_min > port_max` and the fast path passes everything up.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct RelayConfig {
    /// Lowest relay port (inclusive), network byte order.
    pub port_min: Be16,
    /// Highest relay port (inclusive), network byte order.
    pub port_max: Be16,
    /// TTL of forwarded packets (user space sends with the system default, 64).
    pub ttl: u8,
    /// Must be zero.
    pub reserved: [u8; 3],
    /// Bumped by user space to invalidate every cached [`NextHop`]; never 0 once written.
    pub fib_generation: u32,
}

/// Default TTL of relayed packets, the Linux default for sockets (`net.ipv4.ip_default_ttl`).
pub const DEFAULT_TTL: u8 = 64;

/// Global counters of the fast path, one per verdict and reason (index into [`COUNTERS_MAP`]).
/// Every packet the program sees is counted exactly once.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Counter {
    /// Forwarded with `XDP_TX` (egress = ingress interface).
    Tx = 0,
    /// Forwarded with `XDP_REDIRECT` through [`EGRESS_MAP`].
    Redirect,
    /// Passed up: not IPv4 (ARP, IPv6, VLAN...).
    PassNotIpv4,
    /// Passed up: IPv4 but not UDP.
    PassNotUdp,
    /// Passed up: a fragment (the kernel reassembles it for user space).
    PassFragment,
    /// Passed up: IPv4 header with options.
    PassIpOptions,
    /// Passed up: Ethernet, IPv4 or UDP header cut short, or lengths inconsistent.
    PassTruncated,
    /// Passed up: UDP destination port outside the relay range.
    PassPortOutOfRange,
    /// Passed up: relay port with no channel installed.
    PassNoChannel,
    /// Passed up: the channel is handled by user space only.
    PassUserspaceOnly,
    /// Passed up: the source matches no latched endpoint of the channel (to be latched, or
    /// dropped as injection by user space).
    PassUnknownSource,
    /// Passed up: the destination leg is not latched yet.
    PassDestinationUnlatched,
    /// Passed up: no resolved next hop for the destination in [`NEXTHOPS_MAP`] (no route, or
    /// the neighbour not resolved yet: the kernel resolves it as user space sends).
    PassNoNeighbour,
    /// Passed up: the packet is larger than the egress interface's MTU.
    PassFibFailed,
    /// Passed up: the egress interface is not in [`EGRESS_MAP`] or differs from the leg's.
    PassEgressUnavailable,
    /// Passed up: the configuration map is not written yet.
    PassNoConfig,
    /// Dropped: the egress interface left the device map between lookup and redirect, after
    /// the packet was rewritten (passing it up would inject a wrong packet into the stack).
    DropRedirectFailed,
    /// Passed up: from a latched source, but not addressed to the relay address its leg talks
    /// to (transit traffic through a routing host, or a leg without a relay address). Last in
    /// the enum so the older counters keep their indices.
    PassNotRelayAddress,
}

/// Number of [`Counter`]s (capacity of [`COUNTERS_MAP`]).
pub const COUNTER_COUNT: u32 = Counter::PassNotRelayAddress as u32 + 1;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Tx,
        Counter::Redirect,
        Counter::PassNotIpv4,
        Counter::PassNotUdp,
        Counter::PassFragment,
        Counter::PassIpOptions,
        Counter::PassTruncated,
        Counter::PassPortOutOfRange,
        Counter::PassNoChannel,
        Counter::PassUserspaceOnly,
        Counter::PassUnknownSource,
        Counter::PassDestinationUnlatched,
        Counter::PassNoNeighbour,
        Counter::PassFibFailed,
        Counter::PassEgressUnavailable,
        Counter::PassNoConfig,
        Counter::DropRedirectFailed,
        Counter::PassNotRelayAddress,
    ];

    /// A stable lowercase name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Tx => "tx",
            Counter::Redirect => "redirect",
            Counter::PassNotIpv4 => "not_ipv4",
            Counter::PassNotUdp => "not_udp",
            Counter::PassFragment => "fragment",
            Counter::PassIpOptions => "ip_options",
            Counter::PassTruncated => "truncated",
            Counter::PassPortOutOfRange => "port_out_of_range",
            Counter::PassNoChannel => "no_channel",
            Counter::PassUserspaceOnly => "userspace_only",
            Counter::PassUnknownSource => "unknown_source",
            Counter::PassDestinationUnlatched => "destination_unlatched",
            Counter::PassNoNeighbour => "no_neighbour",
            Counter::PassFibFailed => "fib_failed",
            Counter::PassEgressUnavailable => "egress_unavailable",
            Counter::PassNoConfig => "no_config",
            Counter::DropRedirectFailed => "redirect_failed",
            Counter::PassNotRelayAddress => "not_relay_address",
        }
    }

    /// Whether the packet was forwarded by the fast path.
    pub const fn is_forwarded(self) -> bool {
        matches!(self, Counter::Tx | Counter::Redirect)
    }
    /// Whether the packet was passed up to the stack (and so to the user-space relay).
    pub const fn is_passed(self) -> bool {
        !self.is_forwarded() && !matches!(self, Counter::DropRedirectFailed)
    }
}

// Layout is part of the kernel/user contract: any change here must be deliberate.
const _: () = assert!(size_of::<Be16>() == 2);
const _: () = assert!(size_of::<Addr16>() == 16);
const _: () = assert!(size_of::<Endpoint>() == 20);
const _: () = assert!(size_of::<Leg>() == 64);
const _: () = assert!(size_of::<Latching>() == 12);
const _: () = assert!(size_of::<Channel>() == 152);
const _: () = assert!(size_of::<ChannelKey>() == 4);
const _: () = assert!(size_of::<RtpState>() == 56);
const _: () = assert!(size_of::<DirectionStats>() == 80);
const _: () = assert!(size_of::<ChannelStats>() == 160);
const _: () = assert!(size_of::<NextHop>() == 28);
const _: () = assert!(size_of::<ChannelState>() == 216);
const _: () = assert!(size_of::<RelayConfig>() == 12);
const _: () = assert!(size_of::<NextHopKey>() == 8);
const _: () = assert!(size_of::<Neighbour>() == 20);

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::*;
