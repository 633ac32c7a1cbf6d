//! The host's own IPv4 addresses, as the kernel has them now: what
//! [`relay_core::HostAddresses`] asks when a request names a relay or peer address.
//!
//! Invariant: a lookup that misses re-reads the kernel's list (at most once per
//! [`REFRESH_AFTER`]), so an address added after the start is found on the next request, and
//! a burst of requests naming foreign addresses costs one read, not one per request.
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The shortest time between two reads of the kernel's address list.
pub const REFRESH_AFTER: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
struct Snapshot {
    local: HashSet<Ipv4Addr>,
    broadcast: HashSet<Ipv4Addr>,
    read_at: Option<Instant>,
}

/// How the kernel's address list is read.
pub type Reader = Box<dyn Fn() -> std::io::Result<Vec<if_addrs::Interface>> + Send + Sync>;

/// The host's IPv4 addresses and subnet broadcast addresses, read with `getifaddrs`.
pub struct HostTable {
    snapshot: Mutex<Snapshot>,
    reader: Reader,
}

impl std::fmt::Debug for HostTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTable")
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

impl Default for HostTable {
    fn default() -> Self {
        HostTable::new()
    }
}

impl HostTable {
    /// A table of the calling process's network namespace, read on first use.
    pub fn new() -> HostTable {
        HostTable::with_reader(Box::new(if_addrs::get_if_addrs))
    }

    /// A table read with `reader` (e.g. inside another network namespace, where a test runs
    /// the relay).
    pub fn with_reader(reader: Reader) -> HostTable {
        HostTable {
            snapshot: Mutex::default(),
            reader,
        }
    }

    /// Whether `test` holds for the snapshot, re-reading the kernel's list once when it does
    /// not and the snapshot is older than [`REFRESH_AFTER`].
    fn check(&self, test: impl Fn(&Snapshot) -> bool) -> bool {
        let mut s = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        if s.read_at.is_some() && test(&s) {
            return true;
        }
        if s.read_at.is_some_and(|t| t.elapsed() < REFRESH_AFTER) {
            return false;
        }
        *s = read(&self.reader);
        test(&s)
    }
}

/// The kernel's list now. An error reads as an empty list (every address then looks foreign:
/// requests naming a relay address are refused, which is the safe side), and is logged.
fn read(reader: &Reader) -> Snapshot {
    let mut s = Snapshot {
        read_at: Some(Instant::now()),
        ..Snapshot::default()
    };
    match reader() {
        Ok(ifaces) => {
            for i in ifaces {
                if let if_addrs::IfAddr::V4(v4) = i.addr {
                    s.local.insert(v4.ip);
                    if let Some(b) = v4.broadcast {
                        s.broadcast.insert(b);
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the host's addresses failed"),
    }
    s
}

impl relay_core::HostAddresses for HostTable {
    fn is_local(&self, ip: Ipv4Addr) -> bool {
        // The whole of 127.0.0.0/8 is local on Linux, though only 127.0.0.1 is listed.
        ip.is_loopback() || self.check(|s| s.local.contains(&ip))
    }

    fn is_broadcast(&self, ip: Ipv4Addr) -> bool {
        self.check(|s| s.broadcast.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::HostAddresses;

    #[test]
    fn loopback_is_local_and_test_net_is_not() {
        let t = HostTable::new();
        assert!(t.is_local(Ipv4Addr::LOCALHOST));
        assert!(t.is_local(Ipv4Addr::new(127, 0, 0, 9)));
        // TEST-NET-3 is never assigned to a machine running the tests.
        assert!(!t.is_local(Ipv4Addr::new(203, 0, 113, 77)));
        assert!(!t.is_broadcast(Ipv4Addr::new(203, 0, 113, 77)));
    }
}
