//! Public address discovery end to end: the real `homerelay run` on a host behind a NAT router
//! (`relay_user::natlab`: Inside 203.0.113.10 — Router, translating to 198.51.100.1 — Outside),
//! the ITSP's STUN server a real coturn `turnserver --stun-only` on Outside's 198.51.100.10,
//! named `stun.itsp.test` (a hosts file the namespace's `ip netns exec` mounts, so the name is
//! resolved at every refresh like a dynamic-DNS name), and the configured fallback homerelay's
//! own STUN server (`[stun]`'s code) on Outside's second address 198.51.100.11.
//!
//! What it shows, through the CLI (`homerelay public-address`, `channels`), the event stream
//! (`public-address --watch`) and `/metrics`: the address comes from the ITSP's server; a
//! channel hands out public IP + its port on leg A; when the NAT's public address changes, the
//! status, an existing and a new channel, an event and the change counter all follow within a
//! few refreshes; with the ITSP's server stopped the configured one answers (the status says
//! so); with both stopped the last address is kept, marked stale, with the errors shown.
//!
//! A second NAT rewrites source ports (fully random): the status notes it. Those two need root
//! (network namespaces, nftables) and coturn's `turnserver` (scripts/bootstrap.sh) and fail
//! loudly without them; TEST-NET addresses only, everything removed on drop. A third, on
//! loopback without root, covers the gRPC status and channels with a static public address and
//! with none configured (the internet address itself).
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use relay_user::natlab::{
    INSIDE_ADDR, NatKind, NatLab, Node, PUBLIC_ADDR, PUBLIC_ADDR_2, SERVER_ADDR, SERVER_ADDR_2,
};
use serde_json::Value;

/// Upper bound of every wait: many refreshes (1 s each), reached only when something is broken.
const WAIT: Duration = Duration::from_secs(30);
/// The ITSP's STUN server's name, in the relay namespace's hosts file.
const ITSP_NAME: &str = "stun.itsp.test";

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, nftables); run the README's test command as root"
    );
}

/// A child process killed on drop (the daemon, the STUN server, the watcher).
struct Proc(Child);

impl Proc {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts; removed on drop.
struct HostsFile(PathBuf);

impl HostsFile {
    fn create(ns: &str, text: &str) -> HostsFile {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        std::fs::write(dir.join("hosts"), text).expect("write the hosts file");
        HostsFile(dir)
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `homerelay ARGS` in the relay's namespace: stdout, or stderr as the error.
fn homerelay(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_homerelay"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run homerelay");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Polls `f` every 200 ms until it gives a value; panics with `what` and the last state after
/// [`WAIT`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > WAIT => panic!("{what}: not within {WAIT:?}; {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn status(ns: &str) -> Result<Value, String> {
    homerelay(ns, &["public-address", "--json"]).map(|t| json(&t))
}

/// `/metrics` of the daemon in `lab`'s Inside namespace.
fn scrape(lab: &NatLab) -> String {
    lab.run_in(Node::Inside, || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("connect /metrics");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        text
    })
    .expect("enter the namespace")
}

/// The value of the series `series` (name and labels exactly as exported).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn allocate(ns: &str, call_id: &str) -> Value {
    json(
        &homerelay(
            ns,
            &[
                "channels",
                "allocate",
                "--call-id",
                call_id,
                "--kind",
                "itsp_call",
                "--json",
            ],
        )
        .unwrap_or_else(|e| panic!("allocate {call_id}: {e}")),
    )
}

