//! The gRPC server: `relay.v1.ChannelService`, `DeviceService` and `PublicAddressService`, the
//! standard health service (`grpc.health.v1.Health`) and server reflection in both its v1 and
//! v1alpha versions (grpcurl asks for v1alpha).
//!
//! The invariant a reader must know: **the API is never served to other hosts without
//! authentication, and a bearer token never crosses the network in clear.** On a loopback
//! address it needs none (unless `require_auth`); on any other address [`serve`] refuses to
//! start unless clients must present a certificate from the configured CA (mutual TLS) or a
//! bearer token, checked by [`BearerAuth`] in constant time — and a token there needs TLS. The
//! health service is left open so probes work without credentials; it reveals only
//! SERVING / NOT_SERVING.
//!
//! Hostile clients are bounded: requests above [`MAX_MESSAGE_SIZE`] are refused
//! (RESOURCE_EXHAUSTED) before they are buffered, connections beyond [`Limits::max_connections`]
//! are closed at once, each connection gets at most [`Limits::max_concurrent_streams`] HTTP/2
//! streams, and a client that opens TCP but does not finish the TLS handshake within
//! [`Limits::tls_handshake_timeout`] is dropped. TLS is served here with tokio-rustls (tonic
//! gets the decrypted streams) so that [`Credentials::reload`] (SIGHUP) can swap the
//! certificate, key, client CA and token while connections stay up.
//!
//! Shutdown is bounded by construction: when the shutdown future completes, health reports
//! NOT_SERVING and ends its Watch streams, channel Watch streams end with the service, and
//! whatever is still in flight after [`Limits::shutdown_grace`] has its connection closed.
//!
//! [`serve`] takes an already-bound listener and a shutdown future (the mini-redis pattern), so
//! tests bind port 0 and stop the server cleanly.
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use proto::v1::channel_service_server::ChannelServiceServer;
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::rustls;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::api::Api;
use crate::config::{self, ApiSection, ConfigError};
use crate::error::{ServiceError, to_status};
use crate::service::Service;

/// The largest request message accepted (decoded size): a larger one is refused with
/// RESOURCE_EXHAUSTED before it is buffered. Every request of `relay.v1` fits in a few KiB.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// The largest header block (metadata) a client may send.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// TLS material, PEM-encoded.
#[derive(Clone)]
pub struct TlsPem {
    /// Server certificate chain.
    pub cert: Vec<u8>,
    /// Server private key.
    pub key: Vec<u8>,
    /// CA client certificates must chain to; `Some`: mutual TLS.
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("mutual", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

/// How clients are authenticated.
#[derive(Clone, Default)]
pub struct Security {
    /// Require authentication even on a loopback address.
    pub require_auth: bool,
    /// Bearer token every request must carry (`authorization: Bearer TOKEN`).
    pub token: Option<String>,
    /// TLS (mutual with `client_ca`).
    pub tls: Option<TlsPem>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("require_auth", &self.require_auth)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

fn read_pem(key: &str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError {
        key: key.to_owned(),
        message: format!("reading {}: {e}", path.display()),
    })
}

impl Security {
    /// Whether clients must prove who they are.
    pub fn authenticates(&self) -> bool {
        self.token.is_some() || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }

    /// Reads the material the `[api]` section names (token file, certificate, key, client CA).
    pub fn load(api: &ApiSection) -> Result<Security, ConfigError> {
        let token = api
            .token_file
            .as_deref()
            .map(config::load_token)
            .transpose()?;
        let tls = match &api.tls {
            None => None,
            Some(t) => Some(TlsPem {
                cert: read_pem("api.tls.cert", &t.cert)?,
                key: read_pem("api.tls.key", &t.key)?,
                client_ca: t
                    .client_ca
                    .as_deref()
                    .map(|p| read_pem("api.tls.client_ca", p))
                    .transpose()?,
            }),
        };
        Ok(Security {
            require_auth: api.require_auth,
            token,
            tls,
        })
    }
}

/// Limits against hostile or broken clients (`[api]` keys of the same names).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Requests of one connection handled at once; more wait.
    pub max_requests_per_connection: usize,
    /// Time a client has to finish the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// At shutdown, how long requests in flight may run before their connections are closed.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&ApiSection::default())
    }
}

