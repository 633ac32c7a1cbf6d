//! The command-line client over the gRPC API: `homerelay channels list|show|allocate|release|
//! watch` and `homerelay pool`. Human-readable tables by default, JSON with `--json` (one
//! document; `watch` prints one JSON object per line).
//!
//! Invariant: the client only speaks `relay.v1`; it shares no state with the daemon, so what it
//! shows is exactly what any other API client would see.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow};
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use relay_core::{ChannelState, EventKind, Kind};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::config::DEFAULT_SERVER_URL;
use crate::convert;

/// How to reach the daemon (flags shared by every client command).
#[derive(Clone, Debug, clap::Args)]
pub struct Connection {
    /// URL of the homerelay API (https:// for TLS).
    #[arg(long, env = "HOMERELAY_SERVER", default_value = DEFAULT_SERVER_URL, global = true)]
    pub server: String,
    /// File holding the bearer token, if the daemon requires one. Instead of a file, the token
    /// may be in the environment variable HOMERELAY_TOKEN; there is no flag taking the token
    /// itself, because other users see command lines (ps).
    #[arg(long, env = "HOMERELAY_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Refused: a token on the command line is visible to every user (ps). Kept only to say so.
    #[arg(long = "token", hide = true, global = true, value_name = "TOKEN")]
    pub token_flag: Option<String>,
    /// The bearer token itself, for programs that build a `Connection` (the command line takes
    /// it from `--token-file` or HOMERELAY_TOKEN, see [`Connection::bearer_token`]).
    #[arg(skip)]
    pub token: Option<String>,
    /// CA certificate (PEM) that the daemon's TLS certificate chains to.
    #[arg(long, env = "HOMERELAY_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "HOMERELAY_CLIENT_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "HOMERELAY_CLIENT_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `homerelay channels ...`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum ChannelsCommand {
    /// List channels in use.
    List(ListArgs),
    /// Show one channel.
    Show(TargetArgs),
    /// Allocate a channel for a call leg (repeating the request returns the same channel).
    Allocate(AllocateArgs),
    /// Release a channel and show its final counters.
    Release(TargetArgs),
    /// Print channel events as they happen.
    Watch(WatchArgs),
}

/// `channels list`.
#[derive(Clone, Debug, clap::Args)]
pub struct ListArgs {
    /// Only these kinds (repeat or comma-separate): itsp_call, circuit_call, system_device,
    /// sip_device, mobile_client.
    #[arg(long = "kind", value_delimiter = ',', value_parser = parse_kind)]
    pub kinds: Vec<Kind>,
    /// Only these states (repeat or comma-separate): waiting, latched, fast_path.
    #[arg(long = "state", value_delimiter = ',', value_parser = parse_state)]
    pub states: Vec<pb::ChannelState>,
    /// Channels fetched per request (every page is fetched).
    #[arg(long, default_value_t = 500)]
    pub page_size: u32,
}

/// A channel, by port or by call leg.
#[derive(Clone, Debug, clap::Args)]
pub struct TargetArgs {
    /// The channel's RTP port.
    #[arg(required_unless_present = "call_id", conflicts_with = "call_id")]
    pub port: Option<u16>,
    /// The call id the channel was allocated for (instead of the port).
    #[arg(long)]
    pub call_id: Option<String>,
    /// The leg tag, with --call-id.
    #[arg(long, default_value = "", requires = "call_id")]
    pub leg_tag: String,
}

