//! Settings: defaults, then a TOML file, then `RELAY_SIDECAR_*` environment
//! variables, then command-line flags (later wins), and their validation.
//! Every bad value is reported as one line that names its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::Dialect;

/// The prefix of the environment variables that set keys.
pub const ENV_PREFIX: &str = "RELAY_SIDECAR";
/// The config file read when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/relay-sidecar/config.toml";
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
    /// The Unix socket the gRPC service listens on.
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file, in octal.
    pub socket_mode: String,
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
    /// Connect on first use instead of at start.
    pub lazy: bool,
    /// The largest relay frame a Send may produce, in bytes.
    pub max_message_bytes: usize,
    /// Messages a subscriber may have waiting before it loses messages.
    pub subscriber_queue: usize,
    /// Messages kept while nobody is subscribed.
    pub backlog: usize,
    /// How long a worker's send to a peer binds that peer's replies to it.
    #[serde(with = "humantime_serde")]
    pub affinity: Duration,
    /// Run an embedded relay on loopback and use it.
    pub dev: bool,
    /// Where the embedded relay listens.
    pub dev_listen: String,
    /// Log format: "auto" (text on a terminal, plain lines under journald),
    /// "text" or "json".
    pub log_format: String,
    /// Log filter when RUST_LOG is unset, e.g. "info" or "relay_sidecar=debug".
    pub log_level: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            relay_url: None,
            dialect: Dialect::Current,
            uuid: None,
            name: None,
            state_dir: None,
            socket: None,
            socket_mode: "0660".into(),
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
            lazy: false,
            max_message_bytes: 1 << 20,
            subscriber_queue: 1024,
            backlog: 1024,
            affinity: Duration::from_secs(60),
            dev: false,
            dev_listen: "127.0.0.1:8700".into(),
            log_format: "auto".into(),
            log_level: "info".into(),
        }
    }
}

/// A setting that cannot be used. The message names the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn key(key: &str, why: impl std::fmt::Display) -> Self {
        ConfigError(format!("{key}: {why}"))
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
    /// Layers defaults, file, environment and flags, then validates.
    pub fn load(sources: Sources) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        match &sources.file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::key(
                        "config",
                        format!("file {} does not exist", path.display()),
                    ));
                }
                builder = builder.add_source(
                    config::File::from(path.as_path()).format(config::FileFormat::Toml),
                );
            }
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                builder = builder.add_source(
                    config::File::with_name(DEFAULT_CONFIG_FILE).format(config::FileFormat::Toml),
                );
            }
            None => {}
        }
        let env: config::Map<String, String> = sources.env.into_iter().collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .try_parsing(true)
                .source(Some(env)),
        );
        for (key, value) in sources.flags {
            builder = builder
                .set_override(key, value)
                .map_err(|e| ConfigError::key(key, e))?;
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(one_line(&e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that serde alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
            ("affinity", self.affinity),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
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
            ("backlog", self.backlog),
            ("max_connections", self.max_connections),
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

    /// `socket_mode` as permission bits.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let text = self.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(text, 8) {
            Ok(bits) if bits <= 0o777 => Ok(bits),
            _ => Err(ConfigError::key(
                "socket_mode",
                format!(
                    "{:?} is not an octal permission such as 0660",
                    self.socket_mode
                ),
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

    /// The socket path: configured, else under `$RUNTIME_DIRECTORY` (set by
    /// systemd), else `/run/relay-sidecar/`; `.dev/` in dev mode.
    pub fn socket_path(&self) -> PathBuf {
        if let Some(path) = &self.socket {
            return path.clone();
        }
        if self.dev {
            return PathBuf::from(".dev/relay.sock");
        }
        std::env::var_os("RUNTIME_DIRECTORY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/relay-sidecar"))
            .join("relay.sock")
    }

    /// The state directory: configured, else `$STATE_DIRECTORY` (set by
    /// systemd), else `/var/lib/relay-sidecar`; `.dev/state` in dev mode.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        if self.dev {
            return PathBuf::from(".dev/state");
        }
        std::env::var_os("STATE_DIRECTORY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/relay-sidecar"))
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
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() {
        return Err(ConfigError::key(
            "relay_url",
            format!("{url:?} has no host"),
        ));
    }
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    url.into_client_request()
        .map_err(|e| ConfigError::key("relay_url", format!("{url:?}: {e}")))?;
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
            (None, &[], &[("relay_url", "http://x")], "relay_url:"),
            (None, &[], &[], "relay_url: not set"),
            (None, &[], &[("relay_url", "ws://")], "relay_url:"),
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
                "socket:",
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
        let s = load(Some(example), &[], &[]).unwrap();
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
        let mut loaded = load(Some(EXAMPLE), &[], &[]).unwrap();
        assert_eq!(loaded.relay_url.as_deref(), Some("wss://relay.example.org"));
        loaded.relay_url = None;
        assert_eq!(serde_json::to_value(loaded).unwrap(), defaults);
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
        assert!(err.starts_with("socket_group:"), "{err}");
        let s = ok(&[("metrics_listen", "127.0.0.1:9464")]).unwrap();
        assert_eq!(s.metrics_listen.as_deref(), Some("127.0.0.1:9464"));
        let err = ok(&[("metrics_listen", "localhost")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("metrics_listen:"), "{err}");
    }
}
