//! The daemon's private directories: a user daemon's runtime directory (its
//! socket, and a job's identity) and the state directory (the identity).
//! Created 0700; an existing one must be a directory that this user owns
//! and nobody else may write, or the daemon refuses it: in a shared `/tmp`,
//! another user could have made it first to catch the socket. A symbolic
//! link is followed only when it belongs to this user or to root (systemd's
//! `DynamicUser=` makes `/var/lib/NAME` a root-owned link to
//! `/var/lib/private/NAME`): another user's link could be re-pointed after
//! the check.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::Gid;

/// Why a private directory cannot be used. The caller adds which setting
/// moves it.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is a symbolic link that belongs to uid {owner}, neither you nor root; refusing it (remove it)"
    )]
    Symlink { path: PathBuf, owner: u32 },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "{path} belongs to uid {owner}, not to you (uid {you}); someone else made it, so it is not safe to use"
    )]
    NotYours { path: PathBuf, owner: u32, you: u32 },
    #[error(
        "{path} is writable by others (mode {mode:04o}); fix it with `chmod 700 {path}` or remove it"
    )]
    Open { path: PathBuf, mode: u32 },
    #[error("cannot set the mode or group of {path}: {source}")]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DirError {
    /// Whether the cause is a permission refused by the system (the usual
    /// case for a default path of the system service).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, DirError::Create { source, .. } if source.kind() == ErrorKind::PermissionDenied)
    }
}

/// Makes `dir` a directory only this user may use, creating it and its
/// missing parents: mode 0700, or 0710 owned by `group` when given (its
/// members may reach a socket inside, not list or add files).
pub fn ensure_private(dir: &Path, group: Option<Gid>) -> Result<(), DirError> {
    let you = nix::unistd::geteuid().as_raw();
    let create = |source| DirError::Create {
        path: dir.to_path_buf(),
        source,
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(create)?;
    }
    // The mode at creation: never wider, whatever the umask (it can only
    // take bits away); the exact mode is set below.
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create(e)),
    }
    let mut meta = std::fs::symlink_metadata(dir).map_err(create)?;
    if meta.file_type().is_symlink() {
        if meta.uid() != you && meta.uid() != 0 {
            return Err(DirError::Symlink {
                path: dir.to_path_buf(),
                owner: meta.uid(),
            });
        }
        // What it leads to meets the same checks as a directory would.
        meta = std::fs::metadata(dir).map_err(create)?;
    }
    if !meta.is_dir() {
        return Err(DirError::NotADirectory(dir.to_path_buf()));
    }
    if meta.uid() != you {
        return Err(DirError::NotYours {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            you,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(DirError::Open {
            path: dir.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    let chmod = |source| DirError::Chmod {
        path: dir.to_path_buf(),
        source,
    };
    let mode = match group {
        Some(gid) => {
            if meta.gid() != gid.as_raw() {
                nix::unistd::chown(dir, None, Some(gid)).map_err(|e| chmod(e.into()))?;
            }
            0o710
        }
        None => 0o700,
    };
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(chmod)?;
    }
    Ok(())
}

/// Whether this process may create files in `dir` (or create `dir`), as a
/// check before binding there; the error says why not.
pub fn check_writable(dir: &Path) -> Result<(), DirError> {
    let create = |source| DirError::Create {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(create)?;
    }
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|e| create(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn created_0700_and_narrowed_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("a/b/private");
        ensure_private(&private, None).unwrap();
        assert_eq!(mode(&private), 0o700);
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private(&private, None).unwrap();
        assert_eq!(mode(&private), 0o700);
        let gid = nix::unistd::getgid();
        ensure_private(&private, Some(gid)).unwrap();
        assert_eq!(mode(&private), 0o710);
    }

    #[test]
    fn links_of_another_user_files_and_open_directories_are_refused() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test gives a link to another user: run the suite as root (scripts/test does in CI)"
        );
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let other = nix::unistd::Uid::from_raw(4242);
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(other),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let err = ensure_private(&link, None).unwrap_err();
        assert!(
            matches!(err, DirError::Symlink { owner: 4242, .. }),
            "{err}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            ensure_private(&file, None),
            Err(DirError::NotADirectory(_))
        ));
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private(&target, None).unwrap_err();
        assert!(matches!(err, DirError::Open { mode: 0o777, .. }), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    /// As systemd's `DynamicUser=` lays out a `StateDirectory=`: a link
    /// (here this user's; there root's) to a private directory.
    #[test]
    fn a_link_of_this_user_or_root_leads_to_a_checked_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("private/state");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.path().join("state");
        std::os::unix::fs::symlink("private/state", &link).unwrap();
        ensure_private(&link, None).unwrap();
        assert_eq!(mode(&target), 0o700);
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        // A link to a directory nobody may trust is refused for that.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private(&link, None).unwrap_err();
        assert!(matches!(err, DirError::Open { mode: 0o777, .. }), "{err}");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        // Root owns /; nobody else may use it as their own.
        if nix::unistd::geteuid().is_root() {
            let dir = tempfile::tempdir().unwrap();
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            let err = ensure_private(&theirs, None).unwrap_err();
            assert!(
                matches!(err, DirError::NotYours { owner: 4242, .. }),
                "{err}"
            );
        } else {
            let err = ensure_private(Path::new("/"), None).unwrap_err();
            assert!(matches!(err, DirError::NotYours { owner: 0, .. }), "{err}");
        }
    }
}
