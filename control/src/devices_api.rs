//! `relay.v1.DeviceService`: the device registry and the SBC's call policy over gRPC, with
//! the wire conversions in one place and one mapping from registry errors to status codes.
use std::sync::Arc;
use std::time::SystemTime;

use proto::v1 as pb;
use relay_core::device::DeviceType;
use relay_core::device::cos::{ClassOfService, Reach};
use relay_core::device::networks::Origin;
use tonic::{Code, Request, Response, Status};

use crate::devices::{DeviceChange, DeviceError, DeviceView, NewDevice, Registry};

/// The service's handlers.
#[derive(Clone)]
pub struct DevicesApi {
    registry: Arc<Registry>,
    /// Ends the event streams when the relay shuts down.
    service: Option<crate::service::Service>,
}

impl std::fmt::Debug for DevicesApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicesApi").finish_non_exhaustive()
    }
}

/// Device events buffered between the bus and a client's HTTP/2 stream.
const WATCH_STREAM_BUFFER: usize = 256;

impl DevicesApi {
    /// Handlers over `registry`; event streams end only when their client goes away.
    pub fn new(registry: Arc<Registry>) -> DevicesApi {
        DevicesApi {
            registry,
            service: None,
        }
    }

    /// Handlers over `service`'s registry; event streams end when it shuts down.
    pub fn for_service(service: &crate::service::Service) -> DevicesApi {
        DevicesApi {
            registry: service.devices().clone(),
            service: Some(service.clone()),
        }
    }
}

/// A device event as sent on `WatchDevices`.
pub fn device_event_to_pb(e: &crate::device_events::DeviceEvent) -> pb::DeviceEvent {
    use crate::device_events::DeviceEventKind as K;
    use pb::DeviceEventType as T;
    let kind = match e.kind {
        K::Registered => T::Registered,
        K::Unregistered => T::Unregistered,
        K::RegistrationRefused => T::RegistrationRefused,
        K::LockedOut => T::LockedOut,
        K::CallRefused => T::CallRefused,
    };
    pb::DeviceEvent {
        r#type: kind as i32,
        number: e.number.clone(),
        transport: e.transport.to_owned(),
        source: e.source.map(|s| s.to_string()).unwrap_or_default(),
        external: e.external,
        reason: e.reason.clone(),
        at: Some(crate::convert::timestamp(e.at)),
    }
}

/// The status code and message of a registry error.
pub fn to_status(e: &DeviceError) -> Status {
    let code = match e {
        DeviceError::Invalid { .. } => Code::InvalidArgument,
        DeviceError::Exists(_) => Code::AlreadyExists,
        DeviceError::NotFound(_) => Code::NotFound,
        DeviceError::Refused(_) => Code::FailedPrecondition,
        DeviceError::Store(_) | DeviceError::Corrupt { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

pub fn device_type_from_pb(v: i32) -> Result<DeviceType, Status> {
    use pb::DeviceType as T;
    Ok(match T::try_from(v) {
        Ok(T::OpenstageHfa) => DeviceType::OpenStageHfa,
        Ok(T::DeskphoneIpHfa) => DeviceType::DeskPhoneIpHfa,
        Ok(T::DeskphoneCpHfa) => DeviceType::DeskPhoneCpHfa,
        Ok(T::MyportalToGoAndroid) => DeviceType::MyPortalToGoAndroid,
        Ok(T::MyportalToGoIos) => DeviceType::MyPortalToGoIos,
        Ok(T::MyportalAtWork) => DeviceType::MyPortalAtWork,
        Ok(T::SipDevice) => DeviceType::SipDevice,
        Ok(T::Unspecified) => return Err(Status::invalid_argument("device.type: required")),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "device.type: unknown device type {v}"
            )));
        }
    })
}

