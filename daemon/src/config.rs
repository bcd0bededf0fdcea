//! Settings: defaults, then the TOML files, then `RELAY_SIDECAR_*`
//! environment variables, then command-line flags (later wins), and their
//! validation. Every bad value is reported as one line that names its key,
//! where it was set, and a valid example. Defaults for the socket, the state
//! directory and the config files follow the shared path rule
//! ([`relay_sidecar_client::paths`]): a system service's, or a user's own.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_sidecar_client::paths::{self, Environment, Scope};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::Dialect;
use crate::router::UnclaimedOffers;

/// The prefix of the environment variables that set keys.
pub const ENV_PREFIX: &str = "RELAY_SIDECAR";
/// The system-wide config file, read when `--config` is not given (if it
/// exists); a user daemon reads its own after it.
pub const DEFAULT_CONFIG_FILE: &str = paths::SYSTEM_CONFIG_FILE;
/// The largest config file read: a config is a few kilobytes, and anything
/// this large is a mistake (a log or a binary named by `--config`).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The longest socket path the kernel accepts (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// The example config, every key with its default (`relay-sidecar default-config`).
pub const EXAMPLE: &str = include_str!("../../deploy/config.toml");

/// Every setting of the daemon. Keys are flat so that each has one flag
/// (`--relay-url`) and one environment variable (`RELAY_SIDECAR_RELAY_URL`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The relay's URL, `ws://` or `wss://`. Required unless `dev`.
    pub relay_url: Option<String>,
    /// The relay's protocol generation.
    pub dialect: Dialect,
    /// This host's peer uuid. Unset: created once and kept in `state_dir`.
    pub uuid: Option<Uuid>,
    /// This host's peer name. Unset: the host name.
    pub name: Option<String>,
    /// Where the identity is kept.
    pub state_dir: Option<PathBuf>,
    /// A job label: its own socket and identity in `job-LABEL/` of the
    /// runtime directory, so that several jobs of one user on one node run
    /// side by side.
    pub job: Option<String>,
    /// The Unix socket the gRPC service listens on.
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file, in octal. Unset: 0660 for the
    /// system service and for a user daemon with a `socket_group`, else 0600.
    pub socket_mode: Option<String>,
    /// The group owning the socket file, a name or a number. Unset: the
    /// daemon's own group.
    pub socket_group: Option<String>,
    /// Callers admitted by uid (peer credentials). With `allow_gids`: a
    /// caller in either list is admitted; both empty admits anyone who can
    /// open the socket.
    #[serde(deserialize_with = "id_list")]
    pub allow_uids: Vec<u32>,
    /// Callers admitted by their (effective, primary) gid.
    #[serde(deserialize_with = "id_list")]
    pub allow_gids: Vec<u32>,
    /// Callers who may make the calls that affect every worker (Reconnect),
    /// by uid or gid. Both empty: root and the daemon's own uid.
    #[serde(deserialize_with = "id_list")]
    pub admin_uids: Vec<u32>,
    #[serde(deserialize_with = "id_list")]
    pub admin_gids: Vec<u32>,
    /// The least time between two Reconnects.
    #[serde(with = "humantime_serde")]
    pub reconnect_min_interval: Duration,
    /// Connections open on the socket at once (lowered to fit the file
    /// descriptor limit).
    pub max_connections: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time a connection may stay without an open call.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Where to serve Prometheus metrics over HTTP, e.g. "127.0.0.1:9464".
    /// Unset: no metrics endpoint.
    pub metrics_listen: Option<String>,
    /// Extra headers for the relay's opening handshake.
    pub headers: BTreeMap<String, String>,
    /// A file holding a bearer token for the relay; re-read at every connect.
    pub token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for `wss://` relays.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from a `wss://` relay. For testing only.
    pub insecure_skip_verify: bool,
    /// Time allowed to open the WebSocket and be registered.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a Send waits for registration when the call has no deadline.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// First retry delay; doubles per failed attempt up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// WebSocket ping period, and how long an answer may take.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// How long the relay may take to return what was written (the daemon
    /// follows its writes with a message to itself) before the connection
    /// counts as broken: it is dropped and the unconfirmed sends get UNKNOWN.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Connect on first use instead of at start.
    pub lazy: bool,
    /// The largest relay frame a Send may produce, in bytes.
    pub max_message_bytes: usize,
    /// Messages a subscriber may have waiting before it loses messages.
    pub subscriber_queue: usize,
    /// Bytes a subscriber may have waiting before it loses messages.
    pub subscriber_queue_bytes: usize,
    /// Messages kept while nobody is subscribed.
    pub backlog: usize,
    /// Bytes kept while nobody is subscribed.
    pub backlog_bytes: usize,
    /// How long a message may wait for the first subscriber.
    #[serde(with = "humantime_serde")]
    pub backlog_ttl: Duration,
    /// How long a worker's send to a peer binds that peer's replies to it.
    #[serde(with = "humantime_serde")]
    pub affinity: Duration,
    /// How long a conversation with a peer lasts after its last sign of life.
    #[serde(with = "humantime_serde")]
    pub conversation_ttl: Duration,
    /// What happens to an offer from a peer while nobody is subscribed.
    pub unclaimed_offers: UnclaimedOffers,
    /// Run an embedded relay on loopback and use it.
    pub dev: bool,
    /// Where the embedded relay listens.
    pub dev_listen: String,
    /// Log format: "auto" (text on a terminal, plain lines under journald),
    /// "text" or "json".
    pub log_format: String,
    /// Log filter when RUST_LOG is unset, e.g. "info" or "relay_sidecar=debug".
    pub log_level: String,
    /// Where each value came from, and the environment the defaults follow.
    #[serde(skip)]
    pub provenance: Provenance,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            relay_url: None,
            dialect: Dialect::Current,
            uuid: None,
            name: None,
            state_dir: None,
            job: None,
            socket: None,
            socket_mode: None,
            socket_group: None,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            admin_uids: Vec::new(),
            admin_gids: Vec::new(),
            reconnect_min_interval: crate::limits::DEFAULT_RECONNECT_MIN_INTERVAL,
            max_connections: crate::limits::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: crate::limits::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: crate::limits::DEFAULT_IDLE_TIMEOUT,
            metrics_listen: None,
            headers: BTreeMap::new(),
            token_file: None,
            ca_file: None,
            insecure_skip_verify: false,
            timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(20),
            confirm_timeout: Duration::from_secs(20),
            lazy: false,
            max_message_bytes: 1 << 20,
            subscriber_queue: 1024,
            subscriber_queue_bytes: 8 << 20,
            backlog: 1024,
            backlog_bytes: 8 << 20,
            backlog_ttl: Duration::from_secs(10),
            affinity: Duration::from_secs(60),
            conversation_ttl: Duration::from_secs(60),
            unclaimed_offers: UnclaimedOffers::Refuse,
            dev: false,
            dev_listen: "127.0.0.1:8700".into(),
            log_format: "auto".into(),
            log_level: "info".into(),
            provenance: Provenance::default(),
        }
    }
}

