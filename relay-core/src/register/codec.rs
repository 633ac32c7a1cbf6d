//! The registration protocol's wire format: frames ([`Frame`]), their encoding and decoding,
//! and the streaming [`Decoder`] (docs/registration-protocol.md, "Framing" and "Messages").
//!
//! Invariant: decoding is total and bounded — any byte string gives a frame, "need more
//! bytes" or a [`FrameError`], never a panic, and nothing is buffered or allocated because of a
//! length a peer announced: a header announcing more than [`MAX_FRAME_LEN`] is refused before
//! its body is awaited. Encoding is total too: the value types bound every field, so any
//! [`Frame`] encodes within [`MAX_FRAME_LEN`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::values::{
    DeviceType, ErrorCode, FirmwareVersion, Number, Refusal, RegistrationId, ScramMessage, Text,
};

/// First byte of every frame: `H`.
pub const MAGIC: u8 = 0x48;
/// Protocol version this codec speaks (the frame header's second byte).
pub const VERSION: u8 = 1;
/// Bytes in a frame header: magic, version, message type, flags, body length (u16).
pub const HEADER_LEN: usize = 6;
/// Largest frame, header included. A header announcing more is refused at once.
pub const MAX_FRAME_LEN: usize = 4096;
/// Largest frame body.
pub const MAX_BODY_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;
/// Bytes in an element header: type (u16), value length (u16).
pub const ELEMENT_HEADER_LEN: usize = 4;
/// Bit of an element type saying a receiver that does not know the type may skip it. Every
/// element this version defines has it clear: they must be understood.
pub const ELEMENT_MAY_IGNORE: u16 = 0x8000;

/// The message types and their codes (the frame header's third byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageType {
    /// Client → relay: the device's identity and the SCRAM client-first message.
    Register = 0x01,
    /// Relay → client: the SCRAM server-first message.
    Challenge = 0x02,
    /// Client → relay: the SCRAM client-final message.
    Proof = 0x03,
    /// Relay → client: the SCRAM server-final message and what the relay granted.
    Registered = 0x04,
    /// Relay → client: the registration is refused, and why.
    Refused = 0x05,
    /// Client → relay: the device is alive.
    Keepalive = 0x06,
    /// Relay → client: answer to a keepalive.
    KeepaliveAck = 0x07,
    /// Client → relay: end the registration.
    Unregister = 0x08,
    /// Relay → client: the registration has ended.
    Unregistered = 0x09,
    /// Either way: the sender ends the session because of a protocol error or a timeout.
    Error = 0x0a,
}

impl MessageType {
    /// Every message type, in code order.
    pub const ALL: [MessageType; 10] = [
        MessageType::Register,
        MessageType::Challenge,
        MessageType::Proof,
        MessageType::Registered,
        MessageType::Refused,
        MessageType::Keepalive,
        MessageType::KeepaliveAck,
        MessageType::Unregister,
        MessageType::Unregistered,
        MessageType::Error,
    ];

