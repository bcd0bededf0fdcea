//! Test support: the REAL ProxyStore relay servers and Python clients.
//!
//! Integration tests `mod support;` this module to run, from the project's
//! Python environments (built by `scripts/test`):
//!
//! - [`PyRelay`]: a real `proxystore-relay` on 127.0.0.1 (current dialect
//!   from `.venv`, proxystore 1.1.0; legacy dialect from `.venv-legacy`,
//!   proxystore 0.5.2), which can be killed and restarted on the same port;
//! - [`PyPeer`]: a remote peer, `tests/python/peer.py`, which registers with a
//!   relay through the real ProxyStore client (`RelayClient`, or
//!   `RelayServerClient` for the legacy dialect) and is driven over
//!   stdin/stdout JSON lines.
//!
//! The interpreters come from `RELAY_SIDECAR_PYTHON` and
//! `RELAY_SIDECAR_LEGACY_PYTHON`. When they are missing the tests fail with a
//! message saying how to get them; they never skip.
//!
//! Every wait is bounded and polls for the condition (no blind sleeps); a
//! timeout panics with the tail of the child's log.

// Each integration-test binary compiles its own copy of this module and uses
// only part of it; the rest would be reported as dead code.
#![allow(dead_code)]

pub mod relays;
pub mod sidecar;

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};
use uuid::Uuid;

/// How long a relay or a peer gets to come up (or a peer to register).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Lines of a child's log shown when something goes wrong.
const LOG_TAIL_LINES: usize = 40;

pub use relay_sidecar::codec::Dialect;

/// What a relay dialect means for the test support: which Python
/// environment (and so which ProxyStore) speaks it.
pub trait PythonEnv: Copy {
    /// The environment variable naming this dialect's Python interpreter.
    fn python_env_var(self) -> &'static str;
    /// The project-local venv `scripts/test` builds for this dialect.
    fn venv_dir(self) -> &'static str;
    /// The requirements file of that venv.
    fn requirements(self) -> &'static str;
    /// A fragment of the `error` text the relay puts on a message bounced
    /// because its target is not registered.
    fn unknown_peer_error_fragment(self) -> &'static str;
}

impl PythonEnv for Dialect {
    fn python_env_var(self) -> &'static str {
        match self {
            // proxystore >= 0.6
            Dialect::Current => "RELAY_SIDECAR_PYTHON",
            // proxystore 0.5.2
            Dialect::Legacy => "RELAY_SIDECAR_LEGACY_PYTHON",
        }
    }

    fn venv_dir(self) -> &'static str {
        match self {
            Dialect::Current => ".venv",
            Dialect::Legacy => ".venv-legacy",
        }
    }

    fn requirements(self) -> &'static str {
        match self {
            Dialect::Current => "scripts/requirements.txt",
            Dialect::Legacy => "scripts/requirements-legacy.txt",
        }
    }

    fn unknown_peer_error_fragment(self) -> &'static str {
        match self {
            // "... because this peer is not registered this relay server."
            Dialect::Current => "not registered",
            // "... because this peer is unknown."
            Dialect::Legacy => "unknown",
        }
    }
}

