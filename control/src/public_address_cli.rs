//! `homerelay public-address`: the public address of a running relay (where remote devices
//! send their media, and how the relay learnt it) from `relay.v1.PublicAddressService`; with
//! `--watch`, its changes as they happen. [`status`] is the one query, for other commands
//! (`doctor`) too.
use std::fmt::Write as _;

use proto::v1 as pb;
use proto::v1::public_address_service_client::PublicAddressServiceClient;
use serde_json::{Value, json};

use crate::client::{Connection, call_error, connect_channel, time_text};
use crate::public_address::Source;
use crate::public_address_api::source_of_pb;

/// `homerelay public-address`.
#[derive(Clone, Debug, clap::Args)]
#[command(after_help = "\
Sources: itsp (the ITSP's STUN server, public_address.itsp_stun_server), configured (the \
fallback, public_address.stun_server), static (public_address.static_address), internet_address \
(no STUN server configured: relay.internet_address is public itself), unknown (no answer yet).

A channel's leg A reports public_address = this address on the channel's port: the company \
router forwards the relay's port range 1:1 (see `homerelay router-config`). Discovery is \
configured in [public_address] (docs/public-address.md).")]
pub struct PublicAddressArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Keep going: print the status, then one line (or JSON object) per change of the public
    /// address, failed refresh and recovery, until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: stop after this many messages (the first is the current status).
    #[arg(long, requires = "watch")]
    pub count: Option<u64>,
}

/// A connected client of `PublicAddressService`.
type Client = PublicAddressServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::client::TokenInjector,
    >,
>;

async fn client(c: &Connection) -> anyhow::Result<Client> {
    let (channel, token) = connect_channel(c).await?;
    Ok(PublicAddressServiceClient::with_interceptor(channel, token))
}

/// The public address status of the daemon `connection` reaches.
pub async fn status(connection: &Connection) -> anyhow::Result<pb::PublicAddressStatus> {
    let mut client = client(connection).await?;
    let r = client
        .get_public_address(pb::GetPublicAddressRequest {})
        .await
        .map_err(call_error)?
        .into_inner();
    Ok(r.status.unwrap_or_default())
}

/// Runs `homerelay public-address`.
pub async fn run(args: PublicAddressArgs) -> anyhow::Result<()> {
    let json = args.connection.json;
    if !args.watch {
        let s = status(&args.connection).await?;
        if json {
            println!("{}", status_json(&s));
        } else {
            print!("{}", status_text(&s));
        }
        return Ok(());
    }
    let mut client = client(&args.connection).await?;
    let mut stream = client
        .watch_public_address(pb::WatchPublicAddressRequest {})
        .await
        .map_err(call_error)?
        .into_inner();
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        let Some(e) = stream.message().await.map_err(call_error)? else {
            break;
        };
        seen += 1;
        if json {
            println!("{}", event_json(&e));
        } else {
            println!("{}", event_line(&e));
        }
    }
    Ok(())
}

fn source_name(s: i32) -> &'static str {
    pb::PublicAddressSource::try_from(s).map_or("unknown", |s| source_of_pb(s).name())
}

fn event_type_name(t: i32) -> String {
    pb::PublicAddressEventType::try_from(t).map_or_else(
        |_| t.to_string(),
        |t| {
            t.as_str_name()
                .trim_start_matches("PUBLIC_ADDRESS_EVENT_TYPE_")
                .to_ascii_lowercase()
        },
    )
}

