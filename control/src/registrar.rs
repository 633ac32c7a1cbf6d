//! The registration service of remote phones: TCP 4062 (plain) and TLS 4063, speaking the
//! protocol of `docs/registration-protocol.md` (`relay_core::register`), authenticating with
//! SCRAM-SHA-256 against the device registry and applying the SBC's rules (internet
//! registration flag, strong password, minimum firmware, brute-force lockout).
//!
//! Invariant: an unknown device and a wrong password get the same exchange and the same
//! answer (`auth_failed` after the proof), every failure is counted per device and per source
//! and logged with its source, and a connection's registration ends with the connection.
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use relay_core::device::lockout::{FailureOutcome, Lockout, LockoutPolicy};
use relay_core::device::networks::Origin;
use relay_core::device::registration::RegistrationRefusal;
use relay_core::device::scram::{ScramServer, generate_nonce};
use relay_core::register::{
    ErrorCode, Refusal, RegistrationId, ScramMessage, ServerConfig, ServerEvent, ServerSession,
    Text,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::devices::{LiveRegistration, Registry};

/// Registration connections open at once at most; one more is closed at once.
pub const CONNECTIONS_MAX: usize = 10_000;

/// The shared state of every registration connection.
#[derive(Debug)]
pub struct Registrar {
    registry: Arc<Registry>,
    lockout: Mutex<Lockout>,
    config: ServerConfig,
    started: Instant,
    connections: Arc<tokio::sync::Semaphore>,
    metrics: crate::metrics::Metrics,
}

impl Registrar {
    pub fn new(registry: Arc<Registry>, config: ServerConfig, lockout: LockoutPolicy) -> Registrar {
        Registrar {
            registry,
            lockout: Mutex::new(Lockout::new(lockout)),
            config,
            started: Instant::now(),
            connections: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX)),
            metrics: crate::metrics::Metrics::disabled(),
        }
    }

    /// Counts registration attempts in `metrics` (`homerelay_registrations_total`).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Registrar {
        self.metrics = metrics;
        self
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The device registry registrations go to.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The metrics attempts are counted in.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The keepalive and handshake rules of the registrar.
    pub fn config(&self) -> ServerConfig {
        self.config
    }

    /// Whether `number` may try to log in from `source` now; if locked out (per device or per
    /// source, shared by every transport), the seconds until it may (at least 1).
    pub fn login_allowed(&self, number: &str, source: IpAddr) -> Result<(), u32> {
        let now = self.now_ms();
        self.lockout().check(number, source, now).map_err(|locked| {
            u32::try_from(locked.until_ms.saturating_sub(now).div_ceil(1000))
                .unwrap_or(u32::MAX)
                .max(1)
        })
    }

    /// Counts a failed login of `number` from `source` towards the lockout.
    pub fn login_failed(&self, number: &str, source: IpAddr) -> FailureOutcome {
        let now = self.now_ms();
        self.lockout().failure(number, source, now)
    }

    /// Resets the device's failure count after a successful login.
    pub fn login_succeeded(&self, number: &str, source: IpAddr) {
        let now = self.now_ms();
        self.lockout().success(number, source, now);
    }

    fn lockout(&self) -> std::sync::MutexGuard<'_, Lockout> {
        self.lockout.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Accepts connections on `listener` until `shutdown` completes; each is served by
/// [`serve_connection`] (through `tls` when given).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    registrar: Arc<Registrar>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let transport = if tls.is_some() { "tls" } else { "tcp" };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "registration: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = registrar.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "registration: too many connections, closing one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let registrar = registrar.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, peer, transport, &registrar).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        Duration::from_millis(registrar.config.handshake_timeout_ms),
                        acceptor.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(s)) => serve_connection(s, peer, transport, &registrar).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "registration: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "registration: TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// A TLS acceptor of the phones' listener (TLS 4063) for the certificate chain and key in the
/// PEM files `cert` and `key`: the daemon's own settings ([`crate::certstore::CertStore`]: TLS
/// 1.2 and 1.3, ring, stateless session tickets), so tests and benchmarks measure what runs.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    crate::certstore::CertStore::open(cert, key)?.acceptor(&[])
}

