//! The session border controller's rules for remote devices ("Device@Home"): which devices
//! exist ([`DeviceType`]), when a password is strong ([`password`]), how it is stored and
//! proved ([`scram`]), which firmware may register from the Internet ([`firmware`]), which
//! sources are internal ([`networks`]), whether a device may register ([`registration`]), how
//! password guessing is slowed down ([`lockout`]) and which numbers a device may call
//! ([`cos`], against toll fraud).
//!
//! Invariant: every rule here is a pure function or a sans-IO state machine — no I/O, no clock
//! (time comes in as milliseconds), no randomness except from an RNG the caller passes — and
//! none panics on any input; each refusal is a typed error naming the rule that refused.

pub mod cos;
pub mod firmware;
pub mod lockout;
pub mod networks;
pub mod password;
pub mod registration;
pub mod scram;

mod device_type;
mod mac;

pub use device_type::{
    DeviceType, HFA_TCP_PORT, HFA_TLS_PORT, HTTPS_PORT, Transport, UnknownDeviceType,
};
pub use mac::{MacAddress, MacParseError};
