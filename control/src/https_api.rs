//! The registration service of the apps (myPortal to go on Android and iOS, myPortal @work):
//! a JSON API over HTTPS on TCP 8802 (`docs/https-api.md`, described for clients by
//! `https_api.openapi.json`, served at `GET /v1/openapi.json`).
//!
//! A login is SCRAM-SHA-256 in two requests (`/v1/login/start`, `/v1/login/finish`) — the
//! password never crosses the wire, not even inside TLS — and ends with a bearer token held in
//! memory; with it the app registers its media address, keeps the registration alive and ends
//! it. The rules are the registrar's ([`crate::registrar`]): the same device registry, the same
//! lockout (per device and per source, shared with TCP 4062 / TLS 4063), the same policy
//! (internal or external source, internet flag, strong password, minimum firmware) and the
//! same metrics, under the transport `https`.
//!
//! Invariants: an unknown device and a wrong password get the same exchange and the same
//! answer (401 `auth_failed`, one body); every failure counts towards the lockout; pending
//! logins, tokens, connections, request bodies and the time a request may take are bounded;
//! an HTTPS registration lives while its keepalives arrive and while its token is valid, and
//! ends with the server.
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use base64::Engine as _;
use relay_core::device::networks::Origin;
use relay_core::device::scram::{ScramServer, client_first_username, generate_nonce};
use relay_core::device::{DeviceType, Transport, UnknownDeviceType};
use relay_core::register::Refusal;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::devices::LiveRegistration;
use crate::registrar::{Registrar, refusal_of};

/// The transport name of HTTPS registrations (metrics, [`LiveRegistration::transport`]).
pub const TRANSPORT: &str = "https";

/// The OpenAPI 3.0 description of the API, served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("https_api.openapi.json");

/// Longest SCRAM message accepted (as in the registration protocol).
const SCRAM_MAX: usize = 1024;

/// The limits of the API.
#[derive(Clone, Debug)]
pub struct HttpsConfig {
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Time a client has from `/v1/login/start` to `/v1/login/finish`.
    pub login_timeout: Duration,
    /// A token expires after this long without an authorized request.
    pub token_idle: Duration,
    /// Logins between start and finish, at most.
    pub max_logins: usize,
    /// Logins between start and finish from one source address, at most.
    pub max_logins_per_source: usize,
    /// Tokens at most (one per device: a new login replaces the device's previous token).
    pub max_tokens: usize,
    /// Connections open at once, at most; one more is closed at once.
    pub max_connections: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest wait for a request's headers (also the idle time of a kept-alive connection)
    /// and, separately, for its body.
    pub request_timeout: Duration,
    /// Time open requests get to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for HttpsConfig {
    fn default() -> Self {
        HttpsConfig {
            body_limit: 16 * 1024,
            login_timeout: Duration::from_secs(30),
            token_idle: Duration::from_secs(3600),
            max_logins: 4096,
            max_logins_per_source: 64,
            max_tokens: 10_000,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// A login between its two requests.
struct Login {
    number: String,
    scram: ScramServer,
    source: IpAddr,
    deadline: Instant,
    /// Whether the SCRAM user name is the number (a mismatch fails like a wrong password).
    user_matches: bool,
}

/// A live HTTPS registration of a token's device.
#[derive(Clone, Copy, Debug)]
struct Held {
    id: u64,
    keepalive_s: u32,
    expires_s: u32,
    expires: Instant,
}

/// What a bearer token stands for.
struct Token {
    number: String,
    device_type: DeviceType,
    firmware: String,
    expires: Instant,
    registration: Option<Held>,
}

#[derive(Default)]
struct Tables {
    logins: HashMap<String, Login>,
    tokens: HashMap<String, Token>,
}

/// The shared state of the API (see the module docs).
pub struct HttpsApi {
    registrar: Arc<Registrar>,
    config: HttpsConfig,
    tables: Mutex<Tables>,
}

impl std::fmt::Debug for HttpsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsApi")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A refusal or error as the API answers it: `{error, message, retry_after_s?}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// `auth_failed`, `locked_out`, `weak_password`, `firmware_too_old`,
    /// `not_allowed_external`, `bad_request`, `server_busy`, `invalid_token`,
    /// `not_registered`, `not_found`, `method_not_allowed`.
    pub error: &'static str,
    pub message: String,
    pub retry_after_s: Option<u32>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_s: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            message: message.into(),
            retry_after_s: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// One answer for an unknown device, a wrong password and a name that is not the number.
    fn auth_failed() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "auth_failed",
            "authentication failed",
        )
    }

