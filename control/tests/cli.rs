//! The `homerelay` binary: the client commands against a test server, and `homerelay run`
//! itself (configuration errors, start, SIGTERM, clean shutdown). Relay ports 42300–42399.
//! `homerelay doctor`'s fast-path checks run in the relay namespace of a testbed and need root
//! (BPF, XDP, network namespaces); without it that test fails (it is not skipped).
mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use common::{Setup, TestServer, WAIT, udp_port_free, within};

fn homerelay(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_homerelay"));
    c.args(args)
        .env_remove("HOMERELAY_SERVER")
        .env_remove("HOMERELAY_TOKEN")
        .env_remove("HOMERELAY_TOKEN_FILE")
        .env_remove("HOMERELAY_CONFIG");
    c
}

async fn output(mut c: Command) -> Output {
    within(tokio::task::spawn_blocking(move || {
        c.output().expect("run homerelay")
    }))
    .await
    .expect("join")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "homerelay failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout.clone()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_commands_against_a_server() {
    let server = TestServer::start(Setup::new(42300, 42319)).await;
    let url = server.url.clone();
    let cli = |args: &[&str]| {
        let mut c = homerelay(args);
        c.args(["--server", url.as_str()]);
        c
    };
    // The connection flags also go between the command and its subcommand.
    let early = homerelay(&[
        "channels",
        "--server",
        &url,
        "allocate",
        "--call-id",
        "cli-1",
        "--kind",
        "sip_device",
        "--b-rtp",
        "127.0.0.1:43100",
        "--b-strict",
    ]);
    let out = stdout(&output(early).await);
    assert!(out.starts_with("allocated\n"), "{out}");
    assert!(out.contains("127.0.0.1:43100 latched"), "{out}");

    let out = stdout(
        &output(cli(&[
            "channels",
            "allocate",
            "--call-id",
            "cli-2",
            "--kind",
            "mobile_client",
            "--no-internet",
            "--json",
        ]))
        .await,
    );
    let allocated: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(allocated["created"], true);
    assert_eq!(allocated["internet"], false);
    let port = allocated["port"].as_u64().expect("port");

    let out = stdout(&output(cli(&["channels", "list", "--json"])).await);
    let list: serde_json::Value = serde_json::from_str(&out).expect("list --json is JSON");
    let channels = list.as_array().expect("an array");
    assert_eq!(channels.len(), 2);
    let calls: Vec<&str> = channels
        .iter()
        .filter_map(|c| c["call_id"].as_str())
        .collect();
    assert!(
        calls.contains(&"cli-1") && calls.contains(&"cli-2"),
        "{calls:?}"
    );
    assert!(channels.iter().all(|c| c["state"] == "waiting"));

    let out = stdout(&output(cli(&["channels", "list", "--kind", "mobile_client"])).await);
    assert!(out.starts_with("PORT"), "{out}");
    assert!(out.contains("cli-2") && !out.contains("cli-1"), "{out}");
    assert!(out.ends_with("1 channel(s)\n"), "{out}");

    let out = stdout(&output(cli(&["channels", "show", &port.to_string()])).await);
    assert!(out.contains("\"cli-2\""), "{out}");

    let out = stdout(&output(cli(&["pool"])).await);
    assert!(
        out.starts_with("layout       custom (UDP 42300-42319"),
        "{out}"
    );
    assert!(out.contains("in use       2 of 10"), "{out}");
    let out = stdout(&output(cli(&["pool", "--json"])).await);
    let pool: serde_json::Value = serde_json::from_str(&out).expect("pool --json is JSON");
    assert_eq!(pool["in_use_by_kind"]["mobile_client"], 1);
    assert_eq!(pool["data_path"], "userspace");

    let out = stdout(
        &output(cli(&[
            "channels",
            "release",
            "--call-id",
            "cli-1",
            "--leg-tag",
            "",
        ]))
        .await,
    );
    assert!(out.contains("released"), "{out}");

    let o = output(cli(&["channels", "show", "42318"])).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no channel in use on port 42318") && err.contains("NotFound"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let o = output(homerelay(&["pool", "--server", "http://127.0.0.1:1"])).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "cannot reach homerelay at http://127.0.0.1:1: connection refused — is `homerelay run` running?"
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_bad_configurations_naming_the_key() {
    let o = output(homerelay(&[
        "run",
        "--listen",
        "0.0.0.0:4080",
        "--check-config",
    ]))
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("api.listen: 0.0.0.0:4080 is not a loopback address"),
        "{err}"
    );

    let o = output(homerelay(&[
        "run",
        "--ports",
        "42301-42399",
        "--check-config",
    ]))
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("relay.ports: first port 42301 is odd"),
        "{err}"
    );

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/homerelay.toml");
    let out = stdout(&output(homerelay(&["run", "--config", example, "--check-config"])).await);
    assert!(out.starts_with("configuration is valid"), "{out}");
}

