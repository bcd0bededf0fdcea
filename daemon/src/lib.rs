//! relay-sidecar: one host's single registration on a ProxyStore relay,
//! shared with every local process over gRPC on a Unix socket.
//!
//! The pieces, each owned by one module:
//! - [`codec`]: the relay's JSON wire format, both dialects.
//! - [`relay`]: the link to the relay: its WebSocket, its state machine and
//!   the ordered queue of sends it has accepted.
//! - [`router`]: hands inbound messages to local subscribers.
//! - [`service`]: the `relay_sidecar.v1.RelaySidecar` gRPC service.
//! - [`ipc`]: the Unix socket the service listens on; [`connections`]
//!   accepts and bounds what connects, [`authority`] lets any gRPC client's
//!   `:authority` through, [`access`] checks callers; [`limits`] gathers
//!   every bound on callers, [`summary`] the log budget for their events.
//! - [`health`] and gRPC reflection: standard services on the same socket.
//! - [`systemd`]: socket activation and notifications; [`metrics`]: the
//!   optional Prometheus endpoint; [`cli`]: the daemon's command line.
//! - [`config`] and [`identity`]: settings and the persistent peer identity;
//!   [`rundir`]: the private directories they live in; [`job`]: a user's
//!   daemon started in the background for a batch job or a shell.
//! - [`devrelay`]: an embedded relay for development and tests.

pub mod access;
pub mod authority;
pub mod cli;
pub mod codec;
pub mod config;
pub mod connections;
pub mod devrelay;
pub mod fuzzing;
pub mod health;
pub mod identity;
pub mod ipc;
pub mod job;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod router;
pub mod rundir;
pub mod service;
pub mod status;
pub mod summary;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use relay_sidecar_proto::v1::relay_sidecar_server::RelaySidecarServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::access::{Admins, AllowList};
use crate::config::{ConfigError, Settings};
use crate::connections::{Budget, CallLayer, Connections};
use crate::devrelay::DevRelay;
use crate::identity::{Identity, IdentityError};
use crate::ipc::{IpcError, SocketFile};
use crate::relay::{Connection, LinkOptions, TlsError};
use crate::router::{Limits, Router};
use crate::service::{Service, ServiceParts};
use crate::status::Counters;

/// How long shutdown waits for open calls and the relay's close handshake.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Socket(#[from] IpcError),
    #[error("dev_listen: cannot start the embedded relay: {0}")]
    DevRelay(std::io::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("metrics_listen: cannot listen: {0}")]
    Metrics(std::io::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
}

/// A started daemon: the socket is bound and serving, the relay connection
/// is being made. Wait on it with [`Daemon::wait`].
#[derive(Debug)]
pub struct Daemon {
    identity: Identity,
    relay_url: String,
    socket: SocketFile,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    dev_relay: Option<DevRelay>,
}

impl Daemon {
    /// Starts everything the settings describe; runs until `shutdown` is
    /// cancelled.
    pub async fn start(settings: Settings, shutdown: CancellationToken) -> Result<Daemon, Error> {
        Daemon::start_on(settings, None, shutdown).await
    }

