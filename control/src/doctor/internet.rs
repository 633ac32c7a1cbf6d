//! What the Internet sees of this site: the configured STUN servers reachable from the relay's
//! internet address, the public address known (the running daemon's, else the servers'
//! answer), and the NAT's behaviour (RFC 5780, with `nat_detect`) where a server offers it.
//! Each verdict is a function of what was measured, unit-tested below; [`checks`] measures.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use relay_core::stun::client::Change;
use relay_core::stun::nat::NatType;
use tokio::net::UdpSocket;

use super::Check;
use crate::config::Config;
use crate::nat_detect::{self, NatDetectError, NatReport};
use crate::stun_client::{self, Retransmit};
use proto::v1 as pb;

/// Which configured server a probe went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Itsp,
    Configured,
}

impl Role {
    fn key(self) -> &'static str {
        match self {
            Role::Itsp => "public_address.itsp_stun_server",
            Role::Configured => "public_address.stun_server",
        }
    }
}

/// One configured server asked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub role: Role,
    /// As configured.
    pub name: String,
    /// Resolved.
    pub server: Option<SocketAddr>,
    /// The mapped address it answered, or the error.
    pub result: Result<(SocketAddr, Duration), String>,
}

/// `stun.reachable` from the probes of the configured servers. `internet_address`: what is
/// handed out when no server is configured.
pub fn reachable(
    probes: &[Probe],
    static_address: Option<Ipv4Addr>,
    internet_address: Option<Ipv4Addr>,
) -> Check {
    const NAME: &str = "stun.reachable";
    if let Some(s) = static_address {
        return Check::pass(
            NAME,
            format!("not needed: public_address.static_address = {s}"),
        );
    }
    if probes.is_empty() {
        return match internet_address {
            Some(a) if is_private(a) => Check::warn(
                NAME,
                format!(
                    "no STUN server configured and relay.internet_address {a} is a private \
                     address: remote devices are told to send media there"
                ),
                "set public_address.itsp_stun_server (or stun_server), or \
                 public_address.static_address (docs/public-address.md)",
            ),
            Some(a) => Check::pass(
                NAME,
                format!(
                    "no STUN server configured: relay.internet_address {a} is handed out (no NAT in front of the relay)"
                ),
            ),
            None => Check::warn(
                NAME,
                "no STUN server configured and no relay.internet_address: channels name no \
                 public address",
                "set relay.internet_address, and public_address.itsp_stun_server when a NAT is \
                 in front of the relay",
            ),
        };
    }
    let line = |p: &Probe| match &p.result {
        Ok((mapped, rtt)) => format!(
            "{} ({}) answered in {} ms: {mapped}",
            p.name,
            p.server.map_or_else(String::new, |s| s.to_string()),
            rtt.as_millis()
        ),
        Err(e) => format!("{}: {e}", p.name),
    };
    let answered = probes.iter().filter(|p| p.result.is_ok()).count();
    let detail = probes.iter().map(line).collect::<Vec<_>>().join("; ");
    if answered == probes.len() {
        Check::pass(NAME, detail)
    } else if answered > 0 {
        let silent: Vec<&str> = probes
            .iter()
            .filter(|p| p.result.is_err())
            .map(|p| p.role.key())
            .collect();
        Check::warn(
            NAME,
            detail,
            format!(
                "check {} (name, port, and that the company firewall lets UDP out to it)",
                silent.join(", ")
            ),
        )
    } else {
        Check::fail(
            NAME,
            detail,
            "check the STUN server names and ports in [public_address], that they resolve on \
             this host and that the company firewall lets UDP out to them; or set \
             public_address.static_address",
        )
    }
}

fn is_private(a: Ipv4Addr) -> bool {
    a.is_private()
        || a.is_loopback()
        || a.is_link_local()
        || (a.octets()[0] == 100 && a.octets()[1] & 0xc0 == 64)
}

