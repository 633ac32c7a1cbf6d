//! `homerelay router-config`: the port forwarding the company router needs for a configuration.
//!
//! From a [`Config`] (its layout and `[registration]` listeners), the relay host's address on
//! the router's LAN side and the address of the PBX's deployment service, [`plan`] lists every
//! forward: phones 4060 → 4062 (plain TCP) and 4061 → 4063 (TLS), apps 8802 (HTTPS), device
//! software deployment 18443 and 8804, and the layout's UDP media range (RTP and RTCP, same
//! ports outside and inside). [`table`] renders it for a person, [`nft`] as an `nft -f` file
//! for a Linux router, [`json`] for tools.
//!
//! Which rows the rules carry: the table always lists every forward so an operator sees the
//! whole picture, and marks those that are off in this configuration (a registration listener
//! that is not configured, deployment when switched off); the nft file holds only the enabled
//! ones plus media, so the router opens nothing that nobody listens on.
//!
//! No masquerade: the forwarded traffic keeps its source address. The relay classifies a
//! device as external by the source address it registers from and latches media to the source
//! it sees; a router that rewrote the source to its own LAN address would make every remote
//! device look internal and every call look like one from the router.
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::json;

use crate::config::{Config, ConfigError, LayoutName, Overrides};

/// The router's public port of plain phone registration (forwarded to the relay's 4062).
pub const PHONE_PUBLIC_PORT: u16 = 4060;
/// The router's public port of TLS phone registration (forwarded to the relay's 4063).
pub const PHONE_TLS_PUBLIC_PORT: u16 = 4061;
/// The apps' HTTPS port, the same outside and inside.
pub const APPS_PUBLIC_PORT: u16 = 8802;
/// Device software deployment (DLI), the same outside and inside.
pub const DEPLOYMENT_PORT: u16 = 18443;
/// The deployment's HTTPS helper connection, the same outside and inside.
pub const DEPLOYMENT_HELPER_PORT: u16 = 8804;
/// The registration ports a listener that is not configured would have.
const DEFAULT_PHONE_PORT: u16 = 4062;
const DEFAULT_PHONE_TLS_PORT: u16 = 4063;

/// The WAN interface name written when none is given: a placeholder to replace.
pub const PLACEHOLDER_WAN: &str = "wan0";

/// A transport protocol of a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The name in the table and in nft rules.
    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// An inclusive port range (one port when both ends are equal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    /// One port.
    pub const fn one(port: u16) -> Ports {
        Ports {
            first: port,
            last: port,
        }
    }
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One port forward of the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub proto: Proto,
    /// The router's public port(s).
    pub public: Ports,
    /// Where the router sends it.
    pub to: Ipv4Addr,
    /// The port(s) there.
    pub to_ports: Ports,
    /// What it is for.
    pub purpose: &'static str,
    /// Whether this configuration uses it; `None` when it does, else why not.
    pub off: Option<&'static str>,
}

/// Every forward of one configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The layout's name (`x`, `s`, `custom`).
    pub layout: &'static str,
    /// The relay host's address on the router's LAN side.
    pub relay: Ipv4Addr,
    pub forwards: Vec<Forward>,
}

/// What to build the plan from besides the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The relay host's address the router forwards to.
    pub relay: Ipv4Addr,
    /// The PBX's deployment service (18443, 8804).
    pub deployment: Ipv4Addr,
    /// Whether device software deployment to remote phones is switched on.
    pub deployment_enabled: bool,
}

