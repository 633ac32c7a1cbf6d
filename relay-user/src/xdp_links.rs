//! What the host's interfaces offer the XDP fast path, read without changing anything: the XDP
//! programs attached now (rtnetlink `IFLA_XDP`), the driver's XDP features (the `netdev`
//! generic-netlink family, Linux ≥ 6.3), the driver's name and TX checksum offload (ethtool
//! ioctls), and for a veth its peer — looked at in the peer's own network namespace when that
//! namespace can be found (named by `ip netns`, or the namespace of a running process).
//!
//! The invariant a reader must know: **every call here is a query.** Nothing attaches,
//! detaches or configures anything, so `homerelay doctor` can look at the interfaces of a
//! running relay without disturbing it.
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;

use crate::nexthop::{Netlink, attrs, push_attr};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GTXCSUM: u32 = 0x16;
/// `struct ethtool_drvinfo`: cmd, driver[32], version[32], fw_version[32], bus_info[32],
/// erom_version[32], reserved2[12], then five u32 counts.
const DRVINFO_LEN: usize = 4 + 5 * 32 + 12 + 5 * 4;

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// In the driver (`xdpdrv`).
    Native,
    /// On the generic (skb) path (`xdpgeneric`).
    Generic,
    /// Offloaded to the NIC (`xdpoffload`).
    Offload,
}

impl AttachMode {
    /// A stable lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Offload => "offload",
        }
    }
}

/// One XDP program attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub mode: AttachMode,
    /// The kernel's program id (`bpftool prog show id N`).
    pub prog_id: u32,
}

/// The XDP features a driver reports (`enum netdev_xdp_act`, Linux ≥ 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    /// Native XDP: `XDP_PASS`, `XDP_DROP`, `XDP_TX` in the driver.
    pub const BASIC: u64 = 1 << 0;
    /// The driver carries out `XDP_REDIRECT` returned by a program on it.
    pub const REDIRECT: u64 = 1 << 1;
    /// The interface can be the target of a redirect (`ndo_xdp_xmit`). For a veth: its peer
    /// has an XDP program (or GRO), without which frames sent out of it are dropped.
    pub const NDO_XMIT: u64 = 1 << 2;
    const NAMES: [(u64, &'static str); 7] = [
        (Self::BASIC, "basic"),
        (Self::REDIRECT, "redirect"),
        (Self::NDO_XMIT, "ndo-xmit"),
        (1 << 3, "xsk-zerocopy"),
        (1 << 4, "hw-offload"),
        (1 << 5, "rx-sg"),
        (1 << 6, "ndo-xmit-sg"),
    ];

    /// Whether every bit of `flags` is set.
    pub fn has(self, flags: u64) -> bool {
        self.0 & flags == flags
    }

    /// The set flags' names (as `ynl` prints them), `none` for none.
    pub fn names(self) -> String {
        let v: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, n)| *n)
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

/// The other end of a veth, as seen from its own network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub name: String,
    /// Where its namespace was found (`/var/run/netns/NAME`, `/proc/PID/ns/net`); `None`: the
    /// namespace of the interface itself.
    pub netns: Option<String>,
    pub xdp: Vec<Attached>,
    /// TX checksum offload on (`ethtool -k PEER | grep tx-checksumming`); `None`: unknown.
    pub tx_checksum: Option<bool>,
}

/// A veth's peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its index in its own namespace.
    pub ifindex: u32,
    /// The id of its namespace as this one knows it; `None`: the same namespace.
    pub netnsid: Option<i32>,
    /// The peer itself; `None` when its namespace could not be found.
    pub view: Option<PeerView>,
}

/// What one interface offers the fast path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    /// The link kind (`veth`, `bridge`, …); `None` for a physical device.
    pub kind: Option<String>,
    /// The driver's name (`ethtool -i`); `None` where the device has none to tell.
    pub driver: Option<String>,
    /// Programs attached now.
    pub xdp: Vec<Attached>,
    /// `None`: this kernel does not report XDP features (before Linux 6.3).
    pub xdp_features: Option<XdpFeatures>,
    pub tx_checksum: Option<bool>,
    /// Only for a veth.
    pub peer: Option<Peer>,
}

