//! NAT type detection through real NATs: for each kind of the NAT lab (`relay_user::natlab`:
//! full cone, restricted cone, symmetric, built with nftables in namespaces), the detector runs
//! on the host behind the NAT against
//! (a) homerelay's own STUN server — the real `homerelay run` with `[stun] listen` and
//!     `other_address` on the Outside host's two addresses — and
//! (b) coturn's `turnserver` (STUN only, two listening addresses) as the reference server,
//! and must classify every kind right against both. Against our server, coturn's clients run
//! from behind the NAT too: `turnutils_stunclient` must see the public address and
//! `turnutils_natdiscovery` must agree with the detector; and the CLI (`homerelay nat-type
//! --json`) prints the report.
//!
//! Needs root (network namespaces, nftables), the `homerelay` binary and coturn's programs
//! (Debian package `coturn`, installed by scripts/bootstrap.sh): without them these tests fail,
//! they are not skipped.
#![allow(
    clippy::unwrap_used,
    reason = "test code: an unwrap failing is the test failing"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use control::nat_detect::{NatReport, detect};
use control::stun_client::{Retransmit, binding};
use relay_core::stun::client::Change;
use relay_core::stun::nat::{Filtering, Mapping, NatType};
use relay_user::natlab::{
    INSIDE_ADDR, NatKind, NatLab, Node, PUBLIC_ADDR, SERVER_ADDR, SERVER_ADDR_2,
};

const PORT: u16 = 3478;
const OTHER_PORT: u16 = 3479;
const WAIT: Duration = Duration::from_secs(20);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the NAT type tests need root (network namespaces, nftables); run them as root"
    );
}

fn server_addr() -> SocketAddr {
    (SERVER_ADDR, PORT).into()
}

/// A STUN server process in the Outside namespace; killed on drop.
struct Server {
    child: Child,
    log: std::path::PathBuf,
    what: &'static str,
}

