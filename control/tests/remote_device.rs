//! A remote phone end to end, in the namespace testbed, the way an operator runs it: the real
//! `homerelay run` process in the Relay namespace (user-space data path, registration on TCP
//! 4062), the device created with `homerelay devices create`, the phone behind the Nat router's
//! nftables masquerade registering over TCP with its password, and its call's media flowing
//! through a channel allocated for it. Then `kill -9` and a restart: the registry is intact, and
//! the phone registers again with the same password.
//!
//! Needs root (network namespaces), like the other privileged tests: the README's test command
//! runs as root.
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use control::register_client::{Credentials, RegisterError, register};
use relay_core::register::Refusal;
use relay_user::netns::{self, Host, Testbed, TestbedOptions};
use serde_json::Value;
use tokio_rustls::rustls;

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";
const WAIT: Duration = Duration::from_secs(20);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces); run the README's test command as root"
    );
}

/// The daemon in the Relay namespace; killed (SIGKILL) on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(tb: &Testbed, config: &Path, log: &Path) -> Daemon {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", tb.ns(Host::Relay)])
            .arg(env!("CARGO_BIN_EXE_homerelay"))
            .args(["run", "--config"])
            .arg(config)
            .env("HOMERELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start homerelay run");
        Daemon { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `homerelay ARGS` in the Relay namespace (the CLI talks to the daemon's API on its loopback).
fn cli(tb: &Testbed, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", tb.ns(Host::Relay)])
        .arg(env!("CARGO_BIN_EXE_homerelay"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the homerelay CLI");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits until the daemon answers `homerelay pool` (bounded; the log is shown on failure).
fn wait_ready(tb: &Testbed, daemon: &mut Daemon, log: &Path) {
    let start = Instant::now();
    loop {
        if cli(tb, &["pool", "--json"]).is_ok() {
            return;
        }
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!(
                "homerelay run exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < WAIT,
            "the daemon did not come up:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    write_config_with(dir, "")
}

/// The testbed's config, with `extra` appended to `[registration]` (and sections after it).
fn write_config_with(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("homerelay.toml");
    let config = format!(
        r#"
[relay]
layout = "custom"
ports = "30528-30547"
capacity = 10
workers = 1
internet_address = "{internet}"
lan_address = "{lan}"

[pool]
quarantine = "0s"

[api]
listen = "127.0.0.1:4080"

[metrics]
enabled = false

[store]
path = "{store}"

[devices]
# The office LAN is internal; the phone behind the home router is not.
internal_networks = ["192.0.2.0/24"]
password_iterations = 4096

[registration]
listen = "0.0.0.0:4062"
{extra}
"#,
        internet = netns::RELAY_HOME_ADDR,
        lan = netns::RELAY_OFFICE_ADDR,
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
        media: (netns::HOME_BEHIND_NAT_ADDR, 5004).into(),
        keepalive_s: 30,
    }
}

/// What the phone thread reports: the public address the relay saw, or why it failed.
type Registered = Result<SocketAddr, String>;

/// The phone behind the NAT: registers on the relay's public address, reports the mapping the
/// relay saw, and keeps the registration (answering keepalives) until told to stop.
fn phone(
    tb: &Testbed,
    stop: mpsc::Receiver<()>,
) -> (mpsc::Receiver<Registered>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Registered>();
    let handle = tb.spawn_in(Host::HomeBehindNat, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let relay: SocketAddr = (netns::RELAY_HOME_ADDR, 4062).into();
            let registered = async {
                let stream = tokio::net::TcpStream::connect(relay)
                    .await
                    .map_err(|e| format!("connect {relay}: {e}"))?;
                tokio::time::timeout(WAIT, register(stream, &credentials()))
                    .await
                    .map_err(|_| "no answer".to_owned())?
                    .map_err(|e| e.to_string())
            }
            .await;
            let mut phone = match registered {
                Ok(p) => {
                    let _ = tx.send(Ok(p.registration.public_addr));
                    p
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while stop.try_recv() == Err(mpsc::TryRecvError::Empty) {
                if phone.hold(Duration::from_millis(200)).await.is_err() {
                    return;
                }
            }
            let _ = phone.unregister().await;
        });
    });
    (rx, handle)
}

fn udp_in(tb: &Testbed, host: Host, addr: SocketAddr) -> UdpSocket {
    tb.run_in(host, move || {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s
    })
}

fn rtp(seq: u8) -> Vec<u8> {
    let mut p = vec![seq; 172];
    p[..12].copy_from_slice(&[0x80, 0, 0, seq, 0, 0, 0, seq, 0, 0, 0, 7]);
    p
}

/// Waits until `leg`'s RTP endpoint of the only channel is latched.
fn wait_latched(tb: &Testbed, leg: &str) {
    let start = Instant::now();
    loop {
        let list = json(&cli(tb, &["channels", "list", "--json"]).expect("list"));
        if list[0][leg]["rtp"]["latched"] == true {
            return;
        }
        assert!(start.elapsed() < WAIT, "{leg} never latched: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails with what the relay knows: its channels and its log.
fn diagnose(tb: &Testbed, log: &Path, what: &str, e: &std::io::Error) -> ! {
    for (host, argv) in [
        (
            Host::Relay,
            &[
                "nstat",
                "-az",
                "UdpInDatagrams",
                "UdpNoPorts",
                "UdpInErrors",
                "IpInReceives",
                "IpInAddrErrors",
                "IpExtInNoRoutes",
                "IpInDiscards",
            ][..],
        ),
        (
            Host::Nat,
            &[
                "nstat",
                "-az",
                "IpInReceives",
                "IpForwDatagrams",
                "IpOutNoRoutes",
                "IpInAddrErrors",
            ][..],
        ),
        (Host::Nat, &["ip", "route"][..]),
        (Host::Relay, &["ip", "-s", "link"][..]),
        (Host::Relay, &["ss", "-uanp"][..]),
    ] {
        eprintln!("{host:?} {argv:?}: {:?}", tb.exec(host, argv));
    }
    panic!(
        "{what}: {e}\nchannels: {:?}\nlog:\n{}",
        cli(tb, &["channels", "list", "--json"]),
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

#[test]
fn a_phone_behind_nat_registers_calls_through_the_relay_and_survives_kill_9() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: true }).expect("testbed");
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path());
    let log = dir.path().join("homerelay.log");
    let mut daemon = Daemon::start(&tb, &config, &log);
    wait_ready(&tb, &mut daemon, &log);

    // The operator adds the phone: a strong password (from a file), internet registration on.
    let password = dir.path().join("password");
    let mut f = std::fs::File::create(&password).expect("password file");
    writeln!(f, "{STRONG}").expect("write password");
    let password_arg = password.to_string_lossy().into_owned();
    cli(
        &tb,
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
            &password_arg,
        ],
    )
    .expect("create the device");

    // No channel for it before it registers.
    let refused = cli(
        &tb,
        &[
            "channels",
            "allocate",
            "--call-id",
            "early",
            "--kind",
            "sip_device",
            "--device",
            "4711",
        ],
    )
    .expect_err("a channel for an unregistered device");
    assert!(refused.contains("not registered"), "{refused}");

    // The phone registers from behind the NAT: the relay records the router's mapping.
    let (stop, stopped) = mpsc::channel();
    let (registered, phone_thread) = phone(&tb, stopped);
    let public = registered
        .recv_timeout(WAIT)
        .expect("the phone thread reports")
        .expect("the phone registered");
    assert_eq!(public.ip(), netns::NAT_WAN_ADDR, "the NAT's public address");
    assert!(
        (netns::NAT_PORT_RANGE.0..=netns::NAT_PORT_RANGE.1).contains(&public.port()),
        "a port of the masquerade: {public}"
    );
    let shown = json(&cli(&tb, &["devices", "show", "4711", "--json"]).expect("show"));
    let registration = &shown["registration"];
    assert_eq!(
        registration["public_address"],
        public.to_string(),
        "{shown}"
    );
    assert_eq!(
        registration["local_address"],
        format!("{}:5004", netns::HOME_BEHIND_NAT_ADDR),
        "{shown}"
    );
    assert_eq!(registration["external"], true, "{shown}");

    // A call: leg A is the phone (learnt from its first packet, through the NAT), leg B the
    // office phone on the LAN.
    let office_addr: SocketAddr = (netns::OFFICE_ADDR, 6000).into();
    let channel = json(
        &cli(
            &tb,
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
    assert_eq!(
        channel["internet"], true,
        "an external phone's call: {channel}"
    );
    let port = u16::try_from(channel["port"].as_u64().expect("port")).expect("port");
    let phone_media = udp_in(
        &tb,
        Host::HomeBehindNat,
        (netns::HOME_BEHIND_NAT_ADDR, 5004).into(),
    );
    let office = udp_in(&tb, Host::Office, office_addr);
    let relay_public: SocketAddr = (netns::RELAY_HOME_ADDR, port).into();
    let relay_lan: SocketAddr = (netns::RELAY_OFFICE_ADDR, port).into();
    let mut buf = [0u8; 2048];
    // The office phone speaks first and confirms leg B (its packet has nowhere to go yet); the
    // first packet from any other source is then the phone's, through its router's mapping.
    office.send_to(&rtp(99), relay_lan).expect("send");
    wait_latched(&tb, "leg_b");
    for seq in 0..5u8 {
        phone_media.send_to(&rtp(seq), relay_public).expect("send");
        let (n, from) = office
            .recv_from(&mut buf)
            .unwrap_or_else(|e| diagnose(&tb, &log, "the office receives the phone's media", &e));
        assert_eq!((&buf[..n], from), (&rtp(seq)[..], relay_lan));
    }
    for seq in 10..15u8 {
        office.send_to(&rtp(seq), relay_lan).expect("send");
        let (n, from) = phone_media.recv_from(&mut buf).unwrap_or_else(|e| {
            diagnose(
                &tb,
                &log,
                "the phone receives the office's media through its NAT",
                &e,
            )
        });
        assert_eq!((&buf[..n], from), (&rtp(seq)[..], relay_public));
    }
    let _ = stop.send(());
    phone_thread.join().expect("phone thread");

    // kill -9 and a restart on the same state: the device and its verifier are intact.
    daemon.kill9();
    let mut daemon = Daemon::start(&tb, &config, &log);
    wait_ready(&tb, &mut daemon, &log);
    let listed = json(&cli(&tb, &["devices", "list", "--json"]).expect("list"));
    let devices = listed.as_array().expect("a list");
    assert_eq!(devices.len(), 1, "{listed}");
    assert_eq!(devices[0]["number"], "4711");
    assert_eq!(devices[0]["internet_registration"], true);
    assert_eq!(devices[0]["has_password"], true);
    assert!(
        devices[0]["registration"].is_null(),
        "a registration ends with its connection: {listed}"
    );
    let (stop, stopped) = mpsc::channel();
    let (registered, phone_thread) = phone(&tb, stopped);
    let again = registered
        .recv_timeout(WAIT)
        .expect("the phone thread reports")
        .expect("the phone registers again with the same password");
    assert_eq!(again.ip(), netns::NAT_WAN_ADDR);
    let _ = stop.send(());
    phone_thread.join().expect("phone thread");
    drop(daemon);
}

/// One registration attempt of `c` from `host` to the relay's public address (`port`; over
/// TLS verified against `ca` when given), unregistered at once: the public address the relay
/// saw, or why it refused.
fn attempt(
    tb: &Testbed,
    host: Host,
    c: Credentials,
    port: u16,
    ca: Option<std::path::PathBuf>,
) -> Result<SocketAddr, RegisterError> {
    tb.run_in(host, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let relay: SocketAddr = (netns::RELAY_HOME_ADDR, port).into();
            let tcp = tokio::net::TcpStream::connect(relay)
                .await
                .unwrap_or_else(|e| panic!("connect {relay}: {e}"));
            let public = match ca {
                None => {
                    let p = tokio::time::timeout(WAIT, register(tcp, &c))
                        .await
                        .expect("an answer")?;
                    let public = p.registration.public_addr;
                    p.unregister().await.expect("unregistered");
                    public
                }
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(&ca).expect("CA") {
                        roots.add(cert.expect("CA cert")).expect("add CA");
                    }
                    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                        .connect(
                            rustls::pki_types::ServerName::IpAddress(relay.ip().into()),
                            tcp,
                        )
                        .await
                        .expect("a TLS handshake that verifies against the CA");
                    let p = tokio::time::timeout(WAIT, register(tls, &c))
                        .await
                        .expect("an answer")?;
                    let public = p.registration.public_addr;
                    p.unregister().await.expect("unregistered");
                    public
                }
            };
            Ok(public)
        })
    })
}

fn refused(r: Result<SocketAddr, RegisterError>) -> Refusal {
    match r {
        Err(RegisterError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_sbc_rules_hold_over_tcp_and_tls_through_the_nat() {
    require_root();
    let tb = Testbed::create(TestbedOptions { nat: true }).expect("testbed");
    let dir = tempfile::tempdir().expect("dir");
    let d = |p: &str| dir.path().join(p);
    let text = |p: &str| d(p).to_string_lossy().into_owned();
    // A CA and the relay's certificate, made and imported with the CLI.
    std::fs::write(d("pass"), "a-p12-passphrase\n").expect("passphrase");
    for args in [
        &[
            "cert",
            "ca",
            "--dir",
            &text("ca"),
            "--name",
            "root",
            "--org",
            "homerelay",
            "--cn",
            "root",
        ][..],
        &[
            "cert",
            "server",
            "--dir",
            &text("ca"),
            "--ca",
            "root",
            "--org",
            "homerelay",
            "--cn",
            "relay",
            "--san",
            &netns::RELAY_HOME_ADDR.to_string(),
            "--signature",
            "ecdsa-p256",
            "--out",
            &text("relay.p12"),
            "--passphrase-file",
            &text("pass"),
        ][..],
        &[
            "cert",
            "import",
            &text("relay.p12"),
            "--passphrase-file",
            &text("pass"),
            "--cert-out",
            &text("relay.pem"),
            "--key-out",
            &text("relay.key"),
        ][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_homerelay"))
            .args(args)
            .output()
            .expect("homerelay cert");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tls = format!(
        "tls_listen = \"0.0.0.0:4063\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        text("relay.pem"),
        text("relay.key")
    );
    let config = write_config_with(dir.path(), &tls);
    let log = d("homerelay.log");
    let mut daemon = Daemon::start(&tb, &config, &log);
    wait_ready(&tb, &mut daemon, &log);
    std::fs::write(d("password"), format!("{STRONG}\n")).expect("password file");
    for (number, internet) in [("4711", true), ("4712", false), ("4713", true)] {
        let mut args = vec![
            "devices",
            "create",
            number,
            "--type",
            "openstage_hfa",
            "--password-file",
        ];
        let password = text("password");
        args.push(&password);
        if internet {
            args.push("--internet");
        }
        cli(&tb, &args).unwrap_or_else(|e| panic!("create {number}: {e}"));
    }
    let phone = |number: &str, password: &str, firmware: &str| Credentials {
        number: number.into(),
        password: password.into(),
        firmware: firmware.into(),
        ..credentials()
    };
    let ca = Some(d("ca/root.pem"));
    let nat = Host::HomeBehindNat;

    // Over TLS from behind the NAT: registered with the router's mapping.
    let public = attempt(
        &tb,
        nat,
        phone("4711", STRONG, "V3 R5.10.0"),
        4063,
        ca.clone(),
    )
    .expect("registered over TLS");
    assert_eq!(public.ip(), netns::NAT_WAN_ADDR);
    // A wrong password and an unknown device: the same answer, over TCP and TLS.
    assert_eq!(
        refused(attempt(
            &tb,
            nat,
            phone("4711", "Wrong-Password-99", "V3 R5.10.0"),
            4062,
            None
        )),
        Refusal::AuthFailed
    );
    assert_eq!(
        refused(attempt(
            &tb,
            nat,
            phone("5999", STRONG, "V3 R5.10.0"),
            4063,
            ca.clone()
        )),
        Refusal::AuthFailed
    );
    // Old firmware from outside.
    assert_eq!(
        refused(attempt(
            &tb,
            nat,
            phone("4711", STRONG, "V3 R0.30.0"),
            4062,
            None
        )),
        Refusal::FirmwareTooOld
    );
    // No internet registration flag: refused from outside, fine from the office LAN.
    assert_eq!(
        refused(attempt(
            &tb,
            nat,
            phone("4712", STRONG, "V3 R5.10.0"),
            4063,
            ca.clone()
        )),
        Refusal::NotAllowedExternal
    );
    let inside = attempt(
        &tb,
        Host::Office,
        phone("4712", STRONG, "V3 R5.10.0"),
        4062,
        None,
    )
    .expect("registered from inside");
    assert_eq!(inside.ip(), netns::OFFICE_ADDR);
    // Five wrong passwords lock 4713 out: then even the right one is refused for a while.
    for _ in 0..5 {
        assert_eq!(
            refused(attempt(
                &tb,
                nat,
                phone("4713", "Wrong-Password-99", "V3 R5.10.0"),
                4062,
                None
            )),
            Refusal::AuthFailed
        );
    }
    assert!(matches!(
        refused(attempt(&tb, nat, phone("4713", STRONG, "V3 R5.10.0"), 4063, ca.clone())),
        Refusal::LockedOut { retry_after_s } if retry_after_s > 0
    ));
    // 4711 is not affected by 4713's lockout.
    attempt(&tb, nat, phone("4711", STRONG, "V3 R5.10.0"), 4062, None)
        .expect("4711 still registers");

    // A stricter password policy after a restart: 4711's password became weak, so it may no
    // longer register from outside (inside it still may).
    daemon.kill9();
    let stricter = std::fs::read_to_string(&config).expect("config").replace(
        "password_iterations = 4096",
        "password_iterations = 4096\nmin_password_length = 24",
    );
    std::fs::write(&config, stricter).expect("config");
    let mut daemon = Daemon::start(&tb, &config, &log);
    wait_ready(&tb, &mut daemon, &log);
    assert_eq!(
        refused(attempt(
            &tb,
            nat,
            phone("4711", STRONG, "V3 R5.10.0"),
            4063,
            ca.clone()
        )),
        Refusal::WeakPassword
    );
    attempt(
        &tb,
        Host::Office,
        phone("4711", STRONG, "V3 R5.10.0"),
        4062,
        None,
    )
    .expect("a weak password still registers from inside");
    drop(daemon);
}