    fn invalid_token() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the bearer token is missing, unknown or expired: log in again",
        )
    }

    fn busy(message: impl Into<String>, retry_after_s: u32) -> ApiError {
        ApiError {
            retry_after_s: Some(retry_after_s),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message)
        }
    }

    /// The answer to a registration protocol refusal.
    fn refusal(refusal: Refusal, message: impl Into<String>) -> ApiError {
        let status = match refusal {
            Refusal::AuthFailed => return ApiError::auth_failed(),
            Refusal::LockedOut { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::WeakPassword | Refusal::FirmwareTooOld | Refusal::NotAllowedExternal => {
                StatusCode::FORBIDDEN
            }
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::ServerBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError {
            status,
            error: refusal.name(),
            message: message.into(),
            retry_after_s: refusal.retry_after_s(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            message: &self.message,
            retry_after_s: self.retry_after_s,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.error == "invalid_token" {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}

/// `POST /v1/login/start`.
#[derive(Debug, Deserialize, Serialize)]
pub struct LoginStart {
    pub number: String,
    pub client_first: String,
}

/// The answer to [`LoginStart`].
#[derive(Debug, Deserialize, Serialize)]
pub struct LoginChallenge {
    pub session: String,
    pub server_first: String,
}

/// `POST /v1/login/finish`.
#[derive(Debug, Deserialize, Serialize)]
pub struct LoginFinish {
    pub session: String,
    pub client_final: String,
    pub device_type: String,
    pub firmware: String,
}

/// The answer to [`LoginFinish`].
#[derive(Debug, Deserialize, Serialize)]
pub struct LoggedIn {
    pub token: String,
    pub server_final: String,
    pub expires_s: u64,
}

/// `POST /v1/register`.
#[derive(Debug, Deserialize, Serialize)]
pub struct RegisterRequest {
    pub media: String,
    #[serde(default)]
    pub keepalive_s: Option<u32>,
}

/// A live registration as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct RegistrationView {
    pub id: u64,
    pub public: String,
    pub media: String,
    pub origin: String,
    pub keepalive_s: u32,
    pub expires_s: u32,
}

/// The answer to `POST /v1/keepalive`.
#[derive(Debug, Deserialize, Serialize)]
pub struct KeepaliveAnswer {
    pub keepalive_s: u32,
    pub expires_s: u32,
}

/// The answer to `GET /v1/status`.
#[derive(Debug, Deserialize, Serialize)]
pub struct StatusView {
    pub number: String,
    pub device_type: String,
    pub registered: bool,
    pub registration: Option<RegistrationView>,
    pub token_expires_s: u64,
}

fn origin_name(origin: Origin) -> &'static str {
    match origin {
        Origin::Internal => "internal",
        Origin::External => "external",
    }
}

/// 32 random bytes, base64url without padding.
fn random_id() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A firmware version as the registration protocol allows it: 1–64 printable ASCII.
fn check_firmware(firmware: &str) -> Result<(), ApiError> {
    if firmware.is_empty()
        || firmware.len() > 64
        || !firmware.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(ApiError::bad_request(
            "firmware: 1 to 64 printable ASCII characters",
        ));
    }
    Ok(())
}

/// A media address a device can be sent to.
fn parse_media(media: &str) -> Result<SocketAddr, ApiError> {
    let addr: SocketAddr = media
        .parse()
        .map_err(|_| ApiError::bad_request("media: not an ip:port address"))?;
    let ip = addr.ip().to_canonical();
    let unusable = addr.port() == 0
        || ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if unusable {
        return Err(ApiError::bad_request(format!(
            "media: {addr} cannot receive media"
        )));
    }
    Ok(addr)
}

impl HttpsApi {
    pub fn new(registrar: Arc<Registrar>, config: HttpsConfig) -> HttpsApi {
        HttpsApi {
            registrar,
            config,
            tables: Mutex::new(Tables::default()),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &HttpsConfig {
        &self.config
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an attempt and passes the error on.
    fn counted(&self, e: ApiError) -> ApiError {
        let result = match e.error {
            "auth_failed" => "auth_failed",
            "locked_out" => "locked_out",
            "weak_password" => "weak_password",
            "firmware_too_old" => "firmware_too_old",
            "not_allowed_external" => "not_allowed_external",
            "server_busy" => "server_busy",
            _ => "bad_request",
        };
        self.registrar.metrics().registration(TRANSPORT, result);
        e
    }

    /// [`Self::counted`], and published on the device event bus (refusals that name a
    /// device: authentication, lockout, policy).
    fn published(&self, number: &str, peer: SocketAddr, e: ApiError) -> ApiError {
        self.registrar
            .registry()
            .registration_refused(number, TRANSPORT, peer, e.error);
        self.counted(e)
    }

    fn locked_out(&self, number: &str, peer: SocketAddr, retry_after_s: u32) -> ApiError {
        tracing::warn!(%peer, number, retry_after_s, transport = TRANSPORT, "login refused: locked out");
        self.published(
            number,
            peer,
            ApiError::refusal(
                Refusal::LockedOut { retry_after_s },
                "too many failed logins: try again later",
            ),
        )
    }

    /// Ends expired logins, registrations and tokens (run every second by [`serve`]).
    pub fn sweep(&self) {
        let now = Instant::now();
        let registry = self.registrar.registry();
        let mut t = self.tables();
        t.logins.retain(|_, l| l.deadline > now);
        t.tokens.retain(|_, token| {
            if let Some(held) = token.registration
                && (held.expires <= now || token.expires <= now)
            {
                if registry.unregister(&token.number, held.id) {
                    tracing::info!(
                        number = token.number,
                        transport = TRANSPORT,
                        "device registration expired"
                    );
                }
                token.registration = None;
            }
            token.expires > now
        });
    }

    /// Ends every HTTPS registration and token (at shutdown).
    pub fn end_all(&self) {
        let registry = self.registrar.registry();
        let mut t = self.tables();
        t.logins.clear();
        for (_, token) in t.tokens.drain() {
            if let Some(held) = token.registration {
                registry.unregister(&token.number, held.id);
            }
        }
    }

    /// Pending logins and tokens held: (logins, tokens).
    pub fn held(&self) -> (usize, usize) {
        let t = self.tables();
        (t.logins.len(), t.tokens.len())
    }

    fn login_start(&self, peer: SocketAddr, req: LoginStart) -> Result<LoginChallenge, ApiError> {
        crate::devices::check_number(&req.number)
            .map_err(|e| self.counted(ApiError::bad_request(e.to_string())))?;
        if req.client_first.is_empty() || req.client_first.len() > SCRAM_MAX {
            return Err(self.counted(ApiError::bad_request("client_first: 1 to 1024 bytes")));
        }
        let number = req.number;
        if let Err(retry_after_s) = self.registrar.login_allowed(&number, peer.ip()) {
            return Err(self.locked_out(&number, peer, retry_after_s));
        }
        let mut scram = self.registrar.registry().scram_server(&number);
        let server_first = scram
            .handle_client_first(&req.client_first, &generate_nonce(&mut rand::rng()))
            .map_err(|e| {
                tracing::info!(%peer, number, error = %e, "login refused: bad SCRAM message");
                self.counted(ApiError::bad_request(format!("client_first: {e}")))
            })?;
        let user_matches = client_first_username(&req.client_first).is_ok_and(|u| u == number);
        let now = Instant::now();
        let session = random_id();
        let mut t = self.tables();
        if t.logins.len() >= self.config.max_logins {
            t.logins.retain(|_, l| l.deadline > now);
        }
        let from_source = t.logins.values().filter(|l| l.source == peer.ip()).count();
        let retry = u32::try_from(secs_ceil(self.config.login_timeout)).unwrap_or(u32::MAX);
        if t.logins.len() >= self.config.max_logins {
            drop(t);
            return Err(self.counted(ApiError::busy("too many logins in progress", retry)));
        }
        if from_source >= self.config.max_logins_per_source {
            drop(t);
            return Err(self.counted(ApiError::busy(
                "too many logins in progress from this address",
                retry,
            )));
        }
        t.logins.insert(
            session.clone(),
            Login {
                number,
                scram,
                source: peer.ip(),
                deadline: now + self.config.login_timeout,
                user_matches,
            },
        );
        Ok(LoginChallenge {
            session,
            server_first,
        })
    }

    fn login_finish(&self, peer: SocketAddr, req: LoginFinish) -> Result<LoggedIn, ApiError> {
        let now = Instant::now();
        // One use only, from the address that started it, before its deadline.
        let login = {
            let mut t = self.tables();
            match t.logins.remove(&req.session) {
                Some(l) if l.source == peer.ip() && l.deadline > now => Some(l),
                Some(l) if l.source != peer.ip() => {
                    // Not this client's: leave it to its owner.
                    t.logins.insert(req.session.clone(), l);
                    None
                }
                _ => None,
            }
        };
        let Some(mut login) = login else {
            return Err(self.counted(ApiError::bad_request(
                "session: unknown or expired login session (start again)",
            )));
        };
        let number = std::mem::take(&mut login.number);
        // What depends only on the request may be refused before the proof is checked.
        let claimed: DeviceType = req.device_type.parse().map_err(|e: UnknownDeviceType| {
            self.counted(ApiError::bad_request(format!("device_type: {e}")))
        })?;
        if claimed.transport() != Some(Transport::Https) {
            return Err(self.counted(ApiError::bad_request(format!(
                "device_type: a {} does not register over HTTPS",
                claimed.display_name()
            ))));
        }
        check_firmware(&req.firmware).map_err(|e| self.counted(e))?;
        if req.client_final.is_empty() || req.client_final.len() > SCRAM_MAX {
            return Err(self.counted(ApiError::bad_request("client_final: 1 to 1024 bytes")));
        }
        if let Err(retry_after_s) = self.registrar.login_allowed(&number, peer.ip()) {
            return Err(self.locked_out(&number, peer, retry_after_s));
        }
        let proof = login.scram.handle_client_final(&req.client_final);
        let server_final = match proof {
            Ok(sf) if login.user_matches => sf,
            outcome => {
                let failures = self.registrar.login_failed(&number, peer.ip());
                tracing::warn!(
                    %peer, number, transport = TRANSPORT, failures = ?failures,
                    error = ?outcome.err(), "login: authentication failed"
                );
                if failures.locked.is_some() {
                    self.registrar.registry().locked_out(
                        &number,
                        TRANSPORT,
                        peer,
                        "repeated authentication failures",
                    );
                }
                return Err(self.published(&number, peer, ApiError::auth_failed()));
            }
        };
        self.registrar.login_succeeded(&number, peer.ip());
        // Authenticated: what the device's record says may now be told.
        let stored = match self.registrar.registry().get(&number) {
            Ok(d) => d.device_type,
            Err(_) => return Err(self.published(&number, peer, ApiError::auth_failed())),
        };
        if stored != claimed {
            return Err(self.counted(ApiError::bad_request(format!(
                "device_type: number {number} is configured as a {}, not a {}",
                stored.display_name(),
                claimed.display_name()
            ))));
        }
        self.registrar
            .registry()
            .may_register(&number, peer.ip(), &req.firmware)
            .map_err(|refusal| {
                tracing::warn!(%peer, number, transport = TRANSPORT, reason = %refusal, "login refused");
                self.published(
                    &number,
                    peer,
                    ApiError::refusal(refusal_of(&refusal), refusal.to_string()),
                )
            })?;
        let token = random_id();
        let mut t = self.tables();
        // One token per device: a new login replaces the previous one and its registration.
        let previous: Vec<String> = t
            .tokens
            .iter()
            .filter(|(_, tok)| tok.number == number)
            .map(|(k, _)| k.clone())
            .collect();
        for k in previous {
            if let Some(old) = t.tokens.remove(&k)
                && let Some(held) = old.registration
            {
                self.registrar.registry().unregister(&number, held.id);
            }
        }
        if t.tokens.len() >= self.config.max_tokens {
            t.tokens.retain(|_, tok| tok.expires > now);
        }
        if t.tokens.len() >= self.config.max_tokens {
            drop(t);
            return Err(self.counted(ApiError::busy("too many devices logged in", 60)));
        }
        t.tokens.insert(
            token.clone(),
            Token {
                number: number.clone(),
                device_type: claimed,
                firmware: req.firmware,
                expires: now + self.config.token_idle,
                registration: None,
            },
        );
        tracing::info!(%peer, number, transport = TRANSPORT, "device logged in");
        Ok(LoggedIn {
            token,
            server_final,
            expires_s: secs_ceil(self.config.token_idle),
        })
    }

    /// The token of `headers`, renewed; runs `f` on it under the tables' lock.
    fn with_token<T>(
        &self,
        headers: &HeaderMap,
        f: impl FnOnce(&mut Token) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(ApiError::invalid_token)?;
        let now = Instant::now();
        let registry = self.registrar.registry();
        let mut t = self.tables();
        let Some(entry) = t.tokens.get_mut(token) else {
            return Err(ApiError::invalid_token());
        };
        if entry.expires <= now {
            if let Some(held) = entry.registration.take() {
                registry.unregister(&entry.number, held.id);
            }
            t.tokens.remove(token);
            return Err(ApiError::invalid_token());
        }
        entry.expires = now + self.config.token_idle;
        // A registration that expired, or that another one (a new login, a phone on 4062)
        // replaced, is no longer this token's.
        if let Some(held) = entry.registration {
            let current = registry
                .registration(&entry.number)
                .is_some_and(|r| r.id == held.id);
            if held.expires <= now || !current {
                registry.unregister(&entry.number, held.id);
                entry.registration = None;
            }
        }
        f(entry)
    }

    fn register(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        req: RegisterRequest,
    ) -> Result<RegistrationView, ApiError> {
        let registry = self.registrar.registry().clone();
        let sc = self.registrar.config();
        self.with_token(headers, |token| {
            let media = parse_media(&req.media).map_err(|e| self.counted(e))?;
            let origin = registry
                .may_register(&token.number, peer.ip(), &token.firmware)
                .map_err(|refusal| {
                    tracing::warn!(%peer, number = token.number, transport = TRANSPORT, reason = %refusal, "registration refused");
                    self.published(
                        &token.number,
                        peer,
                        ApiError::refusal(refusal_of(&refusal), refusal.to_string()),
                    )
                })?;
            let keepalive_s = match req.keepalive_s {
                None | Some(0) => sc.default_keepalive_s,
                Some(k) => k,
            }
            .clamp(sc.min_keepalive_s, sc.max_keepalive_s);
            let expires_s = keepalive_s.saturating_mul(sc.keepalive_misses);
            let wall = SystemTime::now();
            let id = registry.register(
                &token.number,
                LiveRegistration {
                    transport: TRANSPORT,
                    public: peer,
                    local: Some(media),
                    firmware: token.firmware.clone(),
                    origin,
                    registered_at: wall,
                    expires_at: wall + Duration::from_secs(u64::from(expires_s)),
                    id: 0,
                },
            );
            if let Some(old) = token.registration.replace(Held {
                id,
                keepalive_s,
                expires_s,
                expires: Instant::now() + Duration::from_secs(u64::from(expires_s)),
            }) {
                registry.unregister(&token.number, old.id);
            }
            self.registrar.metrics().registration(TRANSPORT, "ok");
            tracing::info!(
                %peer, number = token.number, transport = TRANSPORT,
                external = (origin == Origin::External), %media,
                firmware = token.firmware, "device registered"
            );
            Ok(RegistrationView {
                id,
                public: peer.to_string(),
                media: media.to_string(),
                origin: origin_name(origin).to_owned(),
                keepalive_s,
                expires_s,
            })
        })
    }

    fn keepalive(&self, headers: &HeaderMap) -> Result<KeepaliveAnswer, ApiError> {
        let registry = self.registrar.registry().clone();
        self.with_token(headers, |token| {
            let Some(held) = token.registration.as_mut() else {
                return Err(not_registered());
            };
            let expires = Duration::from_secs(u64::from(held.expires_s));
            if !registry.keepalive(&token.number, held.id, SystemTime::now() + expires) {
                token.registration = None;
                return Err(not_registered());
            }
            held.expires = Instant::now() + expires;
            Ok(KeepaliveAnswer {
                keepalive_s: held.keepalive_s,
                expires_s: held.expires_s,
            })
        })
    }

    fn unregister(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ApiError> {
        let registry = self.registrar.registry().clone();
        self.with_token(headers, |token| {
            if let Some(held) = token.registration.take()
                && registry.unregister(&token.number, held.id)
            {
                tracing::info!(%peer, number = token.number, transport = TRANSPORT, "device unregistered");
            }
            Ok(())
        })
    }

    fn status(&self, headers: &HeaderMap) -> Result<StatusView, ApiError> {
        let registry = self.registrar.registry().clone();
        self.with_token(headers, |token| {
            let now = Instant::now();
            let registration = token.registration.and_then(|held| {
                let live = registry.registration(&token.number)?;
                Some(RegistrationView {
                    id: held.id,
                    public: live.public.to_string(),
                    media: live.local.map(|m| m.to_string()).unwrap_or_default(),
                    origin: origin_name(live.origin).to_owned(),
                    keepalive_s: held.keepalive_s,
                    expires_s: u32::try_from(secs_ceil(
                        held.expires.saturating_duration_since(now),
                    ))
                    .unwrap_or(u32::MAX),
                })
            });
            Ok(StatusView {
                number: token.number.clone(),
                device_type: token.device_type.name().to_owned(),
                registered: registration.is_some(),
                registration,
                token_expires_s: secs_ceil(token.expires.saturating_duration_since(now)),
            })
        })
    }
}

fn not_registered() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_registered",
        "no live registration: register again",
    )
}

type ApiState = State<Arc<HttpsApi>>;
type Peer = ConnectInfo<SocketAddr>;

/// Reads a JSON body of at most the configured size within the request timeout.
async fn json_body<T: serde::de::DeserializeOwned>(
    api: &HttpsApi,
    body: Body,
) -> Result<T, ApiError> {
    let read = tokio::time::timeout(
        api.config.request_timeout,
        axum::body::to_bytes(body, api.config.body_limit),
    )
    .await;
    let bytes = match read {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "bad_request",
                "the request body did not arrive in time",
            ));
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                format!(
                    "the request body is larger than {} bytes or broken",
                    api.config.body_limit
                ),
            ));
        }
        Ok(Ok(b)) => b,
    };
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("JSON body: {e}")))
}

