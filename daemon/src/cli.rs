//! The daemon's command line: flags that become settings, the
//! `check-config`, `default-config`, `start` and `stop` subcommands, and
//! running the daemon until SIGTERM or SIGINT (or the exit of the process
//! it was told to exit with).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use relay_sidecar_client::paths::Scope;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings, Sources};
use crate::{Daemon, Error, job, rundir};

/// Shares this host's one ProxyStore relay registration with every local
/// process over gRPC on a Unix socket. Every flag is also a config key and a
/// RELAY_SIDECAR_<KEY> environment variable; flags win.
#[derive(Debug, Parser)]
#[command(name = "relay-sidecar", version, about)]
pub struct Flags {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file [default: /etc/relay-sidecar/config.toml, then (not
    /// as root or a systemd service) $XDG_CONFIG_HOME/relay-sidecar/config.toml,
    /// where present].
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// The relay, ws://HOST:PORT or wss://HOST.
    #[arg(long, value_name = "URL", global = true)]
    relay_url: Option<String>,
    /// The gRPC Unix socket to serve on.
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<String>,
    /// Permission bits of the socket file, in octal [default: 0660 for the
    /// system service or with --socket-group, else 0600].
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
    /// A job label (e.g. $SLURM_JOB_ID): this job's own socket and identity,
    /// beside other jobs' daemons on the same node.
    #[arg(long, value_name = "LABEL", global = true)]
    job: Option<String>,
    /// Stop when process PID exits (`start` passes the shell that ran it).
    #[arg(long, value_name = "PID", global = true)]
    pub exit_with: Option<u32>,
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
    /// Start the daemon in the background, wait until it is registered, and
    /// print `export RELAY_SIDECAR_SOCKET=...` for the workers; it stops when
    /// the shell or job script that ran `start` exits (or --exit-with PID).
    Start {
        /// How long to wait for the registration before giving up (and
        /// stopping the daemon).
        #[arg(long, value_name = "SECS", default_value_t = job::START_WAIT.as_secs())]
        wait: u64,
    },
    /// Stop the daemon serving on the socket these settings name (a job's
    /// with --job or RELAY_SIDECAR_JOB).
    Stop,
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
            ("job", &self.job),
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

    /// The arguments that run the daemon with these flags' settings (the
    /// environment is inherited), stopping when process `exit_with` exits.
    fn daemon_args(&self, exit_with: u32) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(file) = &self.config {
            args.extend(["--config".into(), file.clone().into_os_string()]);
        }
        for (key, value) in self.sources().flags {
            let flag = format!("--{}", key.replace('_', "-"));
            if key == "dev" {
                args.push(flag.into());
            } else {
                args.extend([flag.into(), value.into()]);
            }
        }
        args.extend(["--exit-with".into(), exit_with.to_string().into()]);
        args
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
    let files = settings.provenance.files();
    let file = match file {
        Some(path) => path.display().to_string(),
        None if files.is_empty() => "none".into(),
        None => files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", then "),
    };
    let mut text = format!(
        "# relay-sidecar: the effective settings (config file: {file}; then RELAY_SIDECAR_* \
         variables; then flags)\n# Header values and passwords are masked.\n"
    );
    for note in settings.provenance.notes() {
        text.push_str(&format!("# note: {note}\n"));
    }
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

/// Everything `check-config` checks beyond [`Settings::load`]: the files the
/// daemon reads later (the token file at each connect, the CA file), and the
/// TLS set-up for a `wss://` relay.
pub fn check(settings: &Settings) -> Result<(), Error> {
    for (key, file) in [
        ("token_file", &settings.token_file),
        ("ca_file", &settings.ca_file),
    ] {
        if let Some(path) = file
            && let Err(e) = std::fs::File::open(path)
        {
            let fix = if key == "token_file" {
                "create it with the relay's bearer token, or remove the key"
            } else {
                "give a PEM file of CA certificates, or remove the key"
            };
            return Err(settings
                .key_error(key, format!("cannot read {}: {e}; {fix}", path.display()))
                .into());
        }
    }
    if settings
        .relay_url
        .as_deref()
        .is_some_and(|url| url.starts_with("wss://"))
    {
        crate::relay::client_config(settings.ca_file.as_deref(), settings.insecure_skip_verify)?;
    }
    Ok(())
}

/// Gets the socket's directory ready before the daemon binds there: a user
/// daemon's default runtime directory is made private (0700, 0710 with a
/// `socket_group`); any other must let this user create the socket. An
/// error names the setting that moves it.
pub fn prepare_socket_dir(settings: &Settings) -> Result<(), ConfigError> {
    let socket = settings.socket_path();
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let private =
        settings.socket.is_none() && !settings.dev && settings.environment().scope() == Scope::User;
    let prepared = if private {
        rundir::ensure_private(dir, settings.socket_gid()?)
    } else {
        rundir::check_writable(dir)
    };
    prepared.map_err(|e| {
        settings.key_error(
            "socket",
            format!(
                "{e}; move the socket with --socket PATH (RELAY_SIDECAR_SOCKET, or socket in the \
                 config file)"
            ),
        )
    })
}

/// `relay-sidecar start` and `stop`: prints what the workers need, or why
/// not, and returns the exit code.
pub fn job_command(flags: &Flags, settings: Settings) -> ExitCode {
    for note in settings.provenance.notes() {
        eprintln!("relay-sidecar: {note}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("relay-sidecar: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = settings.socket_path();
    let outcome = match flags.command {
        Some(Command::Start { wait }) => runtime.block_on(start(flags, &settings, wait)),
        _ => runtime.block_on(async {
            match job::stop(&socket).await.map_err(Failure::from)? {
                Some(pid) => eprintln!(
                    "relay-sidecar: stopped the daemon (pid {pid}) on {}",
                    socket.display()
                ),
                None => eprintln!(
                    "relay-sidecar: no daemon serves on {}; nothing to stop",
                    socket.display()
                ),
            }
            Ok(())
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whatever stops `start` or `stop`, to print.
type Failure = Box<dyn std::error::Error>;

async fn start(flags: &Flags, settings: &Settings, wait: u64) -> Result<(), Failure> {
    prepare_socket_dir(settings)?;
    let program = std::env::current_exe().map_err(job::JobError::Spawn)?;
    let exit_with = flags
        .exit_with
        .unwrap_or_else(|| nix::unistd::getppid().as_raw().unsigned_abs());
    let socket = settings.socket_path();
    let started = job::start(
        &program,
        flags.daemon_args(exit_with),
        &socket,
        settings.lazy,
        Duration::from_secs(wait),
        |status| {
            if status.state == relay_sidecar_client::ConnectionState::Backoff {
                eprintln!(
                    "relay-sidecar: not registered yet ({}); retrying",
                    status.detail
                );
            }
        },
    )
    .await?;
    let s = &started.status;
    eprintln!(
        "relay-sidecar: running (pid {}), {} with {} as {} ({}), on {}; it stops when process \
         {exit_with} exits, or with `relay-sidecar stop`",
        started.pid,
        s.state.to_string().to_lowercase(),
        s.relay_url,
        s.uuid,
        s.name,
        started.socket.display(),
    );
    println!(
        "export RELAY_SIDECAR_SOCKET={}",
        shell_quote(&started.socket.display().to_string())
    );
    Ok(())
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b));
    if plain && !text.is_empty() {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Runs the daemon until SIGTERM or SIGINT, serving on `activated` when
/// systemd passed a socket (see [`crate::systemd::take_listener`]).
///
/// Before it starts: every note from loading the settings is logged once,
/// and the socket's directory is made ready ([`prepare_socket_dir`]). With
/// `exit_with`, the daemon stops when that process exits. A job's daemon
/// (with `job` and no `state_dir`) removes its identity and directory when
/// it stops: they were the job's.
pub async fn run(
    settings: Settings,
    activated: Option<std::os::unix::net::UnixListener>,
    exit_with: Option<u32>,
) -> Result<(), Error> {
    for note in settings.provenance.notes() {
        tracing::warn!("{note}");
    }
    if activated.is_none() {
        prepare_socket_dir(&settings)?;
    }
    let job_dir = settings.state_is_the_jobs().then(|| settings.state_dir());
    let shutdown = CancellationToken::new();
    let (mut term, mut int) = (
        signal(SignalKind::terminate()).map_err(Error::Signals)?,
        signal(SignalKind::interrupt()).map_err(Error::Signals)?,
    );
    let daemon = Daemon::start_on(settings, activated, shutdown.clone()).await?;
    if let Some(pid) = exit_with {
        tokio::spawn(job::exit_with(pid, shutdown.clone()));
    }
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        // Stop first: whatever becomes of the log line, the signal counts.
        shutdown.cancel();
        tracing::info!("stopping");
    });
    let result = daemon.wait().await;
    if let Some(dir) = job_dir {
        let _ = std::fs::remove_file(dir.join(crate::identity::IDENTITY_FILE));
        match std::fs::remove_dir(&dir) {
            Ok(()) => tracing::info!(dir = %dir.display(), "removed the job's directory"),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the job's directory")
            }
        }
    }
    result
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
