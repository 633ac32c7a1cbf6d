//! The relay's public address: what the company router's NAT makes of the relay's Internet
//! address (`relay.internet_address`, leg A's), learnt with STUN (RFC 8489 Binding) from the
//! ITSP's STUN server, or from a configured one when that gives no answer, and refreshed every
//! `public_address.refresh` so a dynamic IP behind a dynamic-DNS name is followed
//! (docs/public-address.md). Channels report it on leg A as where a remote device must send
//! its media: the public address on the channel's own port, which the router forwards 1:1.
//!
//! The invariant a reader must know: **the status is replaced before a change is published**,
//! so a client that saw an event and then allocates a channel gets the new address; and a
//! refresh without an answer never forgets the last address known (it is marked stale).
//!
//! The decisions — which answer counts, what is a change, what the status says — are the pure
//! [`apply_round`]; [`Discovery`] owns the socket and the timer; [`PublicAddress`] is the shared
//! state the channel service reads when it reports a channel and the gRPC service
//! (`relay.v1.PublicAddressService`) serves.
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relay_core::stun::client::Change;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::stun_client::{self, Retransmit};

/// Events buffered per subscriber before it lags (changes are rare: minutes apart at least).
pub const EVENT_BUFFER: usize = 64;

/// Where the public address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// None is known (discovery had no answer yet, or nothing is configured).
    Unknown,
    /// The ITSP's STUN server answered.
    Itsp,
    /// The configured STUN server answered.
    Configured,
    /// `public_address.static_address`.
    Static,
    /// No STUN server: `relay.internet_address` itself.
    InternetAddress,
}

impl Source {
    /// Stable lowercase name (CLI, logs).
    pub const fn name(self) -> &'static str {
        match self {
            Source::Unknown => "unknown",
            Source::Itsp => "itsp",
            Source::Configured => "configured",
            Source::Static => "static",
            Source::InternetAddress => "internet_address",
        }
    }
}

/// Which configured STUN server: the metric label of failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerRole {
    /// `public_address.itsp_stun_server`, asked first.
    Itsp,
    /// `public_address.stun_server`, the fallback.
    Configured,
}

impl ServerRole {
    pub const ALL: [ServerRole; 2] = [ServerRole::Itsp, ServerRole::Configured];

    /// The label value and CLI word.
    pub const fn name(self) -> &'static str {
        match self {
            ServerRole::Itsp => "itsp",
            ServerRole::Configured => "configured",
        }
    }

    /// The source of an address this server gave.
    pub const fn source(self) -> Source {
        match self {
            ServerRole::Itsp => Source::Itsp,
            ServerRole::Configured => Source::Configured,
        }
    }
}

/// The public address and its discovery, as `GetPublicAddress` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicStatus {
    /// The public address; after a refresh without an answer, the last one known.
    pub address: Option<Ipv4Addr>,
    pub source: Source,
    /// The relay address the public address stands for (STUN requests are sent from it).
    pub local_address: Option<Ipv4Addr>,
    /// Whether STUN discovery runs.
    pub discovery: bool,
    pub refresh: Duration,
    /// The server that gave `address`, as configured.
    pub server: Option<String>,
    /// That server's address as resolved for its answer.
    pub server_address: Option<SocketAddr>,
    /// The discovery socket's own address when the server answered.
    pub discovery_local: Option<SocketAddr>,
    /// The discovery socket as the server saw it.
    pub mapped: Option<SocketAddr>,
    pub last_refresh: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    /// The failures of the last refresh, server by server (also when a later one answered).
    pub last_error: Option<String>,
    /// The last refresh got no answer: `address` is the last one known.
    pub stale: bool,
    /// Changes from one known address to another.
    pub changes: u64,
    /// When the address last changed or was first learnt.
    pub changed_at: Option<SystemTime>,
}

