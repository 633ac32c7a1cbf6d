//! The STUN server's decisions, without I/O (`docs/stun.md`): a Binding request in, the
//! response bytes and the address to send them from out, or the reason to drop it.
//!
//! - Binding requests (RFC 8489, with the magic cookie) are answered with XOR-MAPPED-ADDRESS,
//!   then, if they fit, RESPONSE-ORIGIN and OTHER-ADDRESS (only when a second address is
//!   configured, RFC 5780), then SOFTWARE; FINGERPRINT always closes the message.
//! - Never an amplifier: a response is at most [`response_bound`]`(request length)` =
//!   max(request length, [`RESPONSE_FLOOR`]) bytes. Optional attributes that would exceed the
//!   bound are left out; the mandatory part (header, XOR-MAPPED-ADDRESS, FINGERPRINT: 40 bytes
//!   for IPv4, 52 for IPv6) always fits the floor.
//! - CHANGE-REQUEST with a flag set is honoured only with a second address and over UDP;
//!   otherwise it is answered with 420 (Unknown Attribute) listing CHANGE-REQUEST, as a server
//!   without RFC 5780 support would. A CHANGE-REQUEST without flags is a plain Binding.
//! - Classic RFC 3489 requests (no magic cookie) are dropped ([`DropReason::Rfc3489`]): their
//!   answer (MAPPED-ADDRESS, unauthenticated, no FINGERPRINT) is the classic reflection vector,
//!   and every device the relay serves speaks RFC 5389 or later.
//! - Other unknown comprehension-required attributes get 420 too (at most
//!   [`MAX_UNKNOWN_LISTED`] listed); requests carrying MESSAGE-INTEGRITY are answered without
//!   it (the server holds no STUN credentials).
//! - [`Server::handle_into`] / [`answer_into`] write the response into the caller's buffer
//!   ([`MAX_RESPONSE_LEN`] bytes; `wire` encodes without allocating) and say what became of
//!   the request ([`Outcome`], whose `name()` is the metric label); [`Server::handle`] /
//!   [`answer`] are the same decisions with the bytes in a `Vec`.

pub mod client;
pub mod nat;
mod ratelimit;
mod wire;

pub use ratelimit::{RateConfig, RateLimiter};

use std::net::SocketAddr;
use std::time::Duration;

use stun_rs::attributes::discovery::ChangeRequestFlags;
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder};

use wire::Attr;

/// The STUN magic cookie (RFC 5389); its absence marks an RFC 3489 request.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// The smallest STUN message: the header.
pub const HEADER_LEN: usize = 20;
/// Every response may be this long even when the request is shorter (see [`response_bound`]).
/// 64 bytes hold the mandatory IPv4 or IPv6 answer and a full IPv4 RFC 5780 answer
/// (20 + XOR-MAPPED-ADDRESS 12 + RESPONSE-ORIGIN 12 + OTHER-ADDRESS 12 + FINGERPRINT 8).
pub const RESPONSE_FLOOR: usize = 64;
/// The largest request considered (a STUN message over UDP fits one unfragmented datagram).
pub const MAX_REQUEST_LEN: usize = 1280;
/// How many unknown comprehension-required attributes a 420 lists at most.
pub const MAX_UNKNOWN_LISTED: usize = 2;
/// The SOFTWARE value (16 bytes as an attribute).
pub const SOFTWARE: &str = "homerelay";
/// CHANGE-REQUEST's attribute type (RFC 5780).
pub const CHANGE_REQUEST: u16 = 0x0003;

/// The largest response allowed to a request of `request_len` bytes.
pub fn response_bound(request_len: usize) -> usize {
    request_len.max(RESPONSE_FLOOR)
}

/// The transport a request came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    /// RFC 5389 framing over TCP: responses go back on the same connection, so CHANGE-REQUEST
    /// cannot be honoured.
    Tcp,
}

/// The server's addresses: `primary`, and the RFC 5780 second address (different IP and
/// port) when configured. A request arrives on one of the four combinations of their IPs and
/// ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub primary: SocketAddr,
    pub other: Option<SocketAddr>,
}

/// What to do with a datagram or TCP frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send `bytes` to the source, from `from` (the local address it came to, or another
    /// combination of the configured addresses for CHANGE-REQUEST).
    Respond {
        bytes: Vec<u8>,
        from: SocketAddr,
    },
    Drop(DropReason),
}

