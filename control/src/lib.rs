//! The homerelay control plane as a library: sans-IO state machines that the `homerelay` binary
//! drives (the channel allocator so far).
//!
//! Invariant: nothing here does I/O or reads a clock; time comes in as an argument.

pub mod allocator;
