//! Brute-force lockout: failed logins counted per device (internal number) and per source
//! address; past a threshold each further failure locks the key out for a time that doubles.
//!
//! Invariant: memory is bounded — each table holds at most [`LockoutPolicy::max_entries`]
//! keys; when a new key comes to a full table, forgotten entries go first, then the unlocked
//! entry with the oldest failure, and only if every entry is locked the one whose lock ends
//! first. Time is milliseconds on any monotonic clock the caller reads; nothing here reads one.
//!
//! Sources are counted per address for IPv4 and per /64 for IPv6 (one subscriber gets a whole
//! /64, so counting single IPv6 addresses would count nothing). A successful login resets the
//! device's count but not the source's: otherwise one valid account behind an address would
//! let it guess other devices' passwords without limit.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};

/// Longest device key kept (longer numbers, which no real device has, are cut).
const MAX_DEVICE_KEY: usize = 64;

/// The configurable numbers of the lockout.
///
/// Defaults: a device is locked after 5 failures, a source after 20 (a home or office router
/// puts several devices behind one address, while a scanner tries many numbers from one).
/// The first lock lasts 30 s — long enough to stop a guessing script, short enough that a user
/// who mistyped retries at once — and every further failure doubles it up to 1 h: after the
/// threshold an attacker gets about one guess per lock, so at the cap about 24 guesses a day,
/// while a locked-out user at worst waits an hour rather than calling the administrator.
/// A count is forgotten 24 h after its last failure and lock end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures of one device before it is locked.
    pub device_threshold: u32,
    /// Failures from one source before it is locked.
    pub source_threshold: u32,
    /// The first lock, in ms.
    pub base_ms: u64,
    /// The longest lock, in ms.
    pub cap_ms: u64,
    /// Quiet time after the last failure and the lock's end after which a count is forgotten.
    pub forget_after_ms: u64,
    /// Most keys per table (devices, sources).
    pub max_entries: usize,
}

impl Default for LockoutPolicy {
    fn default() -> LockoutPolicy {
        LockoutPolicy {
            device_threshold: 5,
            source_threshold: 20,
            base_ms: 30_000,
            cap_ms: 3_600_000,
            forget_after_ms: 24 * 3_600_000,
            max_entries: 10_000,
        }
    }
}

impl LockoutPolicy {
    /// How long the `failures`-th failure locks a key with `threshold` (0 below it).
    pub fn lock_ms(&self, failures: u32, threshold: u32) -> u64 {
        if failures < threshold.max(1) {
            return 0;
        }
        let doublings = (failures - threshold.max(1)).min(63);
        self.base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.cap_ms)
    }
}

/// What a lock is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The device (its internal number), from wherever.
    Device,
    /// The source address (IPv6: its /64), for any device.
    Source,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Device => "device",
            Scope::Source => "source address",
        })
    }
}

/// A login refused unseen because of too many failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many failed logins for this {scope}: locked out until {until_ms} ms")]
pub struct LockedOut {
    /// When the lock ends (same clock as `now`).
    pub until_ms: u64,
    /// What is locked (the later-ending lock if both are).
    pub scope: Scope,
}

/// What a failure did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureOutcome {
    /// The device's failures in a row, this one included.
    pub device_failures: u32,
    /// The source's failures, this one included.
    pub source_failures: u32,
    /// The lock this failure started or lengthened, if it did.
    pub locked: Option<LockedOut>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    failures: u32,
    last_failure: u64,
    locked_until: u64,
}

impl Entry {
    fn forgotten(&self, now: u64, forget_after: u64) -> bool {
        now >= self
            .last_failure
            .max(self.locked_until)
            .saturating_add(forget_after)
    }
}

/// One bounded table of counts.
#[derive(Clone, Debug)]
struct Table<K> {
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Table<K> {
        Table {
            entries: HashMap::new(),
        }
    }

    fn locked_until(&self, key: &K, now: u64) -> Option<u64> {
        self.entries
            .get(key)
            .map(|e| e.locked_until)
            .filter(|&until| until > now)
    }