/// The repository root (the directory holding `scripts/` and `tests/`).
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// `tests/python/peer.py`.
pub fn peer_script() -> PathBuf {
    repo_root().join("tests/python/peer.py")
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The Python interpreter of `dialect`'s environment, from
/// `RELAY_SIDECAR_PYTHON` / `RELAY_SIDECAR_LEGACY_PYTHON`.
///
/// Panics (never skips) when the variable is unset or does not name an
/// executable, saying how to create the environments.
pub fn python(dialect: Dialect) -> PathBuf {
    let var = dialect.python_env_var();
    let problem = match std::env::var_os(var) {
        Some(value) if !value.is_empty() => {
            let path = PathBuf::from(&value);
            if is_executable(&path) {
                // Kept as given: canonicalizing would resolve the venv's
                // `bin/python` symlink to the base interpreter and lose the
                // venv (its site-packages and `bin/proxystore-relay`).
                return path;
            }
            format!("{var}={} is not an executable file", path.display())
        }
        _ => format!("{var} is not set"),
    };
    let root = repo_root();
    let venv = dialect.venv_dir();
    let local = root.join(venv).join("bin/python");
    let hint = if is_executable(&local) {
        format!(
            "\n{} exists (built by an earlier scripts/test): export {var}={}",
            local.display(),
            local.display()
        )
    } else {
        String::new()
    };
    panic!(
        "{problem}: the interoperability tests need the real ProxyStore ({dialect} dialect).\n\
         Run the project's test command, which builds the venvs and sets the variables:\n    \
         scripts/test\n\
         or build this one by hand from {root}:\n    \
         python3.11 -m venv {venv} && {venv}/bin/pip install -r {req}\n    \
         export {var}=\"$PWD/{venv}/bin/python\"{hint}",
        root = root.display(),
        req = dialect.requirements(),
    );
}

/// A command installed in `dialect`'s venv, next to its interpreter.
pub fn venv_bin(dialect: Dialect, name: &str) -> PathBuf {
    let python = python(dialect);
    let bin = python.parent().unwrap_or(Path::new(".")).join(name);
    assert!(
        is_executable(&bin),
        "{} is missing: is {} = {} a venv with proxystore installed? (run scripts/test)",
        bin.display(),
        dialect.python_env_var(),
        python.display()
    );
    bin
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The last `lines` lines of a log file (or why it could not be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut tail = all[start..].join("\n");
            if tail.is_empty() {
                tail.push_str("(empty)");
            }
            tail
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temp dir")
}

/// Send SIGTERM through the shell's builtin `kill` (std offers only SIGKILL).
fn sigterm(pid: u32) {
    let _ = Command::new("sh")
        .args([
            "-c",
            "kill -TERM \"$1\" 2>/dev/null",
            "sh",
            &pid.to_string(),
        ])
        .status();
}

// ---------------------------------------------------------------------------
// PyRelay
// ---------------------------------------------------------------------------

/// A real ProxyStore relay server (`<venv>/bin/proxystore-relay`) on
/// 127.0.0.1, its stdout and stderr in a log file. Killed on drop.
#[derive(Debug)]
pub struct PyRelay {
    dialect: Dialect,
    port: u16,
    child: Option<Child>,
    starts: u32,
    /// `--log-level`, when not the relay's default (INFO: a line per
    /// message forwarded).
    log_level: Option<&'static str>,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl PyRelay {
    /// Start a relay of `dialect` on a free port and wait until it accepts
    /// TCP connections.
    pub async fn start(dialect: Dialect) -> PyRelay {
        PyRelay::start_logging(dialect, None).await
    }

    /// [`PyRelay::start`] logging only warnings and errors: for floods of
    /// messages, where its line per message would cost more than the relay.
    pub async fn start_quiet(dialect: Dialect) -> PyRelay {
        PyRelay::start_logging(dialect, Some("warning")).await
    }

    async fn start_logging(dialect: Dialect, log_level: Option<&'static str>) -> PyRelay {
        let dir = temp_dir(&format!("py-relay-{dialect}-"));
        let log = dir.path().join("relay.log");
        let mut relay = PyRelay {
            dialect,
            port: 0,
            child: None,
            starts: 0,
            log_level,
            log,
            dir,
        };
        // A free port can be taken by someone else before the relay binds
        // it; try a few.
        for attempt in 1..=3 {
            relay.port = free_port();
            match relay.spawn_and_wait().await {
                Ok(()) => return relay,
                Err(e) if attempt < 3 && e.contains("in use") => continue,
                Err(e) => relay.fail(&e),
            }
        }
        unreachable!()
    }

    /// Start a relay of `dialect` on a given port.
    pub async fn start_on(dialect: Dialect, port: u16) -> PyRelay {
        let dir = temp_dir(&format!("py-relay-{dialect}-"));
        let log = dir.path().join("relay.log");
        let mut relay = PyRelay {
            dialect,
            port,
            child: None,
            starts: 0,
            log_level: None,
            log,
            dir,
        };
        if let Err(e) = relay.spawn_and_wait().await {
            relay.fail(&e);
        }
        relay
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The relay's log (all its runs, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the relay's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }

    /// The relay process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the relay process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL the relay and reap it: connections drop without a close
    /// frame (peers see 1006). No-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop the relay politely: SIGTERM, up to 10 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                sigterm(child.id());
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(POLL_INTERVAL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the relay again on the same port (killing it first if it is
    /// still running) and wait until it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn_and_wait().await {
            self.fail(&e);
        }
    }

    fn fail(&mut self, error: &str) -> ! {
        self.kill();
        panic!(
            "{} relay on port {}: {error}\n--- {} (tail) ---\n{}",
            self.dialect,
            self.port,
            self.log.display(),
            self.log_tail()
        );
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let program = venv_bin(self.dialect, "proxystore-relay");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let _ = writeln!(
            log,
            "=== relay-sidecar tests: start #{} of {} --host 127.0.0.1 --port {} ===",
            self.starts,
            program.display(),
            self.port
        );
        let stderr = log.try_clone().map_err(|e| format!("dup log: {e}"))?;
        let child = Command::new(&program)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(
                self.log_level
                    .iter()
                    .flat_map(|level| ["--log-level", level]),
            )
            .current_dir(self.dir.path())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", program.display()))?;
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let tail = self.log_tail();
                let why = if tail.contains("address already in use") {
                    "port in use"
                } else {
                    "exited"
                };
                return Err(format!("{why} before accepting connections ({status})"));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not accepting connections after {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for PyRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// PyPeer
// ---------------------------------------------------------------------------

/// A peer connection message as the remote peer received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMsg {
    pub source_uuid: Uuid,
    pub source_name: String,
    pub peer_uuid: Uuid,
    pub description_type: String,
    pub description: String,
    /// Set by the relay on a bounce (target not registered, ...).
    pub error: Option<String>,
}

/// One event line from `peer.py`.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    /// Registered with the relay (first time, and after every automatic
    /// re-registration).
    Registered { uuid: Uuid, name: String },
    /// A peer connection message (from a peer, or a relay bounce).
    Message(PeerMsg),
    /// A relay response outside registration (legacy relay: the answer to a
    /// message from an unregistered socket).
    RelayResponse {
        success: bool,
        message: Option<String>,
        error: bool,
    },
    /// A failure the peer reported. `op` is where ("connect", "recv",
    /// "send", "reconnect", "stdin"); `code` the close code the relay sent.
    Error {
        kind: String,
        detail: String,
        op: String,
        code: Option<u16>,
    },
    /// Anything else the peer printed, as JSON.
    Other(Value),
}

/// A remote peer: `tests/python/peer.py` run with `dialect`'s interpreter,
/// registered with a relay through the real ProxyStore client. Killed on
/// drop.
#[derive(Debug)]
pub struct PyPeer {
    dialect: Dialect,
    uuid: Uuid,
    name: String,
    child: tokio::process::Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PyPeer {
    /// Start a peer that registers with the relay at `url` as `uuid` (a new
    /// random one when `None`) and `name`, and wait (up to
    /// [`READY_TIMEOUT`]) until it has registered.
    pub async fn start(dialect: Dialect, url: &str, uuid: Option<Uuid>, name: &str) -> PyPeer {
        let uuid = uuid.unwrap_or_else(Uuid::new_v4);
        let python = python(dialect);
        let script = peer_script();
        let dir = temp_dir(&format!("py-peer-{dialect}-"));
        let stderr_log = dir.path().join("peer.stderr.log");
        let stderr = File::create(&stderr_log).expect("create the peer's stderr log");
        let mut child = tokio::process::Command::new(&python)
            .arg(&script)
            .args(["--url", url, "--uuid", &uuid.to_string(), "--name", name])
            .current_dir(dir.path())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {}: {e}", python.display(), script.display()));
        let stdin = child.stdin.take().expect("peer stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("peer stdout is piped")).lines();
        let mut peer = PyPeer {
            dialect,
            uuid,
            name: name.to_owned(),
            child,
            stdin: Some(stdin),
            stdout,
            stderr_log,
            _dir: dir,
        };
        match peer.recv(READY_TIMEOUT).await {
            PeerEvent::Registered {
                uuid: got,
                name: got_name,
            } if got == peer.uuid && got_name == peer.name => {}
            other => peer.fail(&format!("expected its `registered` event, got {other:?}")),
        }
        peer
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id, while the peer runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines of the peer's stderr (the ProxyStore client's log).
    pub fn stderr_tail(&self) -> String {
        log_tail(&self.stderr_log, LOG_TAIL_LINES)
    }

    /// Ask the peer to send a peer connection message to `peer_uuid`, with
    /// its own uuid and name as the source. Returns once the command is
    /// written to its stdin (sends are carried out in order).
    pub async fn send(&mut self, peer_uuid: Uuid, description_type: &str, description: &str) {
        let command = serde_json::json!({
            "cmd": "send",
            "peer_uuid": peer_uuid.to_string(),
            "description_type": description_type,
            "description": description,
        });
        self.write_line(&command.to_string()).await;
    }

    /// Like [`PyPeer::send`], with `source_uuid` and `error` forged: the
    /// relay checks neither, so any peer can claim to be anyone.
    pub async fn send_forged(
        &mut self,
        source_uuid: Uuid,
        peer_uuid: Uuid,
        description: &str,
        error: &str,
    ) {
        let command = serde_json::json!({
            "cmd": "send",
            "source_uuid": source_uuid.to_string(),
            "peer_uuid": peer_uuid.to_string(),
            "description_type": "offer",
            "description": description,
            "error": error,
        });
        self.write_line(&command.to_string()).await;
    }

    /// The next event, waiting at most `timeout`. Panics (with the peer's
    /// stderr tail) on timeout, on end of output, or on a line that is not
    /// an event.
    pub async fn recv(&mut self, timeout: Duration) -> PeerEvent {
        match self.try_recv(timeout).await {
            Some(event) => event,
            None => self.fail(&format!("no event within {timeout:?}")),
        }
    }

    /// The next event, or `None` if none arrives within `timeout`. Panics on
    /// end of output or on a line that is not an event.
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<PeerEvent> {
        let line = match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Err(_elapsed) => return None,
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let status = self.wait_briefly().await;
                self.fail(&format!("its output ended (exit status: {status})"))
            }
            Ok(Err(e)) => self.fail(&format!("reading its output: {e}")),
        };
        match parse_event(&line) {
            Ok(event) => Some(event),
            Err(e) => self.fail(&format!("bad event line {line:?}: {e}")),
        }
    }

    /// The next event, which must be a message (nothing is skipped).
    pub async fn expect_message(&mut self, timeout: Duration) -> PeerMsg {
        match self.recv(timeout).await {
            PeerEvent::Message(message) => message,
            other => self.fail(&format!("expected a message, got {other:?}")),
        }
    }

    /// Assert that no event at all arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Some(event) = self.try_recv(quiet).await {
            self.fail(&format!("expected no event for {quiet:?}, got {event:?}"));
        }
    }

    /// Wait for the peer to register again (after the relay went away),
    /// skipping the error events that the reconnection produces. Panics on
    /// a message or on timeout.
    pub async fn wait_registered(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                PeerEvent::Registered { .. } => return,
                PeerEvent::Error { .. } => continue,
                other => self.fail(&format!("waiting to re-register, got {other:?}")),
            }
        }
    }

    /// Wait up to `timeout` for the peer to exit by itself (e.g. after an
    /// unrecoverable close) and return its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => self.fail(&format!("waiting for it to exit: {e}")),
            Err(_) => self.fail(&format!("still running after {timeout:?}")),
        }
    }

    /// Close the client (a normal close) and wait for the peer to exit 0.
    pub async fn quit(mut self) {
        self.write_line(r#"{"cmd": "quit"}"#).await;
        self.stdin = None;
        let status = self.wait_exit(Duration::from_secs(15)).await;
        if !status.success() {
            self.fail(&format!("quit, but exited with {status}"));
        }
    }

    /// SIGKILL the peer: its connection drops without a close frame.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    async fn write_line(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else {
            self.fail("its stdin is already closed")
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let result = async {
            stdin.write_all(&bytes).await?;
            stdin.flush().await
        }
        .await;
        if let Err(e) = result {
            let status = self.wait_briefly().await;
            self.fail(&format!(
                "writing a command to it: {e} (exit status: {status})"
            ));
        }
    }

    /// The exit status if the peer exits within a moment, for messages.
    async fn wait_briefly(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("unknown: {e}"),
            Err(_) => "still running".to_owned(),
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{} peer {:?} ({}): {what}\n--- peer stderr (tail) ---\n{}",
            self.dialect,
            self.name,
            self.uuid,
            self.stderr_tail()
        );
    }
}

