//! homerelay's data plane in user space.
//!
//! Two implementations of one [`DataPath`] interface: the XDP fast path ([`xdp`]: loads the
//! program, owns its maps) and the socket relay ([`userspace`]: binds the relay ports and
//! forwards with batched syscalls). [`Relay`] combines them the way the fast path/slow path
//! contract requires: user space always runs and sees everything the XDP program passes up; it
//! forwards a new flow first, latches it, then pushes the learnt channel to the fast path.
//! Losing the XDP program costs speed, never a call. [`xdp_probe`] and [`xdp_links`] let
//! `homerelay doctor` check the fast path on a host without touching a running one.

pub mod datapath;
pub mod forward;
pub mod natlab;
pub mod netns;
pub mod nexthop;
pub mod relay;
pub mod userspace;
pub mod xdp;
pub mod xdp_links;
pub mod xdp_probe;

pub use datapath::{DataPath, DataPathError};
pub use forward::Component;
pub use relay::{DataPathEvent, DataPathEvents, Relay, RelayOptions};