impl Limits {
    /// The limits the `[api]` section sets.
    pub fn from_config(api: &ApiSection) -> Limits {
        Limits {
            max_connections: api.max_connections,
            max_concurrent_streams: api.max_concurrent_streams,
            max_requests_per_connection: api.max_requests_per_connection,
            tls_handshake_timeout: api.tls_handshake_timeout,
            shutdown_grace: api.shutdown_grace,
        }
    }
}

/// Why the server did not start or stopped, or why credentials were not (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to serve the API on {addr} without authentication: other hosts could drive \
         the relay. Configure a bearer token (api.token_file) or mutual TLS (api.tls with \
         client_ca), or listen on a loopback address"
    )]
    Unauthenticated { addr: SocketAddr },
    #[error(
        "refusing to serve the API on {addr} with a bearer token but without TLS: plain HTTP/2 \
         would carry the token in clear. Configure api.tls (cert, key) or listen on a loopback \
         address"
    )]
    TokenWithoutTls { addr: SocketAddr },
    #[error(
        "authentication is required (api.require_auth) but neither a bearer token nor mutual TLS is configured"
    )]
    AuthRequired,
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("reading the listener's address: {0}")]
    Io(#[from] std::io::Error),
    #[error("serving the API: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// The current bearer token, shared by the interceptor and [`Credentials::reload`].
type TokenSlot = Arc<RwLock<Option<Arc<[u8]>>>>;

/// Checks a bearer token on every request it guards.
#[derive(Clone)]
pub struct BearerAuth {
    token: TokenSlot,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("enabled", &self.current().is_some())
            .finish()
    }
}

impl BearerAuth {
    /// Requires `token`; `None` lets every request through.
    pub fn new(token: Option<&str>) -> BearerAuth {
        BearerAuth {
            token: Arc::new(RwLock::new(token.map(|t| Arc::from(t.as_bytes())))),
        }
    }

    fn current(&self) -> Option<Arc<[u8]>> {
        self.token
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn check(&self, request: &Request<()>) -> Result<(), ServiceError> {
        let Some(expected) = self.current() else {
            return Ok(());
        };
        let value =
            request
                .metadata()
                .get("authorization")
                .ok_or(ServiceError::Unauthenticated(
                    "missing bearer token (authorization: Bearer TOKEN)",
                ))?;
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ServiceError::Unauthenticated(
                "malformed authorization header: expected \"Bearer TOKEN\"",
            ))?;
        // Constant time in the token's content; its length (a configuration constant, not a
        // secret worth guessing byte by byte) may show.
        if bool::from(given.as_bytes().ct_eq(&expected)) {
            Ok(())
        } else {
            Err(ServiceError::Unauthenticated("invalid bearer token"))
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request).map_err(|e| to_status(&e))?;
        Ok(request)
    }
}

