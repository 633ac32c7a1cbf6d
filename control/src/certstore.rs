//! The certificate store of the registration listeners (TLS 4063 and HTTPS 8802): one
//! certificate chain and private key, read from two PEM files, that every listener's TLS
//! configuration resolves through. Replacing the files (`homerelay cert import`, or any tool)
//! puts the new certificate in force for new connections without a restart: the store checks
//! the files every [`WATCH_INTERVAL`] and on SIGHUP. A broken replacement (unreadable, a key
//! that does not match the certificate) is refused with a logged error and the certificate in
//! force stays; connections already open are never touched.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::crypto::ring;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::rustls;

/// How often the store looks at its files for a replacement.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The modification times of the (certificate, key) files.
type Stamps = (Option<SystemTime>, Option<SystemTime>);

/// What was read from the files, and when they were last changed.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    fingerprint: String,
    /// Modification times of what is in force.
    stamps: Stamps,
}

/// The store (see the module docs). Share it as `Arc<CertStore>`.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The fingerprint and the stamps of the certificate in force.
    state: Mutex<(String, Stamps)>,
    /// The stamps of files that failed to load once and are given one more check.
    unsettled: Mutex<Option<Stamps>>,
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<Loaded> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    // The stamps first: a file replaced while being read is read again at the next check.
    let stamps = (stamp(cert), stamp(key));
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading the certificate chain {}", cert.display()))?;
    let first = chain
        .first()
        .with_context(|| format!("{}: no PEM certificate", cert.display()))?;
    let fingerprint = relay_cert::fingerprint_sha256(first.as_ref());
    let private = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let signing = ring::default_provider()
        .key_provider
        .load_private_key(private)
        .with_context(|| format!("{}: unusable private key", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().with_context(|| {
        format!(
            "{} and {} do not belong together",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        fingerprint,
        stamps,
    })
}

impl CertStore {
    /// Reads the certificate chain `cert` and the private key `key` (PEM).
    pub fn open(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertStore>> {
        let loaded = load(cert, key)?;
        Ok(Arc::new(CertStore {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(loaded.key),
            state: Mutex::new((loaded.fingerprint, loaded.stamps)),
            unsettled: Mutex::new(None),
        }))
    }

    /// The SHA-256 fingerprint of the certificate in force (as `homerelay cert fingerprint`
    /// prints it).
    pub fn fingerprint(&self) -> String {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Reads the files again if they changed since the certificate in force was read (`force`:
    /// in any case). `Ok(true)`: a new certificate is in force; `Ok(false)`: nothing changed;
    /// an error leaves the certificate in force as it was.
    pub fn reload(&self, force: bool) -> anyhow::Result<bool> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !force && (stamp(&self.cert), stamp(&self.key)) == state.1 {
            return Ok(false);
        }
        let loaded = match load(&self.cert, &self.key) {
            Ok(l) => l,
            Err(e) => {
                let now = (stamp(&self.cert), stamp(&self.key));
                let mut unsettled = self
                    .unsettled
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if !force && *unsettled != Some(now) {
                    // The first failure of these files: a replacement may be half done
                    // (`homerelay cert import` replaces the key, then the certificate, and
                    // the pair does not match in between). Look again at the next check;
                    // only files that stay broken are an error.
                    *unsettled = Some(now);
                    log::debug!(
                        "registration TLS: certificate files changing ({e:#}); checking again"
                    );
                    return Ok(false);
                }
                *unsettled = None;
                // Do not try the same files again until they change once more.
                state.1 = now;
                return Err(e);
            }
        };
        *self
            .unsettled
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        let changed = loaded.fingerprint != state.0;
        *state = (loaded.fingerprint, loaded.stamps);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded.key;
        Ok(changed)
    }

    /// [`Self::reload`], logged; whether a new certificate is in force.
    pub fn reload_and_log(&self, force: bool) -> bool {
        match self.reload(force) {
            Ok(true) => {
                log::info!(
                    "registration TLS: now serving certificate {} (SHA-256 {})",
                    self.cert.display(),
                    self.fingerprint()
                );
                true
            }
            Ok(false) => false,
            Err(e) => {
                log::error!(
                    "registration TLS: kept the certificate in force (SHA-256 {}): {e:#}",
                    self.fingerprint()
                );
                false
            }
        }
    }

    /// Whether the store reads exactly these files.
    pub fn reads(&self, cert: &Path, key: &Path) -> bool {
        self.cert == cert && self.key == key
    }

    /// Checks the files every [`WATCH_INTERVAL`] until `stopping` completes; `on_change` runs
    /// after a new certificate came into force (for other users of the same files).
    pub async fn watch(
        self: Arc<Self>,
        stopping: impl std::future::Future<Output = ()>,
        on_change: impl Fn() + Send + Sync + 'static,
    ) {
        let on_change = Arc::new(on_change);
        let mut stopping = std::pin::pin!(stopping);
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stopping => return,
                _ = tick.tick() => {
                    let store = self.clone();
                    let on_change = on_change.clone();
                    // File reads and key parsing: off the async workers.
                    let _ = tokio::task::spawn_blocking(move || {
                        if store.reload_and_log(false) {
                            on_change();
                        }
                    })
                    .await;
                }
            }
        }
    }

    /// A TLS configuration resolving through this store: TLS 1.2 and 1.3 only, the ring
    /// provider, no client certificates, the ALPN protocols `alpn` (empty: none), and
    /// stateless session tickets so reconnecting devices resume their sessions.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> anyhow::Result<rustls::ServerConfig> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .context("TLS protocol versions")?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Session resumption for any number of devices: stateless tickets sealed with a key of
        // this process (rotated every 6 h; a restart invalidates them, a certificate reload
        // does not) instead of rustls's default in-memory cache of 256 sessions, which with two
        // tickets per handshake forgot a phone's session after 128 other handshakes — beyond
        // ~128 phones nothing resumed (reg-load, BENCHMARKS.md). A resumed TLS 1.3 handshake
        // still runs a fresh ECDHE exchange (rustls offers only psk_dhe_ke).
        config.ticketer = ring::Ticketer::new().context("the TLS session ticket key")?;
        Ok(config)
    }

    /// A TLS acceptor of [`Self::server_config`].
    pub fn acceptor(self: &Arc<Self>, alpn: &[&[u8]]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(
            self.server_config(alpn)?,
        )))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}
