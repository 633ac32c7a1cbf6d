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
#[derive(Debug, Clone)]
pub struct DevicesApi {
    registry: Arc<Registry>,
}

impl DevicesApi {
    pub fn new(registry: Arc<Registry>) -> DevicesApi {
        DevicesApi { registry }
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