/// A rustls server configuration from PEM material: the ring provider (the tree's only one),
/// HTTP/2 by ALPN, client certificates verified against `client_ca` if set.
fn tls_config(pem: &TlsPem) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_error = |what: &str, e: &dyn std::fmt::Display| ServeError::Tls(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error("api.tls.cert", &e))?;
    if certs.is_empty() {
        return Err(tls_error("api.tls.cert", &"no PEM certificate found"));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| tls_error("api.tls.key", &e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions", &e))?;
    let builder = match &pem.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| tls_error("api.tls.client_ca", &e))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_error("api.tls.client_ca", &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| tls_error("api.tls.client_ca", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("api.tls.cert and api.tls.key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The current TLS configuration, shared by the accept loop and [`Credentials::reload`].
type TlsSlot = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// The API's live credentials: the bearer token and the TLS configuration, both replaceable
/// while the server runs ([`Credentials::reload`], called on SIGHUP). What kind of
/// authentication is in force (token or not, TLS or not, mutual or not) is fixed at start; only
/// the material rotates.
#[derive(Clone)]
pub struct Credentials {
    require_auth: bool,
    mutual_tls: bool,
    token: Option<TokenSlot>,
    tls: Option<TlsSlot>,
    /// Where the material comes from; `None`: given in memory, nothing to reload.
    files: Option<Arc<ApiSection>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("require_auth", &self.require_auth)
            .field("token", &self.token.is_some())
            .field("tls", &self.tls.is_some())
            .field("mutual_tls", &self.mutual_tls)
            .field("reloadable", &self.files.is_some())
            .finish()
    }
}

impl Credentials {
    /// Credentials from material in memory (they cannot be reloaded).
    pub fn new(security: &Security) -> Result<Credentials, ServeError> {
        Ok(Credentials {
            require_auth: security.require_auth,
            mutual_tls: security.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            token: security
                .token
                .as_deref()
                .map(|t| Arc::new(RwLock::new(Some(Arc::from(t.as_bytes()))))),
            tls: security
                .tls
                .as_ref()
                .map(|t| tls_config(t).map(|c| Arc::new(RwLock::new(c))))
                .transpose()?,
            files: None,
        })
    }

    /// Credentials read from the files the `[api]` section names; [`Credentials::reload`]
    /// reads them again.
    pub fn load(api: &ApiSection) -> Result<Credentials, ServeError> {
        let security = Security::load(api)?;
        let mut credentials = Credentials::new(&security)?;
        credentials.files = Some(Arc::new(api.clone()));
        Ok(credentials)
    }

    fn authenticates(&self) -> bool {
        self.token.is_some() || self.mutual_tls
    }

    /// Reads the token file and the TLS files again and puts them in force for new requests
    /// and new connections. All or nothing: on any error the material in force stays, and the
    /// error says why. `Ok(false)`: there is nothing to reload (material given in memory).
    pub fn reload(&self) -> Result<bool, ServeError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let security = Security::load(files)?;
        let tls = match (&self.tls, &security.tls) {
            (Some(_), Some(pem)) => Some(tls_config(pem)?),
            _ => None,
        };
        if let (Some(slot), Some(token)) = (&self.token, &security.token) {
            *slot
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(Arc::from(token.as_bytes()));
        }
        if let (Some(slot), Some(config)) = (&self.tls, tls) {
            *slot
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        }
        Ok(true)
    }

    /// [`Credentials::reload`], logged: what the SIGHUP handler runs.
    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(true) => {
                log::info!("reloaded the API credentials (token file, TLS certificate and key)")
            }
            Ok(false) => log::info!("no API credentials to reload"),
            Err(e) => log::warn!("kept the API credentials in force: reloading them failed: {e}"),
        }
    }

    fn bearer_auth(&self) -> BearerAuth {
        BearerAuth {
            token: self
                .token
                .clone()
                .unwrap_or_else(|| Arc::new(RwLock::new(None))),
        }
    }
}

/// Whether the server may start on `addr` with these credentials.
pub fn check_exposure(addr: SocketAddr, credentials: &Credentials) -> Result<(), ServeError> {
    if !credentials.authenticates() {
        if credentials.require_auth {
            return Err(ServeError::AuthRequired);
        }
        if !addr.ip().is_loopback() {
            return Err(ServeError::Unauthenticated { addr });
        }
    }
    if credentials.token.is_some() && credentials.tls.is_none() && !addr.ip().is_loopback() {
        return Err(ServeError::TokenWithoutTls { addr });
    }
    Ok(())
}

/// Serves the API on `listener` with default [`Limits`] until `shutdown` completes.
/// Refuses to start when the address is reachable from other hosts without authentication.
pub async fn serve(
    listener: TcpListener,
    service: Service,
    security: Security,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let credentials = Credentials::new(&security)?;
    serve_with(listener, service, credentials, Limits::default(), shutdown).await
}