    /// The type's code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The type with code `code`.
    pub fn from_code(code: u8) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// Stable lowercase name, as in the specification.
    pub const fn name(self) -> &'static str {
        match self {
            MessageType::Register => "register",
            MessageType::Challenge => "challenge",
            MessageType::Proof => "proof",
            MessageType::Registered => "registered",
            MessageType::Refused => "refused",
            MessageType::Keepalive => "keepalive",
            MessageType::KeepaliveAck => "keepalive_ack",
            MessageType::Unregister => "unregister",
            MessageType::Unregistered => "unregistered",
            MessageType::Error => "error",
        }
    }

    /// The elements a frame of this type carries: (element, required). Any other known element
    /// in it is an error; unknown ones follow [`ELEMENT_MAY_IGNORE`].
    pub const fn elements(self) -> &'static [(ElementType, bool)] {
        use ElementType as E;
        match self {
            MessageType::Register => &[
                (E::Number, true),
                (E::Mac, true),
                (E::DeviceType, true),
                (E::Firmware, true),
                (E::MediaAddress, true),
                (E::Keepalive, true),
                (E::Scram, true),
            ],
            MessageType::Challenge | MessageType::Proof => &[(E::Scram, true)],
            MessageType::Registered => &[
                (E::Keepalive, true),
                (E::Scram, true),
                (E::Expires, true),
                (E::PublicAddress, true),
                (E::RegistrationId, true),
            ],
            MessageType::Refused => &[(E::Reason, true), (E::RetryAfter, false), (E::Text, false)],
            MessageType::Keepalive | MessageType::KeepaliveAck => &[(E::Sequence, true)],
            MessageType::Unregister | MessageType::Unregistered => &[],
            MessageType::Error => &[(E::ErrorCode, true), (E::Text, false)],
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The element (TLV) types and their codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElementType {
    /// [`Number`]: ASCII digits.
    Number = 0x0001,
    /// The device's MAC address: 6 bytes.
    Mac = 0x0002,
    /// [`DeviceType`]: a lowercase name.
    DeviceType = 0x0003,
    /// [`FirmwareVersion`]: printable ASCII.
    Firmware = 0x0004,
    /// The device's local media address: an address value.
    MediaAddress = 0x0005,
    /// Keepalive interval in seconds, u32: requested (Register; 0 = the relay's default) or
    /// granted (Registered).
    Keepalive = 0x0006,
    /// A [`ScramMessage`]: opaque bytes.
    Scram = 0x0007,
    /// Seconds of silence after which the relay drops the registration, u32.
    Expires = 0x0008,
    /// The client's address and port as the relay sees them: an address value.
    PublicAddress = 0x0009,
    /// [`RegistrationId`]: u64.
    RegistrationId = 0x000a,
    /// A [`Refusal`] code, u16.
    Reason = 0x000b,
    /// Seconds before trying again, u32.
    RetryAfter = 0x000c,
    /// [`Text`]: UTF-8.
    Text = 0x000d,
    /// A keepalive's sequence number, u32.
    Sequence = 0x000e,
    /// An [`ErrorCode`], u16.
    ErrorCode = 0x000f,
}

impl ElementType {
    /// Every element type, in code order.
    pub const ALL: [ElementType; 15] = [
        ElementType::Number,
        ElementType::Mac,
        ElementType::DeviceType,
        ElementType::Firmware,
        ElementType::MediaAddress,
        ElementType::Keepalive,
        ElementType::Scram,
        ElementType::Expires,
        ElementType::PublicAddress,
        ElementType::RegistrationId,
        ElementType::Reason,
        ElementType::RetryAfter,
        ElementType::Text,
        ElementType::Sequence,
        ElementType::ErrorCode,
    ];

    /// The type's code.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The type with code `code`.
    pub fn from_code(code: u16) -> Option<ElementType> {
        ElementType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// Stable lowercase name, as in the specification.
    pub const fn name(self) -> &'static str {
        match self {
            ElementType::Number => "number",
            ElementType::Mac => "mac",
            ElementType::DeviceType => "device_type",
            ElementType::Firmware => "firmware",
            ElementType::MediaAddress => "media_address",
            ElementType::Keepalive => "keepalive",
            ElementType::Scram => "scram",
            ElementType::Expires => "expires",
            ElementType::PublicAddress => "public_address",
            ElementType::RegistrationId => "registration_id",
            ElementType::Reason => "reason",
            ElementType::RetryAfter => "retry_after",
            ElementType::Text => "text",
            ElementType::Sequence => "sequence",
            ElementType::ErrorCode => "error_code",
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame that cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first byte is not [`MAGIC`]: this is not a registration stream.
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    /// The version byte is not [`VERSION`].
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The header announces a frame longer than [`MAX_FRAME_LEN`] (the announced length).
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// The message type code is not defined.
    #[error("unknown message type {0:#04x}")]
    UnknownMessageType(u8),
    /// A flag bit is set; version 1 defines none.
    #[error("reserved flags {0:#04x} are set")]
    ReservedFlags(u8),
    /// An element's header or value runs past the end of the frame body.
    #[error("{message}: an element runs past the end of the frame")]
    ElementOverrun {
        /// The frame's message type.
        message: MessageType,
    },
    /// An element type this codec does not know, without the may-ignore bit.
    #[error("{message}: unknown element {element:#06x} that may not be ignored")]
    UnknownElement {
        /// The frame's message type.
        message: MessageType,
        /// The element's type code.
        element: u16,
    },
    /// A known element that this message type does not carry.
    #[error("{message}: element {element} does not belong in this message")]
    UnexpectedElement {
        /// The frame's message type.
        message: MessageType,
        /// The element.
        element: ElementType,
    },
    /// An element appears twice.
    #[error("{message}: element {element} appears more than once")]
    DuplicateElement {
        /// The frame's message type.
        message: MessageType,
        /// The element.
        element: ElementType,
    },
    /// A required element is absent.
    #[error("{message}: element {element} is missing")]
    MissingElement {
        /// The frame's message type.
        message: MessageType,
        /// The element.
        element: ElementType,
    },
    /// An element's value is not admissible.
    #[error("{message}: element {element}: {reason}")]
    BadValue {
        /// The frame's message type.
        message: MessageType,
        /// The element.
        element: ElementType,
        /// Why (lowercase).
        reason: &'static str,
    },
}

impl FrameError {
    /// Whether the stream has lost its framing: after a bad magic or version byte, or an
    /// oversize length, the next frame's start is unknown, so nothing more can be decoded.
    /// After any other error the bad frame's length was known and decoding could go on.
    pub const fn is_fatal(&self) -> bool {
        matches!(
            self,
            FrameError::BadMagic(_) | FrameError::UnsupportedVersion(_) | FrameError::TooLarge(_)
        )
    }

    /// The code of the `Error` frame that answers this error.
    pub const fn error_code(&self) -> ErrorCode {
        match self {
            FrameError::BadMagic(_) | FrameError::UnsupportedVersion(_) => {
                ErrorCode::UnsupportedVersion
            }
            FrameError::TooLarge(_) => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// `Register`: a device asks to register (client → relay).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    /// The device's internal number: its identity and SCRAM user name.
    pub number: Number,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The device type.
    pub device_type: DeviceType,
    /// The firmware version.
    pub firmware: FirmwareVersion,
    /// The device's own (LAN) media address and port, before the home router's NAT.
    pub media_addr: SocketAddr,
    /// Requested keepalive interval in seconds; 0: the relay's default.
    pub keepalive_s: u32,
    /// The SCRAM client-first message (RFC 5802 §5.1: gs2 header, `n=`, `r=`).
    pub client_first: ScramMessage,
}

/// `Registered`: the registration is in effect (relay → client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The SCRAM server-final message (`v=`: the server signature the client must verify).
    pub server_final: ScramMessage,
    /// Granted keepalive interval in seconds.
    pub keepalive_s: u32,
    /// Seconds without any frame from the client after which the relay drops the registration.
    pub expires_s: u32,
    /// The client's address and port as the relay saw them: the home router's mapping.
    pub public_addr: SocketAddr,
    /// The registration's id.
    pub registration_id: RegistrationId,
}

/// `Refused`: the registration is refused and the session ends (relay → client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub refusal: Refusal,
    /// Human-readable detail (may be empty). It never says more than `refusal` about the
    /// device's record.
    pub text: Text,
}

/// `Error`: the sender ends the session (either way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What went wrong.
    pub code: ErrorCode,
    /// Human-readable detail (may be empty).
    pub text: Text,
}

/// One frame of the registration protocol, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// See [`Register`].
    Register(Register),
    /// The SCRAM server-first message (`r=`, `s=`, `i=`) (relay → client).
    Challenge {
        /// The server-first message.
        server_first: ScramMessage,
    },
    /// The SCRAM client-final message (`c=`, `r=`, `p=`) (client → relay).
    Proof {
        /// The client-final message.
        client_final: ScramMessage,
    },
    /// See [`Registered`].
    Registered(Registered),
    /// See [`Refused`].
    Refused(Refused),
    /// The device is alive (client → relay).
    Keepalive {
        /// Sequence number, echoed in the answer.
        seq: u32,
    },
    /// Answer to [`Frame::Keepalive`] (relay → client).
    KeepaliveAck {
        /// The keepalive's sequence number.
        seq: u32,
    },
    /// End the registration (client → relay).
    Unregister,
    /// The registration has ended (relay → client).
    Unregistered,
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
}

impl Frame {
    /// The frame's message type.
    pub const fn message_type(&self) -> MessageType {
        match self {
            Frame::Register(_) => MessageType::Register,
            Frame::Challenge { .. } => MessageType::Challenge,
            Frame::Proof { .. } => MessageType::Proof,
            Frame::Registered(_) => MessageType::Registered,
            Frame::Refused(_) => MessageType::Refused,
            Frame::Keepalive { .. } => MessageType::Keepalive,
            Frame::KeepaliveAck { .. } => MessageType::KeepaliveAck,
            Frame::Unregister => MessageType::Unregister,
            Frame::Unregistered => MessageType::Unregistered,
            Frame::Error(_) => MessageType::Error,
        }
    }

    /// An `Error` frame.
    pub fn error(code: ErrorCode, text: Text) -> Frame {
        Frame::Error(ErrorFrame { code, text })
    }

    /// Appends the frame's encoding to `buf`: the header, then the elements in ascending type
    /// order (the canonical form; receivers accept any order).
    pub fn encode(&self, buf: &mut Vec<u8>) {
        let start = buf.len();
        buf.extend_from_slice(&[MAGIC, VERSION, self.message_type().code(), 0, 0, 0]);
        let mut put = |t: ElementType, value: &[u8]| put_element(buf, t, value);
        match self {
            Frame::Register(r) => {
                put(ElementType::Number, r.number.as_str().as_bytes());
                put(ElementType::Mac, &r.mac);
                put(ElementType::DeviceType, r.device_type.as_str().as_bytes());
                put(ElementType::Firmware, r.firmware.as_str().as_bytes());
                put(ElementType::MediaAddress, &encode_addr(r.media_addr));
                put(ElementType::Keepalive, &r.keepalive_s.to_be_bytes());
                put(ElementType::Scram, r.client_first.as_bytes());
            }
            Frame::Challenge { server_first: m } | Frame::Proof { client_final: m } => {
                put(ElementType::Scram, m.as_bytes());
            }
            Frame::Registered(r) => {
                put(ElementType::Keepalive, &r.keepalive_s.to_be_bytes());
                put(ElementType::Scram, r.server_final.as_bytes());
                put(ElementType::Expires, &r.expires_s.to_be_bytes());
                put(ElementType::PublicAddress, &encode_addr(r.public_addr));
                put(
                    ElementType::RegistrationId,
                    &r.registration_id.0.to_be_bytes(),
                );
            }
            Frame::Refused(r) => {
                put(ElementType::Reason, &r.refusal.code().to_be_bytes());
                if let Some(s) = r.refusal.retry_after_s() {
                    put(ElementType::RetryAfter, &s.to_be_bytes());
                }
                if !r.text.as_str().is_empty() {
                    put(ElementType::Text, r.text.as_str().as_bytes());
                }
            }
            Frame::Keepalive { seq } | Frame::KeepaliveAck { seq } => {
                put(ElementType::Sequence, &seq.to_be_bytes());
            }
            Frame::Unregister | Frame::Unregistered => {}
            Frame::Error(e) => {
                put(ElementType::ErrorCode, &e.code.code().to_be_bytes());
                if !e.text.as_str().is_empty() {
                    put(ElementType::Text, e.text.as_str().as_bytes());
                }
            }
        }
        // The value types bound every field, so the body always fits (a test checks the
        // largest frame of each type); saturating keeps this total regardless.
        let body = buf.len() - start - HEADER_LEN;
        let len = u16::try_from(body).unwrap_or(u16::MAX).to_be_bytes();
        buf[start + 4..start + HEADER_LEN].copy_from_slice(&len);
    }

    /// The frame's encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode(&mut buf);
        buf
    }

    /// Decodes the frame at the start of `buf`: the frame and the bytes it took, or `None`
    /// while `buf` holds only part of a frame. On a non-fatal error ([`FrameError::is_fatal`])
    /// the bad frame is [`frame_len`] bytes long.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(len) = frame_len(buf)? else {
            return Ok(None);
        };
        let Some(frame) = buf.get(..len) else {
            return Ok(None);
        };
        Ok(Some((decode_complete(frame)?, len)))
    }
}

