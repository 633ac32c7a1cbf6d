//! The apps' HTTPS JSON API (control/src/https_api.rs, docs/https-api.md) served for real over
//! TLS on loopback, with certificates made by `homerelay cert`, and driven by `curl` (a real
//! HTTP client; scripts/bootstrap.sh installs it). The SCRAM-SHA-256 steps are computed with
//! relay-core's client and handed to curl as JSON.
//!
//! Covered: login, register, status, keepalive, unregister; one answer for a wrong password and
//! an unknown device; lockout with Retry-After, shared with the phones' TCP registration;
//! an external source without the internet flag, and old firmware; idle tokens and
//! registrations without keepalive expire; malformed, oversized and misrouted requests get
//! JSON errors; the OpenAPI document is served and names every route the router serves.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use control::devices::{NewDevice, Registry, RegistryPolicy};
use control::https_api::{self, HttpsApi, HttpsConfig};
use control::metrics::Metrics;
use control::registrar::{self, Registrar};
use relay_core::device::DeviceType;
use relay_core::device::lockout::LockoutPolicy;
use relay_core::device::networks::Networks;
use relay_core::device::scram::{ScramClient, generate_nonce};
use relay_core::register::ServerConfig;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";
const ANDROID_OK: &str = "V2R2.26.19";

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