fn public_of(channel: &Value) -> String {
    channel["leg_a"]["public_address"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn port_of(channel: &Value) -> u16 {
    u16::try_from(channel["port"].as_u64().expect("port")).expect("port")
}

/// coturn as a STUN-only server on `addr` in Outside.
fn turnserver(lab: &NatLab, addr: Ipv4Addr, dir: &Path) -> Proc {
    let log = std::fs::File::create(dir.join("turnserver.log")).expect("log");
    let child = Command::new("ip")
        .args(["netns", "exec", lab.ns(Node::Outside), "turnserver"])
        .args(["-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls"])
        .args(["-L", &addr.to_string(), "-p", "3478"])
        .arg("--userdb")
        .arg(dir.join("turndb"))
        .arg("--pidfile")
        .arg(dir.join("turnserver.pid"))
        .args(["--log-file", "stdout", "--simple-log"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("turnserver (Debian package coturn; scripts/bootstrap.sh)");
    Proc(child)
}

/// homerelay's own STUN server (the `[stun]` code) on `addr` in Outside, until the sender is
/// dropped or used.
fn our_stun_server(
    lab: &NatLab,
    addr: SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let thread = lab
        .spawn_in(Node::Outside, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let server =
                    control::stun_server::StunServer::bind(&control::config::StunSection {
                        listen: Some(addr),
                        ..control::config::StunSection::default()
                    })
                    .await;
                match server {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok(()));
                        server
                            .serve(async move {
                                let _ = stopped.await;
                            })
                            .await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                    }
                }
            });
        })
        .expect("enter Outside");
    ready_rx
        .recv_timeout(WAIT)
        .expect("the STUN server reports")
        .unwrap_or_else(|e| panic!("our STUN server on {addr}: {e}"));
    (stop, thread)
}

/// The event stream (`homerelay public-address --watch --json`), one JSON object per line.
fn watch(ns: &str) -> (Proc, mpsc::Receiver<Value>) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_homerelay"))
        .args(["public-address", "--watch", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("homerelay public-address --watch");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(json(&line)).is_err() {
                return;
            }
        }
    });
    (Proc(child), rx)
}

/// The next event of `type`, skipping others; panics after [`WAIT`].
fn next_event(events: &mpsc::Receiver<Value>, ty: &str) -> Value {
    let start = Instant::now();
    let mut seen = Vec::new();
    while let Some(left) = WAIT.checked_sub(start.elapsed()) {
        match events.recv_timeout(left) {
            Ok(e) if e["type"] == ty => return e,
            Ok(e) => seen.push(e),
            Err(_) => break,
        }
    }
    panic!("no {ty} event within {WAIT:?}; saw {seen:?}");
}

fn write_config(dir: &Path, public_address: &str) -> PathBuf {
    let path = dir.join("homerelay.toml");
    let config = format!(
        r#"
[relay]
layout = "custom"
ports = "30528-30547"
capacity = 10
workers = 1
internet_address = "{INSIDE_ADDR}"

[public_address]
{public_address}

[api]
listen = "127.0.0.1:4080"

[metrics]
listen = "127.0.0.1:9464"

[store]
path = "{store}"
"#,
        store = dir.join("homerelay.db").display(),
    );
    std::fs::write(&path, config).expect("write the config");
    path
}

