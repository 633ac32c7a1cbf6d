//! Prometheus metrics: the registry, the gRPC latency layer ([`GrpcLayer`]) and the `/metrics`
//! HTTP endpoint ([`serve`], `[metrics] listen`, default `127.0.0.1:9464`).
//!
//! The invariant a reader must know: **every label value comes from a small fixed set** — a
//! channel kind, a data path, a direction, a reason, a result, a method of the served gRPC
//! services (anything else is `unknown`) or a status code. Nothing per channel, call, device,
//! port or peer ever becomes a label (coturn's per-user labels grew memory without bound), so
//! the number of series is bounded whatever the traffic: about 140 without the fast path (18
//! of them the STUN server's), plus the gRPC histograms of the (method, code) pairs actually
//! seen.
//!
//! Two sources:
//! - events are counted where they happen: allocation results in [`crate::api`], releases and
//!   channel events in [`crate::service`], gRPC latency by [`GrpcLayer`] around every service,
//!   STUN requests in [`crate::stun_server`] (through [`StunCounters`], once per batch);
//! - state is read at scrape time ([`Exporter`]): the pool from the allocator, and the data
//!   paths' global counters ([`CounterSource`]), exported as counters set to their absolute
//!   values — they only go up while the relay runs.
//!
//! The registry is an instance owned by the [`Service`], not the `metrics` crate's global
//! recorder: the hot paths use pre-registered handles (no key lookup), and tests can run several
//! servers in one process, each with its own numbers. [`Metrics::disabled`] makes every
//! handle a no-op.
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder as _};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use relay_common::Counter as XdpCounter;
use relay_user::Relay;
use relay_user::forward::DropReason;
use relay_user::userspace::UserspaceCounters;
use tonic::Code;

use crate::error::ServiceError;
use crate::service::{ChannelView, Service};
use relay_core::stun::{Outcome as StunOutcome, Transport as StunTransport};
use relay_core::{AllocError, EventKind, ReleaseReason};

/// Where `/metrics` is served by default: loopback, next to the API. 9464 is the port
/// OpenTelemetry's Prometheus exporters use.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// Metric names, for the deploy files and tests.
pub mod names {
    pub const BUILD_INFO: &str = "homerelay_build_info";
    pub const POOL_CAPACITY: &str = "homerelay_pool_capacity_channels";
    pub const POOL_SLOTS: &str = "homerelay_pool_slots";
    pub const CHANNELS_IN_USE: &str = "homerelay_channels_in_use";
    pub const POOL_QUARANTINED: &str = "homerelay_pool_quarantined_slots";
    pub const POOL_FREE: &str = "homerelay_pool_free_slots";
    pub const POOL_EARLY_REUSES: &str = "homerelay_pool_early_reuses_total";
    pub const INTERNET_CALLS: &str = "homerelay_internet_calls";
    pub const INTERNET_CALL_LIMIT: &str = "homerelay_internet_call_limit";
    pub const ALLOCATIONS: &str = "homerelay_allocations_total";
    pub const RELEASES: &str = "homerelay_releases_total";
    pub const CHANNEL_EVENTS: &str = "homerelay_channel_events_total";
    pub const FAST_PATH_UP: &str = "homerelay_fast_path_up";
    pub const FAST_PATH_CONFIGURED: &str = "homerelay_fast_path_configured";
    pub const FAST_PATH_DEGRADED: &str = "homerelay_fast_path_degraded";
    pub const PACKETS: &str = "homerelay_packets_total";
    pub const BYTES: &str = "homerelay_bytes_total";
    pub const DROPPED: &str = "homerelay_dropped_packets_total";
    pub const XDP_PASSED: &str = "homerelay_xdp_passed_packets_total";
    pub const LATCHED: &str = "homerelay_latched_endpoints_total";
    pub const USERSPACE_BATCHES: &str = "homerelay_userspace_receive_batches_total";
    pub const GRPC_DURATION: &str = "homerelay_grpc_request_duration_seconds";
    pub const REGISTRATIONS: &str = "homerelay_registrations_total";
    pub const REGISTERED_DEVICES: &str = "homerelay_registered_devices";
    pub const DEVICES: &str = "homerelay_devices";
    pub const STUN_REQUESTS: &str = "homerelay_stun_requests_total";
    pub const STUN_REQUEST_BYTES: &str = "homerelay_stun_request_bytes_total";
    pub const STUN_RESPONSE_BYTES: &str = "homerelay_stun_response_bytes_total";
    pub const PUBLIC_ADDRESS_CHANGES: &str = "homerelay_public_address_changes_total";
    pub const PUBLIC_ADDRESS_FAILURES: &str = "homerelay_public_address_discovery_failures_total";
    pub const PUBLIC_ADDRESS_LAST_SUCCESS: &str =
        "homerelay_public_address_last_success_timestamp_seconds";
    pub const PUBLIC_ADDRESS_KNOWN: &str = "homerelay_public_address_known";
    pub const PUBLIC_ADDRESS_STALE: &str = "homerelay_public_address_stale";
}

