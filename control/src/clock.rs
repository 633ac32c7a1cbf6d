//! The three clocks the control plane meets, and the conversions between them: the allocator
//! counts in [`Instant`]s, the data path stamps packets with `CLOCK_MONOTONIC` nanoseconds (the
//! clock of `bpf_ktime_get_ns`), and the API speaks wall-clock time.
//!
//! Invariant: every conversion goes through one [`Clock`] sample, whose three readings were
//! taken together, so a packet time and an allocator time converted with the same sample can be
//! compared (to within the microseconds between the readings). `Instant` is `CLOCK_MONOTONIC`
//! on Linux too, but std does not promise it, so nothing here relies on it.
use std::time::{Duration, Instant, SystemTime};

pub use relay_user::datapath::monotonic_ns;

/// The three clocks read at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    instant: Instant,
    monotonic_ns: u64,
    wall: SystemTime,
}

impl Clock {
    /// Reads the three clocks now.
    pub fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            monotonic_ns: monotonic_ns(),
            wall: SystemTime::now(),
        }
    }

    /// The sample's `Instant`.
    pub fn instant(&self) -> Instant {
        self.instant
    }

    /// The sample's wall-clock time.
    pub fn wall(&self) -> SystemTime {
        self.wall
    }

    /// The `Instant` of a `CLOCK_MONOTONIC` reading (a packet time from the data path).
    pub fn instant_of_ns(&self, ns: u64) -> Instant {
        if ns <= self.monotonic_ns {
            let ago = Duration::from_nanos(self.monotonic_ns - ns);
            self.instant.checked_sub(ago).unwrap_or(self.instant)
        } else {
            // Read after the sample was taken.
            self.instant + Duration::from_nanos(ns - self.monotonic_ns)
        }
    }

    /// The wall-clock time of a `CLOCK_MONOTONIC` reading; `None` for 0 ("never").
    pub fn wall_of_ns(&self, ns: u64) -> Option<SystemTime> {
        (ns != 0).then(|| self.wall_of_instant(self.instant_of_ns(ns)))
    }

    /// The wall-clock time of an `Instant`.
    pub fn wall_of_instant(&self, at: Instant) -> SystemTime {
        if at <= self.instant {
            self.wall
                .checked_sub(self.instant - at)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        } else {
            self.wall + (at - self.instant)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_agree_with_each_other() {
        let c = Clock::now();
        let ns = c.monotonic_ns - 1_500_000_000;
        assert_eq!(c.instant - c.instant_of_ns(ns), Duration::from_millis(1500));
        assert_eq!(
            c.wall
                .duration_since(c.wall_of_ns(ns).expect("not zero"))
                .ok(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(c.wall_of_ns(0), None);
        let later = c.instant_of_ns(c.monotonic_ns + 7);
        assert_eq!(later - c.instant, Duration::from_nanos(7));
        assert_eq!(c.wall_of_instant(later), c.wall + Duration::from_nanos(7));
    }

    #[test]
    fn packet_times_from_the_data_path_clock_are_in_the_past() {
        let before = monotonic_ns();
        let c = Clock::now();
        assert!(c.instant_of_ns(before) <= c.instant());
    }
}
