//! The public API end to end: a CA, a server certificate it signs, PKCS#12 and every refusal.

mod common;

use common::{ca_request, server_request, validity};
use relay_cert::{
    CertError, KeyAlgorithm, KeyPolicy, MemorySerialRegistry, San, Serial, SerialRegistry,
    SignatureAlgorithm, check_key_length, create_ca, create_server_cert, fingerprint_sha256,
    from_pkcs12, inspect, pem_chain, to_pkcs12, verify_issued_by,
};

const PASS: &str = "correct horse battery staple";

#[test]
fn rsa_ca_signs_an_ecdsa_and_an_rsa_server_certificate() {
    let policy = KeyPolicy::default();
    let mut serials = MemorySerialRegistry::new();
    let req = ca_request(&mut serials, SignatureAlgorithm::RsaSha256, 2048);
    let ca = create_ca(&req, &policy, &mut serials).expect("ca");

    let info = inspect(ca.cert_der()).expect("inspect ca");
    assert!(info.is_ca);
    assert_eq!(info.key_algorithm, KeyAlgorithm::Rsa);
    assert_eq!(info.key_bits, 2048);
    assert_eq!(info.signature, Some(SignatureAlgorithm::RsaSha256));
    assert_eq!(info.signature_algorithm, "sha256WithRSAEncryption");
    assert_eq!(info.serial_hex, req.serial.to_hex());
    assert_eq!(info.subject, info.issuer);
    assert_eq!(
        info.subject,
        "C=DE, O=homerelay test, OU=Voice, CN=homerelay root CA"
    );
    assert_eq!(info.san, req.san);
    assert_eq!(info.fingerprint, fingerprint_sha256(ca.cert_der()));
    // X.509 keeps whole seconds.
    assert_eq!(
        info.not_before.unix_timestamp(),
        req.validity.not_before.unix_timestamp()
    );
    assert_eq!(
        info.not_after.unix_timestamp(),
        req.validity.not_after.unix_timestamp()
    );
    verify_issued_by(ca.cert_der(), ca.cert_der()).expect("self-signed");
    assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));

    for (sig, bits) in [
        (SignatureAlgorithm::EcdsaP256Sha256, 0),
        (SignatureAlgorithm::RsaSha256, 2048),
    ] {
        let sreq = server_request(&mut serials, sig, bits);
        let server = create_server_cert(&ca, &sreq, &policy, &mut serials).expect("server");
        let s = inspect(server.cert_der()).expect("inspect server");
        assert!(!s.is_ca);
        assert_eq!(s.issuer, info.subject);
        assert_eq!(
            s.subject,
            "C=DE, O=homerelay test, OU=Voice, CN=relay.homerelay.test"
        );
        // Signed with the CA's algorithm, whatever the server's key.
        assert_eq!(s.signature, Some(SignatureAlgorithm::RsaSha256));
        assert_eq!(s.san, sreq.san, "ip and dns names present");
        assert_eq!(s.serial_hex, sreq.serial.to_hex());
        if sig.is_rsa() {
            assert_eq!(
                (s.key_algorithm.clone(), s.key_bits),
                (KeyAlgorithm::Rsa, 2048)
            );
        } else {
            assert_eq!(
                (s.key_algorithm.clone(), s.key_bits),
                (KeyAlgorithm::EcP256, 256)
            );
        }
        verify_issued_by(server.cert_der(), ca.cert_der()).expect("chain verifies");
        assert!(matches!(
            verify_issued_by(ca.cert_der(), server.cert_der()),
            Err(CertError::NotCa)
        ));
        let chain = pem_chain(&server, &ca);
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(chain.starts_with(server.cert_pem()));
        assert_eq!(relay_cert::key_pem(&server), server.key_pem());
    }
}

