//! Where a relay-sidecar daemon puts its socket, its identity and its config
//! file, and where clients look for it: one rule, used by the daemon,
//! `relayctl` and this SDK. The Python SDK (`relay_sidecar._paths`) carries
//! the same rule; a test holds the two to one table of environments.
//!
//! A daemon is a **system service** when systemd gave it a runtime or state
//! directory (`$RUNTIME_DIRECTORY` or `$STATE_DIRECTORY` is set, as under
//! the shipped unit) or when it runs as root. Anyone else runs a **user
//! daemon** (an HPC job, a login shell, a `systemd --user` unit):
//!
//! | | system service | user daemon |
//! | --- | --- | --- |
//! | runtime directory | `$RUNTIME_DIRECTORY`, else `/run/relay-sidecar` | `$XDG_RUNTIME_DIR/relay-sidecar` when that directory exists and is the user's, else `/tmp/relay-sidecar-$UID` |
//! | socket | `relay.sock` in the runtime directory | the same |
//! | identity | `$STATE_DIRECTORY`, else `/var/lib/relay-sidecar` | `$XDG_STATE_HOME/relay-sidecar/HOST`, else `~/.local/state/relay-sidecar/HOST` |
//! | config | `/etc/relay-sidecar/config.toml` | that, then `$XDG_CONFIG_HOME/relay-sidecar/config.toml` (else `~/.config/...`) |
//!
//! With a job label (`RELAY_SIDECAR_JOB`, `--job`), the socket and the
//! identity both live in `job-LABEL/` inside the runtime directory: each job
//! has its own daemon, socket and peer identity, so that several jobs of one
//! user on one node never displace each other on the relay, and nothing of
//! a job outlives it in the home directory.
//!
//! Clients (given no socket) try, in order: `$RELAY_SIDECAR_SOCKET` alone if
//! set; else with a job label, the job's socket under each user runtime
//! directory; else the user daemon's socket under each user runtime
//! directory, then the system service's `/run/relay-sidecar/relay.sock`.
//! Root's clients try only the system service's. A client never reads
//! `$RUNTIME_DIRECTORY`: that is its own service's directory, not the
//! daemon's.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable naming the daemon's socket, for clients and the
/// daemon alike (the daemon's `socket` setting).
pub const SOCKET_ENV: &str = "RELAY_SIDECAR_SOCKET";
/// The environment variable naming a job, for clients and the daemon alike
/// (the daemon's `job` setting).
pub const JOB_ENV: &str = "RELAY_SIDECAR_JOB";
/// The system service's runtime directory when systemd did not name one.
pub const SYSTEM_RUNTIME_DIR: &str = "/run/relay-sidecar";
/// The system service's state directory when systemd did not name one.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/relay-sidecar";
/// The system-wide config file.
pub const SYSTEM_CONFIG_FILE: &str = "/etc/relay-sidecar/config.toml";
/// The socket's file name inside the runtime directory.
pub const SOCKET_NAME: &str = "relay.sock";
/// The directory name under the XDG base directories.
const APP_DIR: &str = "relay-sidecar";
/// The longest job label. A job's socket path must stay under the kernel's
/// 107 bytes: `/tmp/relay-sidecar-UID/job-LABEL/relay.sock` with a 10-digit
/// uid leaves room for 48, enough for PBS ids such as
/// `1234567.pbs01.hpc.some-university.edu`.
pub const MAX_JOB_LEN: usize = 48;

/// Which kind of daemon the environment describes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Run by systemd with its directories, or by root.
    System,
    /// Run by an ordinary user for themself.
    User,
}

/// A job label that cannot name a directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "job {0:?}: a job label is 1 to {MAX_JOB_LEN} letters, digits, '.', '_' or '-', not starting with '.' (e.g. a Slurm job id, RELAY_SIDECAR_JOB=$SLURM_JOB_ID)"
)]
pub struct BadJob(pub String);

