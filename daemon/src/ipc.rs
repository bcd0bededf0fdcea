//! The Unix socket the gRPC service listens on: created with its final mode
//! and group (no moment in which it is wider), a stale file from a dead daemon
//! replaced, a live daemon on the same path refused, the file removed on exit;
//! or the listening socket systemd hands over. Every accepted connection is
//! logged with its caller's credentials.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use nix::sys::stat::{Mode, umask};
use nix::unistd::Gid;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::authority::Normalise;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("socket {0}: another relay-sidecar is already serving on it")]
    InUse(PathBuf),
    #[error("socket {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket_group: cannot give socket {path} to group {gid}: {source}")]
    Group {
        path: PathBuf,
        gid: u32,
        source: std::io::Error,
    },
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The socket file, removed when this is dropped (unless systemd made it).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Whether this daemon created the file (not systemd's socket unit,
    /// which keeps it for the next activation).
    owned: bool,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the socket came from systemd rather than from [`bind`].
    pub fn activated(&self) -> bool {
        !self.owned
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => info!(socket = %self.path.display(), "socket removed"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => warn!(socket = %self.path.display(), error = %e, "cannot remove socket"),
        }
    }
}

/// Binds the socket at `path` with permission bits `mode`, owned by `group`
/// if given. The listener serves; the [`SocketFile`] removes the file when
/// dropped.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<Gid>,
) -> Result<(UnixListener, SocketFile), IpcError> {
    let io = |source| IpcError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(IpcError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    info!(socket = %path.display(), "replacing a stale socket");
                    std::fs::remove_file(path).map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            }
        }
        Ok(_) => return Err(IpcError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // The umask is per process; binding happens at start-up before any other
    // file is created, and the old mask is restored at once. Until the file
    // has its group, only the owner's bits are granted: the daemon's own
    // group is not the one the socket is meant for.
    let first = if group.is_some() { mode & 0o700 } else { mode };
    let old = umask(Mode::from_bits_truncate(!first & 0o777));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(io)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        owned: true,
    };
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| IpcError::Group {
            path: path.to_path_buf(),
            gid: gid.as_raw(),
            source: e.into(),
        })?;
    }
    // A umask can only take bits away; set the exact mode asked for.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok((listener, file))
}

/// Serves on a listening socket systemd passed (socket activation). Its
/// file, mode and group are the socket unit's: they are left alone.
pub fn activated(
    listener: std::os::unix::net::UnixListener,
) -> Result<(UnixListener, SocketFile), IpcError> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default();
    let io = |source| IpcError::Io {
        path: path.clone(),
        source,
    };
    // Inherited sockets may be blocking; tokio needs them not to be.
    listener.set_nonblocking(true).map_err(io)?;
    let listener = UnixListener::from_std(listener).map_err(io)?;
    Ok((
        listener,
        SocketFile {
            path: path.clone(),
            owned: false,
        },
    ))
}

/// The connections accepted on `listener`, each logged with its caller's
/// credentials and wrapped so that h2 accepts any client's `:authority`.
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = std::io::Result<Normalise<UnixStream>>> + Send + 'static {
    UnixListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        match stream.peer_cred() {
            Ok(cred) => info!(
                uid = cred.uid(),
                gid = cred.gid(),
                pid = cred.pid().unwrap_or(0),
                "caller connected"
            ),
            Err(e) => warn!(error = %e, "caller connected; its credentials are unknown"),
        }
        Ok(Normalise::new(stream))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn live_socket_refused_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/relay.sock");
        let first = bind(&path, 0o660, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&path, 0o660, None), Err(IpcError::InUse(_))));
        drop(first);
        assert!(!path.exists());

        // A daemon that died leaves its socket file with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let second = bind(&path, 0o600, None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(second);
    }

    #[tokio::test]
    async fn the_group_is_set_and_the_mode_never_wider() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        // Any group works for root; others may use only their own.
        let gid = if nix::unistd::geteuid().is_root() {
            Gid::from_raw(nix::unistd::getgid().as_raw() + 4242)
        } else {
            nix::unistd::getgid()
        };
        let socket = bind(&path, 0o640, Some(gid)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.gid(), meta.mode() & 0o777), (gid.as_raw(), 0o640));
        drop(socket);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn an_activated_socket_is_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        let std = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (listener, socket) = activated(std).unwrap();
        assert_eq!(socket.path(), path);
        assert!(socket.activated());
        let client = tokio::spawn({
            let path = path.clone();
            async move { UnixStream::connect(path).await.unwrap() }
        });
        let mut connections = Box::pin(incoming(listener));
        let conn = connections.next().await.unwrap().unwrap();
        let cred = conn.get_ref().peer_cred().unwrap();
        assert_eq!(cred.uid(), nix::unistd::geteuid().as_raw());
        drop(client.await.unwrap());
        drop(socket);
        assert!(path.exists(), "systemd's socket file stays");
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        std::fs::write(&path, "data").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(async { bind(&path, 0o660, None) }).unwrap_err();
        assert!(matches!(err, IpcError::NotASocket(_)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