/// The refusal the registration protocol (and the HTTPS API) answers a policy refusal with.
pub fn refusal_of(refusal: &RegistrationRefusal) -> Refusal {
    match refusal {
        RegistrationRefusal::WeakPassword(_)
        | RegistrationRefusal::WeakPasswordStored(_)
        | RegistrationRefusal::NoPassword
        | RegistrationRefusal::AuthenticationOff => Refusal::WeakPassword,
        RegistrationRefusal::Firmware(_) | RegistrationRefusal::FirmwareUnknown(_) => {
            Refusal::FirmwareTooOld
        }
        RegistrationRefusal::InternetRegistrationOff => Refusal::NotAllowedExternal,
        RegistrationRefusal::UnknownDevice => Refusal::AuthFailed,
    }
}

/// What a connection remembers between the session's events.
struct Pending {
    number: String,
    scram: ScramServer,
    firmware: String,
    media: SocketAddr,
}

/// Serves one registration connection from `peer` until it closes.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    transport: &'static str,
    registrar: &Registrar,
) {
    let Ok(mut session) = ServerSession::new(registrar.config, peer, registrar.now_ms()) else {
        return;
    };
    let mut pending: Option<Pending> = None;
    let mut registered: Option<(String, u64)> = None;
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(4096);
    loop {
        // Answer every event, then send what the session has to say.
        while let Some(event) = session.poll_event() {
            handle(
                &mut session,
                event,
                &mut pending,
                &mut registered,
                peer,
                transport,
                registrar,
            );
        }
        out.clear();
        session.encode_transmits(&mut out);
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            session.connection_lost();
            continue;
        }
        if session.is_closed() {
            break;
        }
        let deadline = session.poll_timeout().map(|t| {
            tokio::time::Instant::now()
                + Duration::from_millis(t.saturating_sub(registrar.now_ms()))
        });
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => session.connection_lost(),
                Ok(n) => session.handle_bytes(&buf[..n], registrar.now_ms()),
            },
            () = sleep => session.handle_timeout(registrar.now_ms()),
        }
    }
    // Events of the closing itself.
    while let Some(event) = session.poll_event() {
        handle(
            &mut session,
            event,
            &mut pending,
            &mut registered,
            peer,
            transport,
            registrar,
        );
    }
    let _ = stream.shutdown().await;
}