    /// Counts a failure; returns the count and the lock end if this failure locked.
    fn fail(
        &mut self,
        key: &K,
        now: u64,
        threshold: u32,
        policy: &LockoutPolicy,
    ) -> (u32, Option<u64>) {
        if !self.entries.contains_key(key) {
            self.make_room(now, policy);
        }
        let entry = self.entries.entry(key.clone()).or_default();
        if entry.forgotten(now, policy.forget_after_ms) {
            *entry = Entry::default();
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
        let lock = policy.lock_ms(entry.failures, threshold);
        if lock == 0 {
            return (entry.failures, None);
        }
        entry.locked_until = entry.locked_until.max(now.saturating_add(lock));
        (entry.failures, Some(entry.locked_until))
    }

    fn make_room(&mut self, now: u64, policy: &LockoutPolicy) {
        if self.entries.len() < policy.max_entries.max(1) {
            return;
        }
        self.entries
            .retain(|_, e| !e.forgotten(now, policy.forget_after_ms));
        while self.entries.len() >= policy.max_entries.max(1) {
            // Unlocked entries (oldest failure first) before locked ones (soonest end first).
            let victim = self
                .entries
                .iter()
                .min_by_key(|(_, e)| {
                    let locked = e.locked_until > now;
                    (
                        locked,
                        if locked {
                            e.locked_until
                        } else {
                            e.last_failure
                        },
                    )
                })
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
    }
}

/// The lockout tracker (sans-IO: the caller passes `now` in ms).
#[derive(Clone, Debug)]
pub struct Lockout {
    policy: LockoutPolicy,
    devices: Table<String>,
    sources: Table<IpAddr>,
}

impl Lockout {
    /// An empty tracker.
    pub fn new(policy: LockoutPolicy) -> Lockout {
        Lockout {
            policy,
            devices: Table::new(),
            sources: Table::new(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &LockoutPolicy {
        &self.policy
    }

    /// Number of device and source keys held.
    pub fn len(&self) -> (usize, usize) {
        (self.devices.entries.len(), self.sources.entries.len())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// Whether a login of `device` from `source` may be tried now.
    pub fn check(&self, device: &str, source: IpAddr, now: u64) -> Result<(), LockedOut> {
        let by_device = self
            .devices
            .locked_until(&device_key(device), now)
            .map(|until_ms| LockedOut {
                until_ms,
                scope: Scope::Device,
            });
        let by_source = self
            .sources
            .locked_until(&source_key(source), now)
            .map(|until_ms| LockedOut {
                until_ms,
                scope: Scope::Source,
            });
        match (by_device, by_source) {
            (None, None) => Ok(()),
            (Some(l), None) | (None, Some(l)) => Err(l),
            (Some(d), Some(s)) => Err(if s.until_ms > d.until_ms { s } else { d }),
        }
    }

    /// Counts a failed login of `device` from `source`.
    pub fn failure(&mut self, device: &str, source: IpAddr, now: u64) -> FailureOutcome {
        let policy = &self.policy;
        let (device_failures, device_lock) =
            self.devices
                .fail(&device_key(device), now, policy.device_threshold, policy);
        let (source_failures, source_lock) =
            self.sources
                .fail(&source_key(source), now, policy.source_threshold, policy);
        // The later-ending lock is the one that matters to the caller.
        let locked = [(device_lock, Scope::Device), (source_lock, Scope::Source)]
            .into_iter()
            .filter_map(|(until, scope)| until.map(|until_ms| LockedOut { until_ms, scope }))
            .max_by_key(|l| l.until_ms);
        FailureOutcome {
            device_failures,
            source_failures,
            locked,
        }
    }

    /// Records a successful login: the device's count is reset; the source's stays (see the
    /// module documentation) unless it is due to be forgotten.
    pub fn success(&mut self, device: &str, source: IpAddr, now: u64) {
        self.devices.entries.remove(&device_key(device));
        let key = source_key(source);
        if self
            .sources
            .entries
            .get(&key)
            .is_some_and(|e| e.forgotten(now, self.policy.forget_after_ms))
        {
            self.sources.entries.remove(&key);
        }
    }

    /// Drops every count due to be forgotten at `now` (housekeeping; optional).
    pub fn purge(&mut self, now: u64) {
        let forget = self.policy.forget_after_ms;
        self.devices
            .entries
            .retain(|_, e| !e.forgotten(now, forget));
        self.sources
            .entries
            .retain(|_, e| !e.forgotten(now, forget));
    }
}

impl Default for Lockout {
    fn default() -> Lockout {
        Lockout::new(LockoutPolicy::default())
    }
}

fn device_key(device: &str) -> String {
    let device = device.trim();
    match device.char_indices().nth(MAX_DEVICE_KEY) {
        Some((cut, _)) => device[..cut].to_owned(),
        None => device.to_owned(),
    }
}

/// IPv4 (also mapped) by address, IPv6 by /64.
fn source_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn lock_durations_double_up_to_the_cap() {
        let p = LockoutPolicy::default();
        let table: &[(u32, u64)] = &[
            (0, 0),
            (4, 0),
            (5, 30 * S),
            (6, 60 * S),
            (7, 120 * S),
            (11, 1920 * S),
            (12, 3600 * S),
            (13, 3600 * S),
            (u32::MAX, 3600 * S),
        ];
        for &(failures, want) in table {
            assert_eq!(p.lock_ms(failures, 5), want, "{failures}");
        }
    }

    #[test]
    fn a_device_is_locked_after_five_failures_and_unlocked_after_the_lock() {
        let mut l = Lockout::default();
        let src = ip("203.0.113.9");
        for n in 1..=4 {
            assert_eq!(l.check("4711", src, n), Ok(()));
            let out = l.failure("4711", src, n);
            assert_eq!((out.device_failures, out.locked), (n as u32, None));
        }
        let out = l.failure("4711", src, 5);
        let lock = LockedOut {
            until_ms: 5 + 30 * S,
            scope: Scope::Device,
        };
        assert_eq!(out.locked, Some(lock));
        assert_eq!(l.check("4711", src, 6), Err(lock));
        // From another address too; other devices are not affected.
        assert_eq!(l.check("4711", ip("198.51.100.1"), 6), Err(lock));
        assert_eq!(l.check("4712", src, 6), Ok(()));
        assert_eq!(l.check("4711", src, 5 + 30 * S), Ok(()));
        // The next failure doubles the lock.
        let out = l.failure("4711", src, 40 * S);
        assert_eq!(out.locked.map(|l| l.until_ms), Some(40 * S + 60 * S));
        assert_eq!(
            lock.to_string(),
            "too many failed logins for this device: locked out until 30005 ms"
        );
    }

    #[test]
    fn success_resets_the_device_but_not_the_source() {
        let mut l = Lockout::default();
        let src = ip("2001:db8:1:2::10");
        for n in 0..4 {
            l.failure("4711", src, n);
        }
        l.success("4711", src, 10);
        assert_eq!(l.failure("4711", src, 11).device_failures, 1);
        assert_eq!(l.failure("4711", src, 12).source_failures, 6);
    }

    #[test]
    fn a_source_is_locked_after_twenty_failures_for_any_devices() {
        let mut l = Lockout::default();
        // All of one /64 counts as one source.
        for n in 0..19u64 {
            let src = ip(&format!("2001:db8:1:2::{n:x}"));
            assert_eq!(l.failure(&format!("{}", 100 + n), src, n).locked, None);
        }
        let out = l.failure("999", ip("2001:db8:1:2:ffff::1"), 19);
        assert_eq!(
            out.locked,
            Some(LockedOut {
                until_ms: 19 + 30 * S,
                scope: Scope::Source
            })
        );
        assert!(l.check("555", ip("2001:db8:1:2::77"), 20).is_err());
        assert_eq!(l.check("555", ip("2001:db8:1:3::77"), 20), Ok(()));
    }

    #[test]
    fn mapped_ipv4_is_the_same_source() {
        let mut l = Lockout::new(LockoutPolicy {
            source_threshold: 1,
            ..LockoutPolicy::default()
        });
        l.failure("1", ip("::ffff:203.0.113.9"), 0);
        assert_eq!(
            l.check("2", ip("203.0.113.9"), 1).map_err(|e| e.scope),
            Err(Scope::Source)
        );
    }

    #[test]
    fn counts_are_forgotten_after_a_quiet_day() {
        let mut l = Lockout::default();
        let src = ip("203.0.113.9");
        for n in 0..4 {
            l.failure("4711", src, n);
        }
        let day = 24 * 3600 * S;
        assert_eq!(l.failure("4711", src, 3 + day).device_failures, 1);
        l.purge(10 * day);
        assert!(l.is_empty());
    }

    #[test]
    fn full_tables_evict_unlocked_entries_first() {
        let mut l = Lockout::new(LockoutPolicy {
            max_entries: 3,
            device_threshold: 2,
            source_threshold: 100,
            ..LockoutPolicy::default()
        });
        let src = ip("203.0.113.9");
        l.failure("locked", src, 0);
        l.failure("locked", src, 1);
        l.failure("old", src, 2);
        l.failure("new", src, 3);
        l.failure("newest", src, 4);
        assert_eq!(l.len().0, 3);
        assert!(
            l.check("locked", src, 5).is_err(),
            "a locked entry outlives older ones"
        );
        assert_eq!(
            l.failure("old", src, 6).device_failures,
            1,
            "old was evicted"
        );
        assert_eq!(
            l.failure("newest", src, 7).device_failures,
            2,
            "newest was kept"
        );
    }

    proptest! {
        #[test]
        fn bounded_and_never_panics(
            ops in proptest::collection::vec((0u8..3, 0u16..40, 0u8..8, 0u64..100_000), 0..300),
            max in 1usize..8,
        ) {
            let mut l = Lockout::new(LockoutPolicy { max_entries: max, ..LockoutPolicy::default() });
            let mut now = 0u64;
            for (op, dev, src, dt) in ops {
                now = now.saturating_add(dt);
                let device = dev.to_string();
                let source = IpAddr::from([10, 0, 0, src]);
                match op {
                    0 => { let _ = l.check(&device, source, now); }
                    1 => {
                        let out = l.failure(&device, source, now);
                        if let Some(lock) = out.locked {
                            prop_assert!(lock.until_ms > now);
                            prop_assert!(lock.until_ms <= now + l.policy().cap_ms);
                            prop_assert!(l.check(&device, source, now).is_err());
                        }
                    }
                    _ => l.success(&device, source, now),
                }
                let (d, s) = l.len();
                prop_assert!(d <= max && s <= max);
            }
        }

        #[test]
        fn locked_once_the_threshold_is_reached(threshold in 1u32..10, start in 0u64..1_000_000) {
            let mut l = Lockout::new(LockoutPolicy { device_threshold: threshold, ..LockoutPolicy::default() });
            let src = IpAddr::from([192, 0, 2, 1]);
            for i in 0..threshold {
                prop_assert_eq!(l.check("1", src, start + u64::from(i)), Ok(()));
                l.failure("1", src, start + u64::from(i));
            }
            prop_assert!(l.check("1", src, start + u64::from(threshold)).is_err());
        }
    }
}