/// A `homerelay run` child serving its API, and the lines it logged so far.
struct Daemon {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    url: String,
}

impl Daemon {
    /// Starts `homerelay run` with `args` and waits until it reports its API address.
    fn start(args: &[&str]) -> Daemon {
        let mut d = LoggedDaemon::start(args);
        let line = d.wait_for("gRPC API on ");
        let addr = line
            .split("gRPC API on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("address")
            .to_owned();
        Daemon {
            child: d.child,
            lines: d.lines,
            log: d.log,
            url: format!("http://{addr}"),
        }
    }

    /// SIGTERM, then waits for the exit; the whole log.
    async fn stop(mut self) -> String {
        // SAFETY: signals the child this test started, by its pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let mut child = self.child;
        let status = within(tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("join")
            .expect("wait");
        // The reader thread may still be draining: collect what it has until the pipe closes.
        while let Ok(line) = self.lines.recv_timeout(WAIT) {
            self.log.push(line);
        }
        let log = self.log.join("\n");
        assert!(status.success(), "exit {status}:\n{log}");
        assert!(log.contains("SIGTERM received, shutting down"), "{log}");
        assert!(log.contains("stopped"), "{log}");
        log
    }

    async fn cli(&self, args: &[&str]) -> serde_json::Value {
        let mut c = homerelay(args);
        c.args(["--server", self.url.as_str(), "--json"]);
        serde_json::from_str(&stdout(&output(c).await)).expect("JSON")
    }
}

/// The daemon for real: starts with flags only and serves the CLI. On SIGTERM it keeps its
/// channels in the state database; the next start takes them over (same port, same id) under
/// a new instance id, and hands out ids never used before. A second daemon on the same state
/// database refuses to start. Without a database, SIGTERM releases the channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_channels_across_a_restart_and_refuses_a_second_daemon() {
    let state = tempfile::tempdir().expect("state directory");
    let db = state.path().join("homerelay.db");
    let db = db.to_str().expect("utf-8 path");
    let args = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--ports",
        "42340-42359",
        "--workers",
        "1",
        "--store",
        db,
    ];
    let first = Daemon::start(&args);
    assert!(
        first
            .log
            .iter()
            .any(|l| l.contains("user space only (no XDP interfaces configured)")),
        "the log says which data path and why:\n{}",
        first.log.join("\n")
    );
    let a = first
        .cli(&[
            "channels",
            "allocate",
            "--call-id",
            "d",
            "--kind",
            "itsp_call",
        ])
        .await;
    let port = a["port"].as_u64().expect("port") as u16;
    let id = a["id"].as_u64().expect("id");
    assert!(!udp_port_free(port));
    let pool = first.cli(&["pool"]).await;
    let instance = pool["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();

    // A second daemon on the same state refuses to start, naming the file.
    let o = output(homerelay(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--no-metrics",
        "--ports",
        "42360-42379",
        "--store",
        db,
    ]))
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use") && err.contains(db), "{err}");

    let log = first.stop().await;
    assert!(log.contains("channels kept for the next start"), "{log}");