/// Why nothing is sent. `name()` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a STUN message (or a malformed one).
    NotStun,
    /// RFC 3489: no magic cookie.
    Rfc3489,
    /// STUN, but not a Binding request (responses, indications, other methods).
    NotBindingRequest,
    /// Over the per-source rate.
    RateLimited,
    /// Longer than [`MAX_REQUEST_LEN`].
    TooLong,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::NotStun,
        DropReason::Rfc3489,
        DropReason::NotBindingRequest,
        DropReason::RateLimited,
        DropReason::TooLong,
    ];
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NotStun => "not_stun",
            DropReason::Rfc3489 => "rfc3489",
            DropReason::NotBindingRequest => "not_binding_request",
            DropReason::RateLimited => "rate_limited",
            DropReason::TooLong => "too_long",
        }
    }
}

/// What became of a request: answered, answered with an error (420), or dropped and why.
/// `name()` is the `result` label of the server's request counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A Binding success response.
    Answered,
    /// A 420 (Unknown Attribute) error response.
    Error,
    Dropped(DropReason),
}

impl Outcome {
    /// Every outcome, in [`Outcome::index`] order.
    pub const ALL: [Outcome; 2 + DropReason::ALL.len()] = [
        Outcome::Answered,
        Outcome::Error,
        Outcome::Dropped(DropReason::NotStun),
        Outcome::Dropped(DropReason::Rfc3489),
        Outcome::Dropped(DropReason::NotBindingRequest),
        Outcome::Dropped(DropReason::RateLimited),
        Outcome::Dropped(DropReason::TooLong),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Error => "error",
            Outcome::Dropped(r) => r.name(),
        }
    }

    /// The position in [`Outcome::ALL`] (for tables of counters).
    pub fn index(self) -> usize {
        match self {
            Outcome::Answered => 0,
            Outcome::Error => 1,
            Outcome::Dropped(r) => 2 + r as usize,
        }
    }
}

/// The longest response the server ever writes (an IPv6 RFC 5780 answer: header,
/// XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS, SOFTWARE, FINGERPRINT = 116 bytes;
/// a 420 is at most 80). The buffer of [`answer_into`].
pub const MAX_RESPONSE_LEN: usize = 128;

/// [`Decision`] without allocation: the response, if any, is in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the buffer's first `len` bytes to the source, from `from`; `error` for a 420.
    Respond {
        len: usize,
        from: SocketAddr,
        error: bool,
    },
    Drop(DropReason),
}

impl Verdict {
    pub fn outcome(&self) -> Outcome {
        match *self {
            Verdict::Respond { error: false, .. } => Outcome::Answered,
            Verdict::Respond { error: true, .. } => Outcome::Error,
            Verdict::Drop(r) => Outcome::Dropped(r),
        }
    }
}

impl Decision {
    pub fn outcome(&self) -> Outcome {
        match self {
            // The message class's high bit (0x0010 of the type) marks an error response.
            Decision::Respond { bytes, .. } if bytes.get(1).is_some_and(|b| b & 0x10 != 0) => {
                Outcome::Error
            }
            Decision::Respond { .. } => Outcome::Answered,
            Decision::Drop(r) => Outcome::Dropped(*r),
        }
    }

    fn from_verdict(v: Verdict, out: &[u8; MAX_RESPONSE_LEN]) -> Decision {
        match v {
            Verdict::Respond { len, from, .. } => Decision::Respond {
                bytes: out[..len].to_vec(),
                from,
            },
            Verdict::Drop(r) => Decision::Drop(r),
        }
    }
}

/// The server: [`answer`] behind a per-source [`RateLimiter`].
#[derive(Debug)]
pub struct Server {
    addresses: Addresses,
    limiter: RateLimiter,
}

impl Server {
    pub fn new(addresses: Addresses, rate: RateConfig) -> Self {
        Server {
            addresses,
            limiter: RateLimiter::new(rate),
        }
    }

    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// Decides about `request` from `source` received on `local` at monotonic time `now`.
    /// Every request counts against its source IP's budget, answered or not.
    pub fn handle(
        &mut self,
        request: &[u8],
        source: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        now: Duration,
    ) -> Decision {
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let v = self.handle_into(request, source, local, transport, now, &mut out);
        Decision::from_verdict(v, &out)
    }

    /// [`Server::handle`], writing the response into `out` (the shells' hot path: no
    /// allocation).
    pub fn handle_into(
        &mut self,
        request: &[u8],
        source: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        now: Duration,
        out: &mut [u8; MAX_RESPONSE_LEN],
    ) -> Verdict {
        if !self.limiter.allow(source.ip(), now) {
            return Verdict::Drop(DropReason::RateLimited);
        }
        answer_into(request, source, local, self.addresses, transport, out)
    }
}