/// Serves the API on `listener` until `shutdown` completes, then ends Watch streams and lets
/// requests in flight finish within [`Limits::shutdown_grace`].
pub async fn serve_with(
    listener: TcpListener,
    service: Service,
    credentials: Credentials,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    check_exposure(addr, &credentials)?;
    let auth = credentials.bearer_auth();

    let (health, _) = tonic_health::server::health_reporter();
    health.set_serving::<ChannelServiceServer<Api>>().await;
    let stopping = service.stopping();
    let reporter = health.clone();
    tokio::spawn(async move {
        stopping.await;
        not_serving(&reporter).await;
    });
    // Ends with this server (it holds a handle of the service, which must not outlive it).
    let _fast_path_health = AbortOnDrop(tokio::spawn(watch_fast_path(
        service.clone(),
        health.clone(),
    )));
    let (health_end, health_ended) = watch::channel(false);
    let health_service = HealthServer::new(EndingHealth {
        inner: tonic_health::server::HealthService::from_health_reporter(health.clone()),
        ended: health_ended,
    })
    .max_decoding_message_size(MAX_MESSAGE_SIZE);

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()?
        .max_decoding_message_size(MAX_MESSAGE_SIZE);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .max_decoding_message_size(MAX_MESSAGE_SIZE);

    let mode = match (&credentials.tls, &credentials.token) {
        (Some(_), _) if credentials.mutual_tls => "mutual TLS",
        (Some(_), Some(_)) => "TLS, bearer token",
        (None, Some(_)) => "bearer token: loopback only",
        (Some(_), None) => "TLS without client authentication: loopback only",
        (None, None) => "no authentication: loopback only",
    };
    log::info!("gRPC API on {addr} ({mode})");

    // Fires when shutdown begins; a second later-stage signal closes what is left.
    let (begun_tx, mut begun) = watch::channel(false);
    let (kill_tx, kill) = watch::channel(false);
    let signal = async move {
        shutdown.await;
        not_serving(&health).await;
        // After NOT_SERVING, so every health watcher sees it before its stream ends.
        let _ = health_end.send(true);
        let _ = begun_tx.send(true);
    };
    let incoming = incoming(Acceptor {
        listener,
        tls: credentials.tls.clone(),
        connections: Arc::new(Semaphore::new(limits.max_connections)),
        max_connections: limits.max_connections,
        handshake_timeout: limits.tls_handshake_timeout,
        kill,
    });
    let devices = crate::devices_api::DevicesApi::for_service(&service);
    let public_address = crate::public_address_api::PublicAddressApi::new(service.clone());
    let served = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .concurrency_limit_per_connection(limits.max_requests_per_connection)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .layer(crate::metrics::GrpcLayer::new(service.metrics().clone()))
        .layer(TooLargeLayer)
        .add_service(health_service)
        .add_service(InterceptedService::new(
            ChannelServiceServer::new(Api::new(service))
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            proto::v1::device_service_server::DeviceServiceServer::new(devices)
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            proto::v1::public_address_service_server::PublicAddressServiceServer::new(
                public_address,
            )
            .max_decoding_message_size(MAX_MESSAGE_SIZE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth))
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = limits.shutdown_grace;
    let deadline = async move {
        let _ = begun.wait_for(|b| *b).await;
        tokio::time::sleep(grace).await;
        log::warn!(
            "API: requests still in flight {grace:?} after shutdown began (api.shutdown_grace): \
             closing their connections"
        );
        let _ = kill_tx.send(true);
        // The server returns once the closed connections are gone.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        r = served => r.map_err(ServeError::Transport),
        () = deadline => Ok(()),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The health service name of the fast path: SERVING while XDP forwards every channel it
/// should, NOT_SERVING while it does not run or is degraded (media then goes through user
/// space: calls work, at a higher cost). The API's own health (`""` and the channel service)
/// does not depend on it.
pub const FAST_PATH_HEALTH: &str = "homerelay.v1.FastPath";

/// How often the fast path's health is re-read.
const FAST_PATH_HEALTH_PERIOD: Duration = Duration::from_secs(1);

/// Keeps [`FAST_PATH_HEALTH`] up to date until the service stops; logs each change.
async fn watch_fast_path(service: Service, reporter: tonic_health::server::HealthReporter) {
    let mut stopping = std::pin::pin!(service.stopping());
    let mut last: Option<bool> = None;
    loop {
        let Ok(pool) = service.pool().await else {
            break;
        };
        let why = if pool.data_path != "xdp" {
            pool.fast_path_unavailable.clone()
        } else {
            pool.fast_path_degraded.clone()
        };
        let healthy = why.is_none();
        if last != Some(healthy) {
            let status = if healthy {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status(FAST_PATH_HEALTH, status).await;
            match (&why, last) {
                (Some(why), _) => log::warn!("health {FAST_PATH_HEALTH}: NOT_SERVING ({why})"),
                (None, Some(false)) => log::info!("health {FAST_PATH_HEALTH}: SERVING again"),
                (None, _) => {}
            }
            last = Some(healthy);
        }
        tokio::select! {
            () = &mut stopping => break,
            () = tokio::time::sleep(FAST_PATH_HEALTH_PERIOD) => {}
        }
    }
    reporter
        .set_service_status(FAST_PATH_HEALTH, tonic_health::ServingStatus::NotServing)
        .await;
}

async fn not_serving(reporter: &tonic_health::server::HealthReporter) {
    reporter
        .set_not_serving::<ChannelServiceServer<Api>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

/// A future that completes when `flag` turns true (or its sender is gone).
fn raised(mut flag: watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
    Box::pin(async move {
        let _ = flag.wait_for(|f| *f).await;
    })
}

/// The standard health service whose Watch streams end when the server shuts down (they would
/// otherwise keep the graceful shutdown waiting forever).
struct EndingHealth {
    inner: tonic_health::server::HealthService,
    ended: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for EndingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = UntilRaised<<tonic_health::server::HealthService as Health>::WatchStream>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(UntilRaised {
            inner: stream,
            raised: raised(self.ended.clone()),
            seen: false,
            done: false,
        }))
    }
}

/// A stream that ends when a flag is raised, after yielding what it already has ready.
struct UntilRaised<S> {
    inner: S,
    raised: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    /// The flag was seen raised (its future must not be polled again).
    seen: bool,
    done: bool,
}

impl<S: Stream + Unpin> Stream for UntilRaised<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.seen && self.raised.as_mut().poll(cx).is_ready() {
            self.seen = true;
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending if self.seen => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Turns tonic's answer to an oversized request (OUT_OF_RANGE, "decoded message length too
/// large") into RESOURCE_EXHAUSTED with a message naming the limit. It is a trailers-only
/// response, so the status is in the headers.
#[derive(Clone, Copy, Debug)]
struct TooLargeLayer;

impl<S> tower_layer::Layer<S> for TooLargeLayer {
    type Service = TooLarge<S>;

    fn layer(&self, inner: S) -> TooLarge<S> {
        TooLarge { inner }
    }
}

#[derive(Clone, Debug)]
struct TooLarge<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for TooLarge<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            relabel_too_large(response.headers_mut());
            Ok(response)
        })
    }
}