/// A setting that cannot be used. The message names the key and, once
/// loaded, where it was set and a valid example.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    key: Option<String>,
    origin: Option<Origin>,
    why: String,
}

impl ConfigError {
    /// Where the value came from.
    fn at(mut self, origin: Origin) -> Self {
        self.origin = Some(origin);
        self
    }

    pub(crate) fn key(key: &str, why: impl fmt::Display) -> Self {
        ConfigError {
            key: Some(key.to_owned()),
            origin: None,
            why: one_line(&why.to_string()),
        }
    }

    fn plain(why: impl fmt::Display) -> Self {
        ConfigError {
            key: None,
            origin: None,
            why: one_line(&why.to_string()),
        }
    }

    /// The key the error is about, if it is about one.
    pub fn key_name(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key, &self.origin) {
            (Some(key), Some(origin)) => write!(f, "{key} ({origin}): {}", self.why),
            (Some(key), None) => write!(f, "{key}: {}", self.why),
            (None, _) => f.write_str(&self.why),
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A config file.
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
    /// A command-line flag, by key.
    Flag(String),
}

impl Origin {
    /// `key` set to `value` the way this source spells it.
    fn example(&self, key: &str, value: &str) -> String {
        match self {
            Origin::File(_) => format!("{key} = {}", toml_text(key, value)),
            Origin::Env(name) => format!("{name}={value}"),
            Origin::Flag(_) => format!("--{} {value}", key.replace('_', "-")),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Env(name) => write!(f, "from {name}"),
            Origin::Flag(key) => write!(f, "from --{}", key.replace('_', "-")),
        }
    }
}

/// Where the settings came from: each key's source, the config files read,
/// what was ignored, and the environment whose rule gives the defaults.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    origins: BTreeMap<String, Origin>,
    files: Vec<PathBuf>,
    notes: Vec<String>,
    env: Option<Environment>,
}

impl Provenance {
    /// Where `key` was set, if not by default.
    pub fn origin(&self, key: &str) -> Option<&Origin> {
        self.origins.get(key)
    }

    /// The config files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// What was ignored while loading (unknown `RELAY_SIDECAR_*` variables, a
    /// default config file this user may not read), for one warning each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
}

/// Where settings come from, besides the defaults.
#[derive(Debug, Default)]
pub struct Sources {
    /// An explicit config file (must exist). None: the default file if present.
    pub file: Option<PathBuf>,
    /// Environment variables, as (name, value); normally `std::env::vars()`.
    pub env: Vec<(String, String)>,
    /// Flag values as (key, value), applied last.
    pub flags: Vec<(&'static str, String)>,
}

impl Settings {
    /// Layers defaults, files, environment and flags, then validates.
    ///
    /// The files: `sources.file` alone when given, else those of the path
    /// rule that exist (`/etc/relay-sidecar/config.toml`, then a user
    /// daemon's `$XDG_CONFIG_HOME/relay-sidecar/config.toml`). Only
    /// `RELAY_SIDECAR_<KEY>` variables naming a key are read; others are
    /// noted ([`Provenance::notes`]), never an error, and empty ones are
    /// unset.
    pub fn load(sources: Sources) -> Result<Settings, ConfigError> {
        let settings = Settings::layer(sources)?;
        settings.validate()?;
        Ok(settings)
    }

    /// What names the daemon's socket, for `relay-sidecar stop`: the
    /// settings layered and typed as by [`Settings::load`], the job label
    /// and socket path checked, the rest (a relay URL) not required.
    pub fn load_for_socket(sources: Sources) -> Result<Settings, ConfigError> {
        let settings = Settings::layer(sources)?;
        let check = || {
            settings
                .environment()
                .job_dir_name()
                .map_err(|e| ConfigError::key("job", e))?;
            match &settings.socket {
                Some(path) => check_socket_path(path),
                None => Ok(()),
            }
        };
        check().map_err(|e| settings.provenance.locate(e))?;
        Ok(settings)
    }