use names::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: name, type, HELP text (`promtool check metrics` wants HELP on each).
const METRICS: &[(&str, Type, &str)] = &[
    (
        BUILD_INFO,
        Type::Gauge,
        "Always 1; the version label says which homerelay is running.",
    ),
    (
        POOL_CAPACITY,
        Type::Gauge,
        "Channels that may be in use at once (one shared pool for every kind).",
    ),
    (
        POOL_SLOTS,
        Type::Gauge,
        "Port pairs of the layout: in use + quarantined + free.",
    ),
    (CHANNELS_IN_USE, Type::Gauge, "Channels in use, by kind."),
    (
        POOL_QUARANTINED,
        Type::Gauge,
        "Released port pairs waiting out the reuse quarantine.",
    ),
    (
        POOL_FREE,
        Type::Gauge,
        "Port pairs neither in use nor quarantined.",
    ),
    (
        POOL_EARLY_REUSES,
        Type::Counter,
        "Allocations that took a quarantined port pair early because none was free.",
    ),
    (
        INTERNET_CALLS,
        Type::Gauge,
        "Channels in use that count against the internet-call limit.",
    ),
    (
        INTERNET_CALL_LIMIT,
        Type::Gauge,
        "Simultaneous internet calls the configured upstream bandwidth holds (absent without a limit).",
    ),
    (
        ALLOCATIONS,
        Type::Counter,
        "Allocate requests by result: ok (new channel), existing (repeated request), pool_full, \
         internet_limit, conflict, invalid, datapath_error, shutting_down, error.",
    ),
    (
        RELEASES,
        Type::Counter,
        "Channels released, by reason: requested, idle_timeout, shutdown.",
    ),
    (
        CHANNEL_EVENTS,
        Type::Counter,
        "Events published on the Watch stream, by event (latched and fast_path are found by the \
         periodic data-path diff).",
    ),
    (
        FAST_PATH_UP,
        Type::Gauge,
        "1 if the XDP fast path is loaded and attached, else 0.",
    ),
    (
        FAST_PATH_CONFIGURED,
        Type::Gauge,
        "1 if XDP interfaces are configured (the fast path should be up), else 0.",
    ),
    (
        FAST_PATH_DEGRADED,
        Type::Gauge,
        "1 while the XDP fast path runs but cannot forward some installed channels itself (a \
         destination without a route or a resolved neighbour, an egress it cannot use), so user \
         space carries their packets; else 0. The log names the destinations and why.",
    ),
    (
        PACKETS,
        Type::Counter,
        "Packets by data path and direction: rx = seen by the path (for xdp every packet on the \
         attached interfaces), tx = forwarded by it.",
    ),
    (
        BYTES,
        Type::Counter,
        "UDP payload bytes forwarded, by data path and direction (the fast path keeps bytes per \
         channel only).",
    ),
    (
        DROPPED,
        Type::Counter,
        "Packets dropped, by data path and reason.",
    ),
    (
        XDP_PASSED,
        Type::Counter,
        "Packets the XDP fast path passed up to the kernel stack (and so to user space), by reason.",
    ),
    (
        LATCHED,
        Type::Counter,
        "Endpoints latched from traffic (by the user-space path, which hands them to the fast path).",
    ),
    (
        USERSPACE_BATCHES,
        Type::Counter,
        "recvmmsg calls of the user-space path that returned datagrams (packets rx / batches = mean \
         batch).",
    ),
    (
        GRPC_DURATION,
        Type::Histogram,
        "gRPC request latency until the response headers (the whole call for unary RPCs, the \
         stream set-up for streaming ones), by service, method and status code.",
    ),
    (
        REGISTRATIONS,
        Type::Counter,
        "Registration attempts of remote devices, by transport (tcp, tls, https) and result: ok, or the \
         refusal (auth_failed covers unknown devices and wrong passwords alike; locked_out, \
         weak_password, firmware_too_old, not_allowed_external, bad_request, server_busy).",
    ),
    (
        REGISTERED_DEVICES,
        Type::Gauge,
        "Devices registered now, by device type and origin: internal (from the configured \
         internal networks) or external (from the Internet, through the SBC).",
    ),
    (
        DEVICES,
        Type::Gauge,
        "Devices in the registry (configured, registered or not).",
    ),
    (
        STUN_REQUESTS,
        Type::Counter,
        "Requests to the STUN server, by transport (udp, tcp) and result: answered, error (420 \
         Unknown Attribute), or the reason it was dropped (not_stun, rfc3489, \
         not_binding_request, rate_limited, too_long).",
    ),
    (
        STUN_REQUEST_BYTES,
        Type::Counter,
        "Bytes of STUN messages received (answered or not), by transport.",
    ),
    (
        STUN_RESPONSE_BYTES,
        Type::Counter,
        "Bytes of STUN responses sent, by transport (never more than max(request, 64 bytes) \
         each: compare with homerelay_stun_request_bytes_total).",
    ),
    (
        PUBLIC_ADDRESS_CHANGES,
        Type::Counter,
        "Times the public address learnt with STUN changed from one address to another (a \
         dynamic IP); channels report the new one from then on.",
    ),
    (
        PUBLIC_ADDRESS_FAILURES,
        Type::Counter,
        "STUN servers that gave no usable answer at a public address refresh, by server: itsp \
         (asked first) or configured (the fallback).",
    ),
    (
        PUBLIC_ADDRESS_LAST_SUCCESS,
        Type::Gauge,
        "Unix time of the last STUN answer giving the public address (absent before the first).",
    ),
    (
        PUBLIC_ADDRESS_KNOWN,
        Type::Gauge,
        "1 while a public address is known (discovered, static, or the internet address without \
         discovery), else 0.",
    ),
    (
        PUBLIC_ADDRESS_STALE,
        Type::Gauge,
        "1 while the last public address refresh got no answer from any STUN server (the \
         address handed out is the last one known and may be out of date), else 0.",
    ),
];

