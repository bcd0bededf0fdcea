//! The optional Prometheus endpoint (`metrics_listen`): the relay link's
//! state, registrations, reconnects, message counters, subscribers and the
//! time Send calls take, served over HTTP at `/metrics`.
//!
//! The endpoint is bounded like the socket: at most [`METRICS_CONNECTIONS`]
//! connections (the oldest is closed to admit another), one request each,
//! within [`METRICS_CONNECTION_TIME`], on tasks the daemon waits for.
//!
//! Counters the daemon keeps anyway ([`Counters`]) are read at each scrape;
//! only the Send latency histogram is recorded here, by a layer on the gRPC
//! server, so the service itself knows nothing of metrics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use relay_sidecar_proto::SERVICE_NAME;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::limits::{
    ACCEPT_BACKOFF_INITIAL, ACCEPT_BACKOFF_MAX, LOG_SUMMARY_INTERVAL, METRICS_CONNECTION_TIME,
    METRICS_CONNECTIONS,
};
use crate::router::Router;
use crate::summary::Summary;

static ACCEPT_FAILED: Summary = Summary::new(LOG_SUMMARY_INTERVAL);
use crate::status::{ConnectionState, Counters, LinkStatus};

/// Every state, in the order the `connection_state` family lists them.
const STATES: [ConnectionState; 6] = [
    ConnectionState::Idle,
    ConnectionState::Connecting,
    ConnectionState::Registered,
    ConnectionState::Backoff,
    ConnectionState::Failed,
    ConnectionState::Stopping,
];

/// The content type of the text format `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the daemon records for metrics whether or not they are served.
#[derive(Debug, Clone)]
pub struct Metrics {
    send_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 0.5 ms to about 16 s: a Send waits for registration up to
            // send_timeout, longer ones land in +Inf.
            send_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

/// The daemon's state that metrics are read from.
#[derive(Debug)]
pub struct Link {
    pub counters: Arc<Counters>,
    pub router: Arc<Router>,
    pub states: watch::Receiver<LinkStatus>,
}

impl Metrics {
    /// A layer for the gRPC server that times every Send call.
    pub fn layer(&self) -> SendTimerLayer {
        SendTimerLayer {
            histogram: self.send_latency.clone(),
        }
    }

    /// Binds `metrics_listen` and serves `/metrics` until `shutdown`, each
    /// connection on a task of `tasks`.
    pub async fn serve(
        &self,
        addr: SocketAddr,
        link: Link,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
        let listener = TcpListener::bind(addr).await?;
        let registered_once = Arc::new(AtomicBool::new(false));
        let mut registry = Registry::with_prefix("relay_sidecar");
        registry.register_with_unit(
            "send_duration",
            "Time a Send call took, until the message was written to the relay or the call failed",
            Unit::Seconds,
            self.send_latency.clone(),
        );
        let states = link.states.clone();
        registry.register_collector(Box::new(LinkCollector {
            link,
            registered_once: Arc::clone(&registered_once),
        }));
        Ok(run(
            listener,
            Arc::new(registry),
            states,
            registered_once,
            shutdown,
            tasks,
        ))
    }
}

async fn run(
    listener: TcpListener,
    registry: Arc<Registry>,
    states: watch::Receiver<LinkStatus>,
    registered_once: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    tokio::join!(
        note_registration(states, registered_once, shutdown.clone()),
        accept(listener, registry, shutdown, tasks),
    );
}

/// Remembers that the link has been registered, however briefly: the
/// registrations counter must not go back to 0 when it drops.
async fn note_registration(
    mut states: watch::Receiver<LinkStatus>,
    registered_once: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        if states.borrow_and_update().state == ConnectionState::Registered {
            registered_once.store(true, Ordering::Relaxed);
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
        }
    }
}

async fn accept(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    // The open connections, oldest first, each with the token that ends it.
    let open: Arc<Mutex<VecDeque<(u64, CancellationToken)>>> = Arc::default();
    let mut backoff = ACCEPT_BACKOFF_INITIAL;
    for id in 0u64.. {
        let stream = loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => break stream,
                    Err(e) => {
                        if let Some(earlier) = ACCEPT_FAILED.note() {
                            warn!(error = %e, earlier, retry_in = ?backoff, "metrics: cannot accept a connection");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
            }
        };
        backoff = ACCEPT_BACKOFF_INITIAL;
        let end = shutdown.child_token();
        {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if open.len() >= METRICS_CONNECTIONS
                && let Some((_, oldest)) = open.pop_front()
            {
                debug!("metrics: at the connection limit; closing the oldest");
                oldest.cancel();
            }
            open.push_back((id, end.clone()));
        }
        let registry = Arc::clone(&registry);
        let open = Arc::clone(&open);
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&registry, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            // One request a connection: nothing to keep open between scrapes.
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = tokio::time::timeout(METRICS_CONNECTION_TIME, connection) => match result {
                    Ok(Err(e)) => debug!(error = %e, "metrics: connection ended"),
                    Err(_) => debug!("metrics: connection closed after its time limit"),
                    Ok(Ok(())) => {}
                },
                () = end.cancelled() => {}
            }
            open.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(each, _)| *each != id);
        });
    }
}

