//! The gRPC server: `relay.v1.ChannelService`, the standard health service
//! (`grpc.health.v1.Health`) and server reflection in both its v1 and v1alpha versions (grpcurl
//! asks for v1alpha).
//!
//! The invariant a reader must know: **the API is never served to other hosts without
//! authentication.** On a loopback address it needs none (unless `require_auth`); on any other
//! address [`serve`] refuses to start unless clients must present a certificate from the
//! configured CA (mutual TLS) or a bearer token, checked by [`BearerAuth`] in constant time.
//! The health service is left open so probes work without credentials; it reveals only
//! SERVING / NOT_SERVING.
//!
//! [`serve`] takes an already-bound listener and a shutdown future (the mini-redis pattern), so
//! tests bind port 0 and stop the server cleanly.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use proto::v1::channel_service_server::ChannelServiceServer;
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::api::Api;
use crate::error::{ServiceError, to_status};
use crate::service::Service;

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

impl Security {
    /// Whether clients must prove who they are.
    pub fn authenticates(&self) -> bool {
        self.token.is_some() || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }
}

/// Why the server did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to serve the API on {addr} without authentication: other hosts could drive \
         the relay. Configure a bearer token (api.token_file) or mutual TLS (api.tls with \
         client_ca), or listen on a loopback address"
    )]
    Unauthenticated { addr: SocketAddr },
    #[error(
        "authentication is required (api.require_auth) but neither a bearer token nor mutual TLS is configured"
    )]
    AuthRequired,
    #[error("TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("reading the listener's address: {0}")]
    Io(#[from] std::io::Error),
    #[error("serving the API: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// Checks a bearer token on every request it guards.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

impl BearerAuth {
    /// Requires `token`; `None` lets every request through.
    pub fn new(token: Option<&str>) -> BearerAuth {
        BearerAuth {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    fn check(&self, request: &Request<()>) -> Result<(), ServiceError> {
        let Some(expected) = &self.token else {
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
        if bool::from(given.as_bytes().ct_eq(expected)) {
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

/// Serves the API on `listener` until `shutdown` completes (then in-flight requests finish).
/// Refuses to start when the address is reachable from other hosts without authentication.
pub async fn serve(
    listener: TcpListener,
    service: Service,
    security: Security,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    if !security.authenticates() {
        if security.require_auth {
            return Err(ServeError::AuthRequired);
        }
        if !addr.ip().is_loopback() {
            return Err(ServeError::Unauthenticated { addr });
        }
    }
    let auth = BearerAuth::new(security.token.as_deref());

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ChannelServiceServer<Api>>().await;
    let stopping = service.stopping();
    let reporter = health.clone();
    tokio::spawn(async move {
        stopping.await;
        reporter
            .set_not_serving::<ChannelServiceServer<Api>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let mut builder = Server::builder();
    if let Some(tls) = &security.tls {
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
        if let Some(ca) = &tls.client_ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(config).map_err(ServeError::Tls)?;
    }
    let mode = match (&security.tls, &security.token) {
        (Some(t), _) if t.client_ca.is_some() => "mutual TLS",
        (_, Some(_)) => "bearer token",
        (Some(_), None) => "TLS without client authentication: loopback only",
        (None, None) => "no authentication: loopback only",
    };
    log::info!("gRPC API on {addr} ({mode})");
    builder
        .layer(crate::metrics::GrpcLayer::new(service.metrics().clone()))
        .add_service(health_service)
        .add_service(InterceptedService::new(
            ChannelServiceServer::new(Api::new(service)),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth))
        // TCP_NODELAY: tonic sets it only on listeners it binds itself. Without it a reply
        // written in two segments waits for the client's delayed ACK (Nagle): 40 ms stalls.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(ServeError::Transport)
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