/// Transports of [`REGISTRATIONS`]: phones on TCP 4062 and TLS 4063, apps on HTTPS 8802.
pub const REGISTRATION_TRANSPORTS: [&str; 3] = ["tcp", "tls", "https"];
/// Results of [`REGISTRATIONS`]: `ok` and every refusal's name.
pub const REGISTRATION_RESULTS: [&str; 8] = [
    "ok",
    "auth_failed",
    "locked_out",
    "weak_password",
    "firmware_too_old",
    "not_allowed_external",
    "bad_request",
    "server_busy",
];

/// Transports of the STUN server's metrics, in [`StunCounters`] order.
pub const STUN_TRANSPORTS: [&str; 2] = ["udp", "tcp"];

/// The STUN server's counters ([`STUN_REQUESTS`] and the byte counts), registered up front:
/// the server's hot path only adds to pre-registered handles (no key lookup, no allocation).
/// No-ops when metrics are off.
#[derive(Clone, Debug)]
pub struct StunCounters {
    /// By transport, then outcome ([`StunOutcome::index`]).
    requests: [[Counter; StunOutcome::ALL.len()]; 2],
    request_bytes: [Counter; 2],
    response_bytes: [Counter; 2],
}

impl StunCounters {
    /// Counters that count nothing.
    pub fn noop() -> StunCounters {
        StunCounters {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| Counter::noop())),
            request_bytes: std::array::from_fn(|_| Counter::noop()),
            response_bytes: std::array::from_fn(|_| Counter::noop()),
        }
    }

    fn register(r: &Registry) -> StunCounters {
        StunCounters {
            requests: STUN_TRANSPORTS.map(|t| {
                StunOutcome::ALL
                    .map(|o| r.counter(STUN_REQUESTS, &[("transport", t), ("result", o.name())]))
            }),
            request_bytes: STUN_TRANSPORTS
                .map(|t| r.counter(STUN_REQUEST_BYTES, &[("transport", t)])),
            response_bytes: STUN_TRANSPORTS
                .map(|t| r.counter(STUN_RESPONSE_BYTES, &[("transport", t)])),
        }
    }

    /// Adds a batch's totals: requests by outcome, and bytes received and sent.
    pub fn add(&self, transport: StunTransport, tally: &StunTally) {
        let t = match transport {
            StunTransport::Udp => 0,
            StunTransport::Tcp => 1,
        };
        for (counter, &n) in self.requests[t].iter().zip(&tally.requests) {
            if n > 0 {
                counter.increment(n);
            }
        }
        if tally.request_bytes > 0 {
            self.request_bytes[t].increment(tally.request_bytes);
        }
        if tally.response_bytes > 0 {
            self.response_bytes[t].increment(tally.response_bytes);
        }
    }
}

/// What a batch of STUN requests came to, for [`StunCounters::add`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StunTally {
    /// By [`StunOutcome::index`].
    pub requests: [u64; StunOutcome::ALL.len()],
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl StunTally {
    /// Counts one request of `request_len` bytes and what became of it.
    pub fn record(&mut self, outcome: StunOutcome, request_len: usize, response_len: usize) {
        self.requests[outcome.index()] += 1;
        self.request_bytes += request_len as u64;
        self.response_bytes += response_len as u64;
    }
}

