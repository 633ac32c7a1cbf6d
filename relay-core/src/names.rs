//! The names of what happens to a channel, defined once: why a channel was released
//! ([`ReleaseReason`]), the events of the watch stream ([`EventKind`]) and where a channel's media
//! stands ([`ChannelState`]).
//!
//! Invariant: each `name()` is the one spelling used everywhere outside the wire format — metric
//! label values, command-line words and output, logs. They are stable: dashboards and scripts
//! depend on them, so a rename is a breaking change. `ALL` lists every value in declaration order.

use std::fmt;

/// Why a channel was released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReleaseReason {
    /// A release request (by port or by call leg).
    Requested,
    /// No media for longer than the channel's timeout.
    IdleTimeout,
    /// Released when the relay stopped.
    Shutdown,
}

impl ReleaseReason {
    /// Every reason, in declaration order.
    pub const ALL: [ReleaseReason; 3] = [
        ReleaseReason::Requested,
        ReleaseReason::IdleTimeout,
        ReleaseReason::Shutdown,
    ];

    /// Stable lowercase name: the `reason` label of the release counter.
    pub const fn name(self) -> &'static str {
        match self {
            ReleaseReason::Requested => "requested",
            ReleaseReason::IdleTimeout => "idle_timeout",
            ReleaseReason::Shutdown => "shutdown",
        }
    }
}

/// What happened to a channel: the events of the watch stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A new channel was allocated and installed.
    Allocated,
    /// An endpoint latched to a source learnt from traffic.
    Latched,
    /// The fast path took the channel over.
    FastPath,
    /// Released after its media timeout (final counters).
    IdleTimeout,
    /// Released by a request or at shutdown (final counters).
    Released,
}

impl EventKind {
    /// Every event kind, in declaration order.
    pub const ALL: [EventKind; 5] = [
        EventKind::Allocated,
        EventKind::Latched,
        EventKind::FastPath,
        EventKind::IdleTimeout,
        EventKind::Released,
    ];

    /// Stable lowercase name: the `event` label of the event counter, and the CLI's word.
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Allocated => "allocated",
            EventKind::Latched => "latched",
            EventKind::FastPath => "fast_path",
            EventKind::IdleTimeout => "idle_timeout",
            EventKind::Released => "released",
        }
    }

    /// The event a release for `reason` is reported as: idle timeouts have their own event,
    /// every other release is [`EventKind::Released`].
    pub const fn released(reason: ReleaseReason) -> EventKind {
        match reason {
            ReleaseReason::IdleTimeout => EventKind::IdleTimeout,
            ReleaseReason::Requested | ReleaseReason::Shutdown => EventKind::Released,
        }
    }
}

/// Where a channel's media stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChannelState {
    /// At least one leg's RTP source is not latched.
    Waiting,
    /// Both legs' RTP sources are latched; user space forwards.
    Latched,
    /// Latched, and the XDP fast path forwards.
    FastPath,
}

impl ChannelState {
    /// Every state, in declaration order.
    pub const ALL: [ChannelState; 3] = [
        ChannelState::Waiting,
        ChannelState::Latched,
        ChannelState::FastPath,
    ];

    /// Stable lowercase name: the CLI's word (`--state`, output).
    pub const fn name(self) -> &'static str {
        match self {
            ChannelState::Waiting => "waiting",
            ChannelState::Latched => "latched",
            ChannelState::FastPath => "fast_path",
        }
    }
}

macro_rules! display_by_name {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    )*};
}

display_by_name!(ReleaseReason, EventKind, ChannelState);

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct_lowercase(names: &[&str]) {
        for (i, a) in names.iter().enumerate() {
            assert!(!a.is_empty());
            assert_eq!(*a, a.to_lowercase());
            assert!(!names[i + 1..].contains(a), "{a} twice");
        }
    }

    #[test]
    fn names_are_the_documented_labels() {
        let reasons = ReleaseReason::ALL.map(ReleaseReason::name);
        assert_eq!(reasons, ["requested", "idle_timeout", "shutdown"]);
        let events = EventKind::ALL.map(EventKind::name);
        assert_eq!(
            events,
            [
                "allocated",
                "latched",
                "fast_path",
                "idle_timeout",
                "released"
            ]
        );
        let states = ChannelState::ALL.map(ChannelState::name);
        assert_eq!(states, ["waiting", "latched", "fast_path"]);
        distinct_lowercase(&reasons);
        distinct_lowercase(&events);
        distinct_lowercase(&states);
        assert_eq!(EventKind::FastPath.to_string(), "fast_path");
    }

    #[test]
    fn all_lists_follow_the_declaration_order() {
        for (i, e) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(e as usize, i);
        }
        for (i, r) in ReleaseReason::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i);
        }
        for (i, s) in ChannelState::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i);
        }
    }

    #[test]
    fn only_idle_timeouts_have_their_own_release_event() {
        assert_eq!(
            EventKind::released(ReleaseReason::IdleTimeout),
            EventKind::IdleTimeout
        );
        assert_eq!(
            EventKind::released(ReleaseReason::Requested),
            EventKind::Released
        );
        assert_eq!(
            EventKind::released(ReleaseReason::Shutdown),
            EventKind::Released
        );
    }
}
