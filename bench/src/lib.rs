//! `rtp-load`: an RTP load generator and the side-by-side benchmark of homerelay's data paths
//! (no relay, XDP native, XDP generic, the socket relay, and a naive one-packet-per-syscall
//! relay) on the namespace testbed of [`relay_user::netns`].
//!
//! The invariant a reader must know: **every number comes from the packets themselves** —
//! each probe carries its flow, a 64-bit sequence number and its send time, and only probes
//! that arrive intact, at the expected address, within the late threshold (20 ms) count as
//! delivered. The relay's own counters are reported beside them, never instead of them.
pub mod bpfstats;
pub mod cpu;
pub mod histogram;
pub mod naive;
pub mod packet;
pub mod receiver;
pub mod relay_modes;
pub mod run;
pub mod scenario;
pub mod sender;
pub mod suite;
pub mod xdp_cost;