/// Answers one request, without rate limiting. `local` is the address it arrived on.
pub fn answer(
    request: &[u8],
    source: SocketAddr,
    local: SocketAddr,
    addresses: Addresses,
    transport: Transport,
) -> Decision {
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let v = answer_into(request, source, local, addresses, transport, &mut out);
    Decision::from_verdict(v, &out)
}

/// [`answer`], writing the response into `out`.
pub fn answer_into(
    request: &[u8],
    source: SocketAddr,
    local: SocketAddr,
    addresses: Addresses,
    transport: Transport,
    out: &mut [u8; MAX_RESPONSE_LEN],
) -> Verdict {
    if request.len() > MAX_REQUEST_LEN {
        return Verdict::Drop(DropReason::TooLong);
    }
    // STUN's first two bits are zero; the length is a multiple of 4 and matches the buffer.
    if request.len() < HEADER_LEN
        || request[0] & 0xc0 != 0
        || usize::from(u16::from_be_bytes([request[2], request[3]])) + HEADER_LEN != request.len()
    {
        return Verdict::Drop(DropReason::NotStun);
    }
    if request[4..8] != MAGIC_COOKIE {
        return Verdict::Drop(DropReason::Rfc3489);
    }
    let decoder = MessageDecoderBuilder::default().build();
    let Ok((msg, _)) = decoder.decode(request) else {
        return Verdict::Drop(DropReason::NotStun);
    };
    if msg.method() != BINDING || msg.class() != MessageClass::Request {
        return Verdict::Drop(DropReason::NotBindingRequest);
    }
    let bound = response_bound(request.len());

    let mut unknown: Vec<u16> = Vec::new();
    let mut change_ip = false;
    let mut change_port = false;
    for attr in msg.attributes() {
        if let Ok(cr) = attr.as_change_request() {
            change_ip |= cr.flags().contains(ChangeRequestFlags::ChangeIp);
            change_port |= cr.flags().contains(ChangeRequestFlags::ChangePort);
        } else if attr.is_unknown() {
            let t = attr.attribute_type();
            if t.is_comprehension_required() && !unknown.contains(&t.as_u16()) {
                unknown.push(t.as_u16());
            }
        }
    }
    let discovery = addresses.other.filter(|_| transport == Transport::Udp);
    if (change_ip || change_port) && discovery.is_none() {
        unknown.insert(0, CHANGE_REQUEST);
    }
    unknown.dedup();

    let txid: [u8; 12] = *msg.transaction_id().as_bytes();
    if !unknown.is_empty() {
        unknown.truncate(MAX_UNKNOWN_LISTED);
        let len = wire::encode(
            out,
            wire::BINDING_ERROR,
            &txid,
            &[
                Attr::ErrorCode(420, "Unknown Attribute"),
                Attr::UnknownAttributes(&unknown),
            ],
            &[Attr::Software(SOFTWARE)],
            bound,
        );
        return respond(len, local, true);
    }

    let from = match discovery {
        Some(other) => {
            let ip = if change_ip {
                swap_ip(local, addresses.primary, other)
            } else {
                local.ip()
            };
            let port = if change_port {
                swap_port(local, addresses.primary, other)
            } else {
                local.port()
            };
            SocketAddr::new(ip, port)
        }
        None => local,
    };
    let software = Attr::Software(SOFTWARE);
    let len = match discovery {
        Some(other) => {
            let other_ip = swap_ip(local, addresses.primary, other);
            let other_port = swap_port(local, addresses.primary, other);
            wire::encode(
                out,
                wire::BINDING_SUCCESS,
                &txid,
                &[Attr::XorMappedAddress(source)],
                &[
                    Attr::ResponseOrigin(from),
                    Attr::OtherAddress(SocketAddr::new(other_ip, other_port)),
                    software,
                ],
                bound,
            )
        }
        None => wire::encode(
            out,
            wire::BINDING_SUCCESS,
            &txid,
            &[Attr::XorMappedAddress(source)],
            &[software],
            bound,
        ),
    };
    respond(len, from, false)
}

fn respond(len: Option<usize>, from: SocketAddr, error: bool) -> Verdict {
    match len {
        Some(len) => Verdict::Respond { len, from, error },
        // Unreachable by the floor's arithmetic; dropping is the safe answer all the same.
        None => Verdict::Drop(DropReason::NotStun),
    }
}

/// The IP of the other pair than `local`'s.
fn swap_ip(local: SocketAddr, primary: SocketAddr, other: SocketAddr) -> std::net::IpAddr {
    if local.ip() == other.ip() {
        primary.ip()
    } else {
        other.ip()
    }
}

fn swap_port(local: SocketAddr, primary: SocketAddr, other: SocketAddr) -> u16 {
    if local.port() == other.port() {
        primary.port()
    } else {
        other.port()
    }
}
