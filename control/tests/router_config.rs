//! `homerelay router-config --format nft` applied on a Linux router, end to end: namespaces
//! "device" (a phone on the Internet) — "router" (the company router, forwarding, the generated
//! rules loaded with `nft -f`) — "relay" (the real `homerelay run`) — "office" (a phone on the
//! relay's LAN side). The phone registers on the router's public 4060 (forwarded to the relay's
//! 4062), the relay records the phone's own public address (the rules do not masquerade) and
//! classifies it as external, and the media of its call goes to the router's public address on
//! the channel's port, through the channel to the office and back.
//!
//! Needs root (network namespaces), like the other privileged tests. TEST-NET addresses only;
//! the namespaces are deleted on drop, also when the test fails.
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use control::register_client::{Credentials, register};
use relay_user::netns::run_in_named;
use serde_json::Value;

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";
const WAIT: Duration = Duration::from_secs(20);

/// The phone on the Internet.
const DEVICE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The company router's public address.
const ROUTER_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The company router on the relay's side.
const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The relay host, the router forwards to.
const RELAY_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The relay on the office LAN.
const RELAY_OFFICE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The office phone.
const OFFICE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The router's Internet interface.
const WAN_IF: &str = "rc-wan";

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces); run the README's test command as root"
    );
}

