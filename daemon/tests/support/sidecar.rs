//! Starting a relay-sidecar daemon for a test: in-process on a temp-dir
//! socket, or as the real binary in a child process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use relay_sidecar::Daemon;
use relay_sidecar::config::Settings;
use relay_sidecar_client::{Client, ConnectionState, Status, StatusStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Dialect;

/// Bound on waiting for a state in tests (a failure guard, not a delay).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on waiting for counters to reach a value (a failure guard; some
/// tests push many thousands of messages through first).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(120);

/// Settings for a test daemon: a temp-dir socket and state, fast retries.
pub fn settings(dir: &Path, relay_url: &str, dialect: Dialect) -> Settings {
    Settings {
        relay_url: Some(relay_url.to_owned()),
        dialect,
        name: Some("sidecar-under-test".into()),
        socket: Some(dir.join("relay.sock")),
        state_dir: Some(dir.join("state")),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..Settings::default()
    }
}

/// A daemon running in this process.
pub struct TestDaemon {
    pub socket: PathBuf,
    pub uuid: uuid::Uuid,
    pub name: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), relay_sidecar::Error>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDaemon {
    /// Starts a daemon on `relay_url` in a fresh temp dir.
    pub async fn start(relay_url: &str, dialect: Dialect) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = settings(dir.path(), relay_url, dialect);
        let mut daemon = TestDaemon::start_with(settings).await;
        daemon._dir = Some(dir);
        daemon
    }

    /// Starts a daemon with explicit settings.
    pub async fn start_with(settings: Settings) -> TestDaemon {
        let shutdown = CancellationToken::new();
        let daemon = Daemon::start(settings, shutdown.clone())
            .await
            .expect("daemon starts");
        let socket = daemon.socket_path().to_path_buf();
        let (uuid, name) = (daemon.identity().uuid, daemon.identity().name.clone());
        let task = tokio::spawn(daemon.wait());
        TestDaemon {
            socket,
            uuid,
            name,
            shutdown,
            task,
            _dir: None,
        }
    }

    pub async fn client(&self) -> Client {
        relay_sidecar_client::connect(&self.socket)
            .await
            .expect("client connects to the test daemon")
    }

    /// A client, once the daemon has registered with the relay.
    pub async fn registered_client(&self) -> Client {
        let client = self.client().await;
        registered(&client).await;
        client
    }

    /// Stops the daemon and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("daemon task")
            .expect("daemon stops cleanly");
    }
}

/// Reads a status stream until `state` is seen; returns that status.
pub async fn wait_for_state(statuses: &mut StatusStream, state: ConnectionState) -> Status {
    let wait = async {
        loop {
            let status = statuses
                .next_status()
                .await
                .expect("status stream")
                .expect("status stream open");
            if status.state == state {
                return status;
            }
        }
    };
    tokio::time::timeout(STATE_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("no {state:?} within {STATE_TIMEOUT:?}"))
}

/// Waits until the daemon behind `client` is registered.
pub async fn registered(client: &Client) -> Status {
    let mut statuses = client.watch_status().await.expect("watch status");
    wait_for_state(&mut statuses, ConnectionState::Registered).await
}

/// The daemon binary, run as a child process: this build's, or the one
/// `RELAY_SIDECAR_TEST_DAEMON_BIN` names (to run a test against another
/// build, e.g. to see it fail before a fix).
pub fn daemon_command() -> tokio::process::Command {
    let binary = std::env::var_os("RELAY_SIDECAR_TEST_DAEMON_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_relay-sidecar").into());
    let mut command = tokio::process::Command::new(binary);
    command
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Only what a test sets explicitly reaches the daemon's settings.
    for (key, _) in std::env::vars() {
        if key.starts_with("RELAY_SIDECAR_") {
            command.env_remove(key);
        }
    }
    command
}

/// The relayctl binary, run as a child process against the daemon on
/// `socket` (and no socket from the environment).
pub fn relayctl(socket: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_relayctl"));
    command
        .arg("--socket")
        .arg(socket)
        .env_remove("RELAY_SIDECAR_SOCKET")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A plain tonic channel to the daemon on `socket`, for clients other than
/// the SDK's (health, reflection): `:authority` is `localhost`.
pub async fn channel(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("a channel to the test daemon")
}

/// Fails the test (never skips) when a tool it needs is not installed,
/// saying how to install it.
pub fn require_tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is not installed; this test needs it. scripts/test installs it; by hand:\n    {install}"
        )
    })
}

