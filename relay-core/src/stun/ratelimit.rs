//! A per-source token bucket with a bounded table, driven by the caller's clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// Rate limit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateConfig {
    /// Requests per second a source IP may send on average.
    pub per_second: u32,
    /// Requests a source may send at once (the bucket size).
    pub burst: u32,
    /// Sources tracked at most; when the table is full and no entry has refilled, new sources
    /// share one overflow bucket (of the same rate), so the table never grows past this.
    pub max_sources: usize,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            per_second: 10,
            burst: 20,
            max_sources: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in thousandths.
    milli: u64,
    last: Duration,
}

/// The limiter: `allow(ip, now)` takes a token from `ip`'s bucket.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateConfig,
    table: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
    /// When the table was last swept (at most once a second, so a flood of new sources costs
    /// one scan a second, not one per request).
    last_sweep: Option<Duration>,
}

impl RateLimiter {
    pub fn new(config: RateConfig) -> Self {
        let full = Bucket {
            milli: u64::from(config.burst) * 1000,
            last: Duration::ZERO,
        };
        RateLimiter {
            config,
            table: HashMap::new(),
            overflow: full,
            last_sweep: None,
        }
    }

    /// Sources currently tracked (at most `max_sources`).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn capacity(&self) -> u64 {
        u64::from(self.config.burst) * 1000
    }

    fn refill(config: &RateConfig, b: &mut Bucket, now: Duration) {
        let cap = u64::from(config.burst) * 1000;
        let elapsed = now.saturating_sub(b.last);
        let add = elapsed
            .as_millis()
            .saturating_mul(u128::from(config.per_second))
            .min(u128::from(cap));
        b.milli = (b.milli + u64::try_from(add).unwrap_or(cap)).min(cap);
        b.last = b.last.max(now);
    }

    fn take(config: &RateConfig, b: &mut Bucket, now: Duration) -> bool {
        Self::refill(config, b, now);
        if b.milli >= 1000 {
            b.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Whether a request from `ip` at `now` is within the rate; takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now: Duration) -> bool {
        if self.config.burst == 0 || self.config.max_sources == 0 {
            return false;
        }
        let config = self.config;
        if let Some(b) = self.table.get_mut(&ip) {
            return Self::take(&config, b, now);
        }
        if self.table.len() >= config.max_sources
            && self
                .last_sweep
                .is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(1))
        {
            self.last_sweep = Some(now);
            // Forget sources whose bucket is full again: they are indistinguishable from new.
            let cap = self.capacity();
            self.table.retain(|_, b| {
                Self::refill(&config, b, now);
                b.milli < cap
            });
        }
        if self.table.len() >= config.max_sources {
            return Self::take(&config, &mut self.overflow, now);
        }
        let mut b = Bucket {
            milli: self.capacity(),
            last: now,
        };
        let ok = Self::take(&config, &mut b, now);
        self.table.insert(ip, b);
        ok
    }
}
