//! Channels for registered devices, end to end on loopback: a phone registers with the relay's
//! registrar (real TCP, SCRAM-SHA-256), then an Allocate request naming it gets a channel that is
//! an internet call exactly when the phone registered from outside the internal networks; a
//! device that is unknown or not registered gets FAILED_PRECONDITION and no channel. The
//! registration metrics count each attempt by result and the registered devices by origin.
mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{Setup, allocate_request, within};
use control::daemon::DaemonBuilder;
use control::devices::NewDevice;
use control::metrics::Metrics;
use control::register_client::{Credentials, RegisterError, register};
use control::registrar::{self, Registrar};
use control::service::Service;
use proto::v1 as pb;
use relay_core::device::DeviceType;
use relay_core::device::lockout::LockoutPolicy;
use relay_core::register::{Refusal, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";

struct Relay {
    service: Service,
    registrar: std::net::SocketAddr,
    _state: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A daemon (metrics on) whose internal networks are `internal`, with its registrar on loopback.
async fn relay(first: u16, last: u16, internal: &[&str]) -> Relay {
    let state = tempfile::tempdir().expect("state directory");
    let mut config = Setup::new(first, last).config(state.path());
    config.devices.internal_networks = internal.iter().map(|s| (*s).to_owned()).collect();
    let service = DaemonBuilder::new(config)
        .seed(5)
        .metrics(Metrics::new())
        .build()
        .expect("start the daemon")
        .service;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the registrar");
    let addr = listener.local_addr().expect("address");
    let registrar = std::sync::Arc::new(
        Registrar::new(
            service.devices().clone(),
            ServerConfig::default(),
            LockoutPolicy::default(),
        )
        .with_metrics(service.metrics().clone()),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registrar::serve(listener, None, registrar, async move {
        let _ = stopped.await;
    }));
    Relay {
        service,
        registrar: addr,
        _state: state,
        stop: Some(stop),
    }
}

fn phone(number: &str, internet: bool) -> NewDevice {
    NewDevice {
        number: number.into(),
        device_type: Some(DeviceType::OpenStageHfa),
        mac: Some("00:1a:e8:12:34:56".into()),
        authentication: true,
        internet_registration: internet,
        password: Some(STRONG.into()),
        ..NewDevice::default()
    }
}

fn credentials(number: &str, password: &str) -> Credentials {
    Credentials {
        number: number.into(),
        password: password.into(),
        mac: [0, 0x1a, 0xe8, 0x12, 0x34, 0x56],
        device_type: "openstage_hfa".into(),
        firmware: "V3 R5.10.0".into(),
        media: "192.168.178.20:5004".parse().expect("address"),
        keepalive_s: 30,
    }
}

async fn try_register(
    relay: &Relay,
    c: &Credentials,
) -> Result<control::register_client::Registered<TcpStream>, RegisterError> {
    let stream = TcpStream::connect(relay.registrar).await.expect("connect");
    tokio::time::timeout(Duration::from_secs(20), register(stream, c))
        .await
        .expect("an answer within 20 s")
}

fn for_device(call_id: &str, kind: pb::ChannelKind, device: &str) -> pb::AllocateRequest {
    pb::AllocateRequest {
        device: device.into(),
        // Ignored for a device: its registration decides.
        internet: Some(false),
        ..allocate_request(call_id, kind)
    }
}

/// The value of the sample `name{labels}` in `text` (labels comma-separated, in any order).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let mut want: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    want.sort_unstable();
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let mut got: Vec<&str> = rest.split(',').filter(|l| !l.is_empty()).collect();
        got.sort_unstable();
        (n == name && got == want).then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn a_registered_phone_gets_a_channel_that_counts_as_an_internet_call_from_outside() {
    // Loopback is outside the internal networks here: the phone is a remote one.
    let relay = relay(42700, 42709, &["10.0.0.0/8"]).await;
    let devices = relay.service.devices().clone();
    devices.create(phone("4711", true)).expect("create 4711");
    devices.create(phone("4712", true)).expect("create 4712");

    let api = control::api::Api::new(relay.service.clone());
    let allocate = |r: pb::AllocateRequest| {
        let api = &api;
        async move {
            use proto::v1::channel_service_server::ChannelService;
            api.allocate(tonic::Request::new(r)).await
        }
    };

    // Not registered yet, unknown, or not a device's kind of channel: refused, nothing taken.
    let e = allocate(for_device("c1", pb::ChannelKind::SipDevice, "4711"))
        .await
        .expect_err("not registered");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("4711") && e.message().contains("not registered"));
    let e = allocate(for_device("c2", pb::ChannelKind::SipDevice, "999"))
        .await
        .expect_err("unknown device");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = allocate(for_device("c3", pb::ChannelKind::ItspCall, "4711"))
        .await
        .expect_err("an ITSP call is not a device's channel");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        relay.service.pool().await.expect("pool").status.in_use,
        0,
        "a refused request took a channel"
    );

    // A wrong password, then the right one.
    match try_register(&relay, &credentials("4711", "Wrong-Password-123")).await {
        Err(RegisterError::Refused(Refusal::AuthFailed)) => {}
        other => panic!("expected auth_failed, got {other:?}"),
    }
    let _registered = try_register(&relay, &credentials("4711", STRONG))
        .await
        .expect("registered");
    let channel = allocate(for_device("c4", pb::ChannelKind::SipDevice, "4711"))
        .await
        .expect("a channel for the registered phone")
        .into_inner()
        .channel
        .expect("channel");
    assert!(
        channel.internet,
        "a phone registered from outside makes an internet call"
    );
    // The other device is still not registered.
    let e = allocate(for_device("c5", pb::ChannelKind::SipDevice, "4712"))
        .await
        .expect_err("4712 is not registered");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    let metrics = relay.service.metrics();
    metrics.refresh(&relay.service, None, false).await;
    let text = metrics.render();
    let registrations = "homerelay_registrations_total";
    assert_eq!(
        sample(&text, registrations, r#"result="ok",transport="tcp""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            registrations,
            r#"result="auth_failed",transport="tcp""#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, registrations, r#"result="ok",transport="tls""#),
        Some(0.0),
        "every series exists from the start"
    );
    let registered = "homerelay_registered_devices";
    let hfa = |origin: &str| format!(r#"type="openstage_hfa",origin="{origin}""#);
    assert_eq!(
        sample(&text, registered, &hfa("external")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, registered, &hfa("internal")), Some(0.0));
    assert_eq!(
        sample(
            &text,
            registered,
            r#"type="myportal_at_work",origin="external""#
        ),
        Some(0.0),
        "every type's series exists"
    );
    assert_eq!(sample(&text, "homerelay_devices", ""), Some(2.0));
    within(relay.service.shutdown()).await;
}

#[tokio::test]
async fn a_phone_registered_from_inside_makes_an_internal_call() {
    let relay = relay(42710, 42719, &["127.0.0.0/8"]).await;
    let devices = relay.service.devices().clone();
    devices.create(phone("4711", false)).expect("create");
    let _registered = try_register(&relay, &credentials("4711", STRONG))
        .await
        .expect("registered from inside without the internet flag");
    use proto::v1::channel_service_server::ChannelService;
    let api = control::api::Api::new(relay.service.clone());
    let mut request = for_device("c1", pb::ChannelKind::SipDevice, "4711");
    // Asked as an internet call, but the device is inside.
    request.internet = Some(true);
    let channel = api
        .allocate(tonic::Request::new(request))
        .await
        .expect("a channel")
        .into_inner()
        .channel
        .expect("channel");
    assert!(!channel.internet, "a phone inside makes no internet call");
    within(relay.service.shutdown()).await;
}

/// The next device event of `stream` (within the test's bound).
async fn next_event(stream: &mut tonic::Streaming<pb::DeviceEvent>) -> pb::DeviceEvent {
    within(stream.message())
        .await
        .expect("the stream is healthy")
        .expect("an event")
}

#[tokio::test]
async fn registrations_refusals_lockouts_and_refused_calls_go_on_the_device_event_stream() {
    use proto::v1::device_service_client::DeviceServiceClient;
    let server = common::TestServer::start(Setup::new(42720, 42729)).await;
    let registrar_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the registrar");
    let registrar_addr = registrar_listener.local_addr().expect("address");
    let registrar = std::sync::Arc::new(Registrar::new(
        server.service.devices().clone(),
        ServerConfig::default(),
        LockoutPolicy::default(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registrar::serve(
        registrar_listener,
        None,
        registrar,
        async move {
            let _ = stopped.await;
        },
    ));
    server
        .service
        .devices()
        .create(phone("4711", false))
        .expect("create");
    let mut devices = within(DeviceServiceClient::connect(server.url.clone()))
        .await
        .expect("connect");
    let mut all = devices
        .watch_devices(pb::WatchDevicesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    // A watcher of another device sees none of this.
    let mut other = devices
        .watch_devices(pb::WatchDevicesRequest {
            number: "999".into(),
        })
        .await
        .expect("watch 999")
        .into_inner();
    let e = devices
        .watch_devices(pb::WatchDevicesRequest {
            number: "not a number".into(),
        })
        .await
        .expect_err("a bad filter");
    assert_eq!(e.code(), Code::InvalidArgument);

    let register_at = |password: &'static str| async move {
        let stream = TcpStream::connect(registrar_addr).await.expect("connect");
        tokio::time::timeout(
            Duration::from_secs(20),
            register(stream, &credentials("4711", password)),
        )
        .await
        .expect("an answer within 20 s")
    };
    // A wrong password: refused, with the source.
    assert!(register_at("Wrong-Password-123").await.is_err());
    let refused = next_event(&mut all).await;
    assert_eq!(
        refused.r#type,
        pb::DeviceEventType::RegistrationRefused as i32,
        "{refused:?}"
    );
    assert_eq!(
        (refused.number.as_str(), refused.reason.as_str()),
        ("4711", "auth_failed")
    );
    assert_eq!(refused.transport, "tcp");
    assert!(refused.source.starts_with("127.0.0.1:"), "{refused:?}");
    assert!(!refused.external, "loopback is internal by default");
    assert!(refused.at.is_some());

    // Registered, then a refused call, then unregistered when the connection ends.
    let phone_session = register_at(STRONG).await.expect("registered");
    let registered = next_event(&mut all).await;
    assert_eq!(registered.r#type, pb::DeviceEventType::Registered as i32);
    assert_eq!(registered.number, "4711");
    let verdict = devices
        .authorize_call(pb::AuthorizeCallRequest {
            number: "4711".into(),
            target: "0900123456".into(),
            forwarding: false,
        })
        .await
        .expect("authorize")
        .into_inner();
    assert!(!verdict.allowed);
    let call = next_event(&mut all).await;
    assert_eq!(call.r#type, pb::DeviceEventType::CallRefused as i32);
    assert_eq!(call.reason, verdict.reason);
    drop(phone_session);
    let unregistered = next_event(&mut all).await;
    assert_eq!(
        unregistered.r#type,
        pb::DeviceEventType::Unregistered as i32
    );

    // Five wrong passwords in a row lock the device out: refused five times, then locked out.
    for _ in 0..5 {
        assert!(register_at("Wrong-Password-123").await.is_err());
    }
    let mut types = Vec::new();
    for _ in 0..6 {
        types.push(next_event(&mut all).await.r#type);
    }
    assert!(
        types.contains(&(pb::DeviceEventType::LockedOut as i32)),
        "{types:?}"
    );
    assert_eq!(
        types
            .iter()
            .filter(|&&t| t == pb::DeviceEventType::RegistrationRefused as i32)
            .count(),
        5
    );
    match register_at(STRONG).await {
        Err(RegisterError::Refused(Refusal::LockedOut { .. })) => {}
        other => panic!("expected a lockout, got {other:?}"),
    }
    let locked = next_event(&mut all).await;
    assert_eq!(
        (locked.r#type, locked.reason.as_str()),
        (
            pb::DeviceEventType::RegistrationRefused as i32,
            "locked_out"
        )
    );

    // The filtered watcher saw nothing, and ends with the relay.
    let _ = stop.send(());
    server.stop().await;
    assert!(
        within(other.message()).await.expect("clean end").is_none(),
        "the stream of device 999 ends without events"
    );
}
