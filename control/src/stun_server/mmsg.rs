//! `recvmmsg`/`sendmmsg` batches for the STUN server's UDP sockets: one system call for up to
//! [`BATCH`] datagrams each way. Buffers are allocated once per socket; the message headers
//! are built on the stack for each call, so nothing here holds a raw pointer across an await.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use relay_core::stun::{MAX_REQUEST_LEN, MAX_RESPONSE_LEN};

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// One byte more than the longest request, so that a longer datagram is seen as too long.
const RECV_LEN: usize = MAX_REQUEST_LEN + 1;

fn empty_iov() -> libc::iovec {
    libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }
}

fn empty_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all zeros is a valid (AF_UNSPEC) value.
    unsafe { std::mem::zeroed() }
}

fn empty_headers() -> [libc::mmsghdr; BATCH] {
    // SAFETY: mmsghdr is plain data; all zeros is an empty header (null pointers, no lengths).
    unsafe { std::mem::zeroed() }
}

/// The socket address in `s`, if it is IPv4 or IPv6.
fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says `s` holds a sockaddr_in, which fits in sockaddr_storage
            // and needs no stricter alignment.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `a` as a sockaddr_storage and the length of the address in it.
fn to_storage(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut s = empty_storage();
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, whose alignment is at least as strict.
            unsafe { std::ptr::write((&raw mut s).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut s).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (s, len as libc::socklen_t)
}

/// Sends IPv4 responses as atomic datagrams (RFC 6864): Don't Fragment set and IP ID 0
/// (`IP_PMTUDISC_DO`). With the default (`IP_PMTUDISC_WANT`) the kernel draws an IP ID per
/// datagram from a table hashed by destination, a cache miss per answer to a new source. An
/// IPv4 response is at most 80 bytes, far below any IPv4 path MTU.
pub fn dont_fragment(fd: RawFd) -> io::Result<()> {
    let value: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: `value` is a live c_int of the size passed; the fd is an open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Received datagrams: their bytes and sources.
pub struct RecvBatch {
    bufs: Box<[[u8; RECV_LEN]; BATCH]>,
    names: Box<[libc::sockaddr_storage; BATCH]>,
    /// Each datagram's whole length (`MSG_TRUNC`), which may exceed the buffer.
    lens: [usize; BATCH],
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").finish_non_exhaustive()
    }
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            bufs: Box::new([[0; RECV_LEN]; BATCH]),
            names: Box::new([empty_storage(); BATCH]),
            lens: [0; BATCH],
        }
    }

    /// `recvmmsg` without waiting: how many datagrams arrived (`WouldBlock` if none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov = [empty_iov(); BATCH];
        let mut msgs = empty_headers();
        for (k, (m, v)) in msgs.iter_mut().zip(iov.iter_mut()).enumerate() {
            *v = libc::iovec {
                iov_base: self.bufs[k].as_mut_ptr().cast(),
                iov_len: RECV_LEN,
            };
            m.msg_hdr.msg_name = (&raw mut self.names[k]).cast();
            m.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points to a buffer and a name owned by `self` or this frame,
        // of the lengths given; they outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                // MSG_TRUNC: each msg_len is the datagram's length, even if it was cut.
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, m) in self.lens.iter_mut().zip(&msgs[..n]) {
            *len = m.msg_len as usize;
        }
        Ok(n)
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] (cut at one byte over the longest
    /// request), its whole length, and its source (`None`: not IP).
    pub fn get(&self, i: usize) -> (&[u8], usize, Option<SocketAddr>) {
        let len = self.lens[i];
        (
            &self.bufs[i][..len.min(RECV_LEN)],
            len,
            from_storage(&self.names[i]),
        )
    }
}

/// Responses waiting to be sent: each with its destination and the local address to send
/// it from (the socket it was received on, or another one for CHANGE-REQUEST).
pub struct SendBatch {
    bufs: Box<[[u8; MAX_RESPONSE_LEN]; BATCH]>,
    lens: [usize; BATCH],
    to: [SocketAddr; BATCH],
    from: [SocketAddr; BATCH],
    n: usize,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl SendBatch {
    pub fn new() -> SendBatch {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        SendBatch {
            bufs: Box::new([[0; MAX_RESPONSE_LEN]; BATCH]),
            lens: [0; BATCH],
            to: [any; BATCH],
            from: [any; BATCH],
            n: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// The buffer the next response is written into (committed by [`SendBatch::push`]).
    pub fn next_buf(&mut self) -> &mut [u8; MAX_RESPONSE_LEN] {
        &mut self.bufs[self.n.min(BATCH - 1)]
    }

    /// Commits the response written into [`SendBatch::next_buf`]. At most [`BATCH`].
    pub fn push(&mut self, len: usize, to: SocketAddr, from: SocketAddr) {
        if self.n < BATCH {
            self.lens[self.n] = len;
            self.to[self.n] = to;
            self.from[self.n] = from;
            self.n += 1;
        }
    }

    /// Response `i`: bytes, destination, local address to send from.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr, SocketAddr) {
        (&self.bufs[i][..self.lens[i]], self.to[i], self.from[i])
    }

    /// `sendmmsg` of responses `first..` that leave from `local`, in order, up to the first
    /// that does not; returns how many of them the kernel took (`WouldBlock` if none).
    pub fn send_from(&self, fd: RawFd, first: usize, local: SocketAddr) -> io::Result<usize> {
        let run = self.from[first..self.n]
            .iter()
            .take_while(|&&f| f == local)
            .count();
        if run == 0 {
            return Ok(0);
        }
        let mut iov = [empty_iov(); BATCH];
        let mut names = [empty_storage(); BATCH];
        let mut msgs = empty_headers();
        for k in 0..run {
            let (storage, len) = to_storage(self.to[first + k]);
            names[k] = storage;
            iov[k] = libc::iovec {
                // sendmmsg does not write through it.
                iov_base: self.bufs[first + k].as_ptr() as *mut libc::c_void,
                iov_len: self.lens[first + k],
            };
            let h = &mut msgs[k].msg_hdr;
            h.msg_name = (&raw mut names[k]).cast();
            h.msg_namelen = len;
            h.msg_iov = &raw mut iov[k];
            h.msg_iovlen = 1;
        }
        // SAFETY: headers `..run` point to buffers and names owned by `self` or this frame,
        // of the lengths given; they outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                run as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_survive_the_round_trip_through_sockaddr_storage() {
        for a in [
            "127.0.0.1:3478",
            "198.51.100.7:65535",
            "[2001:db8::7]:40000",
            "[::ffff:192.0.2.1]:1",
        ] {
            let a: SocketAddr = a.parse().expect("address");
            let (s, len) = to_storage(a);
            assert_eq!(from_storage(&s), Some(a));
            let want = if a.is_ipv4() {
                std::mem::size_of::<libc::sockaddr_in>()
            } else {
                std::mem::size_of::<libc::sockaddr_in6>()
            };
            assert_eq!(len as usize, want);
        }
        assert_eq!(from_storage(&empty_storage()), None);
    }
}
