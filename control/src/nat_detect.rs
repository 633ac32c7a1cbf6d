//! NAT type detection (`homerelay nat-type`, and `doctor`'s check): RFC 5780 behaviour
//! discovery against a STUN server that offers it (OTHER-ADDRESS, CHANGE-REQUEST), run from
//! one local UDP socket.
//!
//! The procedure and the classification are `relay_core::stun::nat`'s ([`Discovery`]: which
//! request next, what the answers mean); this module sends each request with
//! [`crate::stun_client::binding`] and waits. The invariant a reader must know: **every test
//! runs from the same socket, one after the other** — the mapping tests compare the public
//! address of that one socket towards several destinations, and two transactions on one socket
//! at once would read each other's answers.
//!
//! A filtering test whose answer the NAT drops waits the whole retransmission schedule
//! ([`Retransmit::QUICK`]: 2.75 s); a port-restricted or symmetric NAT costs two of those.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use relay_core::stun::client::Change;
use relay_core::stun::nat::{
    Discovery, DiscoveryError, Filtering, Mapping, NatType, Outcome, Probe,
};
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::stun_client::{self, Retransmit, StunClientError};

/// What the detection found (`homerelay nat-type --json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatReport {
    /// The server's primary address the tests ran against.
    pub server: SocketAddr,
    /// The server's OTHER-ADDRESS.
    pub other_address: SocketAddr,
    /// The server's SOFTWARE, if it said.
    pub software: Option<String>,
    /// The local socket's address as packets leave it.
    pub local: SocketAddr,
    /// The public address and port of the local socket towards the server (test I).
    pub public: SocketAddr,
    /// `None`: undetermined (see `notes`).
    #[serde(serialize_with = "ser_name")]
    pub mapping: Option<Mapping>,
    /// `None`: undetermined (see `notes`).
    #[serde(serialize_with = "ser_name")]
    pub filtering: Option<Filtering>,
    #[serde(serialize_with = "ser_name")]
    pub nat_type: NatType,
    /// One line for people about `nat_type`.
    pub description: &'static str,
    /// See [`NatType::usable_for_remote_devices`].
    pub usable_for_remote_devices: bool,
    /// Every test run, in order.
    pub tests: Vec<TestResult>,
    /// Why a behaviour is undetermined, or anything odd an answer showed.
    pub notes: Vec<String>,
    /// The limits of the result.
    pub caveats: Vec<&'static str>,
}

/// One Binding transaction of the detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestResult {
    /// The RFC 5780 test (`relay_core::stun::nat::TestId::name`).
    pub test: &'static str,
    /// Where the request went.
    pub to: SocketAddr,
    /// CHANGE-REQUEST: `none`, `port` or `ip-and-port`.
    pub change: &'static str,
    /// `answered`, `no-answer` or `failed`.
    pub result: &'static str,
    /// The mapped address of an answer.
    pub mapped: Option<SocketAddr>,
    /// Where an answer came from.
    pub from: Option<SocketAddr>,
    /// Why a test failed.
    pub error: Option<String>,
}

/// Why no report could be made.
#[derive(Debug, thiserror::Error)]
pub enum NatDetectError {
    #[error("binding the local UDP socket {bind}: {source}")]
    Bind {
        bind: SocketAddr,
        source: std::io::Error,
    },
    #[error("finding the local address towards {server}: {source}")]
    LocalAddress {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Discovery(#[from] DiscoveryError),
}

/// Names for the JSON report.
trait Named {
    fn word(&self) -> &'static str;
}
impl Named for Mapping {
    fn word(&self) -> &'static str {
        self.name()
    }
}
impl Named for Filtering {
    fn word(&self) -> &'static str {
        self.name()
    }
}
impl Named for NatType {
    fn word(&self) -> &'static str {
        self.name()
    }
}
impl<T: Named> Named for Option<T> {
    fn word(&self) -> &'static str {
        self.as_ref().map_or("unknown", Named::word)
    }
}

fn ser_name<T: Named, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.word())
}

fn change_name(c: Change) -> &'static str {
    match (c.ip, c.port) {
        (false, false) => "none",
        (false, true) => "port",
        (true, false) => "ip",
        (true, true) => "ip-and-port",
    }
}

