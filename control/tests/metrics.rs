//! Prometheus metrics end to end: a real server (user-space relay on loopback, gRPC API and
//! `/metrics` on 127.0.0.1:0), real requests and datagrams, then a scrape checked series by
//! series and by `promtool check metrics`; the deploy files (scrape config, alert rules and
//! their unit tests, Grafana dashboard) checked with promtool and against the scrape; and
//! `homerelay run` itself with `[stun]`: real STUN requests (answered, 420, malformed, RFC
//! 3489, over the rate…) counted by transport and result in its `/metrics`.
//!
//! promtool comes from Debian's prometheus package, installed by scripts/bootstrap.sh; without
//! it these tests fail (they never skip). Relay ports 43800–43899, peers 43900–43999.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{WAIT, allocate_request, by_port, peer, recv, rtp, within};
use control::daemon::DaemonBuilder;
use control::metrics::{self, CounterSource, Exporter, Metrics, names};
use control::server::{self, Security};
use control::service::Service;
use proto::v1 as pb;
use proto::v1::channel_service_client::ChannelServiceClient;
use relay_common::Counter as XdpCounter;
use relay_user::Relay;
use relay_user::userspace::UserspaceCounters;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

/// The relay's user-space counters, plus fast-path counters made up by the test (the fast
/// path itself needs XDP interfaces: its mapping to metrics is what is checked here).
struct Source {
    relay: Arc<Relay>,
    xdp: Vec<(XdpCounter, u64)>,
}

impl CounterSource for Source {
    fn userspace_counters(&self) -> UserspaceCounters {
        self.relay.userspace().counters()
    }

    fn xdp_counters(&self) -> Option<anyhow::Result<Vec<(XdpCounter, u64)>>> {
        Some(Ok(self.xdp.clone()))
    }
}

/// Made-up fast-path totals: 5 XDP_TX, 2 redirected, 3 + 1 passed up, 1 dropped.
fn xdp_totals() -> Vec<(XdpCounter, u64)> {
    XdpCounter::ALL
        .iter()
        .map(|&c| {
            let n = match c {
                XdpCounter::Tx => 5,
                XdpCounter::Redirect => 2,
                XdpCounter::PassNoChannel => 3,
                XdpCounter::PassUnknownSource => 1,
                XdpCounter::DropRedirectFailed => 1,
                _ => 0,
            };
            (c, n)
        })
        .collect()
}

struct MetricsServer {
    api: String,
    metrics: SocketAddr,
    service: Service,
    _source: Arc<dyn CounterSource>,
    _state: tempfile::TempDir,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MetricsServer {
    /// A server on relay ports `first..=last` with `capacity` channels and an upstream limit.
    async fn start(first: u16, last: u16, capacity: u32) -> MetricsServer {
        let state = tempfile::tempdir().expect("state directory");
        let mut config = common::Setup {
            capacity,
            upstream_kbps: Some(1000),
            ..common::Setup::new(first, last)
        }
        .config(state.path());
        config.pool.media_timeout = Duration::from_secs(60);
        let daemon = DaemonBuilder::new(config)
            .seed(11)
            .metrics(Metrics::new())
            .build()
            .expect("start the daemon");
        let service = daemon.service;
        let relay = daemon.relay.expect("a relay");
        let source: Arc<dyn CounterSource> = Arc::new(Source {
            relay,
            xdp: xdp_totals(),
        });
        let exporter = Exporter::new(service.clone(), Some(Arc::downgrade(&source)), true);

        let api = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the API");
        let api_addr = api.local_addr().expect("address");
        let m = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the metrics endpoint");
        let metrics_addr = m.local_addr().expect("address");
        let (stop, _) = tokio::sync::watch::channel(false);
        let stopped = || {
            let mut rx = stop.subscribe();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let grpc = tokio::spawn({
            let service = service.clone();
            let stopped = stopped();
            async move {
                server::serve(api, service, Security::default(), stopped)
                    .await
                    .expect("the API ran cleanly");
            }
        });
        let stopped = stopped();
        let http = tokio::spawn(async move {
            metrics::serve(m, exporter, stopped)
                .await
                .expect("the metrics endpoint ran cleanly");
        });
        MetricsServer {
            api: format!("http://{api_addr}"),
            metrics: metrics_addr,
            service,
            _source: source,
            _state: state,
            stop,
            tasks: vec![grpc, http],
        }
    }

    async fn client(&self) -> ChannelServiceClient<tonic::transport::Channel> {
        within(ChannelServiceClient::connect(self.api.clone()))
            .await
            .expect("connect")
    }

    /// `GET /metrics`: the body, after checking the status and content type.
    async fn scrape(&self) -> String {
        let (head, body) = within(http_get(self.metrics, "/metrics")).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        body
    }

    async fn stop(mut self) {
        self.service.shutdown().await;
        self.stop.send_replace(true);
        for task in self.tasks.drain(..) {
            within(task).await.expect("server task");
        }
    }
}

/// A minimal HTTP/1.1 GET: (status line and headers, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read the response");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers and body");
    (head.to_owned(), body.to_owned())
}

/// One sample of the exposition text.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples and the metric families (`# TYPE` lines) of a scrape.
struct Scrape {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("closing brace");
                    let labels = rest
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Scrape { samples, types }
    }