/// Histogram buckets of [`GRPC_DURATION`], in seconds: 50 µs to 5 s.
const GRPC_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// How often recorded latencies are folded into the histograms between scrapes (bounds the
/// memory of samples waiting for a scrape that may never come).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The result label of [`ALLOCATIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocResult {
    /// A new channel.
    Ok,
    /// A repeated request: the call leg's existing channel.
    Existing,
    PoolFull,
    InternetLimit,
    /// The call leg holds a channel of another kind.
    Conflict,
    /// A malformed request.
    Invalid,
    /// The data path refused the channel (a port held by another process...).
    DataPathError,
    ShuttingDown,
    /// The state database refused the record (disk full, I/O error).
    StoreError,
    /// Anything else.
    Error,
}

impl AllocResult {
    pub const ALL: [AllocResult; 10] = [
        AllocResult::Ok,
        AllocResult::Existing,
        AllocResult::PoolFull,
        AllocResult::InternetLimit,
        AllocResult::Conflict,
        AllocResult::Invalid,
        AllocResult::DataPathError,
        AllocResult::ShuttingDown,
        AllocResult::StoreError,
        AllocResult::Error,
    ];

    /// The label value.
    pub const fn name(self) -> &'static str {
        match self {
            AllocResult::Ok => "ok",
            AllocResult::Existing => "existing",
            AllocResult::PoolFull => "pool_full",
            AllocResult::InternetLimit => "internet_limit",
            AllocResult::Conflict => "conflict",
            AllocResult::Invalid => "invalid",
            AllocResult::DataPathError => "datapath_error",
            AllocResult::ShuttingDown => "shutting_down",
            AllocResult::StoreError => "store_error",
            AllocResult::Error => "error",
        }
    }

    /// The result of an Allocate call (`Ok((channel, created))`).
    pub fn of(result: &Result<(ChannelView, bool), ServiceError>) -> AllocResult {
        match result {
            Ok((_, true)) => AllocResult::Ok,
            Ok((_, false)) => AllocResult::Existing,
            Err(ServiceError::Alloc(e)) => match e {
                AllocError::PoolFull { .. } => AllocResult::PoolFull,
                AllocError::InternetCallLimit { .. } => AllocResult::InternetLimit,
                AllocError::Conflict { .. } => AllocResult::Conflict,
                AllocError::EmptyCallId
                | AllocError::TooLong { .. }
                | AllocError::Timeout { .. } => AllocResult::Invalid,
                // The last three are restore's errors; Allocate never sees them.
                AllocError::UnknownSlot(_)
                | AllocError::UnknownLeg { .. }
                | AllocError::OutsideLayout(_)
                | AllocError::SlotTaken(_)
                | AllocError::LegTaken { .. } => AllocResult::Error,
            },
            Err(ServiceError::InvalidArgument { .. } | ServiceError::Device(..)) => {
                AllocResult::Invalid
            }
            Err(ServiceError::DataPath(_)) => AllocResult::DataPathError,
            Err(ServiceError::ShuttingDown) => AllocResult::ShuttingDown,
            Err(ServiceError::Store(_)) => AllocResult::StoreError,
            Err(
                ServiceError::Lagged(_)
                | ServiceError::Unauthenticated(_)
                | ServiceError::Internal(_),
            ) => AllocResult::Error,
        }
    }
}

