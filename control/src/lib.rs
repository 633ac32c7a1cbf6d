//! The homerelay control plane: the shells around the I/O-free core (`relay-core`: the channel
//! allocator, channel specs, the names of events) — the channel [`service`] that drives the
//! relay, the gRPC [`api`] and [`server`], the daemon's [`config`], the command-line [`client`],
//! and the Prometheus [`metrics`].
//!
//! Invariant: the core does no I/O and reads no clock (time comes in as an argument);
//! everything that does — sockets, the data path, clocks, tokio — lives here, and every
//! conversion between the wire and the domain is in [`convert`].

pub mod api;
pub mod cert_cli;
pub mod certstore;
pub mod client;
pub mod clock;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod demo;
pub mod device_events;
pub mod devices;
pub mod devices_api;
pub mod devices_cli;
pub mod doctor;
pub mod error;
pub mod host;
pub mod https_api;
pub mod metrics;
pub mod nat_detect;
pub mod notify;
pub mod persist;
pub mod public_address;
pub mod public_address_api;
pub mod public_address_cli;
pub mod register_client;
pub mod registrar;
pub mod router_config;
pub mod server;
pub mod service;
pub mod stun_client;
pub mod stun_server;
