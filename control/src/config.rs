//! The daemon's configuration: a typed TOML file (`homerelay run --config FILE`, example in
//! `deploy/homerelay.toml`), command-line flags and `HOMERELAY_*` variables that override it,
//! and the built-in defaults when there is no file.
//!
//! Invariant: a [`Config`] that passed [`Config::validate`] starts — every error a bad value can
//! cause is found here, before anything is bound or loaded, and each names the key it is about
//! (`relay.ports: first port 20001 is odd: an rtp port must be even`). Unknown keys are errors
//! too (`deny_unknown_fields`), so a typo never silently falls back to a default.
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_user::RelayOptions;
use relay_user::xdp::{XdpMode, XdpOptions};
use serde::{Deserialize, Deserializer};

use relay_core::allocator::{self, Codec, Layout};

/// Where the API listens by default: loopback only, so no authentication is needed. Port 4080
/// is clear of the registration ports (4062, 4063, 8802).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 4080);
/// The API URL clients use by default.
pub const DEFAULT_SERVER_URL: &str = "http://127.0.0.1:4080";
/// Shortest bearer token accepted: a token must be a random secret, not a password.
pub const MIN_TOKEN_LEN: usize = 16;

/// A configuration error, naming the key it is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key, as written in the file (`relay.ports`); `(file)` for a file-level error.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            key: key.into(),
            message: message.to_string(),
        }
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The channel pool and the user-space relay.
    pub relay: RelaySection,
    /// The XDP fast path.
    pub xdp: XdpSection,
    /// Allocation policy.
    pub pool: PoolSection,
    /// The gRPC API.
    pub api: ApiSection,
    /// The event stream.
    pub events: EventsSection,
    /// The Prometheus endpoint.
    pub metrics: MetricsSection,
    /// The crash-safe state (channel records).
    pub store: StoreSection,
    /// Remote devices and the SBC's rules for them.
    pub devices: DevicesSection,
    /// The registration service of remote phones (TCP 4062, TLS 4063) and apps (HTTPS 8802).
    pub registration: RegistrationSection,
    /// The STUN server (UDP and TCP 3478; docs/stun.md).
    pub stun: StunSection,
    /// The relay's public address, learnt with STUN (docs/public-address.md).
    pub public_address: PublicAddressSection,
}

/// Default of `public_address.refresh`.
pub const DEFAULT_PUBLIC_ADDRESS_REFRESH: Duration = Duration::from_secs(60);
/// Bounds of `public_address.refresh`: at least a second (a lab; STUN servers rate-limit), at
/// most a day.
pub const PUBLIC_ADDRESS_REFRESH_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);

/// `[public_address]` (docs/public-address.md): how the relay learns the public address the
/// company router's NAT gives `local_address`, the address remote devices send media to.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicAddressSection {
    /// The ITSP's STUN server, `host`, `host:port`, `IP` or `IP:port` (port 3478 when absent),
    /// asked first. A name is resolved again at every refresh (a dynamic-DNS name is followed).
    pub itsp_stun_server: Option<String>,
    /// A STUN server of the operator's choice, asked when the ITSP's gives no answer or there is
    /// none. Without either server (and without `static_address`) there is no discovery: the
    /// public address is `relay.internet_address` itself (no NAT in front of the relay).
    pub stun_server: Option<String>,
    /// How often the address is asked for (1s to 24h).
    #[serde(deserialize_with = "de_duration")]
    pub refresh: Duration,
    /// The relay address the public address stands for, which STUN requests are sent from;
    /// unset: `relay.internet_address` (leg A's address), else the address the kernel picks.
    pub local_address: Option<Ipv4Addr>,
    /// A fixed public address (a static IP): no discovery, no STUN server may be set.
    pub static_address: Option<Ipv4Addr>,
}

impl Default for PublicAddressSection {
    fn default() -> Self {
        PublicAddressSection {
            itsp_stun_server: None,
            stun_server: None,
            refresh: DEFAULT_PUBLIC_ADDRESS_REFRESH,
            local_address: None,
            static_address: None,
        }
    }
}

impl PublicAddressSection {
    /// Whether the address is discovered with STUN (a server is set).
    pub fn discovery(&self) -> bool {
        self.itsp_stun_server.is_some() || self.stun_server.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, server) in [
            ("public_address.itsp_stun_server", &self.itsp_stun_server),
            ("public_address.stun_server", &self.stun_server),
        ] {
            if let Some(s) = server {
                check_stun_server(s).map_err(|e| ConfigError::new(key, e))?;
                if self.static_address.is_some() {
                    return Err(ConfigError::new(
                        "public_address.static_address",
                        format!(
                            "a static public address turns discovery off, but {key} is set: \
                             remove one of them"
                        ),
                    ));
                }
            }
        }
        if !PUBLIC_ADDRESS_REFRESH_RANGE.contains(&self.refresh) {
            return Err(ConfigError::new(
                "public_address.refresh",
                format!("{:?} is outside 1s..=24h", self.refresh),
            ));
        }
        for (key, addr) in [
            ("public_address.local_address", self.local_address),
            ("public_address.static_address", self.static_address),
        ] {
            if let Some(a) = addr
                && (a.is_unspecified() || a.is_multicast() || a.is_broadcast())
            {
                return Err(ConfigError::new(
                    key,
                    format!("{a} is not a unicast address"),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a STUN server's spelling (`host`, `host:port`, `IP`, `IP:port`, `[IPv6]:port`)
/// without resolving it. The relay's addresses are IPv4, so an IPv6 literal is refused.
pub fn check_stun_server(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 260 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} is not a STUN server like \"stun.example.net\" or \"192.0.2.7:3478\""
        ));
    }
    let ipv6 = || {
        format!(
            "{s:?} is an IPv6 address: STUN requests are sent from the relay's IPv4 address, \
             so name an IPv4 server (or a name with an A record)"
        )
    };
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return match a {
            std::net::SocketAddr::V6(_) => Err(ipv6()),
            std::net::SocketAddr::V4(_) if a.port() == 0 => Err(format!("{s:?}: port 0")),
            std::net::SocketAddr::V4(_) => Ok(()),
        };
    }
    match s.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => return Ok(()),
        Ok(std::net::IpAddr::V6(_)) => return Err(ipv6()),
        Err(_) => {}
    }
    if s.starts_with('[') || s.matches(':').count() > 1 {
        return Err(ipv6());
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("{s:?}: {p:?} is not a port (1 to 65535)")),
        }
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    // A top-level label is never all digits: "192.0.2.300" is a mistyped address, no name.
    let numeric_tld = name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if name.len() > 253 || numeric_tld || !name.split('.').all(label_ok) {
        return Err(format!(
            "{s:?}: {host:?} is not a host name or an IPv4 address"
        ));
    }
    Ok(())
}