fn relabel_too_large(headers: &mut http::HeaderMap) {
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // Percent-encoded (gRPC): spaces may travel as %20.
            .is_some_and(|m| {
                m.replace("%20", " ")
                    .starts_with("Error, decoded message length too large")
            });
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("request message too large: the limit is 65536 bytes"),
        );
    }
}

const _: () = assert!(
    MAX_MESSAGE_SIZE == 65536,
    "update the message in relabel_too_large"
);

/// What the accept loop needs.
struct Acceptor {
    listener: TcpListener,
    tls: Option<TlsSlot>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    handshake_timeout: Duration,
    kill: watch::Receiver<bool>,
}

/// The connections tonic serves: accepted under the connection cap, TLS handshakes done
/// concurrently (each bounded by the handshake timeout) so a silent client delays no one.
/// The accept loop ends when tonic drops the stream (shutdown), closing the listener.
fn incoming(acceptor: Acceptor) -> tokio_stream::wrappers::ReceiverStream<io::Result<ApiConn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(acceptor, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(a: Acceptor, tx: mpsc::Sender<io::Result<ApiConn>>) {
    let mut refused: u64 = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = a.listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, for instance: wait instead of spinning.
                    log::warn!("API: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = a.connections.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                log::warn!(
                    "API: closed a connection from {peer}: {} connections are open \
                     (api.max_connections); {refused} refused so far",
                    a.max_connections
                );
            }
            drop(tcp);
            continue;
        };
        // TCP_NODELAY: without it a reply written in two segments waits for the client's
        // delayed ACK (Nagle): 40 ms stalls.
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let conn = |io| ApiConn {
            io,
            info,
            _permit: permit,
            killed: Some(raised(a.kill.clone())),
        };
        match &a.tls {
            None => {
                if tx.send(Ok(conn(Io::Plain(tcp)))).await.is_err() {
                    return;
                }
            }
            Some(slot) => {
                let config = slot
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let tx = tx.clone();
                let timeout = a.handshake_timeout;
                let mut conn = conn(Io::Handshaking);
                tokio::spawn(async move {
                    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                    let done = tokio::select! {
                        () = tx.closed() => return,
                        done = tokio::time::timeout(timeout, handshake) => done,
                    };
                    match done {
                        Ok(Ok(stream)) => {
                            conn.io = Io::Tls(Box::new(stream));
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(e)) => log::debug!("API: TLS handshake with {peer} failed: {e}"),
                        Err(_) => log::debug!(
                            "API: {peer} did not complete the TLS handshake within {timeout:?} \
                             (api.tls_handshake_timeout): disconnected"
                        ),
                    }
                });
            }
        }
    }
}