/// Runs `argv`; its stdout, or a panic with its stderr.
fn sh(argv: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{argv:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The four namespaces; deleted on drop.
struct Topology {
    device: String,
    router: String,
    relay: String,
    office: String,
    created: Vec<String>,
}

impl Topology {
    fn create() -> Topology {
        let pid = std::process::id();
        let name = |n: &str| format!("hrrc-{pid}-{n}");
        let mut t = Topology {
            device: name("dev"),
            router: name("rtr"),
            relay: name("rel"),
            office: name("off"),
            created: Vec::new(),
        };
        for ns in [&t.device, &t.router, &t.relay, &t.office].map(String::clone) {
            sh(&["ip", "netns", "add", &ns], None);
            t.created.push(ns.clone());
            t.ip(&ns, &["link", "set", "lo", "up"]);
            sh(
                &[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
                None,
            );
        }
        let (device, router, relay, office) = (
            t.device.clone(),
            t.router.clone(),
            t.relay.clone(),
            t.office.clone(),
        );
        t.link(
            (&device, "rc-dev", DEVICE_ADDR),
            (&router, WAN_IF, ROUTER_PUBLIC),
        );
        t.link(
            (&router, "rc-lan", ROUTER_LAN),
            (&relay, "rc-relay", RELAY_ADDR),
        );
        t.link(
            (&relay, "rc-office", RELAY_OFFICE),
            (&office, "rc-o", OFFICE_ADDR),
        );
        // The relay answers the Internet through the router; the device knows only its link.
        t.ip(
            &relay,
            &["route", "add", "default", "via", &ROUTER_LAN.to_string()],
        );
        sh(
            &[
                "ip",
                "netns",
                "exec",
                &router,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ],
            None,
        );
        t
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        let mut argv = vec!["ip", "-n", ns];
        argv.extend_from_slice(args);
        sh(&argv, None);
    }

    /// A veth pair between two namespaces, a /24 on each end.
    fn link(
        &self,
        (a_ns, a_if, a): (&str, &str, Ipv4Addr),
        (b_ns, b_if, b): (&str, &str, Ipv4Addr),
    ) {
        self.ip(
            a_ns,
            &[
                "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b_ns,
            ],
        );
        for (ns, iface, addr) in [(a_ns, a_if, a), (b_ns, b_if, b)] {
            self.ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", iface]);
            self.ip(ns, &["link", "set", iface, "up"]);
        }
    }

    fn exec(&self, ns: &str, argv: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(argv);
        sh(&full, None)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The daemon in the relay namespace; killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("homerelay.toml");
    let config = format!(
        r#"
[relay]
layout = "custom"
ports = "30528-30547"
capacity = 10
workers = 1
internet_address = "{RELAY_ADDR}"
lan_address = "{RELAY_OFFICE}"

[pool]
quarantine = "0s"

[api]
listen = "127.0.0.1:4080"

[metrics]
enabled = false

[store]
path = "{store}"

[devices]
internal_networks = ["192.0.2.0/24", "198.51.100.0/24"]
password_iterations = 4096

[registration]
listen = "0.0.0.0:4062"
"#,
        store = dir.join("homerelay.db").display(),
    );
    std::fs::write(&path, config).expect("write the config");
    path
}

fn credentials() -> Credentials {
    Credentials {
        number: "4711".into(),
        password: STRONG.into(),
        mac: [0, 0x1a, 0xe8, 0x12, 0x34, 0x56],
        device_type: "openstage_hfa".into(),
        firmware: "V3 R5.10.0".into(),
        media: (DEVICE_ADDR, 5004).into(),
        keepalive_s: 30,
    }
}

fn udp_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    run_in_named(ns, move || {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s
    })
    .expect("enter the namespace")
}

fn rtp(seq: u8) -> Vec<u8> {
    let mut p = vec![seq; 172];
    p[..12].copy_from_slice(&[0x80, 0, 0, seq, 0, 0, 0, seq, 0, 0, 0, 7]);
    p
}

#[test]
fn the_generated_rules_forward_registration_and_media_without_masquerade() {
    require_root();
    let topo = Topology::create();
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    let config_arg = config.to_string_lossy().into_owned();

    // The rules, from the same config as the daemon, loaded on the router.
    let rules = homerelay(
        &topo.relay,
        &[
            "router-config",
            "--config",
            &config_arg,
            "--wan-iface",
            WAN_IF,
            "--format",
            "nft",
        ],
    )
    .expect("router-config --format nft");
    let rules_file = dir.path().join("router.nft");
    std::fs::write(&rules_file, &rules).expect("write the rules");
    // Applied twice, as an operator re-running it would: the table is replaced, not doubled.
    for _ in 0..2 {
        topo.exec(&topo.router, &["nft", "-f", &rules_file.to_string_lossy()]);
    }
    let loaded = topo.exec(&topo.router, &["nft", "list", "ruleset"]);
    // Plain registration, deployment (2) and media; TLS and HTTPS listeners are off here.
    assert_eq!(loaded.matches("dnat to").count(), 4, "{loaded}");
    assert!(!loaded.contains("dport 4061"), "{loaded}");
    assert!(loaded.contains("dnat to 198.51.100.10:4062"), "{loaded}");
    assert!(
        !loaded.contains("masquerade") && !loaded.contains("snat"),
        "{loaded}"
    );

    // The daemon, and the phone as its operator creates it.
    let log_path = dir.path().join("homerelay.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemon = Daemon(
        Command::new("ip")
            .args(["netns", "exec", &topo.relay])
            .arg(env!("CARGO_BIN_EXE_homerelay"))
            .args(["run", "--config", &config_arg])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start homerelay run"),
    );
    let show_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let start = Instant::now();
    while homerelay(&topo.relay, &["pool", "--json"]).is_err() {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!("homerelay run exited ({status}):\n{}", show_log());
        }
        assert!(start.elapsed() < WAIT, "no daemon:\n{}", show_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let password = dir.path().join("password");
    std::fs::write(&password, format!("{STRONG}\n")).expect("password file");
    homerelay(
        &topo.relay,
        &[
            "devices",
            "create",
            "4711",
            "--type",
            "openstage_hfa",
            "--mac",
            "00:1a:e8:12:34:56",
            "--internet",
            "--password-file",
            &password.to_string_lossy(),
        ],
    )
    .expect("create the device");

    // The phone registers on the router's public 4060; it stays registered until told.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (reg_tx, reg_rx) = std::sync::mpsc::channel::<Result<(SocketAddr, SocketAddr), String>>();
    let device_ns = topo.device.clone();
    let phone = std::thread::spawn(move || {
        run_in_named(&device_ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let public: SocketAddr = (ROUTER_PUBLIC, 4060).into();
                let registered = async {
                    let stream = tokio::net::TcpStream::connect(public)
                        .await
                        .map_err(|e| format!("connect {public}: {e}"))?;
                    let local = stream.local_addr().map_err(|e| e.to_string())?;
                    let phone = tokio::time::timeout(WAIT, register(stream, &credentials()))
                        .await
                        .map_err(|_| "no answer".to_owned())?
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((phone, local))
                }
                .await;
                let mut phone = match registered {
                    Ok((p, local)) => {
                        let _ = reg_tx.send(Ok((p.registration.public_addr, local)));
                        p
                    }
                    Err(e) => {
                        let _ = reg_tx.send(Err(e));
                        return;
                    }
                };
                while stop_rx.try_recv() == Err(std::sync::mpsc::TryRecvError::Empty) {
                    if phone.hold(Duration::from_millis(200)).await.is_err() {
                        return;
                    }
                }
                let _ = phone.unregister().await;
            });
        })
    });
    let (seen, local) = reg_rx
        .recv_timeout(WAIT)
        .expect("the phone reports")
        .unwrap_or_else(|e| panic!("the phone did not register: {e}\n{}", show_log()));
    assert_eq!(
        seen, local,
        "the relay sees the phone's own address and port: no masquerade"
    );
    assert_eq!(seen.ip(), DEVICE_ADDR);
    let shown =
        json(&homerelay(&topo.relay, &["devices", "show", "4711", "--json"]).expect("show"));
    assert_eq!(
        shown["registration"]["public_address"],
        seen.to_string(),
        "{shown}"
    );
    assert_eq!(shown["registration"]["external"], true, "{shown}");

    // A call: media to the router's public address on the channel's port reaches the office
    // through the channel, and the office's media comes back from that public address.
    let office_addr: SocketAddr = (OFFICE_ADDR, 6000).into();
    let channel = json(
        &homerelay(
            &topo.relay,
            &[
                "channels",
                "allocate",
                "--call-id",
                "call-1",
                "--kind",
                "sip_device",
                "--device",
                "4711",
                "--b-rtp",
                &office_addr.to_string(),
                "--json",
            ],
        )
        .expect("a channel for the registered phone"),
    );
    assert_eq!(channel["internet"], true, "{channel}");
    let port = u16::try_from(channel["port"].as_u64().expect("port")).expect("port");
    let phone_media = udp_in(&topo.device, (DEVICE_ADDR, 5004).into());
    let office = udp_in(&topo.office, office_addr);
    let public: SocketAddr = (ROUTER_PUBLIC, port).into();
    let relay_lan: SocketAddr = (RELAY_OFFICE, port).into();
    let mut buf = [0u8; 2048];
    // The office speaks first and confirms leg B; the next new source is the phone.
    office.send_to(&rtp(99), relay_lan).expect("send");
    let start = Instant::now();
    loop {
        let list = json(&homerelay(&topo.relay, &["channels", "list", "--json"]).expect("list"));
        if list[0]["leg_b"]["rtp"]["latched"] == true {
            break;
        }
        assert!(start.elapsed() < WAIT, "leg B never latched: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for seq in 0..5u8 {
        phone_media.send_to(&rtp(seq), public).expect("send");
        let (n, from) = office.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "the office receives the phone's media: {e}\nrouter: {}\n{}",
                topo.exec(&topo.router, &["nft", "list", "ruleset"]),
                show_log()
            )
        });
        assert_eq!((&buf[..n], from), (&rtp(seq)[..], relay_lan));
    }
    let list = json(&homerelay(&topo.relay, &["channels", "list", "--json"]).expect("list"));
    let latched = list[0]["leg_a"]["rtp"]["address"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        latched,
        format!("{DEVICE_ADDR}:5004"),
        "leg A latched to the phone's own address: {list}"
    );
    for seq in 10..15u8 {
        office.send_to(&rtp(seq), relay_lan).expect("send");
        let (n, from) = phone_media
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("the phone receives the office's media: {e}"));
        assert_eq!((&buf[..n], from), (&rtp(seq)[..], public));
    }

    let _ = stop_tx.send(());
    phone
        .join()
        .expect("phone thread")
        .expect("phone namespace");
    drop(daemon);
    drop(topo);
}