    /// Defaults, files, environment and flags, layered and typed.
    fn layer(sources: Sources) -> Result<Settings, ConfigError> {
        let env =
            Environment::from_vars(sources.env.iter().cloned(), nix::unistd::geteuid().as_raw())
                .or_passwd_home();
        let known = Known::new();
        let mut provenance = Provenance {
            env: Some(env.clone()),
            ..Provenance::default()
        };
        let mut builder = config::Config::builder();
        let files = match &sources.file {
            Some(path) => vec![(path.clone(), true)],
            None => env
                .config_files()
                .into_iter()
                .filter(|path| path.exists())
                .map(|path| (path, false))
                .collect(),
        };
        for (path, named) in files {
            let text = match read_config(&path) {
                Ok(text) => text,
                // A user daemon on a host whose service config is private.
                Err(e) if !named && e.kind() == std::io::ErrorKind::PermissionDenied => {
                    provenance.notes.push(format!(
                        "not reading {}: {e} (give --config FILE to read another)",
                        path.display()
                    ));
                    continue;
                }
                Err(e) => {
                    return Err(ConfigError::key(
                        "config",
                        format!("cannot read {}: {e}", path.display()),
                    ));
                }
            };
            let table: toml::Table = toml::from_str(&text).map_err(|e| {
                let line = e
                    .span()
                    .map(|span| format!(" line {}:", text[..span.start].lines().count().max(1)))
                    .unwrap_or_default();
                ConfigError::key(
                    "config",
                    format!("{}:{line} {}", path.display(), e.message()),
                )
            })?;
            let origin = Origin::File(path.clone());
            for (key, value) in &table {
                known.check(key, &origin)?;
                precheck(key, &Given::Toml(value), &origin)?;
                provenance.origins.insert(key.clone(), origin.clone());
            }
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
            provenance.files.push(path);
        }
        let mut ignored = Vec::new();
        for (name, value) in &sources.env {
            let Some(key) = name.strip_prefix(&format!("{ENV_PREFIX}_")) else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if !known.is_key(&key) {
                ignored.push(name.clone());
                continue;
            }
            if value.is_empty() {
                continue;
            }
            let origin = Origin::Env(name.clone());
            if known.is_table(&key) {
                return Err(ConfigError::key(
                    &key,
                    "cannot be set from the environment; set it in the config file",
                )
                .at(origin));
            }
            precheck(&key, &Given::Text(value), &origin)?;
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| ConfigError::key(&key, e).at(origin.clone()))?;
            provenance.origins.insert(key, origin);
        }
        if !ignored.is_empty() {
            ignored.sort();
            provenance.notes.push(format!(
                "ignoring environment variables that are not settings: {}",
                ignored.join(", ")
            ));
        }
        for (key, value) in sources.flags {
            let origin = Origin::Flag(key.to_owned());
            precheck(key, &Given::Text(&value), &origin)?;
            builder = builder
                .set_override(key, value)
                .map_err(|e| ConfigError::key(key, e).at(origin.clone()))?;
            provenance.origins.insert(key.to_owned(), origin);
        }
        let mut settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| provenance.locate(from_config_error(e)))?;
        settings.provenance = provenance;
        Ok(settings)
    }

    /// Checks every value; an error names the key, where it was set and a
    /// valid example.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_values()
            .map_err(|e| self.provenance.locate(e))
    }

    /// Checks values that serde alone cannot.
    fn validate_values(&self) -> Result<(), ConfigError> {
        match self.relay_url.as_deref() {
            None if !self.dev => {
                return Err(ConfigError::key(
                    "relay_url",
                    "not set (give --relay-url ws://HOST:PORT, or --dev for the embedded relay)",
                ));
            }
            None => {}
            Some(url) => validate_url(url)?,
        }
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(ConfigError::key("name", "must not be empty"));
        }
        validate_log_level(&self.log_level)?;
        self.environment()
            .job_dir_name()
            .map_err(|e| ConfigError::key("job", e))?;
        if self.uuid.is_none() && self.state_dir.is_none() && !self.dev {
            let env = self.environment();
            if env.daemon_state_dir("host", Path::new("/")).is_none() {
                return Err(ConfigError::key(
                    "state_dir",
                    "not set, and there is no home directory to keep the identity in; \
                     give --state-dir DIR (or RELAY_SIDECAR_STATE_DIR)",
                ));
            }
        }
        self.socket_mode_bits()?;
        self.socket_gid()?;
        if let Some(addr) = &self.metrics_listen {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| ConfigError::key("metrics_listen", format!("{addr:?}: {e}")))?;
        }
        if let Some(path) = &self.socket {
            check_socket_path(path)?;
        }
        for (name, value) in &self.headers {
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).map_err(
                |_| ConfigError::key(&format!("headers.{name}"), "not a valid header name"),
            )?;
            tokio_tungstenite::tungstenite::http::HeaderValue::from_str(value).map_err(|_| {
                ConfigError::key(&format!("headers.{name}"), "not a valid header value")
            })?;
        }
        for (key, value) in [
            ("timeout", self.timeout),
            ("send_timeout", self.send_timeout),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("confirm_timeout", self.confirm_timeout),
            ("affinity", self.affinity),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("backlog_ttl", self.backlog_ttl),
            ("conversation_ttl", self.conversation_ttl),
        ] {
            if value.is_zero() {
                return Err(ConfigError::key(key, "must be more than zero"));
            }
        }
        if self.backoff_max < self.backoff_initial {
            return Err(ConfigError::key(
                "backoff_max",
                "must not be less than backoff_initial",
            ));
        }
        for (key, value) in [
            ("max_message_bytes", self.max_message_bytes),
            ("subscriber_queue", self.subscriber_queue),
            ("subscriber_queue_bytes", self.subscriber_queue_bytes),
            ("backlog", self.backlog),
            ("max_connections", self.max_connections),
            ("backlog_bytes", self.backlog_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "must be more than zero"));
            }
        }
        if self.dev {
            self.dev_listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| ConfigError::key("dev_listen", e))?;
        }
        if !["auto", "text", "json"].contains(&self.log_format.as_str()) {
            return Err(ConfigError::key(
                "log_format",
                format!("{:?} is not one of auto, text, json", self.log_format),
            ));
        }
        Ok(())
    }

    /// `socket_mode` as permission bits; unset, 0660 for the system service
    /// or with a `socket_group`, else 0600 (a user's own daemon is for that
    /// user alone).
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let Some(mode) = &self.socket_mode else {
            let shared = self.environment().scope() == Scope::System || self.socket_group.is_some();
            return Ok(if shared { 0o660 } else { 0o600 });
        };
        let text = mode.strip_prefix("0o").unwrap_or(mode);
        match u32::from_str_radix(text, 8) {
            Ok(bits) if bits <= 0o777 && !text.is_empty() => Ok(bits),
            _ => Err(ConfigError::key(
                "socket_mode",
                format!("{mode:?} is not an octal permission; e.g. socket_mode = \"0660\""),
            )),
        }
    }

    /// `socket_group` as a gid; a name is looked up in the group database.
    pub fn socket_gid(&self) -> Result<Option<nix::unistd::Gid>, ConfigError> {
        let Some(group) = self.socket_group.as_deref() else {
            return Ok(None);
        };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Some(nix::unistd::Gid::from_raw(gid)));
        }
        match nix::unistd::Group::from_name(group) {
            Ok(Some(entry)) => Ok(Some(entry.gid)),
            Ok(None) => Err(ConfigError::key(
                "socket_group",
                format!("{group:?}: no such group"),
            )),
            Err(e) => Err(ConfigError::key("socket_group", format!("{group:?}: {e}"))),
        }
    }

    /// The environment whose path rule gives the defaults: the one the
    /// settings were loaded in, else this process's; with this `job`.
    pub fn environment(&self) -> Environment {
        let mut env = self
            .provenance
            .env
            .clone()
            .unwrap_or_else(Environment::current);
        env.job = self.job.clone();
        env.socket = self.socket.clone();
        env
    }

    /// The runtime directory of the path rule: the socket's, and a job's
    /// identity's. `$XDG_RUNTIME_DIR` is used only when it exists and
    /// belongs to this user: a batch job often inherits one from the login
    /// node that the compute node does not have.
    pub fn runtime_dir(&self) -> PathBuf {
        let env = self.environment();
        let usable = |dir: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == env.uid)
        };
        env.daemon_runtime_dir(usable).unwrap_or_else(|_| {
            // An invalid job label is refused by validate().
            Environment {
                job: None,
                ..env.clone()
            }
            .daemon_runtime_dir(usable)
            .unwrap_or_default()
        })
    }

    /// The socket path: configured, else `relay.sock` in the path rule's
    /// runtime directory; `.dev/relay.sock` in dev mode.
    pub fn socket_path(&self) -> PathBuf {
        if let Some(path) = &self.socket {
            return path.clone();
        }
        if self.dev {
            return PathBuf::from(".dev/relay.sock");
        }
        self.runtime_dir().join(paths::SOCKET_NAME)
    }

    /// The state directory: configured, else the path rule's (the system
    /// service's, a user's per host, or a job's runtime directory);
    /// `.dev/state` in dev mode.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        if self.dev {
            return PathBuf::from(".dev/state");
        }
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".to_owned());
        let runtime = self.runtime_dir();
        // No home directory is refused by validate() unless a uuid is set.
        self.environment()
            .daemon_state_dir(&host, &runtime)
            .unwrap_or(runtime)
    }

    /// Whether the state directory is a job's, which ends with it.
    pub fn state_is_the_jobs(&self) -> bool {
        self.state_dir.is_none() && !self.dev && self.job.is_some()
    }

    /// A [`ConfigError`] for `key`, with where it was set and an example.
    pub fn key_error(&self, key: &str, why: impl fmt::Display) -> ConfigError {
        self.provenance.locate(ConfigError::key(key, why))
    }
}

