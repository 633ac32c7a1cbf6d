//! The gRPC handlers of `relay.v1.ChannelService`: each converts the request
//! ([`crate::convert`]), calls the [`Service`], and converts the answer or the error
//! ([`crate::error::to_status`]).
//!
//! Invariant: handlers hold no logic of their own. That keeps them in one place for a layer
//! that wraps them all (request latency histograms by method, for instance, as a tower layer
//! on the server in [`crate::server`]).
use std::pin::Pin;

use proto::v1 as pb;
use proto::v1::channel_service_server::ChannelService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::service::Service;

/// The tonic service.
#[derive(Clone, Debug)]
pub struct Api {
    service: Service,
}

impl Api {
    pub fn new(service: Service) -> Api {
        Api { service }
    }

    /// A request for `device` (empty: none): the device must be registered, and its channel
    /// is an internet call exactly when it registered from outside.
    fn for_device(
        &self,
        request: relay_core::Request,
        device: &str,
    ) -> Result<relay_core::Request, crate::error::ServiceError> {
        use crate::error::ServiceError;
        use relay_core::Kind;
        if device.is_empty() {
            return Ok(request);
        }
        if !matches!(
            request.kind,
            Kind::SystemDevice | Kind::SipDevice | Kind::MobileClient
        ) {
            return Err(ServiceError::invalid(
                "device",
                format!("a {} channel is not for a device", request.kind.name()),
            ));
        }
        let devices = self.service.devices();
        if let Err(e) = devices.get(device) {
            return Err(ServiceError::Device(device.to_owned(), e.to_string()));
        }
        let Some(registration) = devices.registration(device) else {
            return Err(ServiceError::Device(
                device.to_owned(),
                "not registered".to_owned(),
            ));
        };
        let external = registration.origin == relay_core::device::networks::Origin::External;
        Ok(request.with_internet(external))
    }
}

/// Events buffered between a watcher's subscription and its HTTP/2 stream.
const WATCH_STREAM_BUFFER: usize = 64;

#[tonic::async_trait]
impl ChannelService for Api {
    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let device = request.get_ref().device.clone();
        let result = match convert::allocate_from_pb(request.get_ref())
            .and_then(|(r, spec)| Ok((self.for_device(r, &device)?, spec)))
        {
            Ok((request, spec)) => self.service.allocate(request, spec).await,
            Err(e) => Err(e),
        };
        self.service.metrics().allocation(&result);
        let (view, created) = result?;
        Ok(Response::new(pb::AllocateResponse {
            channel: Some(convert::channel_to_pb(&view)),
            created,
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let (target, update) = convert::update_from_pb(request.get_ref())?;
        let view = self.service.update(target, update).await?;
        Ok(Response::new(pb::UpdateResponse {
            channel: Some(convert::channel_to_pb(&view)),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let target = convert::channel_ref_from_pb(request.get_ref().channel.as_ref())?;
        let (view, at) = self.service.release(target).await?;
        Ok(Response::new(pb::ReleaseResponse {
            channel: Some(convert::channel_to_pb(&view)),
            released_at: Some(at.into()),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let target = convert::channel_ref_from_pb(request.get_ref().channel.as_ref())?;
        let view = self.service.get(target).await?;
        Ok(Response::new(pb::GetResponse {
            channel: Some(convert::channel_to_pb(&view)),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let query = convert::list_from_pb(request.get_ref())?;
        let page = self.service.list(query).await?;
        Ok(Response::new(pb::ListResponse {
            channels: page.channels.iter().map(convert::channel_to_pb).collect(),
            next_page_token: convert::page_token(page.next_after),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let kinds = convert::watch_kinds_from_pb(request.get_ref())?;
        let mut watcher = self.service.watch();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_STREAM_BUFFER);
        // Ends when the service shuts down, the watcher lags (after telling the client), or the
        // client goes away.
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = watcher.next() => item,
                };
                let message = match item {
                    None => return,
                    Some(Ok(event)) => {
                        if !kinds.is_empty() && !kinds.contains(&event.channel.info.kind) {
                            continue;
                        }
                        Ok(convert::event_to_pb(&event))
                    }
                    Some(Err(e)) => Err(Status::from(e)),
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

    async fn pool_status(
        &self,
        _request: Request<pb::PoolStatusRequest>,
    ) -> Result<Response<pb::PoolStatusResponse>, Status> {
        let pool = self.service.pool().await.map_err(Status::from)?;
        Ok(Response::new(convert::pool_to_pb(&pool)))
    }
}
