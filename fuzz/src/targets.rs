//! The targets, one module each.
pub mod allocator;
pub mod cmsg;
pub mod config;
pub mod convert;
pub mod forward;
pub mod quality;
pub mod spec;
