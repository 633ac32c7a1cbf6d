//! The client side of a STUN Binding transaction (RFC 8489), without I/O: the request bytes
//! for a transaction id and optional RFC 5780 CHANGE-REQUEST, and the reading of a response —
//! the mapped address (XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from an old server), and the RFC
//! 5780 RESPONSE-ORIGIN and OTHER-ADDRESS when the server offers behaviour discovery.
//!
//! The retransmission schedule and the sockets are the caller's (`control::stun_client`); this
//! module only decides whether a datagram answers the transaction and what it says.

use std::net::SocketAddr;

use stun_rs::attributes::discovery::{ChangeRequest, ChangeRequestFlags};
use stun_rs::attributes::stun::{Fingerprint, Software};
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    StunMessageBuilder, TransactionId,
};

use super::{HEADER_LEN, MAGIC_COOKIE, MAX_REQUEST_LEN, SOFTWARE};

/// RFC 5780 CHANGE-REQUEST flags of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Change {
    /// Ask the server to answer from its other IP address.
    pub ip: bool,
    /// Ask the server to answer from its other port.
    pub port: bool,
}

impl Change {
    /// A plain Binding request.
    pub const NONE: Change = Change {
        ip: false,
        port: false,
    };
    /// Answer from the other IP and the other port.
    pub const IP_AND_PORT: Change = Change {
        ip: true,
        port: true,
    };
    /// Answer from the other port (same IP).
    pub const PORT: Change = Change {
        ip: false,
        port: true,
    };

    fn any(self) -> bool {
        self.ip || self.port
    }
}

/// A Binding request: `txid` (12 random bytes, new for every transaction — retransmissions
/// reuse it), CHANGE-REQUEST when `change` asks for something, SOFTWARE and FINGERPRINT.
pub fn binding_request(txid: [u8; 12], change: Change) -> Vec<u8> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(txid));
    if change.any() {
        let flags = match (change.ip, change.port) {
            (true, true) => ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort,
            (true, false) => ChangeRequestFlags::ChangeIp.into(),
            _ => ChangeRequestFlags::ChangePort.into(),
        };
        b = b.with_attribute(ChangeRequest::new(Some(flags)));
    }
    if let Ok(s) = Software::new(SOFTWARE) {
        b = b.with_attribute(s);
    }
    let msg = b.with_attribute(Fingerprint::default()).build();
    let mut buf = [0u8; MAX_REQUEST_LEN];
    match MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &msg)
    {
        Ok(n) => buf[..n].to_vec(),
        // Unreachable: a header and three short attributes always fit 1280 bytes. The header
        // alone is still a valid Binding request.
        Err(_) => header_only(txid),
    }
}

fn header_only(txid: [u8; 12]) -> Vec<u8> {
    let mut v = vec![0x00, 0x01, 0x00, 0x00];
    v.extend_from_slice(&MAGIC_COOKIE);
    v.extend_from_slice(&txid);
    v
}

/// What a Binding success response says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingResponse {
    /// Our transport address as the server saw it (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS).
    pub mapped: SocketAddr,
    /// Where the server sent the response from (RFC 5780 RESPONSE-ORIGIN), if it says.
    pub response_origin: Option<SocketAddr>,
    /// The server's other address for behaviour discovery (RFC 5780 OTHER-ADDRESS), present
    /// only when the server supports it.
    pub other_address: Option<SocketAddr>,
    /// The server's SOFTWARE, if given.
    pub software: Option<String>,
}

/// Why a datagram does not give a usable answer to the transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a STUN message, a malformed one, or one whose FINGERPRINT does not match: ignore it
    /// and keep waiting.
    #[error("not a valid STUN message")]
    NotStun,
    /// A STUN message of another transaction, method or class: ignore it and keep waiting.
    #[error("not a response to this Binding transaction")]
    NotOurs,
    /// The server refused the request (e.g. 420 when it has no RFC 5780 support).
    #[error("the server answered {code} {reason}")]
    Refused { code: u16, reason: String },
    /// A success response without a mapped address.
    #[error("the response carries no (XOR-)MAPPED-ADDRESS")]
    NoMappedAddress,
}

impl ResponseError {
    /// Whether the transaction is over (the server answered), as opposed to a datagram to
    /// ignore.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ResponseError::Refused { .. } | ResponseError::NoMappedAddress
        )
    }
}

