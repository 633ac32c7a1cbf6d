//! A device's side of the registration protocol over a real connection (TCP 4062 or TLS
//! 4063): what the tests, the demo and the benchmark register with. It drives
//! `relay_core::register::ClientSession` and answers its SCRAM steps with
//! `relay_core::device::scram::ScramClient`. A [`KeyCache`] keeps the device's SCRAM keys
//! between registrations, so that only the first registration with a salt pays PBKDF2.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use relay_core::device::scram::{ScramClient, ScramClientKeys, generate_nonce};
use relay_core::register::{
    ClientConfig, ClientEvent, ClientRegistration, ClientSession, CloseReason, DeviceType,
    FirmwareVersion, Number, Refusal, ScramMessage,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// What a device registers with.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub number: String,
    pub password: String,
    pub mac: [u8; 6],
    /// A device type name (`openstage_hfa`...).
    pub device_type: String,
    pub firmware: String,
    /// The device's own media address (before its router's NAT).
    pub media: SocketAddr,
    /// Keepalive interval to ask for; 0: the relay's default.
    pub keepalive_s: u32,
}

/// What a device keeps between registrations: the SCRAM keys of its password for the relay's
/// salt and iteration count (RFC 5802 §5.1 lets a client cache them). A registration with a
/// warm cache computes its proof without PBKDF2 — 600,000 iterations for verifiers made with
/// the product's default, a noticeable fraction of a second of a phone's CPU — as a phone that
/// derives its salted password once would. The keys are stored only after the relay proved it
/// holds the password's verifier, used only for the same number and password and the salt and
/// count they were derived for, and dropped if the relay refuses a proof made from them.
/// Clones share one cache.
#[derive(Clone, Default)]
pub struct KeyCache(Arc<Mutex<Option<CachedKeys>>>);

struct CachedKeys {
    number: String,
    password: String,
    keys: ScramClientKeys,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        let mut d = f.debug_struct("KeyCache");
        if let Some(c) = inner.as_ref() {
            d.field("number", &c.number).field("keys", &c.keys);
        }
        d.finish_non_exhaustive()
    }
}

impl KeyCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CachedKeys>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the cache holds keys for `c`'s number and password.
    pub fn is_warm_for(&self, c: &Credentials) -> bool {
        self.get(c).is_some()
    }

    fn get(&self, c: &Credentials) -> Option<ScramClientKeys> {
        self.lock()
            .as_ref()
            .filter(|k| k.number == c.number && k.password == c.password)
            .map(|k| k.keys.clone())
    }

    fn put(&self, c: &Credentials, keys: ScramClientKeys) {
        *self.lock() = Some(CachedKeys {
            number: c.number.clone(),
            password: c.password.clone(),
            keys,
        });
    }

    /// Forgets the keys.
    pub fn clear(&self) {
        *self.lock() = None;
    }
}

