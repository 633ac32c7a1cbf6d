//! The comparison point: the relay everybody writes first. One thread, one UDP socket per
//! relay port, `epoll` to find readable sockets, then one `recv_from` and one `send_to` per
//! packet, with the same forwarding rule as homerelay ([`relay_user::forward::decide`]).
//! Deliberately no batching (`recvmmsg`/`sendmmsg`), no `SO_REUSEPORT` workers.
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use relay_common::Channel;
use relay_user::forward::{Datagram, Decision, LatchState, decide};
use relay_user::netns::{Host, Testbed};
use serde::Serialize;

use crate::cpu;

/// Packets read from one socket before looking at the others (fairness under overload).
const PER_SOCKET_BURST: usize = 64;

/// What the naive relay did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NaiveStats {
    pub forwarded: u64,
    pub dropped: u64,
    pub send_errors: u64,
}

/// A running naive relay (thread inside Relay's namespace).
#[derive(Debug)]
pub struct NaiveRelay {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<NaiveStats>>,
    /// The relay thread's id (for its CPU time).
    pub tid: i32,
}

impl NaiveRelay {
    /// Binds every channel's even port on all of Relay's addresses and starts forwarding.
    pub fn start(
        tb: &Testbed,
        channels: Vec<(u16, Channel)>,
        core: Option<usize>,
    ) -> anyhow::Result<NaiveRelay> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop2 = stop.clone();
        let handle = tb.spawn_in(Host::Relay, move || {
            let sockets = setup(&channels, core)?;
            let _ = ready_tx.send(cpu::gettid());
            forward_loop(sockets, channels, &stop2)
        });
        match ready_rx.recv() {
            Ok(tid) => Ok(NaiveRelay { stop, handle, tid }),
            Err(_) => match handle.join() {
                Ok(Err(e)) => Err(e.context("starting the naive relay")),
                Ok(Ok(_)) => bail!("naive relay stopped before it started"),
                Err(_) => bail!("naive relay thread panicked"),
            },
        }
    }

    /// Stops the relay and returns its counters.
    pub fn stop(self) -> anyhow::Result<NaiveStats> {
        self.stop.store(true, Ordering::Release);
        match self.handle.join() {
            Ok(r) => r,
            Err(_) => bail!("naive relay thread panicked"),
        }
    }
}

struct Sockets {
    epoll: std::os::fd::OwnedFd,
    socks: Vec<UdpSocket>,
}

/// `SO_RCVBUF` of the naive relay's sockets: 64 MiB, about 60,000 datagrams on veth.
const NAIVE_RECV_BUFFER: libc::c_int = 64 << 20;

fn set_recv_buffer(s: &UdpSocket, size: libc::c_int) {
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid descriptor and a pointer to a c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

fn setup(channels: &[(u16, Channel)], core: Option<usize>) -> anyhow::Result<Sockets> {
    if let Some(core) = core {
        cpu::pin_to(core)?;
    }
    // SAFETY: plain epoll_create1 call; the result is checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error()).context("epoll_create1");
    }
    // SAFETY: `ep` is a fresh descriptor owned by nobody else.
    let epoll = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ep) };
    let mut socks = Vec::with_capacity(channels.len());
    for (i, (port, _)) in channels.iter().enumerate() {
        let s =
            UdpSocket::bind(("0.0.0.0", *port)).with_context(|| format!("binding port {port}"))?;
        s.set_nonblocking(true)?;
        // A receive queue that holds a whole run (a run sends at most a few tens of thousands
        // of datagrams): a baseline thread starved by a busy machine delivers late instead of
        // losing packets in the kernel, so the end-to-end tests stay about correctness. Root
        // (CAP_NET_ADMIN) may exceed net.core.rmem_max; otherwise the kernel caps the request.
        set_recv_buffer(&s, NAIVE_RECV_BUFFER);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: both descriptors are open; `ev` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_ctl");
        }
        socks.push(s);
    }
    Ok(Sockets { epoll, socks })
}

fn forward_loop(
    s: Sockets,
    mut channels: Vec<(u16, Channel)>,
    stop: &AtomicBool,
) -> anyhow::Result<NaiveStats> {
    let mut stats = NaiveStats::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Acquire) {
        // SAFETY: `events` is a valid buffer of the length passed.
        let n = unsafe {
            libc::epoll_wait(
                s.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                20,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("epoll_wait");
        }
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            let sock = &s.socks[i];
            let (port, channel) = &mut channels[i];
            for _ in 0..PER_SOCKET_BURST {
                let (len, src) = match sock.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // ICMP errors reported on the socket and the like: not a packet.
                    Err(_) => continue,
                };
                let src = match src {
                    SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                        Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                        None => src,
                    },
                    v4 => v4,
                };
                // The benchmark's channels latch on the first packet: no policy memory needed.
                // Each socket is bound to one address: the kernel checked the destination.
                let dgram = Datagram {
                    src,
                    dst: None,
                    payload: &buf[..len],
                };
                match decide(channel, &mut LatchState::default(), *port, &dgram, 0, |_| 0) {
                    Decision::Forward { to, .. } => match sock.send_to(&buf[..len], to) {
                        Ok(_) => stats.forwarded += 1,
                        Err(_) => stats.send_errors += 1,
                    },
                    Decision::Drop(_) => stats.dropped += 1,
                }
            }
        }
    }
    Ok(stats)
}
