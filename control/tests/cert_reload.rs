//! The registration listeners' certificate store: `homerelay cert import` over the files a
//! running TLS listener serves from puts the new certificate in force for new connections
//! without a restart, and a broken replacement leaves the certificate in force as it was.
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::certstore::CertStore;
use control::devices::{Registry, RegistryPolicy};
use control::registrar::{self, Registrar};
use relay_core::device::lockout::LockoutPolicy;
use relay_core::register::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

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

/// A server certificate named `cn`, signed by the test CA, imported into server.pem/.key.
fn issue_and_import(dir: &Path, cn: &str) -> String {
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    homerelay(&[
        "cert",
        "server",
        "--dir",
        &d("ca"),
        "--ca",
        "reload-root",
        "--org",
        "homerelay",
        "--cn",
        cn,
        "--san",
        "127.0.0.1",
        "--signature",
        "ecdsa-p256",
        "--out",
        &d(&format!("{cn}.p12")),
        "--passphrase-file",
        &d("pass"),
    ]);
    homerelay(&[
        "cert",
        "import",
        &d(&format!("{cn}.p12")),
        "--passphrase-file",
        &d("pass"),
        "--cert-out",
        &d("server.pem"),
        "--key-out",
        &d("server.key"),
    ]);
    homerelay(&["cert", "fingerprint", &d("server.pem")])
        .trim()
        .to_owned()
}

/// The fingerprint (as `homerelay cert fingerprint` prints it) of the certificate `addr`
/// serves, verified against the CA.
async fn served(addr: std::net::SocketAddr, ca: &Path) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_file_iter(ca).expect("CA") {
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
        .expect("TLS handshake verifies against the CA");
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate");
    relay_cert::fingerprint_sha256(leaf.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_certificate_is_served_without_a_restart_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let d = |p: &str| dir.path().join(p);
    std::fs::write(d("pass"), "a-p12-passphrase\n").expect("write passphrase");
    homerelay(&[
        "cert",
        "ca",
        "--dir",
        &d("ca").to_string_lossy(),
        "--name",
        "reload-root",
        "--org",
        "homerelay",
        "--cn",
        "reload root",
    ]);
    let ca = d("ca/reload-root.pem");
    let first = issue_and_import(dir.path(), "relay-one");

    let store = CertStore::open(&d("server.pem"), &d("server.key")).expect("store");
    assert_eq!(store.fingerprint(), first);
    let registry = Arc::new(Registry::in_memory(RegistryPolicy {
        iterations: 4096,
        ..RegistryPolicy::default()
    }));
    let registrar = Arc::new(Registrar::new(
        registry,
        ServerConfig::default(),
        LockoutPolicy::default(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(registrar::serve(
        listener,
        Some(store.acceptor(&[]).expect("acceptor")),
        registrar,
        stopped(),
    ));
    tokio::spawn(store.clone().watch(stopped(), || {}));
    assert_eq!(served(addr, &ca).await, first);

    // A new certificate imported over the files: served by new connections within a few
    // checks of the store, the listener never restarted.
    let second = issue_and_import(dir.path(), "relay-two");
    assert_ne!(first, second);
    let start = Instant::now();
    loop {
        if served(addr, &ca).await == second {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the imported certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.fingerprint(), second);

    // A broken replacement (a key that is not a key): refused, the second one stays.
    std::fs::write(d("server.key"), "not a key\n").expect("break the key");
    let e = store
        .reload(true)
        .expect_err("a broken key is refused")
        .to_string();
    assert!(e.contains("server.key"), "{e}");
    assert_eq!(served(addr, &ca).await, second);
    assert_eq!(store.fingerprint(), second);
    stop.send_replace(true);
}