impl PublicStatus {
    /// The status before any refresh: a static address, `relay.internet_address` when no STUN
    /// server is configured, else unknown until the first answer.
    pub fn from_config(config: &Config) -> PublicStatus {
        let p = &config.public_address;
        let local_address = p.local_address.or(config.relay.internet_address);
        let (address, source) = match (p.static_address, p.discovery(), local_address) {
            (Some(a), _, _) => (Some(a), Source::Static),
            (None, true, _) => (None, Source::Unknown),
            (None, false, Some(a)) => (Some(a), Source::InternetAddress),
            (None, false, None) => (None, Source::Unknown),
        };
        PublicStatus {
            address,
            source,
            local_address,
            discovery: p.discovery() && p.static_address.is_none(),
            refresh: p.refresh,
            server: None,
            server_address: None,
            discovery_local: None,
            mapped: None,
            last_refresh: None,
            last_success: None,
            last_error: None,
            stale: false,
            changes: 0,
            changed_at: None,
        }
    }

    /// Where a peer on the Internet sends media for a leg whose relay address is
    /// `leg_relay`: the public address on the leg's port, when the leg's relay address is the
    /// one the public address stands for (or both are left to the kernel).
    pub fn media_address(&self, leg_relay: SocketAddr) -> Option<SocketAddr> {
        let public = self.address?;
        let stands_for = match (self.local_address, leg_relay.ip()) {
            (Some(local), IpAddr::V4(ip)) => ip == local,
            (Some(local), IpAddr::V6(ip)) => ip.to_ipv4_mapped() == Some(local),
            (None, ip) => ip.is_unspecified(),
        };
        stands_for.then(|| SocketAddr::new(IpAddr::V4(public), leg_relay.port()))
    }

    /// Whether the NAT kept the discovery socket's port; `None` before an answer.
    pub fn port_preserved(&self) -> Option<bool> {
        Some(self.mapped?.port() == self.discovery_local?.port())
    }
}

/// One server's answer in a refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answered {
    /// The server's address as resolved.
    pub server_address: SocketAddr,
    /// The discovery socket's own address.
    pub local: SocketAddr,
    /// The socket's address as the server saw it (XOR-MAPPED-ADDRESS).
    pub mapped: SocketAddr,
}

/// One server asked in a refresh, and what came of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asked {
    pub role: ServerRole,
    /// The server as configured.
    pub server: String,
    /// Its answer, or why there was none.
    pub result: Result<Answered, String>,
}

/// What a refresh changed, as published on the event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The address changed (`previous` is `None` when it was learnt for the first time).
    Changed { previous: Option<Ipv4Addr> },
    /// No server answered after the last refresh had an answer (or at the first refresh).
    Failed,
    /// A server answered again, with the address known before.
    Recovered,
}

impl Transition {
    /// Stable lowercase name (logs, CLI).
    pub const fn name(self) -> &'static str {
        match self {
            Transition::Changed { .. } => "changed",
            Transition::Failed => "failed",
            Transition::Recovered => "recovered",
        }
    }
}

/// The status after a refresh that asked the servers in `asked` (in the order asked; the
/// first answer counts) at `at`, and what it changed. Pure: the one place that decides.
pub fn apply_round(
    prev: &PublicStatus,
    asked: &[Asked],
    at: SystemTime,
) -> (PublicStatus, Option<Transition>) {
    let mut next = prev.clone();
    next.last_refresh = Some(at);
    let mut errors = Vec::new();
    let mut answer = None;
    for a in asked {
        match &a.result {
            Ok(ans) => {
                if let IpAddr::V4(public) = ans.mapped.ip() {
                    answer = Some((a, ans, public));
                    break;
                }
                errors.push(format!(
                    "{} server {}: mapped address {} is not IPv4",
                    a.role.name(),
                    a.server,
                    ans.mapped
                ));
            }
            Err(e) => errors.push(format!("{} server {}: {e}", a.role.name(), a.server)),
        }
    }
    next.last_error = (!errors.is_empty()).then(|| errors.join("; "));
    let Some((asked, ans, public)) = answer else {
        next.stale = true;
        let transition = (!prev.stale).then_some(Transition::Failed);
        return (next, transition);
    };
    next.address = Some(public);
    next.source = asked.role.source();
    next.server = Some(asked.server.clone());
    next.server_address = Some(ans.server_address);
    next.discovery_local = Some(ans.local);
    next.mapped = Some(ans.mapped);
    next.last_success = Some(at);
    next.stale = false;
    let transition = if prev.address != Some(public) {
        if prev.address.is_some() {
            next.changes += 1;
        }
        next.changed_at = Some(at);
        Some(Transition::Changed {
            previous: prev.address,
        })
    } else if prev.stale {
        Some(Transition::Recovered)
    } else {
        None
    };
    (next, transition)
}

