//! This host's peer identity on the relay: a uuid and a name. Without a
//! configured uuid, one is created on first start and kept in the state
//! directory, so that peers can find this host again after a restart. A file
//! that cannot be read back is an error, never a silently new identity.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The file, inside the state directory, that holds the identity.
pub const IDENTITY_FILE: &str = "identity.json";

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
    #[error("cannot read identity file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create identity file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find the host name for the peer name (set name): {0}")]
    Hostname(std::io::Error),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    uuid: Uuid,
}

/// Settles the identity: the configured uuid, else the stored one, else a new
/// one that is stored. The name is the configured one, else the host name.
pub fn resolve(
    uuid: Option<Uuid>,
    name: Option<&str>,
    state_dir: &Path,
) -> Result<Identity, IdentityError> {
    let uuid = match uuid {
        Some(uuid) => uuid,
        None => load_or_create(state_dir)?,
    };
    let name = match name {
        Some(name) => name.to_owned(),
        None => hostname::get()
            .map_err(IdentityError::Hostname)?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(Identity { uuid, name })
}

fn load_or_create(state_dir: &Path) -> Result<Uuid, IdentityError> {
    let path = state_dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<Stored>(&text)
            .map(|stored| stored.uuid)
            .map_err(|e| IdentityError::Corrupt {
                path,
                why: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let uuid = Uuid::new_v4();
            store(&path, uuid).map_err(|source| IdentityError::Write { path, source })?;
            tracing::info!(%uuid, "created a new peer identity");
            Ok(uuid)
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// Writes the identity atomically: a crash leaves the old file or the new
/// one, never half of one.
fn store(path: &Path, uuid: Uuid) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let partial = dir.join(format!(".{IDENTITY_FILE}.{}", std::process::id()));
    let text = serde_json::to_string(&Stored { uuid }).expect("a uuid always serialises");
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = resolve(None, Some("h"), &state).unwrap();
        let again = resolve(None, Some("h"), &state).unwrap();
        assert_eq!(first, again);
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
    fn name_defaults_to_the_host_name() {
        let dir = tempfile::tempdir().unwrap();
        let id = resolve(Some(Uuid::new_v4()), None, dir.path()).unwrap();
        assert_eq!(id.name, hostname::get().unwrap().to_string_lossy());
    }
}