/// The keys there are: those of [`Settings`] as it serialises.
struct Known {
    defaults: serde_json::Map<String, serde_json::Value>,
}

impl Known {
    fn new() -> Known {
        let defaults = match serde_json::to_value(Settings::default()) {
            Ok(serde_json::Value::Object(keys)) => keys,
            _ => serde_json::Map::new(),
        };
        Known { defaults }
    }

    fn is_key(&self, key: &str) -> bool {
        self.defaults.contains_key(key)
    }

    fn is_table(&self, key: &str) -> bool {
        matches!(self.defaults.get(key), Some(serde_json::Value::Object(_)))
    }

    /// An unknown key is an error naming its source, with the nearest key.
    fn check(&self, key: &str, origin: &Origin) -> Result<(), ConfigError> {
        if self.is_key(key) {
            return Ok(());
        }
        let nearest = self
            .defaults
            .keys()
            .map(|known| (strsim_distance(key, known), known))
            .min()
            .filter(|(distance, _)| *distance <= 3)
            .map(|(_, known)| format!("did you mean {known}? "))
            .unwrap_or_default();
        Err(ConfigError::key(
            key,
            format!("not a setting; {nearest}`relay-sidecar default-config` lists every key"),
        )
        .at(origin.clone()))
    }
}

/// The edit distance between two keys, for suggestions.
fn strsim_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A value as given, before the config crate converts it.
enum Given<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
}