/// The forwards `config` needs. Fails when an address cannot be forwarded to, or when a
/// listener is bound to a specific address other than the relay's.
pub fn plan(config: &Config, target: Target) -> Result<Plan, ConfigError> {
    for (key, addr) in [
        ("--relay-address", target.relay),
        ("--deployment-address", target.deployment),
    ] {
        if addr.is_unspecified() || addr.is_loopback() || addr.is_broadcast() || addr.is_multicast()
        {
            return Err(ConfigError {
                key: key.to_owned(),
                message: format!("{addr} is not an address a router can forward to"),
            });
        }
    }
    let (layout, name) = config.layout()?;
    let r = &config.registration;
    let listener = |key: &'static str,
                    addr: Option<SocketAddr>,
                    default: u16|
     -> Result<(u16, Option<&'static str>), ConfigError> {
        match addr {
            None => Ok((default, Some("listener off in this config"))),
            Some(a) if a.ip().is_unspecified() || a.ip() == target.relay => Ok((a.port(), None)),
            Some(a) => Err(ConfigError {
                key: format!("registration.{key}"),
                message: format!(
                    "{a} is bound to another address than the relay address {}: forwarding to {} \
                     would not reach it",
                    target.relay, target.relay
                ),
            }),
        }
    };
    let (plain, plain_off) = listener("listen", r.listen, DEFAULT_PHONE_PORT)?;
    let (tls, tls_off) = listener("tls_listen", r.tls_listen, DEFAULT_PHONE_TLS_PORT)?;
    let (https, https_off) = listener("https_listen", r.https_listen, APPS_PUBLIC_PORT)?;
    let deployment_off = (!target.deployment_enabled).then_some("deployment switched off");
    let tcp = |public: u16, to: Ipv4Addr, port: u16, purpose, off| Forward {
        proto: Proto::Tcp,
        public: Ports::one(public),
        to,
        to_ports: Ports::one(port),
        purpose,
        off,
    };
    let media = Ports {
        first: layout.first_port(),
        last: layout.last_port(),
    };
    Ok(Plan {
        layout: name.name(),
        relay: target.relay,
        forwards: vec![
            tcp(
                PHONE_PUBLIC_PORT,
                target.relay,
                plain,
                "phones: registration (plain TCP)",
                plain_off,
            ),
            tcp(
                PHONE_TLS_PUBLIC_PORT,
                target.relay,
                tls,
                "phones: registration (TLS)",
                tls_off,
            ),
            tcp(
                APPS_PUBLIC_PORT,
                target.relay,
                https,
                "apps: registration (HTTPS)",
                https_off,
            ),
            tcp(
                DEPLOYMENT_PORT,
                target.deployment,
                DEPLOYMENT_PORT,
                "device software deployment (DLI)",
                deployment_off,
            ),
            tcp(
                DEPLOYMENT_HELPER_PORT,
                target.deployment,
                DEPLOYMENT_HELPER_PORT,
                "device software deployment (HTTPS helper)",
                deployment_off,
            ),
            Forward {
                proto: Proto::Udp,
                public: media,
                to: target.relay,
                to_ports: media,
                purpose: "media: RTP (even) and RTCP (odd) of every channel",
                off: None,
            },
        ],
    })
}

