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
mod types;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::Endpoint;

pub use client::{
    Client, Outgoing, SendFailure, SendOptions, StatusStream, StreamReport, SubscribeOptions,
    Subscription,
};
pub use error::Error;
pub use relay_sidecar_proto as proto;
pub use tonic;
pub use types::{ConnectionState, Counters, DescriptionType, PeerMessage, Status};

/// The environment variable that names the daemon's socket for
/// [`connect_default`]: `RELAY_SIDECAR_SOCKET`.
pub const SOCKET_ENV: &str = "RELAY_SIDECAR_SOCKET";

/// The file name of the socket inside the runtime directory.
const SOCKET_NAME: &str = "relay.sock";

/// The socket path when none is configured: `$RUNTIME_DIRECTORY/relay.sock`
/// when systemd's `RUNTIME_DIRECTORY` is set (its first entry if it lists
/// several), else `/run/relay-sidecar/relay.sock`.
pub fn default_socket_path() -> PathBuf {
    socket_path_from(None, std::env::var_os("RUNTIME_DIRECTORY"))
}

/// The socket path from the two environment variables, first match wins.
fn socket_path_from(socket: Option<OsString>, runtime_dir: Option<OsString>) -> PathBuf {
    if let Some(path) = socket.filter(|p| !p.is_empty()) {
        return path.into();
    }
    let runtime_dir = runtime_dir
        .and_then(|dirs| {
            // systemd joins several RuntimeDirectory= entries with ':'.
            let first = dirs.to_string_lossy().split(':').next()?.to_owned();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| PathBuf::from("/run/relay-sidecar"));
    runtime_dir.join(SOCKET_NAME)
}

/// Connects to the daemon at the socket named by [`SOCKET_ENV`], else at
/// [`default_socket_path`].
pub async fn connect_default() -> Result<Client, Error> {
    let path = socket_path_from(
        std::env::var_os(SOCKET_ENV),
        std::env::var_os("RUNTIME_DIRECTORY"),
    );
    connect(path).await
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
        .map_err(|e| Error::connect(path, e))?;
    Ok(Client::from_channel(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_precedence() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            socket_path_from(some("/tmp/x.sock"), some("/run/a")),
            PathBuf::from("/tmp/x.sock")
        );
        assert_eq!(
            socket_path_from(some(""), some("/run/a")),
            PathBuf::from("/run/a/relay.sock")
        );
        assert_eq!(
            socket_path_from(None, some("/run/a:/run/b")),
            PathBuf::from("/run/a/relay.sock")
        );
        assert_eq!(
            socket_path_from(None, some("")),
            PathBuf::from("/run/relay-sidecar/relay.sock")
        );
        assert_eq!(
            socket_path_from(None, None),
            PathBuf::from("/run/relay-sidecar/relay.sock")
        );
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