/// `channels allocate`.
#[derive(Clone, Debug, clap::Args)]
pub struct AllocateArgs {
    /// SIP Call-ID of the call.
    #[arg(long)]
    pub call_id: String,
    /// Leg tag (e.g. the SIP tag of the leg).
    #[arg(long, default_value = "")]
    pub leg_tag: String,
    /// What the channel is for: itsp_call, circuit_call, system_device, sip_device,
    /// mobile_client.
    #[arg(long, value_parser = parse_kind)]
    pub kind: Kind,
    /// The leg does not count against the internet-call limit.
    #[arg(long)]
    pub no_internet: bool,
    /// Leg A's peer RTP address IP:PORT (default: learnt from its first packet).
    #[arg(long)]
    pub a_rtp: Option<SocketAddr>,
    /// Leg A's peer RTCP address (default: RTP port + 1).
    #[arg(long, requires = "a_rtp")]
    pub a_rtcp: Option<SocketAddr>,
    /// Accept leg A's media only from --a-rtp/--a-rtcp.
    #[arg(long, requires = "a_rtp")]
    pub a_strict: bool,
    /// Leg B's peer RTP address IP:PORT (default: learnt from its first packet).
    #[arg(long)]
    pub b_rtp: Option<SocketAddr>,
    /// Leg B's peer RTCP address (default: RTP port + 1).
    #[arg(long, requires = "b_rtp")]
    pub b_rtcp: Option<SocketAddr>,
    /// Accept leg B's media only from --b-rtp/--b-rtcp.
    #[arg(long, requires = "b_rtp")]
    pub b_strict: bool,
    /// Media inactivity timeout, e.g. 30s (default: the daemon's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Let any payload latch a source (default: only RTP or RTCP version 2 may). For peers
    /// that send something else before their media, e.g. a DTLS-SRTP handshake.
    #[arg(long)]
    pub latch_any_payload: bool,
    /// The registered remote device (internal number) the channel is for: its registration
    /// decides whether it is an internet call.
    #[arg(long)]
    pub device: Option<String>,
}

/// `channels watch`.
#[derive(Clone, Debug, clap::Args)]
pub struct WatchArgs {
    /// Only events of these kinds of channel (repeat or comma-separate).
    #[arg(long = "kind", value_delimiter = ',', value_parser = parse_kind)]
    pub kinds: Vec<Kind>,
    /// Stop after this many events (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown kind {s:?} (expected one of {})", names.join(", "))
        })
}

fn parse_state(s: &str) -> Result<pb::ChannelState, String> {
    ChannelState::ALL
        .into_iter()
        .find(|state| state.name() == s)
        .map(convert::state_to_pb)
        .ok_or_else(|| {
            let names = ChannelState::ALL.map(ChannelState::name);
            let (last, rest) = names.split_last().unwrap_or((&"", &[]));
            format!(
                "unknown state {s:?} (expected {} or {last})",
                rest.join(", ")
            )
        })
}

/// Adds the bearer token to every request.
#[derive(Clone, Debug)]
pub struct TokenInjector {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for TokenInjector {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// A connected API client.
pub type Client = ChannelServiceClient<InterceptedService<Channel, TokenInjector>>;

/// The innermost cause of an error, for a one-line message.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    if let Some(io) = cur.downcast_ref::<std::io::Error>() {
        if io.kind() == std::io::ErrorKind::ConnectionRefused {
            return "connection refused".to_owned();
        }
    }
    cur.to_string()
}

/// The variable the CLI reads the bearer token from when there is no `--token-file`.
pub const TOKEN_ENV: &str = "HOMERELAY_TOKEN";

impl Connection {
    /// The bearer token to send: `token` if set, else the content of `--token-file`, else
    /// HOMERELAY_TOKEN; `None` without any.
    pub fn bearer_token(&self) -> anyhow::Result<Option<String>> {
        if self.token_flag.is_some() {
            anyhow::bail!(
                "--token is not accepted: other users can read command lines (ps). Put the token \
                 in a file readable only by you and pass --token-file FILE, or set {TOKEN_ENV}"
            );
        }
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--token-file: reading {}", path.display()))?;
            let token = text.trim();
            if token.is_empty() {
                anyhow::bail!("--token-file: {} is empty", path.display());
            }
            return Ok(Some(token.to_owned()));
        }
        match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("{TOKEN_ENV} is not valid UTF-8")
            }
        }
    }
}

/// Connects to the daemon.
pub async fn connect(c: &Connection) -> anyhow::Result<Client> {
    let (channel, token) = connect_channel(c).await?;
    Ok(ChannelServiceClient::with_interceptor(channel, token))
}

/// Connects to the daemon: the transport and the interceptor that adds the bearer token.
pub async fn connect_channel(
    c: &Connection,
) -> anyhow::Result<(tonic::transport::Channel, TokenInjector)> {
    let token = c.bearer_token()?;
    let mut endpoint = Endpoint::from_shared(c.server.clone())
        .with_context(|| format!("{:?} is not a URL like {DEFAULT_SERVER_URL}", c.server))?
        .connect_timeout(Duration::from_secs(5));
    if c.ca_cert.is_some() || c.cert.is_some() || c.server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &c.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&c.cert, &c.key) {
            let cert =
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let key = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow!(
            "cannot reach homerelay at {}: {} — is `homerelay run` running?",
            c.server,
            root_cause(&e)
        )
    })?;
    let header = token
        .as_ref()
        .map(|t| {
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow!("the token must be printable ASCII"))
        })
        .transpose()?;
    Ok((channel, TokenInjector { header }))
}