/// The retransmission schedule for a refresh interval: RFC 8489's (RTO 500 ms, Rc 7, Rm 16),
/// cut short so that one server takes at most half the interval and both fit in one refresh.
/// Below a few seconds (labs) the RTO shrinks with it.
pub fn retransmit_for(refresh: Duration) -> Retransmit {
    let rfc = Retransmit::default();
    let budget = refresh / 2;
    let rto = rfc.rto.min(budget / 4).max(Duration::from_millis(10));
    for attempts in (1..=rfc.attempts).rev() {
        for last_wait_factor in [rfc.last_wait_factor, 8, 4, 2] {
            let r = Retransmit {
                rto,
                attempts,
                last_wait_factor,
            };
            if r.total() <= budget {
                return r;
            }
        }
    }
    // Unreachable for a refresh of at least a second (validated): one request, one RTO.
    Retransmit {
        rto,
        attempts: 1,
        last_wait_factor: 1,
    }
}

/// One public address event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicAddressEvent {
    pub transition: Transition,
    /// The status after it.
    pub status: PublicStatus,
    pub at: SystemTime,
}

/// The shared public address: read by the channel service for every channel it reports,
/// written by [`Discovery`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PublicAddress {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    status: watch::Sender<PublicStatus>,
    events: broadcast::Sender<PublicAddressEvent>,
}

impl Default for PublicAddress {
    /// Nothing known (a service without configuration).
    fn default() -> Self {
        PublicAddress::new(PublicStatus::from_config(&Config::default()))
    }
}

impl PublicAddress {
    /// A shared state starting at `status`.
    pub fn new(status: PublicStatus) -> PublicAddress {
        PublicAddress {
            inner: Arc::new(Inner {
                status: watch::channel(status).0,
                events: broadcast::channel(EVENT_BUFFER).0,
            }),
        }
    }

    /// The status now.
    pub fn status(&self) -> PublicStatus {
        self.inner.status.borrow().clone()
    }

    /// See [`PublicStatus::media_address`] (without copying the status).
    pub fn media_address(&self, leg_relay: SocketAddr) -> Option<SocketAddr> {
        self.inner.status.borrow().media_address(leg_relay)
    }

    /// Events from now on. Subscribe before reading [`PublicAddress::status`] and no change
    /// falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<PublicAddressEvent> {
        self.inner.events.subscribe()
    }

    /// Replaces the status, then publishes the transition (see the module's invariant).
    fn set(&self, status: PublicStatus, transition: Option<Transition>, at: SystemTime) {
        self.inner.status.send_replace(status.clone());
        if let Some(transition) = transition {
            let _ = self.inner.events.send(PublicAddressEvent {
                transition,
                status,
                at,
            });
        }
    }
}

/// The discovery task: asks the servers in order every refresh interval and applies the
/// answers to a [`PublicAddress`].
#[derive(Debug)]
pub struct Discovery {
    servers: Vec<(ServerRole, String)>,
    local: Option<Ipv4Addr>,
    refresh: Duration,
    retransmit: Retransmit,
    public: PublicAddress,
    metrics: Metrics,
}

impl Discovery {
    /// The discovery `config` asks for, writing to `public`; `None` when there is none (no
    /// STUN server, or a static address).
    pub fn new(config: &Config, public: PublicAddress, metrics: Metrics) -> Option<Discovery> {
        let p = &config.public_address;
        if p.static_address.is_some() {
            return None;
        }
        let servers: Vec<(ServerRole, String)> = [
            (ServerRole::Itsp, &p.itsp_stun_server),
            (ServerRole::Configured, &p.stun_server),
        ]
        .into_iter()
        .filter_map(|(role, s)| Some((role, s.clone()?)))
        .collect();
        if servers.is_empty() {
            return None;
        }
        Some(Discovery {
            servers,
            local: p.local_address.or(config.relay.internet_address),
            refresh: p.refresh,
            retransmit: retransmit_for(p.refresh),
            public,
            metrics,
        })
    }