/// Sends `refusal` of `number`'s registration from `peer`, counts it and publishes it.
fn refuse(
    session: &mut ServerSession,
    registrar: &Registrar,
    (transport, number, peer): (&'static str, &str, SocketAddr),
    refusal: Refusal,
    reason: Text,
) {
    if session.refuse(refusal, reason).is_ok() {
        registrar.metrics.registration(transport, refusal.name());
        registrar
            .registry
            .registration_refused(number, transport, peer, refusal.name());
    }
}

fn text(s: &str) -> Text {
    Text::lossy(s)
}

fn handle(
    session: &mut ServerSession,
    event: ServerEvent,
    pending: &mut Option<Pending>,
    registered: &mut Option<(String, u64)>,
    peer: SocketAddr,
    transport: &'static str,
    registrar: &Registrar,
) {
    let now = registrar.now_ms();
    match event {
        ServerEvent::Authenticate { request, .. } => {
            let number = request.number.as_str().to_owned();
            if let Err(locked) = registrar.lockout().check(&number, peer.ip(), now) {
                let retry_after_s =
                    u32::try_from(locked.until_ms.saturating_sub(now).div_ceil(1000))
                        .unwrap_or(u32::MAX)
                        .max(1);
                tracing::warn!(%peer, number, retry_after_s, "registration refused: locked out");
                refuse(
                    session,
                    registrar,
                    (transport, &number, peer),
                    Refusal::LockedOut { retry_after_s },
                    text("locked out"),
                );
                return;
            }
            let mut scram = registrar.registry.scram_server(&number);
            let client_first = String::from_utf8_lossy(request.client_first.as_bytes());
            let nonce = generate_nonce(&mut rand::rng());
            let answer = scram
                .handle_client_first(&client_first, &nonce)
                .map_err(|e| e.to_string())
                .and_then(|sf| ScramMessage::new(sf).map_err(|e| e.to_string()));
            match answer {
                Ok(server_first) => {
                    *pending = Some(Pending {
                        number,
                        scram,
                        firmware: request.firmware.as_str().to_owned(),
                        media: request.media_addr,
                    });
                    let _ = session.challenge(server_first);
                }
                Err(e) => {
                    tracing::info!(%peer, number, error = %e, "registration refused: bad SCRAM message");
                    refuse(
                        session,
                        registrar,
                        (transport, &number, peer),
                        Refusal::BadRequest,
                        text(&e),
                    );
                }
            }
        }
        ServerEvent::VerifyProof { client_final } => {
            let Some(mut p) = pending.take() else {
                session.close_with(
                    ErrorCode::UnexpectedMessage,
                    text("no exchange in progress"),
                );
                return;
            };
            let client_final = String::from_utf8_lossy(client_final.as_bytes()).into_owned();
            let server_final = match p.scram.handle_client_final(&client_final) {
                Ok(sf) => sf,
                Err(e) => {
                    let outcome = registrar.lockout().failure(&p.number, peer.ip(), now);
                    if outcome.locked.is_some() {
                        registrar.registry.locked_out(
                            &p.number,
                            transport,
                            peer,
                            "repeated authentication failures",
                        );
                    }
                    tracing::warn!(
                        %peer, number = p.number, transport, failures = ?outcome,
                        error = %e, "registration: authentication failed"
                    );
                    refuse(
                        session,
                        registrar,
                        (transport, &p.number, peer),
                        Refusal::AuthFailed,
                        text("authentication failed"),
                    );
                    return;
                }
            };
            registrar.lockout().success(&p.number, peer.ip(), now);
            let origin = match registrar
                .registry
                .may_register(&p.number, peer.ip(), &p.firmware)
            {
                Ok(origin) => origin,
                Err(refusal) => {
                    let code = refusal_of(&refusal);
                    tracing::warn!(%peer, number = p.number, reason = %refusal, "registration refused");
                    refuse(
                        session,
                        registrar,
                        (transport, &p.number, peer),
                        code,
                        text(&refusal.to_string()),
                    );
                    return;
                }
            };
            let Ok(server_final) = ScramMessage::new(server_final) else {
                session.close_with(
                    ErrorCode::UnexpectedMessage,
                    text("server-final message too long"),
                );
                return;
            };
            let wall = SystemTime::now();
            let id = registrar.registry.register(
                &p.number,
                LiveRegistration {
                    transport,
                    public: peer,
                    local: Some(p.media),
                    firmware: p.firmware.clone(),
                    origin,
                    registered_at: wall,
                    expires_at: wall,
                    id: 0,
                },
            );
            if let Some((number, old)) = registered.take() {
                registrar.registry.unregister(&number, old);
            }
            *registered = Some((p.number.clone(), id));
            registrar.metrics.registration(transport, "ok");
            let _ = session.accept(RegistrationId(id), server_final, now);
        }
        ServerEvent::Registered(r) => {
            let expires = SystemTime::now() + Duration::from_secs(u64::from(r.expires_s));
            if let Some((number, id)) = registered.as_ref() {
                registrar.registry.keepalive(number, *id, expires);
            }
            tracing::info!(
                %peer, number = r.number.as_str(), transport,
                external = (registrar.registry.policy().networks.classify(peer.ip()) == Origin::External),
                media = %r.media_addr, firmware = r.firmware.as_str(), "device registered"
            );
        }
        ServerEvent::Closed(reason) => {
            if let Some((number, id)) = registered.take() {
                registrar.registry.unregister(&number, id);
                tracing::info!(%peer, number, %reason, "device unregistered");
            }
        }
    }
}
