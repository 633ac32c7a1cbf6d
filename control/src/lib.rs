//! The homerelay control plane: the sans-IO channel [`allocator`], and the shells around it —
//! the channel [`service`] that drives the relay, the gRPC [`api`] and [`server`], the daemon's
//! [`config`], the command-line [`client`], and the Prometheus [`metrics`].
//!
//! Invariant: the allocator does no I/O and reads no clock (time comes in as an argument);
//! everything that does — sockets, the data path, clocks, tokio — lives in the shells, and
//! every conversion between the wire and the domain is in [`convert`].

pub mod allocator;
pub mod api;
pub mod client;
pub mod clock;
pub mod config;
pub mod convert;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod persist;
pub mod server;
pub mod service;