    /// Refreshes at once and then every interval (counted from the start of a refresh; one
    /// that takes longer is followed by the next at once) until `stopping` completes.
    pub async fn run(self, stopping: impl Future<Output = ()>) {
        let mut stopping = std::pin::pin!(stopping);
        let mut interval = tokio::time::interval(self.refresh);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut socket = None;
        let names: Vec<String> = self
            .servers
            .iter()
            .map(|(role, s)| format!("{} {s}", role.name()))
            .collect();
        log::info!(
            "public address discovery from {} every {:?}: STUN servers {}",
            self.local.map_or_else(
                || "the kernel's source address".to_owned(),
                |a| a.to_string()
            ),
            self.refresh,
            names.join(", then ")
        );
        loop {
            tokio::select! {
                () = &mut stopping => return,
                _ = interval.tick() => {}
            }
            let asked = tokio::select! {
                () = &mut stopping => return,
                asked = self.ask(&mut socket) => asked,
            };
            self.apply(&asked, SystemTime::now());
        }
    }

    /// Asks the servers in order until one answers. The socket is kept between refreshes (one
    /// NAT mapping) and made anew after a refresh without an answer (a mapping the router may
    /// have left on an address it no longer has is not used again).
    async fn ask(&self, socket: &mut Option<UdpSocket>) -> Vec<Asked> {
        let mut asked = Vec::new();
        let bind = SocketAddr::new(IpAddr::V4(self.local.unwrap_or(Ipv4Addr::UNSPECIFIED)), 0);
        if socket.is_none() {
            match UdpSocket::bind(bind).await {
                Ok(s) => *socket = Some(s),
                Err(e) => {
                    let error = format!("binding the discovery socket on {bind}: {e}");
                    return self
                        .servers
                        .iter()
                        .map(|(role, server)| Asked {
                            role: *role,
                            server: server.clone(),
                            result: Err(error.clone()),
                        })
                        .collect();
                }
            }
        }
        let Some(sock) = socket.as_ref() else {
            return asked;
        };
        for (role, server) in &self.servers {
            let result = self.ask_one(sock, server, bind).await;
            let answered = result.is_ok();
            asked.push(Asked {
                role: *role,
                server: server.clone(),
                result,
            });
            if answered {
                return asked;
            }
        }
        *socket = None;
        asked
    }

