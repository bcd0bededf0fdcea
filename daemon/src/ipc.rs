//! The Unix socket the gRPC service listens on: created with its final mode
//! (no moment in which it is wider), a stale file from a dead daemon
//! replaced, a live daemon on the same path refused, the file removed on exit.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;
use tracing::{info, warn};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("socket {0}: another relay-sidecar is already serving on it")]
    InUse(PathBuf),
    #[error("socket {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The socket file, removed when this is dropped.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => info!(socket = %self.path.display(), "socket removed"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => warn!(socket = %self.path.display(), error = %e, "cannot remove socket"),
        }
    }
}

/// Binds the socket at `path` with permission bits `mode`. The listener
/// serves; the [`SocketFile`] removes the file when dropped.
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), IpcError> {
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
    // file is created, and the old mask is restored at once.
    let old = umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(io)?;
    let file = SocketFile {
        path: path.to_path_buf(),
    };
    // A umask can only take bits away; set the exact mode asked for.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn live_socket_refused_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/relay.sock");
        let first = bind(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&path, 0o660), Err(IpcError::InUse(_))));
        drop(first);
        assert!(!path.exists());

        // A daemon that died leaves its socket file with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let second = bind(&path, 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(second);
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
        let err = rt.block_on(async { bind(&path, 0o660) }).unwrap_err();
        assert!(matches!(err, IpcError::NotASocket(_)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