impl LinkInfo {
    /// Whether the interface is a veth.
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// What one `RTM_NEWLINK` message says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LinkMessage {
    ifindex: u32,
    name: Option<String>,
    kind: Option<String>,
    link: Option<u32>,
    link_netnsid: Option<i32>,
    xdp: Vec<Attached>,
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn string_of(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// The attached programs in an `IFLA_XDP` nest.
fn parse_xdp(nest: &[u8]) -> Vec<Attached> {
    let (mut attached, mut prog, mut drv, mut skb, mut hw) = (0u8, 0, 0, 0, 0);
    for (kind, v) in attrs(nest) {
        match kind {
            IFLA_XDP_ATTACHED => attached = v.first().copied().unwrap_or(0),
            IFLA_XDP_PROG_ID => prog = u32_of(v).unwrap_or(0),
            IFLA_XDP_DRV_PROG_ID => drv = u32_of(v).unwrap_or(0),
            IFLA_XDP_SKB_PROG_ID => skb = u32_of(v).unwrap_or(0),
            IFLA_XDP_HW_PROG_ID => hw = u32_of(v).unwrap_or(0),
            _ => {}
        }
    }
    // One mode: XDP_ATTACHED_{DRV,SKB,HW} with IFLA_XDP_PROG_ID. Several (XDP_ATTACHED_MULTI):
    // one id attribute per mode.
    let single = match attached {
        XDP_ATTACHED_DRV => Some(AttachMode::Native),
        XDP_ATTACHED_SKB => Some(AttachMode::Generic),
        XDP_ATTACHED_HW => Some(AttachMode::Offload),
        _ => None,
    };
    if let Some(mode) = single
        && prog != 0
    {
        return vec![Attached {
            mode,
            prog_id: prog,
        }];
    }
    [
        (AttachMode::Native, drv),
        (AttachMode::Generic, skb),
        (AttachMode::Offload, hw),
    ]
    .into_iter()
    .filter(|&(_, id)| id != 0)
    .map(|(mode, prog_id)| Attached { mode, prog_id })
    .collect()
}

/// An `RTM_NEWLINK` payload (`struct ifinfomsg` and attributes).
fn parse_link(p: &[u8]) -> Option<LinkMessage> {
    let ifindex = u32_of(p.get(4..8)?)?;
    let mut m = LinkMessage {
        ifindex,
        ..LinkMessage::default()
    };
    for (kind, v) in attrs(p.get(16..)?) {
        match kind {
            IFLA_IFNAME => m.name = Some(string_of(v)),
            IFLA_LINK => m.link = u32_of(v),
            IFLA_LINK_NETNSID => m.link_netnsid = u32_of(v).map(|n| n as i32),
            IFLA_LINKINFO => {
                m.kind = attrs(v)
                    .find(|&(k, _)| k == IFLA_INFO_KIND)
                    .map(|(_, v)| string_of(v));
            }
            IFLA_XDP => m.xdp = parse_xdp(v),
            _ => {}
        }
    }
    Some(m)
}

/// `RTM_GETLINK` for one interface of the calling thread's namespace.
fn get_link(nl: &mut Netlink, ifindex: u32) -> io::Result<Option<LinkMessage>> {
    // struct ifinfomsg: family, pad, type (u16), index (i32), flags (u32), change (u32).
    let mut body = [0u8; 16];
    body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    let mut found = None;
    match nl.request(RTM_GETLINK, 0, &body, |mtype, p| {
        if mtype == RTM_NEWLINK {
            found = parse_link(p);
        }
    }) {
        Ok(()) => Ok(found),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The index of interface `name` in the calling thread's namespace; `None` if there is none.
pub fn ifindex(name: &str) -> Option<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// One ethtool ioctl on `name` with the command buffer `data` (its first u32 the command).
fn ethtool(name: &str, data: &mut [u8]) -> io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    // SAFETY: plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = data.as_mut_ptr().cast();
    // SAFETY: SIOCETHTOOL reads the name and reads/writes the command buffer `data`, which is
    // as large as the command's structure and lives for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The driver's name (`ethtool -i`).
fn driver(name: &str) -> Option<String> {
    let mut buf = [0u8; DRVINFO_LEN];
    buf[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    ethtool(name, &mut buf).ok()?;
    let d = string_of(&buf[4..36]);
    (!d.is_empty()).then_some(d)
}

/// Whether TX checksum offload is on (`ethtool -k`: tx-checksumming).
fn tx_checksum(name: &str) -> Option<bool> {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&ETHTOOL_GTXCSUM.to_ne_bytes());
    ethtool(name, &mut buf).ok()?;
    Some(u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]) != 0)
}

/// The XDP features of `ifindex` from the `netdev` generic-netlink family; `None` when the
/// kernel has no such family (before Linux 6.3) or does not answer for the device.
fn xdp_features(ifindex: u32) -> Option<XdpFeatures> {
    let mut nl = Netlink::open_protocol(libc::NETLINK_GENERIC).ok()?;
    // struct genlmsghdr: cmd, version, reserved (u16).
    let mut body = vec![CTRL_CMD_GETFAMILY, 1, 0, 0];
    push_attr(&mut body, CTRL_ATTR_FAMILY_NAME, b"netdev\0");
    let mut family = None;
    nl.request(GENL_ID_CTRL, 0, &body, |_, p| {
        if let Some(attrs_at) = p.get(4..) {
            family = attrs(attrs_at)
                .find(|&(k, _)| k == CTRL_ATTR_FAMILY_ID)
                .and_then(|(_, v)| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)));
        }
    })
    .ok()?;
    let family = family?;
    let mut body = vec![NETDEV_CMD_DEV_GET, 1, 0, 0];
    push_attr(&mut body, NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes());
    let mut features = None;
    nl.request(family, 0, &body, |_, p| {
        if let Some(attrs_at) = p.get(4..) {
            features = attrs(attrs_at)
                .find(|&(k, _)| k == NETDEV_A_DEV_XDP_FEATURES)
                .and_then(|(_, v)| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?)));
        }
    })
    .ok()?;
    features.map(XdpFeatures)
}

