//! homerelay's phone registration protocol (TCP 4062 plain, TLS 4063), specified in
//! `docs/registration-protocol.md`: the frame codec ([`Frame`], [`Decoder`]) and the two
//! sans-IO session state machines, the relay's ([`ServerSession`]) and a device's
//! ([`ClientSession`]).
//!
//! A frame is a 6-byte header (magic `H`, version 1, message type, flags, body length) and
//! type-length-value elements; a device registers with a SCRAM-SHA-256 exchange (RFC 5802,
//! RFC 7677) carried opaquely in `Register` → `Challenge` → `Proof` → `Registered`, so the
//! password never crosses the wire, then keeps the registration alive with keepalives.
//!
//! Invariant: nothing here does I/O, reads a clock or computes SCRAM — time comes in as
//! `now_ms` (milliseconds on any monotonic clock the shell chooses), SCRAM messages go out as
//! events and come back as calls — and no input, however hostile, makes it panic or buffer
//! more than [`MAX_FRAME_LEN`] bytes beyond what was fed.

mod client;
mod codec;
mod server;
mod session;
mod values;

pub use client::{ClientConfig, ClientEvent, ClientRegistration, ClientSession, ClientState};
pub use codec::{
    Decoder, ELEMENT_HEADER_LEN, ELEMENT_MAY_IGNORE, ElementType, ErrorFrame, Frame, FrameError,
    HEADER_LEN, MAGIC, MAX_BODY_LEN, MAX_FRAME_LEN, MessageType, Refused, Register, Registered,
    VERSION, frame_len,
};
pub use server::{
    MAX_KEEPALIVE_S, Registration, ServerConfig, ServerConfigError, ServerEvent, ServerSession,
    ServerState,
};
pub use session::{CloseReason, SessionError};
pub use values::{
    DeviceType, ErrorCode, FirmwareVersion, Number, Refusal, RegistrationId, ScramMessage, Text,
    ValueError,
};

/// TCP port of plain registration (the company router forwards its public 4060 here).
pub const PLAIN_PORT: u16 = 4062;
/// TCP port of registration over TLS (the company router forwards its public 4061 here).
pub const TLS_PORT: u16 = 4063;