pub fn device_type_to_pb(t: DeviceType) -> pb::DeviceType {
    use pb::DeviceType as T;
    match t {
        DeviceType::OpenStageHfa => T::OpenstageHfa,
        DeviceType::DeskPhoneIpHfa => T::DeskphoneIpHfa,
        DeviceType::DeskPhoneCpHfa => T::DeskphoneCpHfa,
        DeviceType::MyPortalToGoAndroid => T::MyportalToGoAndroid,
        DeviceType::MyPortalToGoIos => T::MyportalToGoIos,
        DeviceType::MyPortalAtWork => T::MyportalAtWork,
        DeviceType::SipDevice => T::SipDevice,
    }
}

fn cos_from_pb(c: &pb::ClassOfService) -> Result<ClassOfService, Status> {
    let reach = match pb::Reach::try_from(c.reach) {
        Ok(pb::Reach::Unspecified | pb::Reach::InternalOnly) => Reach::InternalOnly,
        Ok(pb::Reach::Local) => Reach::Local,
        Ok(pb::Reach::National) => Reach::National,
        Ok(pb::Reach::International) => Reach::International,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "class_of_service.reach: unknown reach {}",
                c.reach
            )));
        }
    };
    Ok(ClassOfService {
        reach,
        premium_rate: c.premium_rate,
        forward_external: c.forward_external,
    })
}