/// `[stun]` (docs/stun.md).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StunSection {
    /// UDP and TCP address of the STUN server (e.g. `0.0.0.0:3478`); unset: off.
    pub listen: Option<SocketAddr>,
    /// The RFC 5780 second address (another IP and another port than `listen`, which must then
    /// name a specific IP): enables OTHER-ADDRESS, RESPONSE-ORIGIN and CHANGE-REQUEST; unset:
    /// no behaviour discovery (CHANGE-REQUEST is answered with 420).
    pub other_address: Option<SocketAddr>,
    /// Requests per second one source IP may send on average (UDP and TCP together).
    pub rate_per_source: u32,
    /// Requests one source IP may send at once.
    pub burst_per_source: u32,
    /// Source IPs tracked by the rate limit at most.
    pub max_sources: usize,
}

impl Default for StunSection {
    fn default() -> Self {
        let r = relay_core::stun::RateConfig::default();
        StunSection {
            listen: None,
            other_address: None,
            rate_per_source: r.per_second,
            burst_per_source: r.burst,
            max_sources: r.max_sources,
        }
    }
}

impl StunSection {
    /// The rate limit of `relay_core::stun`.
    pub fn rate(&self) -> relay_core::stun::RateConfig {
        relay_core::stun::RateConfig {
            per_second: self.rate_per_source,
            burst: self.burst_per_source,
            max_sources: self.max_sources,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.rate_per_source == 0 || self.burst_per_source == 0 {
            return Err(ConfigError::new(
                "stun.rate_per_source",
                "rate_per_source and burst_per_source must be at least 1",
            ));
        }
        if !(1..=16_777_216).contains(&self.max_sources) {
            return Err(ConfigError::new(
                "stun.max_sources",
                "must be 1 to 16777216",
            ));
        }
        let Some(other) = self.other_address else {
            return Ok(());
        };
        let Some(listen) = self.listen else {
            return Err(ConfigError::new("stun.other_address", "needs stun.listen"));
        };
        if listen.ip().is_unspecified() || other.ip().is_unspecified() {
            return Err(ConfigError::new(
                "stun.other_address",
                "RFC 5780 needs specific addresses in stun.listen and stun.other_address",
            ));
        }
        if listen.is_ipv4() != other.is_ipv4()
            || listen.ip() == other.ip()
            || listen.port() == other.port()
        {
            return Err(ConfigError::new(
                "stun.other_address",
                "must have the same family as stun.listen, another IP and another port",
            ));
        }
        Ok(())
    }
}

/// `[registration]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationSection {
    /// Plain TCP address of the phones' registration (e.g. `0.0.0.0:4062`); unset: off.
    pub listen: Option<SocketAddr>,
    /// TLS address of the phones' registration (e.g. `0.0.0.0:4063`); needs `tls_cert` and
    /// `tls_key`; unset: off.
    pub tls_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) of the TLS listener.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the TLS listener.
    pub tls_key: Option<PathBuf>,
    /// HTTPS address of the apps' JSON registration API (myPortal to go, myPortal @work; e.g.
    /// `0.0.0.0:8802`, see docs/https-api.md); uses `tls_cert` and `tls_key`; unset: off.
    pub https_listen: Option<SocketAddr>,
    /// Failed logins of one device in a row before it is locked out (every transport).
    pub lockout_device_failures: u32,
    /// Failed logins from one source address before it is locked out.
    pub lockout_source_failures: u32,
    /// The first lockout; each further failure doubles it.
    #[serde(deserialize_with = "de_duration")]
    pub lockout_first: Duration,
    /// The longest lockout.
    #[serde(deserialize_with = "de_duration")]
    pub lockout_max: Duration,
}

impl Default for RegistrationSection {
    fn default() -> Self {
        let lockout = relay_core::device::lockout::LockoutPolicy::default();
        RegistrationSection {
            listen: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            https_listen: None,
            lockout_device_failures: lockout.device_threshold,
            lockout_source_failures: lockout.source_threshold,
            lockout_first: Duration::from_millis(lockout.base_ms),
            lockout_max: Duration::from_millis(lockout.cap_ms),
        }
    }
}

impl RegistrationSection {
    /// The brute-force lockout of `[registration]`.
    pub fn lockout_policy(
        &self,
    ) -> Result<relay_core::device::lockout::LockoutPolicy, ConfigError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        for (key, n) in [
            (
                "registration.lockout_device_failures",
                self.lockout_device_failures,
            ),
            (
                "registration.lockout_source_failures",
                self.lockout_source_failures,
            ),
        ] {
            if !(1..=1000).contains(&n) {
                return Err(ConfigError::new(key, "must be 1 to 1000"));
            }
        }
        if self.lockout_first < Duration::from_secs(1) || self.lockout_first > self.lockout_max {
            return Err(ConfigError::new(
                "registration.lockout_first",
                "must be at least 1s and at most registration.lockout_max",
            ));
        }
        if self.lockout_max > Duration::from_secs(7 * 24 * 3600) {
            return Err(ConfigError::new(
                "registration.lockout_max",
                "must be at most 7 days",
            ));
        }
        Ok(relay_core::device::lockout::LockoutPolicy {
            device_threshold: self.lockout_device_failures,
            source_threshold: self.lockout_source_failures,
            base_ms: ms(self.lockout_first),
            cap_ms: ms(self.lockout_max),
            ..relay_core::device::lockout::LockoutPolicy::default()
        })
    }
}

/// `[devices]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesSection {
    /// Networks whose devices are internal (CIDR); every other source is external and needs
    /// the device's internet-registration flag.
    pub internal_networks: Vec<String>,
    /// PBKDF2-SHA-256 iterations of new password verifiers (SCRAM-SHA-256; at least 4096).
    pub password_iterations: u32,
    /// Shortest password the policy accepts.
    pub min_password_length: usize,
    /// Minimum firmware for Internet registration per device type (a type name as in
    /// `homerelay devices create --type`), replacing the built-in one: `"V3 R0.40.4"` (this or
    /// newer), `"> V2.0.12"` (newer only) or `"none"`.
    pub firmware_minimums: std::collections::BTreeMap<String, String>,
}

impl Default for DevicesSection {
    fn default() -> Self {
        DevicesSection {
            internal_networks: crate::devices::DEFAULT_INTERNAL_NETWORKS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            password_iterations: relay_core::device::scram::DEFAULT_ITERATIONS,
            min_password_length: relay_core::device::password::PasswordPolicy::default().min_length,
            firmware_minimums: std::collections::BTreeMap::new(),
        }
    }
}

/// Where the daemon keeps its state by default (systemd's `StateDirectory=homerelay`).
pub const DEFAULT_STORE: &str = "/var/lib/homerelay/homerelay.db";

/// `[store]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// The SQLite database of live channels (WAL mode; `-wal`, `-shm` and `.lock` files beside
    /// it). Written before the data path changes, read at start to keep the calls a previous
    /// process left in the pinned maps. One daemon per file: a second one refuses to start.
    pub path: PathBuf,
    /// Keep channel records at all; without them a restart ends every call in progress.
    pub enabled: bool,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            path: PathBuf::from(DEFAULT_STORE),
            enabled: true,
        }
    }
}

