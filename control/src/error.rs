//! The control plane's request errors and their one mapping to gRPC status codes.
//!
//! Invariant: [`to_status`] is the only place a domain error becomes a [`tonic::Status`], and
//! it matches every variant of every wrapped error exhaustively, so a new variant cannot reach a
//! client without a deliberate code. Messages go to the client unchanged (they are lowercase,
//! name the field or resource, and carry no secrets).
use relay_core::{AllocError, SpecError};
use relay_user::DataPathError;
use tonic::{Code, Status};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The allocator refused (pool full, internet-call limit, unknown channel, conflict...).
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The data path refused (a port taken by another process, shut down...).
    #[error(transparent)]
    DataPath(#[from] DataPathError),
    /// A request field is missing or malformed; `field` is its name in the API.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The relay is shutting down.
    #[error("homerelay is shutting down")]
    ShuttingDown,
    /// A watcher fell behind the event stream and missed events.
    #[error(
        "watch fell {0} events behind and was ended: call List to resynchronise, then Watch again"
    )]
    Lagged(u64),
    /// No credentials, or wrong ones.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The state database refused a write: nothing was changed (the data path is changed only
    /// after its record is written).
    #[error("state database: {0}")]
    Store(String),
    /// The host refused something the relay needs (a thread, memory).
    #[error("{0}")]
    Internal(String),

    /// A channel for a remote device that is not registered (or not allowed).
    #[error("device {0}: {1}")]
    Device(String, String),
}

impl From<relay_store::StoreError> for ServiceError {
    fn from(e: relay_store::StoreError) -> ServiceError {
        ServiceError::Store(e.to_string())
    }
}