/// A one-line error for a failed call: the server's message and the status code.
pub fn call_error(s: Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}

/// Runs `homerelay channels ...`.
pub async fn channels(c: &Connection, command: ChannelsCommand) -> anyhow::Result<()> {
    let mut client = connect(c).await?;
    match command {
        ChannelsCommand::List(args) => list(&mut client, c.json, args).await,
        ChannelsCommand::Show(t) => {
            let r = client
                .get(pb::GetRequest {
                    channel: Some(target(&t)),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            print_channel(c.json, r.channel.as_ref(), None);
            Ok(())
        }
        ChannelsCommand::Allocate(a) => {
            let leg = |rtp: Option<SocketAddr>, rtcp: Option<SocketAddr>, strict| {
                Some(pb::LegSpec {
                    rtp_address: rtp.map(|a| a.to_string()).unwrap_or_default(),
                    rtcp_address: rtcp.map(|a| a.to_string()).unwrap_or_default(),
                    strict,
                    relay_address: String::new(),
                })
            };
            let r = client
                .allocate(pb::AllocateRequest {
                    call_leg: Some(pb::CallLeg {
                        call_id: a.call_id,
                        leg_tag: a.leg_tag,
                    }),
                    kind: crate::convert::kind_to_pb(a.kind) as i32,
                    internet: Some(!a.no_internet),
                    leg_a: leg(a.a_rtp, a.a_rtcp, a.a_strict),
                    leg_b: leg(a.b_rtp, a.b_rtcp, a.b_strict),
                    timeout: a.timeout.map(|t| prost_types::Duration {
                        seconds: t.as_secs() as i64,
                        nanos: t.subsec_nanos() as i32,
                    }),
                    latching: None,
                    clock_rate: 0,
                    latch_any_payload: a.latch_any_payload,
                    device: a.device.unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            if c.json {
                let mut v = r.channel.as_ref().map(channel_json).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("created".into(), Value::Bool(r.created));
                }
                println!("{v}");
            } else {
                println!(
                    "{}",
                    if r.created {
                        EventKind::Allocated.name()
                    } else {
                        "already allocated to this call leg"
                    }
                );
                print_channel(false, r.channel.as_ref(), None);
            }
            Ok(())
        }
        ChannelsCommand::Release(t) => {
            let r = client
                .release(pb::ReleaseRequest {
                    channel: Some(target(&t)),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            print_channel(c.json, r.channel.as_ref(), r.released_at.as_ref());
            Ok(())
        }
        ChannelsCommand::Watch(w) => watch(&mut client, c.json, w).await,
    }
}

fn target(t: &TargetArgs) -> pb::ChannelRef {
    use pb::channel_ref::Target;
    let target = match (&t.call_id, t.port) {
        (Some(call_id), _) => Target::CallLeg(pb::CallLeg {
            call_id: call_id.clone(),
            leg_tag: t.leg_tag.clone(),
        }),
        (None, port) => Target::Port(u32::from(port.unwrap_or_default())),
    };
    pb::ChannelRef {
        target: Some(target),
    }
}

async fn list(client: &mut Client, json: bool, args: ListArgs) -> anyhow::Result<()> {
    let mut channels = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list(pb::ListRequest {
                page_size: args.page_size,
                page_token,
                kinds: args
                    .kinds
                    .iter()
                    .map(|&k| crate::convert::kind_to_pb(k) as i32)
                    .collect(),
                states: args.states.iter().map(|&s| s as i32).collect(),
            })
            .await
            .map_err(call_error)?
            .into_inner();
        channels.extend(page.channels);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if json {
        println!(
            "{}",
            Value::Array(channels.iter().map(channel_json).collect())
        );
    } else {
        print!("{}", channel_table(&channels));
    }
    Ok(())
}

async fn watch(client: &mut Client, json: bool, args: WatchArgs) -> anyhow::Result<()> {
    let mut stream = client
        .watch(pb::WatchRequest {
            kinds: args
                .kinds
                .iter()
                .map(|&k| crate::convert::kind_to_pb(k) as i32)
                .collect(),
        })
        .await
        .map_err(call_error)?
        .into_inner();
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        let Some(event) = stream.message().await.map_err(call_error)? else {
            break;
        };
        seen += 1;
        if json {
            println!("{}", event_json(&event));
        } else {
            println!("{}", event_line(&event));
        }
    }
    Ok(())
}

/// Runs `homerelay pool`.
pub async fn pool(c: &Connection) -> anyhow::Result<()> {
    let mut client = connect(c).await?;
    let p = client
        .pool_status(pb::PoolStatusRequest {})
        .await
        .map_err(call_error)?
        .into_inner();
    if c.json {
        println!("{}", pool_json(&p));
    } else {
        print!("{}", pool_text(&p));
    }
    Ok(())
}

/// `CHANNEL_KIND_SIP_DEVICE` → `sip_device`.
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

fn kind_name(k: i32) -> String {
    pb::ChannelKind::try_from(k).map_or_else(
        |_| k.to_string(),
        |k| enum_name(k.as_str_name(), "CHANNEL_KIND_"),
    )
}

fn state_name(s: i32) -> String {
    match pb::ChannelState::try_from(s) {
        Ok(state) => convert::state_of_pb(state).map_or_else(
            || enum_name(state.as_str_name(), "CHANNEL_STATE_"),
            |state| state.name().to_owned(),
        ),
        Err(_) => s.to_string(),
    }
}

pub(crate) fn time_text(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = SystemTime::try_from(*t?).ok()?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

fn duration_secs(d: Option<&prost_types::Duration>) -> f64 {
    d.map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

fn endpoint_json(e: Option<&pb::Endpoint>) -> Value {
    let e = e.cloned().unwrap_or_default();
    json!({ "address": (!e.address.is_empty()).then_some(e.address), "latched": e.latched })
}

fn leg_json(l: Option<&pb::Leg>) -> Value {
    let l = l.cloned().unwrap_or_default();
    json!({
        "relay_address": l.relay_address,
        "public_address": (!l.public_address.is_empty()).then_some(l.public_address),
        "rtp": endpoint_json(l.rtp.as_ref()),
        "rtcp": endpoint_json(l.rtcp.as_ref()),
    })
}

fn direction_json(d: Option<&pb::DirectionStats>) -> Value {
    let d = d.cloned().unwrap_or_default();
    json!({
        "packets": d.packets,
        "bytes": d.bytes,
        "last_seen": time_text(d.last_seen.as_ref()),
        "rtp_packets": d.rtp_packets,
        "lost": d.lost,
        "reordered": d.reordered,
        "jitter": d.jitter,
        "jitter_ms": d.jitter_ms,
    })
}

/// A channel as a JSON object (stable field names, enums as lowercase names).
pub fn channel_json(c: &pb::Channel) -> Value {
    let leg = c.call_leg.clone().unwrap_or_default();
    let stats = c.stats.unwrap_or_default();
    json!({
        "port": c.port,
        "rtcp_port": c.port + 1,
        "id": c.id,
        "call_id": leg.call_id,
        "leg_tag": leg.leg_tag,
        "kind": kind_name(c.kind),
        "internet": c.internet,
        "state": state_name(c.state),
        "leg_a": leg_json(c.leg_a.as_ref()),
        "leg_b": leg_json(c.leg_b.as_ref()),
        "timeout_secs": duration_secs(c.timeout.as_ref()),
        "allocated_at": time_text(c.allocated_at.as_ref()),
        "stats": {
            "from_a": direction_json(stats.from_a.as_ref()),
            "from_b": direction_json(stats.from_b.as_ref()),
        },
    })
}

fn event_type_name(t: i32) -> String {
    match pb::EventType::try_from(t) {
        Ok(ty) => convert::event_kind_of_pb(ty).map_or_else(
            || enum_name(ty.as_str_name(), "EVENT_TYPE_"),
            |kind| kind.name().to_owned(),
        ),
        Err(_) => t.to_string(),
    }
}

fn latch_text(l: &pb::Latch) -> String {
    let leg =
        pb::LegId::try_from(l.leg).map_or("?".into(), |x| enum_name(x.as_str_name(), "LEG_ID_"));
    let comp = pb::Component::try_from(l.component)
        .map_or("?".into(), |x| enum_name(x.as_str_name(), "COMPONENT_"));
    format!("leg {leg} {comp} from {}", l.address)
}

fn event_json(e: &pb::WatchResponse) -> Value {
    json!({
        "type": event_type_name(e.r#type),
        "at": time_text(e.at.as_ref()),
        "channel": e.channel.as_ref().map(channel_json),
        "latch": e.latch.as_ref().map(|l| json!({
            "leg": l.leg,
            "component": l.component,
            "address": l.address,
            "text": latch_text(l),
        })),
    })
}

fn event_line(e: &pb::WatchResponse) -> String {
    let c = e.channel.clone().unwrap_or_default();
    let leg = c.call_leg.clone().unwrap_or_default();
    let mut line = format!(
        "{}  {:<12}  port {}  {}  call {:?} tag {:?}",
        time_text(e.at.as_ref()).unwrap_or_default(),
        event_type_name(e.r#type),
        c.port,
        kind_name(c.kind),
        leg.call_id,
        leg.leg_tag
    );
    if let Some(l) = &e.latch {
        let _ = write!(line, "  {}", latch_text(l));
    }
    line
}

fn peer(l: Option<&pb::Leg>) -> String {
    let rtp = l.and_then(|l| l.rtp.clone()).unwrap_or_default();
    match (rtp.address.is_empty(), rtp.latched) {
        (true, _) => "(learning)".into(),
        (false, true) => rtp.address,
        (false, false) => format!("{}?", rtp.address),
    }
}

/// Formats rows as left-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn channel_table(channels: &[pb::Channel]) -> String {
    let rows: Vec<Vec<String>> = channels
        .iter()
        .map(|c| {
            let leg = c.call_leg.clone().unwrap_or_default();
            let stats = c.stats.unwrap_or_default();
            vec![
                c.port.to_string(),
                kind_name(c.kind),
                state_name(c.state),
                leg.call_id,
                leg.leg_tag,
                peer(c.leg_a.as_ref()),
                peer(c.leg_b.as_ref()),
                stats.from_a.unwrap_or_default().packets.to_string(),
                stats.from_b.unwrap_or_default().packets.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "PORT", "KIND", "STATE", "CALL-ID", "TAG", "LEG A", "LEG B", "PKTS A>B", "PKTS B>A",
        ],
        &rows,
    );
    let _ = writeln!(out, "{} channel(s)", channels.len());
    out
}

fn print_channel(
    json: bool,
    c: Option<&pb::Channel>,
    released_at: Option<&prost_types::Timestamp>,
) {
    let Some(c) = c else { return };
    if json {
        let mut v = channel_json(c);
        if let (Value::Object(m), Some(at)) = (&mut v, released_at) {
            m.insert("released_at".into(), json!(time_text(Some(at))));
        }
        println!("{v}");
        return;
    }
    let leg = c.call_leg.clone().unwrap_or_default();
    let stats = c.stats.unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "channel      port {} (RTCP {}), id {}",
        c.port,
        c.port + 1,
        c.id
    );
    let _ = writeln!(out, "call         {:?} tag {:?}", leg.call_id, leg.leg_tag);
    let _ = writeln!(
        out,
        "kind         {}{}",
        kind_name(c.kind),
        if c.internet { " (internet)" } else { "" }
    );
    let _ = writeln!(out, "state        {}", state_name(c.state));
    for (name, l) in [("leg A", &c.leg_a), ("leg B", &c.leg_b)] {
        let l = l.clone().unwrap_or_default();
        let ep = |e: Option<pb::Endpoint>| {
            let e = e.unwrap_or_default();
            if e.address.is_empty() {
                "(learning)".to_owned()
            } else if e.latched {
                format!("{} latched", e.address)
            } else {
                format!("{} expected", e.address)
            }
        };
        // Where a peer on the Internet sends leg A's media (the public address on this port).
        let public = if l.public_address.is_empty() {
            String::new()
        } else {
            format!("  public {}", l.public_address)
        };
        let _ = writeln!(
            out,
            "{name}        relay {}{public}  rtp {}  rtcp {}",
            l.relay_address,
            ep(l.rtp),
            ep(l.rtcp)
        );
    }
    let _ = writeln!(out, "timeout      {}s", duration_secs(c.timeout.as_ref()));
    let _ = writeln!(
        out,
        "allocated    {}",
        time_text(c.allocated_at.as_ref()).unwrap_or_default()
    );
    for (name, d) in [("from A", stats.from_a), ("from B", stats.from_b)] {
        let d = d.unwrap_or_default();
        let _ = writeln!(
            out,
            "{name}       {} packets, {} bytes, last {}; RTP: {} lost, {} reordered, jitter {:.2} ms",
            d.packets,
            d.bytes,
            time_text(d.last_seen.as_ref()).unwrap_or_else(|| "never".into()),
            d.lost,
            d.reordered,
            d.jitter_ms
        );
    }
    if let Some(at) = released_at {
        let _ = writeln!(
            out,
            "released     {}",
            time_text(Some(at)).unwrap_or_default()
        );
    }
    print!("{out}");
}

fn pool_json(p: &pb::PoolStatusResponse) -> Value {
    let l = p.layout.clone().unwrap_or_default();
    json!({
        "layout": { "name": l.name, "first_port": l.first_port, "last_port": l.last_port,
                    "capacity": l.capacity, "slots": l.slots },
        "in_use": p.in_use,
        "in_use_by_kind": p.in_use_by_kind.iter()
            .map(|k| (kind_name(k.kind), Value::from(k.in_use)))
            .collect::<serde_json::Map<_, _>>(),
        "quarantined": p.quarantined,
        "free": p.free,
        "internet_calls": p.internet_calls,
        "bandwidth_limit": p.bandwidth_limit.as_ref().map(|b| json!({
            "upstream_kbps": b.upstream_kbps, "codec": b.codec,
            "per_call_kbps": b.per_call_kbps, "internet_call_limit": b.internet_call_limit,
        })),
        "early_reuses": p.early_reuses,
        "data_path": p.data_path,
        "fast_path_unavailable": (!p.fast_path_unavailable.is_empty()).then_some(&p.fast_path_unavailable),
        "fast_path_degraded": (!p.fast_path_degraded.is_empty()).then_some(&p.fast_path_degraded),
        "instance_id": p.instance_id,
        "started_at": time_text(p.started_at.as_ref()),
        "adopted_at_start": p.adopted_at_start,
    })
}

fn pool_text(p: &pb::PoolStatusResponse) -> String {
    let l = p.layout.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "layout       {} (UDP {}-{}, {} channels on {} port pairs)",
        l.name, l.first_port, l.last_port, l.capacity, l.slots
    );
    let _ = writeln!(
        out,
        "in use       {} of {} ({} free, {} quarantined)",
        p.in_use, l.capacity, p.free, p.quarantined
    );
    for k in &p.in_use_by_kind {
        let _ = writeln!(out, "  {:<15} {}", kind_name(k.kind), k.in_use);
    }
    match &p.bandwidth_limit {
        Some(b) => {
            let _ = writeln!(
                out,
                "internet     {} of {} calls ({} kbit/s upstream, {} at {} kbit/s per call)",
                p.internet_calls, b.internet_call_limit, b.upstream_kbps, b.codec, b.per_call_kbps
            );
        }
        None => {
            let _ = writeln!(
                out,
                "internet     {} calls (no limit configured)",
                p.internet_calls
            );
        }
    }
    let path = if p.fast_path_unavailable.is_empty() {
        p.data_path.clone()
    } else {
        format!("{} ({})", p.data_path, p.fast_path_unavailable)
    };
    let _ = writeln!(out, "data path    {path}");
    if !p.fast_path_degraded.is_empty() {
        let _ = writeln!(out, "fast path    DEGRADED: {}", p.fast_path_degraded);
    }
    if p.early_reuses > 0 {
        let _ = writeln!(out, "early reuses {}", p.early_reuses);
    }
    let _ = writeln!(
        out,
        "instance     {} since {} ({} channel(s) kept from the previous run)",
        p.instance_id,
        time_text(p.started_at.as_ref()).unwrap_or_default(),
        p.adopted_at_start
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }

    #[test]
    fn enum_names_are_short_and_lowercase() {
        assert_eq!(kind_name(pb::ChannelKind::SipDevice as i32), "sip_device");
        assert_eq!(state_name(pb::ChannelState::FastPath as i32), "fast_path");
        assert_eq!(
            event_type_name(pb::EventType::IdleTimeout as i32),
            "idle_timeout"
        );
        assert_eq!(kind_name(77), "77");
        assert_eq!(parse_kind("mobile_client"), Ok(Kind::MobileClient));
        assert!(
            parse_kind("phone")
                .expect_err("unknown")
                .contains("sip_device")
        );
    }
}