    /// The value of the series with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in the scrape"))
    }

    /// Whether `name` (a family, or a histogram's `_bucket`/`_sum`/`_count`) is exported.
    fn has_metric(&self, name: &str) -> bool {
        self.types.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| self.types.get(base).is_some_and(|t| t == "histogram"))
            })
    }
}

/// The promtool binary; a missing one fails the test loudly.
fn promtool() -> Command {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    let Some(path) = found else {
        panic!(
            "promtool is not installed (not on PATH): run scripts/bootstrap.sh, which installs it \
             from Debian's prometheus package; these tests never skip"
        );
    };
    Command::new(path)
}

/// Runs promtool and requires success; returns its output.
fn run_promtool(args: &[&str], stdin: Option<&str>, dir: &Path) -> String {
    let mut cmd = promtool();
    cmd.args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start promtool");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `homerelay_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("homerelay_") {
        let preceded_by_ident = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_ident {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_activity_has_every_series_and_passes_promtool() {
    // 10 port pairs, 3 channels: the fourth allocation finds the pool full.
    let server = MetricsServer::start(43800, 43819, 3).await;
    let mut client = server.client().await;

    // The office (leg B) is strict at its socket; the home device (leg A) is learnt.
    let office = peer(43900);
    let home = peer(43901);
    let stranger = peer(43902);
    let mut request = allocate_request("metrics-call-1", pb::ChannelKind::SipDevice);
    request.leg_b = Some(pb::LegSpec {
        rtp_address: office.local_addr().expect("addr").to_string(),
        strict: true,
        ..Default::default()
    });
    let ch = client
        .allocate(request.clone())
        .await
        .expect("allocate")
        .into_inner()
        .channel
        .expect("channel");
    let port = u16::try_from(ch.port).expect("port");
    assert!(
        !client
            .allocate(request)
            .await
            .expect("repeat")
            .into_inner()
            .created
    );
    let second = client
        .allocate(allocate_request(
            "metrics-call-2",
            pb::ChannelKind::ItspCall,
        ))
        .await
        .expect("allocate")
        .into_inner()
        .channel
        .expect("channel");
    client
        .allocate(allocate_request(
            "metrics-call-3",
            pb::ChannelKind::MobileClient,
        ))
        .await
        .expect("allocate");
    let full = client
        .allocate(allocate_request(
            "metrics-call-4",
            pb::ChannelKind::SipDevice,
        ))
        .await
        .expect_err("pool full");
    assert_eq!(full.code(), Code::ResourceExhausted);
    let invalid = client
        .allocate(allocate_request("", pb::ChannelKind::SipDevice))
        .await
        .expect_err("no call id");
    assert_eq!(invalid.code(), Code::InvalidArgument);

    // Media: three packets home → office (the first latches the home device), two back, and
    // one from a stranger, dropped once both legs are latched.
    for i in 0..3u8 {
        home.send_to(&rtp(i, 100), ("127.0.0.1", port))
            .expect("send");
        assert_eq!(recv(&office).0.len(), 100);
    }
    for i in 0..2u8 {
        office
            .send_to(&rtp(i, 60), ("127.0.0.1", port))
            .expect("send");
        assert_eq!(recv(&home).0.len(), 60);
    }
    stranger
        .send_to(&rtp(9, 40), ("127.0.0.1", port))
        .expect("send");

    client
        .release(pb::ReleaseRequest {
            channel: by_port(second.port),
        })
        .await
        .expect("release");
    let missing = client
        .get(pb::GetRequest {
            channel: by_port(43818),
        })
        .await
        .expect_err("no such channel");
    assert_eq!(missing.code(), Code::NotFound);

    // The drop and the latch event (found by the 20 ms diff) arrive asynchronously.
    let deadline = Instant::now() + WAIT;
    let (text, scrape) = loop {
        let text = server.scrape().await;
        let scrape = Scrape::parse(&text);
        let settled = scrape.get(
            names::DROPPED,
            &[("path", "userspace"), ("reason", "unknown_source")],
        ) == Some(1.0)
            && scrape.get(names::CHANNEL_EVENTS, &[("event", "latched")]) == Some(1.0);
        if settled {
            break (text, scrape);
        }
        assert!(
            Instant::now() < deadline,
            "the drop and the latch event never showed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // (a) The expected series and values.
    let v = |name: &str, labels: &[(&str, &str)]| scrape.value(name, labels);
    for (result, n) in [
        ("ok", 3.0),
        ("existing", 1.0),
        ("pool_full", 1.0),
        ("invalid", 1.0),
        ("internet_limit", 0.0),
        ("conflict", 0.0),
    ] {
        assert_eq!(v(names::ALLOCATIONS, &[("result", result)]), n, "{result}");
    }
    assert_eq!(v(names::RELEASES, &[("reason", "requested")]), 1.0);
    assert_eq!(v(names::RELEASES, &[("reason", "idle_timeout")]), 0.0);
    for (event, n) in [
        ("allocated", 3.0),
        ("released", 1.0),
        ("latched", 1.0),
        ("fast_path", 0.0),
    ] {
        assert_eq!(v(names::CHANNEL_EVENTS, &[("event", event)]), n, "{event}");
    }
    assert_eq!(v(names::POOL_CAPACITY, &[]), 3.0);
    assert_eq!(v(names::POOL_SLOTS, &[]), 10.0);
    for (kind, n) in [
        ("sip_device", 1.0),
        ("mobile_client", 1.0),
        ("itsp_call", 0.0),
        ("circuit_call", 0.0),
        ("system_device", 0.0),
    ] {
        assert_eq!(v(names::CHANNELS_IN_USE, &[("kind", kind)]), n, "{kind}");
    }
    assert_eq!(v(names::POOL_FREE, &[]), 8.0);
    // 1000 kbit/s of G.711 at 80 kbit/s per call.
    assert_eq!(v(names::INTERNET_CALL_LIMIT, &[]), 12.0);
    assert_eq!(v(names::INTERNET_CALLS, &[]), 2.0);
    let us = |d: &'static str| [("path", "userspace"), ("direction", d)];
    assert_eq!(v(names::PACKETS, &us("rx")), 6.0);
    assert_eq!(v(names::PACKETS, &us("tx")), 5.0);
    assert_eq!(v(names::BYTES, &us("tx")), 420.0);
    assert_eq!(v(names::LATCHED, &[]), 1.0);
    assert!(v(names::USERSPACE_BATCHES, &[]) >= 1.0);
    // The fast path's counters: every packet counted once, passes and drops by reason.
    let xdp = |d: &'static str| [("path", "xdp"), ("direction", d)];
    assert_eq!(v(names::PACKETS, &xdp("rx")), 12.0);
    assert_eq!(v(names::PACKETS, &xdp("tx")), 7.0);
    assert_eq!(v(names::XDP_PASSED, &[("reason", "no_channel")]), 3.0);
    assert_eq!(v(names::XDP_PASSED, &[("reason", "unknown_source")]), 1.0);
    assert_eq!(
        v(
            names::DROPPED,
            &[("path", "xdp"), ("reason", "redirect_failed")]
        ),
        1.0
    );
    // A user-space-only relay whose configuration asks for XDP: the "fast path lost" alert's
    // condition.
    // No [public_address] and no relay.internet_address here: no public address, no discovery
    // (the failure counters exist at 0 all the same).
    assert_eq!(v(names::PUBLIC_ADDRESS_KNOWN, &[]), 0.0);
    assert_eq!(v(names::PUBLIC_ADDRESS_CHANGES, &[]), 0.0);
    assert_eq!(
        v(names::PUBLIC_ADDRESS_FAILURES, &[("server", "itsp")]),
        0.0
    );
    assert_eq!(v(names::FAST_PATH_CONFIGURED, &[]), 1.0);
    assert_eq!(v(names::FAST_PATH_UP, &[]), 0.0);
    assert_eq!(
        v(names::BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    // gRPC latency by method and code.
    let grpc = |method: &str, code: &str| {
        v(
            "homerelay_grpc_request_duration_seconds_count",
            &[
                ("grpc_service", "relay.v1.ChannelService"),
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(grpc("Allocate", "OK"), 4.0);
    assert_eq!(grpc("Allocate", "ResourceExhausted"), 1.0);
    assert_eq!(grpc("Allocate", "InvalidArgument"), 1.0);
    assert_eq!(grpc("Release", "OK"), 1.0);
    assert_eq!(grpc("Get", "NotFound"), 1.0);
    assert_eq!(
        scrape.types.get(names::GRPC_DURATION).map(String::as_str),
        Some("histogram")
    );

    // Low cardinality: only the fixed label names, and nothing per call, channel or port.
    let allowed = [
        "kind",
        "result",
        "reason",
        "event",
        "path",
        "direction",
        "transport",
        "origin",
        "type",
        "grpc_service",
        "grpc_method",
        "grpc_code",
        "version",
        // The public address discovery's STUN server role: itsp or configured.
        "server",
        "le",
    ];
    for s in &scrape.samples {
        for (k, value) in &s.labels {
            assert!(allowed.contains(&k.as_str()), "label {k} on {s:?}");
            let port = value.parse::<u16>().ok();
            assert!(
                !value.contains("metrics-call") && port.is_none_or(|p| p < 43800),
                "a per-call or per-port label value: {s:?}"
            );
        }
    }
    for s in &scrape.samples {
        assert!(s.name.starts_with("homerelay_"), "{s:?}");
    }

    // (b) promtool's linter: HELP on every metric, names and types by the conventions.
    run_promtool(&["check", "metrics"], Some(&text), &deploy_dir());

    // Unknown paths are one `unknown` series, whatever the path.
    let (head, _) = within(http_get(server.metrics, "/nothing-here")).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    server.stop().await;
}

#[test]
fn the_prometheus_config_and_alert_rules_pass_promtool() {
    let dir = deploy_dir().join("prometheus");
    run_promtool(&["check", "config", "prometheus.yml"], None, &dir);
    let out = run_promtool(&["check", "rules", "alerts.yml"], None, &dir);
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    // Each alert quiet on a healthy relay and firing on its condition.
    run_promtool(&["test", "rules", "alerts.test.yml"], None, &dir);
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).expect("alerts.test.yml");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "alerts.test.yml does not show {alert} firing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_use_only_exported_metrics() {
    let server = MetricsServer::start(43840, 43859, 10).await;
    let mut client = server.client().await;
    client
        .allocate(allocate_request("dash-1", pb::ChannelKind::CircuitCall))
        .await
        .expect("allocate");
    let scrape = Scrape::parse(&server.scrape().await);
    server.stop().await;

    let path = deploy_dir().join("grafana/homerelay.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "homerelay");

    let mut panels: Vec<&serde_json::Value> = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested);
        }
        if p["type"] != "row" {
            panels.push(p);
        }
    }
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut used = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().expect("every panel has a title");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} uses no homerelay metric"
            );
            for name in names {
                assert!(
                    scrape.has_metric(&name),
                    "{title}: {expr} uses {name}, which the relay does not export"
                );
                used.insert(name);
            }
        }
    }
    // What the dashboard is for.
    for name in [
        names::CHANNELS_IN_USE,
        names::POOL_CAPACITY,
        names::ALLOCATIONS,
        names::RELEASES,
        names::PACKETS,
        names::DROPPED,
        names::XDP_PASSED,
        names::FAST_PATH_DEGRADED,
        names::STUN_REQUESTS,
        "homerelay_grpc_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
    let instance_query = &dashboard["templating"]["list"][1]["definition"];
    for name in metric_names(instance_query.as_str().expect("instance variable")) {
        assert!(scrape.has_metric(&name), "{name}");
    }

    let rules =
        std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml")).expect("alerts.yml");
    let names = metric_names(&rules);
    assert!(names.len() >= 5, "{names:?}");
    for name in names {
        assert!(
            scrape.has_metric(&name),
            "alerts.yml uses {name}, which the relay does not export"
        );
    }
}

#[test]
fn the_metric_name_scanner_finds_names_in_expressions() {
    let names = metric_names(
        "sum by (le) (rate(homerelay_a_bucket{x=\"homerelay_not\"}[5m])) / homerelay_b_total",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["homerelay_a_bucket", "homerelay_b_total", "homerelay_not"]
    );
    assert!(metric_names("HomerelayPoolNearlyFull xhomerelay_y").is_empty());
}

/// `homerelay run` (the binary) with `[stun]` and metrics on port 0; removed with its files
/// and stopped (SIGTERM, then SIGKILL) on drop.
struct StunDaemon {
    child: std::process::Child,
    stun: SocketAddr,
    stun_tcp: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl StunDaemon {
    /// STUN allows 1 request a second per source, in a burst of 8.
    fn start() -> StunDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("homerelay.toml");
        std::fs::write(
            &config,
            format!(
                "[relay]\nports = \"43880-43899\"\nworkers = 1\n\
                 [api]\nlisten = \"127.0.0.1:0\"\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n\
                 [store]\npath = \"{}\"\n\
                 [stun]\nlisten = \"127.0.0.1:0\"\nrate_per_source = 1\nburst_per_source = 8\n",
                dir.path().join("homerelay.db").display()
            ),
        )
        .expect("write the configuration");
        let log = dir.path().join("homerelay.log");
        let child = Command::new(env!("CARGO_BIN_EXE_homerelay"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("HOMERELAY_CONFIG")
            .env_remove("HOMERELAY_METRICS_LISTEN")
            .env_remove("HOMERELAY_NO_METRICS")
            .env("HOMERELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start homerelay run");
        let mut daemon = StunDaemon {
            child,
            stun: SocketAddr::from(([0, 0, 0, 0], 0)),
            stun_tcp: SocketAddr::from(([0, 0, 0, 0], 0)),
            metrics: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            _dir: dir,
        };
        // "STUN on UDP [127.0.0.1:N] and TCP [127.0.0.1:M]" (port 0: each its own port),
        // "metrics on http://127.0.0.1:P/metrics".
        let after = |text: &str, prefix: &str, end: char| -> Option<SocketAddr> {
            let rest = &text[text.find(prefix)? + prefix.len()..];
            rest[..rest.find(end)?].parse().ok()
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&daemon.log).unwrap_or_default();
            if let (Some(stun), Some(stun_tcp), Some(metrics)) = (
                after(&text, "STUN on UDP [", ']'),
                after(&text, "] and TCP [", ']'),
                after(&text, "metrics on http://", '/'),
            ) {
                daemon.stun = stun;
                daemon.stun_tcp = stun_tcp;
                daemon.metrics = metrics;
                return daemon;
            }
            let exited = daemon.child.try_wait().expect("wait").is_some();
            assert!(
                !exited && Instant::now() < deadline,
                "the daemon did not start its STUN server and metrics endpoint:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StunDaemon {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signals the child this test started, by its pid (not yet reaped).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A STUN message: `message_type`, the magic cookie, a transaction id, `body` as attributes.
fn stun_message(message_type: u16, id: u8, body: &[u8]) -> Vec<u8> {
    let mut m = message_type.to_be_bytes().to_vec();
    m.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&[id; 12]);
    m.extend_from_slice(body);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_counts_stun_requests_by_transport_and_result() {
    let daemon = StunDaemon::start();
    let bare = |id| stun_message(0x0001, id, &[]);

    // TCP first (RFC 5389 framing): one answered request. Every request, whatever becomes of
    // it, takes one of the source's 8 tokens, and the bucket starts full: the first 8
    // requests (this one and the next 7) are never rate limited.
    let mut tcp = tokio::net::TcpStream::connect(daemon.stun_tcp)
        .await
        .expect("connect over TCP");
    tcp.write_all(&bare(1)).await.expect("send over TCP");
    let mut answer = [0u8; 56];
    within(tcp.read_exact(&mut answer))
        .await
        .expect("an answer over TCP");
    assert_eq!(&answer[8..20], &[1; 12]);
    drop(tcp);

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    udp.set_read_timeout(Some(WAIT)).expect("timeout");
    let ask = |m: &[u8]| {
        udp.send_to(m, daemon.stun).expect("send");
    };
    let answer = |id: u8| -> Vec<u8> {
        let mut buf = [0u8; 1500];
        loop {
            let (n, _) = udp.recv_from(&mut buf).expect("an answer within WAIT");
            if buf[8..20] == [id; 12] {
                return buf[..n].to_vec();
            }
        }
    };
    let mut sent_bytes = 0;
    let mut send = |m: Vec<u8>| {
        sent_bytes += m.len();
        ask(&m);
    };
    // Two plain requests: answered (56 bytes each).
    for id in [2, 3] {
        send(bare(id));
        assert_eq!(answer(id).len(), 56);
    }
    // CHANGE-REQUEST with change-port and no second address: 420 Unknown Attribute.
    send(stun_message(
        0x0001,
        4,
        &[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x02],
    ));
    let error = answer(4);
    assert_eq!(&error[0..2], &[0x01, 0x11], "a Binding error response");
    // Not STUN, RFC 3489 (no magic cookie), an indication, and a datagram too long: dropped.
    send(b"hello, not a STUN message".to_vec());
    let mut classic = bare(6);
    classic[4..8].copy_from_slice(&[1, 2, 3, 4]);
    send(classic);
    send(stun_message(0x0011, 7, &[]));
    send(vec![0u8; 1300]);
    // Over the rate: the bucket is empty now and refills one token a second, so of these 50
    // some are answered only if sending them took seconds.
    for _ in 0..50 {
        send(bare(9));
    }

    // Every request is counted once; the drops arrive asynchronously.
    let udp_results = [
        "answered",
        "error",
        "not_stun",
        "rfc3489",
        "not_binding_request",
        "rate_limited",
        "too_long",
    ];
    let deadline = Instant::now() + WAIT;
    let (text, scrape) = loop {
        let (head, text) = within(http_get(daemon.metrics, "/metrics")).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let scrape = Scrape::parse(&text);
        let udp_total: f64 = udp_results
            .iter()
            .filter_map(|r| {
                scrape.get(names::STUN_REQUESTS, &[("transport", "udp"), ("result", r)])
            })
            .sum();
        if udp_total >= 57.0 {
            break (text, scrape);
        }
        assert!(
            Instant::now() < deadline,
            "57 UDP requests sent, {udp_total} counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v = |transport, result| {
        scrape.value(
            names::STUN_REQUESTS,
            &[("transport", transport), ("result", result)],
        )
    };
    assert_eq!(v("tcp", "answered"), 1.0);
    for result in udp_results.into_iter().skip(1) {
        assert_eq!(v("tcp", result), 0.0, "tcp {result}");
    }
    for result in [
        "error",
        "not_stun",
        "rfc3489",
        "not_binding_request",
        "too_long",
    ] {
        assert_eq!(v("udp", result), 1.0, "udp {result}");
    }
    let answered = v("udp", "answered");
    let limited = v("udp", "rate_limited");
    assert_eq!(answered + limited, 52.0, "2 + 50 plain requests");
    assert!(limited >= 1.0, "50 requests over an empty bucket");
    // Bytes: every datagram whole (the 1,300-byte one too), every response sent.
    let bytes = |name, transport| scrape.value(name, &[("transport", transport)]);
    assert_eq!(bytes(names::STUN_REQUEST_BYTES, "udp"), sent_bytes as f64);
    assert_eq!(
        bytes(names::STUN_RESPONSE_BYTES, "udp"),
        56.0 * answered + error.len() as f64
    );
    assert_eq!(bytes(names::STUN_REQUEST_BYTES, "tcp"), 20.0);
    assert_eq!(bytes(names::STUN_RESPONSE_BYTES, "tcp"), 56.0);
    // The answers to the over-rate requests that got through arrive too, and no more.
    for _ in 2..answered as usize {
        assert_eq!(answer(9).len(), 56);
    }
    // Only the fixed label names, and the scrape passes promtool.
    for s in scrape
        .samples
        .iter()
        .filter(|s| s.name.starts_with("homerelay_stun_"))
    {
        for k in s.labels.keys() {
            assert!(["transport", "result"].contains(&k.as_str()), "{s:?}");
        }
    }
    run_promtool(&["check", "metrics"], Some(&text), &deploy_dir());
}
