//! homerelay's XDP fast path.
//!
//! For an IPv4/UDP packet to a relay port whose channel is installed, from a *latched* endpoint
//! of one leg, to a *latched* endpoint of the other leg: rewrite addresses and ports, take the
//! next-hop MACs from the next-hop map user space keeps from the kernel's routing and neighbour
//! tables (never a MAC swap), update the IPv4 and
//! UDP checksums incrementally (RFC 1624; a zero UDP checksum stays zero), and send it with
//! `XDP_TX` (egress = ingress) or `XDP_REDIRECT` through the egress device map.
//!
//! It also keeps each direction's RTP quality (RFC 3550 loss, reordering, jitter) with the
//! shared arithmetic of `relay_common::quality`, for the RTP packets it forwards (even port,
//! version 2 header); other packets count packets and bytes only.
//!
//! Invariant: **this program fails open.** Everything it does not forward — unknown port or
//! source, unlatched leg, fragment, IP options, non-UDP, IPv6, truncated headers, no resolved next hop —
//! goes up the stack with `XDP_PASS`, where the user-space relay applies the full rule
//! (`relay_user::forward::decide`). Every packet is counted once in `HR_COUNTERS` by reason.
#![no_std]
#![no_main]
// `atomic_xadd` lowers to the BPF atomic add instruction; the eBPF target has no
// compare-and-swap loop for `AtomicU64::fetch_add`. Allowed by RUSTC_BOOTSTRAP (build.rs).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core::intrinsics::atomic_xadd, see above")]

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::size_of,
};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};
use relay_common::{
    CHANNEL_USERSPACE_ONLY, COUNTER_COUNT, Channel, ChannelKey, ChannelState, Counter, Endpoint,
    Leg, MAX_CHANNELS, MAX_EGRESS_INTERFACES, MAX_NEXTHOPS, Neighbour, NextHop, NextHopKey,
    RelayConfig, channel_index, quality::RtpHeader,
};

#[map]
static HR_CHANNELS: HashMap<ChannelKey, Channel> = HashMap::pinned(MAX_CHANNELS, 0);
#[map]
static HR_CHAN_STATE: Array<ChannelState> = Array::pinned(MAX_CHANNELS, 0);
#[map]
static HR_CONFIG: Array<RelayConfig> = Array::pinned(1, 0);
#[map]
static HR_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
static HR_EGRESS: DevMapHash = DevMapHash::pinned(MAX_EGRESS_INTERFACES, 0);
#[map]
static HR_NEXTHOPS: HashMap<NextHopKey, Neighbour> = HashMap::pinned(MAX_NEXTHOPS, 0);

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// IPv4 flags/fragment-offset field: "more fragments" bit and the offset (RFC 791 §3.1).
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// The relay entry point.
#[xdp]
pub fn homerelay_xdp(ctx: XdpContext) -> u32 {
    let (action, counter) = match relay(&ctx) {
        Ok(action) => action,
        Err(reason) => (xdp_action::XDP_PASS, reason),
    };
    count(counter);
    action
}

/// A program that passes every packet: attached to the far end of a veth in native mode, which
/// otherwise silently drops frames redirected into it, and a safe stand-in while detaching.
#[xdp]
pub fn homerelay_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = HR_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU array slot is only written by this CPU, and the pointer comes from a
        // successful map lookup, so it is valid for the duration of this program run.
        unsafe { *slot += 1 };
    }
}

/// Bounds-checked pointer to a `T` at `offset` in the packet: the one place packet memory is
/// addressed, so the verifier sees a check before every access.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Counter> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Counter::PassTruncated);
    }
    Ok((start + offset) as *mut T)
}

/// The endpoint of `leg` for RTP (even relay port) or RTCP (odd relay port).
#[inline(always)]
fn endpoint(leg: &Leg, rtcp: bool) -> &Endpoint {
    if rtcp { &leg.rtcp } else { &leg.rtp }
}

/// Whether `ep` is a latched, known IPv4 endpoint equal to `addr:port` (both raw, network
/// order). Known as in the rule (`Endpoint::matches`): an endpoint without an address or port
/// matches no source.
#[inline(always)]
fn latched_v4(ep: &Endpoint, addr: u32, port: u16) -> bool {
    ep.is_latched()
        && ep.is_known()
        && ep.addr.is_ipv4()
        && ep.addr.ipv4_raw() == addr
        && ep.port.raw() == port
}

