//! Phone registration over real TCP connections on loopback (the protocol of
//! docs/registration-protocol.md): success; the same refusal for a wrong password and an
//! unknown device; lockout after repeated failures; internal and external sources; the
//! internet flag, minimum firmware and a password that became weak; clean unregistering.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use control::devices::{NewDevice, Registry, RegistryPolicy};
use control::register_client::{Credentials, RegisterError, register};
use control::registrar::{self, Registrar};
use relay_core::device::DeviceType;
use relay_core::device::lockout::LockoutPolicy;
use relay_core::device::networks::Networks;
use relay_core::register::{Refusal, ServerConfig};
use tokio::net::{TcpListener, TcpStream};

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";

fn policy(internal: &[&str]) -> RegistryPolicy {
    RegistryPolicy {
        networks: Networks::parse(internal.iter().copied()).expect("networks"),
        iterations: 4096,
        ..RegistryPolicy::default()
    }
}

struct Relay {
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn relay(registry: Registry) -> Relay {
    let registry = Arc::new(registry);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let registrar = Arc::new(Registrar::new(
        registry.clone(),
        ServerConfig::default(),
        LockoutPolicy::default(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registrar::serve(listener, None, registrar, async move {
        let _ = stopped.await;
    }));
    Relay {
        addr,
        registry,
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

fn credentials(number: &str, password: &str, firmware: &str) -> Credentials {
    Credentials {
        number: number.into(),
        password: password.into(),
        mac: [0, 0x1a, 0xe8, 0x12, 0x34, 0x56],
        device_type: "openstage_hfa".into(),
        firmware: firmware.into(),
        media: "192.168.178.20:5004".parse().expect("address"),
        keepalive_s: 30,
    }
}

async fn try_register(
    relay: &Relay,
    c: &Credentials,
) -> Result<control::register_client::Registered<TcpStream>, RegisterError> {
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    tokio::time::timeout(Duration::from_secs(20), register(stream, c))
        .await
        .expect("an answer within 20 s")
}

fn refusal(r: Result<impl std::fmt::Debug, RegisterError>) -> Refusal {
    match r {
        Err(RegisterError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_phone_registers_keeps_alive_and_unregisters() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry.create(phone("4711", false)).expect("create");
    let relay = relay(registry).await;
    let c = credentials("4711", STRONG, "V3 R0.40.4");
    let mut phone = try_register(&relay, &c).await.expect("registered");
    let local = phone.registration.public_addr;
    assert_eq!(local.ip(), IpAddr::from([127, 0, 0, 1]));
    let live = relay.registry.registration("4711").expect("registered");
    assert_eq!((live.transport, live.public), ("tcp", local));
    assert_eq!(live.local, Some(c.media));
    assert_eq!(live.origin, relay_core::device::networks::Origin::Internal);
    // The registration holds across keepalives (interval granted at least 15 s: hold 1 s).
    phone.hold(Duration::from_secs(1)).await.expect("held");
    phone.unregister().await.expect("unregistered");
    // The relay ends it when the connection ends.
    for _ in 0..100 {
        if relay.registry.registration("4711").is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the registration outlived the connection");
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_device_get_the_same_answer_then_a_lockout() {
    let registry = Registry::in_memory(policy(&["127.0.0.0/8"]));
    registry.create(phone("4711", false)).expect("create");
    let relay = relay(registry).await;
    assert_eq!(
        refusal(
            try_register(
                &relay,
                &credentials("4711", "Wrong-Passw0rd!", "V3 R0.40.4")
            )
            .await
        ),
        Refusal::AuthFailed
    );
    assert_eq!(
        refusal(try_register(&relay, &credentials("9999", STRONG, "V3 R0.40.4")).await),
        Refusal::AuthFailed
    );
    // Four more failures for 4711 (five in all): locked, even with the right password.
    for _ in 0..4 {
        let r = try_register(
            &relay,
            &credentials("4711", "Wrong-Passw0rd!", "V3 R0.40.4"),
        )
        .await;
        assert!(
            matches!(
                r,
                Err(RegisterError::Refused(
                    Refusal::AuthFailed | Refusal::LockedOut { .. }
                ))
            ),
            "{r:?}"
        );
    }
    match refusal(try_register(&relay, &credentials("4711", STRONG, "V3 R0.40.4")).await) {
        Refusal::LockedOut { retry_after_s } => assert!(retry_after_s >= 1),
        other => panic!("expected locked_out, got {other:?}"),
    }
    assert!(relay.registry.registration("4711").is_none());
}

#[tokio::test]
async fn external_sources_need_the_flag_a_strong_password_and_recent_firmware() {
    // No internal networks: loopback counts as the internet.
    let registry = Registry::in_memory(policy(&[]));
    registry.create(phone("100", false)).expect("create");
    registry.create(phone("200", true)).expect("create");
    let relay = relay(registry).await;
    assert_eq!(
        refusal(try_register(&relay, &credentials("100", STRONG, "V3 R0.40.4")).await),
        Refusal::NotAllowedExternal
    );
    assert_eq!(
        refusal(try_register(&relay, &credentials("200", STRONG, "V3 R0.39.9")).await),
        Refusal::FirmwareTooOld
    );
    let phone = try_register(&relay, &credentials("200", STRONG, "V3 R0.40.4"))
        .await
        .expect("registered");
    let live = relay.registry.registration("200").expect("registered");
    assert_eq!(live.origin, relay_core::device::networks::Origin::External);
    phone.unregister().await.expect("unregistered");
}

#[tokio::test]
async fn a_password_that_became_weak_cannot_register_from_outside() {
    let dir = tempfile::tempdir().expect("dir");
    let store = relay_store::Store::open(&dir.path().join("state.db")).expect("store");
    let registry =
        Registry::open(Some(store.devices().expect("devices")), policy(&[])).expect("registry");
    registry.create(phone("300", true)).expect("create");
    drop(registry);
    // The policy tightened: 24 characters now. The stored password was judged under the old
    // one and cannot be judged again (only its verifier is kept): weak until set again.
    let mut stricter = policy(&[]);
    stricter.passwords.min_length = 24;
    let registry =
        Registry::open(Some(store.devices().expect("devices")), stricter).expect("registry");
    assert!(
        !registry
            .get("300")
            .expect("device")
            .weak_password
            .is_empty()
    );
    let relay = relay(registry).await;
    assert_eq!(
        refusal(try_register(&relay, &credentials("300", STRONG, "V3 R0.40.4")).await),
        Refusal::WeakPassword
    );
}