#[test]
fn ecdsa_ca_and_pkcs12_round_trip() {
    let policy = KeyPolicy::default();
    let mut serials = MemorySerialRegistry::new();
    let ca = create_ca(
        &ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0),
        &policy,
        &mut serials,
    )
    .expect("ca");
    let info = inspect(ca.cert_der()).expect("inspect");
    assert_eq!(info.key_algorithm, KeyAlgorithm::EcP256);
    assert_eq!(info.signature_algorithm, "ecdsa-with-SHA256");

    let server = create_server_cert(
        &ca,
        &server_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0),
        &policy,
        &mut serials,
    )
    .expect("server");
    verify_issued_by(server.cert_der(), ca.cert_der()).expect("chain");

    let p12 = to_pkcs12(&server, &ca, PASS).expect("pkcs12");
    let back = from_pkcs12(&p12, PASS).expect("read back");
    assert_eq!(
        back.chain,
        vec![server.cert_der().to_vec(), ca.cert_der().to_vec()]
    );
    assert_eq!(back.key_der.as_slice(), server.key_der());

    assert!(matches!(
        from_pkcs12(&p12, "wrong"),
        Err(CertError::WrongPassphrase)
    ));
    assert!(matches!(
        from_pkcs12(&p12, ""),
        Err(CertError::WrongPassphrase)
    ));
    assert!(matches!(
        to_pkcs12(&server, &ca, ""),
        Err(CertError::EmptyPassphrase)
    ));
    let mut damaged = p12.clone();
    let last = damaged.len() - 40;
    damaged[last] ^= 0xff;
    assert!(from_pkcs12(&damaged, PASS).is_err());
}

#[test]
fn rsa_sha512_ca_and_rsa_pkcs12_round_trip() {
    let policy = KeyPolicy::default();
    let mut serials = MemorySerialRegistry::new();
    let ca = create_ca(
        &ca_request(&mut serials, SignatureAlgorithm::RsaSha512, 2048),
        &policy,
        &mut serials,
    )
    .expect("ca");
    let server = create_server_cert(
        &ca,
        &server_request(&mut serials, SignatureAlgorithm::RsaSha256, 2048),
        &policy,
        &mut serials,
    )
    .expect("server");
    let s = inspect(server.cert_der()).expect("inspect");
    assert_eq!(s.signature, Some(SignatureAlgorithm::RsaSha512));
    verify_issued_by(server.cert_der(), ca.cert_der()).expect("chain");
    let back = from_pkcs12(&to_pkcs12(&server, &ca, PASS).expect("p12"), PASS).expect("back");
    assert_eq!(back.key_der.as_slice(), server.key_der());
}

#[test]
fn a_ca_reloads_from_pem_and_keeps_signing() {
    let policy = KeyPolicy::default();
    let mut serials = MemorySerialRegistry::new();
    let ca = create_ca(
        &ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0),
        &policy,
        &mut serials,
    )
    .expect("ca");
    let loaded =
        relay_cert::Ca::from_pem("reloaded", ca.cert_pem(), ca.key_pem(), &policy).expect("reload");
    assert_eq!(loaded.cert_der(), ca.cert_der());
    assert_eq!(loaded.signature(), SignatureAlgorithm::EcdsaP256Sha256);
    let server = create_server_cert(
        &loaded,
        &server_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0),
        &policy,
        &mut serials,
    )
    .expect("server");
    verify_issued_by(server.cert_der(), ca.cert_der()).expect("signed by the same ca");

    // Another CA's key does not belong to this certificate.
    let other = create_ca(
        &ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0),
        &policy,
        &mut serials,
    )
    .expect("other ca");
    assert!(matches!(
        relay_cert::Ca::from_pem("x", ca.cert_pem(), other.key_pem(), &policy),
        Err(CertError::KeyMismatch)
    ));
    // A P-256 CA counts as 3072 bits: a 4096-bit minimum refuses it.
    assert!(matches!(
        relay_cert::Ca::from_pem(
            "x",
            ca.cert_pem(),
            ca.key_pem(),
            &KeyPolicy::new(4096).expect("p")
        ),
        Err(CertError::KeyTooShort {
            bits: 3072,
            min_bits: 4096
        })
    ));
    // A server certificate is not a CA.
    assert!(matches!(
        relay_cert::Ca::from_pem("x", server.cert_pem(), server.key_pem(), &policy),
        Err(CertError::NotCa)
    ));
    assert!(matches!(
        relay_cert::Ca::from_pem("x", ca.key_pem(), ca.key_pem(), &policy),
        Err(CertError::Pem("CERTIFICATE"))
    ));
}

