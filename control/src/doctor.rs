//! `homerelay doctor`: checks a site's configuration and host and prints one pass / warn /
//! fail line per check, each warning and failure with its fix. The exit code is 1 when any
//! check failed (warnings alone: 0); `--json` prints the same as one JSON document.
//!
//! The checks are functions of what they look at (the configuration, numbers read from
//! `/proc`, certificate files, the running daemon's answers), so each is tested with the inputs
//! that make it pass, warn and fail; `run` only gathers the inputs.
//!
//! The fast-path checks (`bpf.*`, `xdp.*`: kernel, bpffs, BPF memory, the program proven on a
//! private copy, each XDP interface) are in [`fast_path`]; they never attach, detach or replace
//! a program.
use std::borrow::Cow;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;

pub mod fast_path;
pub mod internet;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short stable name (`relay.ports`, `tls.certificate`, `xdp.iface.eth0`…).
    pub name: Cow<'static, str>,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<Cow<'static, str>>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(
        name: impl Into<Cow<'static, str>>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(
        name: impl Into<Cow<'static, str>>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// `homerelay doctor`'s arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct DoctorArgs {
    /// The configuration file `homerelay run` uses (default: the built-in configuration).
    #[arg(long, env = "HOMERELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The daemon to ask about devices (`--json` prints one JSON document instead of lines).
    #[command(flatten)]
    pub connection: crate::client::Connection,
}

/// The relay port range against the kernel's ephemeral range (`ip_local_port_range`) and its
/// reserved ports (`ip_local_reserved_ports`, as the kernel prints it: `a-b,c`).
pub fn port_range(first: u16, last: u16, ephemeral: (u16, u16), reserved: &str) -> Check {
    const NAME: &str = "relay.ports";
    let range = format!("UDP {first}-{last}");
    let (lo, hi) = ephemeral;
    if last < lo || first > hi {
        return Check::pass(
            NAME,
            format!("{range} is outside the ephemeral range {lo}-{hi}"),
        );
    }
    let reserved: Vec<(u16, u16)> = reserved
        .trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
            None => s.trim().parse().ok().map(|p| (p, p)),
        })
        .collect();
    let unreserved = (first.max(lo)..=last.min(hi))
        .filter(|p| !reserved.iter().any(|&(a, b)| (a..=b).contains(p)))
        .count();
    if unreserved == 0 {
        return Check::pass(
            NAME,
            format!("{range} overlaps the ephemeral range {lo}-{hi} but is reserved"),
        );
    }
    Check::warn(
        NAME,
        format!(
            "{unreserved} ports of {range} lie in the kernel's ephemeral range {lo}-{hi}: any \
             outgoing connection may take one, and a channel on it then cannot be opened"
        ),
        format!(
            "reserve them: sysctl -w net.ipv4.ip_local_reserved_ports={first}-{last} (and the \
             same line in /etc/sysctl.d/homerelay.conf)"
        ),
    )
}

/// Whether the configured relay addresses are on this host.
pub fn addresses(config: &Config, host: &[IpAddr]) -> Vec<Check> {
    let mut checks = Vec::new();
    for (key, addr) in [
        ("relay.internet_address", config.relay.internet_address),
        ("relay.lan_address", config.relay.lan_address),
    ] {
        let name = if key == "relay.internet_address" {
            "relay.internet_address"
        } else {
            "relay.lan_address"
        };
        match addr {
            None => checks.push(Check::warn(
                name,
                "not set: channels have a relay address on this side only where a request names one",
                format!("set {key} to the host's address that side talks to"),
            )),
            Some(a) if host.contains(&IpAddr::V4(a)) => {
                checks.push(Check::pass(name, format!("{a} is on this host")));
            }
            Some(a) => checks.push(Check::fail(
                name,
                format!("{a} is not an address of this host"),
                format!("add it to an interface (ip addr add {a}/… dev …) or correct {key}"),
            )),
        }
    }
    checks
}

/// The XDP interfaces named in the configuration against the host's interfaces.
pub fn xdp_interfaces(config: &Config, host_ifaces: &[String]) -> Check {
    const NAME: &str = "xdp.interfaces";
    let configured = &config.xdp.interfaces;
    if configured.is_empty() {
        return Check::warn(
            NAME,
            "none configured: user space carries all media",
            "name the relay's interfaces in xdp.interfaces (or --xdp-iface) for the XDP fast path",
        );
    }
    let missing: Vec<&str> = configured
        .iter()
        .filter(|i| !host_ifaces.contains(i))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        Check::pass(NAME, format!("present: {}", configured.join(", ")))
    } else {
        Check::fail(
            NAME,
            format!("not on this host: {}", missing.join(", ")),
            "correct xdp.interfaces (ip link lists the host's interfaces)",
        )
    }
}