/// The gRPC methods served, as `(path, service label, method label)`; any other path is
/// counted as `unknown` (a client can send any path: it must not become a label).
const GRPC_METHODS: [(&str, &str, &str); 21] = [
    (
        "/relay.v1.ChannelService/Allocate",
        "relay.v1.ChannelService",
        "Allocate",
    ),
    (
        "/relay.v1.ChannelService/Update",
        "relay.v1.ChannelService",
        "Update",
    ),
    (
        "/relay.v1.ChannelService/Release",
        "relay.v1.ChannelService",
        "Release",
    ),
    (
        "/relay.v1.ChannelService/Get",
        "relay.v1.ChannelService",
        "Get",
    ),
    (
        "/relay.v1.ChannelService/List",
        "relay.v1.ChannelService",
        "List",
    ),
    (
        "/relay.v1.ChannelService/Watch",
        "relay.v1.ChannelService",
        "Watch",
    ),
    (
        "/relay.v1.ChannelService/PoolStatus",
        "relay.v1.ChannelService",
        "PoolStatus",
    ),
    (
        "/relay.v1.DeviceService/CreateDevice",
        "relay.v1.DeviceService",
        "CreateDevice",
    ),
    (
        "/relay.v1.DeviceService/UpdateDevice",
        "relay.v1.DeviceService",
        "UpdateDevice",
    ),
    (
        "/relay.v1.DeviceService/DeleteDevice",
        "relay.v1.DeviceService",
        "DeleteDevice",
    ),
    (
        "/relay.v1.DeviceService/GetDevice",
        "relay.v1.DeviceService",
        "GetDevice",
    ),
    (
        "/relay.v1.DeviceService/ListDevices",
        "relay.v1.DeviceService",
        "ListDevices",
    ),
    (
        "/relay.v1.DeviceService/AuthorizeCall",
        "relay.v1.DeviceService",
        "AuthorizeCall",
    ),
    (
        "/relay.v1.DeviceService/WatchDevices",
        "relay.v1.DeviceService",
        "WatchDevices",
    ),
    (
        "/relay.v1.PublicAddressService/GetPublicAddress",
        "relay.v1.PublicAddressService",
        "GetPublicAddress",
    ),
    (
        "/relay.v1.PublicAddressService/WatchPublicAddress",
        "relay.v1.PublicAddressService",
        "WatchPublicAddress",
    ),
    (
        "/grpc.health.v1.Health/Check",
        "grpc.health.v1.Health",
        "Check",
    ),
    (
        "/grpc.health.v1.Health/Watch",
        "grpc.health.v1.Health",
        "Watch",
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
    ("", "unknown", "unknown"),
];

/// Index into [`GRPC_METHODS`] of a request path (the last entry: unknown).
fn method_index(path: &str) -> usize {
    GRPC_METHODS
        .iter()
        .position(|(p, _, _)| *p == path)
        .unwrap_or(GRPC_METHODS.len() - 1)
}

/// Number of gRPC status codes (0..=16).
const GRPC_CODES: usize = 17;

/// The code label: the names grpc-go prints (and other gRPC exporters use).
const fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The status of a gRPC response from its headers: tonic sends handler errors (and the
/// interceptor's refusals) "trailers-only", with `grpc-status` in the headers; a response
/// without one has succeeded so far (a unary reply's `OK` comes in the trailers).
fn response_code(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The metric registry. Cheap to clone; [`Metrics::disabled`] records nothing.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Registry>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    allocations: [Counter; AllocResult::ALL.len()],
    /// By [`ReleaseReason`], in [`ReleaseReason::ALL`] order.
    releases: [Counter; ReleaseReason::ALL.len()],
    /// By [`EventKind`], in [`EventKind::ALL`] order.
    events: [Counter; EventKind::ALL.len()],
    /// Per method of [`GRPC_METHODS`] and code: registered on first use, so only the pairs
    /// seen are exported.
    grpc: [[OnceLock<Histogram>; GRPC_CODES]; GRPC_METHODS.len()],
    stun: StunCounters,
}

impl Registry {
    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|&(k, v)| Label::from_static_parts(k, v))
            .collect();
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.recorder
            .register_counter(&Registry::key(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        self.recorder
            .register_gauge(&Registry::key(name, labels), &METADATA)
    }

    fn histogram(&self, method: usize, code: Code) -> &Histogram {
        let (_, service, method_name) = GRPC_METHODS[method];
        self.grpc[method][code as usize].get_or_init(|| {
            let key = Registry::key(
                GRPC_DURATION,
                &[
                    ("grpc_service", service),
                    ("grpc_method", method_name),
                    ("grpc_code", code_name(code)),
                ],
            );
            self.recorder.register_histogram(&key, &METADATA)
        })
    }
}

impl Metrics {
    /// A new, empty registry with every metric described.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(GRPC_DURATION.to_owned()), &GRPC_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        for &(name, kind, help) in METRICS {
            let (name, help) = (name.into(), help.into());
            match kind {
                Type::Counter => recorder.describe_counter(name, None, help),
                Type::Gauge => recorder.describe_gauge(name, None, help),
                Type::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        let handle = recorder.handle();
        let mut registry = Registry {
            recorder,
            handle,
            allocations: std::array::from_fn(|_| Counter::noop()),
            releases: std::array::from_fn(|_| Counter::noop()),
            events: std::array::from_fn(|_| Counter::noop()),
            grpc: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            stun: StunCounters::noop(),
        };
        // Registered up front, so every series exists (at 0) from the first scrape on: rate()
        // and increase() see the first event.
        registry.allocations =
            AllocResult::ALL.map(|r| registry.counter(ALLOCATIONS, &[("result", r.name())]));
        registry.releases =
            ReleaseReason::ALL.map(|r| registry.counter(RELEASES, &[("reason", r.name())]));
        registry.events =
            EventKind::ALL.map(|e| registry.counter(CHANNEL_EVENTS, &[("event", e.name())]));
        registry.stun = StunCounters::register(&registry);
        for transport in REGISTRATION_TRANSPORTS {
            for result in REGISTRATION_RESULTS {
                let _ = registry.counter(
                    REGISTRATIONS,
                    &[("transport", transport), ("result", result)],
                );
            }
        }
        let _ = registry.counter(PUBLIC_ADDRESS_CHANGES, &[]);
        for role in crate::public_address::ServerRole::ALL {
            let _ = registry.counter(PUBLIC_ADDRESS_FAILURES, &[("server", role.name())]);
        }
        registry
            .gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))])
            .set(1.0);
        Metrics {
            inner: Some(Arc::new(registry)),
        }
    }

    /// A registry that records nothing (metrics switched off).
    pub fn disabled() -> Metrics {
        Metrics::default()
    }

    /// Whether anything is recorded.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The exposition text of every metric (as last refreshed).
    pub fn render(&self) -> String {
        self.inner
            .as_ref()
            .map(|r| r.handle.render())
            .unwrap_or_default()
    }

    /// Counts an Allocate call by its result.
    pub fn allocation(&self, result: &Result<(ChannelView, bool), ServiceError>) {
        if let Some(r) = &self.inner {
            let i = AllocResult::ALL
                .iter()
                .position(|&a| a == AllocResult::of(result))
                .unwrap_or(AllocResult::ALL.len() - 1);
            r.allocations[i].increment(1);
        }
    }

    /// The STUN server's counters (no-ops when metrics are off).
    pub fn stun(&self) -> StunCounters {
        self.inner
            .as_ref()
            .map_or_else(StunCounters::noop, |r| r.stun.clone())
    }

    /// Counts a released channel.
    pub fn released(&self, reason: ReleaseReason) {
        if let Some(r) = &self.inner {
            r.releases[reason as usize].increment(1);
        }
    }

    /// Counts an event of the Watch stream.
    pub fn event(&self, kind: EventKind) {
        if let Some(r) = &self.inner {
            // `ALL` is in declaration order (tested in relay-core).
            r.events[kind as usize].increment(1);
        }
    }

    /// Counts a registration attempt: `result` is `ok` or a refusal's name
    /// ([`REGISTRATION_RESULTS`]).
    pub fn registration(&self, transport: &'static str, result: &'static str) {
        if let Some(r) = &self.inner {
            r.counter(
                REGISTRATIONS,
                &[("transport", transport), ("result", result)],
            )
            .increment(1);
        }
    }

    /// Counts a change of the public address.
    pub fn public_address_changed(&self) {
        if let Some(r) = &self.inner {
            r.counter(PUBLIC_ADDRESS_CHANGES, &[]).increment(1);
        }
    }

    /// Counts a STUN server without a usable answer at a public address refresh (`server`:
    /// `itsp` or `configured`).
    pub fn public_address_failure(&self, server: &'static str) {
        if let Some(r) = &self.inner {
            r.counter(PUBLIC_ADDRESS_FAILURES, &[("server", server)])
                .increment(1);
        }
    }

    /// Records the time of a STUN answer giving the public address.
    pub fn public_address_success(&self, at: std::time::SystemTime) {
        if let Some(r) = &self.inner {
            let secs = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            r.gauge(PUBLIC_ADDRESS_LAST_SUCCESS, &[]).set(secs);
        }
    }

    /// Records one gRPC request.
    fn grpc(&self, method: usize, code: Code, elapsed: Duration) {
        if let Some(r) = &self.inner {
            r.histogram(method, code).record(elapsed.as_secs_f64());
        }
    }

    /// Reads the pool and the data paths' counters into the gauges and counters (done on every
    /// scrape).
    pub async fn refresh(
        &self,
        service: &Service,
        source: Option<&dyn CounterSource>,
        fast_path_configured: bool,
    ) {
        let Some(r) = &self.inner else { return };
        // A stopping service has no pool to report: the scrape shows what it had.
        let Ok(pool) = service.pool().await else {
            return;
        };
        let s = &pool.status;
        r.gauge(POOL_CAPACITY, &[]).set(s.capacity);
        r.gauge(POOL_SLOTS, &[]).set(s.slots);
        for (kind, n) in s.in_use_by_kind.iter() {
            r.gauge(CHANNELS_IN_USE, &[("kind", kind.name())]).set(n);
        }
        r.gauge(POOL_QUARANTINED, &[]).set(s.quarantined);
        r.gauge(POOL_FREE, &[]).set(s.free);
        r.counter(POOL_EARLY_REUSES, &[]).absolute(s.early_reuses);
        r.gauge(INTERNET_CALLS, &[]).set(s.internet_calls);
        if let Some(limit) = s.internet_call_limit {
            r.gauge(INTERNET_CALL_LIMIT, &[]).set(limit);
        }
        let devices = service.devices();
        r.gauge(DEVICES, &[]).set(devices.len() as f64);
        let public = service.public_address().status();
        r.gauge(PUBLIC_ADDRESS_KNOWN, &[])
            .set(u8::from(public.address.is_some()));
        r.gauge(PUBLIC_ADDRESS_STALE, &[])
            .set(u8::from(public.stale));
        let by_type = devices.registered_by_type();
        for (t, counts) in relay_core::device::DeviceType::ALL.iter().zip(by_type) {
            for (origin, n) in ["internal", "external"].into_iter().zip(counts) {
                r.gauge(
                    REGISTERED_DEVICES,
                    &[("type", t.name()), ("origin", origin)],
                )
                .set(n as f64);
            }
        }
        r.gauge(FAST_PATH_CONFIGURED, &[])
            .set(u8::from(fast_path_configured));
        r.gauge(FAST_PATH_UP, &[])
            .set(u8::from(pool.fast_path_unavailable.is_none()));
        r.gauge(FAST_PATH_DEGRADED, &[])
            .set(u8::from(source.is_some_and(|s| s.fast_path_degraded())));
        let Some(source) = source else { return };
        r.userspace(&source.userspace_counters());
        match source.xdp_counters() {
            None => {}
            Some(Ok(counters)) => r.xdp(&counters),
            Some(Err(e)) => log::warn!("metrics: cannot read the fast path's counters: {e:#}"),
        }
    }
}

