//! The device registry: remote devices as the API manages them, persisted in the state
//! database (`relay_store::DeviceStore`), with their live registrations in memory, and the
//! SBC's call policy over them.
//!
//! Invariant: a password is never kept — only its SCRAM-SHA-256 verifier and what the
//! password policy said about it when it was set (the guidelines it did not meet, and a
//! fingerprint of the policy that judged it). A password judged under another policy than
//! the current one counts as weak until it is set again: a tightened policy can only lock
//! devices out of the internet, never let a weak password through.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use relay_core::device::cos::{CallPolicy, CallRefusal, ClassOfService, NumberClass, Reach};
use relay_core::device::firmware::FirmwarePolicy;
use relay_core::device::networks::{Networks, Origin};
use relay_core::device::password::PasswordPolicy;
use relay_core::device::registration::RegistrationRefusal;
use relay_core::device::scram::{ScramServer, ScramVerifier};
use relay_core::device::{DeviceType, MacAddress};
use relay_store::{DeviceRow, DeviceStore};
use serde::{Deserialize, Serialize};

/// Version of [`DeviceRecord`]'s JSON.
pub const RECORD_VERSION: u32 = 1;

/// Longest internal number.
pub const MAX_NUMBER_LEN: usize = 32;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("device {0} already exists")]
    Exists(String),
    #[error("no device {0}")]
    NotFound(String),
    #[error("internet registration refused: {0}")]
    Refused(#[from] RegistrationRefusal),
    #[error("device registry: {0}")]
    Store(#[from] relay_store::StoreError),
    #[error("device {number}: unreadable record: {reason}")]
    Corrupt { number: String, reason: String },
}

impl DeviceError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> DeviceError {
        DeviceError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// A class of service as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCos {
    pub reach: StoredReach,
    pub premium_rate: bool,
    pub forward_external: bool,
}

/// [`Reach`] by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredReach {
    InternalOnly,
    Local,
    National,
    International,
}

impl From<ClassOfService> for StoredCos {
    fn from(c: ClassOfService) -> StoredCos {
        StoredCos {
            reach: match c.reach {
                Reach::InternalOnly => StoredReach::InternalOnly,
                Reach::Local => StoredReach::Local,
                Reach::National => StoredReach::National,
                Reach::International => StoredReach::International,
            },
            premium_rate: c.premium_rate,
            forward_external: c.forward_external,
        }
    }
}

impl From<StoredCos> for ClassOfService {
    fn from(c: StoredCos) -> ClassOfService {
        ClassOfService {
            reach: match c.reach {
                StoredReach::InternalOnly => Reach::InternalOnly,
                StoredReach::Local => Reach::Local,
                StoredReach::National => Reach::National,
                StoredReach::International => Reach::International,
            },
            premium_rate: c.premium_rate,
            forward_external: c.forward_external,
        }
    }
}

/// One device as stored (versioned JSON; never the password).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub version: u32,
    pub number: String,
    /// [`DeviceType::name`].
    pub device_type: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
    pub authentication: bool,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (RFC 5803).
    pub verifier: Option<String>,
    /// Guidelines the password did not meet when it was set.
    pub weak_password: Vec<String>,
    /// [`RegistryPolicy::password_fingerprint`] of the policy that judged the password.
    pub password_policy: String,
    pub internet_registration: bool,
    pub class_of_service: StoredCos,
    pub codecs: Vec<String>,
    pub created_unix_ms: u64,
}

/// A device as the API sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceView {
    pub number: String,
    pub device_type: DeviceType,
    pub mac: Option<MacAddress>,
    pub authentication: bool,
    pub internet_registration: bool,
    pub class_of_service: ClassOfService,
    pub codecs: Vec<String>,
    pub has_password: bool,
    /// Guidelines the stored password does not meet under the current policy (empty: strong).
    pub weak_password: Vec<String>,
    pub registration: Option<LiveRegistration>,
}

/// A live registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRegistration {
    /// `tcp`, `tls` or `https`.
    pub transport: &'static str,
    /// The source the relay saw (a home router's public mapping).
    pub public: SocketAddr,
    /// The media address the device announced.
    pub local: Option<SocketAddr>,
    pub firmware: String,
    pub origin: Origin,
    pub registered_at: SystemTime,
    pub expires_at: SystemTime,
    /// Tells one registration of a device from the next (a reconnect replaces it).
    pub id: u64,
}

