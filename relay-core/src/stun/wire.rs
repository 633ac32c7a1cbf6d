//! The server's responses written straight into a caller's buffer (RFC 8489 §5 and §14, RFC
//! 5780 §7): no allocation, and every attribute's size is known before anything is written,
//! so which optional attributes fit [`super::response_bound`] is arithmetic, not trial
//! encoding. The bytes are those `stun-rs` writes for the same message (zero padding,
//! FINGERPRINT over the message with its final length); the tests below hold the two to it.

use std::net::SocketAddr;

use super::{HEADER_LEN, MAGIC_COOKIE};

/// Message types (RFC 8489 §5): Binding success and error responses.
pub(super) const BINDING_SUCCESS: u16 = 0x0101;
pub(super) const BINDING_ERROR: u16 = 0x0111;

const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ERROR_CODE: u16 = 0x0009;
const UNKNOWN_ATTRIBUTES: u16 = 0x000a;
const SOFTWARE: u16 = 0x8022;
const FINGERPRINT: u16 = 0x8028;
const RESPONSE_ORIGIN: u16 = 0x802b;
const OTHER_ADDRESS: u16 = 0x802c;
/// FINGERPRINT is the CRC-32 of the message XOR this ("STUN", RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// FINGERPRINT's whole attribute: header and CRC.
const FINGERPRINT_LEN: usize = 8;

/// One attribute of a response.
#[derive(Debug, Clone, Copy)]
pub(super) enum Attr<'a> {
    XorMappedAddress(SocketAddr),
    ResponseOrigin(SocketAddr),
    OtherAddress(SocketAddr),
    Software(&'a str),
    /// ERROR-CODE: the code (300–699) and its reason phrase.
    ErrorCode(u16, &'a str),
    UnknownAttributes(&'a [u16]),
}

impl Attr<'_> {
    fn value_len(&self) -> usize {
        match self {
            Attr::XorMappedAddress(a) | Attr::ResponseOrigin(a) | Attr::OtherAddress(a) => {
                if a.is_ipv4() { 8 } else { 20 }
            }
            Attr::Software(s) => s.len(),
            Attr::ErrorCode(_, reason) => 4 + reason.len(),
            Attr::UnknownAttributes(types) => 2 * types.len(),
        }
    }

    /// The whole attribute: type, length, value and padding to 4 bytes.
    fn len(&self) -> usize {
        4 + self.value_len().div_ceil(4) * 4
    }

    fn kind(&self) -> u16 {
        match self {
            Attr::XorMappedAddress(_) => XOR_MAPPED_ADDRESS,
            Attr::ResponseOrigin(_) => RESPONSE_ORIGIN,
            Attr::OtherAddress(_) => OTHER_ADDRESS,
            Attr::Software(_) => SOFTWARE,
            Attr::ErrorCode(..) => ERROR_CODE,
            Attr::UnknownAttributes(_) => UNKNOWN_ATTRIBUTES,
        }
    }

    /// Writes the attribute at the start of `out` (which holds at least `self.len()` bytes).
    fn write(&self, out: &mut [u8], txid: &[u8; 12]) {
        let value_len = self.value_len();
        let out = &mut out[..self.len()];
        out[0..2].copy_from_slice(&self.kind().to_be_bytes());
        // At most 4 + 763 bytes of reason phrase: u16 always holds it.
        out[2..4].copy_from_slice(&(value_len as u16).to_be_bytes());
        let value = &mut out[4..];
        value.fill(0);
        match *self {
            Attr::XorMappedAddress(a) => {
                // RFC 8489 §14.2: port XOR the cookie's high half; address XOR the cookie
                // (IPv4) or the cookie and transaction id (IPv6).
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&MAGIC_COOKIE);
                key[4..].copy_from_slice(txid);
                address(value, a, Some(&key));
            }
            Attr::ResponseOrigin(a) | Attr::OtherAddress(a) => address(value, a, None),
            Attr::Software(s) => value[..s.len()].copy_from_slice(s.as_bytes()),
            Attr::ErrorCode(code, reason) => {
                value[2] = (code / 100) as u8;
                value[3] = (code % 100) as u8;
                value[4..4 + reason.len()].copy_from_slice(reason.as_bytes());
            }
            Attr::UnknownAttributes(types) => {
                for (slot, t) in value.chunks_exact_mut(2).zip(types) {
                    slot.copy_from_slice(&t.to_be_bytes());
                }
            }
        }
    }
}

