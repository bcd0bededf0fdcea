//! The relay-sidecar daemon: flags, settings, logging, then the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use relay_sidecar::config::{Settings, Sources};
use relay_sidecar::{Daemon, logging};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Shares this host's one ProxyStore relay registration with every local
/// process over gRPC on a Unix socket. Every flag is also a config key and a
/// RELAY_SIDECAR_<KEY> environment variable; flags win.
#[derive(Parser)]
#[command(version, about)]
struct Flags {
    /// TOML config file (default: /etc/relay-sidecar/config.toml if present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The relay, ws://HOST:PORT or wss://HOST.
    #[arg(long, value_name = "URL")]
    relay_url: Option<String>,
    /// The gRPC Unix socket to serve on.
    #[arg(long, value_name = "PATH")]
    socket: Option<String>,
    /// Where the peer identity is kept.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<String>,
    /// Peer name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Peer uuid (default: created once, kept in the state directory).
    #[arg(long)]
    uuid: Option<String>,
    /// Relay protocol: current (ProxyStore 0.6+) or legacy (0.5.x).
    #[arg(long, value_name = "current|legacy")]
    dialect: Option<String>,
    /// Run an embedded relay on loopback and use it.
    #[arg(long)]
    dev: bool,
    /// Log format: auto, text or json.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let given = [
        ("relay_url", flags.relay_url),
        ("socket", flags.socket),
        ("state_dir", flags.state_dir),
        ("name", flags.name),
        ("uuid", flags.uuid),
        ("dialect", flags.dialect),
        ("log_format", flags.log_format),
        ("dev", flags.dev.then(|| "true".to_owned())),
    ];
    let sources = Sources {
        file: flags.config,
        env: std::env::vars().collect(),
        flags: given
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect(),
    };
    let settings = match Settings::load(sources) {
        Ok(settings) => settings,
        Err(e) => return fail(&e),
    };
    logging::init(&settings.log_format, &settings.log_level);
    let runtime = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let daemon = Daemon::start(settings, shutdown.clone()).await?;
        let (mut term, mut int) = (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        );
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("stopping");
            shutdown.cancel();
        });
        daemon.wait().await.map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&*e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("relay-sidecar: {e}");
    ExitCode::FAILURE
}