impl ServiceError {
    /// A missing or malformed request field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ServiceError {
        ServiceError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A channel spec the core refuses is a malformed request field: `INVALID_ARGUMENT` with the
/// core's message (`leg_a.rtp_address: ...`).
impl From<SpecError> for ServiceError {
    fn from(e: SpecError) -> ServiceError {
        ServiceError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// The status code of an error (see the module invariant).
pub fn code(e: &ServiceError) -> Code {
    match e {
        ServiceError::Alloc(a) => match a {
            AllocError::PoolFull { .. } | AllocError::InternetCallLimit { .. } => {
                Code::ResourceExhausted
            }
            AllocError::UnknownSlot(_) | AllocError::UnknownLeg { .. } => Code::NotFound,
            AllocError::Conflict { .. }
            | AllocError::SlotTaken(_)
            | AllocError::LegTaken { .. } => Code::AlreadyExists,
            AllocError::EmptyCallId
            | AllocError::TooLong { .. }
            | AllocError::Timeout { .. }
            | AllocError::OutsideLayout(_) => Code::InvalidArgument,
        },
        ServiceError::DataPath(d) => match d {
            DataPathError::NotFound(_) => Code::NotFound,
            DataPathError::PortOutOfRange { .. } | DataPathError::InvalidChannel { .. } => {
                Code::InvalidArgument
            }
            // A port held by another process, or a relay going down: retrying (another port,
            // another relay) may work.
            DataPathError::Bind { .. } | DataPathError::ShutDown => Code::Unavailable,
            DataPathError::Map { .. } | DataPathError::Io(_) => Code::Internal,
        },
        ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
        ServiceError::ShuttingDown => Code::Unavailable,
        // A full disk or an I/O error: another relay may take the call.
        ServiceError::Store(_) => Code::Unavailable,
        ServiceError::Internal(_) => Code::Internal,
        ServiceError::Device(..) => Code::FailedPrecondition,
        ServiceError::Lagged(_) => Code::Aborted,
        ServiceError::Unauthenticated(_) => Code::Unauthenticated,
    }
}

/// The gRPC status for an error.
pub fn to_status(e: &ServiceError) -> Status {
    Status::new(code(e), e.to_string())
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        to_status(&e)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use relay_core::{Kind, Slot};

    #[test]
    fn every_error_maps_to_its_code_with_its_message() {
        let slot = Slot {
            addr_index: 0,
            port: 30530,
        };
        let cases: Vec<(ServiceError, Code, &str)> = vec![
            (
                AllocError::PoolFull {
                    in_use: 180,
                    capacity: 180,
                }
                .into(),
                Code::ResourceExhausted,
                "channel pool full: 180 of 180 channels in use",
            ),
            (
                AllocError::InternetCallLimit {
                    limit: 12,
                    per_call_kbps: 80,
                    upstream_kbps: 1000,
                }
                .into(),
                Code::ResourceExhausted,
                "internet call limit reached: 12 calls at 80 kbit/s fit the 1000 kbit/s upstream",
            ),
            (
                AllocError::UnknownSlot(slot).into(),
                Code::NotFound,
                "no channel in use on port 30530 on relay address #0",
            ),
            (
                AllocError::UnknownLeg {
                    call_id: "c".into(),
                    leg_tag: "t".into(),
                }
                .into(),
                Code::NotFound,
                "no channel for call id \"c\" leg tag \"t\"",
            ),
            (
                AllocError::Conflict {
                    call_id: "c".into(),
                    leg_tag: "t".into(),
                    kind: Kind::SipDevice,
                    internet: true,
                }
                .into(),
                Code::AlreadyExists,
                "call id \"c\" leg tag \"t\" already holds a channel of kind sip_device \
                 (internet: true); a repeated request must match it",
            ),
            (
                AllocError::EmptyCallId.into(),
                Code::InvalidArgument,
                "call id is empty",
            ),
            (
                AllocError::TooLong {
                    field: "leg tag",
                    len: 300,
                    max: 256,
                }
                .into(),
                Code::InvalidArgument,
                "leg tag is 300 bytes long, more than 256",
            ),
            (
                AllocError::Timeout {
                    value: Duration::ZERO,
                    min: Duration::from_millis(1),
                    max: Duration::from_secs(86400),
                }
                .into(),
                Code::InvalidArgument,
                "media timeout 0ns is outside 1ms..=86400s",
            ),
            (
                AllocError::OutsideLayout(slot).into(),
                Code::InvalidArgument,
                "port 30530 on relay address #0 is not part of the layout",
            ),
            (
                AllocError::SlotTaken(slot).into(),
                Code::AlreadyExists,
                "a channel is already in use on port 30530 on relay address #0",
            ),
            (
                AllocError::LegTaken {
                    call_id: "c".into(),
                    leg_tag: "t".into(),
                    slot,
                }
                .into(),
                Code::AlreadyExists,
                "call id \"c\" leg tag \"t\" already holds the channel on port 30530 on relay \
                 address #0",
            ),
            (
                SpecError {
                    field: "leg_b.strict".into(),
                    reason: "a strict leg needs rtp_address".into(),
                }
                .into(),
                Code::InvalidArgument,
                "leg_b.strict: a strict leg needs rtp_address",
            ),
            (
                DataPathError::NotFound(30530).into(),
                Code::NotFound,
                "no channel on port 30530",
            ),
            (
                DataPathError::PortOutOfRange {
                    port: 3,
                    min: 30528,
                    max: 30887,
                }
                .into(),
                Code::InvalidArgument,
                "port 3 is not an even port in the relay range 30528-30887",
            ),
            (
                DataPathError::Bind {
                    port: 30530,
                    source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
                }
                .into(),
                Code::Unavailable,
                "cannot bind relay port 30530: address in use",
            ),
            (
                DataPathError::ShutDown.into(),
                Code::Unavailable,
                "data path is shut down",
            ),
            (
                DataPathError::Io(std::io::Error::other("boom")).into(),
                Code::Internal,
                "boom",
            ),
            (
                ServiceError::invalid("leg_a.rtp_address", "\"x\" is not IP:PORT"),
                Code::InvalidArgument,
                "leg_a.rtp_address: \"x\" is not IP:PORT",
            ),
            (
                ServiceError::ShuttingDown,
                Code::Unavailable,
                "homerelay is shutting down",
            ),
            (
                ServiceError::Lagged(7),
                Code::Aborted,
                "watch fell 7 events behind and was ended: call List to resynchronise, then \
                 Watch again",
            ),
            (
                ServiceError::Unauthenticated("missing bearer token"),
                Code::Unauthenticated,
                "missing bearer token",
            ),
        ];
        for (e, code, message) in cases {
            let status = to_status(&e);
            assert_eq!(status.code(), code, "{e}");
            assert_eq!(status.message(), message);
        }
    }
}
