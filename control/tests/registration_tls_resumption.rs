//! TLS 4063 session resumption for many phones: a phone that reconnects after hundreds of
//! other phones' handshakes still resumes its TLS session (the acceptor seals session tickets
//! with a key instead of keeping sessions in a bounded cache), and registers over it.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::devices::{NewDevice, Registry, RegistryPolicy};
use control::register_client::{Credentials, KeyCache, register_cached};
use control::registrar::{self, Registrar};
use relay_core::device::DeviceType;
use relay_core::device::lockout::LockoutPolicy;
use relay_core::register::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";

/// A CA and a server certificate for 127.0.0.1 (P-256), as PEM files in `dir`; the CA's DER.
fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    use relay_cert::{
        CaRequest, KeyPolicy, MemorySerialRegistry, San, ServerRequest, SignatureAlgorithm,
        Subject, Validity,
    };
    let now = time::UtcDateTime::now();
    let validity = Validity {
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(1),
    };
    let subject = |cn: &str| Subject {
        country: "DE".into(),
        organisation: "homerelay".into(),
        unit: "Voice".into(),
        common_name: cn.into(),
    };
    let mut serials = MemorySerialRegistry::new();
    let ca = relay_cert::create_ca(
        &CaRequest {
            name: "resumption-root".into(),
            serial: relay_cert::random_serial().expect("serial"),
            signature: SignatureAlgorithm::EcdsaP256Sha256,
            rsa_bits: 2048,
            validity,
            subject: subject("resumption root"),
            san: Vec::new(),
        },
        &KeyPolicy::default(),
        &mut serials,
    )
    .expect("CA");
    let server = relay_cert::create_server_cert(
        &ca,
        &ServerRequest {
            serial: relay_cert::random_serial().expect("serial"),
            signature: SignatureAlgorithm::EcdsaP256Sha256,
            rsa_bits: 2048,
            validity,
            subject: subject("relay"),
            san: vec![San::Ip([127, 0, 0, 1].into())],
        },
        &KeyPolicy::default(),
        &mut serials,
    )
    .expect("server certificate");
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert, relay_cert::pem_chain(&server, &ca)).expect("write");
    std::fs::write(&key, relay_cert::key_pem(&server)).expect("write");
    (cert, key, ca.cert_der().to_vec())
}

/// A phone's TLS configuration: trusts `ca`, keeps its sessions when `resume`.
fn phone_tls(ca: &[u8], resume: bool) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca.to_vec()))
        .expect("CA");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(4)
    } else {
        rustls::client::Resumption::disabled()
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects over TLS, registers and unregisters; whether the TLS handshake resumed.
async fn register_over_tls(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    c: &Credentials,
    keys: &KeyCache,
) -> bool {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let stream = tls
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .expect("TLS handshake");
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // Registering reads the relay's frames, and with them its session tickets.
    let phone = tokio::time::timeout(Duration::from_secs(20), register_cached(stream, c, keys))
        .await
        .expect("in time")
        .expect("registered over TLS");
    phone.unregister().await.expect("unregistered");
    resumed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_resumes_its_tls_session_after_hundreds_of_other_handshakes() {
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key, ca) = certificates(dir.path());
    let registry = Arc::new(Registry::in_memory(RegistryPolicy {
        iterations: 4096,
        ..RegistryPolicy::default()
    }));
    for number in ["4711", "4712"] {
        registry
            .create(NewDevice {
                number: number.into(),
                device_type: Some(DeviceType::OpenStageHfa),
                authentication: true,
                password: Some(STRONG.into()),
                ..NewDevice::default()
            })
            .expect("create");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let registrar = Arc::new(Registrar::new(
        registry,
        ServerConfig::default(),
        LockoutPolicy::default(),
    ));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registrar::serve(
        listener,
        Some(registrar::tls_acceptor(&cert, &key).expect("TLS")),
        registrar,
        async move {
            let _ = stopped.await;
        },
    ));
    let credentials = |number: &str| Credentials {
        number: number.into(),
        password: STRONG.into(),
        mac: [0, 0x1a, 0xe8, 1, 2, 3],
        device_type: "openstage_hfa".into(),
        firmware: "V3 R0.40.4".into(),
        media: "192.168.178.20:5004".parse().expect("address"),
        keepalive_s: 30,
    };

    let (phone, phone_keys) = (phone_tls(&ca, true), KeyCache::default());
    let c = credentials("4711");
    assert!(!register_over_tls(addr, &phone, &c, &phone_keys).await);
    assert!(register_over_tls(addr, &phone, &c, &phone_keys).await);

    // 300 full handshakes of other phones: each is issued session tickets too. A session
    // cache of a few hundred entries would have forgotten the first phone's by now.
    let (others, other_keys) = (phone_tls(&ca, false), KeyCache::default());
    let other = credentials("4712");
    for _ in 0..300 {
        assert!(!register_over_tls(addr, &others, &other, &other_keys).await);
    }
    assert!(
        register_over_tls(addr, &phone, &c, &phone_keys).await,
        "the phone's TLS session was forgotten"
    );
}
