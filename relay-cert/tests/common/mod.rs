//! Requests shared by the integration tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use relay_cert::{
    CaRequest, San, Serial, SerialRegistry, ServerRequest, SignatureAlgorithm, Subject, Validity,
};
use time::{Duration, UtcDateTime};

pub fn subject(cn: &str) -> Subject {
    Subject {
        country: "DE".into(),
        organisation: "homerelay test".into(),
        unit: "Voice".into(),
        common_name: cn.into(),
    }
}

/// A window around now, so that `openssl verify` (which checks time) accepts it.
pub fn validity(days_before: i64, days_after: i64) -> Validity {
    let now = UtcDateTime::now();
    Validity {
        not_before: now - Duration::days(days_before),
        not_after: now + Duration::days(days_after),
    }
}

pub fn ca_request(
    serials: &mut dyn SerialRegistry,
    signature: SignatureAlgorithm,
    rsa_bits: u32,
) -> CaRequest {
    CaRequest {
        name: "homerelay-root".into(),
        serial: serials_next(serials),
        signature,
        rsa_bits,
        validity: validity(1, 3650),
        subject: subject("homerelay root CA"),
        san: vec![San::Dns("ca.homerelay.test".into())],
    }
}

pub fn server_request(
    serials: &mut dyn SerialRegistry,
    signature: SignatureAlgorithm,
    rsa_bits: u32,
) -> ServerRequest {
    ServerRequest {
        serial: serials_next(serials),
        signature,
        rsa_bits,
        validity: validity(0, 365),
        subject: subject("relay.homerelay.test"),
        san: vec![
            San::Dns("relay.homerelay.test".into()),
            San::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))),
            San::Ip(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
        ],
    }
}

/// A fresh random serial that the registry has not seen; `create_*` reserves it.
fn serials_next(serials: &dyn SerialRegistry) -> Serial {
    loop {
        let s = relay_cert::random_serial().expect("random serial");
        if !serials.is_used(&s).expect("registry") {
            return s;
        }
    }
}