/// `public_address`: what the running daemon knows (`daemon`), else what the probes saw.
pub fn public_address(
    daemon: Result<&pb::PublicAddressStatus, &str>,
    probes: &[Probe],
    config: &Config,
) -> Check {
    const NAME: &str = "public_address";
    match daemon {
        Ok(s) if s.address.is_empty() => Check::fail(
            NAME,
            format!(
                "the relay knows no public address{}",
                if s.last_error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", s.last_error)
                }
            ),
            "make a STUN server in [public_address] reachable (see stun.reachable), or set \
             public_address.static_address",
        ),
        Ok(s) if s.stale => Check::warn(
            NAME,
            format!(
                "{} (last known; the last refresh got no answer: {})",
                s.address, s.last_error
            ),
            "make a STUN server in [public_address] reachable (see stun.reachable)",
        ),
        Ok(s) => {
            let from = if s.server.is_empty() {
                String::new()
            } else {
                format!(" from {}", s.server)
            };
            Check::pass(
                NAME,
                format!(
                    "{}{from} (the running relay's; {} changes since its start)",
                    s.address, s.changes
                ),
            )
        }
        Err(why) => {
            let seen: Vec<IpAddr> = probes
                .iter()
                .filter_map(|p| p.result.as_ref().ok().map(|(m, _)| m.ip()))
                .collect();
            let pa = &config.public_address;
            if let Some(s) = pa.static_address {
                Check::pass(NAME, format!("{s} (static; the relay does not run: {why})"))
            } else if let Some(first) = seen.first() {
                if seen.iter().any(|ip| ip != first) {
                    Check::warn(
                        NAME,
                        format!(
                            "the STUN servers see different addresses ({}): several uplinks \
                             or a NAT with a pool of addresses",
                            seen.iter()
                                .map(IpAddr::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        "make the relay's traffic leave through one public address, or set \
                         public_address.static_address",
                    )
                } else {
                    Check::pass(
                        NAME,
                        format!(
                            "{first} as the STUN servers see it (the relay does not run: {why})"
                        ),
                    )
                }
            } else if !pa.discovery() {
                match config.relay.internet_address {
                    Some(a) => {
                        Check::pass(NAME, format!("{a} (relay.internet_address, no discovery)"))
                    }
                    None => Check::warn(
                        NAME,
                        "unknown: no relay.internet_address and no discovery",
                        "set relay.internet_address",
                    ),
                }
            } else {
                Check::fail(
                    NAME,
                    format!("unknown: no STUN server answered and the relay does not run ({why})"),
                    "make a STUN server in [public_address] reachable (see stun.reachable)",
                )
            }
        }
    }
}

/// `nat.type` from a detection against the first server that answered.
pub fn nat_type(result: Option<Result<&NatReport, &NatDetectError>>) -> Check {
    const NAME: &str = "nat.type";
    let Some(result) = result else {
        return Check::pass(
            NAME,
            "not tested: no STUN server configured or none answered",
        );
    };
    match result {
        Err(NatDetectError::Discovery(e)) => Check::warn(
            NAME,
            format!("not determined: {e}"),
            "to know the NAT's behaviour, run homerelay nat-type --server HOST against a STUN \
             server with two addresses (RFC 5780, e.g. homerelay with stun.other_address)",
        ),
        Err(e) => Check::warn(
            NAME,
            format!("not determined: {e}"),
            "check public_address.local_address / relay.internet_address",
        ),
        Ok(r) => {
            let detail = format!(
                "{} ({}; mapping {}, filtering {}) towards {}",
                r.nat_type.name(),
                r.description,
                r.mapping.map_or("unknown", |m| m.name()),
                r.filtering.map_or("unknown", |f| f.name()),
                r.server
            );
            if r.nat_type == NatType::Symmetric {
                Check::fail(
                    NAME,
                    format!(
                        "{detail}: unusable for remote devices unless every port is forwarded \
                         ({})",
                        relay_core::stun::nat::RESTRICTED_OUTBOUND_CAVEAT
                    ),
                    "forward the relay's ports on the router (homerelay router-config) and turn \
                     off port randomisation for the relay host, or use a router with \
                     endpoint-independent mapping",
                )
            } else if r.usable_for_remote_devices {
                Check::pass(NAME, detail)
            } else {
                Check::warn(
                    NAME,
                    detail,
                    "repeat with homerelay nat-type --server HOST; see the caveats it prints",
                )
            }
        }
    }
}

/// The address probes are sent from: public_address.local_address, else
/// relay.internet_address, else any.
fn local(config: &Config) -> SocketAddr {
    let ip = config
        .public_address
        .local_address
        .or(config.relay.internet_address)
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    SocketAddr::from((ip, 0))
}

async fn probe(role: Role, name: &str, local: SocketAddr) -> Probe {
    let server = match tokio::time::timeout(
        Duration::from_secs(3),
        stun_client::resolve(name, Some(local)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Probe {
                role,
                name: name.to_string(),
                server: None,
                result: Err(format!("cannot resolve: {e}")),
            };
        }
        Err(_) => {
            return Probe {
                role,
                name: name.to_string(),
                server: None,
                result: Err("name resolution took over 3 s".into()),
            };
        }
    };
    let result = match UdpSocket::bind(local).await {
        Err(e) => Err(format!("binding {local}: {e}")),
        Ok(socket) => {
            match stun_client::binding(&socket, server, Change::NONE, Retransmit::QUICK).await {
                Ok(a) => Ok((a.response.mapped, a.elapsed)),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    Probe {
        role,
        name: name.to_string(),
        server: Some(server),
        result,
    }
}

/// Every check of this module; `daemon` is the running relay's public address status or why
/// there is none.
pub async fn checks(
    config: &Config,
    daemon: Result<pb::PublicAddressStatus, String>,
) -> Vec<Check> {
    let pa = &config.public_address;
    let from = local(config);
    let mut probes = Vec::new();
    if pa.static_address.is_none() {
        for (role, name) in [
            (Role::Itsp, &pa.itsp_stun_server),
            (Role::Configured, &pa.stun_server),
        ] {
            if let Some(name) = name {
                probes.push(probe(role, name, from).await);
            }
        }
    }
    let mut out = vec![
        reachable(&probes, pa.static_address, config.relay.internet_address),
        public_address(daemon.as_ref().map_err(String::as_str), &probes, config),
    ];
    let target = probes
        .iter()
        .find(|p| p.result.is_ok())
        .and_then(|p| p.server);
    let report = match target {
        Some(server) => Some(nat_detect::detect(server, from, Retransmit::QUICK).await),
        None => None,
    };
    out.push(nat_type(report.as_ref().map(Result::as_ref)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn probe_ok(role: Role, mapped: &str) -> Probe {
        Probe {
            role,
            name: "stun.example.test".into(),
            server: Some("192.0.2.50:3478".parse().unwrap()),
            result: Ok((mapped.parse().unwrap(), Duration::from_millis(12))),
        }
    }

    fn probe_err(role: Role) -> Probe {
        Probe {
            role,
            name: "stun2.example.test".into(),
            server: Some("192.0.2.51:3478".parse().unwrap()),
            result: Err("no answer".into()),
        }
    }

    #[test]
    fn reachability_verdicts() {
        let ok = probe_ok(Role::Itsp, "198.51.100.1:40000");
        let bad = probe_err(Role::Configured);
        assert_eq!(
            reachable(std::slice::from_ref(&ok), None, None).status,
            Status::Pass
        );
        let c = reachable(&[ok, bad.clone()], None, None);
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().contains("public_address.stun_server"));
        let c = reachable(&[bad], None, None);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("no answer"), "{}", c.detail);
        // Nothing configured: fine for a public internet address, not for a private one.
        let public = Some(Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(reachable(&[], None, public).status, Status::Pass);
        let c = reachable(&[], None, Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(c.status, Status::Warn);
        assert_eq!(
            reachable(&[], None, Some(Ipv4Addr::new(100, 64, 0, 1))).status,
            Status::Warn,
            "carrier-grade NAT space is private too"
        );
        assert_eq!(
            reachable(&[], Some(Ipv4Addr::new(198, 51, 100, 9)), None).status,
            Status::Pass
        );
    }

    fn status(address: &str, stale: bool) -> pb::PublicAddressStatus {
        pb::PublicAddressStatus {
            address: address.into(),
            stale,
            server: "stun.itsp.test".into(),
            last_error: if stale {
                "no answer".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    #[test]
    fn public_address_verdicts() {
        let mut config = Config::default();
        let c = public_address(Ok(&status("198.51.100.1", false)), &[], &config);
        assert_eq!(c.status, Status::Pass);
        assert!(c.detail.contains("198.51.100.1"));
        assert_eq!(
            public_address(Ok(&status("198.51.100.1", true)), &[], &config).status,
            Status::Warn
        );
        assert_eq!(
            public_address(Ok(&status("", true)), &[], &config).status,
            Status::Fail
        );
        // Without the daemon: the probes' answers.
        config.public_address.itsp_stun_server = Some("stun.itsp.test".into());
        let one = probe_ok(Role::Itsp, "198.51.100.1:40000");
        let c = public_address(Err("not running"), std::slice::from_ref(&one), &config);
        assert_eq!(c.status, Status::Pass);
        let other = probe_ok(Role::Configured, "198.51.100.2:40000");
        assert_eq!(
            public_address(Err("not running"), &[one, other], &config).status,
            Status::Warn
        );
        assert_eq!(
            public_address(Err("not running"), &[probe_err(Role::Itsp)], &config).status,
            Status::Fail
        );
        // No discovery: the internet address.
        let mut plain = Config::default();
        plain.relay.internet_address = Some(Ipv4Addr::new(198, 51, 100, 7));
        let c = public_address(Err("not running"), &[], &plain);
        assert_eq!(c.status, Status::Pass);
        assert!(c.detail.contains("198.51.100.7"));
    }

    #[test]
    fn nat_type_verdicts_without_a_report() {
        assert_eq!(nat_type(None).status, Status::Pass);
        let e = NatDetectError::Discovery(relay_core::stun::nat::DiscoveryError::NoOtherAddress {
            server: "192.0.2.50:3478".parse().unwrap(),
        });
        let c = nat_type(Some(Err(&e)));
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("RFC 5780"), "{}", c.detail);
    }
}
