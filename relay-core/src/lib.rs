//! homerelay's core: the parts of the control plane that do no I/O — the channel
//! [`allocator`], channel specs and their validation ([`spec`], with [`build_channel`], the one
//! place a request becomes a data-path channel), and the names of events, release reasons and
//! channel states ([`names`]), defined once for metrics, the CLI and the wire conversions; and
//! the session border controller's rules for remote devices ([`device`]): device types,
//! password strength and SCRAM-SHA-256 storage, minimum firmware, internal networks, whether a
//! device may register, brute-force lockout, and class of service against toll fraud; and the
//! phone registration protocol ([`register`]: its frame codec and the relay's and a device's
//! session state machines, specified in `docs/registration-protocol.md`).
//!
//! Invariant: nothing here does I/O or reads a clock — no sockets, no tokio, no aya, no gRPC;
//! time comes in as an argument. The shells (the `control` crate) drive this core; the STUN
//! codec of later work belongs here too.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod device;
pub mod names;
pub mod register;
pub mod spec;
pub mod stun;

pub use allocator::{
    AllocError, Allocation, Allocator, ChannelId, ChannelInfo, Config, ConfigError, Kind, Layout,
    Released, Request, Slot, Status, check_timeout,
};
pub use names::{ChannelState, EventKind, ReleaseReason};
pub use spec::{
    ChannelSpec, HostAddresses, LatchingPolicy, LegSpec, MAX_LATCH_DURATION, SpecError,
    build_channel,
};