/// A CA and a server certificate for 127.0.0.1 made with the CLI, imported as PEM:
/// (CA, certificate chain, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
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
    (
        dir.join("ca/homerelay-test-root.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

fn policy(internal: &[&str]) -> RegistryPolicy {
    RegistryPolicy {
        networks: Networks::parse(internal.iter().copied()).expect("networks"),
        iterations: 4096,
        ..RegistryPolicy::default()
    }
}

fn app(number: &str, device_type: DeviceType, internet: bool) -> NewDevice {
    NewDevice {
        number: number.into(),
        device_type: Some(device_type),
        authentication: true,
        internet_registration: internet,
        password: Some(STRONG.into()),
        ..NewDevice::default()
    }
}

/// The API serving on loopback, stopped on drop.
struct Server {
    port: u16,
    ca: PathBuf,
    registry: Arc<Registry>,
    registrar: Arc<Registrar>,
    metrics: Metrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct Setup {
    registry: Registry,
    lockout: LockoutPolicy,
    server: ServerConfig,
    https: HttpsConfig,
}

impl Setup {
    fn new(registry: Registry) -> Setup {
        Setup {
            registry,
            lockout: LockoutPolicy::default(),
            server: ServerConfig::default(),
            https: HttpsConfig::default(),
        }
    }

    async fn start(self) -> Server {
        let dir = tempfile::tempdir().expect("dir");
        let (ca, cert, key) = certificates(dir.path());
        let registry = Arc::new(self.registry);
        let metrics = Metrics::new();
        let registrar = Arc::new(
            Registrar::new(registry.clone(), self.server, self.lockout)
                .with_metrics(metrics.clone()),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = https_api::tls_acceptor(&cert, &key).expect("TLS");
        let api = Arc::new(HttpsApi::new(registrar.clone(), self.https));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(https_api::serve(listener, acceptor, api, async move {
            let _ = stopped.await;
        }));
        Server {
            port,
            ca,
            registry,
            registrar,
            metrics,
            stop: Some(stop),
            served: Some(served),
            _dir: dir,
        }
    }
}

/// One HTTP answer as curl received it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header lines, lowercase names.
    headers: Vec<(String, String)>,
    body: String,
    http_version: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("JSON body expected ({e}): {self:?}"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// Runs curl against the server: `method` on `path`, with a bearer `token` and a raw `body`.
async fn curl(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let url = format!("https://127.0.0.1:{}{path}", server.port);
    let ca = server.ca.clone();
    let (method, token, body) = (
        method.to_owned(),
        token.map(str::to_owned),
        body.map(str::to_owned),
    );
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().expect("dir");
        let headers = dir.path().join("headers");
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
            .arg(&ca)
            .args(["--request", &method, "--dump-header"])
            .arg(&headers)
            .args(["--write-out", "\n%{http_version}", "--output", "-"]);
        if let Some(t) = &token {
            cmd.args(["--header", &format!("Authorization: Bearer {t}")]);
        }
        if body.is_some() {
            cmd.args([
                "--header",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.arg(&url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("curl must be installed (scripts/bootstrap.sh installs it)");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            if let Some(b) = &body {
                stdin.write_all(b.as_bytes()).expect("write body");
            }
        }
        let out = child.wait_with_output().expect("curl");
        assert!(
            out.status.success(),
            "curl {method} {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, http_version) = stdout.rsplit_once('\n').expect("write-out");
        let raw = std::fs::read_to_string(&headers).expect("headers");
        let mut lines = raw.lines();
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Answer {
            status,
            headers,
            body: body.to_owned(),
            http_version: http_version.to_owned(),
        }
    })
    .await
    .expect("curl task")
}

async fn post(server: &Server, path: &str, token: Option<&str>, body: &Value) -> Answer {
    curl(server, "POST", path, token, Some(&body.to_string())).await
}

/// How a login ended: the token (server signature verified), or the refusal.
enum Login {
    Token(String, Value),
    Refused(Answer),
}

async fn login(
    server: &Server,
    number: &str,
    password: &str,
    device_type: &str,
    firmware: &str,
) -> Login {
    let mut scram =
        ScramClient::new(number, password, &generate_nonce(&mut rand::rng())).expect("client");
    let start = post(
        server,
        "/v1/login/start",
        None,
        &json!({"number": number, "client_first": scram.client_first()}),
    )
    .await;
    if start.status != 200 {
        return Login::Refused(start);
    }
    let challenge = start.json();
    let client_final = scram
        .handle_server_first(challenge["server_first"].as_str().expect("server_first"))
        .expect("client-final");
    let finish = post(
        server,
        "/v1/login/finish",
        None,
        &json!({
            "session": challenge["session"],
            "client_final": client_final,
            "device_type": device_type,
            "firmware": firmware,
        }),
    )
    .await;
    if finish.status != 200 {
        return Login::Refused(finish);
    }
    let done = finish.json();
    scram
        .handle_server_final(done["server_final"].as_str().expect("server_final"))
        .expect("the relay proves it knows the password");
    Login::Token(done["token"].as_str().expect("token").to_owned(), done)
}

async fn token(server: &Server, number: &str, device_type: &str, firmware: &str) -> String {
    match login(server, number, STRONG, device_type, firmware).await {
        Login::Token(t, _) => t,
        Login::Refused(a) => panic!("login of {number} refused: {a:?}"),
    }
}

fn refused(l: Login) -> Answer {
    match l {
        Login::Refused(a) => a,
        Login::Token(..) => panic!("the login must be refused"),
    }
}

fn counted(server: &Server, result: &str) -> f64 {
    let text = server.metrics.render();
    let wanted =
        format!("homerelay_registrations_total{{result=\"{result}\",transport=\"https\"}} ");
    let alternative =
        format!("homerelay_registrations_total{{transport=\"https\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&wanted)
                .or_else(|| l.strip_prefix(&alternative))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no https series for {result} in\n{text}"))
}

/// Polls `check` every 100 ms for at most 20 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 20 s: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_logs_in_registers_keeps_alive_and_unregisters_with_curl() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry
        .create(app("4711", DeviceType::MyPortalToGoAndroid, false))
        .expect("create");
    let server = Setup::new(registry).start().await;
    assert_eq!(counted(&server, "ok"), 0.0, "pre-registered series");

    let (token, done) = match login(
        &server,
        "4711",
        STRONG,
        "myportal_to_go_android",
        ANDROID_OK,
    )
    .await
    {
        Login::Token(t, d) => (t, d),
        Login::Refused(a) => panic!("refused: {a:?}"),
    };
    assert_eq!(done["expires_s"], 3600);
    // 32 random bytes, base64url without padding.
    assert_eq!(token.len(), 43, "{token}");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );

    let status = curl(&server, "GET", "/v1/status", Some(&token), None).await;
    assert_eq!(status.status, 200, "{status:?}");
    assert_eq!(status.http_version, "1.1", "ALPN http/1.1");
    assert_eq!(status.json()["registered"], false);
    assert_eq!(status.json()["device_type"], "myportal_to_go_android");

    let reg = post(
        &server,
        "/v1/register",
        Some(&token),
        &json!({"media": "192.168.1.20:5004", "keepalive_s": 30}),
    )
    .await;
    assert_eq!(reg.status, 200, "{reg:?}");
    let r = reg.json();
    assert_eq!(r["origin"], "internal");
    assert_eq!(r["keepalive_s"], 30);
    assert_eq!(r["expires_s"], 90);
    assert_eq!(r["media"], "192.168.1.20:5004");
    let public: std::net::SocketAddr = r["public"].as_str().expect("public").parse().expect("addr");
    assert_eq!(public.ip().to_string(), "127.0.0.1");
    let live = server.registry.registration("4711").expect("registered");
    assert_eq!(live.transport, "https");
    assert_eq!(live.public, public);
    assert_eq!(live.local, Some("192.168.1.20:5004".parse().expect("addr")));
    assert_eq!(live.firmware, ANDROID_OK);
    assert_eq!(Some(live.id), r["id"].as_u64());
    assert_eq!(counted(&server, "ok"), 1.0);

    let status = curl(&server, "GET", "/v1/status", Some(&token), None).await;
    let s = status.json();
    assert_eq!(s["registered"], true, "{s}");
    assert_eq!(s["number"], "4711");
    assert_eq!(s["registration"]["id"], r["id"]);
    assert_eq!(s["registration"]["origin"], "internal");

    let ka = curl(&server, "POST", "/v1/keepalive", Some(&token), None).await;
    assert_eq!(ka.status, 200, "{ka:?}");
    assert_eq!(ka.json()["expires_s"], 90);

    let un = curl(&server, "POST", "/v1/unregister", Some(&token), None).await;
    assert_eq!(un.status, 204, "{un:?}");
    assert!(server.registry.registration("4711").is_none());
    let status = curl(&server, "GET", "/v1/status", Some(&token), None).await;
    assert_eq!(status.json()["registered"], false);
    assert!(status.json()["registration"].is_null());
    let ka = curl(&server, "POST", "/v1/keepalive", Some(&token), None).await;
    assert_eq!((ka.status, ka.error().as_str()), (404, "not_registered"));

    // Without a token, or with a made-up one: 401, the body is not even read.
    for t in [None, Some("not-a-token")] {
        let a = post(
            &server,
            "/v1/register",
            t,
            &json!({"media": "192.168.1.20:5004"}),
        )
        .await;
        assert_eq!(
            (a.status, a.error().as_str()),
            (401, "invalid_token"),
            "{a:?}"
        );
        assert!(
            a.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer"))
        );
    }
    // An unusable media address.
    let bad = post(
        &server,
        "/v1/register",
        Some(&token),
        &json!({"media": "0.0.0.0:5004"}),
    )
    .await;
    assert_eq!(
        (bad.status, bad.error().as_str()),
        (400, "bad_request"),
        "{bad:?}"
    );

    // Registered again, then the server stops: its registrations end with it.
    let reg = post(
        &server,
        "/v1/register",
        Some(&token),
        &json!({"media": "192.168.1.20:5004"}),
    )
    .await;
    assert_eq!(reg.status, 200);
    assert_eq!(reg.json()["keepalive_s"], 60, "the default keepalive");
    let mut server = server;
    if let Some(s) = server.stop.take() {
        let _ = s.send(());
    }
    tokio::time::timeout(Duration::from_secs(20), server.served.take().expect("task"))
        .await
        .expect("the server stops")
        .expect("served");
    assert!(server.registry.registration("4711").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_and_an_unknown_device_get_the_same_answer() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry
        .create(app("4711", DeviceType::MyPortalToGoIos, false))
        .expect("create");
    let server = Setup::new(registry).start().await;
    let wrong = refused(
        login(
            &server,
            "4711",
            "Wrong-Password-123",
            "myportal_to_go_ios",
            "V2R5.11.01",
        )
        .await,
    );
    let unknown = refused(login(&server, "4712", STRONG, "myportal_to_go_ios", "V2R5.11.01").await);
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert_eq!((wrong.status, &wrong.body), (unknown.status, &unknown.body));
    assert_eq!(wrong.error(), "auth_failed");
    assert!(wrong.json().get("retry_after_s").is_none());
    assert_eq!(counted(&server, "auth_failed"), 2.0);

    // The right password under another SCRAM user name than the number: the same refusal.
    let mut scram =
        ScramClient::new("4712", STRONG, &generate_nonce(&mut rand::rng())).expect("client");
    let start = post(
        &server,
        "/v1/login/start",
        None,
        &json!({"number": "4711", "client_first": scram.client_first()}),
    )
    .await
    .json();
    let client_final = scram
        .handle_server_first(start["server_first"].as_str().expect("server_first"))
        .expect("client-final");
    let other_name = post(
        &server,
        "/v1/login/finish",
        None,
        &json!({"session": start["session"], "client_final": client_final,
                "device_type": "myportal_to_go_ios", "firmware": "V2R5.11.01"}),
    )
    .await;
    assert_eq!((other_name.status, &other_name.body), (401, &wrong.body));

    // Both challenges look alike: same iteration count, a salt of the same size.
    let start = |number: &'static str| {
        let scram =
            ScramClient::new(number, STRONG, &generate_nonce(&mut rand::rng())).expect("client");
        let body = json!({"number": number, "client_first": scram.client_first()});
        let server = &server;
        async move { post(server, "/v1/login/start", None, &body).await.json() }
    };
    let shape = |v: Value| {
        let sf = v["server_first"].as_str().expect("server_first").to_owned();
        let fields: Vec<String> = sf
            .split(',')
            .map(|f| match f.split_once('=') {
                Some(("s", salt)) => format!("s:{}", salt.len()),
                Some(("i", i)) => format!("i:{i}"),
                Some((k, _)) => k.to_owned(),
                None => f.to_owned(),
            })
            .collect();
        fields
    };
    assert_eq!(shape(start("4711").await), shape(start("4712").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_lock_out_with_retry_after_on_every_transport() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry
        .create(app("4711", DeviceType::MyPortalAtWork, false))
        .expect("create");
    let mut setup = Setup::new(registry);
    setup.lockout = LockoutPolicy {
        device_threshold: 3,
        ..LockoutPolicy::default()
    };
    let server = setup.start().await;
    for _ in 0..3 {
        let a = refused(
            login(
                &server,
                "4711",
                "Wrong-Password-123",
                "myportal_at_work",
                "V2.0.13",
            )
            .await,
        );
        assert_eq!(a.status, 401, "{a:?}");
    }
    // Locked now, even with the right password.
    let locked = refused(login(&server, "4711", STRONG, "myportal_at_work", "V2.0.13").await);
    assert_eq!(
        (locked.status, locked.error().as_str()),
        (429, "locked_out"),
        "{locked:?}"
    );
    let retry: u64 = locked
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry >= 1, "{locked:?}");
    assert_eq!(locked.json()["retry_after_s"], retry);
    assert_eq!(counted(&server, "locked_out"), 1.0);

    // The lockout is the registrar's: a phone-protocol login of 4711 on TCP is locked too.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registrar::serve(
        listener,
        None,
        server.registrar.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let credentials = control::register_client::Credentials {
        number: "4711".into(),
        password: STRONG.into(),
        mac: [0, 0x1a, 0xe8, 0x12, 0x34, 0x56],
        device_type: "myportal_at_work".into(),
        firmware: "V2.0.13".into(),
        media: "192.168.1.20:5004".parse().expect("address"),
        keepalive_s: 30,
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        control::register_client::register(stream, &credentials),
    )
    .await
    .expect("an answer");
    match answer {
        Err(control::register_client::RegisterError::Refused(r)) => {
            assert_eq!(r.name(), "locked_out")
        }
        other => panic!("expected locked_out, got {other:?}"),
    }
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_sources_need_the_internet_flag_and_recent_firmware() {
    // No internal networks: loopback counts as the internet.
    let registry = Registry::in_memory(policy(&[]));
    registry
        .create(app("100", DeviceType::MyPortalToGoAndroid, false))
        .expect("create");
    registry
        .create(app("200", DeviceType::MyPortalToGoAndroid, true))
        .expect("create");
    let server = Setup::new(registry).start().await;

    let no_flag =
        refused(login(&server, "100", STRONG, "myportal_to_go_android", ANDROID_OK).await);
    assert_eq!(
        (no_flag.status, no_flag.error().as_str()),
        (403, "not_allowed_external"),
        "{no_flag:?}"
    );
    let old = refused(
        login(
            &server,
            "200",
            STRONG,
            "myportal_to_go_android",
            "V2R2.26.18",
        )
        .await,
    );
    assert_eq!(
        (old.status, old.error().as_str()),
        (403, "firmware_too_old"),
        "{old:?}"
    );
    // The claimed type must be the configured one (told only after the proof).
    let other = refused(login(&server, "200", STRONG, "myportal_to_go_ios", ANDROID_OK).await);
    assert_eq!(
        (other.status, other.error().as_str()),
        (400, "bad_request"),
        "{other:?}"
    );
    // A phone type does not log in over HTTPS.
    let phone = refused(login(&server, "200", STRONG, "openstage_hfa", "V3 R0.40.4").await);
    assert_eq!(
        (phone.status, phone.error().as_str()),
        (400, "bad_request"),
        "{phone:?}"
    );

    let token = token(&server, "200", "myportal_to_go_android", ANDROID_OK).await;
    let reg = post(
        &server,
        "/v1/register",
        Some(&token),
        &json!({"media": "[2001:db8::20]:5004"}),
    )
    .await;
    assert_eq!(reg.status, 200, "{reg:?}");
    assert_eq!(reg.json()["origin"], "external");
    let live = server.registry.registration("200").expect("registered");
    assert_eq!(live.origin, relay_core::device::networks::Origin::External);
    assert_eq!(counted(&server, "not_allowed_external"), 1.0);
    assert_eq!(counted(&server, "firmware_too_old"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tokens_and_registrations_without_keepalive_expire() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry
        .create(app("4711", DeviceType::MyPortalToGoAndroid, false))
        .expect("create");
    registry
        .create(app("4712", DeviceType::MyPortalToGoAndroid, false))
        .expect("create");
    let mut setup = Setup::new(registry);
    setup.server = ServerConfig {
        min_keepalive_s: 1,
        default_keepalive_s: 1,
        max_keepalive_s: 600,
        keepalive_misses: 2,
        ..ServerConfig::default()
    };
    setup.https.token_idle = Duration::from_secs(3);
    let server = setup.start().await;

    // A registration that gets no keepalive ends (expires_s = 1 × 2).
    let token = token(&server, "4711", "myportal_to_go_android", ANDROID_OK).await;
    let reg = post(
        &server,
        "/v1/register",
        Some(&token),
        &json!({"media": "192.168.1.20:5004", "keepalive_s": 1}),
    )
    .await;
    assert_eq!(reg.status, 200, "{reg:?}");
    assert_eq!(reg.json()["expires_s"], 2);
    eventually("the registration without keepalive ends", async || {
        server.registry.registration("4711").is_none()
    })
    .await;

    // An idle token expires: 401 invalid_token, log in again.
    let idle = self::token(&server, "4712", "myportal_to_go_android", ANDROID_OK).await;
    // Polled rarely enough not to keep it alive (each use renews it for 3 s); at most 10 times.
    let mut a = None;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let answer = curl(&server, "GET", "/v1/status", Some(&idle), None).await;
        let expired = answer.status == 401;
        a = Some(answer);
        if expired {
            break;
        }
    }
    let a = a.expect("an answer");
    assert_eq!(a.status, 401, "the idle token expired: {a:?}");
    assert_eq!(a.error(), "invalid_token", "{a:?}");
    let again = self::token(&server, "4712", "myportal_to_go_android", ANDROID_OK).await;
    let status = curl(&server, "GET", "/v1/status", Some(&again), None).await;
    assert_eq!(status.status, 200, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_misrouted_requests_get_json_errors() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry
        .create(app("4711", DeviceType::MyPortalToGoAndroid, false))
        .expect("create");
    let server = Setup::new(registry).start().await;
    for body in [
        "{\"number\": ",
        "not json",
        "",
        "[]",
        "{\"number\": 4711, \"client_first\": \"n,,n=4711,r=abc\"}",
        "{\"number\": \"4711\"}",
        "{\"number\": \"47a1\", \"client_first\": \"n,,n=47a1,r=abc\"}",
        "{\"number\": \"4711\", \"client_first\": \"garbage\"}",
        "{\"number\": \"4711\", \"client_first\": \"\\u0000\"}",
    ] {
        let a = curl(&server, "POST", "/v1/login/start", None, Some(body)).await;
        assert_eq!(
            (a.status, a.error().as_str()),
            (400, "bad_request"),
            "{body:?}: {a:?}"
        );
        assert!(
            a.header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
        );
        assert!(!a.json()["message"].as_str().unwrap_or_default().is_empty());
    }
    let finish = post(
        &server,
        "/v1/login/finish",
        None,
        &json!({"session": "nope", "client_final": "c=biws,r=x,p=y", "device_type": "myportal_to_go_android", "firmware": ANDROID_OK}),
    )
    .await;
    assert_eq!(
        (finish.status, finish.error().as_str()),
        (400, "bad_request"),
        "{finish:?}"
    );

    let huge = format!(
        "{{\"number\": \"4711\", \"client_first\": \"{}\"}}",
        "a".repeat(20 * 1024)
    );
    let a = curl(&server, "POST", "/v1/login/start", None, Some(&huge)).await;
    assert_eq!(
        (a.status, a.error().as_str()),
        (413, "bad_request"),
        "{a:?}"
    );

    let a = curl(&server, "GET", "/v1/nothing-here", None, None).await;
    assert_eq!((a.status, a.error().as_str()), (404, "not_found"), "{a:?}");
    let a = curl(&server, "GET", "/v1/login/start", None, None).await;
    assert_eq!(
        (a.status, a.error().as_str()),
        (405, "method_not_allowed"),
        "{a:?}"
    );

    // Still serving.
    token(&server, "4711", "myportal_to_go_android", ANDROID_OK).await;
    assert!(counted(&server, "bad_request") >= 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_and_names_every_route() {
    let server = Setup::new(Registry::in_memory(policy(&["127.0.0.0/8"])))
        .start()
        .await;
    let a = curl(&server, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(a.status, 200, "{a:?}");
    let doc = a.json();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0."))
    );
    let paths = doc["paths"].as_object().expect("paths");
    let routes = https_api::routes();
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, serde_json::Map::len))
        .sum();
    assert_eq!(documented, routes.len(), "one operation per route, no more");
    for (method, path) in routes {
        let op = &paths[path][method];
        assert!(
            op.is_object(),
            "{method} {path} is not in the OpenAPI document"
        );
        assert!(op["responses"].is_object(), "{method} {path}: responses");
        // And the router really serves it (no 404/405 fallback).
        let served = curl(
            &server,
            &method.to_ascii_uppercase(),
            path,
            None,
            Some("{}"),
        )
        .await;
        assert!(
            ![404, 405].contains(&served.status) || served.error() == "not_registered",
            "{method} {path}: {served:?}"
        );
    }
    // Every $ref points at a schema that exists.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let text = a.body.clone();
    for piece in text.split("\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().expect("name");
        assert!(schemas.contains_key(name), "missing schema {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_logins_are_capped_per_source() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry
        .create(app("4711", DeviceType::MyPortalToGoAndroid, false))
        .expect("create");
    let mut setup = Setup::new(registry);
    setup.https.max_logins_per_source = 2;
    let server = setup.start().await;
    let start = json!({"number": "4711", "client_first": "n,,n=4711,r=rOprNGfwEbeRWgbNEkqO"});
    for _ in 0..2 {
        let a = post(&server, "/v1/login/start", None, &start).await;
        assert_eq!(a.status, 200, "{a:?}");
    }
    let busy = post(&server, "/v1/login/start", None, &start).await;
    assert_eq!(
        (busy.status, busy.error().as_str()),
        (503, "server_busy"),
        "{busy:?}"
    );
    assert_eq!(busy.header("retry-after"), Some("30"), "{busy:?}");
    assert_eq!(busy.json()["retry_after_s"], 30);
    assert_eq!(counted(&server, "server_busy"), 1.0);
}