fn put_element(buf: &mut Vec<u8>, t: ElementType, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&t.code().to_be_bytes());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(value.get(..usize::from(len)).unwrap_or(value));
}

/// An address value: family (4 or 6), port (u16), then 4 or 16 address bytes.
fn encode_addr(addr: SocketAddr) -> Vec<u8> {
    let mut v = Vec::with_capacity(19);
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.push(4);
            v.extend_from_slice(&addr.port().to_be_bytes());
            v.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            v.push(6);
            v.extend_from_slice(&addr.port().to_be_bytes());
            v.extend_from_slice(&ip.octets());
        }
    }
    v
}

fn decode_addr(v: &[u8]) -> Result<SocketAddr, &'static str> {
    let (&family, rest) = v.split_first().ok_or("empty address")?;
    let (port, ip) = match rest {
        [p0, p1, ip @ ..] => (u16::from_be_bytes([*p0, *p1]), ip),
        _ => return Err("address too short"),
    };
    let ip = match (family, <[u8; 4]>::try_from(ip), <[u8; 16]>::try_from(ip)) {
        (4, Ok(a), _) => IpAddr::V4(Ipv4Addr::from(a)),
        (6, _, Ok(a)) => IpAddr::V6(Ipv6Addr::from(a)),
        (4 | 6, _, _) => return Err("address length does not match its family"),
        _ => return Err("unknown address family"),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The length of the frame starting `buf` once its header is complete (`None` before), after
/// checking the header. Bad magic and version bytes are reported as soon as they arrive.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if let Some(&m) = buf.first()
        && m != MAGIC
    {
        return Err(FrameError::BadMagic(m));
    }
    if let Some(&v) = buf.get(1)
        && v != VERSION
    {
        return Err(FrameError::UnsupportedVersion(v));
    }
    let Some(&[_, _, _, _, l0, l1]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = HEADER_LEN + usize::from(u16::from_be_bytes([l0, l1]));
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(len))
}

