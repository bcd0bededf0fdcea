//! This host's peer identity on the relay: a uuid and a name. Without a
//! configured uuid, one is created on first start and kept in the state
//! directory, so that peers can find this host again after a restart. A file
//! that cannot be read back is an error, never a silently new identity.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::rundir::{self, DirError};

/// The file, inside the state directory, that holds the identity.
pub const IDENTITY_FILE: &str = "identity.json";
/// The largest identity file read: it holds a uuid and a host name, well
/// under a kilobyte; anything bigger is not one.
pub const MAX_IDENTITY_BYTES: u64 = 4096;

/// How to move the identity, for messages.
const MOVE_IT: &str = "state_dir moves it (--state-dir DIR, RELAY_SIDECAR_STATE_DIR)";

/// Who this host is on the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uuid: Uuid,
    pub name: String,
}

/// Why the identity could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "identity file {path} is corrupt ({why}); fix it, or remove it to create a new identity"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot read identity file {path}: {source}; {MOVE_IT}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create identity file {path}: {source}; {MOVE_IT}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state_dir: {0}; {MOVE_IT}")]
    Dir(#[from] DirError),
    #[error(
        "identity file {path} was made on host {theirs}, and this is {ours}: two hosts with one \
         identity displace each other on the relay. Give each host its own state_dir (a user \
         daemon's default, ~/.local/state/relay-sidecar/HOST, is one per host), or set uuid if \
         this host is meant to take over"
    )]
    OtherHost {
        path: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error("cannot find the host name for the peer name (set name): {0}")]
    Hostname(std::io::Error),
}

/// The file's content: the uuid, and the host that made it, so that a state
/// directory on a file system shared by several hosts (a home directory on
/// NFS) is never used by two of them at once.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    uuid: Uuid,
    /// Missing in files written before hosts were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
}

/// Settles the identity: the configured uuid, else the stored one, else a new
/// one that is stored. The name is the configured one, else the host name.
pub fn resolve(
    uuid: Option<Uuid>,
    name: Option<&str>,
    state_dir: &Path,
) -> Result<Identity, IdentityError> {
    let host = || {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .map_err(IdentityError::Hostname)
    };
    let uuid = match uuid {
        Some(uuid) => uuid,
        None => load_or_create(state_dir, &host()?)?,
    };
    let name = match name {
        Some(name) => name.to_owned(),
        None => host()?,
    };
    Ok(Identity { uuid, name })
}

/// The stored uuid of `host`, or a new one, stored.
fn load_or_create(state_dir: &Path, host: &str) -> Result<Uuid, IdentityError> {
    rundir::ensure_private(state_dir, None)?;
    let path = state_dir.join(IDENTITY_FILE);
    match read_stored(&path) {
        Ok(text) => {
            let stored: Stored =
                serde_json::from_str(&text).map_err(|e| IdentityError::Corrupt {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
            match stored.host {
                Some(theirs) if theirs != host => Err(IdentityError::OtherHost {
                    path,
                    theirs,
                    ours: host.to_owned(),
                }),
                Some(_) => Ok(stored.uuid),
                None => {
                    // Claim an older file for this host, so that another
                    // host sharing the directory is refused from now on.
                    if let Err(e) = store(&path, stored.uuid, host) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot record this host in the identity file");
                    }
                    Ok(stored.uuid)
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let uuid = Uuid::new_v4();
            store(&path, uuid, host).map_err(|source| IdentityError::Write { path, source })?;
            tracing::info!(%uuid, "created a new peer identity");
            Ok(uuid)
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => Err(IdentityError::Corrupt {
            path,
            why: "it is a symbolic link, which is never followed".to_owned(),
        }),
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// The file's text, without following a symbolic link, at most
/// [`MAX_IDENTITY_BYTES`].
fn read_stored(path: &Path) -> std::io::Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::other(format!(
            "it belongs to uid {}, not to this user",
            meta.uid()
        )));
    }
    let mut text = String::new();
    file.take(MAX_IDENTITY_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_IDENTITY_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_IDENTITY_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// Writes the identity atomically: a crash leaves the old file or the new
/// one, never half of one. The new file is made fresh (`O_EXCL`, never
/// through a symbolic link) with mode 0600, then renamed over the old name,
/// which replaces whatever is there rather than writing through it.
fn store(path: &Path, uuid: Uuid, host: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let partial = dir.join(format!(
        ".{IDENTITY_FILE}.{}.{}",
        std::process::id(),
        Uuid::new_v4().simple()
    ));
    let stored = Stored {
        uuid,
        host: Some(host.to_owned()),
    };
    let text = serde_json::to_string(&stored).expect("a uuid and a name always serialise");
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(&partial)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&partial, path)?;
        // The rename itself, durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = resolve(None, Some("h"), &state).unwrap();
        let again = resolve(None, Some("h"), &state).unwrap();
        assert_eq!(first, again);
        let file = state.join(IDENTITY_FILE);
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        let configured = Uuid::new_v4();
        assert_eq!(
            resolve(Some(configured), Some("h"), &state).unwrap().uuid,
            configured
        );
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        for bad in ["", "{", "{\"uuid\": \"nope\"}", "{\"uuid\": null}"] {
            std::fs::write(&path, bad).unwrap();
            let err = resolve(None, Some("h"), dir.path())
                .unwrap_err()
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("corrupt"), "{err}");
        }
        // The corrupt file is left for the operator to inspect.
        assert!(path.exists());
    }

    #[test]
    fn a_file_made_on_another_host_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = load_or_create(dir.path(), "node-a").unwrap();
        assert_eq!(load_or_create(dir.path(), "node-a").unwrap(), uuid);
        let err = load_or_create(dir.path(), "node-b")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("made on host node-a, and this is node-b") && err.contains("state_dir"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn an_older_file_is_claimed_for_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = Uuid::new_v4();
        let path = dir.path().join(IDENTITY_FILE);
        std::fs::write(&path, format!("{{\"uuid\": \"{uuid}\"}}")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(load_or_create(dir.path(), "node-a").unwrap(), uuid);
        assert!(std::fs::read_to_string(&path).unwrap().contains("node-a"));
        assert!(load_or_create(dir.path(), "node-b").is_err());
    }

    #[test]
    fn links_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::write(&elsewhere, format!("{{\"uuid\": \"{}\"}}", Uuid::new_v4())).unwrap();
        let state = dir.path().join("state");
        rundir::ensure_private(&state, None).unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.join(IDENTITY_FILE)).unwrap();
        let err = load_or_create(&state, "h").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");

        // Writing replaces a link rather than writing through it.
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let path = state.join(IDENTITY_FILE);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        store(&path, Uuid::new_v4(), "h").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(
            !std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn an_oversized_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(
            dir.path().join(IDENTITY_FILE),
            " ".repeat(MAX_IDENTITY_BYTES as usize + 1),
        )
        .unwrap();
        let err = load_or_create(dir.path(), "h").unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn name_defaults_to_the_host_name() {
        let dir = tempfile::tempdir().unwrap();
        let id = resolve(Some(Uuid::new_v4()), None, dir.path()).unwrap();
        assert_eq!(id.name, hostname::get().unwrap().to_string_lossy());
    }
}