    /// Like [`Daemon::start`], but serves on `activated` when given: a
    /// listening socket from systemd ([`systemd::take_listener`]), whose
    /// file, mode and group are the socket unit's.
    pub async fn start_on(
        settings: Settings,
        activated: Option<std::os::unix::net::UnixListener>,
        shutdown: CancellationToken,
    ) -> Result<Daemon, Error> {
        settings.validate()?;
        let dev_relay = if settings.dev {
            let addr = settings
                .dev_listen
                .parse()
                .map_err(|e| ConfigError::key("dev_listen", e))?;
            // Its own token: it stops after the daemon has closed its connection.
            let relay = DevRelay::start(addr, settings.dialect, CancellationToken::new())
                .await
                .map_err(Error::DevRelay)?;
            info!(url = %relay.url(), "embedded dev relay listening");
            Some(relay)
        } else {
            None
        };
        let relay_url = match &dev_relay {
            Some(relay) => relay.url(),
            None => settings.relay_url.clone().unwrap_or_default(),
        };
        // What is shown of it (status, logs): never its credentials.
        let shown_url = relay::without_credentials(&relay_url);
        let identity = identity::resolve(
            settings.uuid,
            settings.name.as_deref(),
            &settings.state_dir(),
        )?;
        let tls = if relay_url.starts_with("wss://") {
            Some(Arc::new(relay::client_config(
                settings.ca_file.as_deref(),
                settings.insecure_skip_verify,
            )?))
        } else {
            None
        };
        let headers = settings
            .headers
            .iter()
            .map(|(name, value)| {
                let key = || format!("headers.{name}");
                Ok((
                    name.parse()
                        .map_err(|_| ConfigError::key(&key(), "not a valid header name"))?,
                    value
                        .parse()
                        .map_err(|_| ConfigError::key(&key(), "not a valid header value"))?,
                ))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;

        let counters = Arc::new(Counters::default());
        let (router, refusals) = Router::new(
            Limits {
                subscriber_queue: settings.subscriber_queue,
                subscriber_queue_bytes: settings.subscriber_queue_bytes,
                backlog: settings.backlog,
                backlog_bytes: settings.backlog_bytes,
                backlog_ttl: settings.backlog_ttl,
                affinity: settings.affinity,
                conversation_ttl: settings.conversation_ttl,
                unclaimed_offers: settings.unclaimed_offers,
            },
            Arc::clone(&counters),
        );
        let sweeper = Arc::clone(&router).sweep(shutdown.clone());
        let (connection, handle) = Connection::new(
            LinkOptions {
                url: relay_url.clone(),
                dialect: settings.dialect,
                uuid: identity.uuid,
                name: identity.name.clone(),
                headers,
                token_file: settings.token_file.clone(),
                tls,
                registration_timeout: settings.timeout,
                ping_interval: settings.ping_interval,
                ping_timeout: settings.ping_timeout,
                confirm_timeout: settings.confirm_timeout,
                backoff_initial: settings.backoff_initial,
                backoff_max: settings.backoff_max,
                lazy: settings.lazy,
                max_message_bytes: settings.max_message_bytes,
            },
            Arc::clone(&router),
            Arc::clone(&counters),
            shutdown.clone(),
        );
        let states = handle.watch();
        // What the metrics endpoint reads, kept before the service owns them.
        let (counters_read, router_read) = (Arc::clone(&counters), Arc::clone(&router));
        let service = Service::new(ServiceParts {
            identity: identity.clone(),
            relay_url: shown_url.clone(),
            dialect: settings.dialect,
            relay: handle,
            router,
            counters,
            send_timeout: settings.send_timeout,
            max_message_bytes: settings.max_message_bytes,
            shutdown: shutdown.clone(),
            admins: Admins::new(
                &settings.admin_uids,
                &settings.admin_gids,
                settings.reconnect_min_interval,
            ),
        });

        let tasks = TaskTracker::new();
        // Both versions: grpcurl and older tools ask v1alpha, buf asks v1.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(relay_sidecar_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let allow = AllowList::new(&settings.allow_uids, &settings.allow_gids);
        let (listener, socket) = match activated {
            Some(listener) => ipc::activated(listener)?,
            None => ipc::bind(
                &settings.socket_path(),
                settings.socket_mode_bits()?,
                settings.socket_gid()?,
            )?,
        };
        let metrics = metrics::Metrics::default();
        if let Some(addr) = &settings.metrics_listen {
            let addr = addr
                .parse()
                .map_err(|e| ConfigError::key("metrics_listen", e))?;
            let link = metrics::Link {
                counters: counters_read,
                router: router_read,
                states: states.clone(),
            };
            let serve = metrics.serve(addr, link, shutdown.clone(), tasks.clone());
            tasks.spawn(serve.await.map_err(Error::Metrics)?);
            info!(%addr, "metrics at /metrics");
        }
        tasks.spawn(connection.run());
        tasks.spawn(sweeper);
        tasks.spawn(service.clone().answer_refusals(refusals, shutdown.clone()));
        tasks.spawn(systemd::run(states.clone(), shutdown.clone()));
        let connections = Connections::new(
            Budget {
                max_connections: settings.max_connections,
                handshake_timeout: settings.handshake_timeout,
                idle_timeout: settings.idle_timeout,
            }
            .fit_to_fd_limit(),
        );
        tasks.spawn(connections.clone().sweep(shutdown.clone()));
        let incoming = connections::incoming(listener, connections, allow, tasks.clone());
        // Every limit tonic leaves to hyper is set here, from `limits`:
        // tonic's own defaults lift some of hyper's (streams per connection).
        let relay_sidecar = RelaySidecarServer::new(service).max_decoding_message_size(
            settings
                .max_message_bytes
                .saturating_add(limits::REQUEST_OVERHEAD_BYTES)
                .max(limits::MAX_REQUEST_BYTES),
        );
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
                .http2_max_header_list_size(limits::MAX_HEADER_LIST_BYTES as u32)
                .max_frame_size(limits::MAX_FRAME_BYTES)
                .initial_stream_window_size(limits::STREAM_WINDOW_BYTES)
                .initial_connection_window_size(limits::CONNECTION_WINDOW_BYTES)
                .http2_max_pending_accept_reset_streams(Some(
                    limits::MAX_PENDING_ACCEPT_RESET_STREAMS,
                ))
                .http2_max_local_error_reset_streams(Some(limits::MAX_LOCAL_ERROR_RESET_STREAMS))
                .http2_keepalive_interval(Some(limits::KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(limits::KEEPALIVE_TIMEOUT))
                .layer(CallLayer)
                .layer(metrics.layer())
                .add_service(relay_sidecar)
                .add_service(health::server(states, shutdown.clone()))
                .add_service(reflection().build_v1()?)
                .add_service(reflection().build_v1alpha()?)
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
        );
        // Connections are queued from bind on and accepted once the server
        // task runs, so callers may come now.
        systemd::ready();
        info!(
            socket = %socket.path().display(),
            uuid = %identity.uuid,
            name = %identity.name,
            relay = %shown_url,
            dialect = %settings.dialect,
            activated = socket.activated(),
            allow_uids = ?settings.allow_uids,
            allow_gids = ?settings.allow_gids,
            "serving"
        );
        Ok(Daemon {
            identity,
            relay_url: shown_url,
            socket,
            server,
            tasks,
            shutdown,
            dev_relay,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The relay's URL, without any credentials it carries.
    pub fn relay_url(&self) -> &str {
        &self.relay_url
    }

    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// Runs until shutdown, then waits (at most [`SHUTDOWN_GRACE`]) for the
    /// relay's clean close and for open calls to end. The socket file is
    /// removed on return.
    pub async fn wait(mut self) -> Result<(), Error> {
        let served = tokio::select! {
            result = &mut self.server => Some(result),
            () = self.shutdown.cancelled() => None,
        };
        // Whatever ended the server, everything else stops now too.
        systemd::stopping();
        self.shutdown.cancel();
        self.tasks.close();
        let tasks = self.tasks.clone();
        let server = &mut self.server;
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async move {
            let served = match served {
                Some(result) => result,
                None => server.await,
            };
            tasks.wait().await;
            served
        })
        .await;
        if let Some(relay) = self.dev_relay.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), relay.stop()).await;
        }
        match drained {
            Ok(Ok(result)) => result.map_err(Error::Serve),
            Ok(Err(join)) => {
                tracing::error!(error = %join, "gRPC server task failed");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace period over; stopping anyway");
                self.server.abort();
                Ok(())
            }
        }
    }
}

/// Where a daemon's socket is, for tools given no path.
pub fn default_socket_path() -> PathBuf {
    Settings::default().socket_path()
}