/// The elements of one frame, each known one at most once.
struct Elements<'a> {
    message: MessageType,
    values: [Option<&'a [u8]>; ElementType::ALL.len()],
}

impl<'a> Elements<'a> {
    fn parse(message: MessageType, mut body: &'a [u8]) -> Result<Elements<'a>, FrameError> {
        let mut values = [None; ElementType::ALL.len()];
        let overrun = FrameError::ElementOverrun { message };
        while !body.is_empty() {
            let Some(&[t0, t1, l0, l1]) = body.get(..ELEMENT_HEADER_LEN) else {
                return Err(overrun);
            };
            let code = u16::from_be_bytes([t0, t1]);
            let end = ELEMENT_HEADER_LEN + usize::from(u16::from_be_bytes([l0, l1]));
            let value = body.get(ELEMENT_HEADER_LEN..end).ok_or(overrun)?;
            body = body.get(end..).unwrap_or_default();
            let Some(element) = ElementType::from_code(code) else {
                if code & ELEMENT_MAY_IGNORE != 0 {
                    continue;
                }
                return Err(FrameError::UnknownElement {
                    message,
                    element: code,
                });
            };
            if !message.elements().iter().any(|&(e, _)| e == element) {
                return Err(FrameError::UnexpectedElement { message, element });
            }
            let slot = &mut values[Elements::index(element)];
            // Duplicates are refused, never "first wins" or "last wins": two implementations
            // picking different copies is how a checked value and a used value come apart.
            if slot.is_some() {
                return Err(FrameError::DuplicateElement { message, element });
            }
            *slot = Some(value);
        }
        for &(element, required) in message.elements() {
            if required && values[Elements::index(element)].is_none() {
                return Err(FrameError::MissingElement { message, element });
            }
        }
        Ok(Elements { message, values })
    }

    /// The element's slot: codes run from 1 without gaps (a unit test checks it).
    const fn index(element: ElementType) -> usize {
        element.code() as usize - 1
    }

    fn get(&self, element: ElementType) -> Option<&'a [u8]> {
        self.values[Elements::index(element)]
    }