/// What a device is created with.
#[derive(Clone, Debug, Default)]
pub struct NewDevice {
    pub number: String,
    pub device_type: Option<DeviceType>,
    pub mac: Option<String>,
    pub authentication: bool,
    pub internet_registration: bool,
    pub class_of_service: Option<ClassOfService>,
    pub codecs: Vec<String>,
    pub password: Option<String>,
}

/// A change to a device; `None` keeps the value.
#[derive(Clone, Debug, Default)]
pub struct DeviceChange {
    pub device_type: Option<DeviceType>,
    /// `Some(None)` removes the MAC.
    pub mac: Option<Option<String>>,
    pub authentication: Option<bool>,
    pub internet_registration: Option<bool>,
    pub class_of_service: Option<ClassOfService>,
    pub codecs: Option<Vec<String>>,
    /// `Some(None)` removes the password.
    pub password: Option<Option<String>>,
}

/// The rules the registry applies.
#[derive(Clone, Debug)]
pub struct RegistryPolicy {
    pub passwords: PasswordPolicy,
    pub firmware: FirmwarePolicy,
    pub networks: Networks,
    pub calls: CallPolicy,
    /// PBKDF2 iterations of new verifiers.
    pub iterations: u32,
}

impl Default for RegistryPolicy {
    fn default() -> Self {
        RegistryPolicy {
            passwords: PasswordPolicy::default(),
            firmware: FirmwarePolicy::default(),
            networks: default_internal_networks(),
            calls: CallPolicy::default(),
            iterations: relay_core::device::scram::DEFAULT_ITERATIONS,
        }
    }
}

/// Loopback and the private ranges (RFC 1918, RFC 4193).
pub fn default_internal_networks() -> Networks {
    Networks::parse(DEFAULT_INTERNAL_NETWORKS.iter().copied()).unwrap_or_else(|_| Networks::new([]))
}

/// [`default_internal_networks`] as text.
pub const DEFAULT_INTERNAL_NETWORKS: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
];

impl RegistryPolicy {
    /// A fingerprint of the password policy: a password judged under another one counts as
    /// weak until it is set again.
    pub fn password_fingerprint(&self) -> String {
        format!("{:?}", self.passwords)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Validates an internal number: 1 to [`MAX_NUMBER_LEN`] ASCII digits.
pub fn check_number(number: &str) -> Result<(), DeviceError> {
    if number.is_empty() || number.len() > MAX_NUMBER_LEN {
        return Err(DeviceError::invalid(
            "number",
            format!("must be 1 to {MAX_NUMBER_LEN} digits"),
        ));
    }
    if !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DeviceError::invalid(
            "number",
            format!("{number:?} is not a number (digits only)"),
        ));
    }
    Ok(())
}

struct Inner {
    store: Option<DeviceStore>,
    devices: BTreeMap<String, DeviceRecord>,
    registrations: HashMap<String, LiveRegistration>,
    next_registration: u64,
}

/// The device registry (see the module docs). Cheap to share behind an `Arc`.
pub struct Registry {
    inner: Mutex<Inner>,
    policy: RegistryPolicy,
    events: crate::device_events::DeviceEvents,
    /// Keys the fake SCRAM answers for unknown devices (stable for this run).
    pepper: [u8; 32],
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Loads every device from `store` (`None`: a registry in memory only).
    pub fn open(
        store: Option<DeviceStore>,
        policy: RegistryPolicy,
    ) -> Result<Registry, DeviceError> {
        let mut devices = BTreeMap::new();
        if let Some(s) = &store {
            for DeviceRow { number, record } in s.list()? {
                let r: DeviceRecord =
                    serde_json::from_str(&record).map_err(|e| DeviceError::Corrupt {
                        number: number.clone(),
                        reason: e.to_string(),
                    })?;
                if r.version > RECORD_VERSION {
                    return Err(DeviceError::Corrupt {
                        number,
                        reason: format!(
                            "record version {} is newer than this build reads ({RECORD_VERSION})",
                            r.version
                        ),
                    });
                }
                devices.insert(number, r);
            }
        }
        let mut pepper = [0u8; 32];
        rand::fill(&mut pepper);
        Ok(Registry {
            inner: Mutex::new(Inner {
                store,
                devices,
                registrations: HashMap::new(),
                next_registration: 1,
            }),
            policy,
            events: crate::device_events::DeviceEvents::default(),
            pepper,
        })
    }

