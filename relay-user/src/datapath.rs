//! The interface every data path implements: install, update and remove channels, read their
//! counters. Channels are keyed by their even relay RTP port; RTCP uses the port above it.
use relay_common::{Channel, ChannelStats};

/// What a data path can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error("port {port} is not an even port in the relay range {min}-{max}")]
    PortOutOfRange { port: u16, min: u16, max: u16 },
    #[error("no channel on port {0}")]
    NotFound(u16),
    #[error("channel on port {port} is invalid: {reason}")]
    InvalidChannel { port: u16, reason: &'static str },
    #[error("cannot bind relay port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("bpf map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("data path is shut down")]
    ShutDown,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One data path: the XDP maps or the socket relay.
pub trait DataPath: Send + Sync {
    /// A short name for logs and metric labels (`"xdp"`, `"userspace"`).
    fn name(&self) -> &'static str;
    /// Installs the channel whose even RTP port is `port`, or replaces it (counters are kept).
    fn install(&self, port: u16, channel: &Channel) -> Result<(), DataPathError>;
    /// Removes the channel on `port`; `NotFound` if there is none.
    fn remove(&self, port: u16) -> Result<(), DataPathError>;
    /// The channel on `port` as this path currently knows it (with latched addresses).
    fn channel(&self, port: u16) -> Result<Channel, DataPathError>;
    /// Packets and bytes this path forwarded for the channel on `port`, by direction.
    fn stats(&self, port: u16) -> Result<ChannelStats, DataPathError>;
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of [`relay_common::DirectionStats::last_seen_ns`]
/// on both data paths (`bpf_ktime_get_ns` / `bpf_ktime_get_coarse_ns` in the XDP program).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