/// Runs RFC 5780 NAT behaviour discovery against the STUN server `server` (its primary
/// address) from one UDP socket bound to `bind` (port 0: any), each test with `retransmit`.
///
/// Fails when the server does not answer, answers without OTHER-ADDRESS ("does not offer RFC
/// 5780 behaviour discovery") or names an unusable one; tests after the first that fail or
/// get no answer are in the report.
pub async fn detect(
    server: SocketAddr,
    bind: SocketAddr,
    retransmit: Retransmit,
) -> Result<NatReport, NatDetectError> {
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|source| NatDetectError::Bind { bind, source })?;
    let local = local_address(&socket, server).await?;
    let mut discovery = Discovery::new(server, local);
    let mut software = None;
    while let Some(probe) = discovery.next_probe() {
        let outcome = match stun_client::binding(&socket, probe.to, probe.change, retransmit).await
        {
            Ok(answer) => {
                if software.is_none() {
                    software = answer.response.software.clone();
                }
                Outcome::Answered {
                    mapped: answer.response.mapped,
                    from: answer.from,
                    other_address: answer.response.other_address,
                }
            }
            Err(StunClientError::Timeout { .. }) => Outcome::NoAnswer,
            Err(e) => Outcome::Failed(e.to_string()),
        };
        discovery.record(probe.test, outcome)?;
    }
    let c = discovery.finish()?;
    Ok(NatReport {
        server,
        other_address: c.other_address,
        software,
        local,
        public: c.public,
        mapping: c.mapping,
        filtering: c.filtering,
        nat_type: c.nat_type,
        description: c.nat_type.describe(),
        usable_for_remote_devices: c.nat_type.usable_for_remote_devices(),
        tests: discovery
            .log()
            .iter()
            .map(|(p, o)| test_result(p, o))
            .collect(),
        notes: c.notes,
        caveats: c.caveats,
    })
}

fn test_result(p: &Probe, o: &Outcome) -> TestResult {
    let (result, mapped, from, error) = match o {
        Outcome::Answered { mapped, from, .. } => ("answered", Some(*mapped), Some(*from), None),
        Outcome::NoAnswer => ("no-answer", None, None, None),
        Outcome::Failed(e) => ("failed", None, None, Some(e.clone())),
    };
    TestResult {
        test: p.test.name(),
        to: p.to,
        change: change_name(p.change),
        result,
        mapped,
        from,
        error,
    }
}

/// The socket's address as its packets to `server` leave it: a wildcard bind is resolved to
/// the source address the routing table picks (a connected throw-away socket; nothing sent).
async fn local_address(
    socket: &UdpSocket,
    server: SocketAddr,
) -> Result<SocketAddr, NatDetectError> {
    let err = |source| NatDetectError::LocalAddress { server, source };
    let bound = socket.local_addr().map_err(err)?;
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let any: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = UdpSocket::bind(any).await.map_err(err)?;
    probe.connect(server).await.map_err(err)?;
    let ip: IpAddr = probe.local_addr().map_err(err)?.ip();
    Ok(SocketAddr::new(ip, bound.port()))
}