    let second = Daemon::start(&args);
    let pool = second.cli(&["pool"]).await;
    assert_ne!(pool["instance_id"].as_str(), Some(instance.as_str()));
    assert_eq!(pool["adopted_at_start"], 1, "{pool}");
    assert_eq!(pool["in_use"], 1, "{pool}");
    let kept = second.cli(&["channels", "show", &port.to_string()]).await;
    assert_eq!(kept["id"].as_u64(), Some(id), "{kept}");
    assert_eq!(kept["call_id"], "d", "{kept}");
    assert!(
        !udp_port_free(port),
        "the kept channel's ports are bound again"
    );
    let b = second
        .cli(&[
            "channels",
            "allocate",
            "--call-id",
            "e",
            "--kind",
            "itsp_call",
        ])
        .await;
    assert!(
        b["id"].as_u64().expect("id") > id,
        "ids are never reused across restarts: {b}"
    );
    second.stop().await;

    // Without a state database, SIGTERM releases every channel.
    let mut bare = args.to_vec();
    bare.truncate(bare.len() - 2);
    let cfg = state.path().join("no-store.toml");
    std::fs::write(&cfg, "[store]\nenabled = false\n").expect("write config");
    let cfg = cfg.to_str().expect("utf-8").to_owned();
    bare.extend(["--config", cfg.as_str()]);
    let third = Daemon::start(&bare);
    let c = third
        .cli(&[
            "channels",
            "allocate",
            "--call-id",
            "f",
            "--kind",
            "itsp_call",
        ])
        .await;
    let port = c["port"].as_u64().expect("port") as u16;
    let log = third.stop().await;
    assert!(log.contains("released 1 channel(s)"), "{log}");
    assert!(
        udp_port_free(port),
        "the channel's ports are closed after shutdown"
    );
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("homerelay-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

const TOKEN_A: &str = "cli-token-a-0123456789abcdef";
const TOKEN_B: &str = "cli-token-b-0123456789abcdef";

/// The client takes the token from --token-file or HOMERELAY_TOKEN, never from a flag that `ps`
/// shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_a_file_or_the_environment_never_from_a_flag() {
    let mut setup = Setup::new(42360, 42379);
    setup.security.require_auth = true;
    setup.security.token = Some(TOKEN_A.into());
    let server = TestServer::start(setup).await;
    let url = server.url.clone();
    let dir = temp_dir("token");
    let file = dir.join("token");
    std::fs::write(&file, format!("{TOKEN_A}\n")).expect("write");
    let file_arg = file.to_str().expect("utf-8 path");

    let out = stdout(
        &output(homerelay(&[
            "pool",
            "--server",
            &url,
            "--token-file",
            file_arg,
        ]))
        .await,
    );
    assert!(out.starts_with("layout"), "{out}");
    let mut c = homerelay(&["pool", "--server", &url]);
    c.env("HOMERELAY_TOKEN", TOKEN_A);
    let out = stdout(&output(c).await);
    assert!(out.starts_with("layout"), "{out}");
    let mut c = homerelay(&["pool", "--server", &url]);
    c.env("HOMERELAY_TOKEN_FILE", &file);
    stdout(&output(c).await);

    let o = output(homerelay(&["pool", "--server", &url])).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing bearer token"), "{err}");

    let o = output(homerelay(&["pool", "--server", &url, "--token", TOKEN_A])).await;
    assert!(!o.status.success(), "--token must not work");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--token is not accepted: other users can read command lines (ps)")
            && err.contains("--token-file FILE, or set HOMERELAY_TOKEN"),
        "{err}"
    );