    /// A required element's value (presence was checked in `parse`).
    fn req(&self, element: ElementType) -> Result<&'a [u8], FrameError> {
        self.get(element).ok_or(FrameError::MissingElement {
            message: self.message,
            element,
        })
    }

    fn bad(&self, element: ElementType) -> impl Fn(&'static str) -> FrameError {
        let message = self.message;
        move |reason| FrameError::BadValue {
            message,
            element,
            reason,
        }
    }

    fn value<T>(
        &self,
        element: ElementType,
        parse: impl FnOnce(&[u8]) -> Result<T, &'static str>,
    ) -> Result<T, FrameError> {
        parse(self.req(element)?).map_err(self.bad(element))
    }

    fn opt<T>(
        &self,
        element: ElementType,
        parse: impl FnOnce(&[u8]) -> Result<T, &'static str>,
    ) -> Result<Option<T>, FrameError> {
        self.get(element)
            .map(|v| parse(v).map_err(self.bad(element)))
            .transpose()
    }
}

fn be<const N: usize>(v: &[u8]) -> Result<[u8; N], &'static str> {
    <[u8; N]>::try_from(v).map_err(|_| "wrong length")
}
fn u16_value(v: &[u8]) -> Result<u16, &'static str> {
    be(v).map(u16::from_be_bytes)
}
fn u32_value(v: &[u8]) -> Result<u32, &'static str> {
    be(v).map(u32::from_be_bytes)
}
fn u64_value(v: &[u8]) -> Result<u64, &'static str> {
    be(v).map(u64::from_be_bytes)
}
fn text_value(v: &[u8]) -> Result<Text, &'static str> {
    Text::from_wire(v)
}