    /// A registry in memory only (nothing survives a restart).
    pub fn in_memory(policy: RegistryPolicy) -> Registry {
        let mut pepper = [0u8; 32];
        rand::fill(&mut pepper);
        Registry {
            inner: Mutex::new(Inner {
                store: None,
                devices: BTreeMap::new(),
                registrations: HashMap::new(),
                next_registration: 1,
            }),
            policy,
            events: crate::device_events::DeviceEvents::default(),
            pepper,
        }
    }

    /// The rules in force.
    pub fn policy(&self) -> &RegistryPolicy {
        &self.policy
    }

    /// The device event bus (registrations, refusals, lockouts, refused calls).
    pub fn events(&self) -> &crate::device_events::DeviceEvents {
        &self.events
    }

    fn publish(
        &self,
        kind: crate::device_events::DeviceEventKind,
        number: &str,
        transport: &'static str,
        source: Option<SocketAddr>,
        reason: &str,
    ) {
        let external =
            source.is_some_and(|s| self.policy.networks.classify(s.ip()) == Origin::External);
        self.events.publish(crate::device_events::DeviceEvent {
            kind,
            number: number.to_owned(),
            transport,
            source,
            external,
            reason: reason.to_owned(),
            at: SystemTime::now(),
        });
    }

    /// Publishes a refused registration of `number` from `source` over `transport`: `reason`
    /// is the refusal's name (`locked_out` included).
    pub fn registration_refused(
        &self,
        number: &str,
        transport: &'static str,
        source: SocketAddr,
        reason: &str,
    ) {
        use crate::device_events::DeviceEventKind;
        self.publish(
            DeviceEventKind::RegistrationRefused,
            number,
            transport,
            Some(source),
            reason,
        );
    }