/// The plan as a table for a person.
pub fn table(plan: &Plan) -> String {
    let header = ["PROTO", "PUBLIC PORT", "FORWARD TO", "FOR", "STATE"];
    let rows: Vec<[String; 5]> = plan
        .forwards
        .iter()
        .map(|f| {
            [
                f.proto.name().to_owned(),
                f.public.to_string(),
                format!("{}:{}", f.to, f.to_ports),
                f.purpose.to_owned(),
                f.off
                    .map_or_else(|| "on".to_owned(), |why| format!("off ({why})")),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    let _ = writeln!(
        out,
        "\nLayout {}. Do not masquerade (SNAT) the forwarded traffic: the relay must see each \
         device's own public address.",
        plan.layout
    );
    out
}

/// The enabled forwards as an `nft -f` file for a Linux router whose Internet side is
/// `wan_iface`.
pub fn nft(plan: &Plan, wan_iface: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "#!/usr/sbin/nft -f\n\
         # homerelay router-config: port forwarding to the relay {relay} (layout {layout}).\n\
         # Apply on the company router with `nft -f FILE`.",
        relay = plan.relay,
        layout = plan.layout,
    );
    if wan_iface == PLACEHOLDER_WAN {
        let _ = writeln!(
            out,
            "# \"{PLACEHOLDER_WAN}\" is a PLACEHOLDER: replace it with the router's Internet \
             interface (or pass --wan-iface)."
        );
    }
    out.push_str(
        "#\n\
         # There is deliberately no masquerade/SNAT here: the relay must see each device's own\n\
         # public source address to classify it as external and to latch its media. Replies go\n\
         # back through this router (the relay's default route), whose connection tracking\n\
         # undoes the DNAT.\n\
         # If the router's own filter drops forwarded traffic, let the forwarded connections\n\
         # through there, e.g. `ct status dnat accept` in its forward chain.\n",
    );
    let skipped: Vec<&Forward> = plan.forwards.iter().filter(|f| f.off.is_some()).collect();
    for f in &skipped {
        let _ = writeln!(
            out,
            "# Not forwarded ({}): {} {} ({}).",
            f.off.unwrap_or_default(),
            f.proto.name(),
            f.public,
            f.purpose
        );
    }
    let wan = wan_iface.replace('"', "");
    // Create-then-delete makes the file replace its own table when applied again.
    out.push_str(
        "\n# Applying this file again replaces the table.\n\
         table ip homerelay_fwd\n\
         delete table ip homerelay_fwd\n\
         table ip homerelay_fwd {\n\
         \tchain prerouting {\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n",
    );
    for f in plan.forwards.iter().filter(|f| f.off.is_none()) {
        let to = if f.public == f.to_ports {
            f.to.to_string()
        } else {
            format!("{}:{}", f.to, f.to_ports)
        };
        let _ = writeln!(
            out,
            "\t\tiifname \"{wan}\" {} dport {} dnat to {to} comment \"{}\"",
            f.proto.name(),
            f.public,
            f.purpose
        );
    }
    out.push_str("\t}\n}\n");
    out
}

/// The plan as JSON.
pub fn json(plan: &Plan) -> serde_json::Value {
    let forwards: Vec<serde_json::Value> = plan
        .forwards
        .iter()
        .map(|f| {
            json!({
                "protocol": f.proto.name(),
                "public_ports": {"first": f.public.first, "last": f.public.last},
                "to_address": f.to.to_string(),
                "to_ports": {"first": f.to_ports.first, "last": f.to_ports.last},
                "purpose": f.purpose,
                "enabled": f.off.is_none(),
                "off_reason": f.off,
            })
        })
        .collect();
    json!({
        "layout": plan.layout,
        "relay_address": plan.relay.to_string(),
        "masquerade": false,
        "forwards": forwards,
    })
}

/// The output format of `homerelay router-config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for a person.
    Table,
    /// An `nft -f` file for a Linux router.
    Nft,
    /// JSON.
    Json,
}

/// `homerelay router-config`.
#[derive(Debug, clap::Args)]
pub struct RouterConfigArgs {
    /// Configuration file (the one of `homerelay run`). Without one: the built-in defaults.
    #[arg(long, env = "HOMERELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Port layout of the channel pool, as for `homerelay run`.
    #[arg(long, value_enum)]
    pub layout: Option<LayoutName>,
    /// Custom relay port range FIRST-LAST, as for `homerelay run`.
    #[arg(long)]
    pub ports: Option<String>,
    /// The relay host's address the router forwards to (default: relay.internet_address).
    #[arg(long)]
    pub relay_address: Option<Ipv4Addr>,
    /// The PBX's deployment service (18443, 8804) (default: the relay address).
    #[arg(long)]
    pub deployment_address: Option<Ipv4Addr>,
    /// Device software deployment to remote phones is off: 18443 and 8804 are not forwarded.
    #[arg(long)]
    pub no_deployment: bool,
    /// The router's Internet interface in the nft rules (default: a placeholder, "wan0").
    #[arg(long, default_value = PLACEHOLDER_WAN)]
    pub wan_iface: String,
    /// Output: table, nft (an `nft -f` file) or json.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Prints the router configuration `args` ask for on stdout.
pub fn run(args: RouterConfigArgs) -> anyhow::Result<()> {
    print!("{}", render(&args)?);
    Ok(())
}

/// What `homerelay router-config` prints.
pub fn render(args: &RouterConfigArgs) -> anyhow::Result<String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.apply(Overrides {
        layout: args.layout,
        ports: args.ports.clone(),
        ..Overrides::default()
    })?;
    let relay = args
        .relay_address
        .or(config.relay.internet_address)
        .context(
            "no relay address: give the relay host's address the router forwards to with \
             --relay-address IP (or set relay.internet_address in the config)",
        )?;
    let p = plan(
        &config,
        Target {
            relay,
            deployment: args.deployment_address.unwrap_or(relay),
            deployment_enabled: !args.no_deployment,
        },
    )?;
    if args.wan_iface.is_empty()
        || !args
            .wan_iface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c))
    {
        anyhow::bail!("--wan-iface {:?}: not an interface name", args.wan_iface);
    }
    Ok(match args.format {
        Format::Table => table(&p),
        Format::Nft => nft(&p, &args.wan_iface),
        Format::Json => format!("{:#}\n", json(&p)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const PBX: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

    fn target() -> Target {
        Target {
            relay: RELAY,
            deployment: PBX,
            deployment_enabled: true,
        }
    }

    fn with_listeners() -> Config {
        Config::from_toml(
            "[registration]\nlisten = \"0.0.0.0:4062\"\ntls_listen = \"0.0.0.0:4063\"\n\
             https_listen = \"0.0.0.0:8802\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        )
        .expect("valid")
    }

    fn row(plan: &Plan, public: u16) -> &Forward {
        plan.forwards
            .iter()
            .find(|f| f.public.first == public)
            .expect("a row")
    }

    #[test]
    fn every_forward_of_the_field_with_the_layouts_media_range() {
        let p = plan(&with_listeners(), target()).expect("plan");
        let got: Vec<(Proto, Ports, Ipv4Addr, Ports, bool)> = p
            .forwards
            .iter()
            .map(|f| (f.proto, f.public, f.to, f.to_ports, f.off.is_none()))
            .collect();
        let t = |a, b| (Proto::Tcp, Ports::one(a), RELAY, Ports::one(b), true);
        let media = Ports {
            first: 30528,
            last: 30887,
        };
        assert_eq!(
            got,
            [
                t(4060, 4062),
                t(4061, 4063),
                t(8802, 8802),
                (Proto::Tcp, Ports::one(18443), PBX, Ports::one(18443), true),
                (Proto::Tcp, Ports::one(8804), PBX, Ports::one(8804), true),
                (Proto::Udp, media, RELAY, media, true),
            ]
        );
        assert_eq!(p.layout, "s");

        let x = Config::from_toml("[relay]\nlayout = \"x\"\n").expect("valid");
        let p = plan(&x, target()).expect("plan");
        assert_eq!(
            row(&p, 30274).public,
            Ports {
                first: 30274,
                last: 30529
            }
        );
        let custom = Config::from_toml("[relay]\nports = \"20000-20099\"\n").expect("valid");
        let p = plan(&custom, target()).expect("plan");
        assert_eq!(row(&p, 20000).to_ports.last, 20099);
        assert_eq!(p.layout, "custom");
    }

    #[test]
    fn listeners_off_are_listed_but_not_forwarded() {
        let p = plan(&Config::default(), target()).expect("plan");
        for port in [4060, 4061, 8802] {
            assert_eq!(
                row(&p, port).off,
                Some("listener off in this config"),
                "{port}"
            );
        }
        assert_eq!(row(&p, 4060).to_ports, Ports::one(4062));
        let rules = nft(&p, "eth9");
        assert!(!rules.contains("dport 4060 dnat"), "{rules}");
        assert!(!rules.contains("dport 8802 dnat"), "{rules}");
        assert!(rules.contains("# Not forwarded (listener off in this config): tcp 4060"));
        assert!(rules.contains("iifname \"eth9\" tcp dport 18443 dnat to 198.51.100.20 "));
        assert!(rules.contains("iifname \"eth9\" udp dport 30528-30887 dnat to 198.51.100.10 "));
        let shown = table(&p);
        assert!(
            shown.contains("off (listener off in this config)"),
            "{shown}"
        );

        let mut t = target();
        t.deployment_enabled = false;
        let p = plan(&with_listeners(), t).expect("plan");
        assert_eq!(row(&p, 18443).off, Some("deployment switched off"));
        assert!(!nft(&p, "eth9").contains("dport 8804 dnat"));
    }

    #[test]
    fn a_listener_port_other_than_the_default_is_the_target() {
        let c =
            Config::from_toml("[registration]\nlisten = \"198.51.100.10:5062\"\n").expect("valid");
        let p = plan(&c, target()).expect("plan");
        assert_eq!(row(&p, 4060).to_ports, Ports::one(5062));
        assert!(nft(&p, "wan1").contains("tcp dport 4060 dnat to 198.51.100.10:5062 "));

        let c = Config::from_toml("[registration]\nlisten = \"192.0.2.7:4062\"\n").expect("valid");
        let e = plan(&c, target()).expect_err("bound elsewhere");
        assert_eq!(e.key, "registration.listen");
    }

    #[test]
    fn unusable_addresses_are_refused() {
        for bad in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST] {
            let mut t = target();
            t.relay = bad;
            assert_eq!(
                plan(&Config::default(), t).expect_err("bad").key,
                "--relay-address"
            );
            let mut t = target();
            t.deployment = bad;
            assert_eq!(
                plan(&Config::default(), t).expect_err("bad").key,
                "--deployment-address"
            );
        }
    }

    #[test]
    fn the_nft_file_is_complete_and_never_masquerades() {
        let p = plan(&with_listeners(), target()).expect("plan");
        let rules = nft(&p, PLACEHOLDER_WAN);
        assert!(rules.contains("PLACEHOLDER"), "{rules}");
        assert!(rules.contains("no masquerade"), "{rules}");
        assert!(rules.contains(
            "table ip homerelay_fwd\ndelete table ip homerelay_fwd\ntable ip homerelay_fwd {\n"
        ));
        let body = &rules[rules.find("table ip homerelay_fwd {").expect("table")..];
        assert!(
            !body.contains("masquerade") && !body.contains("snat"),
            "{body}"
        );
        assert!(body.contains("type nat hook prerouting priority dstnat; policy accept;"));
        let dnat: Vec<&str> = body.lines().filter(|l| l.contains("dnat to")).collect();
        assert_eq!(dnat.len(), 6, "{body}");
        assert!(dnat[0].contains("iifname \"wan0\" tcp dport 4060 dnat to 198.51.100.10:4062 "));
        assert!(dnat[1].contains("tcp dport 4061 dnat to 198.51.100.10:4063 "));
        // The same port outside and inside: no port in the target.
        assert!(dnat[2].contains("tcp dport 8802 dnat to 198.51.100.10 comment"));
        assert_eq!(body.matches('{').count(), body.matches('}').count());
        assert!(!nft(&p, "we\"ird").contains("we\"ird"));
    }

    #[test]
    fn table_and_json_show_every_row() {
        let p = plan(&Config::default(), target()).expect("plan");
        let shown = table(&p);
        assert_eq!(shown.lines().filter(|l| l.starts_with("tcp")).count(), 5);
        assert!(shown.starts_with("PROTO"), "{shown}");
        assert!(
            shown.contains("udp    30528-30887  198.51.100.10:30528-30887"),
            "{shown}"
        );
        let j = json(&p);
        assert_eq!(j["masquerade"], false);
        assert_eq!(j["forwards"].as_array().expect("list").len(), 6);
        assert_eq!(j["forwards"][0]["enabled"], false);
        assert_eq!(j["forwards"][5]["public_ports"]["first"], 30528);
    }
}