/// Decodes one complete frame (`frame` is exactly [`frame_len`] bytes).
fn decode_complete(frame: &[u8]) -> Result<Frame, FrameError> {
    let (header, body) = frame.split_at_checked(HEADER_LEN).unwrap_or((frame, &[]));
    let (code, flags) = match header {
        [_, _, code, flags, ..] => (*code, *flags),
        _ => (0, 0),
    };
    let message = MessageType::from_code(code).ok_or(FrameError::UnknownMessageType(code))?;
    if flags != 0 {
        return Err(FrameError::ReservedFlags(flags));
    }
    let e = Elements::parse(message, body)?;
    use ElementType as E;
    let frame = match message {
        MessageType::Register => Frame::Register(Register {
            number: e.value(E::Number, Number::from_wire)?,
            mac: e.value(E::Mac, be::<6>)?,
            device_type: e.value(E::DeviceType, DeviceType::from_wire)?,
            firmware: e.value(E::Firmware, FirmwareVersion::from_wire)?,
            media_addr: e.value(E::MediaAddress, decode_addr)?,
            keepalive_s: e.value(E::Keepalive, u32_value)?,
            client_first: e.value(E::Scram, ScramMessage::from_wire)?,
        }),
        MessageType::Challenge => Frame::Challenge {
            server_first: e.value(E::Scram, ScramMessage::from_wire)?,
        },
        MessageType::Proof => Frame::Proof {
            client_final: e.value(E::Scram, ScramMessage::from_wire)?,
        },
        MessageType::Registered => Frame::Registered(Registered {
            server_final: e.value(E::Scram, ScramMessage::from_wire)?,
            keepalive_s: e.value(E::Keepalive, u32_value)?,
            expires_s: e.value(E::Expires, u32_value)?,
            public_addr: e.value(E::PublicAddress, decode_addr)?,
            registration_id: RegistrationId(e.value(E::RegistrationId, u64_value)?),
        }),
        MessageType::Refused => {
            let code = e.value(E::Reason, u16_value)?;
            let retry_after = e.opt(E::RetryAfter, u32_value)?;
            let refusal = Refusal::from_wire(code, retry_after).ok_or_else(|| {
                e.bad(E::Reason)(
                    "unknown reason, or retry_after missing (locked_out) or not allowed",
                )
            })?;
            Frame::Refused(Refused {
                refusal,
                text: e.opt(E::Text, text_value)?.unwrap_or_default(),
            })
        }
        MessageType::Keepalive => Frame::Keepalive {
            seq: e.value(E::Sequence, u32_value)?,
        },
        MessageType::KeepaliveAck => Frame::KeepaliveAck {
            seq: e.value(E::Sequence, u32_value)?,
        },
        MessageType::Unregister => Frame::Unregister,
        MessageType::Unregistered => Frame::Unregistered,
        MessageType::Error => Frame::Error(ErrorFrame {
            code: e.value(E::ErrorCode, |v| {
                ErrorCode::from_code(u16_value(v)?).ok_or("unknown error code")
            })?,
            text: e.opt(E::Text, text_value)?.unwrap_or_default(),
        }),
    };
    Ok(frame)
}