impl Server {
    fn spawn(lab: &NatLab, what: &'static str, argv: &[&str], log: &Path) -> Server {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", lab.ns(Node::Outside)])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({}): {e}", argv[0]));
        Server {
            child,
            log: log.to_owned(),
            what,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the server answers a Binding request with OTHER-ADDRESS (asked from the
    /// Outside host itself, so the NAT is not involved).
    fn wait_ready(&mut self, lab: &NatLab) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.what, self.log());
            }
            let answered = lab
                .run_in(Node::Outside, || {
                    runtime().block_on(async {
                        let s = tokio::net::UdpSocket::bind((SERVER_ADDR, 0)).await.unwrap();
                        let quick = Retransmit {
                            rto: Duration::from_millis(100),
                            attempts: 2,
                            last_wait_factor: 2,
                        };
                        binding(&s, server_addr(), Change::NONE, quick)
                            .await
                            .is_ok_and(|a| a.response.other_address.is_some())
                    })
                })
                .unwrap();
            if answered {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "{} did not come up:\n{}",
                self.what,
                self.log()
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `homerelay run` in Outside with the STUN server on both addresses (RFC 5780) and nothing
/// else of note: a small user-space pool, no metrics, its store in `dir`.
fn homerelay(lab: &NatLab, dir: &Path) -> Server {
    let config = dir.join("homerelay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[relay]
layout = "custom"
ports = "30528-30547"
capacity = 10
workers = 1

[api]
listen = "127.0.0.1:4080"

[metrics]
enabled = false

[store]
path = "{store}"

[stun]
listen = "{SERVER_ADDR}:{PORT}"
other_address = "{SERVER_ADDR_2}:{OTHER_PORT}"
# The tests of several clients come from one public address within seconds: the rate limit
# is not what is tested here.
rate_per_source = 100
burst_per_source = 200
"#,
            store = dir.join("homerelay.db").display(),
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_homerelay");
    let config = config.to_str().unwrap();
    let mut s = Server::spawn(
        lab,
        "homerelay run",
        &[bin, "run", "--config", config],
        &dir.join("homerelay.log"),
    );
    s.wait_ready(lab);
    s
}

/// coturn's `turnserver` in Outside: STUN only, RFC 5780 with both addresses and ports 3478
/// and 3479, no TCP/TLS/CLI, no authentication, its files in `dir` (not the system's
/// configuration), its log on stdout.
fn coturn(lab: &NatLab, dir: &Path) -> Server {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (db, pid) = (path("turndb"), path("turnserver.pid"));
    // An empty configuration file: Debian's /etc/turnserver.conf says `no-rfc5780` (and
    // `syslog`).
    let conf = path("turnserver.conf");
    std::fs::write(&conf, "").unwrap();
    let (a, b) = (SERVER_ADDR.to_string(), SERVER_ADDR_2.to_string());
    let (p, alt) = (PORT.to_string(), OTHER_PORT.to_string());
    let mut s = Server::spawn(
        lab,
        "turnserver",
        &[
            "turnserver",
            "-c",
            &conf,
            "--stun-only",
            "--no-auth",
            "--listening-ip",
            &a,
            "--listening-ip",
            &b,
            "--listening-port",
            &p,
            "--alt-listening-port",
            &alt,
            "--no-cli",
            "--no-tcp",
            "--no-tls",
            "--no-dtls",
            "--db",
            &db,
            "--pidfile",
            &pid,
            "--log-file",
            "stdout",
        ],
        &dir.join("turnserver.log"),
    );
    s.wait_ready(lab);
    s
}

/// The detector on Inside, from one socket on a free port.
fn detect_inside(lab: &NatLab) -> NatReport {
    lab.run_in(Node::Inside, || {
        runtime().block_on(detect(
            server_addr(),
            (INSIDE_ADDR, 0).into(),
            Retransmit::QUICK,
        ))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("detection failed: {e}"))
}

fn expected(kind: NatKind) -> (Mapping, Filtering, NatType) {
    match kind {
        NatKind::EndpointIndependent => (
            Mapping::EndpointIndependent,
            Filtering::EndpointIndependent,
            NatType::FullCone,
        ),
        NatKind::AddressDependent => (
            Mapping::EndpointIndependent,
            Filtering::AddressDependent,
            NatType::RestrictedCone,
        ),
        NatKind::Symmetric => (
            Mapping::AddressAndPortDependent,
            Filtering::AddressAndPortDependent,
            NatType::Symmetric,
        ),
    }
}

fn check(kind: NatKind, r: &NatReport, against: &str) {
    let (mapping, filtering, nat_type) = expected(kind);
    let text = control::nat_detect::render(r);
    assert_eq!(
        r.mapping,
        Some(mapping),
        "{kind:?} against {against}:\n{text}"
    );
    assert_eq!(
        r.filtering,
        Some(filtering),
        "{kind:?} against {against}:\n{text}"
    );
    assert_eq!(r.nat_type, nat_type, "{kind:?} against {against}:\n{text}");
    assert_eq!(
        r.usable_for_remote_devices,
        kind != NatKind::Symmetric,
        "{text}"
    );
    assert_eq!(r.public.ip(), PUBLIC_ADDR, "{text}");
    assert_eq!(r.local.ip(), INSIDE_ADDR, "{text}");
    assert_eq!(
        r.other_address,
        (SERVER_ADDR_2, OTHER_PORT).into(),
        "{text}"
    );
    assert!(r.notes.is_empty(), "{text}");
}

/// coturn's `turnutils_natdiscovery -m -f` from Inside: its mapping and filtering verdicts.
fn natdiscovery(lab: &NatLab) -> String {
    lab.exec(
        Node::Inside,
        &[
            "timeout",
            "30",
            "turnutils_natdiscovery",
            "-m",
            "-f",
            "-p",
            &PORT.to_string(),
            &SERVER_ADDR.to_string(),
        ],
    )
    .unwrap_or_else(|e| {
        panic!("turnutils_natdiscovery (Debian package coturn; scripts/bootstrap.sh): {e:#}")
    })
}

/// What natdiscovery prints for a behaviour (coturn's wording).
fn natdiscovery_mapping(m: Mapping) -> &'static str {
    match m {
        Mapping::NoNat => "No NAT! (Endpoint Independent Mapping)",
        Mapping::EndpointIndependent => "NAT with Endpoint Independent Mapping!",
        Mapping::AddressDependent => "NAT with Address Dependent Mapping!",
        Mapping::AddressAndPortDependent => "NAT with Address and Port Dependent Mapping!",
    }
}

fn natdiscovery_filtering(f: Filtering) -> &'static str {
    match f {
        Filtering::EndpointIndependent => "NAT with Endpoint Independent Filtering!",
        Filtering::AddressDependent => "NAT with Address Dependent Filtering!",
        Filtering::AddressAndPortDependent => "NAT with Address and Port Dependent Filtering!",
    }
}

/// coturn's `turnutils_stunclient` from Inside: the reflexive address of its first answer.
/// Seeing OTHER-ADDRESS, it goes on with a request carrying RESPONSE-PORT, which our server
/// refuses (docs/stun.md), and then waits for good: it is stopped after 3 s (`timeout`'s
/// exit 124 is expected; the first answer came within milliseconds).
fn stunclient(lab: &NatLab) -> SocketAddr {
    let out = Command::new("ip")
        .args(["netns", "exec", lab.ns(Node::Inside)])
        .args(["timeout", "3", "turnutils_stunclient", "-p"])
        .arg(PORT.to_string())
        .arg(SERVER_ADDR.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 124)),
        "turnutils_stunclient (Debian package coturn; scripts/bootstrap.sh) failed ({}): \
         {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // "0: : IPv4. UDP reflexive addr: 198.51.100.1:40592"
    let at = text
        .find("reflexive addr: ")
        .unwrap_or_else(|| panic!("no mapped address in {text:?}"));
    let rest = &text[at + "reflexive addr: ".len()..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|_| panic!("{text:?}"))
}

fn against_homerelay(kind: NatKind) {
    require_root();
    let lab = NatLab::create(kind).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = homerelay(&lab, dir.path());
    let report = detect_inside(&lab);
    check(kind, &report, "homerelay");

    // coturn's clients through the same NAT: the mapped address, and natdiscovery's verdicts
    // agree with the detector's.
    assert_eq!(stunclient(&lab).ip(), PUBLIC_ADDR);
    let out = natdiscovery(&lab);
    let (mapping, filtering) = (report.mapping.unwrap(), report.filtering.unwrap());
    for words in [
        natdiscovery_mapping(mapping),
        natdiscovery_filtering(filtering),
    ] {
        assert!(
            out.contains(words),
            "{kind:?}: the detector found {mapping:?}, {filtering:?}; natdiscovery said:\n{out}\n\
             server log:\n{}",
            server.log()
        );
    }
}

fn against_coturn(kind: NatKind) {
    require_root();
    let lab = NatLab::create(kind).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = coturn(&lab, dir.path());
    let report = detect_inside(&lab);
    check(kind, &report, "coturn");
    assert!(
        report
            .software
            .as_deref()
            .is_some_and(|s| s.contains("Coturn")),
        "the answers came from coturn: {:?}\n{}",
        report.software,
        server.log()
    );
}

#[test]
fn full_cone_against_homerelay() {
    against_homerelay(NatKind::EndpointIndependent);
}

#[test]
fn restricted_cone_against_homerelay() {
    against_homerelay(NatKind::AddressDependent);
}

#[test]
fn symmetric_against_homerelay() {
    against_homerelay(NatKind::Symmetric);
}

#[test]
fn full_cone_against_coturn() {
    against_coturn(NatKind::EndpointIndependent);
}

#[test]
fn restricted_cone_against_coturn() {
    against_coturn(NatKind::AddressDependent);
}

#[test]
fn symmetric_against_coturn() {
    against_coturn(NatKind::Symmetric);
}

/// `homerelay nat-type` itself, from behind the NAT: its JSON report, and its clear refusal of
/// a server without RFC 5780 behaviour discovery.
#[test]
fn the_cli_prints_the_report_as_json() {
    require_root();
    let lab = NatLab::create(NatKind::AddressDependent).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _server = homerelay(&lab, dir.path());
    let bin = env!("CARGO_BIN_EXE_homerelay");
    let bind = format!("{INSIDE_ADDR}:5060");
    let out = lab
        .exec(
            Node::Inside,
            &[
                bin,
                "nat-type",
                "--server",
                &SERVER_ADDR.to_string(),
                "--bind",
                &bind,
                "--json",
            ],
        )
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(json["nat_type"], "restricted-cone", "{out}");
    assert_eq!(json["mapping"], "endpoint-independent", "{out}");
    assert_eq!(json["filtering"], "address-dependent", "{out}");
    assert_eq!(json["usable_for_remote_devices"], true, "{out}");
    assert_eq!(json["server"], server_addr().to_string(), "{out}");
    assert_eq!(json["local"], bind, "{out}");
    // Endpoint-independent mapping keeps the port (Linux NAT preserves it when it can).
    assert_eq!(json["public"], format!("{PUBLIC_ADDR}:5060"), "{out}");
    let tests: Vec<&str> = json["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["test"].as_str().unwrap())
        .collect();
    assert_eq!(
        tests,
        [
            "binding",
            "filtering-change-ip-and-port",
            "filtering-change-port",
            "mapping-other-ip"
        ],
        "{out}"
    );
    assert_eq!(json["tests"][1]["result"], "no-answer", "{out}");
    assert_eq!(json["tests"][2]["result"], "answered", "{out}");
    assert!(!json["caveats"].as_array().unwrap().is_empty(), "{out}");

    // The text report names the type and the caveat.
    let text = lab
        .exec(
            Node::Inside,
            &[bin, "nat-type", "--server", &SERVER_ADDR.to_string()],
        )
        .unwrap();
    assert!(text.contains("restricted-cone"), "{text}");
    assert!(text.contains("restricts outbound UDP"), "{text}");

    // A port nobody serves: a clear error and a non-zero exit. (A server that answers without
    // OTHER-ADDRESS is refused too: control::nat_detect's unit tests.)
    let silent = format!("{SERVER_ADDR}:3999");
    let e = lab
        .exec(Node::Inside, &[bin, "nat-type", "--server", &silent])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no answer from STUN server"), "{e}");
}
