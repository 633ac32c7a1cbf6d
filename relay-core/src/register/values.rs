//! The values registration frames carry: bounded strings and byte strings, the registration id,
//! refusal reasons and error codes (docs/registration-protocol.md, "Elements" and "Codes").
//!
//! Invariant: a value type can only hold what the wire admits — each constructor checks the
//! length and character set the decoder checks — so encoding a frame never fails and never
//! exceeds [`MAX_FRAME_LEN`](super::MAX_FRAME_LEN).

use std::fmt;

/// A value refused by a constructor: the field and why (lowercase, no trailing period).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValueError {
    /// The field's name (`number`, `device_type`, `firmware`, `text`, `scram`).
    pub field: &'static str,
    /// Why the value is refused.
    pub reason: &'static str,
}

/// Checks `s` against a field's length bounds (in bytes) and character set.
fn check_str(
    field: &'static str,
    s: &str,
    min: usize,
    max: usize,
    allowed: fn(char) -> bool,
    charset: &'static str,
) -> Result<(), ValueError> {
    if s.len() < min {
        return Err(ValueError {
            field,
            reason: "too short",
        });
    }
    if s.len() > max {
        return Err(ValueError {
            field,
            reason: "too long",
        });
    }
    if !s.chars().all(allowed) {
        return Err(ValueError {
            field,
            reason: charset,
        });
    }
    Ok(())
}

/// Defines a validated string newtype: `new`, `as_str`, `Display`, `AsRef<str>`, and the
/// crate-internal `from_wire` the decoder uses.
macro_rules! bounded_str {
    (
        $(#[$doc:meta])*
        $name:ident, field = $field:literal, min = $min:expr, max = $max:expr,
        allowed = $allowed:expr, charset = $charset:literal
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Shortest value, in bytes.
            pub const MIN_LEN: usize = $min;
            /// Longest value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// The value, if its length and characters are admissible.
            pub fn new(s: impl Into<String>) -> Result<$name, ValueError> {
                let s = s.into();
                check_str($field, &s, $min, $max, $allowed, $charset)?;
                Ok($name(s))
            }

            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The value from an element's bytes.
            pub(crate) fn from_wire(bytes: &[u8]) -> Result<$name, &'static str> {
                let s = std::str::from_utf8(bytes).map_err(|_| "not utf-8")?;
                check_str($field, s, $min, $max, $allowed, $charset).map_err(|e| e.reason)?;
                Ok($name(s.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

bounded_str! {
    /// A device's internal number, its identity (and the SCRAM user name): 1–32 ASCII digits.
    Number, field = "number", min = 1, max = 32,
    allowed = |c: char| c.is_ascii_digit(), charset = "only the digits 0-9 are allowed"
}

bounded_str! {
    /// A device type's name, e.g. `openstage_hfa`, `deskphone_ip_hfa`, `deskphone_cp_hfa`:
    /// 1–32 characters from `a-z`, `0-9` and `_`. The codec does not restrict it to known names;
    /// which types may register is the relay's policy.
    DeviceType, field = "device_type", min = 1, max = 32,
    allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_',
    charset = "only a-z, 0-9 and _ are allowed"
}

bounded_str! {
    /// A firmware version as the device reports it, e.g. `V3 R0.40.4`: 1–64 printable ASCII
    /// characters (space to `~`).
    FirmwareVersion, field = "firmware", min = 1, max = 64,
    allowed = |c: char| (' '..='~').contains(&c),
    charset = "only printable ascii is allowed"
}

bounded_str! {
    /// Human-readable text for logs and displays (never parsed by a peer): 0–256 bytes of UTF-8
    /// without control characters, so it can be logged as it is.
    Text, field = "text", min = 0, max = 256,
    allowed = |c: char| !c.is_control(),
    charset = "control characters are not allowed"
}

impl Text {
    /// The empty text.
    pub const fn empty() -> Text {
        Text(String::new())
    }

    /// `s` made admissible: control characters become spaces and the text is cut at the last
    /// character boundary within [`Text::MAX_LEN`] bytes.
    pub fn lossy(s: &str) -> Text {
        let mut out = String::with_capacity(s.len().min(Text::MAX_LEN));
        for c in s.chars() {
            let c = if c.is_control() { ' ' } else { c };
            if out.len() + c.len_utf8() > Text::MAX_LEN {
                break;
            }
            out.push(c);
        }
        Text(out)
    }
}

impl Default for Text {
    fn default() -> Text {
        Text::empty()
    }
}

/// One SCRAM-SHA-256 message (RFC 5802 §5.1, RFC 7677), carried opaquely: 1–1024 bytes. The
/// codec and the session state machines never look inside; the SCRAM implementation that
/// produces and checks them lives outside this module.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScramMessage(Vec<u8>);

impl ScramMessage {
    /// Longest message, in bytes.
    pub const MAX_LEN: usize = 1024;

    /// The message, if it is 1–[`ScramMessage::MAX_LEN`] bytes long.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<ScramMessage, ValueError> {
        let bytes = bytes.into();
        ScramMessage::check(&bytes).map_err(|reason| ValueError {
            field: "scram",
            reason,
        })?;
        Ok(ScramMessage(bytes))
    }

    fn check(bytes: &[u8]) -> Result<(), &'static str> {
        if bytes.is_empty() {
            Err("too short")
        } else if bytes.len() > ScramMessage::MAX_LEN {
            Err("too long")
        } else {
            Ok(())
        }
    }

    /// The message from an element's bytes.
    pub(crate) fn from_wire(bytes: &[u8]) -> Result<ScramMessage, &'static str> {
        ScramMessage::check(bytes)?;
        Ok(ScramMessage(bytes.to_vec()))
    }

    /// The message's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The message's bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for ScramMessage {
    // SCRAM messages are not secret (RFC 5802 §9), but printable: show them as text when
    // they are, so traces stay readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "ScramMessage({s:?})"),
            Err(_) => write!(f, "ScramMessage({:02x?})", self.0),
        }
    }
}