/// Why a registration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("closed: {0}")]
    Closed(CloseReason),
    #[error("invalid credentials: {0}")]
    Invalid(String),
    #[error("scram: {0}")]
    Scram(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A registered device on its connection.
#[derive(Debug)]
pub struct Registered<S> {
    stream: S,
    session: ClientSession,
    started: Instant,
    used_cached_keys: bool,
    /// The registration as the relay granted it (public address included).
    pub registration: ClientRegistration,
}

fn now_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Registers over `stream` (a fresh connection to the relay's registration port), deriving
/// the SCRAM keys from the password (PBKDF2 every time; see [`register_cached`]).
pub async fn register<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    c: &Credentials,
) -> Result<Registered<S>, RegisterError> {
    register_cached(stream, c, &KeyCache::default()).await
}

/// Registers over `stream` with the device's [`KeyCache`]: keys kept from an earlier
/// registration are used if the relay names their salt and iteration count, and the keys of a
/// successful registration are kept for the next.
pub async fn register_cached<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    c: &Credentials,
    cache: &KeyCache,
) -> Result<Registered<S>, RegisterError> {
    let invalid = |e: relay_core::register::ValueError| RegisterError::Invalid(e.to_string());
    let config = ClientConfig {
        number: Number::new(c.number.clone()).map_err(invalid)?,
        mac: c.mac,
        device_type: DeviceType::new(c.device_type.clone()).map_err(invalid)?,
        firmware: FirmwareVersion::new(c.firmware.clone()).map_err(invalid)?,
        media_addr: c.media,
        keepalive_s: c.keepalive_s,
        handshake_timeout_ms: 10_000,
    };
    let mut scram = ScramClient::new(&c.number, &c.password, &generate_nonce(&mut rand::rng()))
        .map_err(|e| RegisterError::Scram(e.to_string()))?;
    if let Some(keys) = cache.get(c) {
        scram = scram.with_keys(keys);
    }
    let client_first = ScramMessage::new(scram.client_first()).map_err(invalid)?;
    let started = Instant::now();
    let mut session = ClientSession::new(config, client_first, 0);
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    loop {
        while let Some(event) = session.poll_event() {
            match event {
                ClientEvent::Challenge { server_first } => {
                    let sf = String::from_utf8_lossy(server_first.as_bytes()).into_owned();
                    let cf = scram
                        .handle_server_first(&sf)
                        .map_err(|e| RegisterError::Scram(e.to_string()))?;
                    let _ = session.proof(ScramMessage::new(cf).map_err(invalid)?);
                }
                ClientEvent::VerifyServer { server_final } => {
                    let sf = String::from_utf8_lossy(server_final.as_bytes()).into_owned();
                    let _ = match scram.handle_server_final(&sf) {
                        Ok(()) => {
                            if let Some(keys) = scram.verified_keys() {
                                cache.put(c, keys.clone());
                            }
                            session.server_verified(now_ms(started))
                        }
                        Err(_) => session.server_rejected(),
                    };
                }
                ClientEvent::Registered(registration) => {
                    out.clear();
                    session.encode_transmits(&mut out);
                    stream.write_all(&out).await?;
                    return Ok(Registered {
                        stream,
                        session,
                        started,
                        used_cached_keys: scram.used_cached_keys(),
                        registration,
                    });
                }
                ClientEvent::Closed(CloseReason::Refused(r)) => {
                    if r == Refusal::AuthFailed && scram.used_cached_keys() {
                        cache.clear();
                    }
                    return Err(RegisterError::Refused(r));
                }
                ClientEvent::Closed(reason) => return Err(RegisterError::Closed(reason)),
            }
        }
        out.clear();
        session.encode_transmits(&mut out);
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
        let wait = session.poll_timeout().map_or(Duration::from_secs(10), |t| {
            Duration::from_millis(t.saturating_sub(now_ms(started)))
        });
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => session.connection_lost(),
            Ok(Ok(n)) => session.handle_bytes(&buf[..n], now_ms(started)),
            Err(_) => session.handle_timeout(now_ms(started)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Registered<S> {
    /// Whether the proof came from the [`KeyCache`] (no PBKDF2 in this registration).
    pub fn used_cached_keys(&self) -> bool {
        self.used_cached_keys
    }

    /// Keeps the registration alive (keepalives at the granted interval) for `d`; an error if
    /// the relay ends it meanwhile.
    pub async fn hold(&mut self, d: Duration) -> Result<(), RegisterError> {
        let until = Instant::now() + d;
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        loop {
            while let Some(event) = self.session.poll_event() {
                if let ClientEvent::Closed(reason) = event {
                    return Err(RegisterError::Closed(reason));
                }
            }
            out.clear();
            self.session.encode_transmits(&mut out);
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let next = self
                .session
                .poll_timeout()
                .map_or(until, |t| self.started + Duration::from_millis(t));
            let wait = next.min(until).saturating_duration_since(now);
            match tokio::time::timeout(wait, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => self.session.connection_lost(),
                Ok(Ok(n)) => self.session.handle_bytes(&buf[..n], now_ms(self.started)),
                Err(_) => self.session.handle_timeout(now_ms(self.started)),
            }
        }
    }

    /// Unregisters cleanly and waits for the relay's answer.
    pub async fn unregister(mut self) -> Result<(), RegisterError> {
        let _ = self.session.unregister(now_ms(self.started));
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        loop {
            while let Some(event) = self.session.poll_event() {
                match event {
                    ClientEvent::Closed(CloseReason::Unregistered) => {
                        let _ = self.stream.shutdown().await;
                        return Ok(());
                    }
                    ClientEvent::Closed(reason) => return Err(RegisterError::Closed(reason)),
                    _ => {}
                }
            }
            out.clear();
            self.session.encode_transmits(&mut out);
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
            }
            match tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => self.session.connection_lost(),
                Ok(Ok(n)) => self.session.handle_bytes(&buf[..n], now_ms(self.started)),
            }
        }
    }
}