fn str_field(object: &Value, key: &str) -> Result<String, String> {
    object
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("missing string field {key:?}"))
}

fn opt_str_field(object: &Value, key: &str) -> Result<Option<String>, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("field {key:?} is not a string or null: {other}")),
    }
}

fn uuid_field(object: &Value, key: &str) -> Result<Uuid, String> {
    let text = str_field(object, key)?;
    Uuid::parse_str(&text).map_err(|e| format!("field {key:?} = {text:?}: {e}"))
}

fn bool_field(object: &Value, key: &str) -> Result<bool, String> {
    object
        .get(key)
        .and_then(Value::as_bool)
        .ok_or_else(|| format!("missing bool field {key:?}"))
}

/// Parse one line printed by `peer.py`.
pub fn parse_event(line: &str) -> Result<PeerEvent, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let event = value
        .get("event")
        .and_then(Value::as_str)
        .ok_or("no \"event\" field")?;
    Ok(match event {
        "registered" => PeerEvent::Registered {
            uuid: uuid_field(&value, "uuid")?,
            name: str_field(&value, "name")?,
        },
        "message" => PeerEvent::Message(PeerMsg {
            source_uuid: uuid_field(&value, "source_uuid")?,
            source_name: str_field(&value, "source_name")?,
            peer_uuid: uuid_field(&value, "peer_uuid")?,
            description_type: str_field(&value, "description_type")?,
            description: str_field(&value, "description")?,
            error: opt_str_field(&value, "error")?,
        }),
        "relay_response" => PeerEvent::RelayResponse {
            success: bool_field(&value, "success")?,
            message: opt_str_field(&value, "message")?,
            error: bool_field(&value, "error")?,
        },
        "error" => PeerEvent::Error {
            kind: str_field(&value, "kind")?,
            detail: str_field(&value, "detail")?,
            op: opt_str_field(&value, "op")?.unwrap_or_default(),
            code: value
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok()),
        },
        _ => PeerEvent::Other(value),
    })
}