impl Registry {
    fn userspace(&self, c: &UserspaceCounters) {
        const PATH: (&str, &str) = ("path", "userspace");
        self.counter(PACKETS, &[PATH, ("direction", "rx")])
            .absolute(c.rx_packets);
        self.counter(PACKETS, &[PATH, ("direction", "tx")])
            .absolute(c.forwarded_packets);
        self.counter(BYTES, &[PATH, ("direction", "tx")])
            .absolute(c.forwarded_bytes);
        let rule = DropReason::ALL.map(|d| (d.name(), c.dropped(d)));
        let other = [
            ("no_channel", c.no_channel),
            ("send_error", c.send_errors),
            ("truncated", c.truncated),
            ("rx_error", c.rx_errors),
        ];
        for (reason, n) in rule.into_iter().chain(other) {
            self.counter(DROPPED, &[PATH, ("reason", reason)])
                .absolute(n);
        }
        self.counter(LATCHED, &[]).absolute(c.latched);
        self.counter(USERSPACE_BATCHES, &[]).absolute(c.rx_batches);
    }

    fn xdp(&self, counters: &[(XdpCounter, u64)]) {
        const PATH: (&str, &str) = ("path", "xdp");
        // Every packet the program sees is counted exactly once, in one of these.
        let seen: u64 = counters.iter().map(|&(_, n)| n).sum();
        let forwarded: u64 = counters
            .iter()
            .filter(|(c, _)| c.is_forwarded())
            .map(|&(_, n)| n)
            .sum();
        self.counter(PACKETS, &[PATH, ("direction", "rx")])
            .absolute(seen);
        self.counter(PACKETS, &[PATH, ("direction", "tx")])
            .absolute(forwarded);
        for &(c, n) in counters {
            if c.is_passed() {
                self.counter(XDP_PASSED, &[("reason", c.name())])
                    .absolute(n);
            } else if !c.is_forwarded() {
                self.counter(DROPPED, &[PATH, ("reason", c.name())])
                    .absolute(n);
            }
        }
    }
}

