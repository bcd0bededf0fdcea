//! The Unix socket the gRPC service listens on: created with its final mode
//! and group (no moment in which it is wider, and the process-wide umask
//! untouched), a stale file from a dead daemon replaced, a live daemon on the
//! same path refused, and on exit the file removed only if it is still the one
//! this daemon made; or the listening socket systemd hands over.
//! [`connections`](crate::connections) accepts and bounds what connects.

use std::ffi::OsString;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{FchmodatFlags, Mode};
use nix::unistd::{Gid, UnlinkatFlags};
use tokio::net::UnixListener;
use tracing::{info, warn};

/// Connections the kernel queues before the daemon accepts them.
const BACKLOG: i32 = 1024;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("socket {0}: another relay-sidecar is already serving on it")]
    InUse(PathBuf),
    #[error("socket {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error(
        "socket_group: cannot give socket {path} to group {gid}: {source} (the daemon's user \
         must be a member; under systemd, add SupplementaryGroups= and SystemCallFilter=@chown \
         in a drop-in: README, \"Install as a service\")"
    )]
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

/// The socket file, removed when this is dropped if it is still the file
/// this daemon created (not systemd's, not a newer daemon's).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Set when this daemon created the file (not systemd's socket unit,
    /// which keeps it for the next activation).
    owned: Option<Created>,
}

/// What identifies the file this daemon bound: the directory it was made
/// in (held open, so a directory symlink re-pointed later does not matter),
/// its name there, and its device and inode.
#[derive(Debug)]
struct Created {
    dir: File,
    name: OsString,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the socket came from systemd rather than from [`bind`].
    pub fn activated(&self) -> bool {
        self.owned.is_none()
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let Some(created) = &self.owned else {
            return;
        };
        let socket = self.path.display();
        match nix::sys::stat::fstatat(
            &created.dir,
            created.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if (st.st_dev, st.st_ino) == (created.dev, created.ino) => {
                match nix::unistd::unlinkat(
                    &created.dir,
                    created.name.as_os_str(),
                    UnlinkatFlags::NoRemoveDir,
                ) {
                    Ok(()) => info!(%socket, "socket removed"),
                    Err(e) => warn!(%socket, error = %e, "cannot remove socket"),
                }
            }
            // Another daemon replaced it after this one stopped listening:
            // it is that daemon's now.
            Ok(_) => info!(%socket, "socket file is no longer this daemon's; left in place"),
            Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => warn!(%socket, error = %e, "cannot check socket before removing it"),
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
    let errno = |e: nix::errno::Errno| io(e.into());
    let (dir_path, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name.to_os_string()),
        _ => {
            return Err(io(std::io::Error::new(
                ErrorKind::InvalidInput,
                "not a file path",
            )));
        }
    };
    let dir_path = if dir_path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        std::fs::create_dir_all(dir_path).map_err(io)?;
        dir_path
    };
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
    let dir = File::open(dir_path).map_err(io)?;
    // The file takes its mode from the socket's inode, less the umask, when
    // bind(2) creates it (Linux): set on the socket first, it is never wider
    // than asked, and the umask (process-wide, shared with every thread)
    // stays untouched. Until the file has its group, only the owner's bits:
    // the daemon's own group is not the one the socket is meant for.
    let first = if group.is_some() { mode & 0o700 } else { mode };
    let socket = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(errno)?;
    nix::sys::stat::fchmod(&socket, Mode::from_bits_truncate(first)).map_err(errno)?;
    let addr = UnixAddr::new(path).map_err(errno)?;
    {
        use std::os::fd::AsRawFd;
        nix::sys::socket::bind(socket.as_raw_fd(), &addr).map_err(errno)?;
    }
    let st = nix::sys::stat::fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(errno)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        owned: Some(Created {
            dir,
            name,
            dev: st.st_dev,
            ino: st.st_ino,
        }),
    };
    let created = file.owned.as_ref().expect("just set");
    if let Some(gid) = group {
        nix::unistd::fchownat(
            &created.dir,
            created.name.as_os_str(),
            None,
            Some(gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| IpcError::Group {
            path: path.to_path_buf(),
            gid: gid.as_raw(),
            source: e.into(),
        })?;
    }
    // A umask can only take bits away; set the exact mode asked for.
    nix::sys::stat::fchmodat(
        &created.dir,
        created.name.as_os_str(),
        Mode::from_bits_truncate(mode),
        FchmodatFlags::FollowSymlink,
    )
    .map_err(errno)?;
    nix::sys::socket::listen(&socket, Backlog::new(BACKLOG).map_err(errno)?).map_err(errno)?;
    let listener =
        UnixListener::from_std(std::os::unix::net::UnixListener::from(socket)).map_err(io)?;
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
            owned: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
            async move { tokio::net::UnixStream::connect(path).await.unwrap() }
        });
        let (conn, _) = listener.accept().await.unwrap();
        let cred = conn.peer_cred().unwrap();
        assert_eq!(cred.uid(), nix::unistd::geteuid().as_raw());
        drop(client.await.unwrap());
        drop(socket);
        assert!(path.exists(), "systemd's socket file stays");
    }

    /// Binding leaves the process-wide umask alone: files another thread
    /// creates meanwhile get the modes they always would.
    #[test]
    fn binding_does_not_change_the_umask() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let creator = std::thread::spawn({
            let (dir, stop) = (dir.path().join("files"), std::sync::Arc::clone(&stop));
            move || {
                std::fs::create_dir(&dir).unwrap();
                let mut modes = std::collections::BTreeSet::new();
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let path = dir.join(format!("f{}", i % 64));
                    let _ = std::fs::remove_file(&path);
                    std::fs::File::create(&path).unwrap();
                    modes.insert(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777);
                }
                modes
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..200 {
                let path = dir.path().join(format!("s{i}.sock"));
                let (_listener, socket) = bind(&path, 0o600, None).unwrap();
                assert_eq!(
                    std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                    0o600
                );
                drop(socket);
            }
        });
        stop.store(true, Ordering::Relaxed);
        let modes = creator.join().unwrap();
        assert_eq!(modes.len(), 1, "files were created with modes {modes:?}");
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
