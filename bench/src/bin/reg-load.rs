//! `reg-load`: phones' registrations per second. Starts the real registrar in-process on
//! 127.0.0.1:0 — TLS (4063-style, the product's acceptor with a CA and server certificate made
//! by `relay-cert` in-process) and plain TCP (4062-style) — over an in-memory device registry
//! of strong passwords stored as SCRAM verifiers at the product's iteration count, then drives
//! it with concurrent clients that each loop register → unregister over a **new** TCP (and TLS)
//! connection every time, and reports registrations per second (median of several rounds) and
//! client-side latency percentiles per mode, as text and JSON.
//!
//! The phones behave as real ones do: each derives its SCRAM keys (PBKDF2) once, in a warm-up
//! registration before the rounds, and proves its password from its key cache afterwards
//! (`register_client::KeyCache`); the relay never runs PBKDF2 per login. Every failed
//! registration is counted and makes the process exit nonzero: that is correctness, whatever
//! the speed.
//!
//! Server and clients share this process and its cores but run on separate tokio runtimes
//! (threads `reg-server`, `reg-client`), so the CPU each side used is reported per thread group
//! (scheduler nanoseconds from `/proc/self/task/*/schedstat`).
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bench::cpu::{self, CpuSample};
use bench::histogram::{Histogram, Percentiles};
use clap::{Parser, ValueEnum};
use control::devices::{NewDevice, Registry, RegistryPolicy};
use control::metrics::Metrics;
use control::register_client::{Credentials, KeyCache, RegisterError, register_cached};
use control::registrar::{self, Registrar};
use rand::Rng as _;
use relay_core::device::DeviceType;
use relay_core::device::lockout::LockoutPolicy;
use relay_core::device::networks::Networks;
use relay_core::device::scram::DEFAULT_ITERATIONS;
use relay_core::register::ServerConfig;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// Authenticated phone registrations per second (register → unregister, a new connection each
/// time) against an in-process homerelay registrar on loopback, over TLS and plain TCP.
///
/// Setup (not measured): the relay's CA and server certificate are made in-process, N devices
/// are created with random strong passwords (SCRAM verifiers at --iterations, PBKDF2 on all
/// cores), and every phone registers once so that its SCRAM key cache is warm. Then, for each
/// round and each mode, C clients loop for --duration seconds (after --warmup); only
/// registrations started and registered inside the window count. Exits nonzero if any
/// registration or unregistration failed.
#[derive(Debug, Parser)]
#[command(name = "reg-load", version)]
struct Cli {
    /// Devices in the registry; client i registers devices i, i+C, i+2C... in turn, so no two
    /// clients use one device at the same time (needs --devices ≥ --clients).
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Concurrent clients (phones registering at the same time).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Measured seconds per round and mode.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before each measurement (not counted; TLS session tickets of the
    /// `tls-resumed` mode are collected here).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Rounds; each runs every mode once, in the order given. Every figure reported per mode
    /// is the median over the rounds (rates also with their lowest and highest round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Modes to compare. tls: TLS 4063 with a full handshake every time (the phones keep no
    /// TLS session); tls-resumed: TLS 4063, each phone resuming its previous TLS session with
    /// the relay's session ticket; tcp: plain TCP 4062.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "tls,tls-resumed,tcp"
    )]
    modes: Vec<Mode>,
    /// PBKDF2 iterations of the stored verifiers (the product's default; lower only to make
    /// the setup quick — the rounds do not depend on it, the phones' keys are cached).
    #[arg(long, default_value_t = DEFAULT_ITERATIONS)]
    iterations: u32,
    /// Where the relay sees the phones come from. external: loopback is not an internal
    /// network, so every registration runs the SBC's internet checks (internet flag, password
    /// strength, minimum firmware), as for a phone at home; internal: loopback is internal.
    #[arg(long, value_enum, default_value = "external")]
    origin: Origin,
    /// Key and signature of the relay's certificate and its CA; rsa-sha256 (2048 bits) is
    /// `homerelay cert`'s default.
    #[arg(long, value_enum, default_value = "rsa-sha256")]
    key: Key,
    /// RSA key length of the certificates (2048, 3072 or 4096; ignored for ecdsa-p256).
    #[arg(long, default_value_t = 2048)]
    rsa_bits: u32,
    /// Worker threads of the registrar's runtime (default: one per CPU, as `homerelay run`).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Worker threads of the clients' runtime: one keeps the load generator to at most one
    /// core's worth of CPU, so it does not starve the server it measures.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Do not record metrics in the registrar (the daemon records them by default).
    #[arg(long)]
    no_metrics: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Tls,
    TlsResumed,
    Tcp,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Tls => "tls",
            Mode::TlsResumed => "tls-resumed",
            Mode::Tcp => "tcp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Origin {
    External,
    Internal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Key {
    RsaSha256,
    EcdsaP256,
}