/// `homerelay nat-type`: the NAT type between this host and the Internet.
#[derive(Debug, clap::Args)]
pub struct NatTypeArgs {
    /// The STUN server, HOST[:PORT] (port 3478 when absent). It must offer RFC 5780 behaviour
    /// discovery: a second IP address and port (OTHER-ADDRESS) and CHANGE-REQUEST — homerelay's
    /// own with `[stun] other_address`, or coturn with two listening addresses.
    #[arg(long)]
    pub server: String,
    /// The local UDP address to test from, IP:PORT (default: any address, a free port). Test
    /// the port the relay uses to see the NAT's behaviour for it.
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `homerelay nat-type`: prints the report on stdout.
pub async fn run(args: NatTypeArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let server = stun_client::resolve(&args.server, args.bind)
        .await
        .with_context(|| format!("resolving the STUN server {}", args.server))?;
    let bind = args.bind.unwrap_or_else(|| match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    });
    let report = detect(server, bind, Retransmit::QUICK)
        .await
        .with_context(|| format!("NAT type detection against {}", args.server))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// The report for people.
pub fn render(r: &NatReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "NAT type:  {} ({})", r.nat_type.name(), r.description);
    let _ = writeln!(
        out,
        "remote devices: {}",
        if r.usable_for_remote_devices {
            "work behind this NAT"
        } else if r.nat_type == NatType::Symmetric {
            "do NOT work behind a symmetric NAT (where it cannot be changed, a VPN is the \
             alternative)"
        } else {
            "not shown to work (the type is unknown)"
        }
    );
    let _ = writeln!(out, "public:    {} (local {})", r.public, r.local);
    let _ = writeln!(out, "mapping:   {}", r.mapping.word());
    let _ = writeln!(out, "filtering: {}", r.filtering.word());
    let _ = writeln!(
        out,
        "server:    {} (other address {}{})",
        r.server,
        r.other_address,
        r.software
            .as_deref()
            .map(|s| format!(", software {s}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "tests:");
    for t in &r.tests {
        let what = match (t.result, t.mapped, t.from, &t.error) {
            ("answered", Some(m), Some(f), _) => format!("mapped {m}, from {f}"),
            (_, _, _, Some(e)) => format!("failed: {e}"),
            _ => "no answer".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {:<29} to {:<22} change {:<12} {what}",
            t.test,
            t.to.to_string(),
            t.change
        );
    }
    for n in &r.notes {
        let _ = writeln!(out, "note: {n}");
    }
    for c in &r.caveats {
        let _ = writeln!(out, "caveat: {c}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::stun::{Addresses, Decision, Transport, answer};

    /// A minimal RFC 5780 server on loopback made of relay_core::stun::answer: four sockets
    /// (two IPs × two ports); `other: false` answers without a second address.
    async fn serve(other: bool) -> SocketAddr {
        let (port, sockets) = loop {
            let first = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = first.local_addr().unwrap().port();
            if port == u16::MAX {
                continue;
            }
            let mut sockets = vec![std::sync::Arc::new(first)];
            for (ip, p) in [
                ("127.0.0.1", port + 1),
                ("127.0.0.2", port),
                ("127.0.0.2", port + 1),
            ] {
                if let Ok(s) = UdpSocket::bind(format!("{ip}:{p}")).await {
                    sockets.push(std::sync::Arc::new(s));
                }
            }
            if sockets.len() == 4 {
                break (port, sockets);
            }
        };
        let primary: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let second: SocketAddr = format!("127.0.0.2:{}", port + 1).parse().unwrap();
        let addresses = Addresses {
            primary,
            other: other.then_some(second),
        };
        let all = sockets.clone();
        for s in sockets {
            let all = all.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                loop {
                    let Ok((n, src)) = s.recv_from(&mut buf).await else {
                        return;
                    };
                    let local = s.local_addr().unwrap();
                    if let Decision::Respond { bytes, from } =
                        answer(&buf[..n], src, local, addresses, Transport::Udp)
                    {
                        let out = all
                            .iter()
                            .find(|o| o.local_addr().unwrap() == from)
                            .unwrap();
                        let _ = out.send_to(&bytes, src).await;
                    }
                }
            });
        }
        primary
    }

    #[tokio::test]
    async fn no_nat_on_loopback_and_json() {
        let server = serve(true).await;
        let r = detect(server, "127.0.0.1:0".parse().unwrap(), Retransmit::QUICK)
            .await
            .unwrap();
        assert_eq!(r.nat_type, NatType::OpenInternet, "{}", render(&r));
        assert_eq!(r.public, r.local);
        assert_eq!(r.mapping, Some(Mapping::NoNat));
        assert_eq!(r.tests.len(), 2, "binding and one filtering test");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["nat_type"], "open-internet");
        assert_eq!(json["mapping"], "no-nat");
        assert_eq!(json["filtering"], "endpoint-independent");
        assert_eq!(json["usable_for_remote_devices"], true);
        assert_eq!(json["tests"][1]["change"], "ip-and-port");
        assert_eq!(json["tests"][1]["from"], r.other_address.to_string());
        // A wildcard bind is resolved to the address packets leave from.
        let r = detect(server, "0.0.0.0:0".parse().unwrap(), Retransmit::QUICK)
            .await
            .unwrap();
        assert_eq!(r.local.ip().to_string(), "127.0.0.1");
        assert_eq!(r.nat_type, NatType::OpenInternet);
    }

    #[tokio::test]
    async fn a_server_without_a_second_address_is_refused_clearly() {
        let server = serve(false).await;
        let e = detect(server, "127.0.0.1:0".parse().unwrap(), Retransmit::QUICK)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "server {server} does not offer RFC 5780 behaviour discovery"
            )),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_bad_bind_address_is_an_error() {
        let e = detect(
            "127.0.0.1:3478".parse().unwrap(),
            "192.0.2.77:0".parse().unwrap(),
            Retransmit::QUICK,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, NatDetectError::Bind { .. }), "{e}");
    }
}