/// Built-in port layouts, or a custom range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LayoutName {
    /// Small systems: 60 channels on UDP 30274–30529.
    X,
    /// Server model: 180 channels on UDP 30528–30887.
    S,
    /// `relay.ports` (and optionally `relay.capacity`).
    Custom,
}

impl LayoutName {
    /// The name used in the file and the API.
    pub const fn name(self) -> &'static str {
        match self {
            LayoutName::X => "x",
            LayoutName::S => "s",
            LayoutName::Custom => "custom",
        }
    }
}

/// `[relay]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    /// `x`, `s` or `custom`; unset: `custom` if `ports` is set, else `s`.
    pub layout: Option<LayoutName>,
    /// Custom port range `"FIRST-LAST"`.
    pub ports: Option<String>,
    /// Channels of a custom layout; unset: every port pair of the range.
    pub capacity: Option<u32>,
    /// User-space forwarding threads; 0 = one per CPU.
    pub workers: usize,
    /// Relay address leg A (the Internet side) talks to.
    pub internet_address: Option<Ipv4Addr>,
    /// Relay address leg B (the LAN side) talks to.
    pub lan_address: Option<Ipv4Addr>,
    /// Let channels name peers on loopback or at this host's own addresses. Off: such a
    /// request is refused (the relay would send media to itself); for labs on one machine.
    pub allow_local_peers: bool,
}

/// `[xdp]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XdpSection {
    /// Interfaces to attach the fast path to; empty: user space only.
    pub interfaces: Vec<String>,
    /// `native`, `generic` or `auto`.
    #[serde(deserialize_with = "de_xdp_mode")]
    pub mode: XdpMode,
    /// bpffs directory of the pinned maps.
    pub pin_dir: PathBuf,
    /// Refuse to start without the fast path.
    pub require: bool,
}

impl Default for XdpSection {
    fn default() -> Self {
        XdpSection {
            interfaces: Vec::new(),
            mode: XdpMode::Auto,
            pin_dir: PathBuf::from(relay_user::xdp::DEFAULT_PIN_DIR),
            require: false,
        }
    }
}

/// `[pool]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    /// Upstream bandwidth in kbit/s shared by internet calls; unset: no internet-call limit.
    pub upstream_kbps: Option<u32>,
    /// Codec the internet-call limit is budgeted with.
    #[serde(deserialize_with = "de_codec")]
    pub codec: Codec,
    /// How long a released port pair waits before it is handed out again.
    #[serde(deserialize_with = "de_duration")]
    pub quarantine: Duration,
    /// Media inactivity timeout of channels allocated without their own.
    #[serde(deserialize_with = "de_duration")]
    pub media_timeout: Duration,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            upstream_kbps: None,
            codec: Codec::default(),
            quarantine: allocator::Config::DEFAULT_QUARANTINE,
            media_timeout: allocator::Config::DEFAULT_MEDIA_TIMEOUT,
        }
    }
}

/// `[api]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Address and port of the gRPC API.
    pub listen: SocketAddr,
    /// Require authentication even on a loopback address.
    pub require_auth: bool,
    /// File holding the bearer token clients must send (`authorization: Bearer TOKEN`).
    pub token_file: Option<PathBuf>,
    /// TLS; with `client_ca`, mutual TLS.
    pub tls: Option<TlsSection>,
    /// Open connections at most; a connection beyond it is closed at once.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection (the SETTINGS value sent to clients): open
    /// Watch streams count.
    pub max_concurrent_streams: u32,
    /// Requests of one connection handled at once; more wait for a free slot.
    pub max_requests_per_connection: usize,
    /// A client must finish the TLS handshake within this time or is disconnected.
    #[serde(deserialize_with = "de_duration")]
    pub tls_handshake_timeout: Duration,
    /// At shutdown, how long requests in flight may take before their connections are closed.
    /// Watch streams (channel events and health) end at once, so this bounds only slow or
    /// misbehaving clients.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

/// Defaults of the `[api]` limits.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: usize = 64;
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: DEFAULT_LISTEN,
            require_auth: false,
            token_file: None,
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_requests_per_connection: DEFAULT_MAX_REQUESTS_PER_CONNECTION,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// `[api.tls]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM): mutual TLS. Unset: server-only TLS,
    /// which does not authenticate clients.
    pub client_ca: Option<PathBuf>,
}

/// `[events]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSection {
    /// Events buffered per watcher; a watcher that falls further behind is disconnected.
    pub buffer: usize,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection { buffer: 4096 }
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Serve Prometheus metrics at `http://LISTEN/metrics`.
    pub enabled: bool,
    /// Address and port of the metrics endpoint. It is read-only and unauthenticated: counts
    /// only, no call or device details.
    pub listen: SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enabled: true,
            listen: crate::metrics::DEFAULT_LISTEN,
        }
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"10s\": {e}")))
}

fn de_xdp_mode<'de, D: Deserializer<'de>>(d: D) -> Result<XdpMode, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|e| serde::de::Error::custom(format!("{e}")))
}

fn de_codec<'de, D: Deserializer<'de>>(d: D) -> Result<Codec, D::Error> {
    let s = String::deserialize(d)?;
    parse_codec(&s).map_err(serde::de::Error::custom)
}

/// A codec by its configuration name.
pub fn parse_codec(s: &str) -> Result<Codec, String> {
    Codec::ALL
        .into_iter()
        .find(|c| c.name() == s)
        .ok_or_else(|| {
            let names: Vec<_> = Codec::ALL.iter().map(|c| c.name()).collect();
            format!("unknown codec {s:?} (expected one of {})", names.join(", "))
        })
}

/// Parses `"FIRST-LAST"`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|e| format!("first port {a:?}: {e}"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|e| format!("last port {b:?}: {e}"))?;
    Ok((a, b))
}

/// Command-line and environment overrides of the file (`homerelay run` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--layout`: a built-in layout (clears a custom range from the file).
    pub layout: Option<LayoutName>,
    /// `--ports`: a custom range (the layout becomes `custom`).
    pub ports: Option<String>,
    pub workers: Option<usize>,
    pub xdp_interfaces: Option<Vec<String>>,
    pub xdp_mode: Option<XdpMode>,
    pub pin_dir: Option<PathBuf>,
    /// `--store`: the state database.
    pub store: Option<PathBuf>,
    /// `--require-xdp` (a flag can only turn it on).
    pub require_xdp: bool,
    pub listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    /// `--metrics-listen` (also turns metrics on).
    pub metrics_listen: Option<SocketAddr>,
    /// `--no-metrics` (a flag can only turn them off).
    pub no_metrics: bool,
}