/// The id this namespace gives the namespace of `ns` (`RTM_GETNSID`), if it gave one.
fn nsid_of(nl: &mut Netlink, ns: &File) -> Option<i32> {
    // struct rtgenmsg (one byte, aligned to four).
    let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    push_attr(&mut body, NETNSA_FD, &(ns.as_raw_fd() as u32).to_ne_bytes());
    let mut id = None;
    nl.request(RTM_GETNSID, 0, &body, |mtype, p| {
        if mtype == RTM_NEWNSID
            && let Some(a) = p.get(4..)
        {
            id = attrs(a)
                .find(|&(k, _)| k == NETNSA_NSID)
                .and_then(|(_, v)| u32_of(v))
                .map(|n| n as i32);
        }
    })
    .ok()?;
    id.filter(|&n| n >= 0)
}

/// The network namespace this one calls `nsid`: searched among the namespaces `ip netns`
/// names, then those of running processes (a container's). Returns it open, with its path.
fn find_netns(nsid: i32) -> Option<(File, String)> {
    let mut nl = Netlink::open().ok()?;
    let mut seen = std::collections::HashSet::new();
    let named = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let of_processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path().join("ns/net"));
    for path in named.chain(of_processes) {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if nsid_of(&mut nl, &file) == Some(nsid) {
            return Some((file, path.display().to_string()));
        }
    }
    None
}

/// Runs `f` on a scoped thread inside the network namespace `ns`; `None` if it cannot enter.
fn in_netns<R: Send>(ns: &File, f: impl FnOnce() -> R + Send) -> Option<R> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns reads the open descriptor and changes only this new thread's
            // network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(f())
        })
        .join()
        .ok()
        .flatten()
    })
}

/// The peer `ifindex` as its own namespace (the calling thread's) sees it.
fn peer_here(ifindex: u32, netns: Option<String>) -> Option<PeerView> {
    let mut nl = Netlink::open().ok()?;
    let m = get_link(&mut nl, ifindex).ok()??;
    let name = m.name?;
    Some(PeerView {
        tx_checksum: tx_checksum(&name),
        name,
        netns,
        xdp: m.xdp,
    })
}

