//! The demo's home phones as remote devices of the relay: each is created in the device
//! registry over `relay.v1.DeviceService` (an OpenStage HFA phone, a strong random password,
//! internet registration allowed), registers through its NAT router with the registration
//! client library ([`crate::register_client`]: TCP 4062, SCRAM-SHA-256) on a socket created
//! inside the HomeBehindNat namespace, stays registered — the library answers the relay's
//! keepalive timing — while the demo runs, and unregisters at its end.
//!
//! Invariant: a phone is registered for as long as its keeper task runs; the task ends only
//! when told to ([`RemotePhones::unregister_all`], which unregisters cleanly) or when the relay
//! ends the registration, and then says why.
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use proto::v1 as pb;
use proto::v1::device_service_client::DeviceServiceClient;
use relay_core::device::password::PasswordPolicy;
use relay_core::device::{DeviceType, MacAddress};
use tokio::net::TcpStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::rpc;
use crate::client::TokenInjector;
use crate::register_client::{self, Credentials, RegisterError, Registered};

/// The DeviceService client the demo uses.
pub type DeviceClient = DeviceServiceClient<InterceptedService<Channel, TokenInjector>>;

/// Internal number of call 1's home phone; call `i` uses this + i - 1.
const FIRST_NUMBER: u32 = 4711;
/// The phones' device type.
const DEVICE_TYPE: DeviceType = DeviceType::OpenStageHfa;
/// The firmware the phones report (above the OpenStage minimum for internet registration).
const FIRMWARE: &str = "V3 R5.10.0";
/// The phones' MACs: this prefix, then the call number.
const MAC_PREFIX: [u8; 5] = [0x00, 0x1a, 0xe8, 0x4d, 0x00];
/// Keepalive interval the phones ask for, seconds (the relay's shortest).
const KEEPALIVE_S: u32 = 15;
/// Longest wait for the TCP connection and for the registration exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a keeper task looks whether it should unregister.
const HOLD_STEP: Duration = Duration::from_millis(200);
/// Length of the generated passwords, and the characters they are drawn from (no look-alikes
/// such as `l`, `1`, `O`, `0`, so a password can be typed into a phone from the log).
const PASSWORD_LEN: usize = 20;
const PASSWORD_CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789-_.:+=#%";

/// One home phone as a device of the relay.
#[derive(Clone, Debug)]
pub struct Device {
    pub number: String,
    mac: [u8; 6],
    password: String,
    /// The phone's own media address (behind the NAT), which it announces when registering.
    media: SocketAddr,
}

impl Device {
    /// Call `call`'s home phone (numbered from 1), with a fresh strong password.
    pub fn new(call: usize, media: SocketAddr) -> anyhow::Result<Device> {
        let offset = u32::try_from(call.saturating_sub(1)).context("too many calls")?;
        let number = (FIRST_NUMBER + offset).to_string();
        let low = u8::try_from(call).context("too many calls")?;
        let mut mac = [0u8; 6];
        mac[..5].copy_from_slice(&MAC_PREFIX);
        mac[5] = low;
        let password = strong_password(&number, mac, &mut rand::rng())?;
        Ok(Device {
            number,
            mac,
            password,
            media,
        })
    }

    /// `aa:bb:cc:dd:ee:ff`.
    pub fn mac(&self) -> String {
        MacAddress(self.mac).to_string()
    }

    fn credentials(&self) -> Credentials {
        Credentials {
            number: self.number.clone(),
            password: self.password.clone(),
            mac: self.mac,
            device_type: DEVICE_TYPE.name().to_owned(),
            firmware: FIRMWARE.to_owned(),
            media: self.media,
            keepalive_s: KEEPALIVE_S,
        }
    }
}

/// A random password the relay's default policy accepts for `number` and `mac`.
fn strong_password(number: &str, mac: [u8; 6], rng: &mut impl rand::Rng) -> anyhow::Result<String> {
    let policy = PasswordPolicy::default();
    // Almost every draw passes; the loop only skips the rare one with a run like `abcd`.
    for _ in 0..100 {
        let password: String = (0..PASSWORD_LEN)
            .map(|_| char::from(PASSWORD_CHARS[rng.random_range(0..PASSWORD_CHARS.len())]))
            .collect();
        if policy
            .check(&password, number, Some(MacAddress(mac)))
            .is_ok()
        {
            return Ok(password);
        }
    }
    bail!("could not draw a strong password for device {number}")
}

/// Creates `device` in the relay's registry: authentication on, internet registration on (the
/// relay refuses that flag without a strong password).
pub async fn create(api: &mut DeviceClient, device: &Device) -> anyhow::Result<pb::Device> {
    let reply = rpc(
        "CreateDevice",
        api.create_device(pb::CreateDeviceRequest {
            device: Some(pb::Device {
                number: device.number.clone(),
                r#type: crate::devices_api::device_type_to_pb(DEVICE_TYPE) as i32,
                mac: device.mac(),
                authentication: true,
                internet_registration: true,
                ..Default::default()
            }),
            password: device.password.clone(),
        }),
    )
    .await?;
    reply
        .device
        .ok_or_else(|| anyhow!("CreateDevice: no device in the reply"))
}

