//! A device's side of the registration protocol over a real connection (TCP 4062 or TLS
//! 4063): what the tests, the demo and the benchmark register with. It drives
//! `relay_core::register::ClientSession` and answers its SCRAM steps with
//! `relay_core::device::scram::ScramClient`.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_core::device::scram::{ScramClient, generate_nonce};
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
    /// The registration as the relay granted it (public address included).
    pub registration: ClientRegistration,
}

fn now_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Registers over `stream` (a fresh connection to the relay's registration port).
pub async fn register<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    c: &Credentials,
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
                        Ok(()) => session.server_verified(now_ms(started)),
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
                        registration,
                    });
                }
                ClientEvent::Closed(CloseReason::Refused(r)) => {
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