#[test]
fn serial_numbers_are_never_reused() {
    let policy = KeyPolicy::default();
    let mut serials = MemorySerialRegistry::new();
    let req = ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    let ca = create_ca(&req, &policy, &mut serials).expect("ca");
    assert!(matches!(
        create_ca(&req, &policy, &mut serials),
        Err(CertError::SerialAlreadyUsed(s)) if s == req.serial.to_hex()
    ));
    // Nor for a server certificate: serials are unique across every certificate.
    let mut sreq = server_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    sreq.serial = req.serial.clone();
    assert!(matches!(
        create_server_cert(&ca, &sreq, &policy, &mut serials),
        Err(CertError::SerialAlreadyUsed(_))
    ));
    // A refused request burns no serial.
    let mut bad = ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    bad.name = "has blank".into();
    assert!(create_ca(&bad, &policy, &mut serials).is_err());
    assert!(!serials.is_used(&bad.serial).expect("registry"));
    // Serials from the registry are fresh.
    let s = serials.next().expect("next");
    assert!(serials.reserve(&s).is_err());
    assert!(Serial::from_u64(0).is_err());
}

#[test]
fn requests_breaking_the_rules_are_refused() {
    let policy = KeyPolicy::new(3072).expect("policy");
    let mut serials = MemorySerialRegistry::new();

    let mut req = ca_request(&mut serials, SignatureAlgorithm::RsaSha256, 2048);
    assert!(matches!(
        create_ca(&req, &policy, &mut serials),
        Err(CertError::KeyTooShort {
            bits: 2048,
            min_bits: 3072
        })
    ));
    req.rsa_bits = 1024;
    assert!(matches!(
        create_ca(&req, &KeyPolicy::default(), &mut serials),
        Err(CertError::KeyTooShort {
            bits: 1024,
            min_bits: 2048
        })
    ));
    req.rsa_bits = 2047;
    assert!(create_ca(&req, &KeyPolicy::default(), &mut serials).is_err());

    let mut req = ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    req.name = "home relay".into();
    assert!(matches!(
        create_ca(&req, &policy, &mut serials),
        Err(CertError::InvalidName(_))
    ));

    let mut req = ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    std::mem::swap(&mut req.validity.not_before, &mut req.validity.not_after);
    assert!(matches!(
        create_ca(&req, &policy, &mut serials),
        Err(CertError::ValidityOrder { .. })
    ));

    let mut req = ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    req.subject.country = "Germany".into();
    assert!(matches!(
        create_ca(&req, &policy, &mut serials),
        Err(CertError::InvalidSubject {
            field: "country",
            ..
        })
    ));

    let mut req = ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    req.san.push(San::Dns("not a host".into()));
    assert!(matches!(
        create_ca(&req, &policy, &mut serials),
        Err(CertError::InvalidDnsName(_))
    ));

    // Server certificates: SAN required, validity inside the CA's, key policy applies.
    let ca = create_ca(
        &ca_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0),
        &policy,
        &mut serials,
    )
    .expect("ca");
    let mut sreq = server_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    sreq.san.clear();
    assert!(matches!(
        create_server_cert(&ca, &sreq, &policy, &mut serials),
        Err(CertError::MissingSan)
    ));
    let mut sreq = server_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    sreq.validity = validity(0, 20_000);
    assert!(matches!(
        create_server_cert(&ca, &sreq, &policy, &mut serials),
        Err(CertError::ValidityOutsideCa { .. })
    ));
    let sreq = server_request(&mut serials, SignatureAlgorithm::RsaSha256, 2048);
    assert!(matches!(
        create_server_cert(&ca, &sreq, &policy, &mut serials),
        Err(CertError::KeyTooShort { .. })
    ));
}

#[test]
fn key_length_of_an_existing_certificate() {
    let mut serials = MemorySerialRegistry::new();
    let ca = create_ca(
        &ca_request(&mut serials, SignatureAlgorithm::RsaSha256, 2048),
        &KeyPolicy::default(),
        &mut serials,
    )
    .expect("ca");
    let info = inspect(ca.cert_der()).expect("inspect");
    check_key_length(&info, 2048).expect("2048 meets 2048");
    assert!(matches!(
        check_key_length(&info, 3072),
        Err(CertError::KeyTooShort {
            bits: 2048,
            min_bits: 3072
        })
    ));
    let mut other = info.clone();
    other.key_algorithm = KeyAlgorithm::Other("1.3.101.112".into());
    assert!(matches!(
        check_key_length(&other, 2048),
        Err(CertError::UnsupportedKey(_))
    ));
}

#[test]
fn garbage_is_not_a_certificate() {
    assert!(matches!(inspect(b"not der"), Err(CertError::Parse(_))));
    assert!(from_pkcs12(b"not a pfx", PASS).is_err());
}
