//! `relay.v1.PublicAddressService`: the relay's public address ([`crate::public_address`])
//! over gRPC — its status, and a stream that starts with the status and follows every change.
//! Conversions to the wire are here, in one place.
use std::pin::Pin;

use proto::v1 as pb;
use proto::v1::public_address_service_server::PublicAddressService;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert::timestamp;
use crate::public_address::{PublicAddressEvent, PublicStatus, Source, Transition};
use crate::service::Service;

/// Events buffered between a watcher's subscription and its HTTP/2 stream.
const WATCH_STREAM_BUFFER: usize = 16;

/// The tonic service.
#[derive(Clone, Debug)]
pub struct PublicAddressApi {
    service: Service,
}

impl PublicAddressApi {
    pub fn new(service: Service) -> PublicAddressApi {
        PublicAddressApi { service }
    }
}

/// A source for the wire.
pub fn source_to_pb(s: Source) -> pb::PublicAddressSource {
    match s {
        Source::Unknown => pb::PublicAddressSource::Unspecified,
        Source::Itsp => pb::PublicAddressSource::Itsp,
        Source::Configured => pb::PublicAddressSource::Configured,
        Source::Static => pb::PublicAddressSource::Static,
        Source::InternetAddress => pb::PublicAddressSource::InternetAddress,
    }
}

/// The source a wire source stands for.
pub fn source_of_pb(s: pb::PublicAddressSource) -> Source {
    match s {
        pb::PublicAddressSource::Unspecified => Source::Unknown,
        pb::PublicAddressSource::Itsp => Source::Itsp,
        pb::PublicAddressSource::Configured => Source::Configured,
        pb::PublicAddressSource::Static => Source::Static,
        pb::PublicAddressSource::InternetAddress => Source::InternetAddress,
    }
}

fn text<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// A status for the wire.
pub fn status_to_pb(s: &PublicStatus) -> pb::PublicAddressStatus {
    pb::PublicAddressStatus {
        address: text(s.address),
        source: source_to_pb(s.source) as i32,
        local_address: text(s.local_address),
        discovery: s.discovery,
        refresh_interval: Some(prost_types::Duration {
            seconds: i64::try_from(s.refresh.as_secs()).unwrap_or(i64::MAX),
            nanos: s.refresh.subsec_nanos() as i32,
        }),
        server: s.server.clone().unwrap_or_default(),
        server_address: text(s.server_address),
        discovery_local_address: text(s.discovery_local),
        mapped_address: text(s.mapped),
        port_preserved: s.port_preserved().unwrap_or(false),
        last_refresh: s.last_refresh.map(timestamp),
        last_success: s.last_success.map(timestamp),
        last_error: s.last_error.clone().unwrap_or_default(),
        stale: s.stale,
        changes: s.changes,
        changed_at: s.changed_at.map(timestamp),
    }
}

/// An event for the wire.
pub fn event_to_pb(e: &PublicAddressEvent) -> pb::PublicAddressEvent {
    let (ty, previous) = match e.transition {
        Transition::Changed { previous } => (pb::PublicAddressEventType::Changed, previous),
        Transition::Failed => (pb::PublicAddressEventType::Failed, None),
        Transition::Recovered => (pb::PublicAddressEventType::Recovered, None),
    };
    pb::PublicAddressEvent {
        r#type: ty as i32,
        status: Some(status_to_pb(&e.status)),
        previous_address: text(previous),
        at: Some(timestamp(e.at)),
    }
}

#[tonic::async_trait]
impl PublicAddressService for PublicAddressApi {
    async fn get_public_address(
        &self,
        _request: Request<pb::GetPublicAddressRequest>,
    ) -> Result<Response<pb::GetPublicAddressResponse>, Status> {
        let status = self.service.public_address().status();
        Ok(Response::new(pb::GetPublicAddressResponse {
            status: Some(status_to_pb(&status)),
        }))
    }

    type WatchPublicAddressStream =
        Pin<Box<dyn Stream<Item = Result<pb::PublicAddressEvent, Status>> + Send>>;

    async fn watch_public_address(
        &self,
        _request: Request<pb::WatchPublicAddressRequest>,
    ) -> Result<Response<Self::WatchPublicAddressStream>, Status> {
        let public = self.service.public_address();
        // Subscribed before the status is read: no change falls between the two.
        let mut events = public.subscribe();
        let current = pb::PublicAddressEvent {
            r#type: pb::PublicAddressEventType::Current as i32,
            status: Some(status_to_pb(&public.status())),
            previous_address: String::new(),
            at: Some(timestamp(std::time::SystemTime::now())),
        };
        let stopping = self.service.stopping();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_STREAM_BUFFER);
        // Ends when the relay shuts down, the subscriber lags (after telling the client), or
        // the client goes away.
        tokio::spawn(async move {
            if tx.send(Ok(current)).await.is_err() {
                return;
            }
            let mut stopping = std::pin::pin!(stopping);
            loop {
                let item = tokio::select! {
                    () = tx.closed() => return,
                    () = &mut stopping => return,
                    item = events.recv() => item,
                };
                let message = match item {
                    Ok(e) => Ok(event_to_pb(&e)),
                    Err(RecvError::Lagged(n)) => Err(Status::aborted(format!(
                        "the watcher fell behind and missed {n} public address events; watch \
                         again"
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_round_trips() {
        for s in [
            Source::Unknown,
            Source::Itsp,
            Source::Configured,
            Source::Static,
            Source::InternetAddress,
        ] {
            assert_eq!(source_of_pb(source_to_pb(s)), s);
        }
    }

    #[test]
    fn an_unknown_address_is_empty_on_the_wire() {
        let s = PublicStatus::from_config(&crate::config::Config::default());
        let pb = status_to_pb(&s);
        assert_eq!(pb.address, "");
        assert_eq!(pb.source, pb::PublicAddressSource::Unspecified as i32);
        assert!(!pb.port_preserved && pb.last_success.is_none());
        assert_eq!(pb.refresh_interval.map(|d| d.seconds), Some(60));
    }
}