fn peer_of(ConnectInfo(peer): Peer) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

async fn login_start(State(api): ApiState, peer: Peer, body: Body) -> Response {
    let peer = peer_of(peer);
    let req = match json_body(&api, body).await {
        Ok(r) => r,
        Err(e) => return api.counted(e).into_response(),
    };
    match api.login_start(peer, req) {
        Ok(c) => Json(c).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn login_finish(State(api): ApiState, peer: Peer, body: Body) -> Response {
    let peer = peer_of(peer);
    let req = match json_body(&api, body).await {
        Ok(r) => r,
        Err(e) => return api.counted(e).into_response(),
    };
    match api.login_finish(peer, req) {
        Ok(l) => Json(l).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn register(State(api): ApiState, peer: Peer, headers: HeaderMap, body: Body) -> Response {
    let peer = peer_of(peer);
    // The token first: without one, the body is not read.
    if let Err(e) = api.with_token(&headers, |_| Ok(())) {
        return e.into_response();
    }
    let req = match json_body(&api, body).await {
        Ok(r) => r,
        Err(e) => return api.counted(e).into_response(),
    };
    match api.register(peer, &headers, req) {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn keepalive(State(api): ApiState, headers: HeaderMap) -> Response {
    match api.keepalive(&headers) {
        Ok(k) => Json(k).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn unregister(State(api): ApiState, peer: Peer, headers: HeaderMap) -> Response {
    match api.unregister(peer_of(peer), &headers) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn status(State(api): ApiState, headers: HeaderMap) -> Response {
    match api.status(&headers) {
        Ok(s) => Json(s).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this resource",
    )
    .into_response()
}

/// Every route: method, path and handler. The router is built from this list alone, so
/// [`routes`] names exactly what is served (the OpenAPI document is checked against it).
fn route_table() -> Vec<(&'static str, &'static str, MethodRouter<Arc<HttpsApi>>)> {
    use axum::routing::{get, post};
    vec![
        ("post", "/v1/login/start", post(login_start)),
        ("post", "/v1/login/finish", post(login_finish)),
        ("post", "/v1/register", post(register)),
        ("post", "/v1/keepalive", post(keepalive)),
        ("post", "/v1/unregister", post(unregister)),
        ("get", "/v1/status", get(status)),
        ("get", "/v1/openapi.json", get(openapi)),
    ]
}

/// The routes the router serves: (lowercase method, path).
pub fn routes() -> Vec<(&'static str, &'static str)> {
    route_table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The API's router; requests need a `ConnectInfo<SocketAddr>` extension (set by [`serve`]).
pub fn router(api: Arc<HttpsApi>) -> axum::Router {
    let mut router = axum::Router::new();
    for (_, path, handler) in route_table() {
        router = router.route(path, handler.fallback(method_not_allowed));
    }
    router.fallback(not_found).with_state(api)
}

/// A TLS acceptor for the API: the daemon's certificate-store settings
/// ([`crate::certstore::CertStore`]) with ALPN `http/1.1`.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    crate::certstore::CertStore::open(cert, key)?.acceptor(&[b"http/1.1"])
}

/// Serves the API on `listener` through `tls` until `shutdown` completes: then stops
/// accepting, gives open requests [`HttpsConfig::shutdown_grace`] and ends every HTTPS
/// registration. Expired logins, registrations and tokens are swept every second.
pub async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    api: Arc<HttpsApi>,
    shutdown: impl Future<Output = ()>,
) {
    let router = router(api.clone());
    let config = api.config.clone();
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sweeper = {
        let api = api.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tick.tick() => api.sweep(),
                }
            }
        })
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "https api: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "https api: too many connections, closing one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (tls, router, config, mut stopped) =
            (tls.clone(), router.clone(), config.clone(), stopped.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream =
                match tokio::time::timeout(config.handshake_timeout, tls.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "https api: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "https api: TLS handshake timed out");
                        return;
                    }
                };
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(ConnectInfo(peer));
                    let mut router = router.clone();
                    tower_service::Service::call(&mut router, req)
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(config.request_timeout)
                .max_buf_size(config.body_limit.max(8192) + 8192)
                .max_headers(64);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "https api: connection ended");
                    }
                }
                _ = stopped.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(config.shutdown_grace, conn).await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let _ = sweeper.await;
    let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        config.shutdown_grace + Duration::from_secs(1),
        connections.acquire_many(all),
    )
    .await;
    api.end_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_names_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("OpenAPI is JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.0")),
            "an OpenAPI 3.0 document"
        );
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                documented.push((method.clone(), path.clone()));
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = routes()
            .into_iter()
            .map(|(m, p)| (m.to_owned(), p.to_owned()))
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn errors_are_json_with_retry_after_where_due() {
        let e = ApiError::refusal(Refusal::LockedOut { retry_after_s: 30 }, "locked");
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "30");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            ApiError::refusal(Refusal::NotAllowedExternal, "x").status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            ApiError::refusal(Refusal::AuthFailed, "anything"),
            ApiError::auth_failed()
        );
    }

    #[test]
    fn media_addresses_must_be_reachable() {
        assert!(parse_media("192.0.2.10:5004").is_ok());
        assert!(parse_media("[2001:db8::1]:5004").is_ok());
        for bad in [
            "192.0.2.10:0",
            "0.0.0.0:5004",
            "224.0.0.1:5004",
            "255.255.255.255:5004",
            "nonsense",
            "",
        ] {
            assert!(parse_media(bad).is_err(), "{bad}");
        }
    }
}
