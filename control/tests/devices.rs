//! The device registry over gRPC: create, change, list, delete; the password and internet
//! registration rules from the field; the SBC's call policy; the registry kept across a
//! restart. Relay ports 42650–42669.
mod common;

use common::{Setup, TestServer};
use proto::v1 as pb;
use proto::v1::device_service_client::DeviceServiceClient;
use tonic::Code;
use tonic::transport::Channel;

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";

async fn client(server: &TestServer) -> DeviceServiceClient<Channel> {
    DeviceServiceClient::connect(server.url.clone())
        .await
        .expect("connect")
}

fn phone(number: &str) -> pb::Device {
    pb::Device {
        number: number.into(),
        r#type: pb::DeviceType::OpenstageHfa as i32,
        mac: "00:1A:E8:12:34:56".into(),
        authentication: true,
        ..Default::default()
    }
}

async fn create(
    c: &mut DeviceServiceClient<Channel>,
    device: pb::Device,
    password: &str,
) -> Result<pb::Device, tonic::Status> {
    c.create_device(pb::CreateDeviceRequest {
        device: Some(device),
        password: password.into(),
    })
    .await
    .map(|r| r.into_inner().device.expect("device"))
}

#[tokio::test]
async fn devices_are_created_changed_listed_and_deleted_with_the_field_rules() {
    let server = TestServer::start(Setup::new(42650, 42659)).await;
    let mut c = client(&server).await;

    // A phone with a strong password, allowed on the internet.
    let mut d = phone("4711");
    d.internet_registration = true;
    let created = create(&mut c, d, STRONG).await.expect("create");
    assert!(created.has_password && created.weak_password.is_empty());
    assert_eq!(created.mac, "00:1a:e8:12:34:56");
    assert!(created.registration.is_none());

    // The number is taken.
    let e = create(&mut c, phone("4711"), STRONG)
        .await
        .expect_err("taken");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Internet registration with a weak password: refused, naming every guideline not met.
    let mut weak = phone("4712");
    weak.internet_registration = true;
    let e = create(&mut c, weak.clone(), "4712aaaa")
        .await
        .expect_err("weak");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for guideline in ["at least 12 characters", "number", "in a row"] {
        assert!(e.message().contains(guideline), "{guideline}: {e:?}");
    }
    // ... and without authentication, whatever the password.
    weak.authentication = false;
    let e = create(&mut c, weak, STRONG).await.expect_err("no auth");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("authentication"), "{e:?}");

    // An internal-only phone may have a weak password; the registry says it is weak.
    let internal = create(&mut c, phone("4712"), "4712aaaa")
        .await
        .expect("create");
    assert!(!internal.weak_password.is_empty());
    // Turning the internet flag on then is refused; setting a strong password with it works.
    let e = c
        .update_device(pb::UpdateDeviceRequest {
            number: "4712".into(),
            internet_registration: Some(true),
            ..Default::default()
        })
        .await
        .expect_err("weak password");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let updated = c
        .update_device(pb::UpdateDeviceRequest {
            number: "4712".into(),
            internet_registration: Some(true),
            password: Some(STRONG.into()),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner()
        .device
        .expect("device");
    assert!(updated.internet_registration && updated.weak_password.is_empty());

    // Bad input: clear errors naming the field.
    for (device, field) in [
        (
            pb::Device {
                number: "47a1".into(),
                ..phone("")
            },
            "number",
        ),
        (
            pb::Device {
                number: "".into(),
                ..phone("")
            },
            "number",
        ),
        (
            pb::Device {
                mac: "not a mac".into(),
                ..phone("4713")
            },
            "mac",
        ),
        (
            pb::Device {
                r#type: 0,
                ..phone("4714")
            },
            "type",
        ),
        (
            pb::Device {
                r#type: pb::DeviceType::MyportalToGoIos as i32,
                ..phone("4715")
            },
            "mac",
        ),
    ] {
        let e = create(&mut c, device, STRONG).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    }

    let list = c
        .list_devices(pb::ListDevicesRequest {})
        .await
        .expect("list")
        .into_inner()
        .devices;
    let numbers: Vec<_> = list.iter().map(|d| d.number.as_str()).collect();
    assert_eq!(numbers, ["4711", "4712"]);

    let deleted = c
        .delete_device(pb::DeleteDeviceRequest {
            number: "4712".into(),
        })
        .await
        .expect("delete");
    assert_eq!(deleted.into_inner().device.expect("device").number, "4712");
    let e = c
        .get_device(pb::GetDeviceRequest {
            number: "4712".into(),
        })
        .await
        .expect_err("deleted");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    server.stop().await;
}

#[tokio::test]
async fn calls_obey_the_class_of_service_and_internet_devices_never_reach_premium_or_abroad() {
    let server = TestServer::start(Setup::new(42660, 42669)).await;
    let mut c = client(&server).await;
    let mut d = phone("200");
    d.class_of_service = Some(pb::ClassOfService {
        reach: pb::Reach::International as i32,
        premium_rate: true,
        forward_external: true,
    });
    create(&mut c, d, STRONG).await.expect("create");
    create(&mut c, phone("201"), STRONG).await.expect("create");
    let ask = |number: &str, target: &str, forwarding: bool| pb::AuthorizeCallRequest {
        number: number.into(),
        target: target.into(),
        forwarding,
    };
    // (device, target, forwarding, allowed, class), with the default dial plan of a PBX: 0
    // seizes a line, then 0 starts a national and 00 an international number; + works without
    // the line prefix; 49 is the own country. Neither device is registered, which counts as
    // outside the internal networks: the strict side.
    let table = [
        ("200", "201", false, true, "internal"),
        ("200", "112", false, true, "emergency"),
        ("200", "030123456", false, true, "local"),
        ("200", "0030123456", false, true, "national"),
        ("200", "+4930123456", false, true, "national"),
        ("200", "00033123456789", false, false, "international"),
        ("200", "+33123456789", false, false, "international"),
        ("200", "009001234567", false, false, "premium-rate"),
        ("200", "+499001234567", true, false, "premium-rate"),
        ("201", "030123456", false, false, "local"),
        ("201", "201", false, true, "internal"),
    ];
    for (number, target, forwarding, allowed, class) in table {
        let r = c
            .authorize_call(ask(number, target, forwarding))
            .await
            .expect("authorize")
            .into_inner();
        assert_eq!(
            (r.allowed, r.target_class.as_str()),
            (allowed, class),
            "{number} -> {target} (forwarding {forwarding}): {r:?}"
        );
        assert!(r.external);
        assert_eq!(r.reason.is_empty(), allowed, "{r:?}");
    }
    let e = c
        .authorize_call(ask("999", "201", false))
        .await
        .expect_err("unknown device");
    assert_eq!(e.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn the_registry_survives_a_restart_and_never_stores_the_password() {
    let state = tempfile::tempdir().expect("state");
    let setup = Setup::new(42670, 42679);
    let config = setup.config(state.path());
    {
        let daemon = control::daemon::DaemonBuilder::new(config.clone())
            .build()
            .expect("daemon");
        let mut d = control::devices::NewDevice {
            number: "4711".into(),
            device_type: Some(relay_core::device::DeviceType::OpenStageHfa),
            authentication: true,
            internet_registration: true,
            password: Some(STRONG.into()),
            ..Default::default()
        };
        daemon.service.devices().create(d.clone()).expect("create");
        d.number = "4712".into();
        d.internet_registration = false;
        d.password = None;
        daemon.service.devices().create(d).expect("create");
        daemon.service.shutdown().await;
    }
    // Nothing on disk holds the password.
    for entry in std::fs::read_dir(state.path()).expect("state dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        assert!(
            !bytes.windows(STRONG.len()).any(|w| w == STRONG.as_bytes()),
            "{} holds the password",
            path.display()
        );
    }
    let daemon = control::daemon::DaemonBuilder::new(config)
        .build()
        .expect("daemon again");
    let list = daemon.service.devices().list();
    assert_eq!(list.len(), 2);
    assert!(list[0].has_password && list[0].internet_registration);
    assert!(!list[1].has_password);
    daemon.service.shutdown().await;
}
