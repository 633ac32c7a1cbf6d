//! Next hops for the fast path, resolved in user space from the kernel's routing and neighbour
//! tables over rtnetlink.
//!
//! Why: `bpf_fib_lookup` refuses to answer ("forwarding disabled") on a host that does not
//! route (`net.ipv4.ip_forward=0`, the default), and a relay must not turn its host into a
//! router. The relay sends from its own addresses, so the route that matters is the *output*
//! route from the relay address to the destination — exactly what `RTM_GETROUTE` with a source
//! and destination answers, and what the user-space relay's own sockets use.
//!
//! The invariant: **the next-hop map holds an entry only for a destination whose route is a
//! unicast route out of an Ethernet interface and whose neighbour (gateway or destination) the
//! kernel has resolved.** Anything else — no route, an unresolved or failed neighbour, a local
//! destination, an interface without a MAC — has no entry, and the program passes such packets
//! up, where user space sends them (and so makes the kernel resolve the neighbour); the next
//! refresh fills the entry in.
use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use relay_common::{Neighbour, NextHopKey};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_VIA: u16 = 18;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Neighbour states with a usable link-layer address (REACHABLE, STALE, DELAY, PROBE,
/// NOARP, PERMANENT): the ones the kernel itself sends to.
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
/// Multicast groups whose messages mean "look the routes up again": IPv4 routes and rules.
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;

/// Why a destination has no next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// No usable route (unreachable, blackhole, prohibited, or an error from the kernel).
    NoRoute(String),
    /// The route's neighbour (gateway or destination) is not resolved (yet).
    NoNeighbour(Ipv4Addr),
    /// The route leaves through an interface the fast path cannot send on (no Ethernet MAC).
    Egress(String),
}

impl Unresolved {
    /// A stable lowercase name (matches the fast path's pass counters where one applies).
    pub fn reason(&self) -> &'static str {
        match self {
            Unresolved::NoRoute(_) => "no_route",
            Unresolved::NoNeighbour(_) => "no_neighbour",
            Unresolved::Egress(_) => "egress_unavailable",
        }
    }
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unresolved::NoRoute(why) => write!(f, "no route ({why})"),
            Unresolved::NoNeighbour(n) => write!(f, "neighbour {n} not resolved"),
            Unresolved::Egress(why) => write!(f, "egress unusable ({why})"),
        }
    }
}

/// The output route from a source to a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    oif: u32,
    /// The neighbour to send to: the gateway, or the destination itself.
    neighbour: Ipv4Addr,
}

/// A link's Ethernet address and MTU.
#[derive(Clone, Copy, Debug)]
struct Link {
    mac: Option<[u8; 6]>,
    mtu: u32,
}