/// How many simultaneous internet calls the configured upstream holds.
pub fn internet_calls(config: &Config) -> Check {
    const NAME: &str = "pool.internet_calls";
    match config.allocator_config(0).internet_call_limit() {
        None => Check::warn(
            NAME,
            "no upstream bandwidth configured: internet calls are not limited, and too many \
             degrade every call's audio",
            "set pool.upstream_kbps to the site's upload bandwidth",
        ),
        Some(0) => Check::fail(
            NAME,
            format!(
                "pool.upstream_kbps {} holds no {} call: every internet call is refused",
                config.pool.upstream_kbps.unwrap_or(0),
                config.pool.codec.name()
            ),
            "raise pool.upstream_kbps, or choose a codec that needs less (pool.codec)",
        ),
        Some(n) => Check::pass(NAME, format!("{n} simultaneous internet calls")),
    }
}

/// A certificate chain and key file of the registration listeners: readable, matching, valid
/// now and for 30 more days, RSA keys at least 2048 bits.
pub fn certificate(cert: &Path, key: &Path, now: time::UtcDateTime) -> Check {
    const NAME: &str = "tls.certificate";
    let store = match crate::certstore::CertStore::open(cert, key) {
        Ok(s) => s,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{e:#}"),
                "create and import one: homerelay cert server …, homerelay cert import …",
            );
        }
    };
    let info = std::fs::read(cert)
        .ok()
        .and_then(|pem| rustls_pemfile_first(&pem).and_then(|der| relay_cert::inspect(&der).ok()));
    let Some(info) = info else {
        return Check::fail(
            NAME,
            format!("{}: cannot read the certificate", cert.display()),
            "import a PEM certificate chain (homerelay cert import)",
        );
    };
    if let Err(e) = relay_cert::check_key_length(&info, 2048) {
        return Check::fail(
            NAME,
            e.to_string(),
            "issue a certificate with a 2048-bit or longer RSA key, or ECDSA P-256",
        );
    }
    if now < info.not_before || now > info.not_after {
        return Check::fail(
            NAME,
            format!(
                "not valid now: valid {} to {} (UTC)",
                info.not_before, info.not_after
            ),
            "issue a new server certificate and import it (no restart needed)",
        );
    }
    let left = info.not_after - now;
    if left < time::Duration::days(30) {
        return Check::warn(
            NAME,
            format!(
                "expires in {} days, on {} (UTC)",
                left.whole_days(),
                info.not_after
            ),
            "issue a new server certificate and import it (no restart needed)",
        );
    }
    Check::pass(
        NAME,
        format!(
            "valid until {} (UTC), SHA-256 {}",
            info.not_after,
            store.fingerprint()
        ),
    )
}

/// The first certificate of a PEM file, DER.
fn rustls_pemfile_first(pem: &[u8]) -> Option<Vec<u8>> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .map(|c| c.as_ref().to_vec())
}

/// Devices allowed to register from the Internet whose password is weak under the current
/// policy (they cannot register from outside until it is changed).
pub fn weak_remote_devices(devices: &[proto::v1::Device]) -> Check {
    const NAME: &str = "devices.passwords";
    let weak: Vec<&str> = devices
        .iter()
        .filter(|d| d.internet_registration && !d.weak_password.is_empty())
        .map(|d| d.number.as_str())
        .collect();
    let remote = devices.iter().filter(|d| d.internet_registration).count();
    if weak.is_empty() {
        Check::pass(
            NAME,
            format!("{remote} devices may register from the Internet, none with a weak password"),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "internet registration on, but a weak password: {} (they are refused from outside)",
                weak.join(", ")
            ),
            "set a strong password: homerelay devices update NUMBER --password-file FILE",
        )
    }
}