#[test]
fn the_relay_behind_a_nat_learns_and_follows_its_public_address() {
    require_root();
    let lab = NatLab::create(NatKind::EndpointIndependent).expect("the NAT lab");
    let inside = lab.ns(Node::Inside).to_owned();
    let _hosts = HostsFile::create(
        &inside,
        &format!("127.0.0.1 localhost\n{SERVER_ADDR} {ITSP_NAME}\n"),
    );
    let dir = tempfile::tempdir().expect("dir");
    let mut itsp = turnserver(&lab, SERVER_ADDR, dir.path());
    let (stop_ours, ours) = our_stun_server(&lab, (SERVER_ADDR_2, 3478).into());

    let config = write_config(
        dir.path(),
        &format!(
            "itsp_stun_server = \"{ITSP_NAME}:3478\"\nstun_server = \"{SERVER_ADDR_2}\"\n\
             refresh = \"1s\""
        ),
    );
    let log_path = dir.path().join("homerelay.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemon = Proc(
        Command::new("ip")
            .args(["netns", "exec", &inside])
            .arg(env!("CARGO_BIN_EXE_homerelay"))
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start homerelay run"),
    );
    let show_log = || {
        format!(
            "\n--- homerelay log:\n{}\n--- turnserver log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("turnserver.log")).unwrap_or_default()
        )
    };

    // The ITSP's server gives the NAT's public address; the discovery socket is the relay's
    // Internet address on the inside.
    let s = wait_for("the public address from the ITSP's STUN server", || {
        if let Ok(Some(exit)) = daemon.0.try_wait() {
            panic!("homerelay run exited ({exit}){}", show_log());
        }
        let s = status(&inside)?;
        match s["address"].as_str() {
            Some(a) if a == PUBLIC_ADDR.to_string() => Ok(s),
            _ => Err(format!("{s}{}", show_log())),
        }
    });
    assert_eq!(s["source"], "itsp", "{s}");
    assert_eq!(s["discovery"], true, "{s}");
    assert_eq!(s["local_address"], INSIDE_ADDR.to_string(), "{s}");
    assert_eq!(s["server"], format!("{ITSP_NAME}:3478"), "{s}");
    assert_eq!(s["server_address"], format!("{SERVER_ADDR}:3478"), "{s}");
    assert_eq!(s["stale"], false, "{s}");
    assert_eq!(s["changes"], 0, "{s}");
    let local: SocketAddr = s["discovery_local_address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{s}"));
    let mapped: SocketAddr = s["mapped_address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{s}"));
    assert_eq!(local.ip(), INSIDE_ADDR, "{s}");
    assert_eq!(mapped.ip(), PUBLIC_ADDR, "{s}");
    assert_eq!(s["port_preserved"], mapped.port() == local.port(), "{s}");
    let text = homerelay(&inside, &["public-address"]).expect("the status as text");
    assert!(
        text.contains(&format!(
            "public address  {PUBLIC_ADDR} (from the ITSP's STUN server)"
        )),
        "{text}"
    );

    // A channel hands out the public address on its own port for leg A.
    let first = allocate(&inside, "call-1");
    let port1 = port_of(&first);
    assert_eq!(
        public_of(&first),
        format!("{PUBLIC_ADDR}:{port1}"),
        "{first}"
    );
    assert_eq!(
        first["leg_a"]["relay_address"],
        format!("{INSIDE_ADDR}:{port1}"),
        "{first}"
    );
    assert_eq!(first["leg_b"]["public_address"], Value::Null, "{first}");
    let shown = homerelay(&inside, &["channels", "show", &port1.to_string()]).expect("show");
    assert!(
        shown.contains(&format!("public {PUBLIC_ADDR}:{port1}")),
        "{shown}"
    );

    // The dynamic IP changes.
    let (mut watcher, events) = watch(&inside);
    let current = next_event(&events, "current");
    assert_eq!(
        current["status"]["address"],
        PUBLIC_ADDR.to_string(),
        "{current}"
    );
    lab.set_public_address(PUBLIC_ADDR_2)
        .expect("switch the NAT's public address");
    let changed = next_event(&events, "changed");
    assert_eq!(
        changed["previous_address"],
        PUBLIC_ADDR.to_string(),
        "{changed}"
    );
    assert_eq!(
        changed["status"]["address"],
        PUBLIC_ADDR_2.to_string(),
        "{changed}"
    );
    assert_eq!(changed["status"]["changes"], 1, "{changed}");
    // Published after the status changed: everything shows the new address now.
    let s = status(&inside).expect("status");
    assert_eq!(
        (&s["address"], &s["source"], &s["changes"]),
        (
            &Value::from(PUBLIC_ADDR_2.to_string()),
            &Value::from("itsp"),
            &Value::from(1)
        ),
        "{s}"
    );
    let second = allocate(&inside, "call-2");
    let port2 = port_of(&second);
    assert_eq!(
        public_of(&second),
        format!("{PUBLIC_ADDR_2}:{port2}"),
        "{second}"
    );
    let again = json(
        &homerelay(&inside, &["channels", "show", &port1.to_string(), "--json"]).expect("show"),
    );
    assert_eq!(
        public_of(&again),
        format!("{PUBLIC_ADDR_2}:{port1}"),
        "{again}"
    );
    let metrics = scrape(&lab);
    assert_eq!(
        metric(&metrics, "homerelay_public_address_changes_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "homerelay_public_address_known"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "homerelay_public_address_stale"),
        Some(0.0),
        "{metrics}"
    );
    let last_success = metric(
        &metrics,
        "homerelay_public_address_last_success_timestamp_seconds",
    )
    .unwrap_or_else(|| panic!("{metrics}"));
    assert!(last_success > 1.0e9, "{metrics}");

    // The ITSP's server stops: the configured one answers, and the status says so.
    itsp.stop();
    let s = wait_for("the fallback to the configured STUN server", || {
        let s = status(&inside)?;
        if s["source"] == "configured" {
            Ok(s)
        } else {
            Err(format!("{s}{}", show_log()))
        }
    });
    assert_eq!(s["address"], PUBLIC_ADDR_2.to_string(), "{s}");
    assert_eq!(s["server"], SERVER_ADDR_2.to_string(), "{s}");
    assert_eq!(s["server_address"], format!("{SERVER_ADDR_2}:3478"), "{s}");
    assert_eq!(s["stale"], false, "{s}");
    assert_eq!(
        s["changes"], 1,
        "the same address from another server is no change: {s}"
    );
    let error = s["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!("itsp server {ITSP_NAME}:3478: ")),
        "{s}"
    );

    // Both stop: the last address is kept, marked stale, with both errors.
    let _ = stop_ours.send(());
    ours.join().expect("our STUN server's thread");
    let failed = next_event(&events, "failed");
    assert_eq!(
        failed["status"]["address"],
        PUBLIC_ADDR_2.to_string(),
        "{failed}"
    );
    let s = status(&inside).expect("status");
    assert_eq!(s["stale"], true, "{s}");
    assert_eq!(s["address"], PUBLIC_ADDR_2.to_string(), "{s}");
    assert_eq!(
        s["source"], "configured",
        "the source of the address kept: {s}"
    );
    let error = s["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("itsp server")
            && error.contains(&format!("configured server {SERVER_ADDR_2}")),
        "{s}"
    );
    let text = homerelay(&inside, &["public-address"]).expect("the status as text");
    assert!(
        text.contains("stale: the last refresh got no answer"),
        "{text}"
    );
    assert!(text.contains("last error      itsp server"), "{text}");
    // A channel still gets the last address known.
    let third = allocate(&inside, "call-3");
    assert_eq!(
        public_of(&third),
        format!("{PUBLIC_ADDR_2}:{}", port_of(&third)),
        "{third}"
    );
    let metrics = scrape(&lab);
    for server in ["itsp", "configured"] {
        let series =
            format!("homerelay_public_address_discovery_failures_total{{server=\"{server}\"}}");
        let n = metric(&metrics, &series).unwrap_or_else(|| panic!("{series}: {metrics}"));
        assert!(n >= 1.0, "{series}: {metrics}");
    }
    assert_eq!(
        metric(&metrics, "homerelay_public_address_stale"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "homerelay_public_address_changes_total"),
        Some(1.0),
        "{metrics}"
    );

    watcher.stop();
    daemon.stop();
    drop(lab);
}