/// A netlink socket (rtnetlink unless opened with [`Netlink::open_protocol`]) bound in the
/// network namespace of the thread that opened it.
pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn nl_socket(protocol: libc::c_int, groups: u32, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags =
        libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, flags, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sockaddr_nl` is plain data; zeroed is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = groups;
    // SAFETY: `sa` is a valid sockaddr_nl of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Appends one route attribute (4-byte aligned).
pub(crate) fn push_attr(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

/// The attributes in `data` (after a message's fixed header).
pub(crate) fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind, value))
    })
}

fn ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from)
}

impl Netlink {
    pub(crate) fn open() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    /// A socket of another netlink family (`NETLINK_GENERIC`…).
    pub(crate) fn open_protocol(protocol: libc::c_int) -> io::Result<Self> {
        Ok(Self {
            fd: nl_socket(protocol, 0, false)?,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    /// Sends a request of `kind` with `body` (fixed header and attributes) and calls `each`
    /// with (type, payload) for every answer until the request is complete.
    pub(crate) fn request(
        &mut self,
        kind: u16,
        flags: u16,
        body: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
        msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: `msg` is a valid buffer of the given length; the kernel is the destination.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let dump = flags & NLM_F_DUMP != 0;
        loop {
            // SAFETY: `buf` is a valid writable buffer of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut data = &self.buf[..n as usize];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let mtype = u16::from_ne_bytes([data[4], data[5]]);
                let mseq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink message",
                    ));
                }
                let payload = &data[NLMSG_HDRLEN..len];
                data = &data[len.next_multiple_of(4).min(data.len())..];
                if mseq != seq {
                    continue;
                }
                match mtype {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => {
                        each(mtype, payload);
                        if !dump {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// The output route from `src` to `dst` (`ip route get <dst> from <src>`).
    fn route(&mut self, src: Ipv4Addr, dst: Ipv4Addr) -> Result<Route, Unresolved> {
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = vec![libc::AF_INET as u8, 32, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        push_attr(&mut body, RTA_DST, &dst.octets());
        push_attr(&mut body, RTA_SRC, &src.octets());
        let mut found: Option<Result<Route, Unresolved>> = None;
        self.request(RTM_GETROUTE, 0, &body, |mtype, payload| {
            if mtype != RTM_NEWROUTE || payload.len() < 12 {
                return;
            }
            let rtype = payload[7];
            let (mut oif, mut gateway, mut via) = (0, None, false);
            for (kind, value) in attrs(&payload[12..]) {
                match kind {
                    RTA_OIF => {
                        oif = value
                            .get(..4)
                            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    }
                    RTA_GATEWAY => gateway = ipv4(value),
                    RTA_VIA => via = true,
                    _ => {}
                }
            }
            found = Some(match rtype {
                RTN_UNICAST if via => Err(Unresolved::NoRoute("IPv6 gateway".into())),
                RTN_UNICAST if oif != 0 => Ok(Route {
                    oif,
                    neighbour: gateway.unwrap_or(dst),
                }),
                RTN_LOCAL => Err(Unresolved::NoRoute("local destination".into())),
                t => Err(Unresolved::NoRoute(format!("route type {t}"))),
            });
        })
        .map_err(|e| Unresolved::NoRoute(e.to_string()))?;
        found.unwrap_or_else(|| Err(Unresolved::NoRoute("no answer".into())))
    }

    /// Every IPv4 neighbour with a usable link-layer address, by (interface, address).
    fn neighbours(&mut self) -> io::Result<HashMap<(u32, Ipv4Addr), [u8; 6]>> {
        // struct ndmsg: family, pad1, pad2 (u16), ifindex (i32), state (u16), flags, type.
        let body = [libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut out = HashMap::new();
        self.request(RTM_GETNEIGH, NLM_F_DUMP, &body, |mtype, p| {
            if mtype != RTM_NEWNEIGH || p.len() < 12 || p[0] != libc::AF_INET as u8 {
                return;
            }
            let ifindex = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
            let state = u16::from_ne_bytes([p[8], p[9]]);
            if state & NUD_VALID == 0 {
                return;
            }
            let (mut dst, mut mac) = (None, None);
            for (kind, value) in attrs(&p[12..]) {
                match kind {
                    NDA_DST => dst = ipv4(value),
                    NDA_LLADDR => mac = <[u8; 6]>::try_from(value).ok(),
                    _ => {}
                }
            }
            if let (Some(dst), Some(mac)) = (dst, mac) {
                out.insert((ifindex, dst), mac);
            }
        })?;
        Ok(out)
    }

    /// Every interface's Ethernet address (if it has one) and MTU, by index.
    fn links(&mut self) -> io::Result<HashMap<u32, Link>> {
        // struct ifinfomsg: family, pad, type (u16), index (i32), flags (u32), change (u32).
        let body = [0u8; 16];
        let mut out = HashMap::new();
        self.request(RTM_GETLINK, NLM_F_DUMP, &body, |mtype, p| {
            if mtype != RTM_NEWLINK || p.len() < 16 {
                return;
            }
            let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
            let mut link = Link { mac: None, mtu: 0 };
            for (kind, value) in attrs(&p[16..]) {
                match kind {
                    IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(value).ok(),
                    IFLA_MTU => {
                        link.mtu = value
                            .get(..4)
                            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    }
                    _ => {}
                }
            }
            out.insert(index, link);
        })?;
        Ok(out)
    }
}

/// How often every route is looked up again even without a change notification.
const FULL_REFRESH_TICKS: u32 = 30;

/// Resolves next hops for (relay address, destination) pairs. Routes are cached and looked up
/// again when the kernel announces a route or rule change (or every [`FULL_REFRESH_TICKS`]
/// refreshes); links and neighbours are read afresh on every refresh.
pub struct Resolver {
    nl: Netlink,
    /// Subscribed to route and rule changes; any message there invalidates the route cache.
    events: OwnedFd,
    routes: HashMap<NextHopKey, Result<Route, Unresolved>>,
    links: HashMap<u32, Link>,
    neighbours: HashMap<(u32, Ipv4Addr), [u8; 6]>,
    ticks: u32,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

fn key_addrs(key: NextHopKey) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::from(key.saddr.to_ne_bytes()),
        Ipv4Addr::from(key.daddr.to_ne_bytes()),
    )
}

impl Resolver {
    /// Opens the netlink sockets in the calling thread's network namespace (they stay bound to
    /// it, whichever thread uses them later).
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            nl: Netlink::open()?,
            events: nl_socket(
                libc::NETLINK_ROUTE,
                RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE,
                true,
            )?,
            routes: HashMap::new(),
            links: HashMap::new(),
            neighbours: HashMap::new(),
            ticks: 0,
        })
    }

    /// Whether a route or rule change was announced since the last call (drains the events).
    fn routes_changed(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        let mut changed = false;
        loop {
            // SAFETY: `buf` is a valid writable buffer; the socket is non-blocking.
            let n = unsafe {
                libc::recv(
                    self.events.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n > 0 {
                changed = true;
                continue;
            }
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                // Notifications were lost: assume a change.
                changed = true;
                continue;
            }
            return changed;
        }
    }

    /// Reads the link and neighbour tables afresh and drops cached routes if they may have
    /// changed. Call before a round of [`Resolver::resolve`].
    pub fn refresh(&mut self) -> io::Result<()> {
        self.ticks = self.ticks.wrapping_add(1);
        if self.routes_changed() || self.ticks % FULL_REFRESH_TICKS == 0 {
            self.routes.clear();
        }
        self.links = self.nl.links()?;
        self.neighbours = self.nl.neighbours()?;
        Ok(())
    }

    /// Forgets cached routes for pairs not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(&NextHopKey) -> bool) {
        self.routes.retain(|k, _| keep(k));
    }

    /// The next hop for `key`, from the tables read by the last [`Resolver::refresh`] (the
    /// route is looked up now if not cached, or if it had failed).
    pub fn resolve(&mut self, key: NextHopKey) -> Result<Neighbour, Unresolved> {
        let (src, dst) = key_addrs(key);
        let route = match self.routes.get(&key) {
            Some(Ok(r)) => *r,
            _ => {
                let r = self.nl.route(src, dst);
                self.routes.insert(key, r.clone());
                r?
            }
        };
        let link = self
            .links
            .get(&route.oif)
            .ok_or_else(|| Unresolved::Egress(format!("interface {} gone", route.oif)))?;
        let smac = link
            .mac
            .ok_or_else(|| Unresolved::Egress(format!("interface {} has no MAC", route.oif)))?;
        let dmac = *self
            .neighbours
            .get(&(route.oif, route.neighbour))
            .ok_or(Unresolved::NoNeighbour(route.neighbour))?;
        Ok(Neighbour {
            dmac,
            smac,
            ifindex: route.oif,
            mtu: u16::try_from(link.mtu).unwrap_or(u16::MAX),
            reserved: [0; 2],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut m = Vec::new();
        push_attr(&mut m, RTA_DST, &[192, 0, 2, 10]);
        push_attr(&mut m, NDA_LLADDR, &[2, 0, 0, 0, 0, 1]);
        let got: Vec<_> = attrs(&m).collect();
        assert_eq!(
            got,
            vec![
                (RTA_DST, &[192u8, 0, 2, 10][..]),
                (NDA_LLADDR, &[2u8, 0, 0, 0, 0, 1][..])
            ]
        );
    }

    #[test]
    fn truncated_attributes_end_the_walk() {
        let mut m = Vec::new();
        push_attr(&mut m, RTA_DST, &[192, 0, 2, 10]);
        m.extend_from_slice(&[40, 0, 1, 0]);
        assert_eq!(attrs(&m).count(), 1);
    }
}