/// `relay.ports.free`: no other program holds a UDP port of the relay's range (`bound`: the
/// UDP ports bound on this host, from [`bound_udp_ports`]). While the relay runs
/// (`relay_running`), the ports bound are taken to be its own.
pub fn ports_free(first: u16, last: u16, bound: &[u16], relay_running: bool) -> Check {
    const NAME: &str = "relay.ports.free";
    let mut taken: Vec<u16> = bound
        .iter()
        .copied()
        .filter(|p| (first..=last).contains(p))
        .collect();
    taken.sort_unstable();
    taken.dedup();
    if taken.is_empty() {
        return Check::pass(NAME, format!("no UDP port of {first}-{last} is in use"));
    }
    if relay_running {
        return Check::pass(
            NAME,
            format!(
                "{} UDP ports of {first}-{last} are bound, taken to be the running relay's",
                taken.len()
            ),
        );
    }
    let shown: Vec<String> = taken.iter().take(10).map(u16::to_string).collect();
    let more = if taken.len() > 10 {
        format!(" and {} more", taken.len() - 10)
    } else {
        String::new()
    };
    Check::fail(
        NAME,
        format!(
            "UDP ports {}{more} of the relay's range are in use by another program (the relay \
             does not run): their channels cannot be allocated",
            shown.join(", ")
        ),
        format!(
            "find the program with ss -ulpn 'sport >= :{first} and sport <= :{last}' and stop \
             it, or choose another range (relay.layout / relay.ports)"
        ),
    )
}

/// The UDP ports bound on this host in this network namespace (IPv4 and IPv6), from
/// /proc/net/udp and /proc/net/udp6.
pub fn bound_udp_ports() -> Vec<u16> {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| parse_proc_net_udp(&text))
        .collect()
}

/// The local ports of a /proc/net/udp table (`sl local_address rem_address …`, the address
/// `HEXIP:HEXPORT`).
pub fn parse_proc_net_udp(text: &str) -> Vec<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let local = line.split_whitespace().nth(1)?;
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Every check of this host and `config`; the device check asks the running daemon.
pub async fn checks(config: &Config, connection: &crate::client::Connection) -> Vec<Check> {
    let mut out = vec![Check::pass("config", "valid")];
    let host: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|a| a.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default();
    let ifaces: Vec<String> = if_addrs::get_if_addrs()
        .map(|a| a.into_iter().map(|i| i.name).collect())
        .unwrap_or_default();
    out.extend(addresses(config, &host));
    // The running relay, if any (its API answers): its ports are its own.
    let daemon = match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::public_address_cli::status(connection),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("its API did not answer: {e:#}")),
        Err(_) => Err("its API did not answer within 5 s".to_string()),
    };
    out.push(xdp_interfaces(config, &ifaces));
    out.extend(fast_path::checks(config).await);
    if let Ok((layout, _)) = config.layout() {
        let ephemeral = read_sysctl("/proc/sys/net/ipv4/ip_local_port_range")
            .and_then(|s| {
                let mut it = s.split_whitespace().filter_map(|n| n.parse::<u16>().ok());
                Some((it.next()?, it.next()?))
            })
            .unwrap_or((32768, 60999));
        let reserved =
            read_sysctl("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
        out.push(port_range(
            layout.first_port(),
            layout.last_port(),
            ephemeral,
            &reserved,
        ));
        out.push(ports_free(
            layout.first_port(),
            layout.last_port(),
            &bound_udp_ports(),
            daemon.is_ok(),
        ));
    }
    out.push(internet_calls(config));
    let r = &config.registration;
    if r.listen.is_none() && r.tls_listen.is_none() && r.https_listen.is_none() {
        out.push(Check::warn(
            "registration",
            "off: no remote device can register",
            "set registration.listen / tls_listen / https_listen (README: Add a remote device)",
        ));
    } else {
        out.push(Check::pass("registration", "on"));
    }
    if let (Some(cert), Some(key)) = (&r.tls_cert, &r.tls_key) {
        out.push(certificate(cert, key, time::UtcDateTime::now()));
    }
    // What the Internet sees of this site: STUN servers, the public address, the NAT.
    out.extend(internet::checks(config, daemon).await);
    let devices = async {
        let (channel, token) = crate::client::connect_channel(connection).await?;
        let mut client =
            proto::v1::device_service_client::DeviceServiceClient::with_interceptor(channel, token);
        let list = client
            .list_devices(proto::v1::ListDevicesRequest::default())
            .await?
            .into_inner();
        anyhow::Ok(list.devices)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), devices).await {
        Ok(Ok(devices)) => out.push(weak_remote_devices(&devices)),
        Ok(Err(e)) => out.push(Check::warn(
            "devices.passwords",
            format!("not checked: the daemon's API did not answer ({e:#})"),
            "run doctor while the relay runs (and give --server / --token-file as for the CLI)",
        )),
        Err(_) => out.push(Check::warn(
            "devices.passwords",
            "not checked: the daemon's API did not answer within 5 s",
            "run doctor while the relay runs",
        )),
    }
    out
}