fn some(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The status as a JSON object (stable field names).
pub fn status_json(s: &pb::PublicAddressStatus) -> Value {
    json!({
        "address": some(&s.address),
        "source": source_name(s.source),
        "local_address": some(&s.local_address),
        "discovery": s.discovery,
        "refresh_secs": s.refresh_interval.map(|d| d.seconds),
        "server": some(&s.server),
        "server_address": some(&s.server_address),
        "discovery_local_address": some(&s.discovery_local_address),
        "mapped_address": some(&s.mapped_address),
        "port_preserved": (!s.mapped_address.is_empty()).then_some(s.port_preserved),
        "last_refresh": time_text(s.last_refresh.as_ref()),
        "last_success": time_text(s.last_success.as_ref()),
        "last_error": some(&s.last_error),
        "stale": s.stale,
        "changes": s.changes,
        "changed_at": time_text(s.changed_at.as_ref()),
    })
}

fn event_json(e: &pb::PublicAddressEvent) -> Value {
    json!({
        "type": event_type_name(e.r#type),
        "at": time_text(e.at.as_ref()),
        "previous_address": some(&e.previous_address),
        "status": e.status.as_ref().map(status_json),
    })
}

fn event_line(e: &pb::PublicAddressEvent) -> String {
    let s = e.status.clone().unwrap_or_default();
    let mut line = format!(
        "{}  {:<9}  {}",
        time_text(e.at.as_ref()).unwrap_or_default(),
        event_type_name(e.r#type),
        some(&s.address).unwrap_or("unknown"),
    );
    if let Some(p) = some(&e.previous_address) {
        let _ = write!(line, " (was {p})");
    }
    let _ = write!(line, "  source {}", source_name(s.source));
    if let Some(server) = some(&s.server) {
        let _ = write!(line, " ({server})");
    }
    if let Some(err) = some(&s.last_error) {
        let _ = write!(line, "  error: {err}");
    }
    line
}

/// The status for people.
pub fn status_text(s: &pb::PublicAddressStatus) -> String {
    let mut out = String::new();
    let source = pb::PublicAddressSource::try_from(s.source).map_or(Source::Unknown, source_of_pb);
    let whence = match source {
        Source::Itsp => "from the ITSP's STUN server",
        Source::Configured => "from the configured STUN server",
        Source::Static => "static (public_address.static_address)",
        Source::InternetAddress => {
            "relay.internet_address itself: no STUN server configured, so no NAT is assumed"
        }
        Source::Unknown if s.discovery => "no STUN answer yet",
        Source::Unknown => "nothing configured (relay.internet_address or [public_address])",
    };
    let address = some(&s.address).unwrap_or("unknown");
    let _ = writeln!(out, "public address  {address} ({whence})");
    if s.stale {
        let _ = writeln!(
            out,
            "                stale: the last refresh got no answer; this is the last address known"
        );
    }
    let _ = writeln!(
        out,
        "stands for      {}",
        some(&s.local_address).unwrap_or("the source address the kernel picks")
    );
    if let Some(a) = some(&s.address) {
        let _ = writeln!(
            out,
            "media           remote devices send to {a}:PORT, PORT being the channel's (leg A's \
             public_address)"
        );
    }
    if s.discovery {
        let every = s.refresh_interval.map_or(0, |d| d.seconds);
        let _ = writeln!(
            out,
            "discovery       STUN every {every}s; last refresh {}, last answer {}",
            time_text(s.last_refresh.as_ref()).unwrap_or_else(|| "never".into()),
            time_text(s.last_success.as_ref()).unwrap_or_else(|| "never".into()),
        );
        if let Some(server) = some(&s.server) {
            let _ = writeln!(
                out,
                "server          {server} ({}), {}",
                s.server_address,
                source.name()
            );
        }
        if let Some(mapped) = some(&s.mapped_address) {
            let ports = if s.port_preserved {
                "port kept"
            } else {
                "the NAT rewrites source ports; media is unaffected, the router forwards the \
                 relay's ports 1:1"
            };
            let _ = writeln!(
                out,
                "mapping         {} -> {mapped} ({ports})",
                s.discovery_local_address
            );
        }
        if let Some(e) = some(&s.last_error) {
            let _ = writeln!(out, "last error      {e}");
        }
    } else {
        let _ = writeln!(
            out,
            "discovery       off (no STUN server in [public_address], or a static address)"
        );
    }
    let _ = writeln!(
        out,
        "changes         {}{}",
        s.changes,
        time_text(s.changed_at.as_ref()).map_or_else(String::new, |t| format!(" (last {t})"))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_says_where_the_address_comes_from() {
        let s = pb::PublicAddressStatus {
            address: "198.51.100.1".into(),
            source: pb::PublicAddressSource::Configured as i32,
            local_address: "203.0.113.10".into(),
            discovery: true,
            server: "stun.example.net".into(),
            server_address: "192.0.2.7:3478".into(),
            discovery_local_address: "203.0.113.10:40000".into(),
            mapped_address: "198.51.100.1:40000".into(),
            port_preserved: true,
            last_error: "itsp server stun.itsp.example: no answer".into(),
            ..Default::default()
        };
        let t = status_text(&s);
        assert!(
            t.contains("public address  198.51.100.1 (from the configured STUN server)"),
            "{t}"
        );
        assert!(t.contains("last error      itsp server"), "{t}");
        assert!(t.contains("(port kept)"), "{t}");
        let j = status_json(&s);
        assert_eq!(j["source"], "configured");
        assert_eq!(j["port_preserved"], true);
        assert_eq!(j["last_success"], Value::Null);

        let off = pb::PublicAddressStatus::default();
        let t = status_text(&off);
        assert!(
            t.contains("public address  unknown (nothing configured"),
            "{t}"
        );
        assert!(t.contains("discovery       off"), "{t}");
        assert_eq!(status_json(&off)["address"], Value::Null);
    }

    #[test]
    fn event_lines_name_the_change() {
        let e = pb::PublicAddressEvent {
            r#type: pb::PublicAddressEventType::Changed as i32,
            previous_address: "198.51.100.1".into(),
            status: Some(pb::PublicAddressStatus {
                address: "198.51.100.2".into(),
                source: pb::PublicAddressSource::Itsp as i32,
                ..Default::default()
            }),
            at: None,
        };
        let line = event_line(&e);
        assert!(
            line.contains("changed    198.51.100.2 (was 198.51.100.1)  source itsp"),
            "{line}"
        );
        assert_eq!(event_json(&e)["type"], "changed");
    }
}
