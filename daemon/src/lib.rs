//! relay-sidecar: one host's single registration on a ProxyStore relay,
//! shared with every local process over gRPC on a Unix socket.
//!
//! The pieces, each owned by one module:
//! - [`codec`]: the relay's JSON wire format, both dialects.
//! - [`relay`]: the task that owns the relay WebSocket and its state machine.
//! - [`router`]: hands inbound messages to local subscribers.
//! - [`service`]: the `relay_sidecar.v1.RelaySidecar` gRPC service.
//! - [`ipc`]: the Unix socket the service listens on.
//! - [`config`] and [`identity`]: settings and the persistent peer identity.
//! - [`devrelay`]: an embedded relay for development and tests.

pub mod codec;
pub mod config;
pub mod devrelay;
pub mod identity;
pub mod ipc;
pub mod logging;
pub mod relay;
pub mod router;
pub mod service;
pub mod status;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use relay_sidecar_proto::v1::relay_sidecar_server::RelaySidecarServer;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::{ConfigError, Settings};
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
        let router = Router::new(
            Limits {
                subscriber_queue: settings.subscriber_queue,
                backlog: settings.backlog,
                affinity: settings.affinity,
            },
            Arc::clone(&counters),
        );
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
                backoff_initial: settings.backoff_initial,
                backoff_max: settings.backoff_max,
                lazy: settings.lazy,
                max_message_bytes: settings.max_message_bytes,
            },
            Arc::clone(&router),
            Arc::clone(&counters),
            shutdown.clone(),
        );
        let service = Service::new(ServiceParts {
            identity: identity.clone(),
            relay_url: relay_url.clone(),
            dialect: settings.dialect,
            relay: handle,
            router,
            counters,
            send_timeout: settings.send_timeout,
            max_message_bytes: settings.max_message_bytes,
            shutdown: shutdown.clone(),
        });

        let (listener, socket) = ipc::bind(&settings.socket_path(), settings.socket_mode_bits()?)?;
        let tasks = TaskTracker::new();
        tasks.spawn(connection.run());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RelaySidecarServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.clone().cancelled_owned(),
                ),
        );
        info!(
            socket = %socket.path().display(),
            uuid = %identity.uuid,
            name = %identity.name,
            relay = %relay_url,
            dialect = %settings.dialect,
            "serving"
        );
        Ok(Daemon {
            identity,
            relay_url,
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