/// One device: what the phone registers with, its SCRAM key cache and its TLS client
/// configuration (its own TLS session store in `tls-resumed`).
struct Phone {
    credentials: Credentials,
    keys: KeyCache,
    resuming: Arc<rustls::ClientConfig>,
}

/// Random strong passwords: 20 characters of four classes, drawn until the registry's password
/// policy accepts one (no runs, repeats, number or MAC in it).
fn strong_password(policy: &RegistryPolicy, number: &str, mac: [u8; 6]) -> String {
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789-_.+!";
    let mut rng = rand::rng();
    loop {
        let p: String = (0..20)
            .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
            .collect();
        let mac = relay_core::device::MacAddress(mac);
        if policy.passwords.check(&p, number, Some(mac)).is_ok() {
            return p;
        }
    }
}

fn mac_of(i: usize) -> [u8; 6] {
    let b = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
    [0x00, 0x1a, 0xe8, b[1], b[2], b[3]]
}

/// Creates `n` devices (PBKDF2 for each verifier, spread over every core); their credentials.
fn create_devices(registry: &Registry, n: usize) -> anyhow::Result<Vec<Credentials>> {
    let specs: Vec<(usize, String, [u8; 6], String)> = (0..n)
        .map(|i| {
            let number = format!("{}", 40_000 + i);
            let mac = mac_of(i);
            let password = strong_password(registry.policy(), &number, mac);
            (i, number, mac, password)
        })
        .collect();
    let threads = cpu::online_cores().max(1);
    let chunk = specs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = specs
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    for (_, number, mac, password) in part {
                        registry
                            .create(NewDevice {
                                number: number.clone(),
                                device_type: Some(DeviceType::OpenStageHfa),
                                mac: Some(relay_core::device::MacAddress(*mac).to_string()),
                                authentication: true,
                                internet_registration: true,
                                password: Some(password.clone()),
                                ..NewDevice::default()
                            })
                            .with_context(|| format!("creating device {number}"))?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a device-creating thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    Ok(specs
        .into_iter()
        .map(|(i, number, mac, password)| Credentials {
            number,
            password,
            mac,
            device_type: "openstage_hfa".into(),
            firmware: "V3 R0.40.4".into(),
            media: SocketAddr::from((
                [192, 168, 178, u8::try_from(2 + i % 250).unwrap_or(2)],
                5004,
            )),
            keepalive_s: 30,
        })
        .collect())
}

/// The relay's TLS: a CA and a server certificate for 127.0.0.1 made with `relay-cert`,
/// written as PEM and loaded by the product's acceptor; the phones trust the CA.
struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn make_tls(cli: &Cli) -> anyhow::Result<Tls> {
    use relay_cert::{
        CaRequest, KeyPolicy, MemorySerialRegistry, San, ServerRequest, SignatureAlgorithm,
        Subject, Validity,
    };
    let signature = match cli.key {
        Key::RsaSha256 => SignatureAlgorithm::RsaSha256,
        Key::EcdsaP256 => SignatureAlgorithm::EcdsaP256Sha256,
    };
    let now = time::UtcDateTime::now();
    let validity = Validity {
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(30),
    };
    let subject = |cn: &str| Subject {
        country: "DE".into(),
        organisation: "homerelay".into(),
        unit: "Voice".into(),
        common_name: cn.into(),
    };
    let policy = KeyPolicy::default();
    let mut serials = MemorySerialRegistry::new();
    let ca = relay_cert::create_ca(
        &CaRequest {
            name: "reg-load-root".into(),
            serial: relay_cert::random_serial()?,
            signature,
            rsa_bits: cli.rsa_bits,
            validity,
            subject: subject("reg-load root"),
            san: Vec::new(),
        },
        &policy,
        &mut serials,
    )?;
    let server = relay_cert::create_server_cert(
        &ca,
        &ServerRequest {
            serial: relay_cert::random_serial()?,
            signature,
            rsa_bits: cli.rsa_bits,
            validity,
            subject: subject("relay"),
            san: vec![San::Ip(Ipv4Addr::LOCALHOST.into())],
        },
        &policy,
        &mut serials,
    )?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert, relay_cert::pem_chain(&server, &ca))?;
    std::fs::write(&key, relay_cert::key_pem(&server))?;
    Ok(Tls {
        acceptor: registrar::tls_acceptor(&cert, &key)?,
        ca_der: ca.cert_der().to_vec(),
        _dir: dir,
    })
}