    /// Publishes that repeated failures locked `number` or `source` out (`reason`: which).
    pub fn locked_out(
        &self,
        number: &str,
        transport: &'static str,
        source: SocketAddr,
        reason: &str,
    ) {
        use crate::device_events::DeviceEventKind;
        self.publish(
            DeviceEventKind::LockedOut,
            number,
            transport,
            Some(source),
            reason,
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a device.
    pub fn create(&self, new: NewDevice) -> Result<DeviceView, DeviceError> {
        check_number(&new.number)?;
        let device_type = new
            .device_type
            .ok_or_else(|| DeviceError::invalid("type", "required"))?;
        let mut record = DeviceRecord {
            version: RECORD_VERSION,
            number: new.number.clone(),
            device_type: device_type.name().to_owned(),
            mac: None,
            authentication: new.authentication,
            verifier: None,
            weak_password: Vec::new(),
            password_policy: String::new(),
            internet_registration: new.internet_registration,
            class_of_service: new
                .class_of_service
                .unwrap_or(ClassOfService::INTERNAL_ONLY)
                .into(),
            codecs: check_codecs(new.codecs)?,
            created_unix_ms: unix_ms(SystemTime::now()),
        };
        record.mac = parse_mac(new.mac.as_deref(), device_type)?;
        if let Some(p) = new.password.as_deref().filter(|p| !p.is_empty()) {
            self.set_password(&mut record, p)?;
        }
        self.check_internet(&record)?;
        let mut inner = self.lock();
        if inner.devices.contains_key(&record.number) {
            return Err(DeviceError::Exists(record.number));
        }
        if let Some(store) = inner.store.as_mut()
            && !store.insert(&row(&record))?
        {
            return Err(DeviceError::Exists(record.number));
        }
        let view = self.view(&record, None);
        inner.devices.insert(record.number.clone(), record);
        Ok(view)
    }

    /// Changes a device.
    pub fn update(&self, number: &str, change: DeviceChange) -> Result<DeviceView, DeviceError> {
        let mut record = self
            .lock()
            .devices
            .get(number)
            .cloned()
            .ok_or_else(|| DeviceError::NotFound(number.to_owned()))?;
        if let Some(t) = change.device_type {
            record.device_type = t.name().to_owned();
        }
        let device_type = self.device_type(&record)?;
        let mac_changed = change.mac.is_some();
        if let Some(mac) = change.mac {
            record.mac = parse_mac(mac.as_deref(), device_type)?;
        }
        if let Some(a) = change.authentication {
            record.authentication = a;
        }
        if let Some(i) = change.internet_registration {
            record.internet_registration = i;
        }
        if let Some(c) = change.class_of_service {
            record.class_of_service = c.into();
        }
        if let Some(c) = change.codecs {
            record.codecs = check_codecs(c)?;
        }
        match change.password {
            Some(Some(p)) if !p.is_empty() => self.set_password(&mut record, &p)?,
            Some(_) => {
                record.verifier = None;
                record.weak_password = Vec::new();
            }
            // A new MAC may be in the old password, which cannot be checked any more.
            None if mac_changed && record.verifier.is_some() => {
                record.password_policy = String::from("mac changed");
            }
            None => {}
        }
        self.check_internet(&record)?;
        let mut inner = self.lock();
        if !inner.devices.contains_key(number) {
            return Err(DeviceError::NotFound(number.to_owned()));
        }
        if let Some(store) = inner.store.as_mut()
            && !store.update(&row(&record))?
        {
            return Err(DeviceError::NotFound(number.to_owned()));
        }
        let view = self.view(&record, inner.registrations.get(number));
        inner.devices.insert(number.to_owned(), record);
        Ok(view)
    }

    /// Deletes a device and ends its registration.
    pub fn delete(&self, number: &str) -> Result<DeviceView, DeviceError> {
        let mut inner = self.lock();
        let Some(record) = inner.devices.get(number).cloned() else {
            return Err(DeviceError::NotFound(number.to_owned()));
        };
        if let Some(store) = inner.store.as_mut() {
            store.delete(number)?;
        }
        inner.devices.remove(number);
        let registration = inner.registrations.remove(number);
        let view = self.view(&record, registration.as_ref());
        drop(inner);
        if let Some(r) = registration {
            self.publish(
                crate::device_events::DeviceEventKind::Unregistered,
                number,
                r.transport,
                Some(r.public),
                "device deleted",
            );
        }
        Ok(view)
    }

    /// One device.
    pub fn get(&self, number: &str) -> Result<DeviceView, DeviceError> {
        let inner = self.lock();
        let record = inner
            .devices
            .get(number)
            .ok_or_else(|| DeviceError::NotFound(number.to_owned()))?;
        Ok(self.view(record, inner.registrations.get(number)))
    }

    /// Every device, by number.
    pub fn list(&self) -> Vec<DeviceView> {
        let inner = self.lock();
        inner
            .devices
            .values()
            .map(|r| self.view(r, inner.registrations.get(&r.number)))
            .collect()
    }

    /// Whether `number` may call `target` (or forward to it), and what the target is.
    pub fn authorize_call(
        &self,
        number: &str,
        target: &str,
        forwarding: bool,
    ) -> Result<(Origin, Result<NumberClass, CallRefusal>), DeviceError> {
        let inner = self.lock();
        let record = inner
            .devices
            .get(number)
            .ok_or_else(|| DeviceError::NotFound(number.to_owned()))?;
        // Not registered counts as outside: the strict side.
        let origin = inner
            .registrations
            .get(number)
            .map_or(Origin::External, |r| r.origin);
        let cos = ClassOfService::from(record.class_of_service);
        let transport = inner.registrations.get(number).map_or("", |r| r.transport);
        let source = inner.registrations.get(number).map(|r| r.public);
        drop(inner);
        let decision = self
            .policy
            .calls
            .authorize_call(cos, origin, target, forwarding);
        if let Err(refusal) = &decision {
            self.events.publish(crate::device_events::DeviceEvent {
                kind: crate::device_events::DeviceEventKind::CallRefused,
                number: number.to_owned(),
                transport,
                source,
                external: origin == Origin::External,
                reason: refusal.to_string(),
                at: SystemTime::now(),
            });
        }
        Ok((origin, decision))
    }

    /// The SCRAM server for a registration of `number`: the device's verifier, or — for an
    /// unknown device, one without a password or with authentication off — a stand-in that
    /// fails exactly like a wrong password (the same answer for both).
    pub fn scram_server(&self, number: &str) -> ScramServer {
        let verifier = self
            .lock()
            .devices
            .get(number)
            .filter(|r| r.authentication)
            .and_then(|r| r.verifier.as_deref())
            .and_then(|v| v.parse::<ScramVerifier>().ok());
        match verifier {
            Some(v) => ScramServer::new(v),
            None => ScramServer::for_unknown_user_with_iterations(
                number,
                &self.pepper,
                self.policy.iterations,
            ),
        }
    }

    /// Whether `number`, authenticated, may register from `source` with `firmware`; its
    /// origin.
    pub fn may_register(
        &self,
        number: &str,
        source: IpAddr,
        firmware: &str,
    ) -> Result<Origin, RegistrationRefusal> {
        let origin = self.policy.networks.classify(source);
        let inner = self.lock();
        let Some(record) = inner.devices.get(number) else {
            // Authenticated means known: it was deleted meanwhile.
            return Err(RegistrationRefusal::UnknownDevice);
        };
        if origin == Origin::Internal {
            return Ok(origin);
        }
        if !record.internet_registration {
            return Err(RegistrationRefusal::InternetRegistrationOff);
        }
        self.check_internet(record)?;
        let device_type = self
            .device_type(record)
            .map_err(|_| RegistrationRefusal::InternetRegistrationOff)?;
        if self.policy.firmware.minimum(device_type).is_some() {
            if firmware.is_empty() {
                return Err(RegistrationRefusal::FirmwareUnknown(device_type));
            }
            self.policy.firmware.check(device_type, firmware)?;
        }
        Ok(origin)
    }

    /// Records a registration of `number` (replacing the previous one); its id.
    pub fn register(&self, number: &str, mut registration: LiveRegistration) -> u64 {
        let mut inner = self.lock();
        registration.id = inner.next_registration;
        inner.next_registration += 1;
        let id = registration.id;
        let (transport, source) = (registration.transport, registration.public);
        inner.registrations.insert(number.to_owned(), registration);
        drop(inner);
        self.publish(
            crate::device_events::DeviceEventKind::Registered,
            number,
            transport,
            Some(source),
            "",
        );
        id
    }

    /// Extends a registration to `expires_at`; false if `id` is no longer current.
    pub fn keepalive(&self, number: &str, id: u64, expires_at: SystemTime) -> bool {
        let mut inner = self.lock();
        match inner.registrations.get_mut(number) {
            Some(r) if r.id == id => {
                r.expires_at = expires_at;
                true
            }
            _ => false,
        }
    }

    /// Ends registration `id` of `number` (a newer one is left alone); whether it ended.
    pub fn unregister(&self, number: &str, id: u64) -> bool {
        let mut inner = self.lock();
        if inner.registrations.get(number).is_some_and(|r| r.id == id) {
            let ended = inner.registrations.remove(number);
            drop(inner);
            if let Some(r) = ended {
                self.publish(
                    crate::device_events::DeviceEventKind::Unregistered,
                    number,
                    r.transport,
                    Some(r.public),
                    "",
                );
            }
            true
        } else {
            false
        }
    }

    /// How many devices the registry holds.
    pub fn len(&self) -> usize {
        self.lock().devices.len()
    }

    /// Whether the registry holds no device.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live registrations by origin: (internal, external).
    pub fn registered_by_origin(&self) -> (usize, usize) {
        let inner = self.lock();
        let external = inner
            .registrations
            .values()
            .filter(|r| r.origin == Origin::External)
            .count();
        (inner.registrations.len() - external, external)
    }

    /// Live registrations by device type and origin: `[type][0]` internal, `[type][1]`
    /// external, types in [`DeviceType::ALL`] order.
    pub fn registered_by_type(&self) -> [[usize; 2]; DeviceType::ALL.len()] {
        let inner = self.lock();
        let mut counts = [[0; 2]; DeviceType::ALL.len()];
        for (number, r) in &inner.registrations {
            let Some(record) = inner.devices.get(number) else {
                continue;
            };
            let Ok(t) = self.device_type(record) else {
                continue;
            };
            if let Some(i) = DeviceType::ALL.iter().position(|&d| d == t) {
                counts[i][usize::from(r.origin == Origin::External)] += 1;
            }
        }
        counts
    }

    /// The live registration of `number`.
    pub fn registration(&self, number: &str) -> Option<LiveRegistration> {
        self.lock().registrations.get(number).cloned()
    }

    fn device_type(&self, record: &DeviceRecord) -> Result<DeviceType, DeviceError> {
        record
            .device_type
            .parse()
            .map_err(|_| DeviceError::Corrupt {
                number: record.number.clone(),
                reason: format!("unknown device type {:?}", record.device_type),
            })
    }

    fn set_password(&self, record: &mut DeviceRecord, password: &str) -> Result<(), DeviceError> {
        let mac = record.mac.as_deref().and_then(|m| m.parse().ok());
        record.weak_password = match self.policy.passwords.check(password, &record.number, mac) {
            Ok(()) => Vec::new(),
            Err(weak) => weak.unmet.iter().map(ToString::to_string).collect(),
        };
        let verifier = ScramVerifier::generate(password, self.policy.iterations, &mut rand::rng())
            .map_err(|e| DeviceError::invalid("password", e.to_string()))?;
        record.verifier = Some(verifier.to_string());
        record.password_policy = self.policy.password_fingerprint();
        Ok(())
    }

    /// The guidelines the stored password does not meet now.
    fn weak(&self, record: &DeviceRecord) -> Vec<String> {
        if record.verifier.is_some() && record.password_policy != self.policy.password_fingerprint()
        {
            let mut w = record.weak_password.clone();
            w.push(
                "judged under another password policy or before the MAC changed: set it again"
                    .to_owned(),
            );
            return w;
        }
        record.weak_password.clone()
    }

    /// Internet registration needs authentication and a strong password.
    fn check_internet(&self, record: &DeviceRecord) -> Result<(), RegistrationRefusal> {
        if !record.internet_registration {
            return Ok(());
        }
        if !record.authentication {
            return Err(RegistrationRefusal::AuthenticationOff);
        }
        if record.verifier.is_none() {
            return Err(RegistrationRefusal::NoPassword);
        }
        let weak = self.weak(record);
        if weak.is_empty() {
            Ok(())
        } else {
            Err(RegistrationRefusal::WeakPasswordStored(weak.join("; ")))
        }
    }

    fn view(&self, r: &DeviceRecord, registration: Option<&LiveRegistration>) -> DeviceView {
        DeviceView {
            number: r.number.clone(),
            device_type: r.device_type.parse().unwrap_or(DeviceType::SipDevice),
            mac: r.mac.as_deref().and_then(|m| m.parse().ok()),
            authentication: r.authentication,
            internet_registration: r.internet_registration,
            class_of_service: r.class_of_service.into(),
            codecs: r.codecs.clone(),
            has_password: r.verifier.is_some(),
            weak_password: if r.verifier.is_some() {
                self.weak(r)
            } else {
                Vec::new()
            },
            registration: registration.cloned(),
        }
    }
}

fn row(r: &DeviceRecord) -> DeviceRow {
    DeviceRow {
        number: r.number.clone(),
        // A struct of plain fields always serialises.
        record: serde_json::to_string(r).unwrap_or_default(),
    }
}

fn parse_mac(mac: Option<&str>, device_type: DeviceType) -> Result<Option<String>, DeviceError> {
    match mac.filter(|m| !m.is_empty()) {
        None => Ok(None),
        Some(_) if !device_type.has_mac() => Err(DeviceError::invalid(
            "mac",
            format!("a {} has no MAC address", device_type.display_name()),
        )),
        Some(m) => m
            .parse::<MacAddress>()
            .map(|m| Some(m.to_string()))
            .map_err(|e| DeviceError::invalid("mac", e.to_string())),
    }
}

/// Codec names: 1 to 32 of `A-Z a-z 0-9 - . _ /`, at most 32 of them, kept in order.
fn check_codecs(codecs: Vec<String>) -> Result<Vec<String>, DeviceError> {
    if codecs.len() > 32 {
        return Err(DeviceError::invalid("codecs", "at most 32"));
    }
    for c in &codecs {
        let ok = !c.is_empty()
            && c.len() <= 32
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b));
        if !ok {
            return Err(DeviceError::invalid(
                "codecs",
                format!("{c:?} is not a codec name"),
            ));
        }
    }
    Ok(codecs)
}
