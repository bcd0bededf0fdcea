//! `grpc.health.v1.Health` on the daemon's socket: SERVING while the relay
//! connection is registered and NOT_SERVING otherwise, both for the service
//! name `relay_sidecar.v1.RelaySidecar` and for "" (the daemon as a whole).
//!
//! It reads the relay connection's published state directly, rather than
//! through tonic-health's reporter, so that no task has to copy the state
//! across and Watch streams end at shutdown like the daemon's own streams.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use relay_sidecar_proto::SERVICE_NAME;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::status::{ConnectionState, LinkStatus};

/// The health service, following the relay connection's state.
#[derive(Debug, Clone)]
pub struct HealthService {
    states: watch::Receiver<LinkStatus>,
    shutdown: CancellationToken,
}

/// The service ready to add to the server; Watch streams end when
/// `shutdown` is cancelled.
pub fn server(
    states: watch::Receiver<LinkStatus>,
    shutdown: CancellationToken,
) -> HealthServer<HealthService> {
    HealthServer::new(HealthService { states, shutdown })
}

/// What a health check reports for a link in this state.
pub fn serving_status(state: ConnectionState) -> ServingStatus {
    match state {
        ConnectionState::Registered => ServingStatus::Serving,
        _ => ServingStatus::NotServing,
    }
}

fn known(service: &str) -> bool {
    service.is_empty() || service == SERVICE_NAME
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchResponses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        if !known(service) {
            return Err(Status::not_found(format!(
                "unknown service {service:?}: this daemon reports on \"\" and {SERVICE_NAME:?}"
            )));
        }
        let state = self.states.borrow().state;
        Ok(Response::new(response(serving_status(state))))
    }

    type WatchStream = WatchResponses;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let shutdown = self.shutdown.clone().cancelled_owned();
        if !known(&request.get_ref().service) {
            // As the protocol asks: say so, but keep the call open.
            let unknown =
                futures_util::stream::once(async { Ok(response(ServingStatus::ServiceUnknown)) })
                    .chain(futures_util::stream::pending())
                    .take_until(shutdown);
            return Ok(Response::new(Box::pin(unknown)));
        }
        let mut last = None;
        let updates = WatchStream::new(self.states.clone())
            .map(|link| serving_status(link.state))
            .filter(move |status| {
                let changed = last != Some(*status);
                last = Some(*status);
                std::future::ready(changed)
            })
            .map(|status| Ok(response(status)))
            .take_until(shutdown);
        Ok(Response::new(Box::pin(updates)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn check_and_watch_follow_the_link() {
        let (publish, states) = watch::channel(LinkStatus::new(ConnectionState::Connecting));
        let shutdown = CancellationToken::new();
        let health = HealthService {
            states,
            shutdown: shutdown.clone(),
        };
        let ask = |service: &str| {
            Request::new(HealthCheckRequest {
                service: service.into(),
            })
        };
        let status =
            |r: Result<Response<HealthCheckResponse>, Status>| r.unwrap().into_inner().status;
        assert_eq!(
            status(health.check(ask("")).await),
            ServingStatus::NotServing as i32
        );
        let mut updates = health.watch(ask(SERVICE_NAME)).await.unwrap().into_inner();
        let next = |s: Option<Result<HealthCheckResponse, Status>>| s.unwrap().unwrap().status;
        assert_eq!(next(updates.next().await), ServingStatus::NotServing as i32);

        publish.send_replace(LinkStatus::new(ConnectionState::Registered));
        assert_eq!(
            status(health.check(ask(SERVICE_NAME)).await),
            ServingStatus::Serving as i32
        );
        assert_eq!(next(updates.next().await), ServingStatus::Serving as i32);
        publish.send_replace(LinkStatus::new(ConnectionState::Backoff));
        assert_eq!(next(updates.next().await), ServingStatus::NotServing as i32);

        let err = health.check(ask("other.Service")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let mut unknown = health
            .watch(ask("other.Service"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            next(unknown.next().await),
            ServingStatus::ServiceUnknown as i32
        );

        shutdown.cancel();
        assert!(updates.next().await.is_none(), "watch ends at shutdown");
        assert!(unknown.next().await.is_none());
    }
}