    async fn ask_one(
        &self,
        socket: &UdpSocket,
        server: &str,
        bind: SocketAddr,
    ) -> Result<Answered, String> {
        // A resolver that does not answer must not hold the refresh up longer than a server.
        let wait = self.retransmit.total();
        let server_address = tokio::time::timeout(wait, stun_client::resolve(server, Some(bind)))
            .await
            .map_err(|_| format!("resolving {server}: no answer within {wait:?}"))?
            .map_err(|e| format!("resolving {server}: {e}"))?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
        let answer = stun_client::binding(socket, server_address, Change::NONE, self.retransmit)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Answered {
            server_address,
            local,
            mapped: answer.response.mapped,
        })
    }

    /// Applies a refresh: the status, the event, the metrics and the log.
    fn apply(&self, asked: &[Asked], at: SystemTime) {
        let prev = self.public.status();
        let (next, transition) = apply_round(&prev, asked, at);
        for a in asked.iter().filter(|a| a.result.is_err()) {
            self.metrics.public_address_failure(a.role.name());
        }
        if let Some(t) = next.last_success.filter(|_| !next.stale) {
            self.metrics.public_address_success(t);
        }
        let address = next
            .address
            .map_or_else(|| "none".to_owned(), |a| a.to_string());
        let server = next.server.clone().unwrap_or_default();
        match transition {
            Some(Transition::Changed {
                previous: Some(previous),
            }) => {
                self.metrics.public_address_changed();
                log::warn!(
                    "public address changed from {previous} to {address} ({} STUN server {server}); \
                     channels report the new address from now on",
                    next.source.name()
                );
            }
            Some(Transition::Changed { previous: None }) => log::info!(
                "public address {address} ({} STUN server {server}, mapped {})",
                next.source.name(),
                next.mapped.map(|m| m.to_string()).unwrap_or_default()
            ),
            Some(Transition::Failed) => log::warn!(
                "public address discovery failed, keeping {address}: {}",
                next.last_error.as_deref().unwrap_or_default()
            ),
            Some(Transition::Recovered) => log::info!(
                "public address discovery answers again: {address} ({} STUN server {server})",
                next.source.name()
            ),
            None if next.source != prev.source && !next.stale => log::warn!(
                "public address {address} now from the {} STUN server {server}: {}",
                next.source.name(),
                next.last_error.as_deref().unwrap_or("it answers again")
            ),
            None => {}
        }
        if transition.is_none()
            && let Some(e) = &next.last_error
        {
            // Every refresh: at debug, as the fallback answered or the failure was reported.
            log::debug!("public address refresh: {e}");
        }
        self.public.set(next, transition, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn config(text: &str) -> Config {
        Config::from_toml(text).expect("valid")
    }

    fn discovering() -> PublicStatus {
        PublicStatus::from_config(&config(
            "[relay]\ninternet_address = \"203.0.113.10\"\n\
             [public_address]\nitsp_stun_server = \"stun.itsp.example\"\n\
             stun_server = \"192.0.2.7\"\n",
        ))
    }

    fn answer(role: ServerRole, mapped: &str) -> Asked {
        Asked {
            role,
            server: role.name().to_owned(),
            result: Ok(Answered {
                server_address: sa("192.0.2.7:3478"),
                local: sa("203.0.113.10:40000"),
                mapped: sa(mapped),
            }),
        }
    }

    fn silent(role: ServerRole) -> Asked {
        Asked {
            role,
            server: role.name().to_owned(),
            result: Err("no answer".to_owned()),
        }
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn the_starting_status_follows_the_configuration() {
        let s = PublicStatus::from_config(&Config::default());
        assert_eq!(
            (s.address, s.source, s.discovery),
            (None, Source::Unknown, false)
        );
        let s =
            PublicStatus::from_config(&config("[relay]\ninternet_address = \"198.51.100.1\"\n"));
        assert_eq!(
            (s.address, s.source, s.discovery),
            (
                Some(Ipv4Addr::new(198, 51, 100, 1)),
                Source::InternetAddress,
                false
            )
        );
        let s = PublicStatus::from_config(&config(
            "[relay]\ninternet_address = \"203.0.113.10\"\n\
             [public_address]\nstatic_address = \"198.51.100.9\"\n",
        ));
        assert_eq!(
            (s.address, s.source, s.discovery),
            (Some(Ipv4Addr::new(198, 51, 100, 9)), Source::Static, false)
        );
        let s = discovering();
        assert_eq!(
            (s.address, s.source, s.discovery),
            (None, Source::Unknown, true)
        );
        assert_eq!(s.local_address, Some(Ipv4Addr::new(203, 0, 113, 10)));
        let s = PublicStatus::from_config(&config(
            "[relay]\ninternet_address = \"203.0.113.10\"\n\
             [public_address]\nstun_server = \"192.0.2.7\"\nlocal_address = \"203.0.113.20\"\n",
        ));
        assert_eq!(s.local_address, Some(Ipv4Addr::new(203, 0, 113, 20)));
    }

    #[test]
    fn the_first_answer_counts_and_a_failed_server_is_reported() {
        let s0 = discovering();
        // The ITSP's server answers: learnt, not counted as a change.
        let (s1, t) = apply_round(
            &s0,
            &[answer(ServerRole::Itsp, "198.51.100.1:40000")],
            at(1),
        );
        assert_eq!(t, Some(Transition::Changed { previous: None }));
        assert_eq!(
            (s1.address, s1.source, s1.changes, s1.stale),
            (Some(Ipv4Addr::new(198, 51, 100, 1)), Source::Itsp, 0, false)
        );
        assert_eq!(
            (s1.last_success, s1.changed_at, s1.last_error.as_deref()),
            (Some(at(1)), Some(at(1)), None)
        );
        assert_eq!(s1.port_preserved(), Some(true));
        // Same answer: nothing to publish.
        let (s2, t) = apply_round(
            &s1,
            &[answer(ServerRole::Itsp, "198.51.100.1:40000")],
            at(2),
        );
        assert_eq!(t, None);
        assert_eq!(s2.last_refresh, Some(at(2)));
        // The ITSP's server is silent, the configured one answers the same address: the source
        // says so and the error is kept, but the address did not change.
        let (s3, t) = apply_round(
            &s2,
            &[
                silent(ServerRole::Itsp),
                answer(ServerRole::Configured, "198.51.100.1:41000"),
            ],
            at(3),
        );
        assert_eq!(t, None);
        assert_eq!(s3.source, Source::Configured);
        assert_eq!(
            s3.last_error.as_deref(),
            Some("itsp server itsp: no answer")
        );
        assert_eq!(s3.port_preserved(), Some(false), "the NAT rewrote the port");
        // A new address: a change, counted.
        let (s4, t) = apply_round(
            &s3,
            &[answer(ServerRole::Itsp, "198.51.100.2:40000")],
            at(4),
        );
        assert_eq!(
            t,
            Some(Transition::Changed {
                previous: Some(Ipv4Addr::new(198, 51, 100, 1))
            })
        );
        assert_eq!(
            (s4.changes, s4.changed_at, s4.source),
            (1, Some(at(4)), Source::Itsp)
        );
        assert_eq!(s4.last_error, None);
    }

    #[test]
    fn without_an_answer_the_last_address_is_kept() {
        let (s1, _) = apply_round(
            &discovering(),
            &[answer(ServerRole::Itsp, "198.51.100.1:40000")],
            at(1),
        );
        let both = [silent(ServerRole::Itsp), silent(ServerRole::Configured)];
        let (s2, t) = apply_round(&s1, &both, at(2));
        assert_eq!(t, Some(Transition::Failed));
        assert_eq!(s2.address, s1.address);
        assert_eq!((s2.source, s2.last_success), (Source::Itsp, Some(at(1))));
        assert!(s2.stale);
        assert_eq!(
            s2.last_error.as_deref(),
            Some("itsp server itsp: no answer; configured server configured: no answer")
        );
        // Failing on: published once.
        let (s3, t) = apply_round(&s2, &both, at(3));
        assert_eq!((t, s3.stale), (None, true));
        // Back with the same address: recovered; with another: changed.
        let (s4, t) = apply_round(
            &s3,
            &[answer(ServerRole::Itsp, "198.51.100.1:40000")],
            at(4),
        );
        assert_eq!(
            (t, s4.stale, s4.changes),
            (Some(Transition::Recovered), false, 0)
        );
        let (s5, t) = apply_round(
            &s3,
            &[
                silent(ServerRole::Itsp),
                answer(ServerRole::Configured, "198.51.100.2:40000"),
            ],
            at(4),
        );
        assert!(matches!(t, Some(Transition::Changed { previous: Some(_) })));
        assert_eq!(
            (s5.changes, s5.source, s5.stale),
            (1, Source::Configured, false)
        );
        // A first refresh without an answer: failed, nothing known.
        let (s, t) = apply_round(&discovering(), &both, at(1));
        assert_eq!(
            (t, s.address, s.stale),
            (Some(Transition::Failed), None, true)
        );
    }

    #[test]
    fn an_ipv6_mapped_address_is_no_answer() {
        let (s, t) = apply_round(
            &discovering(),
            &[
                answer(ServerRole::Itsp, "[2001:db8::1]:40000"),
                answer(ServerRole::Configured, "198.51.100.1:40000"),
            ],
            at(1),
        );
        assert_eq!(s.source, Source::Configured);
        assert!(s.last_error.is_some_and(|e| e.contains("not IPv4")));
        assert!(matches!(t, Some(Transition::Changed { .. })));
    }

    #[test]
    fn the_media_address_is_the_public_address_on_the_legs_port() {
        let (s, _) = apply_round(
            &discovering(),
            &[answer(ServerRole::Itsp, "198.51.100.1:40000")],
            at(1),
        );
        assert_eq!(
            s.media_address(sa("203.0.113.10:30528")),
            Some(sa("198.51.100.1:30528"))
        );
        assert_eq!(
            s.media_address(sa("[::ffff:203.0.113.10]:30530")),
            Some(sa("198.51.100.1:30530"))
        );
        // Another relay address (a request named it; leg B's LAN address): not translated.
        assert_eq!(s.media_address(sa("192.0.2.1:30528")), None);
        assert_eq!(s.media_address(sa("[::]:30528")), None);
        // Nothing known yet: nothing to hand out.
        assert_eq!(discovering().media_address(sa("203.0.113.10:30528")), None);
        // No relay address configured: legs whose source the kernel picks.
        let s = PublicStatus::from_config(&config(
            "[public_address]\nstatic_address = \"198.51.100.9\"\n",
        ));
        assert_eq!(
            s.media_address(sa("[::]:30528")),
            Some(sa("198.51.100.9:30528"))
        );
        assert_eq!(s.media_address(sa("203.0.113.10:30528")), None);
    }

    #[test]
    fn the_retransmissions_fit_the_refresh_interval() {
        for secs in [1, 2, 5, 10, 30, 60, 90, 3600, 86_400] {
            let refresh = Duration::from_secs(secs);
            let r = retransmit_for(refresh);
            assert!(r.total() <= refresh / 2, "{secs}s: {r:?}");
            assert!(
                r.attempts >= 2,
                "{secs}s: at least one retransmission: {r:?}"
            );
        }
        assert_eq!(
            retransmit_for(Duration::from_secs(80)),
            Retransmit::default()
        );
        assert_eq!(
            retransmit_for(Duration::from_secs(3600)),
            Retransmit::default()
        );
        let r = retransmit_for(Duration::from_secs(60));
        assert_eq!((r.rto, r.attempts), (Duration::from_millis(500), 6));
    }

    #[tokio::test]
    async fn a_published_change_is_already_in_the_status() {
        let public = PublicAddress::new(discovering());
        let mut events = public.subscribe();
        let (next, t) = apply_round(
            &public.status(),
            &[answer(ServerRole::Itsp, "198.51.100.1:40000")],
            at(1),
        );
        public.set(next.clone(), t, at(1));
        let e = events.recv().await.expect("an event");
        assert_eq!(e.transition, Transition::Changed { previous: None });
        assert_eq!(e.status, next);
        assert_eq!(
            public.media_address(sa("203.0.113.10:30600")),
            Some(sa("198.51.100.1:30600"))
        );
        // No transition, no event.
        public.set(next, None, at(2));
        assert!(events.try_recv().is_err());
    }

    #[tokio::test]
    async fn discovery_against_our_own_server_on_loopback() {
        // Our STUN server on loopback as the configured server; the ITSP's is a port where
        // nobody answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let stun = crate::stun_server::StunServer::bind(&crate::config::StunSection {
            listen: Some(sa("127.0.0.1:0")),
            ..crate::config::StunSection::default()
        })
        .await
        .expect("STUN server");
        let server = stun.udp_addrs()[0];
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(stun.serve(async move {
            let _ = stopped.await;
        }));
        let c = config(&format!(
            "[public_address]\nitsp_stun_server = \"{}\"\nstun_server = \"{server}\"\n\
             local_address = \"127.0.0.1\"\nrefresh = \"1s\"\n",
            silent.local_addr().expect("addr")
        ));
        let public = PublicAddress::new(PublicStatus::from_config(&c));
        let metrics = Metrics::new();
        let discovery = Discovery::new(&c, public.clone(), metrics.clone()).expect("discovery");
        let mut socket = None;
        let asked = discovery.ask(&mut socket).await;
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert!(asked[0].result.is_err(), "{asked:?}");
        let Ok(answered) = &asked[1].result else {
            panic!("{asked:?}")
        };
        assert_eq!(answered.mapped, answered.local, "no NAT on loopback");
        discovery.apply(&asked, SystemTime::now());
        let s = public.status();
        assert_eq!(
            (s.address, s.source, s.stale),
            (Some(Ipv4Addr::LOCALHOST), Source::Configured, false)
        );
        assert!(s.last_error.is_some_and(|e| e.starts_with("itsp server")));
        let text = metrics.render();
        assert!(
            text.contains("homerelay_public_address_discovery_failures_total{server=\"itsp\"} 1"),
            "{text}"
        );
        let _ = stop.send(());
    }
}