impl Config {
    /// Parses a configuration file's text and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::de::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("(file)", e.message()))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let mut key = e.path().to_string();
            // A datetime where a table or another value belongs: the path ends in the toml
            // crate's private field for datetimes, which is no key of this file.
            if let Some(at) = key.find(TOML_PRIVATE) {
                key.truncate(at);
                key.truncate(key.trim_end_matches('.').len());
            }
            let inner = e.into_inner();
            let key = if key == "." || key.is_empty() {
                "(file)".to_owned()
            } else {
                key
            };
            ConfigError {
                key,
                message: with_line(text, &inner),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("(file)", format!("reading {}: {e}", path.display())))?;
        Config::from_toml(&text)
    }

    /// Applies command-line overrides (they win over the file) and validates the result.
    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        if let Some(layout) = o.layout {
            self.relay.layout = Some(layout);
            if layout != LayoutName::Custom {
                self.relay.ports = None;
                self.relay.capacity = None;
            }
        }
        if let Some(ports) = o.ports {
            self.relay.layout = Some(LayoutName::Custom);
            self.relay.ports = Some(ports);
        }
        if let Some(w) = o.workers {
            self.relay.workers = w;
        }
        if let Some(i) = o.xdp_interfaces {
            self.xdp.interfaces = i;
        }
        if let Some(m) = o.xdp_mode {
            self.xdp.mode = m;
        }
        if let Some(p) = o.pin_dir {
            self.xdp.pin_dir = p;
        }
        if let Some(p) = o.store {
            self.store.path = p;
        }
        self.xdp.require |= o.require_xdp;
        if let Some(l) = o.listen {
            self.api.listen = l;
        }
        if let Some(t) = o.token_file {
            self.api.token_file = Some(t);
        }
        if let Some(l) = o.metrics_listen {
            self.metrics.listen = l;
            self.metrics.enabled = true;
        }
        if o.no_metrics {
            self.metrics.enabled = false;
        }
        self.validate()
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.layout()?;
        self.registry_policy()?;
        self.registration.lockout_policy()?;
        self.stun.validate()?;
        self.public_address.validate()?;
        let r = &self.registration;
        if r.tls_listen.is_some() && (r.tls_cert.is_none() || r.tls_key.is_none()) {
            return Err(ConfigError::new(
                "registration.tls_listen",
                "needs registration.tls_cert and registration.tls_key",
            ));
        }
        if r.https_listen.is_some() && (r.tls_cert.is_none() || r.tls_key.is_none()) {
            return Err(ConfigError::new(
                "registration.https_listen",
                "the apps' HTTPS API needs registration.tls_cert and registration.tls_key",
            ));
        }
        if self.relay.workers > 1024 {
            return Err(ConfigError::new(
                "relay.workers",
                format!("{} threads is more than 1024", self.relay.workers),
            ));
        }
        let mut seen = Vec::new();
        for name in &self.xdp.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                return Err(ConfigError::new(
                    "xdp.interfaces",
                    format!("{name:?} is not an interface name (1 to 15 characters)"),
                ));
            }
            if seen.contains(&name) {
                return Err(ConfigError::new(
                    "xdp.interfaces",
                    format!("{name:?} is listed twice"),
                ));
            }
            seen.push(name);
        }
        if self.xdp.require && self.xdp.interfaces.is_empty() {
            return Err(ConfigError::new(
                "xdp.require",
                "the fast path is required but xdp.interfaces (--xdp-iface) names no interface",
            ));
        }
        self.allocator_config(0).validate().map_err(|e| {
            use allocator::ConfigError as E;
            let key = match &e {
                E::ZeroUpstream => "pool.upstream_kbps",
                E::DurationOutOfRange { what, .. } if *what == "quarantine" => "pool.quarantine",
                E::DurationOutOfRange { .. } => "pool.media_timeout",
                _ => "pool",
            };
            ConfigError::new(key, e)
        })?;
        self.check_exposure()?;
        self.check_api_limits()?;
        if !(16..=1_000_000).contains(&self.events.buffer) {
            return Err(ConfigError::new(
                "events.buffer",
                format!("{} is outside 16..=1000000", self.events.buffer),
            ));
        }
        let (m, a) = (self.metrics.listen, self.api.listen);
        // Port 0: the kernel picks a free port for each.
        if self.metrics.enabled
            && m.port() != 0
            && m.port() == a.port()
            && (m.ip() == a.ip() || m.ip().is_unspecified() || a.ip().is_unspecified())
        {
            return Err(ConfigError::new(
                "metrics.listen",
                format!("{m} overlaps the API's address {a} (api.listen): use another port"),
            ));
        }
        Ok(())
    }

    /// The API must not be reachable from other hosts without authentication, and a bearer
    /// token must not cross the network in clear.
    fn check_exposure(&self) -> Result<(), ConfigError> {
        let api = &self.api;
        let mutual_tls = api.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if api.token_file.is_some() && api.tls.is_none() && !api.listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "api.tls",
                format!(
                    "a bearer token on {}, which is not a loopback address, needs TLS: plain \
                     HTTP/2 would carry the token in clear. Configure [api.tls] (cert, key) or \
                     listen on a loopback address",
                    api.listen
                ),
            ));
        }
        if api.token_file.is_some() || mutual_tls {
            return Ok(());
        }
        let how = "set api.token_file (a bearer token; off loopback also api.tls) or api.tls with \
                   client_ca (mutual TLS)";
        if api.require_auth {
            return Err(ConfigError::new(
                "api.require_auth",
                format!("authentication is required but none is configured: {how}"),
            ));
        }
        if !api.listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "api.listen",
                format!(
                    "{} is not a loopback address, so other hosts could drive the relay: {how}",
                    api.listen
                ),
            ));
        }
        Ok(())
    }

    fn check_api_limits(&self) -> Result<(), ConfigError> {
        let api = &self.api;
        if !(1..=100_000).contains(&api.max_connections) {
            return Err(ConfigError::new(
                "api.max_connections",
                format!("{} is outside 1..=100000", api.max_connections),
            ));
        }
        if !(1..=100_000).contains(&api.max_concurrent_streams) {
            return Err(ConfigError::new(
                "api.max_concurrent_streams",
                format!("{} is outside 1..=100000", api.max_concurrent_streams),
            ));
        }
        if !(1..=100_000).contains(&api.max_requests_per_connection) {
            return Err(ConfigError::new(
                "api.max_requests_per_connection",
                format!("{} is outside 1..=100000", api.max_requests_per_connection),
            ));
        }
        for (key, d) in [
            ("api.tls_handshake_timeout", api.tls_handshake_timeout),
            ("api.shutdown_grace", api.shutdown_grace),
        ] {
            if !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&d) {
                return Err(ConfigError::new(
                    key,
                    format!("{d:?} is outside 10ms..=600s"),
                ));
            }
        }
        Ok(())
    }

    /// Which layout is configured, and its name.
    pub fn layout(&self) -> Result<(Layout, LayoutName), ConfigError> {
        let r = &self.relay;
        let name = match (r.layout, &r.ports) {
            (None, Some(_)) => LayoutName::Custom,
            (None, None) => LayoutName::S,
            (Some(n), _) => n,
        };
        match (name, &r.ports) {
            (LayoutName::X | LayoutName::S, Some(_)) => {
                return Err(ConfigError::new(
                    "relay.ports",
                    format!(
                        "a port range needs layout = \"custom\", not {:?}",
                        name.name()
                    ),
                ));
            }
            (LayoutName::X | LayoutName::S, None) if r.capacity.is_some() => {
                return Err(ConfigError::new(
                    "relay.capacity",
                    "only a custom layout (relay.ports) takes a capacity",
                ));
            }
            (LayoutName::X, None) => return Ok((Layout::X, name)),
            (LayoutName::S, None) => return Ok((Layout::S, name)),
            (LayoutName::Custom, None) => {
                return Err(ConfigError::new(
                    "relay.ports",
                    "layout \"custom\" needs a port range \"FIRST-LAST\"",
                ));
            }
            (LayoutName::Custom, Some(_)) => {}
        }
        let ports = r.ports.as_deref().unwrap_or_default();
        let (first, last) =
            parse_port_range(ports).map_err(|e| ConfigError::new("relay.ports", e))?;
        let pairs = u32::from(last.saturating_sub(first).saturating_add(1)) / 2;
        let capacity = r.capacity.unwrap_or(pairs.max(1));
        // One relay address: the data path keys channels by port alone.
        let layout = Layout::custom(first, last, capacity, 1).map_err(|e| {
            use allocator::ConfigError as E;
            let key = match e {
                E::Capacity(_) | E::RangeTooSmall { .. } => "relay.capacity",
                _ => "relay.ports",
            };
            ConfigError::new(key, e)
        })?;
        Ok((layout, name))
    }

    /// The allocator's configuration, seeded with `seed`.
    pub fn allocator_config(&self, seed: u64) -> allocator::Config {
        let layout = self.layout().map_or(Layout::S, |(l, _)| l);
        allocator::Config {
            layout,
            upstream_kbps: self.pool.upstream_kbps,
            codec: self.pool.codec,
            quarantine: self.pool.quarantine,
            media_timeout: self.pool.media_timeout,
            seed,
        }
    }

    /// How to start the relay.
    pub fn relay_options(&self) -> RelayOptions {
        let layout = self.layout().map_or(Layout::S, |(l, _)| l);
        RelayOptions {
            port_min: layout.first_port(),
            port_max: layout.last_port(),
            workers: self.relay.workers,
            xdp: (!self.xdp.interfaces.is_empty()).then(|| XdpOptions {
                interfaces: self.xdp.interfaces.clone(),
                mode: self.xdp.mode,
                pin_dir: Some(self.xdp.pin_dir.clone()),
            }),
            require_xdp: self.xdp.require,
            events: None,
        }
    }

    /// The device registry's rules from `[devices]`.
    pub fn registry_policy(&self) -> Result<crate::devices::RegistryPolicy, ConfigError> {
        use relay_core::device::scram::{MAX_ITERATIONS, MIN_ITERATIONS};
        let d = &self.devices;
        let networks = relay_core::device::networks::Networks::parse(
            d.internal_networks.iter().map(String::as_str),
        )
        .map_err(|e| ConfigError::new("devices.internal_networks", e.to_string()))?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&d.password_iterations) {
            return Err(ConfigError::new(
                "devices.password_iterations",
                format!("must be {MIN_ITERATIONS} to {MAX_ITERATIONS}"),
            ));
        }
        let mut passwords = relay_core::device::password::PasswordPolicy::default();
        if !(8..=passwords.max_length).contains(&d.min_password_length) {
            return Err(ConfigError::new(
                "devices.min_password_length",
                format!("must be 8 to {}", passwords.max_length),
            ));
        }
        passwords.min_length = d.min_password_length;
        let mut firmware = relay_core::device::firmware::FirmwarePolicy::default();
        for (device, minimum) in &d.firmware_minimums {
            firmware.apply_override(device, minimum).map_err(|e| {
                ConfigError::new(format!("devices.firmware_minimums.{device}"), e.to_string())
            })?;
        }
        Ok(crate::devices::RegistryPolicy {
            passwords,
            firmware,
            networks,
            iterations: d.password_iterations,
            ..crate::devices::RegistryPolicy::default()
        })
    }

    /// The relay addresses legs A and B talk to unless a request names one.
    pub fn relay_addresses(&self) -> [Option<Ipv4Addr>; 2] {
        [self.relay.internet_address, self.relay.lan_address]
    }
}