/// Where the data paths' global counters come from. Implemented by [`Relay`].
pub trait CounterSource: Send + Sync {
    /// The user-space path's counters.
    fn userspace_counters(&self) -> UserspaceCounters;
    /// The fast path's counters; `None` when it does not run.
    fn xdp_counters(&self) -> Option<anyhow::Result<Vec<(XdpCounter, u64)>>>;
    /// Whether the fast path runs but cannot forward some installed channels itself (next
    /// hops unresolved): see [`relay_user::xdp::XdpDataPath::unresolved`].
    fn fast_path_degraded(&self) -> bool {
        false
    }
}

impl CounterSource for Relay {
    fn userspace_counters(&self) -> UserspaceCounters {
        self.userspace().counters()
    }

    fn xdp_counters(&self) -> Option<anyhow::Result<Vec<(XdpCounter, u64)>>> {
        self.xdp().map(|x| x.counters())
    }

    fn fast_path_degraded(&self) -> bool {
        self.xdp().is_some_and(|x| !x.unresolved().is_empty()) || self.fast_path_waiting() > 0
    }
}

/// What `/metrics` reads on each scrape.
pub struct Exporter {
    service: Service,
    /// Weak: the daemon drops the last strong reference to stop the relay at shutdown.
    source: Option<Weak<dyn CounterSource>>,
    fast_path_configured: bool,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("fast_path_configured", &self.fast_path_configured)
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Exports `service`'s metrics ([`Service::metrics`]) and the counters of `source`.
    pub fn new(
        service: Service,
        source: Option<Weak<dyn CounterSource>>,
        fast_path_configured: bool,
    ) -> Exporter {
        Exporter {
            service,
            source,
            fast_path_configured,
        }
    }

    /// Refreshes and renders the exposition text.
    pub async fn scrape(&self) -> String {
        let source = self.source.as_ref().and_then(Weak::upgrade);
        let metrics = self.service.metrics();
        metrics
            .refresh(&self.service, source.as_deref(), self.fast_path_configured)
            .await;
        metrics.render()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    exporter: Exporter,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let upkeep = exporter.service.metrics().inner.clone().map(|r| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                r.handle.run_upkeep();
            }
        })
    });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(Arc::new(exporter));
    log::info!("metrics on http://{addr}/metrics");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Some(task) = upkeep {
        task.abort();
    }
    served
}

