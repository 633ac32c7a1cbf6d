//! The relay as the control plane sees it: the user-space path always, the XDP fast path when
//! configured and usable, behind one [`DataPath`].
//!
//! The contract between the two paths (the invariant of this module): user space binds every
//! installed channel's ports and so receives whatever the fast path passes up. It forwards a new
//! flow first, latches the source, then pushes the learnt channel into the XDP maps, after
//! which the fast path carries the following packets. A channel is always installed in user
//! space before the fast path and removed from the fast path first, so no packet is ever
//! forwarded by XDP for a channel user space does not know. If the fast path fails (load,
//! attach, map update) the relay keeps working in user space and says why.
//!
//! Counters of the two paths are merged in [`Relay::stats`]: packets, bytes, RTP loss and
//! reordering add up; the RTP sequence and jitter state come from the path that saw the
//! direction's latest RTP packet (`relay_common::RtpState::merge`).
use std::sync::Arc;

use anyhow::Context as _;
use relay_common::{Channel, ChannelStats};

use crate::{
    datapath::{DataPath, DataPathError},
    userspace::{ChannelObserver, FastPathLastSeen, UserspaceConfig, UserspaceRelay},
    xdp::{XdpDataPath, XdpOptions},
};

/// How to run the relay.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Lowest relay port (inclusive); channels use even ports, RTCP the odd port above.
    pub port_min: u16,
    /// Highest relay port (inclusive).
    pub port_max: u16,
    /// User-space forwarding threads; 0 = one per CPU.
    pub workers: usize,
    /// Run the XDP fast path on these interfaces; `None` = user space only.
    pub xdp: Option<XdpOptions>,
    /// Fail to start if the fast path cannot be loaded (tests, benchmarks); otherwise the relay
    /// falls back to user space and logs why.
    pub require_xdp: bool,
}

impl Default for RelayOptions {
    /// The 180-channel layout (UDP 30528–30887), user space only.
    fn default() -> Self {
        Self {
            port_min: 30528,
            port_max: 30887,
            workers: 0,
            xdp: None,
            require_xdp: false,
        }
    }
}

/// The running relay.
pub struct Relay {
    userspace: UserspaceRelay,
    xdp: Option<Arc<XdpDataPath>>,
    xdp_unavailable: Option<String>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("xdp", &self.xdp)
            .field("xdp_unavailable", &self.xdp_unavailable)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Starts the relay in the calling thread's network namespace.
    pub fn start(opts: RelayOptions) -> anyhow::Result<Relay> {
        if opts.port_min > opts.port_max {
            anyhow::bail!("empty relay port range {}-{}", opts.port_min, opts.port_max);
        }
        let (xdp, xdp_unavailable) = match &opts.xdp {
            None => (None, Some("no XDP interfaces configured".to_owned())),
            Some(x) => match XdpDataPath::load(x, opts.port_min, opts.port_max) {
                Ok(dp) => {
                    for a in dp.attachments() {
                        log::info!("fast path: XDP on {} ({} mode)", a.interface, a.mode.name());
                    }
                    (Some(Arc::new(dp)), None)
                }
                Err(e) if opts.require_xdp => return Err(e.context("starting the XDP fast path")),
                Err(e) => {
                    let why = format!("{e:#}");
                    log::warn!("fast path unavailable, relaying in user space only: {why}");
                    (None, Some(why))
                }
            },
        };
        let observer: Option<ChannelObserver> = xdp.clone().map(|x| {
            let push: ChannelObserver = Arc::new(move |port: u16, ch: &Channel| {
                if let Err(e) = x.install(port, ch) {
                    log::warn!("cannot hand channel {port} to the fast path: {e}");
                }
            });
            push
        });
        let workers = if opts.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.workers
        };
        let cfg = UserspaceConfig {
            port_min: opts.port_min,
            port_max: opts.port_max,
            workers,
            ..UserspaceConfig::default()
        };
        // The Handover policy's view of what the fast path forwarded: one map lookup, made only
        // for packets from no latched source (forward::decide caches it per silence period).
        let last_seen: Option<FastPathLastSeen> = xdp.clone().map(|x| {
            let f: FastPathLastSeen = Arc::new(move |port: u16| {
                x.stats(port)
                    .ok()
                    .map(|s| s.from_leg.map(|d| d.last_seen_ns))
            });
            f
        });
        let userspace = UserspaceRelay::start_with_fast_path(cfg, observer, last_seen)
            .context("starting the user-space relay")?;
        let relay = Relay {
            userspace,
            xdp,
            xdp_unavailable,
        };
        relay.adopt_pinned_channels();
        Ok(relay)
    }

    /// Channels found in pinned maps (a previous process) are taken over by user space, or
    /// removed from the fast path if their ports cannot be bound.
    fn adopt_pinned_channels(&self) {
        let Some(xdp) = &self.xdp else { return };
        let channels = match xdp.channels() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("cannot read inherited channels: {e}");
                return;
            }
        };
        for (port, ch) in channels {
            match self.userspace.install(port, &ch) {
                Ok(()) => log::info!("adopted channel {port} from the pinned maps"),
                Err(e) => {
                    log::warn!("dropping inherited channel {port}: {e}");
                    let _ = xdp.remove(port);
                }
            }
        }
    }

    /// The fast path, if it is running.
    pub fn xdp(&self) -> Option<&XdpDataPath> {
        self.xdp.as_deref()
    }

    /// Why the fast path is not running, if it is not.
    pub fn xdp_unavailable(&self) -> Option<&str> {
        self.xdp_unavailable.as_deref()
    }

    /// The user-space path.
    pub fn userspace(&self) -> &UserspaceRelay {
        &self.userspace
    }
}

impl DataPath for Relay {
    fn name(&self) -> &'static str {
        if self.xdp.is_some() {
            "xdp"
        } else {
            "userspace"
        }
    }

    fn install(&self, port: u16, channel: &Channel) -> Result<(), DataPathError> {
        self.userspace.install(port, channel)?;
        if let Some(xdp) = &self.xdp {
            // Fail open: the channel works in user space even if the fast path refuses it.
            if let Err(e) = xdp.install(port, channel) {
                log::warn!("channel {port} stays in user space: {e}");
            }
        }
        Ok(())
    }

    fn remove(&self, port: u16) -> Result<(), DataPathError> {
        if let Some(xdp) = &self.xdp {
            match xdp.remove(port) {
                Ok(()) | Err(DataPathError::NotFound(_)) => {}
                Err(e) => log::warn!("removing channel {port} from the fast path: {e}"),
            }
        }
        self.userspace.remove(port)
    }

    fn channel(&self, port: u16) -> Result<Channel, DataPathError> {
        self.userspace.channel(port)
    }

    fn stats(&self, port: u16) -> Result<ChannelStats, DataPathError> {
        let mut stats = self.userspace.stats(port)?;
        if let Some(xdp) = &self.xdp
            && let Ok(fast) = xdp.stats(port)
        {
            stats.merge(&fast);
        }
        Ok(stats)
    }
}