/// What the rule reads: a few environment variables and the effective uid.
/// Empty variables count as unset; XDG variables that are not absolute
/// paths are ignored, as the XDG base directory specification says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// The effective uid.
    pub uid: u32,
    /// `$RELAY_SIDECAR_SOCKET`.
    pub socket: Option<PathBuf>,
    /// `$RELAY_SIDECAR_JOB`.
    pub job: Option<String>,
    /// `$RUNTIME_DIRECTORY` (its first entry if systemd lists several).
    pub runtime_directory: Option<PathBuf>,
    /// `$STATE_DIRECTORY` (its first entry).
    pub state_directory: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$XDG_STATE_HOME`.
    pub xdg_state_home: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// `$HOME`, else the home directory in the user database.
    pub home: Option<PathBuf>,
}

impl Environment {
    /// This process's environment and effective uid.
    pub fn current() -> Environment {
        Environment::from_vars(std::env::vars_os(), nix::unistd::geteuid().as_raw())
            .or_passwd_home()
    }

    /// Without `$HOME`, the home directory in the user database.
    pub fn or_passwd_home(mut self) -> Environment {
        if self.home.is_none() {
            self.home = nix::unistd::User::from_uid(self.uid.into())
                .ok()
                .flatten()
                .map(|user| user.dir)
                .filter(|dir| dir.is_absolute());
        }
        self
    }

    /// The rule's inputs from `vars` (name, value pairs; others are
    /// ignored) and `uid`.
    pub fn from_vars<I, K, V>(vars: I, uid: u32) -> Environment
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let mut env = Environment {
            uid,
            ..Environment::default()
        };
        for (name, value) in vars {
            let (name, value) = (name.into(), value.into());
            if value.is_empty() {
                continue;
            }
            let path = || Some(PathBuf::from(&value));
            let absolute = || path().filter(|p| p.is_absolute());
            // systemd joins several directories of one kind with ':'.
            let first = || {
                let text = value.to_string_lossy();
                let first = text.split(':').next().unwrap_or_default();
                (!first.is_empty()).then(|| PathBuf::from(first))
            };
            match name.to_str() {
                Some(SOCKET_ENV) => env.socket = path(),
                Some(JOB_ENV) => env.job = Some(value.to_string_lossy().into_owned()),
                Some("RUNTIME_DIRECTORY") => env.runtime_directory = first(),
                Some("STATE_DIRECTORY") => env.state_directory = first(),
                Some("XDG_RUNTIME_DIR") => env.xdg_runtime_dir = absolute(),
                Some("XDG_STATE_HOME") => env.xdg_state_home = absolute(),
                Some("XDG_CONFIG_HOME") => env.xdg_config_home = absolute(),
                Some("HOME") => env.home = absolute(),
                _ => {}
            }
        }
        env
    }

    /// System service or user daemon, for a daemon in this environment.
    pub fn scope(&self) -> Scope {
        if self.runtime_directory.is_some() || self.state_directory.is_some() || self.uid == 0 {
            Scope::System
        } else {
            Scope::User
        }
    }

    /// `job-LABEL` for the job label, checked; `None` without one.
    pub fn job_dir_name(&self) -> Result<Option<String>, BadJob> {
        let Some(job) = &self.job else {
            return Ok(None);
        };
        let fits = (1..=MAX_JOB_LEN).contains(&job.len())
            && !job.starts_with('.')
            && job
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if fits {
            Ok(Some(format!("job-{job}")))
        } else {
            Err(BadJob(job.clone()))
        }
    }

    /// A user daemon's possible runtime directories, without a job, best
    /// first: under `$XDG_RUNTIME_DIR` when set, then a per-uid directory in
    /// `/tmp`.
    ///
    /// `/tmp` rather than the home directory: a socket must be on a file
    /// system local to the node (a home on NFS is shared by every node, and
    /// a daemon on one node would take another node's socket file for a
    /// stale one), `/tmp` is node-local on every cluster and short enough
    /// for the kernel's 107-byte socket paths. The daemon creates it 0700 and
    /// refuses one that another user owns (see the daemon's `rundir`).
    pub fn user_runtime_bases(&self) -> Vec<PathBuf> {
        let mut bases: Vec<PathBuf> = self
            .xdg_runtime_dir
            .iter()
            .map(|dir| dir.join(APP_DIR))
            .collect();
        bases.push(PathBuf::from(format!("/tmp/{APP_DIR}-{}", self.uid)));
        bases
    }

    /// The runtime directory a daemon in this environment uses (without
    /// `socket` set): the first of [`Environment::user_runtime_bases`] whose
    /// parent is usable, per `usable` (the daemon asks whether
    /// `$XDG_RUNTIME_DIR` exists and is the user's: one set by a login node
    /// and inherited by a batch job often does not exist on the compute
    /// node), or the system one; with a job, its `job-LABEL` inside.
    pub fn daemon_runtime_dir(&self, usable: impl Fn(&Path) -> bool) -> Result<PathBuf, BadJob> {
        let base = match self.scope() {
            Scope::System => self
                .runtime_directory
                .clone()
                .unwrap_or_else(|| PathBuf::from(SYSTEM_RUNTIME_DIR)),
            Scope::User => {
                let bases = self.user_runtime_bases();
                let xdg_usable = self.xdg_runtime_dir.as_deref().is_some_and(&usable);
                if xdg_usable {
                    bases[0].clone()
                } else {
                    bases[bases.len() - 1].clone()
                }
            }
        };
        Ok(match self.job_dir_name()? {
            Some(job) => base.join(job),
            None => base,
        })
    }

    /// Where a daemon keeps its identity (without `state_dir` set), given
    /// the host's name and its runtime directory: a job's lives and ends
    /// with the job's runtime directory; a user's is kept per host, because
    /// a home directory is often shared by every node of a cluster and two
    /// hosts with one identity would displace each other on the relay.
    /// `None`: a user daemon with no home directory.
    pub fn daemon_state_dir(&self, host: &str, runtime_dir: &Path) -> Option<PathBuf> {
        if self.job.is_some() {
            return Some(runtime_dir.to_path_buf());
        }
        match self.scope() {
            Scope::System => Some(
                self.state_directory
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(SYSTEM_STATE_DIR)),
            ),
            Scope::User => {
                let base = match &self.xdg_state_home {
                    Some(dir) => dir.clone(),
                    None => self.home.as_ref()?.join(".local/state"),
                };
                Some(base.join(APP_DIR).join(host))
            }
        }
    }

    /// The config files a daemon reads when none is named, later winning.
    pub fn config_files(&self) -> Vec<PathBuf> {
        let mut files = vec![PathBuf::from(SYSTEM_CONFIG_FILE)];
        if self.scope() == Scope::User {
            let base = match (&self.xdg_config_home, &self.home) {
                (Some(dir), _) => Some(dir.clone()),
                (None, Some(home)) => Some(home.join(".config")),
                (None, None) => None,
            };
            files.extend(base.map(|dir| dir.join(APP_DIR).join("config.toml")));
        }
        files
    }

    /// The sockets a client tries, in order (see the module docs).
    pub fn client_sockets(&self) -> Result<Vec<PathBuf>, BadJob> {
        if let Some(socket) = &self.socket {
            return Ok(vec![socket.clone()]);
        }
        let system = PathBuf::from(SYSTEM_RUNTIME_DIR).join(SOCKET_NAME);
        let job = self.job_dir_name()?;
        if self.uid == 0 {
            return Ok(vec![match job {
                Some(job) => PathBuf::from(SYSTEM_RUNTIME_DIR)
                    .join(job)
                    .join(SOCKET_NAME),
                None => system,
            }]);
        }
        let mut sockets: Vec<PathBuf> = self
            .user_runtime_bases()
            .into_iter()
            .map(|base| match &job {
                Some(job) => base.join(job).join(SOCKET_NAME),
                None => base.join(SOCKET_NAME),
            })
            .collect();
        if job.is_none() {
            sockets.push(system);
        }
        Ok(sockets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)], uid: u32) -> Environment {
        Environment::from_vars(vars.iter().copied(), uid)
    }

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn the_scope_follows_systemd_and_root() {
        assert_eq!(env(&[], 1000).scope(), Scope::User);
        assert_eq!(env(&[], 0).scope(), Scope::System);
        assert_eq!(
            env(&[("RUNTIME_DIRECTORY", "/run/x")], 1000).scope(),
            Scope::System
        );
        assert_eq!(
            env(&[("STATE_DIRECTORY", "/var/lib/x")], 1000).scope(),
            Scope::System
        );
        assert_eq!(env(&[("RUNTIME_DIRECTORY", "")], 1000).scope(), Scope::User);
    }

    #[test]
    fn a_user_daemon_falls_back_to_tmp_when_xdg_runtime_dir_is_unusable() {
        let e = env(&[("XDG_RUNTIME_DIR", "/run/user/1000")], 1000);
        assert_eq!(
            e.daemon_runtime_dir(|_| true).unwrap(),
            PathBuf::from("/run/user/1000/relay-sidecar")
        );
        assert_eq!(
            e.daemon_runtime_dir(|_| false).unwrap(),
            PathBuf::from("/tmp/relay-sidecar-1000")
        );
        // Wherever the daemon went, its clients look there.
        let sockets = e.client_sockets().unwrap();
        for usable in [true, false] {
            let dir = e.daemon_runtime_dir(|_| usable).unwrap();
            assert!(sockets.contains(&dir.join(SOCKET_NAME)), "{sockets:?}");
        }
    }

    #[test]
    fn jobs_have_their_own_socket_and_identity() {
        let e = env(&[("RELAY_SIDECAR_JOB", "4242"), ("HOME", "/home/u")], 1000);
        let dir = e.daemon_runtime_dir(|_| true).unwrap();
        assert_eq!(dir, PathBuf::from("/tmp/relay-sidecar-1000/job-4242"));
        assert_eq!(e.daemon_state_dir("node1", &dir), Some(dir.clone()));
        assert_eq!(
            e.client_sockets().unwrap(),
            paths(&["/tmp/relay-sidecar-1000/job-4242/relay.sock"])
        );
        for bad in [
            "",
            "a/b",
            "..",
            ".hidden",
            "x y",
            &"9".repeat(MAX_JOB_LEN + 1),
        ] {
            let e = env(&[("RELAY_SIDECAR_JOB", bad)], 1000);
            if bad.is_empty() {
                assert_eq!(e.job, None);
                continue;
            }
            assert!(e.client_sockets().is_err(), "{bad:?}");
            assert!(e.daemon_runtime_dir(|_| true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_user_identity_is_kept_per_host() {
        let e = env(&[("HOME", "/home/u")], 1000);
        let run = Path::new("/unused");
        assert_eq!(
            e.daemon_state_dir("node7", run),
            Some(PathBuf::from("/home/u/.local/state/relay-sidecar/node7"))
        );
        let e = env(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "/s")], 1000);
        assert_eq!(
            e.daemon_state_dir("node7", run),
            Some(PathBuf::from("/s/relay-sidecar/node7"))
        );
        // A relative XDG path is ignored, as the specification says.
        let e = env(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "rel")], 1000);
        assert_eq!(
            e.daemon_state_dir("n", run),
            Some(PathBuf::from("/home/u/.local/state/relay-sidecar/n"))
        );
        assert_eq!(env(&[], 1000).daemon_state_dir("n", run), None);
        assert_eq!(
            env(&[("STATE_DIRECTORY", "/var/lib/a:/var/lib/b")], 1000).daemon_state_dir("n", run),
            Some(PathBuf::from("/var/lib/a"))
        );
    }

    #[test]
    fn config_files_for_each_scope() {
        assert_eq!(
            env(&[("HOME", "/home/u")], 0).config_files(),
            paths(&[SYSTEM_CONFIG_FILE])
        );
        assert_eq!(
            env(&[("HOME", "/home/u")], 1000).config_files(),
            paths(&[
                SYSTEM_CONFIG_FILE,
                "/home/u/.config/relay-sidecar/config.toml"
            ])
        );
        assert_eq!(
            env(&[("XDG_CONFIG_HOME", "/c")], 1000).config_files(),
            paths(&[SYSTEM_CONFIG_FILE, "/c/relay-sidecar/config.toml"])
        );
    }
}