/// The checks that must see a value as written: the config crate would turn
/// a TOML number into text, or fail with a message that does not help.
fn precheck(key: &str, given: &Given<'_>, origin: &Origin) -> Result<(), ConfigError> {
    let error = |why: String| Err(ConfigError::key(key, why).at(origin.clone()));
    let text = match given {
        Given::Text(text) => Some(*text),
        Given::Toml(toml::Value::String(text)) => Some(text.as_str()),
        Given::Toml(_) => None,
    };
    if key == "socket_mode"
        && let Given::Toml(toml::Value::Integer(n)) = given
    {
        // 0o660 and 432 are the same TOML number, and 660 is another:
        // a number cannot say which was meant.
        let written = if (0..=0o777).contains(n) {
            format!("0{n:o}")
        } else if n.to_string().bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            format!("0{n}")
        } else {
            "0660".to_owned()
        };
        return error(format!(
            "{n} is a TOML number, which cannot say whether octal was meant; write the \
                 permission as a string, e.g. socket_mode = \"{written}\""
        ));
    }
    if key == "dialect"
        && let Some(text) = text
        && text.parse::<Dialect>().is_err()
    {
        return error(format!(
            "{text:?} is not a dialect; use current (ProxyStore 0.6 and later) or legacy \
             (0.5.x), e.g. {}",
            origin.example(key, "current")
        ));
    }
    if is_duration_key(key) {
        let number = match given {
            Given::Toml(toml::Value::Integer(n)) => Some(n.to_string()),
            Given::Toml(toml::Value::Float(n)) => Some(n.to_string()),
            _ => None,
        };
        let bad = match (&number, text) {
            (Some(_), _) => true,
            (None, Some(text)) => humantime::parse_duration(text).is_err(),
            (None, None) => true,
        };
        if bad {
            let shown = number.clone().or(text.map(|t| format!("{t:?}")));
            let digits = number
                .or(text.map(|t| t.trim().to_owned()))
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
                .unwrap_or_else(|| "10".to_owned());
            return error(format!(
                "{} is not a duration; give a number with a unit (ms, s, m, h), e.g. {}",
                shown.unwrap_or_else(|| "this".to_owned()),
                origin.example(key, &format!("{digits}s"))
            ));
        }
    }
    Ok(())
}

/// Whether `key` holds a duration: its default is written as one.
fn is_duration_key(key: &str) -> bool {
    match Known::new().defaults.get(key) {
        Some(serde_json::Value::String(default)) => {
            default.bytes().next().is_some_and(|b| b.is_ascii_digit())
                && humantime::parse_duration(default).is_ok()
        }
        _ => false,
    }
}

/// A config file's text, at most [`MAX_CONFIG_BYTES`]; `/dev/null` and other
/// special files read as what they hold.
fn read_config(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_CONFIG_BYTES} bytes; not a config file"
        )));
    }
    Ok(text)
}

/// The config crate's error as a [`ConfigError`] naming the key.
fn from_config_error(error: config::ConfigError) -> ConfigError {
    match error {
        config::ConfigError::Type {
            unexpected,
            expected,
            key: Some(key),
            ..
        } => ConfigError::key(&key, format!("{unexpected} is not {expected}")),
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => ConfigError::key(&key, error),
        other => {
            // serde names an unknown field only in its text.
            let text = other.to_string();
            ConfigError::plain(text)
        }
    }
}

impl Provenance {
    /// `error` with where its key was set and a valid example, in that
    /// source's spelling.
    fn locate(&self, mut error: ConfigError) -> ConfigError {
        let Some(key) = error.key.clone() else {
            return error;
        };
        if error.origin.is_none() {
            error.origin = self.origins.get(&key).cloned();
        }
        if !error.why.contains("e.g.")
            && let Some(value) = example_value(&key)
        {
            let example = match &error.origin {
                Some(origin) => origin.example(&key, &value),
                None => format!("{key} = {}", toml_text(&key, &value)),
            };
            error.why = format!("{}; e.g. {example}", error.why);
        }
        error
    }
}

/// The value the example config shows for `key` (set or commented out), as
/// plain text.
fn example_value(key: &str) -> Option<String> {
    if key == "relay_url" {
        // The example's own is a placeholder, refused.
        return Some("wss://HOST".to_owned());
    }
    EXAMPLE.lines().find_map(|line| {
        let line = line.trim_start_matches(['#', ' ']);
        let value = line
            .strip_prefix(key)?
            .trim_start()
            .strip_prefix('=')?
            .trim();
        let value = value.trim_matches('"');
        (!value.is_empty() && value != "[]").then(|| value.to_owned())
    })
}

/// `value` as TOML for `key`: numbers and booleans bare, the rest quoted.
fn toml_text(key: &str, value: &str) -> String {
    let bare = match Known::new().defaults.get(key) {
        Some(serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => true,
        Some(serde_json::Value::Array(_)) => return format!("[{value}]"),
        _ => false,
    };
    if bare {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

fn validate_url(url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| {
            ConfigError::key(
                "relay_url",
                format!("{url:?} must start with ws:// or wss://"),
            )
        })?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => (v6, None),
        },
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err(ConfigError::key(
            "relay_url",
            format!("{url:?} has no host; e.g. relay_url = \"wss://relay.my-site.edu\""),
        ));
    }
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(1..))
    {
        return Err(ConfigError::key(
            "relay_url",
            format!(
                "{url:?}: port {port} is not a port (1 to 65535); e.g. relay_url = \"ws://{host}:8700\""
            ),
        ));
    }
    let lower = host.to_ascii_lowercase();
    let placeholder = ["example.org", "example.com", "example.net", "example"]
        .into_iter()
        .find(|reserved| lower == *reserved || lower.ends_with(&format!(".{reserved}")));
    if let Some(reserved) = placeholder {
        return Err(ConfigError::key(
            "relay_url",
            format!(
                "{url:?} is a placeholder ({reserved} is reserved for examples); set the URL of \
                 your relay, e.g. relay_url = \"wss://HOST\" or \"ws://HOST:PORT\""
            ),
        ));
    }
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    url.into_client_request()
        .map_err(|e| ConfigError::key("relay_url", format!("{url:?}: {e}")))?;
    Ok(())
}