/// A phone's TLS client configuration: trusts the CA; with its own session store when
/// `resume`, with no resumption otherwise.
fn client_config(ca_der: &[u8], resume: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(4)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(config))
}

#[derive(Clone, Debug, Serialize)]
struct RoundResult {
    round: usize,
    mode: Mode,
    registrations: u64,
    registrations_per_s: f64,
    /// Connect (+ TLS handshake) + Register → Registered, at the client.
    register: Percentiles,
    /// Connect (+ TLS handshake) alone.
    connect: Percentiles,
    /// Unregister → Unregistered.
    unregister: Percentiles,
    /// TLS handshakes that resumed a session, of those measured.
    resumed_fraction: f64,
    /// Failures by kind, warm-up included (the run is invalid unless empty).
    errors: BTreeMap<String, u64>,
    /// CPU over the measured window, in cores (1.0 = one core busy), by thread group.
    cpu_cores: BTreeMap<String, f64>,
    /// Registrar runtime CPU per registration (with its unregistration), µs.
    server_cpu_us_per_registration: f64,
    /// Client runtime CPU per registration, µs.
    client_cpu_us_per_registration: f64,
    /// The whole machine (wall − idle − iowait), in cores.
    machine_busy_cores: f64,
}

#[derive(Default)]
struct ClientResult {
    registrations: u64,
    resumed: u64,
    register: Histogram,
    connect: Histogram,
    unregister: Histogram,
    errors: BTreeMap<String, u64>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn error_kind(e: &RegisterError) -> String {
    match e {
        RegisterError::Refused(r) => format!("refused {}", r.name()),
        RegisterError::Closed(c) => format!("closed: {c}"),
        RegisterError::Invalid(_) => "invalid credentials".into(),
        RegisterError::Scram(_) => "scram".into(),
        RegisterError::Io(e) => format!("i/o {:?}", e.kind()),
    }
}

/// One register → unregister over `stream`: when the registration and the unregistration
/// finished, or the failure's kind.
async fn cycle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    phone: &Phone,
) -> Result<(Instant, Instant), String> {
    let registered = tokio::time::timeout(
        Duration::from_secs(20),
        register_cached(stream, &phone.credentials, &phone.keys),
    )
    .await
    .map_err(|_| "register: no answer in 20 s".to_owned())?
    .map_err(|e| format!("register: {}", error_kind(&e)))?;
    let t1 = Instant::now();
    if !registered.used_cached_keys() {
        return Err("register: the phone's key cache was cold (PBKDF2 in the client)".into());
    }
    tokio::time::timeout(Duration::from_secs(20), registered.unregister())
        .await
        .map_err(|_| "unregister: no answer in 20 s".to_owned())?
        .map_err(|e| format!("unregister: {}", error_kind(&e)))?;
    Ok((t1, Instant::now()))
}