    let help = stdout(&output(homerelay(&["pool", "--help"])).await);
    assert!(help.contains("--token-file <TOKEN_FILE>"), "{help}");
    assert!(help.contains("HOMERELAY_TOKEN"), "{help}");
    assert!(!help.contains("--token <"), "{help}");
    let _ = std::fs::remove_dir_all(&dir);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_token_without_tls_on_a_public_address() {
    let dir = temp_dir("public-token");
    let file = dir.join("token");
    std::fs::write(&file, TOKEN_A).expect("write");
    // No --check-config: the real start is refused, before anything is bound.
    let o = output(homerelay(&[
        "run",
        "--listen",
        "0.0.0.0:0",
        "--token-file",
        file.to_str().expect("utf-8 path"),
        "--no-metrics",
    ]))
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "api.tls: a bearer token on 0.0.0.0:0, which is not a loopback address, needs TLS: \
             plain HTTP/2 would carry the token in clear"
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A running daemon: its log lines arrive on a channel.
struct LoggedDaemon {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl LoggedDaemon {
    fn start(args: &[&str]) -> LoggedDaemon {
        LoggedDaemon::spawn(homerelay(args))
    }

    fn spawn(mut command: Command) -> LoggedDaemon {
        let mut child = command
            .env("HOMERELAY_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start homerelay run");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        LoggedDaemon {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The first log line containing `needle` (within [`WAIT`] per line).
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let Ok(line) = self.lines.recv_timeout(WAIT) else {
                let _ = self.child.kill();
                panic!("no log line with {needle:?}:\n{}", self.log.join("\n"));
            };
            self.log.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: signals the child this test started, by its pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0);
    }
}

/// SIGHUP to a real `homerelay run`: the token file is read again; the old token is refused,
/// the new one accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_of_a_running_daemon() {
    let dir = temp_dir("sighup");
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN_A).expect("write");
    let config = dir.join("homerelay.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\nrequire_auth = true\ntoken_file = {:?}\n",
            token_file.to_str().expect("utf-8 path")
        ),
    )
    .expect("write config");
    let mut daemon = LoggedDaemon::start(&[
        "run",
        "--config",
        config.to_str().expect("utf-8 path"),
        "--ports",
        "42380-42389",
        "--workers",
        "1",
        "--no-metrics",
        "--store",
        dir.join("homerelay.db").to_str().expect("utf-8 path"),
    ]);
    let line = daemon.wait_for("gRPC API on ");
    let addr = line
        .split("gRPC API on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address")
        .to_owned();
    let url = format!("http://{addr}");
    let pool = |token: &str| {
        let mut c = homerelay(&["pool", "--server", &url]);
        c.env("HOMERELAY_TOKEN", token);
        output(c)
    };
    stdout(&pool(TOKEN_A).await);

    std::fs::write(&token_file, TOKEN_B).expect("rewrite");
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("reloaded the API credentials");
    let o = pool(TOKEN_A).await;
    assert!(!o.status.success(), "token A must be refused after SIGHUP");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid bearer token"), "{err}");
    stdout(&pool(TOKEN_B).await);

    // A broken file: the daemon says why and keeps B.
    std::fs::write(&token_file, "short").expect("rewrite");
    daemon.signal(libc::SIGHUP);
    let line = daemon.wait_for("kept the API credentials in force");
    assert!(line.contains("api.token_file"), "{line}");
    stdout(&pool(TOKEN_B).await);

    // Open health and channel Watch streams must not hold SIGTERM.
    let channel = within(
        tonic::transport::Endpoint::from_shared(url.clone())
            .expect("url")
            .connect(),
    )
    .await
    .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    within(health.message())
        .await
        .expect("health status")
        .expect("a first status");
    let mut events = proto::v1::channel_service_client::ChannelServiceClient::with_interceptor(
        channel,
        |mut r: tonic::Request<()>| {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {TOKEN_B}").parse().expect("ascii"),
            );
            Ok(r)
        },
    )
    .watch(proto::v1::WatchRequest::default())
    .await
    .expect("watch")
    .into_inner();

    daemon.signal(libc::SIGTERM);
    let mut child = daemon.child;
    let status = within(tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("join")
        .expect("wait");
    assert!(
        status.success(),
        "exit {status}:\n{}",
        daemon.log.join("\n")
    );
    while let Ok(Some(_)) = within(health.message()).await {}
    while let Ok(Some(_)) = within(events.message()).await {}
    let _ = std::fs::remove_dir_all(&dir);
}