/// An address value (RFC 8489 §14.1): reserved, family, port, address; XORed with `key` for
/// XOR-MAPPED-ADDRESS.
fn address(value: &mut [u8], a: SocketAddr, key: Option<&[u8; 16]>) {
    let (family, ip): (u8, &[u8]) = match &a {
        SocketAddr::V4(v4) => (0x01, &v4.ip().octets()[..]),
        SocketAddr::V6(v6) => (0x02, &v6.ip().octets()[..]),
    };
    value[1] = family;
    let mut port = a.port().to_be_bytes();
    let mut bytes = [0u8; 16];
    bytes[..ip.len()].copy_from_slice(ip);
    if let Some(key) = key {
        port[0] ^= key[0];
        port[1] ^= key[1];
        for (b, k) in bytes.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    value[2..4].copy_from_slice(&port);
    value[4..4 + ip.len()].copy_from_slice(&bytes[..ip.len()]);
}

/// Writes a message of `message_type` into `out`: the `mandatory` attributes, then each
/// `optional` one that keeps the message within `bound` (FINGERPRINT included), in order,
/// then FINGERPRINT. Returns its length, or `None` if even the mandatory message exceeds the
/// bound or `out`.
pub(super) fn encode(
    out: &mut [u8],
    message_type: u16,
    txid: &[u8; 12],
    mandatory: &[Attr<'_>],
    optional: &[Attr<'_>],
    bound: usize,
) -> Option<usize> {
    let bound = bound.min(out.len());
    let mut len = HEADER_LEN + FINGERPRINT_LEN + mandatory.iter().map(Attr::len).sum::<usize>();
    if len > bound {
        return None;
    }
    // Which optional attributes fit, in order (at most a handful).
    let mut take = [false; 8];
    for (i, a) in optional.iter().enumerate().take(take.len()) {
        if len + a.len() <= bound {
            len += a.len();
            take[i] = true;
        }
    }
    let out = &mut out[..len];
    out[0..2].copy_from_slice(&message_type.to_be_bytes());
    out[2..4].copy_from_slice(&((len - HEADER_LEN) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(txid);
    let mut at = HEADER_LEN;
    let chosen = optional
        .iter()
        .zip(take)
        .filter_map(|(a, t)| t.then_some(a));
    for a in mandatory.iter().chain(chosen) {
        a.write(&mut out[at..], txid);
        at += a.len();
    }
    let crc = crc32(&out[..at]) ^ FINGERPRINT_XOR;
    out[at..at + 2].copy_from_slice(&FINGERPRINT.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&4u16.to_be_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
    Some(len)
}

/// CRC-32 (ISO-HDLC, the one of zlib and FINGERPRINT), eight bytes at a time ("slicing by
/// 8": one table lookup per byte, no dependency between the eight).
fn crc32(bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    !crc
}

/// `CRC_TABLES[0]` is the classic byte table of the reflected polynomial 0xedb88320;
/// `CRC_TABLES[k][i]` is byte `i` followed by `k` zero bytes.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use stun_rs::attributes::discovery::{OtherAddress, ResponseOrigin};
    use stun_rs::attributes::stun::{
        ErrorCode, Fingerprint, Software, UnknownAttributes, XorMappedAddress,
    };
    use stun_rs::methods::BINDING;
    use stun_rs::{MessageClass, MessageEncoderBuilder, StunMessageBuilder, TransactionId};

    /// The same message encoded by stun-rs: the reference the bytes must equal.
    fn reference(class: MessageClass, txid: &[u8; 12], attrs: &[Attr<'_>]) -> Vec<u8> {
        let mut b =
            StunMessageBuilder::new(BINDING, class).with_transaction_id(TransactionId::from(*txid));
        for a in attrs {
            b = match *a {
                Attr::XorMappedAddress(x) => b.with_attribute(XorMappedAddress::from(x)),
                Attr::ResponseOrigin(x) => b.with_attribute(ResponseOrigin::from(x)),
                Attr::OtherAddress(x) => b.with_attribute(OtherAddress::from(x)),
                Attr::Software(s) => b.with_attribute(Software::new(s).unwrap()),
                Attr::ErrorCode(code, reason) => b.with_attribute(ErrorCode::new(
                    stun_rs::ErrorCode::new(code, reason).unwrap(),
                )),
                Attr::UnknownAttributes(t) => b.with_attribute(UnknownAttributes::from(t)),
            };
        }
        let msg = b.with_attribute(Fingerprint::default()).build();
        let mut buf = [0u8; 1500];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &msg)
            .unwrap();
        buf[..n].to_vec()
    }

    fn ours(message_type: u16, txid: &[u8; 12], attrs: &[Attr<'_>]) -> Vec<u8> {
        let mut out = [0u8; 256];
        let n = encode(&mut out, message_type, txid, attrs, &[], usize::MAX).unwrap();
        out[..n].to_vec()
    }

    /// The plain bitwise CRC-32 the tables must reproduce.
    fn crc32_bitwise(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    0xedb8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc_matches_the_check_value_and_the_bitwise_definition() {
        // The CRC-32/ISO-HDLC check value of "123456789".
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        let bytes: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 0..bytes.len() {
            assert_eq!(crc32(&bytes[..n]), crc32_bitwise(&bytes[..n]), "{n} bytes");
        }
    }

    #[test]
    fn optional_attributes_are_added_in_order_while_they_fit() {
        let txid = [7u8; 12];
        let src: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mandatory = [Attr::XorMappedAddress(src)];
        let optional = [
            Attr::ResponseOrigin("[::1]:3478".parse().unwrap()),
            Attr::Software("homerelay"),
        ];
        let mut out = [0u8; 256];
        // 40 mandatory bytes + 24 + 16.
        assert_eq!(
            encode(&mut out, BINDING_SUCCESS, &txid, &mandatory, &optional, 80),
            Some(80)
        );
        // Without room for RESPONSE-ORIGIN, SOFTWARE still fits after it.
        assert_eq!(
            encode(&mut out, BINDING_SUCCESS, &txid, &mandatory, &optional, 63),
            Some(56)
        );
        assert_eq!(
            out[..56],
            reference(
                MessageClass::SuccessResponse,
                &txid,
                &[mandatory[0], optional[1]]
            )[..]
        );
        assert_eq!(
            encode(&mut out, BINDING_SUCCESS, &txid, &mandatory, &optional, 39),
            None
        );
        // The buffer bounds the message too.
        assert_eq!(
            encode(
                &mut out[..50],
                BINDING_SUCCESS,
                &txid,
                &mandatory,
                &optional,
                64
            ),
            Some(40)
        );
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    proptest! {
        #[test]
        fn success_responses_are_byte_for_byte_those_of_stun_rs(
            txid in any::<[u8; 12]>(),
            mapped in addr(),
            origin in addr(),
            other in addr(),
            software in "[a-z]{0,20}",
            with_discovery in any::<bool>(),
        ) {
            let mut attrs = vec![Attr::XorMappedAddress(mapped)];
            if with_discovery {
                attrs.push(Attr::ResponseOrigin(origin));
                attrs.push(Attr::OtherAddress(other));
            }
            attrs.push(Attr::Software(&software));
            prop_assert_eq!(
                ours(BINDING_SUCCESS, &txid, &attrs),
                reference(MessageClass::SuccessResponse, &txid, &attrs)
            );
        }

        #[test]
        fn error_responses_are_byte_for_byte_those_of_stun_rs(
            txid in any::<[u8; 12]>(),
            code in 300u16..700,
            reason in "[A-Za-z ]{0,30}",
            unknown in proptest::collection::vec(any::<u16>(), 1..5),
        ) {
            let attrs = [
                Attr::ErrorCode(code, &reason),
                Attr::UnknownAttributes(&unknown),
                Attr::Software("homerelay"),
            ];
            prop_assert_eq!(
                ours(BINDING_ERROR, &txid, &attrs),
                reference(MessageClass::ErrorResponse, &txid, &attrs)
            );
        }
    }
}
