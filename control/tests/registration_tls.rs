//! Phone registration over TLS (4063) with certificates made by `homerelay cert`, checked with
//! a real third-party client: `openssl s_client` (TLS 1.1 refused, 1.2 and 1.3 accepted, the
//! chain verifies against the CA) and `openssl x509` (the fingerprint `homerelay cert
//! fingerprint` prints); and a phone registering over it with our client library.
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use control::devices::{NewDevice, Registry, RegistryPolicy};
use control::register_client::{Credentials, register};
use control::registrar::{self, Registrar};
use relay_core::device::DeviceType;
use relay_core::device::lockout::LockoutPolicy;
use relay_core::register::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";

fn homerelay(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_homerelay"))
        .args(args)
        .output()
        .expect("run homerelay");
    assert!(
        out.status.success(),
        "homerelay {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl must be installed (scripts/bootstrap.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A CA and a server certificate for 127.0.0.1 made with the CLI, imported as PEM.
fn certificates(dir: &Path) -> (String, String, String) {
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    std::fs::write(dir.join("pass"), "a-p12-passphrase\n").expect("write passphrase");
    homerelay(&[
        "cert",
        "ca",
        "--dir",
        &d("ca"),
        "--name",
        "homerelay-test-root",
        "--org",
        "homerelay",
        "--cn",
        "homerelay test root",
    ]);
    homerelay(&[
        "cert",
        "server",
        "--dir",
        &d("ca"),
        "--ca",
        "homerelay-test-root",
        "--org",
        "homerelay",
        "--cn",
        "relay",
        "--san",
        "127.0.0.1,localhost",
        "--out",
        &d("server.p12"),
        "--passphrase-file",
        &d("pass"),
        "--signature",
        "ecdsa-p256",
    ]);
    let import = homerelay(&[
        "cert",
        "import",
        &d("server.p12"),
        "--passphrase-file",
        &d("pass"),
        "--cert-out",
        &d("server.pem"),
        "--key-out",
        &d("server.key"),
    ]);
    assert!(import.contains("SHA-256 fingerprint"), "{import}");
    (
        d("ca/homerelay-test-root.pem"),
        d("server.pem"),
        d("server.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registration_speaks_only_tls_1_2_and_1_3_and_its_chain_verifies() {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = certificates(dir.path());

    let registry = Arc::new(Registry::in_memory(RegistryPolicy {
        iterations: 4096,
        ..RegistryPolicy::default()
    }));
    registry
        .create(NewDevice {
            number: "4711".into(),
            device_type: Some(DeviceType::OpenStageHfa),
            authentication: true,
            password: Some(STRONG.into()),
            ..NewDevice::default()
        })
        .expect("create");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = registrar::tls_acceptor(Path::new(&cert), Path::new(&key)).expect("TLS");
    let registrar = Arc::new(Registrar::new(
        registry.clone(),
        ServerConfig::default(),
        LockoutPolicy::default(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registrar::serve(
        listener,
        Some(acceptor),
        registrar,
        async move {
            let _ = stopped.await;
        },
    ));

    let target = addr.to_string();
    let s_client = move |version: &'static str| {
        let (ca, target) = (ca.clone(), target.clone());
        tokio::task::spawn_blocking(move || {
            openssl(&[
                "s_client",
                "-connect",
                &target,
                version,
                "-CAfile",
                &ca,
                // Let the client offer old versions: the server must be the one refusing.
                "-cipher",
                "DEFAULT@SECLEVEL=0",
            ])
        })
    };
    // Refused: the handshake ends with the server's alert, no cipher agreed.
    let (_, text) = s_client("-tls1_1").await.expect("join");
    assert!(
        text.contains("Cipher is (NONE)") && text.contains("no peer certificate available"),
        "TLS 1.1 accepted:\n{text}"
    );
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (_, text) = s_client(flag).await.expect("join");
        assert!(
            text.contains(&format!("Protocol  : {name}"))
                || text.contains(&format!("Protocol: {name}"))
                || text.contains(&format!(", {name},")),
            "{flag}:\n{text}"
        );
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{flag}:\n{text}"
        );
    }

    // The fingerprint the CLI prints is openssl's.
    let ours = homerelay(&["cert", "fingerprint", &cert]);
    let (ok, theirs) = openssl(&["x509", "-in", &cert, "-noout", "-fingerprint", "-sha256"]);
    assert!(ok, "{theirs}");
    assert!(
        theirs.trim().ends_with(ours.trim()),
        "ours {ours:?}, openssl {theirs:?}"
    );

    // A phone registers over TLS, verifying the relay against the CA.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_file_iter(
        dir.path().join("ca/homerelay-test-root.pem"),
    )
    .expect("CA")
    {
        roots.add(c.expect("CA cert")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .expect("TLS handshake");
    let credentials = Credentials {
        number: "4711".into(),
        password: STRONG.into(),
        mac: [0, 0x1a, 0xe8, 1, 2, 3],
        device_type: "openstage_hfa".into(),
        firmware: "V3 R0.40.4".into(),
        media: "192.168.178.20:5004".parse().expect("address"),
        keepalive_s: 30,
    };
    let phone = tokio::time::timeout(Duration::from_secs(20), register(tls, &credentials))
        .await
        .expect("in time")
        .expect("registered over TLS");
    assert_eq!(
        registry.registration("4711").expect("live").transport,
        "tls"
    );
    phone.unregister().await.expect("unregistered");
    let _ = stop.send(());
}

#[test]
fn a_server_certificate_asked_to_outlive_its_ca_ends_with_it() {
    let dir = tempfile::tempdir().expect("dir");
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    std::fs::write(dir.path().join("pass"), "a-p12-passphrase\n").expect("write passphrase");
    homerelay(&[
        "cert",
        "ca",
        "--dir",
        &d("ca"),
        "--name",
        "short-root",
        "--org",
        "homerelay",
        "--cn",
        "short root",
        "--days",
        "30",
    ]);
    homerelay(&[
        "cert",
        "server",
        "--dir",
        &d("ca"),
        "--ca",
        "short-root",
        "--org",
        "homerelay",
        "--cn",
        "relay",
        "--san",
        "127.0.0.1",
        "--days",
        "825",
        "--out",
        &d("server.p12"),
        "--passphrase-file",
        &d("pass"),
    ]);
    homerelay(&[
        "cert",
        "import",
        &d("server.p12"),
        "--passphrase-file",
        &d("pass"),
        "--cert-out",
        &d("server.pem"),
        "--key-out",
        &d("server.key"),
    ]);
    let end = |file: &str| {
        let (ok, text) = openssl(&["x509", "-noout", "-enddate", "-in", file]);
        assert!(ok, "{text}");
        text.trim().to_owned()
    };
    assert_eq!(end(&d("server.pem")), end(&d("ca/short-root.pem")));
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        &d("ca/short-root.pem"),
        &d("server.pem"),
    ]);
    assert!(ok, "{text}");
}