/// The registry's view of `number`: its registration, if any.
pub async fn registration(
    api: &mut DeviceClient,
    number: &str,
) -> anyhow::Result<Option<pb::Registration>> {
    let reply = rpc(
        "GetDevice",
        api.get_device(pb::GetDeviceRequest {
            number: number.to_owned(),
        }),
    )
    .await?;
    Ok(reply.device.and_then(|d| d.registration))
}

/// What one registration looked like from the phone.
#[derive(Clone, Debug)]
pub struct Registration {
    pub number: String,
    /// Where the relay saw the phone: its NAT router's public mapping.
    pub public: SocketAddr,
    /// The keepalive interval the relay granted, seconds.
    pub keepalive_s: u32,
}

/// The registered home phones, each kept registered by a task of the session's runtime.
pub struct RemotePhones {
    /// The HomeBehindNat namespace (`ip netns` name), where the phones' sockets are created.
    home_ns: String,
    /// The relay's registration address (TCP).
    relay: SocketAddr,
    stop: Arc<AtomicBool>,
    keepers: Vec<(String, tokio::task::JoinHandle<Result<(), RegisterError>>)>,
}

impl RemotePhones {
    pub fn new(home_ns: String, relay: SocketAddr) -> RemotePhones {
        RemotePhones {
            home_ns,
            relay,
            stop: Arc::new(AtomicBool::new(false)),
            keepers: Vec::new(),
        }
    }

    /// Registers `device` from the HomeBehindNat namespace and keeps it registered.
    pub async fn register(&mut self, device: &Device) -> anyhow::Result<Registration> {
        let (ns, relay) = (self.home_ns.clone(), self.relay);
        // The socket is created inside the phone's namespace, so the connection goes out
        // through the NAT router like the phone's media; the session's runtime drives it.
        let connected = tokio::task::spawn_blocking(move || {
            relay_user::netns::run_in_named(&ns, move || {
                StdTcpStream::connect_timeout(&relay, CONNECT_TIMEOUT)
            })
        })
        .await
        .context("connecting from the home phone's namespace")?;
        let stream = connected?
            .with_context(|| format!("phone {}: connecting to {relay}", device.number))?;
        stream.set_nonblocking(true)?;
        let stream = TcpStream::from_std(stream)?;
        let phone: Registered<TcpStream> = tokio::time::timeout(
            REGISTER_TIMEOUT,
            register_client::register(stream, &device.credentials()),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "phone {}: no registration answer within {REGISTER_TIMEOUT:?}",
                device.number
            )
        })?
        .with_context(|| format!("phone {}: registration", device.number))?;
        let registration = Registration {
            number: device.number.clone(),
            public: phone.registration.public_addr,
            keepalive_s: phone.registration.keepalive_s,
        };
        let stop = Arc::clone(&self.stop);
        let keeper = tokio::spawn(keep(phone, stop));
        self.keepers.push((device.number.clone(), keeper));
        Ok(registration)
    }

    /// Tells every phone to unregister and waits for each: per phone, its number and how its
    /// registration ended (`Ok`: unregistered cleanly).
    pub async fn unregister_all(self) -> Vec<(String, anyhow::Result<()>)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut ended = Vec::with_capacity(self.keepers.len());
        for (number, keeper) in self.keepers {
            let result = match keeper.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow!(e)),
                Err(e) => Err(anyhow!("its task failed: {e}")),
            };
            ended.push((number, result));
        }
        ended
    }
}

/// Keeps `phone` registered until `stop`, then unregisters it.
async fn keep(
    mut phone: Registered<TcpStream>,
    stop: Arc<AtomicBool>,
) -> Result<(), RegisterError> {
    while !stop.load(Ordering::SeqCst) {
        phone.hold(HOLD_STEP).await?;
    }
    phone.unregister().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn passwords_are_strong_and_differ() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mac = [0x00, 0x1a, 0xe8, 0x4d, 0x00, 0x01];
        let a = strong_password("4711", mac, &mut rng).expect("a password");
        let b = strong_password("4711", mac, &mut rng).expect("a password");
        assert_ne!(a, b);
        for p in [&a, &b] {
            assert_eq!(p.len(), PASSWORD_LEN);
            PasswordPolicy::default()
                .check(p, "4711", Some(MacAddress(mac)))
                .expect("strong");
        }
    }

    #[test]
    fn phones_are_numbered_from_4711_with_their_own_mac() {
        let media: SocketAddr = "203.0.113.10:5004".parse().expect("addr");
        let first = Device::new(1, media).expect("device");
        let third = Device::new(3, media).expect("device");
        assert_eq!(first.number, "4711");
        assert_eq!(third.number, "4713");
        assert_eq!(first.mac(), "00:1a:e8:4d:00:01");
        assert_eq!(third.mac(), "00:1a:e8:4d:00:03");
        let c = third.credentials();
        assert_eq!((c.number.as_str(), c.media), ("4713", media));
        assert_eq!(c.device_type.parse::<DeviceType>().ok(), Some(DEVICE_TYPE));
    }
}