/// A symmetric NAT rewrites the discovery socket's port: the status says so (media is not
/// concerned: the router forwards the relay's ports 1:1). Without an ITSP's server the
/// configured one is asked directly.
#[test]
fn a_nat_that_rewrites_ports_is_noted_in_the_status() {
    require_root();
    let lab = NatLab::create(NatKind::Symmetric).expect("the NAT lab");
    let inside = lab.ns(Node::Inside).to_owned();
    let (stop_ours, ours) = our_stun_server(&lab, (SERVER_ADDR, 3478).into());
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(
        dir.path(),
        &format!("stun_server = \"{SERVER_ADDR}\"\nrefresh = \"1s\""),
    );
    let log_path = dir.path().join("homerelay.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemon = Proc(
        Command::new("ip")
            .args(["netns", "exec", &inside])
            .arg(env!("CARGO_BIN_EXE_homerelay"))
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start homerelay run"),
    );
    let s = wait_for("the public address from the configured STUN server", || {
        if let Ok(Some(exit)) = daemon.0.try_wait() {
            panic!(
                "homerelay run exited ({exit}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        let s = status(&inside)?;
        if s["address"] == PUBLIC_ADDR.to_string() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(s["source"], "configured", "{s}");
    assert_eq!(s["last_error"], Value::Null, "{s}");
    let local: SocketAddr = s["discovery_local_address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{s}"));
    let mapped: SocketAddr = s["mapped_address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{s}"));
    // fully-random source ports: the same port again has a chance of 1 in tens of thousands.
    assert_ne!(mapped.port(), local.port(), "{s}");
    assert_eq!(s["port_preserved"], false, "{s}");
    let text = homerelay(&inside, &["public-address"]).expect("the status as text");
    assert!(text.contains("the NAT rewrites source ports"), "{text}");
    // Channels are handed out on their own port all the same.
    let channel = allocate(&inside, "call-1");
    assert_eq!(
        public_of(&channel),
        format!("{PUBLIC_ADDR}:{}", port_of(&channel)),
        "{channel}"
    );
    daemon.stop();
    let _ = stop_ours.send(());
    ours.join().expect("our STUN server's thread");
    drop(lab);
}

/// Without discovery (no root needed): the gRPC status and channels of an in-process daemon on
/// loopback, with a static public address and with none (the internet address itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_hand_out_the_static_or_the_internet_address() {
    use proto::v1 as pb;
    use proto::v1::channel_service_client::ChannelServiceClient;
    use proto::v1::public_address_service_client::PublicAddressServiceClient;

    // STUN requests are sent from the local address: it must be the host's.
    let mut config = control::config::Config::default();
    config.store.enabled = false;
    config.public_address.stun_server = Some("192.0.2.7".into());
    config.public_address.local_address = Some(Ipv4Addr::new(192, 0, 2, 99));
    let e = control::daemon::DaemonBuilder::new(config)
        .build()
        .expect_err("not an address of this host");
    assert!(
        e.to_string().starts_with(
            "public_address.local_address = 192.0.2.99 is not an address of this host"
        ),
        "{e:#}"
    );

    for static_address in [Some(Ipv4Addr::new(192, 0, 2, 50)), None] {
        let mut config = control::config::Config::default();
        config.relay.layout = Some(control::config::LayoutName::Custom);
        config.relay.ports = Some("42900-42909".into());
        config.relay.workers = 1;
        config.relay.internet_address = Some(Ipv4Addr::LOCALHOST);
        config.relay.allow_local_peers = true;
        config.store.enabled = false;
        config.public_address.static_address = static_address;
        let service = control::daemon::DaemonBuilder::new(config)
            .build()
            .expect("start the daemon")
            .service;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the API");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(control::server::serve_with(
            listener,
            service.clone(),
            control::server::Credentials::new(&control::server::Security::default())
                .expect("credentials"),
            control::server::Limits::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let (public, source) = match static_address {
            Some(a) => (a, pb::PublicAddressSource::Static),
            None => (
                Ipv4Addr::LOCALHOST,
                pb::PublicAddressSource::InternetAddress,
            ),
        };

        let mut addresses = PublicAddressServiceClient::connect(url.clone())
            .await
            .expect("connect");
        let s = addresses
            .get_public_address(pb::GetPublicAddressRequest {})
            .await
            .expect("GetPublicAddress")
            .into_inner()
            .status
            .expect("status");
        assert_eq!(s.address, public.to_string(), "{s:?}");
        assert_eq!(s.source, source as i32, "{s:?}");
        assert_eq!(s.local_address, "127.0.0.1", "{s:?}");
        assert!(!s.discovery && !s.stale && s.server.is_empty(), "{s:?}");
        let mut events = addresses
            .watch_public_address(pb::WatchPublicAddressRequest {})
            .await
            .expect("WatchPublicAddress")
            .into_inner();
        let first = tokio::time::timeout(WAIT, events.message())
            .await
            .expect("the current status at once")
            .expect("a message")
            .expect("a message");
        assert_eq!(first.r#type, pb::PublicAddressEventType::Current as i32);
        assert_eq!(first.status.map(|s| s.address), Some(public.to_string()));

        let mut channels = ChannelServiceClient::connect(url).await.expect("connect");
        let channel = channels
            .allocate(pb::AllocateRequest {
                call_leg: Some(pb::CallLeg {
                    call_id: "static-1".into(),
                    leg_tag: String::new(),
                }),
                kind: pb::ChannelKind::ItspCall as i32,
                ..Default::default()
            })
            .await
            .expect("allocate")
            .into_inner()
            .channel
            .expect("channel");
        let (a, b) = (
            channel.leg_a.clone().unwrap_or_default(),
            channel.leg_b.clone().unwrap_or_default(),
        );
        assert_eq!(
            a.public_address,
            format!("{public}:{}", channel.port),
            "{channel:?}"
        );
        assert_eq!(
            a.relay_address,
            format!("127.0.0.1:{}", channel.port),
            "{channel:?}"
        );
        assert_eq!(b.public_address, "", "leg B is the LAN side: {channel:?}");

        service.shutdown().await;
        let _ = stop.send(());
        // The stream ends with the service.
        let end = tokio::time::timeout(WAIT, events.message())
            .await
            .expect("the stream ends at shutdown");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
        tokio::time::timeout(WAIT, server)
            .await
            .expect("the server stops")
            .expect("server task")
            .expect("served cleanly");
    }
}