/// One client: register → unregister its devices in turn until `stop`, a new connection each
/// time; only cycles started at or after `from` and registered by `until` count.
#[allow(
    clippy::too_many_arguments,
    reason = "one client's whole setting, passed once"
)]
async fn client(
    phones: Arc<Vec<Phone>>,
    id: usize,
    clients: usize,
    mode: Mode,
    addr: SocketAddr,
    no_resume: Arc<rustls::ClientConfig>,
    from: Instant,
    until: Instant,
    stop: Arc<AtomicBool>,
) -> ClientResult {
    let mut r = ClientResult::default();
    let mine: Vec<usize> = (id..phones.len()).step_by(clients.max(1)).collect();
    let server_name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) && !mine.is_empty() {
        let phone = &phones[mine[n % mine.len()]];
        n += 1;
        let t0 = Instant::now();
        let tcp = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                *r.errors
                    .entry(format!("connect: {:?}", e.kind()))
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let outcome = match mode {
            Mode::Tcp => {
                let tc = Instant::now();
                cycle(tcp, phone).await.map(|t| (tc, t, false))
            }
            Mode::Tls | Mode::TlsResumed => {
                let config = if mode == Mode::TlsResumed {
                    phone.resuming.clone()
                } else {
                    no_resume.clone()
                };
                let connector = tokio_rustls::TlsConnector::from(config);
                match tokio::time::timeout(
                    Duration::from_secs(20),
                    connector.connect(server_name.clone(), tcp),
                )
                .await
                {
                    Ok(Ok(tls)) => {
                        let tc = Instant::now();
                        let resumed = tls.get_ref().1.handshake_kind()
                            == Some(rustls::HandshakeKind::Resumed);
                        cycle(tls, phone).await.map(|t| (tc, t, resumed))
                    }
                    Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                    Err(_) => Err("TLS handshake: no answer in 20 s".to_owned()),
                }
            }
        };
        match outcome {
            Ok((tc, (t1, t2), resumed)) => {
                if t0 >= from && t1 <= until {
                    r.connect.record(ns(tc - t0));
                    r.register.record(ns(t1 - t0));
                    r.unregister.record(ns(t2 - t1));
                    r.registrations += 1;
                    r.resumed += u64::from(resumed);
                }
            }
            Err(kind) => *r.errors.entry(kind).or_default() += 1,
        }
    }
    r
}

/// CPU nanoseconds of this process's threads, by group (thread name).
fn cpu_by_group() -> BTreeMap<String, u64> {
    let mut groups = BTreeMap::new();
    for (tid, ns) in cpu::all_threads_cpu_ns() {
        let name =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
        let name = name.trim();
        let group = if name.starts_with("reg-server") {
            "registrar"
        } else if name.starts_with("reg-client") {
            "clients"
        } else {
            "other"
        };
        *groups.entry(group.to_owned()).or_default() += ns;
    }
    groups
}

struct Bench {
    _server: tokio::runtime::Runtime,
    clients: tokio::runtime::Runtime,
    registry: Arc<Registry>,
    phones: Arc<Vec<Phone>>,
    tls_addr: SocketAddr,
    tcp_addr: SocketAddr,
    no_resume: Arc<rustls::ClientConfig>,
    _stop: tokio::sync::watch::Sender<bool>,
    _tls: Tls,
}