/// Reads `datagram` as the answer to the Binding transaction `txid`.
pub fn parse_response(datagram: &[u8], txid: [u8; 12]) -> Result<BindingResponse, ResponseError> {
    if datagram.len() < HEADER_LEN
        || datagram[0] & 0xc0 != 0
        || datagram[4..8] != MAGIC_COOKIE
        || usize::from(u16::from_be_bytes([datagram[2], datagram[3]])) + HEADER_LEN
            != datagram.len()
    {
        return Err(ResponseError::NotStun);
    }
    if datagram[8..20] != txid {
        return Err(ResponseError::NotOurs);
    }
    let ctx = DecoderContextBuilder::default().with_validation().build();
    let decoder = MessageDecoderBuilder::default().with_context(ctx).build();
    let Ok((msg, _)) = decoder.decode(datagram) else {
        return Err(ResponseError::NotStun);
    };
    if msg.method() != BINDING {
        return Err(ResponseError::NotOurs);
    }
    match msg.class() {
        MessageClass::SuccessResponse => {}
        MessageClass::ErrorResponse => {
            let (code, reason) = msg
                .attributes()
                .iter()
                .find_map(|a| a.as_error_code().ok())
                .map(|e| {
                    let c = e.error_code();
                    (c.error_code(), c.reason().to_string())
                })
                .unwrap_or((0, String::from("(no ERROR-CODE)")));
            return Err(ResponseError::Refused { code, reason });
        }
        _ => return Err(ResponseError::NotOurs),
    }
    let mut xor_mapped = None;
    let mut mapped = None;
    let mut response_origin = None;
    let mut other_address = None;
    let mut software = None;
    for a in msg.attributes() {
        if let Ok(x) = a.as_xor_mapped_address() {
            xor_mapped.get_or_insert(*x.socket_address());
        } else if let Ok(m) = a.as_mapped_address() {
            mapped.get_or_insert(*m.socket_address());
        } else if let Ok(r) = a.as_response_origin() {
            response_origin.get_or_insert(*r.socket_address());
        } else if let Ok(o) = a.as_other_address() {
            other_address.get_or_insert(*o.socket_address());
        } else if let Ok(s) = a.as_software() {
            software.get_or_insert(s.as_str().to_string());
        }
    }
    let mapped = xor_mapped
        .or(mapped)
        .ok_or(ResponseError::NoMappedAddress)?;
    Ok(BindingResponse {
        mapped,
        response_origin,
        other_address,
        software,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{Addresses, Decision, Transport, answer};

    const TXID: [u8; 12] = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn served(request: &[u8], addresses: Addresses, local: SocketAddr) -> (Vec<u8>, SocketAddr) {
        match answer(
            request,
            addr("203.0.113.7:40001"),
            local,
            addresses,
            Transport::Udp,
        ) {
            Decision::Respond { bytes, from } => (bytes, from),
            d => panic!("expected a response, got {d:?}"),
        }
    }

    #[test]
    fn our_server_answers_our_request_and_we_read_the_mapping() {
        let primary = addr("192.0.2.1:3478");
        let a = Addresses {
            primary,
            other: None,
        };
        let req = binding_request(TXID, Change::NONE);
        let (bytes, from) = served(&req, a, primary);
        assert_eq!(from, primary);
        let r = parse_response(&bytes, TXID).unwrap();
        assert_eq!(r.mapped, addr("203.0.113.7:40001"));
        assert_eq!(r.other_address, None);
        assert_eq!(r.software.as_deref(), Some(SOFTWARE));
    }

    #[test]
    fn rfc5780_attributes_are_read() {
        let primary = addr("192.0.2.1:3478");
        let other = addr("192.0.2.2:3479");
        let a = Addresses {
            primary,
            other: Some(other),
        };
        let req = binding_request(TXID, Change::IP_AND_PORT);
        let (bytes, from) = served(&req, a, primary);
        assert_eq!(from, other, "answered from the other IP and port");
        let r = parse_response(&bytes, TXID).unwrap();
        assert_eq!(r.response_origin, Some(other));
        assert_eq!(r.other_address, Some(other));

        let (bytes, from) = served(&binding_request(TXID, Change::PORT), a, primary);
        assert_eq!(from, addr("192.0.2.1:3479"));
        assert_eq!(
            parse_response(&bytes, TXID).unwrap().response_origin,
            Some(from)
        );
    }

    #[test]
    fn change_request_without_discovery_is_refused_with_420() {
        let primary = addr("192.0.2.1:3478");
        let a = Addresses {
            primary,
            other: None,
        };
        let (bytes, _) = served(&binding_request(TXID, Change::PORT), a, primary);
        let e = parse_response(&bytes, TXID).unwrap_err();
        assert!(
            matches!(e, ResponseError::Refused { code: 420, .. }),
            "{e:?}"
        );
        assert!(e.is_final());
    }

    #[test]
    fn other_transactions_and_garbage_are_ignored() {
        let primary = addr("192.0.2.1:3478");
        let a = Addresses {
            primary,
            other: None,
        };
        let (bytes, _) = served(&binding_request(TXID, Change::NONE), a, primary);
        let mut other = TXID;
        other[0] ^= 1;
        assert_eq!(parse_response(&bytes, other), Err(ResponseError::NotOurs));
        // A request is not a response.
        assert_eq!(
            parse_response(&binding_request(TXID, Change::NONE), TXID),
            Err(ResponseError::NotOurs)
        );
        // A flipped bit breaks FINGERPRINT.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 9] ^= 0x40;
        assert_eq!(parse_response(&bad, TXID), Err(ResponseError::NotStun));
        for junk in [&[][..], &[0u8; 19][..], &bytes[..bytes.len() - 4]] {
            assert_eq!(parse_response(junk, TXID), Err(ResponseError::NotStun));
        }
    }

    #[test]
    fn requests_are_well_formed_stun() {
        for change in [Change::NONE, Change::PORT, Change::IP_AND_PORT] {
            let req = binding_request(TXID, change);
            assert_eq!(req[..2], [0x00, 0x01]);
            assert_eq!(req[4..8], MAGIC_COOKIE);
            assert_eq!(req[8..20], TXID);
            assert_eq!(
                usize::from(u16::from_be_bytes([req[2], req[3]])) + HEADER_LEN,
                req.len()
            );
        }
        assert_eq!(header_only(TXID).len(), HEADER_LEN);
    }
}
