//! `homerelay`: the media relay daemon and its command-line client.
//!
//! `homerelay run` starts the relay and its gRPC API with the built-in default configuration
//! (the 180-channel layout, UDP 30528–30887, user-space path, API on 127.0.0.1:4080, metrics on
//! 127.0.0.1:9464) unless a config file (`--config`) or flags say otherwise; flags and
//! `HOMERELAY_*` variables win over the file. `--xdp-iface` adds the XDP fast path. On SIGINT
//! or SIGTERM it stops accepting requests, releases every channel from the data path and
//! detaches XDP. SIGHUP re-reads the API's token file and TLS certificate and key.
//!
//! `homerelay channels ...`, `homerelay pool` and `homerelay public-address` talk to a running
//! daemon over the API.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use control::client::{ChannelsCommand, Connection};
use control::config::{Config, LayoutName, Overrides};
use control::daemon::DaemonBuilder;
use control::metrics::{self, CounterSource, Exporter, Metrics};
use control::server::{self, Credentials, Limits};
use relay_user::xdp::XdpMode;

/// homerelay: an RTP media relay for phones and softphones registering from the Internet.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace; or per module, e.g. relay_user=debug).
    #[arg(long, env = "HOMERELAY_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay until SIGINT or SIGTERM (SIGHUP reloads the API token and TLS files).
    Run(RunArgs),
    /// Channels of a running relay.
    Channels {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: ChannelsCommand,
    },
    /// Remote devices (phones and clients that register through the SBC) of a running relay.
    Devices {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: control::devices_cli::DevicesCommand,
    },
    /// Certificates of the TLS listeners: a CA, server certificates (PKCS#12), import and
    /// fingerprints.
    #[command(subcommand)]
    Cert(control::cert_cli::CertCommand),
    /// The channel pool of a running relay.
    Pool {
        #[command(flatten)]
        connection: Connection,
    },
    /// See the relay work on this machine (as root): a phone behind a NAT calls the office.
    ///
    /// Builds network namespaces (a phone behind a NAT router, the relay, an office phone),
    /// starts the daemon with XDP, allocates channels over gRPC, streams RTP both ways with live
    /// counters, then deletes everything it created.
    Demo(control::demo::DemoArgs),
    /// Check this site: configuration, addresses, port range, fast path interfaces, internet
    /// calls, certificate, remote devices' passwords. One pass / warn / fail line per check,
    /// each problem with its fix; exit code 1 when a check failed.
    Doctor(control::doctor::DoctorArgs),
    /// The port forwarding the company router needs for this configuration: a table, an
    /// `nft -f` file for a Linux router (DNAT, never masquerade) or JSON.
    RouterConfig(control::router_config::RouterConfigArgs),
    /// The NAT type between this host and the Internet (RFC 5780 behaviour discovery).
    ///
    /// Runs the RFC 5780 tests from one local UDP socket against a STUN server that offers
    /// behaviour discovery (a second IP address and port; homerelay's own with [stun]
    /// other_address, or coturn with two listening addresses): one plain Binding request,
    /// two filtering tests (answers from the server's other address and port) and up to two
    /// mapping tests (requests to the other address). Prints the NAT's mapping and filtering
    /// behaviour, the classic type (open internet, full cone, restricted, port-restricted,
    /// symmetric) and whether remote devices work behind it: they do not behind a symmetric
    /// NAT. Filtering tests the NAT blocks wait 2.75 s each.
    ///
    /// Caveat: a firewall that restricts outbound UDP drops some tests, which makes a router
    /// look symmetric or filtering when it is not; allow the forwarded ports outbound too, and
    /// run the test on the relay host itself (--bind the relay's address).
    NatType(control::nat_detect::NatTypeArgs),
    /// The public address of a running relay: where remote devices send their media, and how
    /// the relay learnt it.
    ///
    /// The relay learns the address the company router's NAT gives it with STUN — from the
    /// ITSP's STUN server, else from the configured one — and refreshes it, so a dynamic IP
    /// behind a dynamic-DNS name is followed; or it is configured statically ([public_address]
    /// in the config file). Shows the address, its source, the server that gave it, the NAT's
    /// mapping of the discovery socket, the last refresh and error, and how often it changed.
    /// --watch follows changes as they happen.
    PublicAddress(control::public_address_cli::PublicAddressArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Configuration file (TOML; see deploy/homerelay.toml). Without one: the built-in defaults.
    #[arg(long, env = "HOMERELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Port layout of the channel pool: x (60 channels, UDP 30274–30529) or s (180 channels,
    /// UDP 30528–30887). Default: s.
    #[arg(long, env = "HOMERELAY_LAYOUT", value_enum)]
    layout: Option<LayoutName>,
    /// Custom relay port range FIRST-LAST (overrides --layout), e.g. 20000-29999.
    #[arg(long, env = "HOMERELAY_PORTS")]
    ports: Option<String>,
    /// Interfaces to run the XDP fast path on (repeat or comma-separate). Without any, the relay
    /// forwards in user space only.
    #[arg(
        long = "xdp-iface",
        env = "HOMERELAY_XDP_IFACES",
        value_delimiter = ','
    )]
    xdp_ifaces: Vec<String>,
    /// XDP attach mode: native (driver), generic (skb) or auto (native, else generic).
    #[arg(long, env = "HOMERELAY_XDP_MODE")]
    xdp_mode: Option<XdpMode>,
    /// bpffs directory for the pinned maps (default /sys/fs/bpf/homerelay).
    #[arg(long, env = "HOMERELAY_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// State database (SQLite) of the live channels, so a restart keeps the calls in progress
    /// (default /var/lib/homerelay/homerelay.db). One daemon per file.
    #[arg(long, env = "HOMERELAY_STORE")]
    store: Option<PathBuf>,
    /// Refuse to start if the XDP fast path cannot be loaded (default: fall back to user space).
    #[arg(long, env = "HOMERELAY_REQUIRE_XDP")]
    require_xdp: bool,
    /// User-space forwarding threads (0 = one per CPU).
    #[arg(long, env = "HOMERELAY_WORKERS")]
    workers: Option<usize>,
    /// Address of the gRPC API (default 127.0.0.1:4080). Any non-loopback address needs a
    /// bearer token or mutual TLS.
    #[arg(long, env = "HOMERELAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// File holding the bearer token API clients must send.
    #[arg(long, env = "HOMERELAY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Address of the Prometheus endpoint, http://ADDR/metrics (default 127.0.0.1:9464).
    #[arg(long, env = "HOMERELAY_METRICS_LISTEN", conflicts_with = "no_metrics")]
    metrics_listen: Option<SocketAddr>,
    /// Do not serve Prometheus metrics.
    #[arg(long, env = "HOMERELAY_NO_METRICS")]
    no_metrics: bool,
    /// Check the configuration, print it and exit.
    #[arg(long)]
    check_config: bool,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            layout: self.layout,
            ports: self.ports.clone(),
            workers: self.workers,
            xdp_interfaces: (!self.xdp_ifaces.is_empty()).then(|| self.xdp_ifaces.clone()),
            xdp_mode: self.xdp_mode,
            pin_dir: self.pin_dir.clone(),
            store: self.store.clone(),
            require_xdp: self.require_xdp,
            listen: self.listen,
            token_file: self.token_file.clone(),
            metrics_listen: self.metrics_listen,
            no_metrics: self.no_metrics,
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).context("invalid configuration")?,
        None => Config::default(),
    };
    config
        .apply(args.overrides())
        .context("invalid configuration")?;
    let credentials = Credentials::load(&config.api).context("invalid configuration")?;
    if args.check_config {
        println!("configuration is valid: {config:#?}");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(daemon(config, credentials))
}

