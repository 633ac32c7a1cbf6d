//! The registration listeners' certificate store: `homerelay cert import` over the files a
//! running TLS listener serves from puts the new certificate in force for new connections
//! without a restart, and a broken replacement leaves the certificate in force as it was. The
//! gRPC API of a running `homerelay run` whose `[api.tls]` names the registration's files
//! follows the store the same way: a certificate of another CA imported over them is what new
//! API connections get, while a connection opened before keeps working.
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
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
    issue_and_import_from(dir, "ca", "reload-root", cn)
}

/// A CA named `name` in `dir`/`ca_dir`; its certificate's path.
fn make_ca(dir: &Path, ca_dir: &str, name: &str) -> PathBuf {
    homerelay(&[
        "cert",
        "ca",
        "--dir",
        &dir.join(ca_dir).to_string_lossy(),
        "--name",
        name,
        "--org",
        "homerelay",
        "--cn",
        name,
    ]);
    dir.join(ca_dir).join(format!("{name}.pem"))
}

/// A server certificate named `cn` (SAN 127.0.0.1), signed by the CA `ca` in `dir`/`ca_dir`,
/// imported into server.pem/.key; its fingerprint.
fn issue_and_import_from(dir: &Path, ca_dir: &str, ca: &str, cn: &str) -> String {
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    homerelay(&[
        "cert",
        "server",
        "--dir",
        &d(ca_dir),
        "--ca",
        ca,
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

/// `homerelay run` with its log lines on a channel; killed on drop.
struct Daemon {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_homerelay"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--ports", "42420-42429", "--workers", "1"])
            .env("HOMERELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start homerelay run");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Daemon {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The first log line containing `needle`; fails with the log if none comes.
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let Ok(line) = self.lines.recv_timeout(Duration::from_secs(30)) else {
                panic!("no log line with {needle:?}:\n{}", self.log.join("\n"));
            };
            self.log.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The log so far.
    fn log_text(&mut self) -> String {
        self.log.extend(self.lines.try_iter());
        self.log.join("\n")
    }

    /// Still the process that was started (no restart happened).
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC client of the API at `url` over TLS, verifying the server against `ca` only.
async fn api_client(url: &str, ca: &Path) -> anyhow::Result<control::client::Client> {
    control::client::connect(&control::client::Connection {
        server: url.to_owned(),
        token_file: None,
        token_flag: None,
        token: None,
        ca_cert: Some(ca.to_owned()),
        cert: None,
        key: None,
        json: false,
    })
    .await
}

/// One PoolStatus call: the API answers on this connection.
async fn answers(client: &mut control::client::Client) -> bool {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.pool_status(proto::v1::PoolStatusRequest {}),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_api_follows_the_certificate_store_when_it_names_the_same_files() {
    let dir = tempfile::tempdir().expect("dir");
    let d = |p: &str| dir.path().join(p);
    std::fs::write(d("pass"), "a-p12-passphrase\n").expect("write passphrase");
    let ca_one = make_ca(dir.path(), "ca-one", "root-one");
    let ca_two = make_ca(dir.path(), "ca-two", "root-two");
    let first = issue_and_import_from(dir.path(), "ca-one", "root-one", "api-one");

    // [api.tls] and the registration's TLS name the same two files.
    let (cert, key) = (d("server.pem"), d("server.key"));
    let config = d("homerelay.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\n\n[api.tls]\ncert = {cert:?}\nkey = {key:?}\n\n\
             [metrics]\nenabled = false\n\n[store]\npath = {store:?}\n\n\
             [registration]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n",
            store = d("homerelay.db"),
        ),
    )
    .expect("write the config");
    let mut daemon = Daemon::start(&config);
    let line = daemon.wait_for("gRPC API on ");
    let addr: std::net::SocketAddr = line
        .split("gRPC API on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no API address in {line:?}"));
    assert!(line.contains("TLS"), "the API serves TLS: {line}");
    let url = format!("https://{addr}");

    // Before: the API presents CA 1's certificate, a gRPC client verifying against CA 1 works.
    let mut before = api_client(&url, &ca_one)
        .await
        .expect("a TLS connection verified against CA 1");
    assert!(answers(&mut before).await, "the API answers over TLS");
    assert_eq!(served(addr, &ca_one).await, first);
    assert!(
        api_client(&url, &ca_two).await.is_err(),
        "CA 2 does not vouch for the first certificate"
    );

    // A certificate of CA 2 imported over the files: new API connections get it within a few
    // checks of the store, the daemon never restarted.
    let second = issue_and_import_from(dir.path(), "ca-two", "root-two", "api-two");
    assert_ne!(first, second);
    let start = Instant::now();
    let mut after = loop {
        if let Ok(client) = api_client(&url, &ca_two).await {
            break client;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the API never presented the imported certificate:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        answers(&mut after).await,
        "the API answers over the new certificate"
    );
    assert_eq!(served(addr, &ca_two).await, second);
    let refused = api_client(&url, &ca_one)
        .await
        .expect_err("a client trusting only CA 1 no longer verifies the API")
        .to_string();
    assert!(refused.contains("certificate"), "{refused}");
    daemon.wait_for("reloaded the API credentials");
    assert!(daemon.running(), "no restart:\n{}", daemon.log_text());

    // The connection opened before the swap is left alone.
    assert!(
        answers(&mut before).await,
        "a connection opened before the new certificate keeps working"
    );
}

/// A replacement seen half done by the watcher (the key already new, the certificate still
/// old) is not an error: the store looks again at its next check and takes the new pair. A
/// pair that stays mismatched is refused at the second look.
#[test]
fn a_half_done_replacement_is_looked_at_again_before_it_counts_as_broken() {
    let dir = tempfile::tempdir().expect("dir");
    let d = |p: &str| dir.path().join(p);
    std::fs::write(d("pass"), "reload-pass\n").expect("passphrase");
    make_ca(dir.path(), "ca", "reload-root");
    let first = issue_and_import(dir.path(), "first.test");
    let store = CertStore::open(&d("server.pem"), &d("server.key")).expect("store");
    let first_key = std::fs::read(d("server.key")).expect("first key");
    let first_cert = std::fs::read(d("server.pem")).expect("first cert");

    // The second pair, imported elsewhere, then copied over the served files key first.
    let second = issue_and_import(dir.path(), "second.test");
    let second_key = std::fs::read(d("server.key")).expect("second key");
    let second_cert = std::fs::read(d("server.pem")).expect("second cert");
    std::fs::write(d("server.pem"), &first_cert).expect("restore");
    std::fs::write(d("server.key"), &first_key).expect("restore");
    assert!(!store.reload(true).expect("first pair"), "still the first");

    std::fs::write(d("server.key"), &second_key).expect("key first");
    assert!(
        !store
            .reload(false)
            .expect("a half-done pair is not an error yet"),
        "nothing new in force"
    );
    assert_eq!(store.fingerprint(), first);
    std::fs::write(d("server.pem"), &second_cert).expect("then the certificate");
    assert!(store.reload(false).expect("the whole pair"), "the new pair");
    assert_eq!(store.fingerprint(), second);

    // A mismatch that stays: refused at the second look, the pair in force kept.
    std::fs::write(d("server.key"), &first_key).expect("mismatch");
    assert!(!store.reload(false).expect("first look"));
    let e = store
        .reload(false)
        .expect_err("a pair that stays mismatched is refused")
        .to_string();
    assert!(e.contains("do not belong together"), "{e}");
    assert_eq!(store.fingerprint(), second);
    // Not tried again until the files change.
    assert!(
        !store
            .reload(false)
            .expect("unchanged files are not read again")
    );
}
