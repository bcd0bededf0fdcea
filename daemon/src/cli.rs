//! The daemon's command line: flags that become settings, the
//! `check-config` and `default-config` subcommands, and running the daemon
//! until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{DEFAULT_CONFIG_FILE, Settings, Sources};
use crate::{Daemon, Error};

/// Shares this host's one ProxyStore relay registration with every local
/// process over gRPC on a Unix socket. Every flag is also a config key and a
/// RELAY_SIDECAR_<KEY> environment variable; flags win.
#[derive(Debug, Parser)]
#[command(name = "relay-sidecar", version, about)]
pub struct Flags {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file (default: /etc/relay-sidecar/config.toml if present).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// The relay, ws://HOST:PORT or wss://HOST.
    #[arg(long, value_name = "URL", global = true)]
    relay_url: Option<String>,
    /// The gRPC Unix socket to serve on.
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<String>,
    /// Permission bits of the socket file, in octal (default 0660).
    #[arg(long, value_name = "MODE", global = true)]
    socket_mode: Option<String>,
    /// The group owning the socket file, a name or a number.
    #[arg(long, value_name = "GROUP", global = true)]
    socket_group: Option<String>,
    /// Admit only these uids (and the gids of --allow-gids), e.g. 1000,1001.
    #[arg(long, value_name = "UIDS", global = true)]
    allow_uids: Option<String>,
    /// Admit only these gids (and the uids of --allow-uids), e.g. 1000,1001.
    #[arg(long, value_name = "GIDS", global = true)]
    allow_gids: Option<String>,
    /// Where the peer identity is kept.
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<String>,
    /// Peer name (default: the host name).
    #[arg(long, global = true)]
    name: Option<String>,
    /// Peer uuid (default: created once, kept in the state directory).
    #[arg(long, global = true)]
    uuid: Option<String>,
    /// Relay protocol: current (ProxyStore 0.6+) or legacy (0.5.x).
    #[arg(long, value_name = "current|legacy", global = true)]
    dialect: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR", global = true)]
    metrics_listen: Option<String>,
    /// Run an embedded relay on loopback and use it.
    #[arg(long, global = true)]
    dev: bool,
    /// Log format: auto, text or json.
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<String>,
    /// Log filter when RUST_LOG is unset, e.g. info or relay_sidecar=debug.
    #[arg(long, value_name = "FILTER", global = true)]
    log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Check the settings (file, environment, flags) and print the effective
    /// ones as TOML, secrets masked; exit 1 with the first problem.
    CheckConfig,
    /// Print the example config: every key with its default and a comment.
    DefaultConfig,
}

impl Flags {
    /// Where the settings come from: the file, this process's environment,
    /// and the flags given.
    pub fn sources(&self) -> Sources {
        let given = [
            ("relay_url", &self.relay_url),
            ("socket", &self.socket),
            ("socket_mode", &self.socket_mode),
            ("socket_group", &self.socket_group),
            ("allow_uids", &self.allow_uids),
            ("allow_gids", &self.allow_gids),
            ("state_dir", &self.state_dir),
            ("name", &self.name),
            ("uuid", &self.uuid),
            ("dialect", &self.dialect),
            ("metrics_listen", &self.metrics_listen),
            ("log_format", &self.log_format),
            ("log_level", &self.log_level),
        ];
        let mut flags: Vec<(&'static str, String)> = given
            .into_iter()
            .filter_map(|(key, value)| Some((key, value.clone()?)))
            .collect();
        if self.dev {
            flags.push(("dev", "true".to_owned()));
        }
        Sources {
            file: self.config.clone(),
            env: std::env::vars().collect(),
            flags,
        }
    }
}

/// What `check-config` prints: the effective settings as TOML (a valid
/// config file), header values and URL passwords masked, unset keys listed
/// as comments.
pub fn effective_config(settings: &Settings, file: Option<&std::path::Path>) -> String {
    let mut shown = settings.clone();
    for value in shown.headers.values_mut() {
        *value = "****".into();
    }
    if let Some(url) = &shown.relay_url {
        shown.relay_url = Some(mask_password(url));
    }
    let file = match file {
        Some(path) => path.display().to_string(),
        None if std::path::Path::new(DEFAULT_CONFIG_FILE).exists() => DEFAULT_CONFIG_FILE.into(),
        None => "none".into(),
    };
    let mut text = format!(
        "# relay-sidecar: the effective settings (config file: {file}; then RELAY_SIDECAR_* \
         variables; then flags)\n# Header values and passwords are masked.\n"
    );
    if let Ok(serde_json::Value::Object(keys)) = serde_json::to_value(&shown) {
        for (key, value) in keys {
            if !value.is_null() {
                continue;
            }
            match key.as_str() {
                "socket" => text.push_str(&format!(
                    "# socket: unset, so {}\n",
                    settings.socket_path().display()
                )),
                "state_dir" => text.push_str(&format!(
                    "# state_dir: unset, so {}\n",
                    settings.state_dir().display()
                )),
                _ => text.push_str(&format!("# {key}: unset\n")),
            }
        }
    }
    text.push_str(&toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot show: {e}\n")));
    text
}

/// `ws://user:secret@host` → `ws://user:****@host`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:****")
            } else {
                "****".to_owned()
            };
            format!("{scheme}://{masked}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

/// Everything `check-config` checks beyond [`Settings::load`]: the TLS
/// set-up for a `wss://` relay (CA file readable and parsed).
pub fn check(settings: &Settings) -> Result<(), Error> {
    if settings
        .relay_url
        .as_deref()
        .is_some_and(|url| url.starts_with("wss://"))
    {
        crate::relay::client_config(settings.ca_file.as_deref(), settings.insecure_skip_verify)?;
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT, serving on `activated` when
/// systemd passed a socket (see [`crate::systemd::take_listener`]).
pub async fn run(
    settings: Settings,
    activated: Option<std::os::unix::net::UnixListener>,
) -> Result<(), Error> {
    let shutdown = CancellationToken::new();
    let (mut term, mut int) = (
        signal(SignalKind::terminate()).map_err(Error::Signals)?,
        signal(SignalKind::interrupt()).map_err(Error::Signals)?,
    );
    let daemon = Daemon::start_on(settings, activated, shutdown.clone()).await?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("stopping");
        shutdown.cancel();
    });
    daemon.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_header_values_are_masked() {
        assert_eq!(mask_password("wss://relay.org/x"), "wss://relay.org/x");
        assert_eq!(
            mask_password("wss://me:s3cret@relay.org/x?y=@"),
            "wss://me:****@relay.org/x?y=@"
        );
        assert_eq!(mask_password("ws://tok@h:1"), "ws://****@h:1");
        let mut settings = Settings {
            relay_url: Some("wss://me:s3cret@relay.org".into()),
            ..Settings::default()
        };
        settings
            .headers
            .insert("Authorization".into(), "Bearer abc".into());
        let text = effective_config(&settings, None);
        assert!(
            !text.contains("s3cret") && !text.contains("Bearer abc"),
            "{text}"
        );
        assert!(text.contains("****"), "{text}");
        assert!(text.contains("# uuid: unset\n"), "{text}");
        assert!(text.contains("# socket: unset, so "), "{text}");
        // What it prints is a config file that loads to the same settings.
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("effective.toml");
        std::fs::write(&path, body).unwrap();
        let loaded = Settings::load(Sources {
            file: Some(path),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(loaded.timeout, settings.timeout);
        assert_eq!(loaded.headers["Authorization"], "****");
    }
}