/// Runs `homerelay doctor`; the process exit code (1 when a check failed).
pub async fn run(args: DoctorArgs) -> anyhow::Result<i32> {
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    let checks = match config {
        Ok(c) => checks(&c, &args.connection).await,
        Err(e) => vec![Check::fail(
            "config",
            e.to_string(),
            "correct the key it names (deploy/homerelay.toml documents every key)",
        )],
    };
    if args.connection.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let status = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{status}  {:<24} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("      {:<24} fix: {fix}", "");
            }
        }
    }
    Ok(i32::from(checks.iter().any(|c| c.status == Status::Fail)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_range_is_checked_against_the_ephemeral_and_reserved_ports() {
        assert_eq!(
            port_range(30528, 30887, (32768, 60999), "").status,
            Status::Pass
        );
        let w = port_range(30528, 30887, (30000, 60999), "");
        assert_eq!(w.status, Status::Warn);
        assert!(w.detail.starts_with("360 ports"), "{w:?}");
        assert!(
            w.fix
                .as_deref()
                .is_some_and(|f| f.contains("ip_local_reserved_ports=30528-30887"))
        );
        assert_eq!(
            port_range(30528, 30887, (30000, 60999), "30500-30900\n").status,
            Status::Pass
        );
        let partly = port_range(30528, 30887, (30000, 60999), "30528-30600,30700");
        assert_eq!(partly.status, Status::Warn);
        assert!(partly.detail.starts_with("286 ports"), "{partly:?}");
    }

    #[test]
    fn relay_addresses_must_be_on_the_host() {
        let mut c = Config::default();
        c.relay.internet_address = Some("198.51.100.1".parse().expect("ip"));
        c.relay.lan_address = Some("192.0.2.1".parse().expect("ip"));
        let host: Vec<IpAddr> = vec!["198.51.100.1".parse().expect("ip")];
        let checks = addresses(&c, &host);
        assert_eq!(checks[0].status, Status::Pass);
        assert_eq!(checks[1].status, Status::Fail);
        assert!(checks[1].detail.contains("192.0.2.1"));
    }

    #[test]
    fn internet_calls_need_an_upstream_that_holds_one() {
        let mut c = Config::default();
        assert_eq!(internet_calls(&c).status, Status::Warn);
        c.pool.upstream_kbps = Some(10_000);
        let ok = internet_calls(&c);
        assert_eq!(ok.status, Status::Pass, "{ok:?}");
        c.pool.upstream_kbps = Some(10);
        assert_eq!(internet_calls(&c).status, Status::Fail);
    }

    #[test]
    fn xdp_interfaces_must_exist() {
        let mut c = Config::default();
        assert_eq!(xdp_interfaces(&c, &[]).status, Status::Warn);
        c.xdp.interfaces = vec!["eth0".into()];
        assert_eq!(
            xdp_interfaces(&c, &["lo".into(), "eth0".into()]).status,
            Status::Pass
        );
        assert_eq!(xdp_interfaces(&c, &["lo".into()]).status, Status::Fail);
    }

    #[test]
    fn remote_devices_with_weak_passwords_fail() {
        let device = |number: &str, internet: bool, weak: &[&str]| proto::v1::Device {
            number: number.into(),
            internet_registration: internet,
            weak_password: weak.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        assert_eq!(
            weak_remote_devices(&[device("1", true, &[]), device("2", false, &["short"])]).status,
            Status::Pass
        );
        let f = weak_remote_devices(&[device("1", true, &["short"])]);
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains('1'));
    }

    #[test]
    fn ports_in_use_by_another_program_fail() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
   1: 0100007F:7750 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n\
   2: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n";
        let bound = parse_proc_net_udp(table);
        assert_eq!(bound, [0x7750, 53]);
        assert_eq!(0x7750, 30544);
        let c = ports_free(30528, 30887, &bound, false);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("30544"), "{}", c.detail);
        assert!(c.fix.unwrap().contains("ss -ulpn"));
        assert_eq!(ports_free(30528, 30887, &bound, true).status, Status::Pass);
        assert_eq!(ports_free(30274, 30529, &[53], false).status, Status::Pass);
        assert_eq!(parse_proc_net_udp("header only\n"), Vec::<u16>::new());
    }
}