fn respond<B>(registry: &Registry, request: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status, content_type, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "relay-sidecar serves its metrics at /metrics\n".into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET /metrics\n".into(),
        );
    }
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

/// Reads the daemon's own counters and state at each scrape.
#[derive(Debug)]
struct LinkCollector {
    link: Link,
    registered_once: Arc<AtomicBool>,
}

impl Collector for LinkCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let state = self.link.states.borrow().state;
        let mut family = encoder.encode_descriptor(
            "connection_state",
            "The relay connection's state: 1 for the current one, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for each in STATES {
            let labels = [("state", each.to_string())];
            ConstGauge::new(i64::from(each == state)).encode(family.encode_family(&labels)?)?;
        }

        let c = self.link.counters.snapshot();
        // Every registration after the first is a reconnect.
        let registered = self.registered_once.load(Ordering::Relaxed)
            || state == ConnectionState::Registered
            || c.reconnects > 0;
        let registrations = c.reconnects + u64::from(registered);
        for (name, help, value) in [
            (
                "registrations",
                "Times the daemon registered with the relay",
                registrations,
            ),
            (
                "reconnects",
                "Registrations after the first one",
                c.reconnects,
            ),
            (
                "messages_sent",
                "Messages written to the relay for local callers",
                c.sent,
            ),
            (
                "messages_received",
                "Messages from peers received from the relay",
                c.received,
            ),
            (
                "messages_bounced",
                "This host's own messages returned by the relay as undeliverable",
                c.bounced,
            ),
            (
                "messages_delivered",
                "Messages handed to local subscribers",
                c.delivered,
            ),
            (
                "messages_undecodable",
                "Frames from the relay that could not be decoded",
                c.undecodable,
            ),
            (
                "log_lines_dropped",
                "Log lines that stderr would not take (a closed pipe, a full disk)",
                crate::logging::dropped_lines(),
            ),
            (
                "confirmations",
                "Round trips through the relay that confirmed sends (one per write batch, shared by its sends)",
                c.confirmations,
            ),
            (
                "offers_refused",
                "Offers from peers answered with a refusal (nobody could take the conversation)",
                c.offers_refused,
            ),
            (
                "conversation_conflicts",
                "Sends refused because another local worker held the peer's conversation",
                c.conversation_conflicts,
            ),
            (
                "conversations_expired",
                "Conversations ended because nothing renewed them in time",
                c.conversations_expired,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }

        let mut dropped = encoder.encode_descriptor(
            "messages_dropped",
            "Messages from peers lost: the backlog was full while nobody was subscribed, a queue was full, a message waited too long in the backlog, or it belonged to no conversation",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in [
            ("no_subscriber", c.dropped_no_subscriber),
            ("queue_full", c.dropped_queue_full),
            ("expired", c.dropped_expired),
            ("no_conversation", c.dropped_no_conversation),
        ] {
            ConstCounter::new(value).encode(dropped.encode_family(&[("reason", reason)])?)?;
        }

        for (name, help, value) in [
            (
                "subscribers",
                "Open Subscribe streams",
                self.link.router.subscribers(),
            ),
            (
                "workers",
                "Distinct local workers with an open Subscribe stream",
                self.link.router.workers(),
            ),
            (
                "conversations",
                "Conversations with remote peers held by local workers",
                self.link.router.conversations(),
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Times calls to `RelaySidecar/Send`; see [`Metrics::layer`].
#[derive(Debug, Clone)]
pub struct SendTimerLayer {
    histogram: Histogram,
}

impl<S> tower::Layer<S> for SendTimerLayer {
    type Service = SendTimer<S>;

    fn layer(&self, inner: S) -> SendTimer<S> {
        SendTimer {
            inner,
            histogram: self.histogram.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SendTimer<S> {
    inner: S,
    histogram: Histogram,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for SendTimer<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let is_send = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(SERVICE_NAME))
            == Some("/Send");
        let call = self.inner.call(request);
        if !is_send {
            return Box::pin(call);
        }
        let (histogram, start) = (self.histogram.clone(), Instant::now());
        Box::pin(async move {
            let result = call.await;
            histogram.observe(start.elapsed().as_secs_f64());
            result
        })
    }
}