fn setup(cli: &Cli) -> anyhow::Result<Bench> {
    anyhow::ensure!(
        cli.devices >= cli.clients && cli.clients > 0,
        "--devices ({}) must be at least --clients ({}), which must be at least 1",
        cli.devices,
        cli.clients
    );
    let t = Instant::now();
    let tls = make_tls(cli).context("the relay's certificate")?;
    println!(
        "setup: CA and server certificate ({:?}) in {:.1} s",
        cli.key,
        t.elapsed().as_secs_f64()
    );
    let networks = match cli.origin {
        Origin::External => Networks::parse(std::iter::empty::<&str>())?,
        Origin::Internal => Networks::parse(["127.0.0.0/8"])?,
    };
    let registry = Arc::new(Registry::in_memory(RegistryPolicy {
        networks,
        iterations: cli.iterations,
        ..RegistryPolicy::default()
    }));
    let t = Instant::now();
    let credentials = create_devices(&registry, cli.devices)?;
    println!(
        "setup: {} devices with {} PBKDF2 iterations in {:.1} s",
        cli.devices,
        cli.iterations,
        t.elapsed().as_secs_f64()
    );
    let server_threads = cli.server_threads.unwrap_or_else(cpu::online_cores).max(1);
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads)
        .thread_name("reg-server")
        .enable_all()
        .build()?;
    let metrics = if cli.no_metrics {
        Metrics::disabled()
    } else {
        Metrics::new()
    };
    let registrar = Arc::new(
        Registrar::new(
            registry.clone(),
            ServerConfig::default(),
            LockoutPolicy::default(),
        )
        .with_metrics(metrics),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (tls_addr, tcp_addr) = server.block_on(async {
        let mut addrs = Vec::new();
        for acceptor in [Some(tls.acceptor.clone()), None] {
            let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            addrs.push(listener.local_addr()?);
            let mut stopped = stopped.clone();
            tokio::spawn(registrar::serve(
                listener,
                acceptor,
                registrar.clone(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            ));
        }
        anyhow::Ok((addrs[0], addrs[1]))
    })?;
    let phones = credentials
        .into_iter()
        .map(|credentials| {
            Ok(Phone {
                credentials,
                keys: KeyCache::default(),
                resuming: client_config(&tls.ca_der, true)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let phones = Arc::new(phones);
    // Each phone registers once over TCP and derives its keys (PBKDF2), as a phone does once;
    // on a runtime of its own with a thread per core.
    let t = Instant::now();
    let warm = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpu::online_cores().max(1))
        .thread_name("reg-warm")
        .enable_all()
        .build()?;
    let failures = warm.block_on(async {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..cpu::online_cores().max(1) * 2)
            .map(|_| {
                let (phones, next) = (phones.clone(), next.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(phone) = phones.get(i) else {
                            return failures;
                        };
                        let result = async {
                            let tcp = TcpStream::connect(tcp_addr).await?;
                            let r = register_cached(tcp, &phone.credentials, &phone.keys).await?;
                            r.unregister().await
                        }
                        .await;
                        if let Err(e) = result {
                            failures.push(format!("{}: {e}", phone.credentials.number));
                        }
                    }
                })
            })
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await?);
        }
        anyhow::Ok(failures)
    })?;
    drop(warm);
    anyhow::ensure!(
        failures.is_empty(),
        "warm-up registrations failed: {failures:?}"
    );
    anyhow::ensure!(
        phones.iter().all(|p| p.keys.is_warm_for(&p.credentials)),
        "a phone's key cache is still cold after its warm-up registration"
    );
    println!(
        "setup: {} warm-up registrations (each phone derives its keys once) in {:.1} s",
        phones.len(),
        t.elapsed().as_secs_f64()
    );
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_threads.max(1))
        .thread_name("reg-client")
        .enable_all()
        .build()?;
    Ok(Bench {
        _server: server,
        clients,
        registry,
        phones,
        tls_addr,
        tcp_addr,
        no_resume: client_config(&tls.ca_der, false)?,
        _stop: stop,
        _tls: tls,
    })
}