async fn scrape(State(exporter): State<Arc<Exporter>>) -> impl IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        exporter.scrape().await,
    )
}

/// A tower layer timing every gRPC request by method and status code (see [`GRPC_DURATION`]),
/// including those the authentication interceptor refuses.
#[derive(Clone, Debug)]
pub struct GrpcLayer {
    metrics: Metrics,
}

impl GrpcLayer {
    pub fn new(metrics: Metrics) -> GrpcLayer {
        GrpcLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for GrpcLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`GrpcLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = GrpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timer = self.metrics.is_enabled().then(|| Timer {
            metrics: self.metrics.clone(),
            method: method_index(request.uri().path()),
            start: Instant::now(),
            done: false,
        });
        GrpcFuture {
            inner: self.inner.call(request),
            timer,
        }
    }
}

/// Records a request when its response headers are ready, or as `Canceled` if the client went
/// away first (the future is dropped).
struct Timer {
    metrics: Metrics,
    method: usize,
    start: Instant,
    done: bool,
}

impl Timer {
    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            self.metrics.grpc(self.method, code, self.start.elapsed());
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcMetrics`].
    pub struct GrpcFuture<F> {
        #[pin]
        inner: F,
        timer: Option<Timer>,
    }
}

impl<F, RB, E> Future for GrpcFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let Some(timer) = this.timer {
            timer.finish(match &out {
                Ok(response) => response_code(response.headers()),
                Err(_) => Code::Unknown,
            });
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_proto_has_its_own_label() {
        let proto = include_str!("../../proto/relay/v1/relay.proto");
        let mut service = "";
        let mut rpcs = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(s) = line.strip_prefix("service ") {
                service = s.split([' ', '{']).next().unwrap_or_default();
            } else if let Some(r) = line.strip_prefix("rpc ") {
                rpcs.push((service, r.split(['(', ' ']).next().unwrap_or_default()));
            }
        }
        assert!(rpcs.len() >= 13, "{rpcs:?}");
        for (service, rpc) in rpcs {
            let i = method_index(&format!("/relay.v1.{service}/{rpc}"));
            assert_eq!(
                (GRPC_METHODS[i].1, GRPC_METHODS[i].2),
                (format!("relay.v1.{service}").as_str(), rpc)
            );
        }
        assert_eq!(GRPC_METHODS[method_index("/evil/path-1234")].1, "unknown");
        assert_eq!(GRPC_METHODS[method_index("")].1, "unknown");
    }

    #[test]
    fn codes_come_from_the_headers_and_default_to_ok() {
        let mut h = http::HeaderMap::new();
        assert_eq!(response_code(&h), Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
        assert_eq!(response_code(&h), Code::ResourceExhausted);
        h.insert("grpc-status", http::HeaderValue::from_static("junk"));
        assert_eq!(response_code(&h), Code::Ok);
        for i in 0..GRPC_CODES as i32 {
            assert_eq!(Code::from_i32(i) as i32, i);
        }
        assert_eq!(code_name(Code::Unauthenticated), "Unauthenticated");
    }

    #[test]
    fn allocation_errors_map_to_their_result() {
        let cases: Vec<(ServiceError, &str)> = vec![
            (
                AllocError::PoolFull {
                    in_use: 1,
                    capacity: 1,
                }
                .into(),
                "pool_full",
            ),
            (
                AllocError::InternetCallLimit {
                    limit: 1,
                    per_call_kbps: 80,
                    upstream_kbps: 100,
                }
                .into(),
                "internet_limit",
            ),
            (AllocError::EmptyCallId.into(), "invalid"),
            (ServiceError::invalid("kind", "unset"), "invalid"),
            (relay_user::DataPathError::ShutDown.into(), "datapath_error"),
            (ServiceError::ShuttingDown, "shutting_down"),
        ];
        for (e, name) in cases {
            assert_eq!(AllocResult::of(&Err(e)).name(), name);
        }
    }

    #[test]
    fn every_metric_is_described_once_and_named_by_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for &(name, kind, help) in METRICS {
            assert!(seen.insert(name), "{name} twice");
            assert!(name.starts_with("homerelay_"), "{name}");
            assert_eq!(
                kind == Type::Counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
            assert!(help.ends_with('.') && !help.contains('\n'), "{name}");
        }
        let m = Metrics::new();
        m.released(ReleaseReason::Shutdown);
        let text = m.render();
        assert!(
            text.contains("homerelay_releases_total{reason=\"shutdown\"} 1"),
            "{text}"
        );
        assert!(text.contains("homerelay_allocations_total{result=\"pool_full\"} 0"));
        assert!(Metrics::disabled().render().is_empty());
    }
}
