//! The allocator's errors: [`ConfigError`] for a layout or configuration that cannot work, and
//! [`AllocError`] for a request that cannot be served.
//!
//! Invariant: each variant maps to exactly one gRPC status code (noted on the variant), so the
//! shell's mapping is one exhaustive match and messages can go to the client unchanged.

use std::time::Duration;

use super::{Kind, Slot};

/// A layout or allocator configuration that cannot work (gRPC `INVALID_ARGUMENT`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("first port {0} is below 1024")]
    PrivilegedPort(u16),
    #[error("first port {0} is odd: an rtp port must be even")]
    OddFirstPort(u16),
    #[error("port range {first}-{last} holds no rtp/rtcp port pair")]
    EmptyRange { first: u16, last: u16 },
    #[error("capacity {0} is outside 1..=100000")]
    Capacity(u32),
    #[error("a layout needs at least one relay address")]
    NoAddresses,
    #[error(
        "port range {first}-{last} on {addresses} relay address(es) has {slots} port pairs, \
         fewer than the capacity of {capacity} channels"
    )]
    RangeTooSmall {
        first: u16,
        last: u16,
        addresses: u16,
        slots: u64,
        capacity: u32,
    },
    #[error("layout spans {slots} port pairs, more than the supported {max}")]
    TooManySlots { slots: u64, max: u32 },
    #[error("upstream bandwidth must be positive (leave it unset for no limit)")]
    ZeroUpstream,
    #[error("{what} {value:?} is outside {min:?}..={max:?}")]
    DurationOutOfRange {
        what: &'static str,
        value: Duration,
        min: Duration,
        max: Duration,
    },
}

/// A request the allocator cannot serve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every channel of the layout is in use (`RESOURCE_EXHAUSTED`).
    #[error("channel pool full: {in_use} of {capacity} channels in use")]
    PoolFull { in_use: u32, capacity: u32 },
    /// The upstream bandwidth holds no further internet call (`RESOURCE_EXHAUSTED`).
    #[error(
        "internet call limit reached: {limit} calls at {per_call_kbps} kbit/s fit the \
         {upstream_kbps} kbit/s upstream"
    )]
    InternetCallLimit {
        limit: u32,
        per_call_kbps: u32,
        upstream_kbps: u32,
    },
    /// No channel is in use on this slot, or the slot is not part of the layout (`NOT_FOUND`).
    #[error("no channel in use on {0}")]
    UnknownSlot(Slot),
    /// No channel is held by this call leg (`NOT_FOUND`).
    #[error("no channel for call id {call_id:?} leg tag {leg_tag:?}")]
    UnknownLeg { call_id: String, leg_tag: String },
    /// The call leg already holds a channel of another kind or internet flag, so this is not a
    /// repeat of the request that allocated it (`ALREADY_EXISTS`).
    #[error(
        "call id {call_id:?} leg tag {leg_tag:?} already holds a channel of kind {kind} \
         (internet: {internet}); a repeated request must match it"
    )]
    Conflict {
        call_id: String,
        leg_tag: String,
        kind: Kind,
        internet: bool,
    },
    /// The call id is empty (`INVALID_ARGUMENT`).
    #[error("call id is empty")]
    EmptyCallId,
    /// A call id or leg tag longer than the allocator stores (`INVALID_ARGUMENT`).
    #[error("{field} is {len} bytes long, more than {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A restored slot is not part of the layout (`INVALID_ARGUMENT`).
    #[error("{0} is not part of the layout")]
    OutsideLayout(Slot),
    /// A restored slot already carries a channel (`ALREADY_EXISTS`).
    #[error("a channel is already in use on {0}")]
    SlotTaken(Slot),
    /// A restored call leg already holds another channel (`ALREADY_EXISTS`).
    #[error("call id {call_id:?} leg tag {leg_tag:?} already holds the channel on {slot}")]
    LegTaken {
        call_id: String,
        leg_tag: String,
        slot: Slot,
    },
    /// A media timeout outside the accepted range (`INVALID_ARGUMENT`).
    #[error("media timeout {value:?} is outside {min:?}..={max:?}")]
    Timeout {
        value: Duration,
        min: Duration,
        max: Duration,
    },
}