fn cos_to_pb(c: ClassOfService) -> pb::ClassOfService {
    pb::ClassOfService {
        reach: match c.reach {
            Reach::InternalOnly => pb::Reach::InternalOnly,
            Reach::Local => pb::Reach::Local,
            Reach::National => pb::Reach::National,
            Reach::International => pb::Reach::International,
        } as i32,
        premium_rate: c.premium_rate,
        forward_external: c.forward_external,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A device for the wire.
pub fn device_to_pb(d: &DeviceView) -> pb::Device {
    pb::Device {
        number: d.number.clone(),
        r#type: device_type_to_pb(d.device_type) as i32,
        mac: d.mac.map(|m| m.to_string()).unwrap_or_default(),
        authentication: d.authentication,
        internet_registration: d.internet_registration,
        class_of_service: Some(cos_to_pb(d.class_of_service)),
        codecs: d.codecs.clone(),
        has_password: d.has_password,
        weak_password: d.weak_password.clone(),
        registration: d.registration.as_ref().map(|r| pb::Registration {
            transport: r.transport.to_owned(),
            public_address: r.public.to_string(),
            local_address: r.local.map(|a| a.to_string()).unwrap_or_default(),
            firmware: r.firmware.clone(),
            external: r.origin == Origin::External,
            registered_at: Some(timestamp(r.registered_at)),
            expires_at: Some(timestamp(r.expires_at)),
        }),
    }
}

/// Runs a registry call off the async runtime (a new password costs a key derivation).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DeviceError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("device registry task: {e}")))?
        .map_err(|e| to_status(&e))
}

#[tonic::async_trait]
impl pb::device_service_server::DeviceService for DevicesApi {
    async fn create_device(
        &self,
        request: Request<pb::CreateDeviceRequest>,
    ) -> Result<Response<pb::DeviceResponse>, Status> {
        let r = request.into_inner();
        let d = r
            .device
            .ok_or_else(|| Status::invalid_argument("device: required"))?;
        let new = NewDevice {
            number: d.number,
            device_type: Some(device_type_from_pb(d.r#type)?),
            mac: Some(d.mac),
            authentication: d.authentication,
            internet_registration: d.internet_registration,
            class_of_service: d.class_of_service.as_ref().map(cos_from_pb).transpose()?,
            codecs: d.codecs,
            password: Some(r.password),
        };
        let registry = self.registry.clone();
        let view = blocking(move || registry.create(new)).await?;
        Ok(Response::new(pb::DeviceResponse {
            device: Some(device_to_pb(&view)),
        }))
    }

    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::DeviceResponse>, Status> {
        let r = request.into_inner();
        let change = DeviceChange {
            device_type: r.r#type.map(device_type_from_pb).transpose()?,
            mac: r.mac.map(|m| Some(m).filter(|m| !m.is_empty())),
            authentication: r.authentication,
            internet_registration: r.internet_registration,
            class_of_service: r.class_of_service.as_ref().map(cos_from_pb).transpose()?,
            codecs: r.replace_codecs.then_some(r.codecs),
            password: r.password.map(|p| Some(p).filter(|p| !p.is_empty())),
        };
        let registry = self.registry.clone();
        let number = r.number;
        let view = blocking(move || registry.update(&number, change)).await?;
        Ok(Response::new(pb::DeviceResponse {
            device: Some(device_to_pb(&view)),
        }))
    }

    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<pb::DeleteDeviceResponse>, Status> {
        let number = request.into_inner().number;
        let registry = self.registry.clone();
        let view = blocking(move || registry.delete(&number)).await?;
        Ok(Response::new(pb::DeleteDeviceResponse {
            device: Some(device_to_pb(&view)),
        }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::DeviceResponse>, Status> {
        let view = self
            .registry
            .get(&request.into_inner().number)
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::DeviceResponse {
            device: Some(device_to_pb(&view)),
        }))
    }

    async fn list_devices(
        &self,
        _request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        Ok(Response::new(pb::ListDevicesResponse {
            devices: self.registry.list().iter().map(device_to_pb).collect(),
        }))
    }

    type WatchDevicesStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::DeviceEvent, Status>> + Send>>;

    async fn watch_devices(
        &self,
        request: Request<pb::WatchDevicesRequest>,
    ) -> Result<Response<Self::WatchDevicesStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        let number = request.into_inner().number;
        if !number.is_empty() {
            crate::devices::check_number(&number).map_err(|e| to_status(&e))?;
        }
        let mut events = self.registry.events().subscribe();
        let stopping = self.service.as_ref().map(crate::service::Service::stopping);
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_STREAM_BUFFER);
        // Ends when the relay shuts down, the subscriber lags (after telling the client), or
        // the client goes away.
        tokio::spawn(async move {
            let stopping = async move {
                match stopping {
                    Some(s) => s.await,
                    None => std::future::pending().await,
                }
            };
            let mut stopping = std::pin::pin!(stopping);
            loop {
                let item = tokio::select! {
                    () = tx.closed() => return,
                    () = &mut stopping => return,
                    item = events.recv() => item,
                };
                let message = match item {
                    Ok(e) if !number.is_empty() && e.number != number => continue,
                    Ok(e) => Ok(device_event_to_pb(&e)),
                    Err(RecvError::Lagged(n)) => Err(Status::aborted(format!(
                        "the watcher fell behind and missed {n} device events; list the \
                         devices and watch again"
                    ))),
                    Err(RecvError::Closed) => return,
                };
                let last = message.is_err();
                if tx.send(message).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn authorize_call(
        &self,
        request: Request<pb::AuthorizeCallRequest>,
    ) -> Result<Response<pb::AuthorizeCallResponse>, Status> {
        let r = request.into_inner();
        if r.target.len() > 64 {
            return Err(Status::invalid_argument("target: at most 64 characters"));
        }
        let (origin, verdict) = self
            .registry
            .authorize_call(&r.number, &r.target, r.forwarding)
            .map_err(|e| to_status(&e))?;
        let external = origin == Origin::External;
        let response = match verdict {
            Ok(class) => pb::AuthorizeCallResponse {
                allowed: true,
                target_class: class.to_string(),
                reason: String::new(),
                external,
            },
            Err(refusal) => pb::AuthorizeCallResponse {
                allowed: false,
                target_class: self
                    .registry
                    .policy()
                    .calls
                    .plan
                    .classify(&r.target)
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                reason: refusal.to_string(),
                external,
            },
        };
        Ok(Response::new(response))
    }
}