/// `homerelay doctor`: a site with a relay address the host lacks fails (exit 1) naming the
/// fix; the device check asks the running daemon; a broken configuration file fails on the
/// key it names; `--json` is one document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_site_and_fails_with_the_fix() {
    let server = TestServer::start(Setup::new(42390, 42399)).await;
    server
        .service
        .devices()
        .create(control::devices::NewDevice {
            number: "4711".into(),
            device_type: Some(relay_core::device::DeviceType::OpenStageHfa),
            authentication: true,
            internet_registration: true,
            password: Some("Tr0mbone-Kiwi-Lagoon".into()),
            ..Default::default()
        })
        .expect("create");
    let dir = temp_dir("doctor");
    let config = dir.join("homerelay.toml");
    std::fs::write(
        &config,
        "[relay]\ninternet_address = \"192.0.2.77\"\n[pool]\nupstream_kbps = 10000\n",
    )
    .expect("config");
    let config_arg = config.to_string_lossy().into_owned();
    let o = output(homerelay(&[
        "doctor",
        "--config",
        &config_arg,
        "--server",
        &server.url,
        "--json",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let checks: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    let check = |name: &str| {
        checks
            .as_array()
            .expect("a list")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {checks}"))
            .clone()
    };
    let address = check("relay.internet_address");
    assert_eq!(address["status"], "fail", "{address}");
    assert!(
        address["fix"]
            .as_str()
            .is_some_and(|f| f.contains("ip addr add 192.0.2.77")),
        "{address}"
    );
    assert_eq!(check("pool.internet_calls")["status"], "pass");
    let devices = check("devices.passwords");
    assert_eq!(devices["status"], "pass", "{devices}");
    assert!(
        devices["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("1 devices"))
    );

    // A port of the range held by another program while no relay answers: fails, naming the
    // port and how to find the program.
    let squatter = std::net::UdpSocket::bind("127.0.0.1:42399").expect("hold a relay port");
    std::fs::write(&config, "[relay]\nports = \"42390-42399\"\n").expect("config");
    let o = output(homerelay(&[
        "doctor",
        "--config",
        &config_arg,
        "--server",
        "http://127.0.0.1:9",
        "--json",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let checks: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    let free = checks
        .as_array()
        .expect("a list")
        .iter()
        .find(|c| c["name"] == "relay.ports.free")
        .unwrap_or_else(|| panic!("no relay.ports.free: {checks}"))
        .clone();
    assert_eq!(free["status"], "fail", "{free}");
    assert!(
        free["detail"].as_str().is_some_and(|d| d.contains("42399")),
        "{free}"
    );
    assert!(
        free["fix"].as_str().is_some_and(|f| f.contains("ss -ulpn")),
        "{free}"
    );
    drop(squatter);

    // Lines for people; a broken file fails on its key.
    std::fs::write(&config, "[pool]\nupstream_kbps = 0\n").expect("config");
    let o = output(homerelay(&[
        "doctor",
        "--config",
        &config_arg,
        "--server",
        &server.url,
    ]))
    .await;
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("FAIL  config")
            && text.contains("pool.upstream_kbps")
            && text.contains("fix:"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    server.stop().await;
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, XDP, network namespaces); run the README's test command as root"
    );
}

/// `command`, run in the network namespace `ns` (and the host's mount namespace, where the
/// bpffs is).
fn in_netns(mut command: Command, ns: &std::fs::File) -> Command {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let fd = ns.as_raw_fd();
    // SAFETY: between fork and exec only setns, which is async-signal-safe, on a descriptor the
    // caller keeps open until the command has been spawned.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command
}

/// A daemon killed on drop, should the test fail while it runs.
struct KilledOnDrop(LoggedDaemon);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.child.try_wait() {
            let _ = self.0.child.kill();
            let _ = self.0.child.wait();
        }
    }
}

/// Removes a bpffs pin directory on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `homerelay doctor --json`'s checks by name, and its exit code.
struct DoctorReport {
    code: Option<i32>,
    checks: serde_json::Value,
}

impl DoctorReport {
    fn check(&self, name: &str) -> serde_json::Value {
        self.checks
            .as_array()
            .expect("a list")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {:#}", self.checks))
            .clone()
    }

    fn assert_status(&self, name: &str, status: &str) -> serde_json::Value {
        let c = self.check(name);
        assert_eq!(c["status"], status, "{name}: {c:#}");
        c
    }
}

fn text(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// `homerelay doctor` on the fast path, in the relay namespace of a testbed: the BPF and XDP
/// lines pass on the relay's veths in generic mode, with the program proven through
/// `BPF_PROG_TEST_RUN` (redirecting between the two interfaces) and nothing attached; native
/// mode fails while the veths' peers run no XDP program (frames sent out of them would be
/// dropped) and passes once they do; a missing interface fails with its fix; and with a relay
/// running, doctor reports that relay's program and leaves its attachment as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_fast_path_in_a_namespace() {
    use relay_user::netns::{self, Host, Testbed, TestbedOptions};
    use relay_user::xdp::{XdpMode, attach_pass_program};

    require_root();
    let tb = Testbed::create(TestbedOptions { nat: false }).expect("testbed");
    let relay_ns = std::fs::File::open(format!("/var/run/netns/{}", tb.ns(Host::Relay)))
        .expect("the relay namespace");
    let dir = temp_dir("doctor-xdp");
    let pin = PinDir(format!("/sys/fs/bpf/homerelay-doctor-test-{}", std::process::id()).into());
    let config = |file: &str, mode: &str, interfaces: &[&str]| {
        let path = dir.join(file);
        let list: Vec<String> = interfaces.iter().map(|i| format!("{i:?}")).collect();
        std::fs::write(
            &path,
            format!(
                "[relay]\ninternet_address = \"{}\"\nlan_address = \"{}\"\n\
                 [pool]\nupstream_kbps = 10000\n\
                 [xdp]\ninterfaces = [{}]\nmode = \"{mode}\"\npin_dir = {:?}\n",
                netns::RELAY_HOME_ADDR,
                netns::RELAY_OFFICE_ADDR,
                list.join(", "),
                pin.0.to_str().expect("utf-8 path"),
            ),
        )
        .expect("config");
        path.to_str().expect("utf-8 path").to_owned()
    };
    let doctor = |config: &str| {
        let command = in_netns(
            homerelay(&[
                "doctor",
                "--config",
                config,
                "--server",
                "http://127.0.0.1:1",
                "--json",
            ]),
            &relay_ns,
        );
        async move {
            let o = output(command).await;
            DoctorReport {
                code: o.status.code(),
                checks: serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
                    panic!(
                        "one JSON document ({e}):\n{}\n{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                }),
            }
        }
    };
    let attached = |iface: &'static str| {
        tb.run_in(Host::Relay, move || {
            relay_user::xdp_links::inspect(iface)
                .expect("rtnetlink")
                .expect("the interface exists")
                .xdp
        })
    };
    let both = [netns::RELAY_IF_HOME, netns::RELAY_IF_OFFICE];
    let home = format!("xdp.iface.{}", netns::RELAY_IF_HOME);
    let office = format!("xdp.iface.{}", netns::RELAY_IF_OFFICE);

    // Generic mode: every fast-path line passes, and nothing is attached afterwards.
    let generic = config("generic.toml", "generic", &both);
    let r = doctor(&generic).await;
    for name in [
        "bpf.kernel",
        "bpf.jit",
        "bpf.privileges",
        "bpf.fs",
        "bpf.memlock",
        home.as_str(),
        office.as_str(),
    ] {
        r.assert_status(name, "pass");
    }
    let program = r.assert_status("xdp.program", "pass");
    assert!(
        text(&program["detail"]).contains("r-home → r-office XDP_REDIRECT")
            && text(&program["detail"]).contains("nothing attached"),
        "{program:#}"
    );
    assert!(
        text(&r.check("bpf.memlock")["detail"]).contains("(measured)"),
        "{:#}",
        r.checks
    );
    assert!(text(&r.check(&home)["detail"]).contains("veth, peer home0"));
    assert_eq!(r.code, Some(0), "{:#}", r.checks);
    for iface in both {
        assert!(attached(iface).is_empty(), "doctor attached to {iface}");
    }

    // Native mode (auto picks it on a veth): the peers run no XDP program, so the frames the
    // fast path sends out of the relay's veths would be dropped.
    let auto = config("auto.toml", "auto", &both);
    let r = doctor(&auto).await;
    assert_eq!(r.code, Some(1), "{:#}", r.checks);
    for (name, peer) in [(&home, netns::HOME_IF), (&office, netns::OFFICE_IF)] {
        let c = r.assert_status(name, "fail");
        assert!(
            text(&c["detail"]).contains(&format!("{peer} has no XDP program")),
            "{c:#}"
        );
        assert!(text(&c["fix"]).contains("--xdp-mode generic"), "{c:#}");
    }
    let guards = [
        (Host::Home, netns::HOME_IF),
        (Host::Office, netns::OFFICE_IF),
    ]
    .map(|(host, iface)| {
        tb.run_in(host, move || attach_pass_program(iface, XdpMode::Native))
            .expect("a pass program on the peer")
    });
    let r = doctor(&auto).await;
    for name in [&home, &office] {
        let c = r.assert_status(name, "pass");
        assert!(text(&c["detail"]).contains("native mode"), "{c:#}");
    }
    assert_eq!(r.code, Some(0), "{:#}", r.checks);
    drop(guards);

    // A missing interface fails with its fix; the program is still proven on the other.
    let missing = config(
        "missing.toml",
        "generic",
        &[netns::RELAY_IF_HOME, "hr-gone0"],
    );
    let r = doctor(&missing).await;
    assert_eq!(r.code, Some(1), "{:#}", r.checks);
    let gone = r.assert_status("xdp.iface.hr-gone0", "fail");
    assert!(
        text(&gone["detail"]).contains("no interface \"hr-gone0\"")
            && text(&gone["fix"]).contains("correct xdp.interfaces"),
        "{gone:#}"
    );
    let program = r.assert_status("xdp.program", "pass");
    assert!(
        text(&program["detail"]).contains("r-home → r-home XDP_TX"),
        "{program:#}"
    );
    r.assert_status(&home, "pass");

    // A running relay: doctor reports its program and leaves it attached as it was.
    let mut daemon = KilledOnDrop(LoggedDaemon::spawn(in_netns(
        homerelay(&[
            "run",
            "--config",
            &generic,
            "--store",
            dir.join("homerelay.db").to_str().expect("utf-8 path"),
            "--workers",
            "1",
            "--no-metrics",
        ]),
        &relay_ns,
    )));
    daemon.0.wait_for("XDP fast path + user space");
    let pid = daemon.0.child.id();
    let before = [
        attached(netns::RELAY_IF_HOME),
        attached(netns::RELAY_IF_OFFICE),
    ];
    assert!(
        before.iter().all(|a| a.len() == 1),
        "the relay attached its program: {before:?}"
    );
    let r = doctor(&generic).await;
    let program = r.assert_status("xdp.program", "pass");
    assert!(
        text(&program["detail"]).contains(&format!("the running relay (pid {pid}")),
        "{program:#}"
    );
    for name in [&home, &office] {
        let c = r.assert_status(name, "pass");
        assert!(
            text(&c["detail"]).contains(&format!(
                "attached in generic mode by the running relay (pid {pid})"
            )),
            "{c:#}"
        );
    }
    let memlock = r.assert_status("bpf.memlock", "pass");
    assert!(
        text(&memlock["detail"]).contains(&format!("pid {pid}")),
        "{memlock:#}"
    );
    let after = [
        attached(netns::RELAY_IF_HOME),
        attached(netns::RELAY_IF_OFFICE),
    ];
    assert_eq!(
        before, after,
        "doctor changed the running relay's attachments"
    );
    assert!(
        daemon.0.child.try_wait().expect("wait").is_none(),
        "the relay still runs"
    );
    daemon.0.signal(libc::SIGTERM);
    let status = within(async {
        loop {
            if let Some(status) = daemon.0.child.try_wait().expect("wait") {
                break status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        status.success(),
        "exit {status}:\n{}",
        daemon.0.log.join("\n")
    );
    drop(pin);
    let _ = std::fs::remove_dir_all(&dir);
}