/// The error's message with its line number, if the TOML parser knows the span.
/// The prefix of the toml crate's internal field names (`$__toml_private_datetime`).
const TOML_PRIVATE: &str = "$__toml_private";

fn with_line(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text
                .get(..span.start)
                .map_or(0, |t| t.matches('\n').count())
                + 1;
            format!("{} (line {line})", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// Reads the bearer token from `path` (surrounding whitespace ignored).
pub fn load_token(path: &Path) -> Result<String, ConfigError> {
    let key = "api.token_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(key, format!("reading {}: {e}", path.display())))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(ConfigError::new(
            key,
            format!(
                "the token in {} is shorter than {MIN_TOKEN_LEN} characters",
                path.display()
            ),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            key,
            format!(
                "the token in {} must be printable ASCII without spaces (it travels in an HTTP header)",
                path.display()
            ),
        ));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_toml(text)
            .expect_err("the config must be rejected")
            .to_string()
    }

    #[test]
    fn empty_file_is_the_built_in_default() {
        let c = Config::from_toml("").expect("valid");
        assert_eq!(c, Config::default());
        let (layout, name) = c.layout().expect("layout");
        assert_eq!((layout, name), (Layout::S, LayoutName::S));
        assert_eq!(layout.capacity(), 180);
        let opts = c.relay_options();
        assert_eq!((opts.port_min, opts.port_max), (30528, 30887));
        assert!(opts.xdp.is_none(), "user space only by default");
        assert_eq!(c.api.listen, DEFAULT_LISTEN);
        assert_eq!(DEFAULT_SERVER_URL, format!("http://{DEFAULT_LISTEN}"));
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/homerelay.toml");
        let c = Config::load(Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        // The example shows every key with a value other than the default where that is safe,
        // so a key dropped from the types (or renamed) fails here.
        assert_eq!(c.relay.layout, Some(LayoutName::S));
        assert_eq!(
            c.relay.internet_address,
            Some(Ipv4Addr::new(198, 51, 100, 1))
        );
        assert_eq!(c.relay.lan_address, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(c.pool.upstream_kbps, Some(10_000));
        assert_eq!(c.pool.codec, Codec::G711);
        assert_eq!(c.pool.media_timeout, Duration::from_secs(60));
        assert_eq!(c.api.listen, DEFAULT_LISTEN);
        assert!(c.xdp.interfaces.is_empty());
        assert!(c.metrics.enabled);
        assert_eq!(c.metrics.listen, crate::metrics::DEFAULT_LISTEN);
        assert_eq!(c.api.max_connections, 128);
        assert_eq!(c.api.max_concurrent_streams, 512);
        assert_eq!(c.api.max_requests_per_connection, 32);
        assert_eq!(c.api.tls_handshake_timeout, Duration::from_secs(5));
        assert_eq!(c.api.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.public_address.refresh, Duration::from_secs(120));
        assert!(!c.public_address.discovery(), "off unless a server is set");
    }

    #[test]
    fn the_example_public_address_section_uncommented_is_valid() {
        // Its commented keys, switched on (all but the static address, which excludes the
        // servers), must be the real keys with valid values.
        let text = include_str!("../../deploy/homerelay.toml");
        let section: String = text
            .lines()
            .skip_while(|l| l.trim() != "[public_address]")
            .take_while(|l| !l.starts_with('[') || l.trim() == "[public_address]")
            .filter_map(|l| {
                if l.starts_with('[') || l.starts_with("refresh") {
                    return Some(l.to_owned());
                }
                let l = l.strip_prefix("# ")?;
                let (key, _) = l.split_once(" = ")?;
                (key != "static_address"
                    && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .then(|| l.to_owned())
            })
            .map(|l| l + "\n")
            .collect();
        let c = Config::from_toml(&section).unwrap_or_else(|e| panic!("{section}: {e}"));
        let p = &c.public_address;
        assert!(
            p.itsp_stun_server.is_some() && p.stun_server.is_some(),
            "{section}"
        );
        assert!(p.local_address.is_some(), "{section}");
        let with_static = format!("[public_address]\n{}", {
            let line = text
                .lines()
                .find(|l| l.starts_with("# static_address = "))
                .expect("the example shows static_address");
            line.trim_start_matches("# ").to_owned()
        });
        let c = Config::from_toml(&with_static).unwrap_or_else(|e| panic!("{with_static}: {e}"));
        assert!(c.public_address.static_address.is_some());
    }

    #[test]
    fn the_apps_https_api_needs_the_tls_certificate() {
        let c = Config::from_toml("").expect("valid");
        assert_eq!(c.registration.https_listen, None, "off by default");
        let e = Config::from_toml("[registration]\nhttps_listen = \"0.0.0.0:8802\"\n")
            .expect_err("no certificate");
        assert_eq!(e.key, "registration.https_listen");
        assert!(e.message.contains("registration.tls_cert"), "{e}");
        let c = Config::from_toml(
            "[registration]\nhttps_listen = \"0.0.0.0:8802\"\n\
             tls_cert = \"/etc/homerelay/relay.pem\"\ntls_key = \"/etc/homerelay/relay.key\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.registration.https_listen,
            Some(SocketAddr::from(([0, 0, 0, 0], 8802)))
        );
        assert!(err("[registration]\nhttps_listen = \"8802\"\n").contains("https_listen"));
    }

    #[test]
    fn lockout_and_firmware_minimums_are_configurable_and_checked() {
        let c = Config::from_toml(
            "[registration]\nlockout_device_failures = 3\nlockout_first = \"1m\"\n\
             lockout_max = \"2h\"\n[devices]\n\
             firmware_minimums = { openstage_hfa = \"V3 R1.0.0\", sip_device = \"none\" }\n",
        )
        .expect("valid");
        let lockout = c.registration.lockout_policy().expect("lockout");
        assert_eq!(
            (lockout.device_threshold, lockout.source_threshold),
            (3, 20)
        );
        assert_eq!((lockout.base_ms, lockout.cap_ms), (60_000, 7_200_000));
        let policy = c.registry_policy().expect("policy");
        use relay_core::device::DeviceType;
        assert!(
            policy
                .firmware
                .check(DeviceType::OpenStageHfa, "V3 R0.40.4")
                .is_err(),
            "the raised minimum refuses what the built-in one admits"
        );
        assert!(
            policy
                .firmware
                .check(DeviceType::OpenStageHfa, "V3 R1.0.0")
                .is_ok()
        );
        // The defaults are the built-in policy's.
        let d = Config::from_toml("").expect("valid");
        assert_eq!(
            d.registration.lockout_policy().expect("lockout"),
            relay_core::device::lockout::LockoutPolicy::default()
        );
        for (text, key) in [
            (
                "[registration]\nlockout_device_failures = 0\n",
                "registration.lockout_device_failures",
            ),
            (
                "[registration]\nlockout_first = \"2h\"\n",
                "registration.lockout_first",
            ),
            (
                "[registration]\nlockout_max = \"30d\"\n",
                "registration.lockout_max",
            ),
            (
                "[devices]\nfirmware_minimums = { toaster = \"V1\" }\n",
                "devices.firmware_minimums.toaster",
            ),
            (
                "[devices]\nfirmware_minimums = { openstage_hfa = \"soon\" }\n",
                "devices.firmware_minimums.openstage_hfa",
            ),
        ] {
            let e = Config::from_toml(text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    #[test]
    fn the_example_registration_section_uncommented_is_valid() {
        // The example leaves the listeners off; its commented keys, switched on, must be the
        // real keys with valid values.
        let text = include_str!("../../deploy/homerelay.toml");
        let section: String = text
            .lines()
            .skip_while(|l| l.trim() != "[registration]")
            .take_while(|l| !l.starts_with('[') || l.trim() == "[registration]")
            .filter_map(|l| {
                if l.starts_with('[') {
                    return Some(l.to_owned());
                }
                let l = l.strip_prefix("# ")?;
                let (key, _) = l.split_once(" = ")?;
                key.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
                    .then(|| l.to_owned())
            })
            .map(|l| l + "\n")
            .collect();
        let c = Config::from_toml(&section).unwrap_or_else(|e| panic!("{section}: {e}"));
        let r = &c.registration;
        assert!(r.listen.is_some() && r.tls_listen.is_some(), "{section}");
        assert_eq!(r.https_listen.map(|a| a.port()), Some(8802), "{section}");
        assert!(r.tls_cert.is_some() && r.tls_key.is_some(), "{section}");
    }

    #[test]
    fn public_address_discovery_is_off_by_default_and_checked() {
        let c = Config::from_toml("").expect("valid");
        assert!(!c.public_address.discovery());
        assert_eq!(c.public_address.refresh, DEFAULT_PUBLIC_ADDRESS_REFRESH);
        let c = Config::from_toml(
            "[public_address]\nitsp_stun_server = \"stun.itsp.example:3478\"\n\
             stun_server = \"192.0.2.7\"\nrefresh = \"1s\"\nlocal_address = \"203.0.113.10\"\n",
        )
        .expect("valid");
        let p = &c.public_address;
        assert!(p.discovery());
        assert_eq!(
            p.itsp_stun_server.as_deref(),
            Some("stun.itsp.example:3478")
        );
        assert_eq!(p.refresh, Duration::from_secs(1));
        assert_eq!(p.local_address, Some(Ipv4Addr::new(203, 0, 113, 10)));
        for ok in [
            "stun.example.net",
            "stun.example.net.",
            "stun_1.example.net:19302",
            "localhost",
            "192.0.2.7:3478",
            "192.0.2.7",
        ] {
            check_stun_server(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (text, message) in [
            (
                "[public_address]\nstun_server = \"\"\n",
                "public_address.stun_server: \"\" is not a STUN server like \"stun.example.net\" \
                 or \"192.0.2.7:3478\"",
            ),
            (
                "[public_address]\nstun_server = \"stun.example.net:0\"\n",
                "public_address.stun_server: \"stun.example.net:0\": \"0\" is not a port (1 to \
                 65535)",
            ),
            (
                "[public_address]\nitsp_stun_server = \"stun.example.net:http\"\n",
                "public_address.itsp_stun_server: \"stun.example.net:http\": \"http\" is not a \
                 port (1 to 65535)",
            ),
            (
                "[public_address]\nstun_server = \"192.0.2.300\"\n",
                "public_address.stun_server: \"192.0.2.300\": \"192.0.2.300\" is not a host \
                 name or an IPv4 address",
            ),
            (
                "[public_address]\nstun_server = \"stun..example\"\n",
                "public_address.stun_server: \"stun..example\": \"stun..example\" is not a host \
                 name or an IPv4 address",
            ),
            (
                "[public_address]\nstun_server = \"-stun.example\"\n",
                "public_address.stun_server: \"-stun.example\": \"-stun.example\" is not a host \
                 name or an IPv4 address",
            ),
            (
                "[public_address]\nstun_server = \"stun example\"\n",
                "public_address.stun_server: \"stun example\" is not a STUN server like \
                 \"stun.example.net\" or \"192.0.2.7:3478\"",
            ),
            (
                "[public_address]\nrefresh = \"500ms\"\n",
                "public_address.refresh: 500ms is outside 1s..=24h",
            ),
            (
                "[public_address]\nrefresh = \"2days\"\n",
                "public_address.refresh: 172800s is outside 1s..=24h",
            ),
            (
                "[public_address]\nstun_server = \"192.0.2.7\"\nstatic_address = \"198.51.100.1\"\n",
                "public_address.static_address: a static public address turns discovery off, \
                 but public_address.stun_server is set: remove one of them",
            ),
            (
                "[public_address]\nstatic_address = \"0.0.0.0\"\n",
                "public_address.static_address: 0.0.0.0 is not a unicast address",
            ),
            (
                "[public_address]\nlocal_address = \"224.0.0.1\"\n",
                "public_address.local_address: 224.0.0.1 is not a unicast address",
            ),
        ] {
            assert_eq!(err(text), message, "{text}");
        }
        let e = err("[public_address]\nstun_server = \"[2001:db8::1]:3478\"\n");
        assert!(e.starts_with("public_address.stun_server: "), "{e}");
        assert!(e.contains("IPv6"), "{e}");
        let e = err("[public_address]\nstun_server = \"2001:db8::1\"\n");
        assert!(e.contains("IPv6"), "{e}");
        let e = err("[public_address]\nstun_server = 3478\n");
        assert!(e.starts_with("public_address.stun_server: "), "{e}");
        let e = err("[public_address]\nstatic_address = \"2001:db8::1\"\n");
        assert!(e.starts_with("public_address.static_address: "), "{e}");
        let e = err("[public_address]\nstun = \"x\"\n");
        assert!(
            e.starts_with("public_address.stun: unknown field `stun`"),
            "{e}"
        );
    }

    #[test]
    fn api_limits_have_defaults_and_bounds() {
        let c = Config::from_toml("").expect("valid");
        assert_eq!(c.api.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.api.tls_handshake_timeout, DEFAULT_TLS_HANDSHAKE_TIMEOUT);
        for (text, message) in [
            (
                "[api]\nmax_connections = 0\n",
                "api.max_connections: 0 is outside 1..=100000",
            ),
            (
                "[api]\nmax_concurrent_streams = 0\n",
                "api.max_concurrent_streams: 0 is outside 1..=100000",
            ),
            (
                "[api]\nmax_requests_per_connection = 0\n",
                "api.max_requests_per_connection: 0 is outside 1..=100000",
            ),
            (
                "[api]\ntls_handshake_timeout = \"1h\"\n",
                "api.tls_handshake_timeout: 3600s is outside 10ms..=600s",
            ),
            (
                "[api]\nshutdown_grace = \"0s\"\n",
                "api.shutdown_grace: 0ns is outside 10ms..=600s",
            ),
        ] {
            assert_eq!(err(text), message, "{text}");
        }
    }

    #[test]
    fn metrics_can_move_or_be_switched_off() {
        let c = Config::from_toml("[metrics]\nlisten = \"0.0.0.0:9100\"\n").expect("valid");
        assert_eq!(c.metrics.listen.port(), 9100);
        let c = Config::from_toml("[metrics]\nenabled = false\n").expect("valid");
        assert!(!c.metrics.enabled);
        let e = err("[metrics]\nlisten = \"0.0.0.0:4080\"\n");
        assert_eq!(
            e,
            "metrics.listen: 0.0.0.0:4080 overlaps the API's address 127.0.0.1:4080 (api.listen): \
             use another port"
        );
        Config::from_toml("[api]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
            .expect("port 0 twice: two ports the kernel picks");
        // Off: its address does not matter.
        Config::from_toml("[metrics]\nenabled = false\nlisten = \"127.0.0.1:4080\"\n")
            .expect("valid");
        let e = err("[metrics]\nport = 9100\n");
        assert!(e.starts_with("metrics.port: unknown field `port`"), "{e}");
        let mut c = Config::default();
        c.apply(Overrides {
            no_metrics: true,
            ..Overrides::default()
        })
        .expect("valid");
        assert!(!c.metrics.enabled);
        c.apply(Overrides {
            metrics_listen: Some("127.0.0.1:9500".parse().expect("addr")),
            ..Overrides::default()
        })
        .expect("valid");
        assert!(c.metrics.enabled);
        assert_eq!(c.metrics.listen.port(), 9500);
    }

    /// Found by the config fuzz target: a datetime where a section or a string belongs was
    /// reported under the toml crate's internal field name.
    #[test]
    fn a_datetime_in_the_wrong_place_names_the_key() {
        let e = Config::from_toml("relay = 1979-05-27T07:32:00Z\n").expect_err("rejected");
        assert_eq!(e.key, "relay", "{e}");
        let e = Config::from_toml("[api]\nlisten = 1979-05-27T07:32:00Z\n").expect_err("rejected");
        assert_eq!(e.key, "api.listen", "{e}");
        let e = Config::from_toml("[xdp]\ninterfaces = [1979-05-27]\n").expect_err("rejected");
        assert!(!e.key.contains('$'), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let e = err("[relay]\nprots = \"20000-20099\"\n");
        assert!(e.starts_with("relay.prots: unknown field `prots`"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = err("[relai]\n");
        assert!(e.starts_with("relai: unknown field `relai`"), "{e}");
        let e = err("[api.tls]\ncert = \"a\"\nkey = \"b\"\nclient_cert = \"c\"\n");
        assert!(
            e.starts_with("api.tls.client_cert: unknown field `client_cert`"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_rejected_naming_the_key() {
        let cases = [
            (
                "[relay]\nports = \"20001-20100\"\n",
                "relay.ports: first port 20001 is odd: an rtp port must be even",
            ),
            (
                "[relay]\nports = \"80-1000\"\n",
                "relay.ports: first port 80 is below 1024",
            ),
            (
                "[relay]\nports = \"20000\"\n",
                "relay.ports: \"20000\" is not FIRST-LAST",
            ),
            (
                "[relay]\nlayout = \"x\"\nports = \"20000-20099\"\n",
                "relay.ports: a port range needs layout = \"custom\", not \"x\"",
            ),
            (
                "[relay]\nlayout = \"custom\"\n",
                "relay.ports: layout \"custom\" needs a port range \"FIRST-LAST\"",
            ),
            (
                "[relay]\nports = \"20000-20019\"\ncapacity = 11\n",
                "relay.capacity: port range 20000-20019 on 1 relay address(es) has 10 port \
                 pairs, fewer than the capacity of 11 channels",
            ),
            (
                "[relay]\ncapacity = 10\n",
                "relay.capacity: only a custom layout (relay.ports) takes a capacity",
            ),
            (
                "[pool]\nupstream_kbps = 0\n",
                "pool.upstream_kbps: upstream bandwidth must be positive (leave it unset for no limit)",
            ),
            (
                "[pool]\nmedia_timeout = \"2days\"\n",
                "pool.media_timeout: media timeout 172800s is outside 1ms..=86400s",
            ),
            (
                "[xdp]\nrequire = true\n",
                "xdp.require: the fast path is required but xdp.interfaces (--xdp-iface) names no interface",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\", \"eth0\"]\n",
                "xdp.interfaces: \"eth0\" is listed twice",
            ),
            (
                "[events]\npoll_interval = \"250ms\"\n",
                "events.poll_interval: unknown field `poll_interval`, expected `buffer` (line 2)",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(err(text), message, "{text}");
        }
        // Type errors from the parser carry the key too.
        let e = err("[xdp]\nmode = \"fast\"\n");
        assert!(e.starts_with("xdp.mode: unknown XDP mode \"fast\""), "{e}");
        let e = err("[pool]\nquarantine = \"10 parsecs\"\n");
        assert!(
            e.starts_with("pool.quarantine: \"10 parsecs\" is not a duration"),
            "{e}"
        );
        let e = err("[pool]\ncodec = \"amr\"\n");
        assert!(e.starts_with("pool.codec: unknown codec \"amr\""), "{e}");
        let e = err("[relay]\ninternet_address = \"2001:db8::1\"\n");
        assert!(e.starts_with("relay.internet_address: "), "{e}");
        let e = err("[relay]\nworkers = -1\n");
        assert!(e.starts_with("relay.workers: "), "{e}");
    }

    #[test]
    fn the_api_refuses_other_hosts_without_authentication() {
        let e = err("[api]\nlisten = \"0.0.0.0:4080\"\n");
        assert!(
            e.starts_with("api.listen: 0.0.0.0:4080 is not a loopback address"),
            "{e}"
        );
        let e = err("[api]\nrequire_auth = true\n");
        assert!(
            e.starts_with("api.require_auth: authentication is required"),
            "{e}"
        );
        // Server-only TLS does not authenticate clients.
        let e =
            err("[api]\nlisten = \"[::]:4080\"\n[api.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n");
        assert!(e.starts_with("api.listen: "), "{e}");
        // A token over plain HTTP/2 to other hosts would travel in clear.
        let e = err("[api]\nlisten = \"0.0.0.0:4080\"\ntoken_file = \"/etc/homerelay/token\"\n");
        assert!(
            e.starts_with(
                "api.tls: a bearer token on 0.0.0.0:4080, which is not a loopback address, needs TLS"
            ),
            "{e}"
        );
        for ok in [
            "[api]\nlisten = \"0.0.0.0:4080\"\ntoken_file = \"/etc/homerelay/token\"\n[api.tls]\ncert = \"c\"\nkey = \"k\"\n",
            "[api]\nlisten = \"127.0.0.1:4080\"\nrequire_auth = true\ntoken_file = \"/etc/homerelay/token\"\n",
            "[api]\nlisten = \"0.0.0.0:4080\"\n[api.tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n",
            "[api]\nlisten = \"[::1]:4080\"\n",
        ] {
            Config::from_toml(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn overrides_win_over_the_file() {
        let mut c =
            Config::from_toml("[relay]\nports = \"20000-20099\"\ncapacity = 10\n").expect("valid");
        c.apply(Overrides {
            layout: Some(LayoutName::X),
            ..Overrides::default()
        })
        .expect("valid");
        assert_eq!(c.layout().expect("layout").0, Layout::X);
        c.apply(Overrides {
            ports: Some("40000-40099".into()),
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            xdp_interfaces: Some(vec!["eth0".into()]),
            ..Overrides::default()
        })
        .expect("valid");
        let (layout, name) = c.layout().expect("layout");
        assert_eq!(name, LayoutName::Custom);
        assert_eq!((layout.first_port(), layout.capacity()), (40000, 50));
        assert!(c.relay_options().xdp.is_some());
        let e = c
            .apply(Overrides {
                listen: Some("0.0.0.0:4080".parse().expect("addr")),
                ..Overrides::default()
            })
            .expect_err("no auth");
        assert_eq!(e.key, "api.listen");
    }

    #[test]
    fn tokens_must_be_long_printable_secrets() {
        let dir = std::env::temp_dir().join(format!("homerelay-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("token");
        std::fs::write(&file, "0123456789abcdef0123\n").expect("write");
        assert_eq!(load_token(&file).expect("valid"), "0123456789abcdef0123");
        std::fs::write(&file, "short\n").expect("write");
        assert!(
            load_token(&file)
                .expect_err("short")
                .message
                .contains("shorter")
        );
        std::fs::write(&file, "0123456789 abcdef0123").expect("write");
        assert!(
            load_token(&file)
                .expect_err("space")
                .message
                .contains("printable")
        );
        let e = load_token(&dir.join("missing")).expect_err("missing");
        assert_eq!(e.key, "api.token_file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