/// A streaming decoder: bytes in as they arrive ([`Decoder::feed`]), frames out
/// ([`Decoder::next_frame`]) — partial frames wait for more bytes, several frames in one read
/// come out one by one.
///
/// It holds what was fed and not yet decoded, never more: a hostile length is refused from
/// the header, not awaited. A caller that drains `next_frame` after each `feed` holds at most
/// one partial frame ([`MAX_FRAME_LEN`] bytes) plus its last read.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    pos: usize,
    /// The fatal error that ended decoding, returned again by every later call.
    failed: Option<FrameError>,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes read from the stream. After a fatal error they are dropped.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` until more bytes are fed, or the error of a bad frame.
    /// After a non-fatal error the bad frame is skipped and decoding goes on; after a fatal one
    /// ([`FrameError::is_fatal`]) every call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let pending = self.buf.get(self.pos..).unwrap_or_default();
        let len = match frame_len(pending) {
            Ok(Some(len)) if pending.len() >= len => len,
            Ok(_) => return Ok(None),
            Err(e) => {
                self.failed = Some(e);
                self.buf = Vec::new();
                self.pos = 0;
                return Err(e);
            }
        };
        let frame = decode_complete(pending.get(..len).unwrap_or_default());
        self.pos += len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        frame.map(Some)
    }

    /// Bytes fed and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The fatal error that ended decoding, if any.
    pub fn failure(&self) -> Option<FrameError> {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register() -> Frame {
        Frame::Register(Register {
            number: Number::new("4711").unwrap(),
            mac: [0x00, 0x1a, 0xe8, 0x01, 0x02, 0x03],
            device_type: DeviceType::new("openstage_hfa").unwrap(),
            firmware: FirmwareVersion::new("V3 R0.40.4").unwrap(),
            media_addr: "192.168.1.20:5004".parse().unwrap(),
            keepalive_s: 30,
            client_first: ScramMessage::new(b"n,,n=4711,r=abc".to_vec()).unwrap(),
        })
    }

    #[test]
    fn codes_are_contiguous_and_unique() {
        // `Elements` indexes its table by `code - 1`.
        for (i, e) in ElementType::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(e.code()), i + 1, "{e}");
            assert_eq!(ElementType::from_code(e.code()), Some(e));
            assert_eq!(e.code() & ELEMENT_MAY_IGNORE, 0);
        }
        for (i, t) in MessageType::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(t.code()), i + 1, "{t}");
            assert_eq!(MessageType::from_code(t.code()), Some(t));
        }
        assert_eq!(ElementType::from_code(0), None);
        assert_eq!(MessageType::from_code(0), None);
    }

    #[test]
    fn keepalive_golden_bytes() {
        // The example in docs/registration-protocol.md.
        let bytes = Frame::Keepalive { seq: 7 }.to_bytes();
        assert_eq!(
            bytes,
            [
                0x48, 0x01, 0x06, 0x00, 0x00, 0x08, 0x00, 0x0e, 0x00, 0x04, 0x00, 0x00, 0x00, 0x07
            ]
        );
        assert_eq!(
            Frame::decode(&bytes).unwrap(),
            Some((Frame::Keepalive { seq: 7 }, bytes.len()))
        );
    }

    #[test]
    fn register_golden_bytes() {
        // The example in docs/registration-protocol.md.
        let f = Frame::Register(Register {
            number: Number::new("4711").unwrap(),
            mac: [0x00, 0x1a, 0xe8, 0x12, 0x34, 0x56],
            device_type: DeviceType::new("openstage_hfa").unwrap(),
            firmware: FirmwareVersion::new("V3 R0.40.4").unwrap(),
            media_addr: "192.168.1.20:5004".parse().unwrap(),
            keepalive_s: 30,
            client_first: ScramMessage::new(b"n,,n=4711,r=rOprNGfwEbeRWgbNEkqO".to_vec()).unwrap(),
        });
        let mut want = vec![0x48, 0x01, 0x01, 0x00, 0x00, 0x68];
        want.extend_from_slice(&[0x00, 0x01, 0x00, 0x04, b'4', b'7', b'1', b'1']);
        want.extend_from_slice(&[0x00, 0x02, 0x00, 0x06, 0x00, 0x1a, 0xe8, 0x12, 0x34, 0x56]);
        want.extend_from_slice(&[0x00, 0x03, 0x00, 0x0d]);
        want.extend_from_slice(b"openstage_hfa");
        want.extend_from_slice(&[0x00, 0x04, 0x00, 0x0a]);
        want.extend_from_slice(b"V3 R0.40.4");
        want.extend_from_slice(&[0x00, 0x05, 0x00, 0x07, 0x04, 0x13, 0x8c, 192, 168, 1, 20]);
        want.extend_from_slice(&[0x00, 0x06, 0x00, 0x04, 0x00, 0x00, 0x00, 0x1e]);
        want.extend_from_slice(&[0x00, 0x07, 0x00, 0x20]);
        want.extend_from_slice(b"n,,n=4711,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(want.len(), 110);
        assert_eq!(f.to_bytes(), want);
        assert_eq!(Frame::decode(&want).unwrap(), Some((f, want.len())));
    }

    #[test]
    fn refused_golden_bytes() {
        let f = Frame::Refused(Refused {
            refusal: Refusal::LockedOut { retry_after_s: 300 },
            text: Text::empty(),
        });
        assert_eq!(
            f.to_bytes(),
            [
                0x48, 0x01, 0x05, 0x00, 0x00, 0x0e, // header, body 14 bytes
                0x00, 0x0b, 0x00, 0x02, 0x00, 0x02, // reason locked_out
                0x00, 0x0c, 0x00, 0x04, 0x00, 0x00, 0x01, 0x2c, // retry_after 300
            ]
        );
    }

    #[test]
    fn register_round_trips_and_needs_every_byte() {
        let f = register();
        let bytes = f.to_bytes();
        assert_eq!(Frame::decode(&bytes).unwrap(), Some((f, bytes.len())));
        for n in 0..bytes.len() {
            assert_eq!(Frame::decode(&bytes[..n]).unwrap(), None, "prefix {n}");
        }
    }

    #[test]
    fn header_errors_are_early_and_fatal() {
        assert_eq!(Frame::decode(b"G"), Err(FrameError::BadMagic(b'G')));
        assert_eq!(
            Frame::decode(&[MAGIC, 2]),
            Err(FrameError::UnsupportedVersion(2))
        );
        let e = Frame::decode(&[MAGIC, VERSION, 1, 0, 0x10, 0x00]).unwrap_err();
        assert_eq!(e, FrameError::TooLarge(HEADER_LEN + 0x1000));
        assert!(e.is_fatal());
        assert_eq!(e.error_code(), ErrorCode::FrameTooLarge);
        // The largest admissible body is awaited, not refused.
        let max = (MAX_BODY_LEN as u16).to_be_bytes();
        assert_eq!(
            Frame::decode(&[MAGIC, VERSION, 1, 0, max[0], max[1]]),
            Ok(None)
        );
    }

    fn with_body(t: MessageType, body: &[u8]) -> Vec<u8> {
        let mut v = vec![MAGIC, VERSION, t.code(), 0];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn element_rules() {
        let seq = [0x00, 0x0e, 0x00, 0x04, 0, 0, 0, 1];
        let ignorable = [0x80, 0x99, 0x00, 0x01, 0xff];
        let critical = [0x00, 0x99, 0x00, 0x01, 0xff];
        let ka = MessageType::Keepalive;
        let ok = |body: &[u8]| Frame::decode(&with_body(ka, body)).map(|f| f.map(|f| f.0));
        assert_eq!(
            ok(&[&ignorable[..], &seq].concat()),
            Ok(Some(Frame::Keepalive { seq: 1 }))
        );
        assert_eq!(
            ok(&[&critical[..], &seq].concat()),
            Err(FrameError::UnknownElement {
                message: ka,
                element: 0x99
            })
        );
        assert_eq!(
            ok(&[seq, seq].concat()),
            Err(FrameError::DuplicateElement {
                message: ka,
                element: ElementType::Sequence
            })
        );
        assert_eq!(
            ok(&[]),
            Err(FrameError::MissingElement {
                message: ka,
                element: ElementType::Sequence
            })
        );
        assert_eq!(
            ok(&seq[..7]),
            Err(FrameError::ElementOverrun { message: ka })
        );
        assert_eq!(
            ok(&[0x00, 0x0d, 0x00, 0x00]),
            Err(FrameError::UnexpectedElement {
                message: ka,
                element: ElementType::Text
            })
        );
        assert!(matches!(
            ok(&[0x00, 0x0e, 0x00, 0x02, 0, 1]),
            Err(FrameError::BadValue { .. })
        ));
    }

    #[test]
    fn decoder_skips_a_bad_frame_and_goes_on() {
        let mut d = Decoder::new();
        let mut bytes = with_body(MessageType::Keepalive, &[]);
        Frame::Unregister.encode(&mut bytes);
        d.feed(&bytes);
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::MissingElement { .. })
        ));
        assert_eq!(d.next_frame(), Ok(Some(Frame::Unregister)));
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn decoder_stops_for_good_after_a_fatal_error() {
        let mut d = Decoder::new();
        d.feed(b"GET / HTTP/1.1\r\n");
        assert_eq!(d.next_frame(), Err(FrameError::BadMagic(b'G')));
        d.feed(&Frame::Unregister.to_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::BadMagic(b'G')));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn largest_frames_fit() {
        let scram = ScramMessage::new(vec![b'x'; ScramMessage::MAX_LEN]).unwrap();
        let v6: SocketAddr = "[2001:db8::1]:65535".parse().unwrap();
        let reg = Frame::Register(Register {
            number: Number::new("9".repeat(Number::MAX_LEN)).unwrap(),
            mac: [0xff; 6],
            device_type: DeviceType::new("a".repeat(DeviceType::MAX_LEN)).unwrap(),
            firmware: FirmwareVersion::new("~".repeat(FirmwareVersion::MAX_LEN)).unwrap(),
            media_addr: v6,
            keepalive_s: u32::MAX,
            client_first: scram.clone(),
        });
        let registered = Frame::Registered(Registered {
            server_final: scram,
            keepalive_s: u32::MAX,
            expires_s: u32::MAX,
            public_addr: v6,
            registration_id: RegistrationId(u64::MAX),
        });
        let text = Text::new("é".repeat(Text::MAX_LEN / 2)).unwrap();
        let refused = Frame::Refused(Refused {
            refusal: Refusal::LockedOut {
                retry_after_s: u32::MAX,
            },
            text: text.clone(),
        });
        let error = Frame::error(ErrorCode::ServerAuthFailed, text);
        for f in [reg, registered, refused, error] {
            let bytes = f.to_bytes();
            assert!(bytes.len() <= MAX_FRAME_LEN, "{} bytes", bytes.len());
            assert_eq!(Frame::decode(&bytes).unwrap(), Some((f, bytes.len())));
        }
    }
}
