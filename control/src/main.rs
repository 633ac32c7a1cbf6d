//! `homerelay`: the media relay daemon and its tools.
//!
//! `homerelay run` starts the relay with a built-in default configuration (the 180-channel
//! layout, UDP 30528–30887, user-space path) unless told otherwise; `--xdp-iface` adds the XDP
//! fast path on the named interfaces. It stops cleanly on SIGINT or SIGTERM.
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use relay_user::{
    Relay, RelayOptions,
    xdp::{XdpMode, XdpOptions},
};

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
    /// Run the relay until SIGINT or SIGTERM.
    Run(RunArgs),
}

/// Relay port layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// Small systems: 60 channels on UDP 30274–30529.
    X,
    /// Server model: 180 channels on UDP 30528–30887.
    S,
}

impl Layout {
    fn range(self) -> (u16, u16) {
        match self {
            Layout::X => (30274, 30529),
            Layout::S => (30528, 30887),
        }
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Port layout of the channel pool.
    #[arg(long, env = "HOMERELAY_LAYOUT", value_enum, default_value = "s")]
    layout: Layout,
    /// Custom relay port range FIRST-LAST (overrides --layout), e.g. 20000-29999.
    #[arg(long, env = "HOMERELAY_PORTS", value_parser = parse_range)]
    ports: Option<(u16, u16)>,
    /// Interfaces to run the XDP fast path on (repeat or comma-separate). Without any, the relay
    /// forwards in user space only.
    #[arg(
        long = "xdp-iface",
        env = "HOMERELAY_XDP_IFACES",
        value_delimiter = ','
    )]
    xdp_ifaces: Vec<String>,
    /// XDP attach mode: native (driver), generic (skb) or auto (native, else generic).
    #[arg(long, env = "HOMERELAY_XDP_MODE", default_value = "auto")]
    xdp_mode: XdpMode,
    /// bpffs directory for the pinned maps (channels survive a restart of the daemon).
    #[arg(long, env = "HOMERELAY_PIN_DIR", default_value = relay_user::xdp::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Refuse to start if the XDP fast path cannot be loaded (default: fall back to user space).
    #[arg(long, env = "HOMERELAY_REQUIRE_XDP")]
    require_xdp: bool,
    /// User-space forwarding threads (0 = one per CPU).
    #[arg(long, env = "HOMERELAY_WORKERS", default_value_t = 0)]
    workers: usize,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|e| format!("first port {a:?}: {e}"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|e| format!("last port {b:?}: {e}"))?;
    if a < 1024 || a % 2 != 0 || b <= a {
        return Err(format!(
            "port range {a}-{b}: the first port must be even and at least 1024, and below the last"
        ));
    }
    Ok((a, b))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let (port_min, port_max) = args.ports.unwrap_or_else(|| args.layout.range());
    let xdp = (!args.xdp_ifaces.is_empty()).then(|| XdpOptions {
        interfaces: args.xdp_ifaces.clone(),
        mode: args.xdp_mode,
        pin_dir: Some(args.pin_dir.clone()),
    });
    if args.require_xdp && xdp.is_none() {
        bail!("--require-xdp needs at least one --xdp-iface");
    }
    let relay = Relay::start(RelayOptions {
        port_min,
        port_max,
        workers: args.workers,
        xdp,
        require_xdp: args.require_xdp,
    })?;
    let channels = u32::from(port_max - port_min).div_ceil(2);
    match relay.xdp_unavailable() {
        None => log::info!(
            "relaying on UDP {port_min}-{port_max} ({channels} channels): XDP fast path + user space"
        ),
        Some(why) => log::info!(
            "relaying on UDP {port_min}-{port_max} ({channels} channels): user space only ({why})"
        ),
    }

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    if let Some(sig) = signals.forever().next() {
        log::info!("signal {sig} received, shutting down");
    }
    drop(relay);
    log::info!("stopped");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log)
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn default_run_is_the_180_channel_layout_in_user_space() {
        let cli = Cli::try_parse_from(["homerelay", "run"]).unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.layout.range(), (30528, 30887));
        assert!(args.xdp_ifaces.is_empty());
        assert_eq!(args.xdp_mode, XdpMode::Auto);
    }

    #[test]
    fn port_ranges_are_validated() {
        assert_eq!(parse_range("20000-29999"), Ok((20000, 29999)));
        assert!(parse_range("20001-29999").is_err());
        assert!(parse_range("29999-20000").is_err());
        assert!(parse_range("80-1000").is_err());
        assert!(parse_range("20000").is_err());
        assert!(parse_range("a-b").is_err());
        let err = Cli::try_parse_from(["homerelay", "run", "--xdp-mode", "fast"]).unwrap_err();
        assert!(err.to_string().contains("unknown XDP mode"), "{err}");
    }
}