async fn daemon(config: Config, credentials: Credentials) -> anyhow::Result<()> {
    // The API port first: a port conflict is reported before the data path is touched.
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("binding the API on {} (api.listen)", config.api.listen))?;
    let metrics_listener = match config.metrics.enabled {
        false => None,
        true => Some(
            tokio::net::TcpListener::bind(config.metrics.listen)
                .await
                .with_context(|| {
                    format!(
                        "binding the metrics endpoint on {} (metrics.listen)",
                        config.metrics.listen
                    )
                })?,
        ),
    };

    let (layout, layout_name) = config.layout()?;
    let daemon = DaemonBuilder::new(config.clone())
        .metrics(match metrics_listener {
            Some(_) => Metrics::new(),
            None => Metrics::disabled(),
        })
        .build()?;
    let service = daemon.service;
    let relay = daemon
        .relay
        .context("the daemon runs on homerelay's relay")?;
    let (first, last, capacity) = (layout.first_port(), layout.last_port(), layout.capacity());
    match relay.xdp_unavailable() {
        None => {
            log::info!(
                "relaying on UDP {first}-{last} ({capacity} channels, layout {}): XDP fast path + user space",
                layout_name.name()
            );
            if config.relay_addresses().iter().any(Option::is_none) {
                log::warn!(
                    "relay.internet_address or relay.lan_address is not set: channels without a \
                     relay address stay in user space (the fast path needs a source address)"
                );
            }
        }
        Some(why) => log::info!(
            "relaying on UDP {first}-{last} ({capacity} channels, layout {}): user space only ({why})",
            layout_name.name()
        ),
    }
    let metrics_server = metrics_listener.map(|listener| {
        let source: Arc<dyn CounterSource> = relay.clone();
        let exporter = Exporter::new(
            service.clone(),
            Some(Arc::downgrade(&source)),
            !config.xdp.interfaces.is_empty(),
        );
        tokio::spawn(metrics::serve(listener, exporter, service.stopping()))
    });
    // The STUN server (UDP and TCP 3478, docs/stun.md), when configured.
    if config.stun.listen.is_some() {
        let stun = control::stun_server::StunServer::bind(&config.stun)
            .await?
            .with_metrics(service.metrics());
        log::info!(
            "STUN on UDP {:?} and TCP {:?}{}",
            stun.udp_addrs(),
            stun.tcp_addrs(),
            if config.stun.other_address.is_some() {
                " (RFC 5780 behaviour discovery)"
            } else {
                ""
            }
        );
        tokio::spawn(stun.serve(service.stopping()));
    }
    // The public address (docs/public-address.md): discovered with STUN when a server is
    // configured; otherwise static or relay.internet_address, which the status already says.
    let public = service.public_address().status();
    match control::public_address::Discovery::new(
        &config,
        service.public_address().clone(),
        service.metrics().clone(),
    ) {
        Some(discovery) => {
            tokio::spawn(discovery.run(service.stopping()));
        }
        None => log::info!(
            "public address {} ({}; no STUN discovery)",
            public
                .address
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            public.source.name()
        ),
    }
    // Phones' registration (TCP 4062 / TLS 4063), when configured.
    let registrar = std::sync::Arc::new(
        control::registrar::Registrar::new(
            service.devices().clone(),
            relay_core::register::ServerConfig::default(),
            config.registration.lockout_policy()?,
        )
        .with_metrics(service.metrics().clone()),
    );
    let r = &config.registration;
    // One certificate store for TLS 4063 and HTTPS 8802 (and the gRPC API when [api.tls]
    // names the same files): a replaced certificate is in force within seconds, no restart.
    let certs = match (&r.tls_cert, &r.tls_key) {
        (Some(cert), Some(key)) if r.tls_listen.is_some() || r.https_listen.is_some() => {
            let store = control::certstore::CertStore::open(cert, key).with_context(
                || "the registration certificate (registration.tls_cert, registration.tls_key)",
            )?;
            log::info!(
                "registration TLS certificate {} (SHA-256 {}); replaced files are picked up \
                 within {} s",
                cert.display(),
                store.fingerprint(),
                control::certstore::WATCH_INTERVAL.as_secs()
            );
            let api_shares = config
                .api
                .tls
                .as_ref()
                .is_some_and(|t| store.reads(&t.cert, &t.key));
            let api_credentials = credentials.clone();
            tokio::spawn(store.clone().watch(service.stopping(), move || {
                if api_shares {
                    api_credentials.reload_and_log();
                }
            }));
            Some(store)
        }
        _ => None,
    };
    for (addr, tls) in [(r.listen, false), (r.tls_listen, true)] {
        let Some(addr) = addr else { continue };
        let acceptor = match (tls, &certs) {
            (true, Some(store)) => Some(store.acceptor(&[])?),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "binding the phones' registration on {addr} (registration.{})",
                if tls { "tls_listen" } else { "listen" }
            )
        })?;
        log::info!(
            "phone registration on {addr} ({})",
            if tls { "TLS 1.2/1.3" } else { "plain TCP" }
        );
        tokio::spawn(control::registrar::serve(
            listener,
            acceptor,
            registrar.clone(),
            service.stopping(),
        ));
    }
    // The apps' JSON API over HTTPS (8802), when configured: the same registrar (registry,
    // lockout shared with 4062/4063, metrics); its registrations end when it stops.
    if let (Some(addr), Some(store)) = (r.https_listen, &certs) {
        let acceptor = store.acceptor(&[b"http/1.1"])?;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding the apps' HTTPS API on {addr} (registration.https_listen)")
        })?;
        log::info!("app registration (HTTPS JSON API, TLS 1.2/1.3) on {addr}");
        let api = std::sync::Arc::new(control::https_api::HttpsApi::new(
            registrar.clone(),
            control::https_api::HttpsConfig::default(),
        ));
        tokio::spawn(control::https_api::serve(
            listener,
            acceptor,
            api,
            service.stopping(),
        ));
    }
    let mut server = tokio::spawn(server::serve_with(
        listener,
        service.clone(),
        credentials.clone(),
        Limits::from_config(&config.api),
        service.stopping(),
    ));

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    // systemd: READY=1 now (API bound, data path up, signals handled), WATCHDOG=1 while alive,
    // STOPPING=1 below.
    let notifier = control::notify::Notifier::ready(&service);
    let early = loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT received, shutting down"); break None }
            _ = sigterm.recv() => { log::info!("SIGTERM received, shutting down"); break None }
            _ = sighup.recv() => {
                log::info!("SIGHUP received");
                credentials.reload_and_log();
                if let Some(store) = &certs {
                    store.reload_and_log(true);
                }
            }
            r = &mut server => break Some(r),
        }
    };
    notifier.stopping();
    // Stops accepting (the server's shutdown future is `service.stopping()`) and ends watch
    // streams. With a state database the channels stay (pinned maps + records) for the next
    // start to take over: a restart keeps the calls. Without one they are released.
    if config.store.enabled {
        service.shutdown_keeping_channels().await;
        log::info!(
            "channels kept for the next start ({}); media pauses until then",
            config.store.path.display()
        );
    } else {
        let released = service.shutdown().await;
        log::info!("released {released} channel(s)");
    }
    let served = match early {
        Some(r) => r,
        None => server.await,
    };
    // The metrics endpoint holds the service (and so the relay): it stops with the service,
    // and is cut off if a scrape keeps it open.
    if let Some(mut task) = metrics_server {
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(2), &mut task).await;
        match stopped {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => log::warn!("metrics endpoint: {e}"),
            Ok(Err(e)) => log::warn!("metrics endpoint task: {e}"),
            Err(_) => {
                task.abort();
                let _ = task.await;
            }
        }
    }
    drop(service);
    // The last reference: dropping it stops user space and detaches XDP.
    match Arc::try_unwrap(relay) {
        Ok(relay) => drop(relay),
        Err(relay) => log::error!(
            "the relay is still referenced at shutdown ({} references); XDP may stay attached",
            Arc::strong_count(&relay)
        ),
    }
    served.context("API server task")?.context("gRPC API")?;
    log::info!("stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Structured logs on stderr; `log` records of the libraries are taken in too.
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .with_context(|| format!("--log {:?}: not a log filter", cli.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .init();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Channels {
            connection,
            command,
        } => client_runtime()?.block_on(control::client::channels(&connection, command)),
        Command::Devices {
            connection,
            command,
        } => client_runtime()?.block_on(control::devices_cli::run(&connection, command)),
        Command::Cert(command) => control::cert_cli::run(command),
        Command::Pool { connection } => {
            client_runtime()?.block_on(control::client::pool(&connection))
        }
        Command::Demo(args) => control::demo::run(args),
        Command::Doctor(args) => {
            let code = client_runtime()?.block_on(control::doctor::run(args))?;
            std::process::exit(code)
        }
        Command::RouterConfig(args) => control::router_config::run(args),
        Command::NatType(args) => client_runtime()?.block_on(control::nat_detect::run(args)),
        Command::PublicAddress(args) => {
            client_runtime()?.block_on(control::public_address_cli::run(args))
        }
    }
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let mut argv = vec!["homerelay", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("valid arguments").command {
            Command::Run(a) => a,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn default_run_is_the_180_channel_layout_in_user_space() {
        let args = run_args(&[]);
        let mut config = Config::default();
        config.apply(args.overrides()).expect("valid");
        let opts = config.relay_options();
        assert_eq!((opts.port_min, opts.port_max), (30528, 30887));
        assert!(opts.xdp.is_none());
        assert_eq!(config.api.listen, control::config::DEFAULT_LISTEN);
    }

    #[test]
    fn existing_flags_keep_working() {
        let args = run_args(&[
            "--layout",
            "x",
            "--xdp-iface",
            "eth0,eth1",
            "--xdp-mode",
            "generic",
        ]);
        let mut config = Config::default();
        config.apply(args.overrides()).expect("valid");
        let opts = config.relay_options();
        assert_eq!((opts.port_min, opts.port_max), (30274, 30529));
        let xdp = opts.xdp.expect("xdp configured");
        assert_eq!(xdp.interfaces, ["eth0", "eth1"]);
        assert_eq!(xdp.mode, XdpMode::Generic);

        let args = run_args(&["--ports", "20000-29999"]);
        let mut config = Config::default();
        config.apply(args.overrides()).expect("valid");
        assert_eq!(config.relay_options().port_min, 20000);

        let args = run_args(&["--ports", "20001-29999"]);
        let e = Config::default().apply(args.overrides()).expect_err("odd");
        assert_eq!(
            e.to_string(),
            "relay.ports: first port 20001 is odd: an rtp port must be even"
        );

        let err = Cli::try_parse_from(["homerelay", "run", "--xdp-mode", "fast"]).unwrap_err();
        assert!(err.to_string().contains("unknown XDP mode"), "{err}");
    }

    #[test]
    fn require_xdp_without_an_interface_is_refused() {
        let args = run_args(&["--require-xdp"]);
        let e = Config::default()
            .apply(args.overrides())
            .expect_err("no interface");
        assert_eq!(e.key, "xdp.require");
    }
}