/// An embedded relay (current dialect) on a free loopback port.
pub async fn dev_relay() -> relay_sidecar::devrelay::DevRelay {
    relay_sidecar::devrelay::DevRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        Dialect::Current,
        CancellationToken::new(),
    )
    .await
    .expect("dev relay starts")
}

/// Arguments for the daemon binary on `relay_url`, with its socket and state
/// directory in `dir`; and the socket's path.
pub fn daemon_args(dir: &Path, relay_url: &str) -> (Vec<String>, PathBuf) {
    let socket = dir.join("relay.sock");
    let args = vec![
        "--relay-url".to_owned(),
        relay_url.to_owned(),
        "--socket".to_owned(),
        socket.display().to_string(),
        "--state-dir".to_owned(),
        dir.join("state").display().to_string(),
    ];
    (args, socket)
}

/// Starts the daemon binary with `args` (plus JSON logs) and waits for its
/// "serving" log line, which comes once its socket is bound.
pub async fn spawn_daemon<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;

    let mut child = daemon_command()
        .args(args)
        .args(["--log-format", "json"])
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(STATE_TIMEOUT, async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("\"serving\"") {
                return;
            }
        }
        panic!("the daemon exited before serving");
    })
    .await
    .expect("the daemon serves in time");
    // Keep draining its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    child
}

/// A daemon binary in a child process whose whole log (JSON lines) is kept.
pub struct LoggedDaemon {
    pub child: tokio::process::Child,
    pub socket: PathBuf,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    drained: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl LoggedDaemon {
    /// Starts the daemon binary on `relay_url` in a fresh temp dir, with the
    /// settings in `env` (`("RELAY_SIDECAR_BACKOFF_MAX", "500ms")`, ...) and
    /// `extra` arguments, and waits until it serves.
    pub async fn start(relay_url: &str, env: &[(&str, &str)], extra: &[&str]) -> LoggedDaemon {
        use tokio::io::AsyncBufReadExt;

        let dir = tempfile::tempdir().expect("temp dir");
        let (args, socket) = daemon_args(dir.path(), relay_url);
        let mut command = daemon_command();
        command
            .args(&args)
            .args(extra)
            .args(["--log-format", "json"]);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn the daemon");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let serving = tokio::time::timeout(STATE_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let serving = line.contains("\"serving\"");
                log.lock().unwrap().push(line);
                if serving {
                    return true;
                }
            }
            false
        })
        .await;
        if serving != Ok(true) {
            panic!(
                "the daemon did not serve:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
        let keep = std::sync::Arc::clone(&log);
        let drained = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep.lock().unwrap().push(line);
            }
        });
        LoggedDaemon {
            child,
            socket,
            log,
            drained,
            _dir: dir,
        }
    }

    pub async fn client(&self) -> Client {
        relay_sidecar_client::connect(&self.socket)
            .await
            .expect("client connects to the daemon")
    }

    /// The log lines so far, parsed.
    pub fn log(&self) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                serde_json::from_str(line).unwrap_or(serde_json::Value::String(line.clone()))
            })
            .collect()
    }

    /// SIGTERMs the daemon, waits for it to exit 0, and returns its whole log.
    pub async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().expect("the daemon runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM the daemon");
        let status = tokio::time::timeout(STATE_TIMEOUT, self.child.wait())
            .await
            .expect("the daemon exits in time")
            .expect("wait for the daemon");
        let _ = tokio::time::timeout(STATE_TIMEOUT, self.drained).await;
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        assert!(
            status.success(),
            "the daemon exited with {status}:\n{}",
            log.join("\n")
        );
        log
    }
}

/// Polls the status until `done` holds (bounded by [`STATUS_TIMEOUT`]): for
/// counters, which have no change stream of their own.
pub async fn status_until(client: &Client, done: impl Fn(&Status) -> bool) -> Status {
    tokio::time::timeout(STATUS_TIMEOUT, async {
        loop {
            let status = client.status().await.unwrap();
            if done(&status) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("status condition in time")
}
