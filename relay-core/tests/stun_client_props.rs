//! The STUN client's reading of responses (`relay_core::stun::client`), fuzzed: whatever a
//! datagram holds, `parse_response` never panics; a response of our own server to our own
//! request reads back the address the server saw, for any address and transaction id; and a
//! single flipped bit anywhere in such a response never gives a different answer (the header
//! checks, the transaction id and FINGERPRINT catch it; a flip that makes FINGERPRINT an
//! unknown optional attribute or stretches an attribute over the rest may only lose optional
//! attributes). `HOMERELAY_FUZZ_CASES` sets the
//! budget (scripts/fuzz.sh runs it at length).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use relay_core::stun::client::{Change, binding_request, parse_response};
use relay_core::stun::{Addresses, Decision, Transport, answer};

fn served(txid: [u8; 12], change: Change, source: SocketAddr, two: bool) -> Vec<u8> {
    let (primary, other): (SocketAddr, SocketAddr) = if source.is_ipv4() {
        (
            "192.0.2.1:3478".parse().expect("address"),
            "192.0.2.2:3479".parse().expect("address"),
        )
    } else {
        (
            "[2001:db8::1]:3478".parse().expect("address"),
            "[2001:db8::2]:3479".parse().expect("address"),
        )
    };
    let addresses = Addresses {
        primary,
        other: two.then_some(other),
    };
    let request = binding_request(txid, change);
    match answer(&request, source, primary, addresses, Transport::Udp) {
        Decision::Respond { bytes, .. } => bytes,
        d => panic!("our server drops our request: {d:?}"),
    }
}

fn source() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("HOMERELAY_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_datagrams_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        stun_like in any::<bool>(),
        txid in any::<[u8; 12]>(),
    ) {
        let mut bytes = bytes;
        if stun_like && bytes.len() >= 20 {
            // A plausible header: type, length matching, cookie, the transaction id.
            bytes[0] &= 0x3f;
            let len = ((bytes.len() - 20) & !3) as u16;
            bytes.truncate(20 + usize::from(len));
            bytes[2..4].copy_from_slice(&len.to_be_bytes());
            bytes[4..8].copy_from_slice(&relay_core::stun::MAGIC_COOKIE);
            bytes[8..20].copy_from_slice(&txid);
        }
        let _ = parse_response(&bytes, txid);
    }

    #[test]
    fn our_servers_answers_read_back_and_any_flipped_bit_is_refused(
        txid in any::<[u8; 12]>(),
        src in source(),
        change in prop_oneof![Just(Change::NONE), Just(Change::PORT), Just(Change::IP_AND_PORT)],
        two in any::<bool>(),
        bit in any::<usize>(),
    ) {
        let response = served(txid, change, src, two);
        match parse_response(&response, txid) {
            Ok(r) => {
                prop_assert_eq!(r.mapped, src);
                prop_assert_eq!(r.other_address.is_some(), two && r.response_origin.is_some());
            }
            Err(e) => {
                // Only a CHANGE-REQUEST to a server without a second address is refused.
                prop_assert!(change != Change::NONE && !two, "{:?}", e);
            }
        }
        let original = parse_response(&response, txid);
        let mut flipped = response.clone();
        let bit = bit % (flipped.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        // Refused, or read without a wrong value: a flip that makes FINGERPRINT an unknown
        // optional attribute, or stretches an attribute over the ones after it (and
        // FINGERPRINT), leaves a valid message that may lack optional attributes, never one
        // with a different address.
        let read = parse_response(&flipped, txid);
        if let (Ok(r), Ok(o)) = (&read, &original) {
            prop_assert_eq!(r.mapped, o.mapped, "bit {} flipped", bit);
            for (got, want) in [
                (r.response_origin, o.response_origin),
                (r.other_address, o.other_address),
            ] {
                prop_assert!(got.is_none() || got == want, "bit {} flipped: {:?}", bit, r);
            }
        } else if let Ok(r) = &read {
            prop_assert!(false, "an error response read as an answer after bit {}: {:?}", bit, r);
        }
    }
}