/// The identifier the relay gives a registration, opaque to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistrationId(pub u64);

impl fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Why the relay refuses a registration (a `Refused` frame's `reason` element and, for some,
/// its `retry_after` element).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The device is unknown **or** its password is wrong — deliberately one answer, so a
    /// client cannot tell which numbers exist. Only after the client's proof.
    AuthFailed,
    /// Too many failed attempts; try again in `retry_after_s` seconds.
    LockedOut {
        /// Seconds until an attempt can succeed again.
        retry_after_s: u32,
    },
    /// The device authenticated, but its password does not meet the password policy, so it
    /// may not register from the Internet. Only after the client's proof.
    WeakPassword,
    /// The device's firmware is older than the minimum for Internet use.
    FirmwareTooOld,
    /// The device authenticated but lacks the "Internet registration through the SBC" flag.
    /// Only after the client's proof.
    NotAllowedExternal,
    /// The request is well formed but unacceptable (e.g. an unusable media address).
    BadRequest,
    /// The relay cannot take the registration now; try again later, after `retry_after_s`
    /// seconds if given.
    ServerBusy {
        /// Seconds to wait before trying again, if the relay knows.
        retry_after_s: Option<u32>,
    },
}

impl Refusal {
    /// The reason's code on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Refusal::AuthFailed => 1,
            Refusal::LockedOut { .. } => 2,
            Refusal::WeakPassword => 3,
            Refusal::FirmwareTooOld => 4,
            Refusal::NotAllowedExternal => 5,
            Refusal::BadRequest => 6,
            Refusal::ServerBusy { .. } => 7,
        }
    }

    /// Stable lowercase name, as in the specification (for logs and metric labels).
    pub const fn name(self) -> &'static str {
        match self {
            Refusal::AuthFailed => "auth_failed",
            Refusal::LockedOut { .. } => "locked_out",
            Refusal::WeakPassword => "weak_password",
            Refusal::FirmwareTooOld => "firmware_too_old",
            Refusal::NotAllowedExternal => "not_allowed_external",
            Refusal::BadRequest => "bad_request",
            Refusal::ServerBusy { .. } => "server_busy",
        }
    }

    /// The retry-after seconds it carries, if any.
    pub const fn retry_after_s(self) -> Option<u32> {
        match self {
            Refusal::LockedOut { retry_after_s } => Some(retry_after_s),
            Refusal::ServerBusy { retry_after_s } => retry_after_s,
            _ => None,
        }
    }

    /// Whether this refusal says something about the device's record (that it exists, its
    /// password, its flags), so it may only be sent once the client has proved knowledge of
    /// the password — or failed to, for [`Refusal::AuthFailed`]. Sending it earlier would tell
    /// an unknown number from a known one.
    pub const fn needs_proof(self) -> bool {
        matches!(
            self,
            Refusal::AuthFailed | Refusal::WeakPassword | Refusal::NotAllowedExternal
        )
    }

    /// The refusal from its wire code and retry-after element; `None` for an unknown code, a
    /// `locked_out` without retry-after, or a retry-after on a reason that takes none.
    pub(crate) fn from_wire(code: u16, retry_after_s: Option<u32>) -> Option<Refusal> {
        let plain = |r: Refusal| retry_after_s.is_none().then_some(r);
        match code {
            1 => plain(Refusal::AuthFailed),
            2 => retry_after_s.map(|retry_after_s| Refusal::LockedOut { retry_after_s }),
            3 => plain(Refusal::WeakPassword),
            4 => plain(Refusal::FirmwareTooOld),
            5 => plain(Refusal::NotAllowedExternal),
            6 => plain(Refusal::BadRequest),
            7 => Some(Refusal::ServerBusy { retry_after_s }),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after_s() {
            Some(s) => write!(f, "{} (retry after {s} s)", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// Why a peer ends a session with an `Error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// A frame could not be decoded (bad element, missing element, unknown message type...).
    MalformedFrame,
    /// A well-formed frame arrived in a state where it is not allowed.
    UnexpectedMessage,
    /// The frame's magic or version byte is not this protocol's.
    UnsupportedVersion,
    /// A frame header announced more than the frame size limit.
    FrameTooLarge,
    /// The registration exchange (or unregistration) did not finish in time.
    HandshakeTimeout,
    /// The registration expired: the relay heard nothing for its expiry time, or the client's
    /// keepalive went unanswered.
    Expired,
    /// The relay is shutting down.
    ShuttingDown,
    /// The client could not verify the relay's SCRAM server signature (RFC 5802 §3): the relay
    /// does not know the device's password, so the client does not trust it.
    ServerAuthFailed,
}

impl ErrorCode {
    /// Every code, in declaration (and code) order.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::MalformedFrame,
        ErrorCode::UnexpectedMessage,
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::HandshakeTimeout,
        ErrorCode::Expired,
        ErrorCode::ShuttingDown,
        ErrorCode::ServerAuthFailed,
    ];

    /// The code on the wire.
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::MalformedFrame => 1,
            ErrorCode::UnexpectedMessage => 2,
            ErrorCode::UnsupportedVersion => 3,
            ErrorCode::FrameTooLarge => 4,
            ErrorCode::HandshakeTimeout => 5,
            ErrorCode::Expired => 6,
            ErrorCode::ShuttingDown => 7,
            ErrorCode::ServerAuthFailed => 8,
        }
    }

    /// The code from its wire value.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Stable lowercase name, as in the specification.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::Expired => "expired",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::ServerAuthFailed => "server_auth_failed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_checked() {
        assert!(Number::new("4711").is_ok());
        assert_eq!(Number::new("").unwrap_err().reason, "too short");
        assert_eq!(Number::new("+4711").unwrap_err().field, "number");
        assert!(Number::new("1".repeat(33)).is_err());
        assert!(DeviceType::new("openstage_hfa").is_ok());
        assert!(DeviceType::new("OpenStage").is_err());
        assert!(FirmwareVersion::new("V3 R0.40.4").is_ok());
        assert!(FirmwareVersion::new("V3\tR0").is_err());
        assert!(Text::new("").is_ok());
        assert!(Text::new("a\nb").is_err());
        assert!(ScramMessage::new(Vec::new()).is_err());
        assert!(ScramMessage::new(vec![0; 1025]).is_err());
    }

    #[test]
    fn lossy_text_is_admissible() {
        let t = Text::lossy("line\none");
        assert_eq!(t.as_str(), "line one");
        let long = "é".repeat(200); // 400 bytes, 2 per character
        let t = Text::lossy(&long);
        assert_eq!(t.as_str().len(), 256);
        assert!(Text::new(t.as_str()).is_ok());
    }

    #[test]
    fn refusal_codes_round_trip() {
        for r in [
            Refusal::AuthFailed,
            Refusal::LockedOut { retry_after_s: 60 },
            Refusal::WeakPassword,
            Refusal::FirmwareTooOld,
            Refusal::NotAllowedExternal,
            Refusal::BadRequest,
            Refusal::ServerBusy {
                retry_after_s: None,
            },
            Refusal::ServerBusy {
                retry_after_s: Some(5),
            },
        ] {
            assert_eq!(Refusal::from_wire(r.code(), r.retry_after_s()), Some(r));
        }
        assert_eq!(Refusal::from_wire(2, None), None);
        assert_eq!(Refusal::from_wire(1, Some(3)), None);
        assert_eq!(Refusal::from_wire(99, None), None);
    }

    #[test]
    fn error_codes_round_trip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::from_code(0), None);
    }
}