fn one_round(cli: &Cli, b: &Bench, round: usize, mode: Mode) -> anyhow::Result<RoundResult> {
    let addr = if mode == Mode::Tcp {
        b.tcp_addr
    } else {
        b.tls_addr
    };
    let mut result = b.clients.block_on(async {
        let start = Instant::now();
        let from = start + Duration::from_secs_f64(cli.warmup);
        let until = from + Duration::from_secs_f64(cli.duration);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..cli.clients)
            .map(|i| {
                tokio::spawn(client(
                    b.phones.clone(),
                    i,
                    cli.clients,
                    mode,
                    addr,
                    b.no_resume.clone(),
                    from,
                    until,
                    stop.clone(),
                ))
            })
            .collect();
        tokio::time::sleep_until(from.into()).await;
        let (cpu0, busy0) = (cpu_by_group(), CpuSample::read()?);
        tokio::time::sleep_until(until.into()).await;
        let (cpu1, busy1) = (cpu_by_group(), CpuSample::read()?);
        stop.store(true, Ordering::Relaxed);
        let mut total = ClientResult::default();
        for t in tasks {
            let r = t.await?;
            total.registrations += r.registrations;
            total.resumed += r.resumed;
            total.register.merge(&r.register);
            total.connect.merge(&r.connect);
            total.unregister.merge(&r.unregister);
            for (k, v) in r.errors {
                *total.errors.entry(k).or_default() += v;
            }
        }
        let window = busy0.busy_until(&busy1);
        let cpu_cores: BTreeMap<String, f64> = cpu1
            .iter()
            .map(|(g, &ns)| {
                let used = ns.saturating_sub(cpu0.get(g).copied().unwrap_or(0));
                (g.clone(), used as f64 / 1e9 / window.window_s)
            })
            .collect();
        let rate = total.registrations as f64 / cli.duration;
        let per = |group: &str| {
            if rate > 0.0 {
                cpu_cores.get(group).copied().unwrap_or(0.0) * 1e6 / rate
            } else {
                0.0
            }
        };
        anyhow::Ok(RoundResult {
            round,
            mode,
            registrations: total.registrations,
            registrations_per_s: rate,
            register: total.register.percentiles_us(),
            connect: total.connect.percentiles_us(),
            unregister: total.unregister.percentiles_us(),
            resumed_fraction: if total.registrations > 0 {
                total.resumed as f64 / total.registrations as f64
            } else {
                0.0
            },
            errors: total.errors,
            server_cpu_us_per_registration: per("registrar"),
            client_cpu_us_per_registration: per("clients"),
            cpu_cores,
            machine_busy_cores: window.total_cores,
        })
    })?;
    // Every registration ends with its connection: none may be left once the clients are done.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = b.registry.registered_by_origin();
    while left != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        left = b.registry.registered_by_origin();
    }
    if left != (0, 0) {
        *result
            .errors
            .entry("registrations left after the round".into())
            .or_default() += u64::try_from(left.0 + left.1).unwrap_or(u64::MAX);
    }
    Ok(result)
}