/// The levels a log filter may name.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log filter: comma-separated levels or `target=level` directives. A bare
/// word that is not a level is a filter for a module of that name, which
/// silences everything else: refused, since it is nearly always a typo.
fn validate_log_level(filter: &str) -> Result<(), ConfigError> {
    let bad = |why: String| {
        Err(ConfigError::key(
            "log_level",
            format!(
                "{why}; use {}, or per module, e.g. log_level = \"info,relay_sidecar=debug\"",
                LOG_LEVELS.join(", ")
            ),
        ))
    };
    if filter.trim().is_empty() {
        return bad("must not be empty".to_owned());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            None => directive,
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return bad(if directive == filter.trim() {
                format!("{directive:?} is not a level")
            } else {
                format!("{directive:?} in {filter:?} is not a level")
            });
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(filter) {
        return bad(format!("{filter:?}: {e}"));
    }
    Ok(())
}

/// A socket path the kernel will take: short enough, with a parent.
pub fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(ConfigError::key("socket", "must not be empty"));
    }
    if len > MAX_SOCKET_PATH {
        return Err(ConfigError::key(
            "socket",
            format!(
                "{} is {len} bytes; a Unix socket path may have at most {MAX_SOCKET_PATH}",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A list of uids or gids: a TOML array, or (from a flag or the
/// environment) one number or numbers separated by commas.
fn id_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
    struct Ids;
    impl<'de> serde::de::Visitor<'de> for Ids {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of numeric ids such as [1000, 1001] or \"1000,1001\"")
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Vec<u32>, E> {
            u32::try_from(v)
                .map(|id| vec![id])
                .map_err(|_| E::custom(format!("{v} is not a valid id")))
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Vec<u32>, E> {
            u32::try_from(v)
                .map(|id| vec![id])
                .map_err(|_| E::custom(format!("{v} is not a valid id")))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u32>, E> {
            v.split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(|id| {
                    id.parse()
                        .map_err(|_| E::custom(format!("{id:?} is not a numeric id")))
                })
                .collect()
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
            let mut ids = Vec::new();
            while let Some(id) = seq.next_element()? {
                ids.push(id);
            }
            Ok(ids)
        }
    }
    deserializer.deserialize_any(Ids)
}

/// Serde and the config crate sometimes spread a message over lines.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        file: Option<&str>,
        env: &[(&str, &str)],
        flags: &[(&'static str, &str)],
    ) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = file.map(|text| {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        Settings::load(Sources {
            file,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            flags: flags.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        })
    }

    #[test]
    fn later_sources_win() {
        let file = "relay_url = \"ws://file:1\"\nname = \"from-file\"\nbacklog = 5\n";
        let s = load(Some(file), &[], &[]).unwrap();
        assert_eq!(
            (s.relay_url.as_deref(), s.name.as_deref(), s.backlog),
            (Some("ws://file:1"), Some("from-file"), 5)
        );
        let env = [
            ("RELAY_SIDECAR_NAME", "from-env"),
            ("RELAY_SIDECAR_BACKLOG", "7"),
        ];
        let s = load(Some(file), &env, &[]).unwrap();
        assert_eq!((s.name.as_deref(), s.backlog), (Some("from-env"), 7));
        let s = load(Some(file), &env, &[("name", "from-flag")]).unwrap();
        assert_eq!(
            (s.name.as_deref(), s.backlog, s.relay_url.as_deref()),
            (Some("from-flag"), 7, Some("ws://file:1"))
        );
    }

    #[test]
    fn defaults_match_the_protocol() {
        let s = load(None, &[], &[("relay_url", "ws://127.0.0.1:8700")]).unwrap();
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(
            (s.backoff_initial, s.backoff_max),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
        assert_eq!(s.max_message_bytes, 1 << 20);
        assert_eq!(s.dialect, Dialect::Current);
        assert_eq!(s.socket_mode_bits().unwrap(), 0o660);
    }

    #[test]
    fn bad_values_name_their_key_on_one_line() {
        type Case<'a> = (
            Option<&'a str>,
            &'a [(&'a str, &'a str)],
            &'a [(&'static str, &'a str)],
            &'a str,
        );
        let cases: &[Case<'_>] = &[
            (None, &[], &[("relay_url", "http://x")], "relay_url ("),
            (None, &[], &[], "relay_url: not set"),
            (None, &[], &[("relay_url", "ws://")], "relay_url ("),
            (
                None,
                &[("RELAY_SIDECAR_DIALECT", "modern")],
                &[("relay_url", "ws://h")],
                "dialect",
            ),
            (
                None,
                &[],
                &[("relay_url", "ws://h"), ("uuid", "not-a-uuid")],
                "uuid",
            ),
            (
                Some("relay_url = \"ws://h\"\ntimeout = \"ten\"\n"),
                &[],
                &[],
                "timeout",
            ),
            (
                Some("relay_url = \"ws://h\"\nbogus = 1\n"),
                &[],
                &[],
                "bogus",
            ),
            (
                None,
                &[("RELAY_SIDECAR_BACKLOG", "-1")],
                &[("relay_url", "ws://h")],
                "backlog",
            ),
            (
                None,
                &[("RELAY_SIDECAR_SOCKET_MODE", "rw")],
                &[("relay_url", "ws://h")],
                "socket_mode",
            ),
            (
                None,
                &[],
                &[("relay_url", "ws://h"), ("socket", &"/x".repeat(60))],
                "socket (from --socket)",
            ),
            (
                Some("relay_url = \"ws://h\"\n[headers]\n\"bad header\" = \"v\"\n"),
                &[],
                &[],
                "headers.bad header",
            ),
        ];
        for (file, env, flags, key) in cases {
            let err = load(*file, env, flags).expect_err(key).to_string();
            assert!(err.contains(key), "{err:?} should name {key}");
            assert!(!err.contains('\n'), "{err:?} is not one line");
        }
    }

    #[test]
    fn the_example_config_loads() {
        let example = include_str!("../../deploy/config.toml");
        let s = load(Some(example), &[], &[("relay_url", "ws://relay:8700")]).unwrap();
        let defaults = Settings::default();
        assert_eq!(s.timeout, defaults.timeout);
        assert_eq!(s.backlog, defaults.backlog);
        assert_eq!(s.socket_mode, defaults.socket_mode);
    }

    /// Every key is in the example (set or commented out), and what it sets
    /// is the default, so the example cannot drift from the code.
    #[test]
    fn the_example_config_shows_every_key_with_its_default() {
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        for key in defaults.as_object().unwrap().keys() {
            let shown = EXAMPLE.lines().any(|line| {
                let line = line.trim_start_matches(['#', ' ']);
                line.starts_with(&format!("{key} =")) || line == format!("[{key}]")
            });
            assert!(shown, "deploy/config.toml does not show the key {key}");
        }
        // Its relay_url is a placeholder, refused until it is replaced.
        let err = load(Some(EXAMPLE), &[], &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("relay_url (in ") && err.contains("placeholder"),
            "{err}"
        );
        let mut loaded = load(Some(EXAMPLE), &[], &[("relay_url", "ws://relay:8700")]).unwrap();
        loaded.relay_url = None;
        assert_eq!(serde_json::to_value(loaded).unwrap(), defaults);
    }

    /// Each mistake an operator is likely to type: one line naming the key,
    /// where it was set, and a valid example in that source's spelling.
    #[test]
    fn typed_mistakes_say_the_key_the_source_and_a_fix() {
        type Case<'a> = (
            Option<&'a str>,
            &'a [(&'a str, &'a str)],
            &'a [(&'static str, &'a str)],
            &'a [&'a str],
        );
        let url = ("relay_url", "ws://h:1");
        let cases: &[Case<'_>] = &[
            (
                Some("socket_mode = 0o660\n"),
                &[],
                &[url],
                &[
                    "socket_mode (in ",
                    "432 is a TOML number",
                    "socket_mode = \"0660\"",
                ],
            ),
            (
                Some("socket_mode = 660\n"),
                &[],
                &[url],
                &["socket_mode (in ", "socket_mode = \"0660\""],
            ),
            (
                Some("log_level = \"verbose\"\n"),
                &[],
                &[url],
                &[
                    "log_level (in ",
                    "\"verbose\" is not a level",
                    "e.g. log_level = ",
                ],
            ),
            (
                None,
                &[("RELAY_SIDECAR_LOG_LEVEL", "info,relay_sidecar=loud")],
                &[url],
                &[
                    "log_level (from RELAY_SIDECAR_LOG_LEVEL)",
                    "\"relay_sidecar=loud\"",
                ],
            ),
            (
                Some("dialect = \"new\"\n"),
                &[],
                &[url],
                &[
                    "dialect (in ",
                    "\"new\" is not a dialect",
                    "current",
                    "legacy",
                ],
            ),
            (
                Some("timeout = 10\n"),
                &[],
                &[url],
                &["timeout (in ", "10 is not a duration", "timeout = \"10s\""],
            ),
            (
                None,
                &[("RELAY_SIDECAR_AFFINITY", "90")],
                &[url],
                &[
                    "affinity (from RELAY_SIDECAR_AFFINITY)",
                    "RELAY_SIDECAR_AFFINITY=90s",
                ],
            ),
            (
                None,
                &[],
                &[url, ("dialect", "modern")],
                &["dialect (from --dialect)", "--dialect current"],
            ),
            (
                Some("timout = \"1s\"\n"),
                &[],
                &[url],
                &["timout (in ", "not a setting", "did you mean timeout?"],
            ),
            (
                Some("relay_url = \"wss://relay.example.org\"\n"),
                &[],
                &[],
                &["relay_url (in ", "placeholder"],
            ),
            (
                None,
                &[],
                &[("relay_url", "ws://relay.internal:99999/x")],
                &[
                    "relay_url (from --relay-url)",
                    "port 99999 is not a port (1 to 65535)",
                ],
            ),
            (
                Some("backlog = 0\n"),
                &[],
                &[url],
                &[
                    "backlog (in ",
                    "must be more than zero",
                    "e.g. backlog = 1024",
                ],
            ),
            (
                None,
                &[],
                &[url, ("job", "../x")],
                &["job (from --job)", "a job label is"],
            ),
        ];
        for (file, env, flags, wanted) in cases {
            let err = load(*file, env, flags).expect_err(wanted[0]).to_string();
            for part in *wanted {
                assert!(err.contains(part), "{err:?} should say {part:?}");
            }
            assert!(!err.contains('\n'), "{err:?} is not one line");
        }
    }

    #[test]
    fn only_known_variables_are_read_and_the_others_noted() {
        let s = load(
            None,
            &[
                ("RELAY_SIDECAR_PYTHON", "/usr/bin/python3"),
                ("RELAY_SIDECAR_LEGACY_PYTHON", "/x"),
                ("RELAY_SIDECAR_NAME", "from-env"),
                ("RELAY_SIDECAR_SOCKET", ""),
            ],
            &[("relay_url", "ws://h:1")],
        )
        .unwrap();
        assert_eq!(s.name.as_deref(), Some("from-env"));
        assert_eq!(s.socket, None, "an empty variable is unset");
        assert_eq!(
            s.provenance.notes(),
            ["ignoring environment variables that are not settings: \
              RELAY_SIDECAR_LEGACY_PYTHON, RELAY_SIDECAR_PYTHON"]
        );
        assert_eq!(
            s.provenance.origin("name"),
            Some(&Origin::Env("RELAY_SIDECAR_NAME".into()))
        );
    }

    #[test]
    fn special_files_read_as_what_they_hold() {
        let s = Settings::load(Sources {
            file: Some(PathBuf::from("/dev/null")),
            flags: vec![("relay_url", "ws://h:1".into())],
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.provenance.files(), [PathBuf::from("/dev/null")]);
        let err = Settings::load(Sources {
            file: Some(PathBuf::from("/nonexistent/config.toml")),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config: cannot read /nonexistent/config.toml: No such file"),
            "{err}"
        );
    }

    #[test]
    fn a_user_daemon_reads_its_own_config_after_the_system_one() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("relay-sidecar/config.toml");
        std::fs::create_dir_all(own.parent().unwrap()).unwrap();
        std::fs::write(&own, "relay_url = \"ws://own:1\"\nname = \"mine\"\n").unwrap();
        let xdg = dir.path().display().to_string();
        let env = [("XDG_CONFIG_HOME", xdg.as_str())];
        let s = load(None, &env, &[]);
        if nix::unistd::geteuid().is_root() {
            // Root is a system service: only /etc is read.
            assert!(s.map_or(true, |s| s.name.as_deref() != Some("mine")));
        } else {
            let s = s.unwrap();
            assert_eq!(s.name.as_deref(), Some("mine"));
            assert_eq!(s.provenance.files().last(), Some(&own));
        }
    }

    #[test]
    fn socket_mode_defaults_by_scope() {
        let mut s = Settings {
            relay_url: Some("ws://h:1".into()),
            ..Settings::default()
        };
        let user = Environment {
            uid: 4242,
            home: Some("/home/u".into()),
            ..Environment::default()
        };
        s.provenance.env = Some(user.clone());
        assert_eq!(s.socket_mode_bits().unwrap(), 0o600);
        s.socket_group = Some("0".into());
        assert_eq!(s.socket_mode_bits().unwrap(), 0o660);
        s.socket_group = None;
        s.provenance.env = Some(Environment { uid: 0, ..user });
        assert_eq!(s.socket_mode_bits().unwrap(), 0o660);
        s.socket_mode = Some("0o640".into());
        assert_eq!(s.socket_mode_bits().unwrap(), 0o640);
    }

    #[test]
    fn id_lists_from_file_environment_and_flags() {
        let file = "relay_url = \"ws://h\"\nallow_uids = [1000, 1001]\nallow_gids = [50]\n";
        let s = load(Some(file), &[], &[]).unwrap();
        assert_eq!((s.allow_uids, s.allow_gids), (vec![1000, 1001], vec![50]));
        let s = load(
            Some(file),
            &[
                ("RELAY_SIDECAR_ALLOW_UIDS", "7"),
                ("RELAY_SIDECAR_ALLOW_GIDS", "8, 9"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!((s.allow_uids, s.allow_gids), (vec![7], vec![8, 9]));
        let s = load(Some(file), &[], &[("allow_uids", "1,2")]).unwrap();
        assert_eq!(s.allow_uids, vec![1, 2]);
        for bad in ["x", "-1", "1,,y", "4294967296"] {
            let err = load(None, &[], &[("relay_url", "ws://h"), ("allow_gids", bad)])
                .expect_err(bad)
                .to_string();
            assert!(err.contains("allow_gids"), "{bad}: {err}");
        }
    }

    #[test]
    fn socket_group_and_metrics_listen_are_checked() {
        let ok = |flags: &[(&'static str, &str)]| {
            let mut all = vec![("relay_url", "ws://h")];
            all.extend_from_slice(flags);
            load(None, &[], &all)
        };
        let gid = nix::unistd::getgid();
        let own = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
        for group in [own.as_str(), &gid.as_raw().to_string()] {
            let s = ok(&[("socket_group", group)]).unwrap();
            assert_eq!(s.socket_gid().unwrap(), Some(gid));
        }
        let err = ok(&[("socket_group", "no-such-group-here")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("socket_group (from --socket-group):"),
            "{err}"
        );
        let s = ok(&[("metrics_listen", "127.0.0.1:9464")]).unwrap();
        assert_eq!(s.metrics_listen.as_deref(), Some("127.0.0.1:9464"));
        let err = ok(&[("metrics_listen", "localhost")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("metrics_listen (from --metrics-listen):"),
            "{err}"
        );
    }
}
