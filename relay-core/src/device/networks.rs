//! Internal networks: whether a registration comes from inside the company or from the
//! Internet.
//!
//! Invariant: classification is by the source's canonical address — an IPv4-mapped IPv6
//! source (`::ffff:10.1.2.3`, as a dual-stack socket reports it) is the IPv4 address, and an
//! IPv4-mapped network in the configuration is the IPv4 network. An empty list makes every
//! source external, the safe default.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

/// Where a registration comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// From one of the configured internal networks.
    Internal,
    /// From anywhere else (the Internet, through the SBC).
    External,
}

/// A configured network that is not a network.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a network in CIDR notation (like 10.0.0.0/8 or fd00::/8)")]
pub struct NetworkParseError {
    /// The refused text.
    pub input: String,
}

/// The configured internal networks (IPv4 and IPv6 CIDR).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Networks {
    nets: Vec<IpNet>,
}

impl Networks {
    /// The given networks (host bits are cleared; IPv4-mapped ones become IPv4).
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Networks {
        Networks {
            nets: nets.into_iter().map(canonical_net).collect(),
        }
    }

    /// Parses networks from configuration; a bare address is a host network (`/32`, `/128`).
    pub fn parse<'a>(
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<Networks, NetworkParseError> {
        let nets = items
            .into_iter()
            .map(parse_net)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Networks::new(nets))
    }

    /// The networks, canonical.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether `source` is inside one of the networks.
    pub fn classify(&self, source: IpAddr) -> Origin {
        let source = source.to_canonical();
        if self.nets.iter().any(|n| n.contains(&source)) {
            Origin::Internal
        } else {
            Origin::External
        }
    }
}

impl FromStr for Networks {
    type Err = NetworkParseError;

    /// A comma- or blank-separated list, as in an environment variable.
    fn from_str(s: &str) -> Result<Networks, NetworkParseError> {
        Networks::parse(s.split([',', ' ', '\t', '\n']).filter(|t| !t.is_empty()))
    }
}

fn parse_net(text: &str) -> Result<IpNet, NetworkParseError> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| NetworkParseError {
            input: text.to_owned(),
        })
}

fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net.trunc());
    }
    net.trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets() -> Networks {
        "10.0.0.0/8, 192.168.17.0/24 fd12:3456::/32 ::ffff:172.16.0.0/108 198.51.100.7"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn table() {
        let n = nets();
        let cases = [
            ("10.1.2.3", Origin::Internal),
            ("10.255.255.255", Origin::Internal),
            ("11.0.0.1", Origin::External),
            ("192.168.17.200", Origin::Internal),
            ("192.168.18.1", Origin::External),
            ("::ffff:10.9.8.7", Origin::Internal),
            ("::ffff:11.9.8.7", Origin::External),
            ("172.16.5.5", Origin::Internal),
            ("172.32.0.1", Origin::External),
            ("fd12:3456::1", Origin::Internal),
            ("fd12:3457::1", Origin::External),
            ("198.51.100.7", Origin::Internal),
            ("198.51.100.8", Origin::External),
            ("2001:db8::1", Origin::External),
            ("::1", Origin::External),
        ];
        for (ip, want) in cases {
            let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
            assert_eq!(n.classify(ip), want, "{ip}");
        }
    }

    #[test]
    fn mapped_networks_become_ipv4() {
        let n = nets();
        assert!(
            n.nets()
                .contains(&"172.16.0.0/12".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert!(
            n.nets()
                .contains(&"198.51.100.7/32".parse().unwrap_or_else(|e| panic!("{e}")))
        );
    }

    #[test]
    fn empty_means_everything_is_external() {
        let n = Networks::default();
        assert_eq!(
            n.classify("10.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"))),
            Origin::External
        );
        assert_eq!("".parse::<Networks>(), Ok(Networks::default()));
    }

    #[test]
    fn bad_networks_are_refused() {
        for bad in ["10.0.0.0/33", "example.org", "10.0.0/8", "fd00::/129"] {
            let e = bad.parse::<Networks>().unwrap_err();
            assert!(e.to_string().contains("is not a network"), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn mapped_sources_classify_as_ipv4(a in proptest::array::uniform4(0u8..)) {
            let n = nets();
            let v4 = std::net::Ipv4Addr::from(a);
            proptest::prop_assert_eq!(
                n.classify(IpAddr::V4(v4)),
                n.classify(IpAddr::V6(v4.to_ipv6_mapped()))
            );
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<Networks>();
        }
    }
}