enum Io {
    /// Not yet usable (the TLS handshake runs); never handed to tonic in this state.
    Handshaking,
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted API connection: holds its slot under the connection cap, and fails its I/O once
/// the shutdown grace is over.
pub struct ApiConn {
    io: Io,
    info: TcpConnectInfo,
    _permit: OwnedSemaphorePermit,
    killed: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl std::fmt::Debug for ApiConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConn")
            .field("remote", &self.info.remote_addr)
            .field("tls", &matches!(self.io, Io::Tls(_)))
            .finish_non_exhaustive()
    }
}

impl ApiConn {
    /// The I/O to use, or the error that closes the connection (shutdown grace over).
    fn io(&mut self, cx: &mut Context<'_>) -> io::Result<Pin<&mut (dyn AsyncIo + '_)>> {
        if let Some(killed) = self.killed.as_mut() {
            if killed.as_mut().poll(cx).is_ready() {
                self.killed = None;
            }
        }
        if self.killed.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed at shutdown",
            ));
        }
        match &mut self.io {
            Io::Handshaking => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS handshake not done",
            )),
            Io::Plain(s) => {
                let io: Pin<&mut TcpStream> = Pin::new(s);
                Ok(io)
            }
            Io::Tls(s) => {
                let io: Pin<&mut tokio_rustls::server::TlsStream<TcpStream>> = Pin::new(s.as_mut());
                Ok(io)
            }
        }
    }
}

trait AsyncIo: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncIo for T {}

impl Connected for ApiConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().io(cx) {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io(cx) {
            Ok(io) => io.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().io(cx) {
            Ok(io) => io.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Handshaking => false,
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io(cx) {
            Ok(io) => io.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io(cx) {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut()
                .insert("authorization", a.parse().expect("ascii"));
        }
        r
    }

    #[test]
    fn only_the_decode_limit_becomes_resource_exhausted() {
        let headers = |status: &'static str, message: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-status", http::HeaderValue::from_static(status));
            h.insert("grpc-message", http::HeaderValue::from_static(message));
            h
        };
        for message in [
            "Error,%20decoded%20message%20length%20too%20large:%20found%2070000%20bytes",
            "Error, decoded message length too large: found 70000 bytes",
        ] {
            let mut h = headers("11", message);
            relabel_too_large(&mut h);
            assert_eq!(h["grpc-status"], "8");
            assert_eq!(
                h["grpc-message"],
                "request message too large: the limit is 65536 bytes"
            );
        }
        // Anything else is left alone.
        for (status, message) in [("11", "port out of range"), ("3", "Error, decoded message")] {
            let mut h = headers(status, message);
            relabel_too_large(&mut h);
            assert_eq!(h["grpc-status"], status);
            assert_eq!(h["grpc-message"], message);
        }
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let auth = BearerAuth::new(Some("0123456789abcdef"));
        assert!(
            auth.check(&request(Some("Bearer 0123456789abcdef")))
                .is_ok()
        );
        for (header, message) in [
            (None, "missing bearer token (authorization: Bearer TOKEN)"),
            (
                Some("Basic 0123456789abcdef"),
                "malformed authorization header: expected \"Bearer TOKEN\"",
            ),
            (Some("Bearer 0123456789abcdeF"), "invalid bearer token"),
            (Some("Bearer 0123456789abcdef0"), "invalid bearer token"),
            (Some("Bearer "), "invalid bearer token"),
        ] {
            let e = auth.check(&request(header)).expect_err(message);
            let status = to_status(&e);
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert_eq!(status.message(), message);
        }
        let open = BearerAuth::new(None);
        assert!(open.check(&request(None)).is_ok());
    }
}
