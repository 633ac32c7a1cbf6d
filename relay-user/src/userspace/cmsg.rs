//! Ancillary data (cmsg) and `sockaddr_in` conversions for the relay sockets.
//!
//! Received datagrams carry one `IP_TOS` message (enabled by `IP_RECVTOS`) and, on a socket
//! bound to the wildcard, one `IP_PKTINFO` (the destination address); sent datagrams
//! carry an optional `IP_PKTINFO` (source address, when the socket is bound to the wildcard)
//! and an optional `IP_TOS` (the received DSCP/ECN byte, passed on unchanged). The invariant:
//! **every buffer is a fixed [`CmsgBuf`], 8-byte aligned, and nothing here allocates**, since
//! these run once per datagram.
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Capacity of one control-message buffer: room for `IP_PKTINFO` and `IP_TOS` (asserted).
pub const CMSG_CAP: usize = 64;

/// One datagram's control-message buffer, aligned like `struct cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CmsgBuf(pub(crate) [u8; CMSG_CAP]);

impl CmsgBuf {
    pub(crate) const ZERO: Self = Self([0; CMSG_CAP]);
}

/// `CMSG_ALIGN`: control messages are aligned to `size_t`.
const fn align(len: usize) -> usize {
    (len + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}
/// Offset of a control message's data from its header (`CMSG_DATA - cmsg`).
const HDR: usize = align(size_of::<libc::cmsghdr>());
/// `CMSG_SPACE`: bytes a message with `len` bytes of data occupies.
const fn space(len: usize) -> usize {
    HDR + align(len)
}
/// `CMSG_LEN`: the `cmsg_len` of a message with `len` bytes of data.
const fn cmsg_len(len: usize) -> usize {
    HDR + len
}

const _: () =
    assert!(space(size_of::<libc::in_pktinfo>()) + space(size_of::<libc::c_int>()) <= CMSG_CAP);
const _: () = assert!(align_of::<CmsgBuf>() >= align_of::<libc::cmsghdr>());

/// Appends one control message at `off`; returns the offset after it. The caller guarantees
/// (by the assertion above) that it fits.
fn put(buf: &mut CmsgBuf, off: usize, level: libc::c_int, ty: libc::c_int, data: &[u8]) -> usize {
    let end = off + space(data.len());
    assert!(end <= CMSG_CAP, "control message does not fit");
    // SAFETY: `cmsghdr` is a plain C struct of integers, valid when zeroed.
    let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
    hdr.cmsg_len = cmsg_len(data.len()) as _;
    hdr.cmsg_level = level;
    hdr.cmsg_type = ty;
    let slot = &mut buf.0[off..end];
    slot.fill(0);
    // SAFETY: `slot` is at least `space(data.len()) >= size_of::<cmsghdr>()` bytes long (checked
    // above); the write is unaligned so no alignment is assumed.
    unsafe { std::ptr::write_unaligned(slot.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
    slot[HDR..HDR + data.len()].copy_from_slice(data);
    end
}

/// Writes the control messages for one sent datagram into `buf` and returns their total
/// length (`msg_controllen`); 0 when there is nothing to attach.
///
/// `src`: the source address to send from (`IP_PKTINFO.ipi_spec_dst`; the kernel picks the
/// route's preferred source when absent). `tos`: the TOS byte to send with (`IP_TOS`).
pub(crate) fn encode_tx(buf: &mut CmsgBuf, src: Option<Ipv4Addr>, tos: Option<u8>) -> usize {
    let mut off = 0;
    if let Some(ip) = src {
        // ipi_ifindex 0: the routing table picks the interface; ipi_addr is ignored on send.
        let mut data = [0u8; size_of::<libc::in_pktinfo>()];
        // in_pktinfo = { int ipi_ifindex; struct in_addr ipi_spec_dst; struct in_addr ipi_addr; }
        data[4..8].copy_from_slice(&ip.octets());
        off = put(buf, off, libc::IPPROTO_IP, libc::IP_PKTINFO, &data);
    }
    if let Some(tos) = tos {
        // The kernel accepts an `int` or a single byte; `int` is what every kernel since IP_TOS
        // cmsgs were added understands.
        let data = libc::c_int::from(tos).to_ne_bytes();
        off = put(buf, off, libc::IPPROTO_IP, libc::IP_TOS, &data);
    }
    off
}

/// Reads one control message header at `off` of the first `len` bytes of `buf`.
fn header_at(buf: &CmsgBuf, len: usize, off: usize) -> Option<(libc::cmsghdr, usize)> {
    let len = len.min(CMSG_CAP);
    if off + size_of::<libc::cmsghdr>() > len {
        return None;
    }
    // SAFETY: the range `off..off + size_of::<cmsghdr>()` is inside `buf` (checked above); the
    // read is unaligned and `cmsghdr` is plain integers, valid for any bit pattern.
    let hdr = unsafe { std::ptr::read_unaligned(buf.0[off..].as_ptr().cast::<libc::cmsghdr>()) };
    let clen = hdr.cmsg_len as usize;
    // `len - off` cannot underflow (checked above); `off + clen` could overflow for a
    // garbage `cmsg_len`.
    if clen < HDR || clen > len - off {
        return None;
    }
    Some((hdr, clen))
}

/// What the control messages of a received datagram say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Received {
    /// The TOS byte (`IP_TOS`, delivered with `IP_RECVTOS`).
    pub(crate) tos: Option<u8>,
    /// The IP header's destination address (`IP_PKTINFO.ipi_addr`, delivered with
    /// `IP_PKTINFO`).
    pub(crate) dst: Option<Ipv4Addr>,
}

/// Reads a received datagram's control messages; absent or malformed ones are `None`. `len` is
/// the `msg_controllen` the kernel returned.
pub(crate) fn decode_rx(buf: &CmsgBuf, len: usize) -> Received {
    let mut rx = Received::default();
    let mut off = 0;
    while let Some((hdr, clen)) = header_at(buf, len, off) {
        let data = &buf.0[off + HDR..off + clen];
        match (hdr.cmsg_level, hdr.cmsg_type) {
            (libc::IPPROTO_IP, libc::IP_TOS) => rx.tos = data.first().copied(),
            // `struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }`
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= 12 => {
                rx.dst = Some(Ipv4Addr::new(data[8], data[9], data[10], data[11]));
            }
            _ => {}
        }
        off += align(clen);
    }
    rx
}

/// The TOS byte of a received datagram (see [`decode_rx`]).
pub(crate) fn decode_tos(buf: &CmsgBuf, len: usize) -> Option<u8> {
    decode_rx(buf, len).tos
}

/// An IPv4 socket address in the kernel's representation.
pub(crate) fn to_sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The address the kernel wrote into a `msg_name` of `len` bytes; `None` unless IPv4.
pub(crate) fn from_sockaddr(sa: &libc::sockaddr_in, len: libc::socklen_t) -> Option<SocketAddrV4> {
    (len as usize >= size_of::<libc::sockaddr_in>()
        && sa.sin_family == libc::AF_INET as libc::sa_family_t)
        .then(|| {
            SocketAddrV4::new(
                Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sa.sin_port),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks `buf` with the C library's own `CMSG_FIRSTHDR`/`CMSG_NXTHDR`, as the kernel would.
    fn walk_with_libc(buf: &mut CmsgBuf, len: usize) -> Vec<(i32, i32, Vec<u8>)> {
        // SAFETY: an all-zero msghdr is valid; only the control fields are used.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = len as _;
        let mut out = Vec::new();
        // SAFETY: `msg` describes `len` valid bytes of `buf`; the macros stay within them.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let data_len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = std::slice::from_raw_parts(libc::CMSG_DATA(c), data_len).to_vec();
                out.push(((*c).cmsg_level, (*c).cmsg_type, data));
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        out
    }

    #[test]
    fn layout_constants_match_libc() {
        for n in [0usize, 1, 4, 12] {
            // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
            let (s, l) = unsafe { (libc::CMSG_SPACE(n as u32), libc::CMSG_LEN(n as u32)) };
            assert_eq!(space(n), s as usize);
            assert_eq!(cmsg_len(n), l as usize);
        }
    }

    #[test]
    fn pktinfo_and_tos_encode_as_the_kernel_expects() {
        let mut buf = CmsgBuf([0xaa; CMSG_CAP]);
        let len = encode_tx(&mut buf, Some(Ipv4Addr::new(192, 0, 2, 1)), Some(0xb8));
        // SAFETY: pure arithmetic.
        let expected = unsafe { libc::CMSG_SPACE(12) + libc::CMSG_SPACE(4) } as usize;
        assert_eq!(len, expected);
        let msgs = walk_with_libc(&mut buf, len);
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].0, msgs[0].1), (libc::IPPROTO_IP, libc::IP_PKTINFO));
        assert_eq!(msgs[0].2.len(), size_of::<libc::in_pktinfo>());
        // SAFETY: the data is exactly one in_pktinfo; read unaligned.
        let pi: libc::in_pktinfo =
            unsafe { std::ptr::read_unaligned(msgs[0].2.as_ptr().cast::<libc::in_pktinfo>()) };
        assert_eq!(pi.ipi_ifindex, 0);
        assert_eq!(pi.ipi_spec_dst.s_addr.to_ne_bytes(), [192, 0, 2, 1]);
        assert_eq!(pi.ipi_addr.s_addr, 0);
        assert_eq!((msgs[1].0, msgs[1].1), (libc::IPPROTO_IP, libc::IP_TOS));
        assert_eq!(msgs[1].2, 0xb8i32.to_ne_bytes());
    }

    #[test]
    fn encode_only_what_is_asked() {
        let mut buf = CmsgBuf::ZERO;
        assert_eq!(encode_tx(&mut buf, None, None), 0);
        let len = encode_tx(&mut buf, None, Some(0x2e));
        let msgs = walk_with_libc(&mut buf, len);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].1, libc::IP_TOS);
        let len = encode_tx(&mut buf, Some(Ipv4Addr::LOCALHOST), None);
        let msgs = walk_with_libc(&mut buf, len);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].1, libc::IP_PKTINFO);
    }

    /// Builds what the kernel's `put_cmsg(SOL_IP, IP_TOS, 1, &tos)` writes.
    fn received(entries: &[(i32, i32, &[u8])]) -> (CmsgBuf, usize) {
        let mut buf = CmsgBuf::ZERO;
        let mut off = 0;
        for (level, ty, data) in entries {
            off = put(&mut buf, off, *level, *ty, data);
        }
        (buf, off)
    }

    #[test]
    fn tos_is_found_among_other_messages() {
        let (buf, len) = received(&[(libc::IPPROTO_IP, libc::IP_TOS, &[0xb8])]);
        assert_eq!(decode_tos(&buf, len), Some(0xb8));
        let (buf, len) = received(&[
            (libc::IPPROTO_IP, libc::IP_PKTINFO, &[0; 12]),
            (libc::IPPROTO_IP, libc::IP_TOS, &[0x01]),
        ]);
        assert_eq!(decode_tos(&buf, len), Some(0x01));
        let (buf, len) = received(&[(libc::IPPROTO_IP, libc::IP_TTL, &[64, 0, 0, 0])]);
        assert_eq!(decode_tos(&buf, len), None);
    }

    #[test]
    fn the_destination_address_comes_from_ip_pktinfo() {
        let mut pktinfo = [0u8; 12];
        pktinfo[..4].copy_from_slice(&3i32.to_ne_bytes());
        pktinfo[4..8].copy_from_slice(&[192, 0, 2, 1]); // ipi_spec_dst: the local address
        pktinfo[8..].copy_from_slice(&[198, 51, 100, 1]); // ipi_addr: the header's destination
        let (buf, len) = received(&[
            (libc::IPPROTO_IP, libc::IP_PKTINFO, &pktinfo),
            (libc::IPPROTO_IP, libc::IP_TOS, &[0xb8]),
        ]);
        assert_eq!(
            decode_rx(&buf, len),
            Received {
                tos: Some(0xb8),
                dst: Some(Ipv4Addr::new(198, 51, 100, 1))
            }
        );
        // Cut short: ignored.
        let (buf, len) = received(&[(libc::IPPROTO_IP, libc::IP_PKTINFO, &pktinfo[..8])]);
        assert_eq!(decode_rx(&buf, len), Received::default());
    }

    #[test]
    fn malformed_control_data_is_ignored() {
        // Nothing received.
        assert_eq!(decode_tos(&CmsgBuf::ZERO, 0), None);
        // A length the kernel never reports: larger than the buffer.
        assert_eq!(decode_tos(&CmsgBuf([0xff; CMSG_CAP]), 4096), None);
        // A header whose cmsg_len is shorter than a header (would loop forever if trusted).
        let (mut buf, len) = received(&[(libc::IPPROTO_IP, libc::IP_TOS, &[7])]);
        buf.0[..size_of::<usize>()].fill(0);
        assert_eq!(decode_tos(&buf, len), None);
        // A header claiming more data than was received.
        let (mut buf, _) = received(&[(libc::IPPROTO_IP, libc::IP_TOS, &[7])]);
        assert_eq!(decode_tos(&buf, HDR), None);
        buf.0[0] = 200;
        assert_eq!(decode_tos(&buf, CMSG_CAP), None);
        // A second header whose cmsg_len is near usize::MAX: `off + cmsg_len` must not wrap
        // (found by the cmsg fuzz target: an overflow panic, and in release a wrapped sum that
        // passed the bounds check).
        let (mut buf, len) = received(&[
            (libc::IPPROTO_IP, libc::IP_TTL, &[64, 0, 0, 0]),
            (libc::IPPROTO_IP, libc::IP_TTL, &[64, 0, 0, 0]),
        ]);
        let second = space(4);
        buf.0[second..second + size_of::<usize>()].copy_from_slice(&(usize::MAX - 3).to_ne_bytes());
        assert_eq!(decode_tos(&buf, len), None);
        assert_eq!(decode_tos(&buf, CMSG_CAP), None);
        // An IP_TOS message with no data byte.
        let (buf, len) = received(&[(libc::IPPROTO_IP, libc::IP_TOS, &[])]);
        assert_eq!(decode_tos(&buf, len), None);
    }

    #[test]
    fn sockaddr_round_trips() {
        let a: SocketAddrV4 = "203.0.113.7:40000".parse().expect("address");
        let sa = to_sockaddr(a);
        assert_eq!(sa.sin_port.to_ne_bytes(), [0x9c, 0x40]);
        assert_eq!(sa.sin_addr.s_addr.to_ne_bytes(), [203, 0, 113, 7]);
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(from_sockaddr(&sa, len), Some(a));
        assert_eq!(from_sockaddr(&sa, len - 1), None);
        let mut v6 = sa;
        v6.sin_family = libc::AF_INET6 as libc::sa_family_t;
        assert_eq!(from_sockaddr(&v6, len), None);
    }
}
