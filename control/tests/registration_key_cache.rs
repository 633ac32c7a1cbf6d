//! A phone's SCRAM key cache over real TCP registrations on loopback: the first registration
//! derives the keys (PBKDF2) and keeps them once the relay's signature verified, the next ones
//! prove the password from the cache and the relay accepts them; a password set again on the
//! relay (new salt) or changed on the phone makes the phone derive again.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::devices::{DeviceChange, NewDevice, Registry, RegistryPolicy};
use control::register_client::{Credentials, KeyCache, RegisterError, Registered, register_cached};
use control::registrar::{self, Registrar};
use relay_core::device::DeviceType;
use relay_core::device::lockout::LockoutPolicy;
use relay_core::register::{Refusal, ServerConfig};
use tokio::net::{TcpListener, TcpStream};

const STRONG: &str = "Tr0mbone-Kiwi-Lagoon";
const STRONGER: &str = "Quokka-Harp-7-Meadow";

async fn relay(registry: Arc<Registry>) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let registrar = Arc::new(Registrar::new(
        registry,
        ServerConfig::default(),
        LockoutPolicy::default(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registrar::serve(listener, None, registrar, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn credentials(password: &str) -> Credentials {
    Credentials {
        number: "4711".into(),
        password: password.into(),
        mac: [0, 0x1a, 0xe8, 0x12, 0x34, 0x56],
        device_type: "openstage_hfa".into(),
        firmware: "V3 R0.40.4".into(),
        media: "192.168.178.20:5004".parse().expect("address"),
        keepalive_s: 30,
    }
}

async fn attempt(
    addr: SocketAddr,
    c: &Credentials,
    cache: &KeyCache,
) -> Result<Registered<TcpStream>, RegisterError> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    tokio::time::timeout(Duration::from_secs(20), register_cached(stream, c, cache))
        .await
        .expect("an answer within 20 s")
}

/// Registers and unregisters; whether the proof came from the cache.
async fn cycle(addr: SocketAddr, c: &Credentials, cache: &KeyCache) -> bool {
    let phone = attempt(addr, c, cache).await.expect("registered");
    let cached = phone.used_cached_keys();
    phone.unregister().await.expect("unregistered");
    cached
}

#[tokio::test]
async fn cached_keys_register_without_pbkdf2_and_follow_password_changes() {
    let registry = Arc::new(Registry::in_memory(RegistryPolicy {
        iterations: 4096,
        ..RegistryPolicy::default()
    }));
    registry
        .create(NewDevice {
            number: "4711".into(),
            device_type: Some(DeviceType::OpenStageHfa),
            authentication: true,
            password: Some(STRONG.into()),
            ..NewDevice::default()
        })
        .expect("create");
    let (addr, _stop) = relay(registry.clone()).await;
    let c = credentials(STRONG);
    let cache = KeyCache::default();
    assert!(!cache.is_warm_for(&c));

    // First: derived from the password, then kept; the next ones come from the cache.
    assert!(!cycle(addr, &c, &cache).await);
    assert!(cache.is_warm_for(&c));
    assert!(cycle(addr, &c, &cache).await);
    assert!(cycle(addr, &c, &cache).await);
    // Another phone sharing nothing derives its own.
    assert!(!cycle(addr, &c, &KeyCache::default()).await);

    // The same password set again on the relay: a new salt, so the cached keys do not apply.
    registry
        .update(
            "4711",
            DeviceChange {
                password: Some(Some(STRONG.into())),
                ..DeviceChange::default()
            },
        )
        .expect("update");
    assert!(!cycle(addr, &c, &cache).await);
    assert!(cycle(addr, &c, &cache).await);

    // A new password on both sides: the cache belongs to the old one and is not used.
    registry
        .update(
            "4711",
            DeviceChange {
                password: Some(Some(STRONGER.into())),
                ..DeviceChange::default()
            },
        )
        .expect("update");
    let new = credentials(STRONGER);
    assert!(!cache.is_warm_for(&new));
    assert!(!cycle(addr, &new, &cache).await);
    assert!(cache.is_warm_for(&new) && !cache.is_warm_for(&c));

    // A phone still holding the old password is refused, whatever it cached.
    match attempt(addr, &c, &cache).await {
        Err(RegisterError::Refused(Refusal::AuthFailed)) => {}
        other => panic!("expected auth_failed, got {other:?}"),
    }
}
