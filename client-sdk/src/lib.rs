//! Rust client for relay-sidecar, the daemon that shares one host's ProxyStore
//! relay registration with every local process over gRPC on a Unix socket.
//!
//! Every process that uses this crate sends and receives as the host's one
//! peer identity. [`connect`] (or [`connect_default`]) returns a [`Client`]
//! that speaks the domain types of this crate; the generated gRPC types are
//! in [`proto`].
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use relay_sidecar_client::{DescriptionType, connect_default};
//!
//! # async fn example() -> Result<(), relay_sidecar_client::Error> {
//! let client = connect_default().await?.with_worker("example");
//! println!("we are {}", client.status().await?.uuid);
//!
//! let mut messages = client.subscribe(None).await?;
//! let peer = uuid::Uuid::parse_str("0b0b0b0b-1111-4222-8333-444455556666").unwrap();
//! client.send(peer, DescriptionType::Offer, "v=0 ...").await?;
//! while let Some(message) = messages.next().await {
//!     let message = message?;
//!     println!("{} says {}", message.source_name, message.description);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod client;
mod convert;
mod error;
pub mod paths;
mod session;
mod types;

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::Endpoint;

pub use client::{
    Client, Outgoing, RESUME_WITHIN, SendFailure, SendOptions, StatusStream, StreamReport,
    SubscribeOptions, Subscription,
};
pub use error::Error;
pub use paths::SOCKET_ENV;
pub use relay_sidecar_proto as proto;
pub use session::{Pending, SESSION_IN_FLIGHT, Session, SessionSender};
pub use tonic;
pub use types::{ConnectionState, Counters, DescriptionType, PeerMessage, Status};

/// The socket a client uses when none is given: of the sockets the shared
/// rule names ([`paths::Environment::client_sockets`]), the first that
/// exists, else the first.
pub fn default_socket_path() -> PathBuf {
    let sockets = paths::Environment::current()
        .client_sockets()
        .unwrap_or_default();
    let existing = sockets.iter().find(|path| path.exists());
    existing
        .or(sockets.first())
        .cloned()
        .unwrap_or_else(|| Path::new(paths::SYSTEM_RUNTIME_DIR).join(paths::SOCKET_NAME))
}

/// Connects to the daemon by the shared rule in this process's environment:
/// `$RELAY_SIDECAR_SOCKET` when set, else the first socket that answers (see
/// [`paths`]).
pub async fn connect_default() -> Result<Client, Error> {
    connect_by_rule(&paths::Environment::current()).await
}

/// [`connect_default`] in the environment `env`: tries each socket it names,
/// in order, and returns the first connection made. When none answers,
/// [`Error::NoDaemon`] lists each path with the reason.
pub async fn connect_by_rule(env: &paths::Environment) -> Result<Client, Error> {
    let sockets = env
        .client_sockets()
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", paths::JOB_ENV)))?;
    let mut tried = Vec::new();
    for path in sockets {
        match connect(&path).await {
            Ok(client) => return Ok(client),
            Err(Error::Connect { path, source }) => tried.push((path, source)),
            Err(e) => return Err(e),
        }
    }
    Err(Error::NoDaemon(NoDaemon {
        tried,
        named: env.socket.is_some(),
    }))
}

/// What [`Error::NoDaemon`] reports: each socket tried and why it did not
/// answer.
#[derive(Debug)]
pub struct NoDaemon {
    /// The paths tried, in order, with the error from each.
    pub tried: Vec<(PathBuf, std::io::Error)>,
    /// Whether the one path came from `$RELAY_SIDECAR_SOCKET`.
    pub named: bool,
}

impl fmt::Display for NoDaemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cannot connect to a relay-sidecar daemon: tried ")?;
        for (i, (path, error)) in self.tried.iter().enumerate() {
            let sep = if i == 0 { "" } else { "; " };
            write!(f, "{sep}{} ({})", path.display(), why_not(path, error))?;
        }
        if self.named {
            write!(
                f,
                ". The path came from {SOCKET_ENV}: start the daemon there, or unset it \
                 to look in the default places"
            )
        } else {
            write!(
                f,
                ". Start one (relay-sidecar start --relay-url URL), or name its socket with \
                 {SOCKET_ENV}=PATH (relayctl --socket PATH)"
            )
        }
    }
}

/// Why connecting to `path` failed, in words that suggest the fix.
pub fn why_not(path: &Path, error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::NotFound => "no such socket".to_owned(),
        ErrorKind::ConnectionRefused => {
            "nobody listening: a socket left by a daemon that stopped".to_owned()
        }
        ErrorKind::PermissionDenied => match std::fs::metadata(path) {
            Ok(meta) => {
                let user = nix::unistd::User::from_uid(meta.uid().into())
                    .ok()
                    .flatten()
                    .map_or_else(|| meta.uid().to_string(), |u| u.name);
                let group = nix::unistd::Group::from_gid(meta.gid().into())
                    .ok()
                    .flatten()
                    .map_or_else(|| meta.gid().to_string(), |g| g.name);
                format!(
                    "permission denied: the socket has mode {:04o}, owner {user}, group {group}; \
                     ask to be added to group {group}",
                    meta.mode() & 0o7777
                )
            }
            Err(_) => format!(
                "permission denied: its directory {} is closed to you",
                path.parent().unwrap_or(Path::new("/")).display()
            ),
        },
        _ => error.to_string(),
    }
}

/// Connects to the daemon listening on the Unix socket at `path`.
///
/// The connection is made at once, so a missing socket or an absent daemon
/// is an [`Error::Connect`] naming the path.
pub async fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
    let path = path.as_ref().to_path_buf();
    // The URI only sets `:authority`; gRPC servers reject a socket path there.
    let endpoint = Endpoint::from_static("http://localhost");
    let target = path.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let target = target.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(target).await?)) }
        }))
        .await
        .map_err(|e| Error::connect(path.clone(), e))?;
    Ok(Client::from_channel(channel).at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_daemon_lists_every_path_tried_and_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let missing = dir.path().join("missing.sock");
        let env = paths::Environment {
            uid: 4242,
            xdg_runtime_dir: Some(dir.path().to_path_buf()),
            ..paths::Environment::default()
        };
        let err = connect_by_rule(&env).await.unwrap_err().to_string();
        for path in env.client_sockets().unwrap() {
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
        assert!(err.contains("no such socket"), "{err}");
        assert!(
            err.contains("relay-sidecar start") && err.contains(SOCKET_ENV),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");

        for (path, why) in [
            (&stale, "a daemon that stopped"),
            (&missing, "no such socket"),
        ] {
            let env = paths::Environment {
                socket: Some(path.clone()),
                ..env.clone()
            };
            let err = connect_by_rule(&env).await.unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert!(err.contains("came from RELAY_SIDECAR_SOCKET"), "{err}");
        }
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error_naming_the_path() {
        let path =
            std::env::temp_dir().join(format!("relay-sidecar-missing-{}.sock", std::process::id()));
        let err = connect(&path).await.unwrap_err();
        match &err {
            Error::Connect { path: p, source } => {
                assert_eq!(p, &path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