#[derive(Debug, Serialize)]
struct ModeSummary {
    mode: Mode,
    /// Median, lowest and highest registrations/s over the rounds.
    registrations_per_s_median: f64,
    registrations_per_s_min: f64,
    registrations_per_s_max: f64,
    /// Each percentile's median over the rounds, µs.
    register_p50_us: f64,
    register_p90_us: f64,
    register_p99_us: f64,
    connect_p99_us: f64,
    server_cpu_us_per_registration_median: f64,
    client_cpu_us_per_registration_median: f64,
    resumed_fraction_median: f64,
    errors: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(mode: Mode, rounds: &[RoundResult]) -> ModeSummary {
    let of = |f: &dyn Fn(&RoundResult) -> f64| {
        median(
            rounds
                .iter()
                .filter(|r| r.mode == mode)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let rates: Vec<f64> = rounds
        .iter()
        .filter(|r| r.mode == mode)
        .map(|r| r.registrations_per_s)
        .collect();
    ModeSummary {
        mode,
        registrations_per_s_median: median(rates.clone()),
        registrations_per_s_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        registrations_per_s_max: rates.iter().copied().fold(0.0, f64::max),
        register_p50_us: of(&|r| r.register.p50_us),
        register_p90_us: of(&|r| r.register.p90_us),
        register_p99_us: of(&|r| r.register.p99_us),
        connect_p99_us: of(&|r| r.connect.p99_us),
        server_cpu_us_per_registration_median: of(&|r| r.server_cpu_us_per_registration),
        client_cpu_us_per_registration_median: of(&|r| r.client_cpu_us_per_registration),
        resumed_fraction_median: of(&|r| r.resumed_fraction),
        errors: rounds
            .iter()
            .filter(|r| r.mode == mode)
            .flat_map(|r| r.errors.values())
            .sum(),
    }
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine: Machine,
    settings: Settings,
    summary: Vec<ModeSummary>,
    /// Median registrations/s of each mode divided by plain TCP's.
    ratio_to_tcp: BTreeMap<String, f64>,
    rounds: Vec<RoundResult>,
}

#[derive(Debug, Serialize)]
struct Machine {
    kernel: String,
    cpu: String,
    cores: usize,
    load_average_before: String,
    load_average_after: String,
}

#[derive(Debug, Serialize)]
struct Settings {
    devices: usize,
    clients: usize,
    duration_s: f64,
    warmup_s: f64,
    rounds: usize,
    iterations: u32,
    origin: Origin,
    key: Key,
    rsa_bits: u32,
    server_threads: usize,
    client_threads: usize,
    metrics: bool,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn print_round(r: &RoundResult) {
    println!(
        "round {} {:<11} {:>6.0} reg/s; register p50/p90/p99 {:.0}/{:.0}/{:.0} µs (connect p99 {:.0} µs); unregister p99 {:.0} µs; resumed {:.0} %; CPU µs/reg registrar {:.0}, clients {:.0}; machine busy {:.2} cores; errors {:?}",
        r.round,
        r.mode.name(),
        r.registrations_per_s,
        r.register.p50_us,
        r.register.p90_us,
        r.register.p99_us,
        r.connect.p99_us,
        r.unregister.p99_us,
        r.resumed_fraction * 100.0,
        r.server_cpu_us_per_registration,
        r.client_cpu_us_per_registration,
        r.machine_busy_cores,
        r.errors
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    anyhow::ensure!(!cli.modes.is_empty(), "--modes: at least one mode");
    let load_before = loadavg();
    let bench = setup(&cli)?;
    let mut rounds = Vec::new();
    for round in 1..=cli.rounds.max(1) {
        for &mode in &cli.modes {
            let r = one_round(&cli, &bench, round, mode)?;
            print_round(&r);
            rounds.push(r);
        }
    }
    let summary: Vec<ModeSummary> = cli.modes.iter().map(|&m| summarize(m, &rounds)).collect();
    let tcp = summary
        .iter()
        .find(|s| s.mode == Mode::Tcp)
        .map(|s| s.registrations_per_s_median);
    let ratio_to_tcp: BTreeMap<String, f64> = match tcp {
        Some(tcp) if tcp > 0.0 => summary
            .iter()
            .map(|s| (s.mode.name().to_owned(), s.registrations_per_s_median / tcp))
            .collect(),
        _ => BTreeMap::new(),
    };
    for s in &summary {
        println!(
            "{:<11} median {:.0} reg/s (rounds {:.0}–{:.0}); register p50/p90/p99 {:.0}/{:.0}/{:.0} µs; registrar CPU {:.0} µs/reg; resumed {:.0} %; errors {}{}",
            s.mode.name(),
            s.registrations_per_s_median,
            s.registrations_per_s_min,
            s.registrations_per_s_max,
            s.register_p50_us,
            s.register_p90_us,
            s.register_p99_us,
            s.server_cpu_us_per_registration_median,
            s.resumed_fraction_median * 100.0,
            s.errors,
            ratio_to_tcp
                .get(s.mode.name())
                .map(|r| format!("; {r:.2} × tcp"))
                .unwrap_or_default(),
        );
    }
    let errors: u64 = summary.iter().map(|s| s.errors).sum();
    drop(bench);
    let report = Report {
        command,
        machine: Machine {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            cores: cpu::online_cores(),
            load_average_before: load_before,
            load_average_after: loadavg(),
        },
        settings: Settings {
            devices: cli.devices,
            clients: cli.clients,
            duration_s: cli.duration,
            warmup_s: cli.warmup,
            rounds: cli.rounds.max(1),
            iterations: cli.iterations,
            origin: cli.origin,
            key: cli.key,
            rsa_bits: cli.rsa_bits,
            server_threads: cli.server_threads.unwrap_or_else(cpu::online_cores).max(1),
            client_threads: cli.client_threads.max(1),
            metrics: !cli.no_metrics,
        },
        summary,
        ratio_to_tcp,
        rounds,
    };
    println!(
        "load average before / after: {} / {}",
        report.machine.load_average_before, report.machine.load_average_after
    );
    if let Some(out) = &cli.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    anyhow::ensure!(
        errors == 0,
        "{errors} registrations or unregistrations failed (see the rounds above)"
    );
    Ok(())
}