/// Everything above about interface `name` of the calling thread's network namespace; `None`
/// when there is no such interface.
pub fn inspect(name: &str) -> io::Result<Option<LinkInfo>> {
    let Some(index) = ifindex(name) else {
        return Ok(None);
    };
    let mut nl = Netlink::open()?;
    let Some(m) = get_link(&mut nl, index)? else {
        return Ok(None);
    };
    let veth = m.kind.as_deref() == Some("veth");
    let peer = match (veth, m.link) {
        (true, Some(peer_index)) => Some(match m.link_netnsid {
            None => Peer {
                ifindex: peer_index,
                netnsid: None,
                view: peer_here(peer_index, None),
            },
            Some(nsid) => Peer {
                ifindex: peer_index,
                netnsid: Some(nsid),
                view: find_netns(nsid).and_then(|(ns, path)| {
                    in_netns(&ns, || peer_here(peer_index, Some(path))).flatten()
                }),
            },
        }),
        _ => None,
    };
    Ok(Some(LinkInfo {
        name: name.to_owned(),
        ifindex: index,
        kind: m.kind,
        driver: driver(name),
        xdp: m.xdp,
        xdp_features: xdp_features(index),
        tx_checksum: tx_checksum(name),
        peer,
    }))
}

/// A BPF program loaded on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedProgram {
    pub name: String,
    /// Compiled by the JIT (else the kernel interprets it).
    pub jitted: bool,
}

/// The BPF programs loaded on this host, by id. Listing programs needs `CAP_SYS_ADMIN`;
/// without it the map is empty.
pub fn loaded_programs() -> HashMap<u32, LoadedProgram> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            Some((
                p.id(),
                LoadedProgram {
                    name: p.name_as_str()?.to_owned(),
                    jitted: p.size_jitted() > 0,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nest(items: &[(u16, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (k, d) in items {
            push_attr(&mut v, *k, d);
        }
        v
    }

    #[test]
    fn xdp_attachments_are_read_in_both_forms() {
        let one = nest(&[
            (IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB]),
            (IFLA_XDP_PROG_ID, &7u32.to_ne_bytes()),
        ]);
        assert_eq!(
            parse_xdp(&one),
            [Attached {
                mode: AttachMode::Generic,
                prog_id: 7
            }]
        );
        let multi = nest(&[
            (IFLA_XDP_ATTACHED, &[4]),
            (IFLA_XDP_DRV_PROG_ID, &8u32.to_ne_bytes()),
            (IFLA_XDP_SKB_PROG_ID, &9u32.to_ne_bytes()),
        ]);
        assert_eq!(
            parse_xdp(&multi),
            [
                Attached {
                    mode: AttachMode::Native,
                    prog_id: 8
                },
                Attached {
                    mode: AttachMode::Generic,
                    prog_id: 9
                }
            ]
        );
        assert!(parse_xdp(&nest(&[(IFLA_XDP_ATTACHED, &[0])])).is_empty());
        assert!(
            parse_xdp(&[1, 2]).is_empty(),
            "truncated input is no attachment"
        );
    }

    #[test]
    fn a_link_message_gives_kind_peer_and_programs() {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&12u32.to_ne_bytes());
        push_attr(&mut p, IFLA_IFNAME, b"r-home\0");
        push_attr(&mut p, IFLA_LINK, &3u32.to_ne_bytes());
        push_attr(&mut p, IFLA_LINK_NETNSID, &1u32.to_ne_bytes());
        push_attr(&mut p, IFLA_LINKINFO, &nest(&[(IFLA_INFO_KIND, b"veth\0")]));
        push_attr(
            &mut p,
            IFLA_XDP,
            &nest(&[
                (IFLA_XDP_ATTACHED, &[XDP_ATTACHED_DRV]),
                (IFLA_XDP_PROG_ID, &40u32.to_ne_bytes()),
            ]),
        );
        let m = parse_link(&p).expect("parsed");
        assert_eq!(m.ifindex, 12);
        assert_eq!(m.name.as_deref(), Some("r-home"));
        assert_eq!(m.kind.as_deref(), Some("veth"));
        assert_eq!((m.link, m.link_netnsid), (Some(3), Some(1)));
        assert_eq!(m.xdp[0].mode, AttachMode::Native);
        assert!(parse_link(&[0; 6]).is_none());
    }

    #[test]
    fn feature_names() {
        assert_eq!(XdpFeatures(0).names(), "none");
        let veth = XdpFeatures(XdpFeatures::BASIC | XdpFeatures::REDIRECT | 1 << 5);
        assert_eq!(veth.names(), "basic, redirect, rx-sg");
        assert!(veth.has(XdpFeatures::BASIC | XdpFeatures::REDIRECT));
        assert!(!veth.has(XdpFeatures::NDO_XMIT));
    }
}