/// Ones'-complement sum folded to 16 bits (RFC 1071).
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Incremental checksum update, RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`, where `diff` is
/// already `sum(~m) + sum(m')` over the changed 16-bit words. Works on raw (memory-order)
/// words: the ones'-complement sum is independent of byte order (RFC 1071 §2(B)).
#[inline(always)]
fn csum_update(check: u16, diff: u64) -> u16 {
    !fold(u64::from(!check) + diff)
}

#[inline(always)]
fn words32(v: u32) -> u64 {
    u64::from(v & 0xffff) + u64::from(v >> 16)
}

#[inline(always)]
fn neg_words32(v: u32) -> u64 {
    words32(!v)
}

#[inline(always)]
fn relay(ctx: &XdpContext) -> Result<(u32, Counter), Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that the Ethernet header lies inside the packet.
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Err(Counter::PassNotIpv4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr_at` checked that a 20-byte IPv4 header lies inside the packet; every access
    // below through `ip` stays within those 20 bytes.
    let (vihl, proto, frags, tot_len) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            u16::from_be_bytes((*ip).frags),
            (*ip).tot_len,
        )
    };
    if vihl >> 4 != 4 {
        return Err(Counter::PassNotIpv4);
    }
    if proto != IPPROTO_UDP {
        return Err(Counter::PassNotUdp);
    }
    if vihl & 0x0f != 5 {
        return Err(Counter::PassIpOptions);
    }
    if frags & IP_MF_AND_OFFSET != 0 {
        return Err(Counter::PassFragment);
    }
    let tot_len = u16::from_be_bytes(tot_len);
    let udp: *mut UdpHdr = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    // SAFETY: `ptr_at` checked that the 8-byte UDP header lies inside the packet.
    let (sport, dport_raw, udp_len) =
        unsafe { ((*udp).src, (*udp).dst, u16::from_be_bytes((*udp).len)) };
    let ip_space = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if usize::from(tot_len) > ip_space
        || usize::from(tot_len) < Ipv4Hdr::LEN + UdpHdr::LEN
        || usize::from(udp_len) < UdpHdr::LEN
        || usize::from(udp_len) > usize::from(tot_len) - Ipv4Hdr::LEN
    {
        return Err(Counter::PassTruncated);
    }

    let config = HR_CONFIG.get(0).ok_or(Counter::PassNoConfig)?;
    let (port_min, port_max) = (config.port_min.get(), config.port_max.get());
    if port_min > port_max {
        return Err(Counter::PassNoConfig);
    }
    let dport = u16::from_be_bytes(dport_raw);
    if dport < port_min || dport > port_max {
        return Err(Counter::PassPortOutOfRange);
    }
    let key = ChannelKey::for_port(dport);
    let channel = HR_CHANNELS.get_ptr(key).ok_or(Counter::PassNoChannel)?;
    // SAFETY: the pointer comes from a successful map lookup and stays valid for this run; user
    // space replaces values by linking a new element (map update) and waits for an RCU grace
    // period before a later write could reuse the old one, so the fields read are consistent.
    let channel: &Channel = unsafe { &*channel };
    if channel.flags & CHANNEL_USERSPACE_ONLY != 0 {
        return Err(Counter::PassUserspaceOnly);
    }

    let rtcp = dport & 1 == 1;
    // SAFETY: inside the checked IPv4 header (see above).
    let saddr = u32::from_ne_bytes(unsafe { (*ip).src_addr });
    let sport_raw = u16::from_ne_bytes(sport);
    let from = if latched_v4(endpoint(&channel.legs[0], rtcp), saddr, sport_raw) {
        0
    } else if latched_v4(endpoint(&channel.legs[1], rtcp), saddr, sport_raw) {
        1
    } else {
        return Err(Counter::PassUnknownSource);
    };
    // Only the relay's own traffic: the packet must be addressed to the relay address its
    // leg talks to. On a host that routes, a transit packet to some other host's port in the
    // relay range must go on its way, not be taken (and a leg without a relay address is
    // user space's). Compared raw, in network order.
    let from_leg = &channel.legs[from];
    // SAFETY: inside the checked IPv4 header (see above).
    let daddr = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    if !from_leg.local_addr.is_ipv4()
        || from_leg.local_addr.is_unspecified()
        || from_leg.local_addr.ipv4_raw() != daddr
    {
        return Err(Counter::PassNotRelayAddress);
    }
    let to_leg = &channel.legs[1 - from];
    let to = endpoint(to_leg, rtcp);
    let payload_len = usize::from(udp_len) - UdpHdr::LEN;
    // A latched endpoint without an address or port is no destination (the rule drops such a
    // packet as DestinationUnknown): never send to port 0.
    if !to.is_latched() || !to.is_known() {
        return Err(Counter::PassDestinationUnlatched);
    }
    if !to.addr.is_ipv4() || !to_leg.local_addr.is_ipv4() || to_leg.local_addr.is_unspecified() {
        // Address-family translation, and picking a source address for a leg installed
        // without one, are user space's job.
        return Err(Counter::PassEgressUnavailable);
    }
    let new_saddr = to_leg.local_addr.ipv4_raw();
    let new_daddr = to.addr.ipv4_raw();
    let new_sport = (to_leg.local_port.get().wrapping_add(u16::from(rtcp))).to_be();
    let new_dport = to.port.raw();

    let state = HR_CHAN_STATE
        .get_ptr_mut(channel_index(dport))
        .ok_or(Counter::PassNoChannel)?;
    // SAFETY: `state` comes from a successful array lookup and is valid for this run; the
    // direction index is 0 or 1.
    let cache = unsafe { &raw mut (*state).nexthop[(1 - from) & 1] };
    let (dmac, smac, out_if) =
        next_hop(cache, config.fib_generation, new_saddr, new_daddr, tot_len)?;
    if to_leg.ifindex != 0 && to_leg.ifindex != out_if {
        return Err(Counter::PassEgressUnavailable);
    }
    let same_if = out_if == ctx.ingress_ifindex() as u32;

    // Rewrite. From here on the packet is committed to the fast path.
    // SAFETY: all three headers were bounds-checked above; the packet is not shared.
    unsafe {
        (*eth).dst_addr = dmac;
        (*eth).src_addr = smac;

        let old_saddr = saddr;
        let old_daddr = daddr;
        let old_ttl_proto = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
        let new_ttl_proto = u16::from_ne_bytes([config.ttl, (*ip).proto]);
        let addr_diff = neg_words32(old_saddr)
            + neg_words32(old_daddr)
            + words32(new_saddr)
            + words32(new_daddr);

        let ip_check = u16::from_ne_bytes((*ip).check);
        let ip_diff = addr_diff + u64::from(!old_ttl_proto) + u64::from(new_ttl_proto);
        (*ip).check = csum_update(ip_check, ip_diff).to_ne_bytes();
        (*ip).ttl = config.ttl;
        (*ip).src_addr = new_saddr.to_ne_bytes();
        (*ip).dst_addr = new_daddr.to_ne_bytes();

        let udp_check = u16::from_ne_bytes((*udp).check);
        // A zero UDP checksum means "none" (RFC 768) and stays zero.
        if udp_check != 0 {
            let udp_diff = addr_diff
                + u64::from(!sport_raw)
                + u64::from(!u16::from_ne_bytes(dport_raw))
                + u64::from(new_sport)
                + u64::from(new_dport);
            let c = csum_update(udp_check, udp_diff);
            // A computed zero is sent as all ones (RFC 768).
            (*udp).check = (if c == 0 { 0xffff } else { c }).to_ne_bytes();
        }
        (*udp).src = new_sport.to_ne_bytes();
        (*udp).dst = new_dport.to_ne_bytes();
    }

    // RTP only on the even port (RTCP shares the direction's packet and byte counters).
    let rtp = if rtcp {
        None
    } else {
        match ptr_at::<[u8; 8]>(ctx, EthHdr::LEN + Ipv4Hdr::LEN + UdpHdr::LEN) {
            // SAFETY: `ptr_at` checked that these 8 bytes lie inside the packet.
            Ok(head) => RtpHeader::parse(unsafe { &*head }, payload_len),
            Err(_) => None,
        }
    };
    account(state, from, payload_len as u64, rtp, channel.clock_rate);

    if same_if {
        return Ok((xdp_action::XDP_TX, Counter::Tx));
    }
    // The fallback action applies only if the interface left the egress map since the lookup
    // above. The packet is already rewritten, so passing it up would inject a wrong packet into
    // the stack: this is the program's one deliberate drop, counted.
    match HR_EGRESS.redirect(out_if, u64::from(xdp_action::XDP_DROP)) {
        Ok(action) => Ok((action, Counter::Redirect)),
        Err(action) => Ok((action, Counter::DropRedirectFailed)),
    }
}

/// Next-hop MACs and egress interface for a packet from `saddr` to `daddr` of `tot_len`
/// bytes: from the channel's cache when it is of the current generation and for the same
/// addresses, else from the next-hop map that user space keeps from the kernel's routing and
/// neighbour tables. Only entries whose egress interface is in the egress map are cached.
///
/// The kernel's `bpf_fib_lookup` is not used: it refuses ("forwarding disabled") on a host
/// that does not route (`net.ipv4.ip_forward=0`, the default), and the relay sends from its own
/// addresses, which is an output route — what user space resolves (ARCHITECTURE.md).
#[inline(always)]
fn next_hop(
    cache: *mut NextHop,
    generation: u32,
    saddr: u32,
    daddr: u32,
    tot_len: u16,
) -> Result<([u8; 6], [u8; 6], u32), Counter> {
    // SAFETY: `cache` points into a live array value (see the caller).
    let c = unsafe { &*cache };
    if generation != 0 && c.generation == generation && c.daddr == daddr && c.saddr == saddr {
        return Ok((c.dmac, c.smac, c.ifindex));
    }
    let key = NextHopKey { saddr, daddr };
    // SAFETY: the value is copied out at once; user space waits for an RCU grace period before
    // a write could reuse an element it replaced or deleted (relay_user::xdp).
    let hop: Neighbour = *unsafe { HR_NEXTHOPS.get(&key) }.ok_or(Counter::PassNoNeighbour)?;
    if hop.mtu != 0 && tot_len > hop.mtu {
        return Err(Counter::PassFibFailed);
    }
    if HR_EGRESS.get_ifindex(hop.ifindex).is_none() {
        return Err(Counter::PassEgressUnavailable);
    }
    // SAFETY: as above. Two CPUs may fill the same entry at once; they write the same values
    // unless the next hop changed in between, and the generation is written last (volatile,
    // and x86 keeps stores in order), so a reader that sees it current sees the rest filled.
    unsafe {
        (*cache).dmac = hop.dmac;
        (*cache).smac = hop.smac;
        (*cache).ifindex = hop.ifindex;
        (*cache).saddr = saddr;
        (*cache).daddr = daddr;
        core::ptr::write_volatile(&raw mut (*cache).generation, generation);
    }
    Ok((hop.dmac, hop.smac, hop.ifindex))
}

/// Per-channel counters for the direction out of leg `from`, and the RTP quality when the
/// packet is RTP.
///
/// Packets and bytes are shared between CPUs, hence atomic adds (BPF_ATOMIC). The RTP state is
/// updated read-modify-write, not atomically: one flow (one direction of one channel, one
/// source address and port) is normally handled by one CPU at a time — RSS hashes the 5-tuple
/// to one receive queue, and a veth or generic-mode packet runs on the CPU that sent it. If two
/// CPUs do handle the same direction at once (a queue rehash, a NAT moving the flow, two senders
/// on different CPUs), one packet's update can overwrite the other's: `received` or `reordered`
/// miss an increment (lost then reads one too high), the jitter estimate misses one step, the
/// highest sequence number may step back once. The statistics are off by a packet; nothing
/// else is affected (plain integers, no pointer or forwarding decision depends on them).
#[inline(always)]
fn account(
    state: *mut ChannelState,
    from: usize,
    payload: u64,
    rtp: Option<RtpHeader>,
    clock_rate: u32,
) {
    // SAFETY: `state` comes from a successful array lookup and is valid for this run; the
    // direction index is 0 or 1.
    unsafe {
        let dir = &raw mut (*state).stats.from_leg[from & 1];
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*dir).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*dir).bytes, payload);
        match rtp {
            Some(hdr) => {
                // Jitter needs the fine clock; the same reading serves as the last-seen time.
                let now = bpf_ktime_get_ns();
                (*dir).last_seen_ns = now;
                (*dir).rtp.update(hdr, now, clock_rate);
            }
            // The coarse clock (the last tick of CLOCK_MONOTONIC) costs a fraction of
            // bpf_ktime_get_ns and is plenty for idle detection.
            None => (*dir).last_seen_ns = bpf_ktime_get_coarse_ns(),
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
