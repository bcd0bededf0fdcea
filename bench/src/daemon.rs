//! The daemons under measurement: the real `relay-sidecar` binary in child
//! processes, each registered with a relay, and the scratch directory that
//! holds their sockets, state and logs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use relay_sidecar_client::proto::v1::relay_sidecar_client::RelaySidecarClient;
use tokio::time::{Instant, timeout};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::procfs;
use crate::traffic::START_TIMEOUT;

/// A worker's gRPC client, on a connection of its own.
pub type Grpc = RelaySidecarClient<Channel>;

/// A `relay-sidecar` daemon in a child process, registered with a relay.
pub struct DaemonProc {
    name: String,
    child: tokio::process::Child,
    pub pid: u32,
    pub socket: PathBuf,
    log: PathBuf,
    pub uuid: Uuid,
}

/// The setting that keeps an offer for a host's first subscriber.
const KEEP_UNCLAIMED_OFFERS: (&str, &str) = ("RELAY_SIDECAR_UNCLAIMED_OFFERS", "backlog");

/// Whether the daemon at `exe` takes [`KEEP_UNCLAIMED_OFFERS`] (its
/// check-config passes with it), asked once per run: every daemon of a run is
/// the one build, and `--daemon` may name an older one.
fn takes_keep_unclaimed_offers(exe: &Path) -> bool {
    static TAKES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TAKES.get_or_init(|| {
        std::process::Command::new(exe)
            .args(["--config", "/dev/null", "--relay-url", "ws://127.0.0.1:1"])
            .arg("check-config")
            .env(KEEP_UNCLAIMED_OFFERS.0, KEEP_UNCLAIMED_OFFERS.1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

impl DaemonProc {
    /// The CPU time the daemon has used so far, all threads, ns.
    pub fn cpu_ns(&self) -> Result<u64> {
        procfs::cpu_ns(&self.pid.to_string(), None)
    }

    pub async fn start(exe: &Path, dir: &Path, name: &str, relay_url: &str) -> Result<DaemonProc> {
        let socket = dir.join(format!("{name}.sock"));
        let state = dir.join(format!("{name}-state"));
        let log = dir.join(format!("{name}.log"));
        // No settings but the flags, whatever /etc holds.
        let config = dir.join(WorkDir::EMPTY_CONFIG);
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("--config")
            .arg(&config)
            .args(["--relay-url", relay_url, "--name", name])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .args(["--log-level", "warn", "--log-format", "text"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::create(&log)?.try_clone()?))
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RELAY_SIDECAR_") {
                command.env_remove(key);
            }
        }
        // Workers start pinging other hosts before those hosts' workers have
        // subscribed: keep such a ping for them, where the default answers
        // it at once with a refusal. (Builds from before the setting kept
        // them anyway, and refuse a setting they do not know.)
        if takes_keep_unclaimed_offers(exe) {
            command.env(KEEP_UNCLAIMED_OFFERS.0, KEEP_UNCLAIMED_OFFERS.1);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?;
        let pid = child.id().context("the daemon has no pid")?;
        let deadline = Instant::now() + START_TIMEOUT;
        let client = loop {
            if let Some(status) = child.try_wait()? {
                bail!("exited with {status}:\n{}", tail(&log));
            }
            if socket.exists()
                && let Ok(client) = relay_sidecar_client::connect(&socket).await
            {
                break client;
            }
            ensure!(
                Instant::now() < deadline,
                "no socket after {START_TIMEOUT:?}:\n{}",
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut statuses = client.watch_status().await?;
        let registered = timeout(START_TIMEOUT, async {
            while let Some(status) = statuses.next_status().await? {
                if status.state == relay_sidecar_client::ConnectionState::Registered {
                    return anyhow::Ok(status);
                }
            }
            bail!("the status stream ended")
        })
        .await;
        let status = match registered {
            Ok(result) => result?,
            Err(_) => bail!("not registered after {START_TIMEOUT:?}:\n{}", tail(&log)),
        };
        Ok(DaemonProc {
            name: name.to_owned(),
            child,
            pid,
            socket,
            log,
            uuid: status.uuid,
        })
    }

    /// A new connection to the daemon (a worker process would have one).
    pub async fn client(&self) -> Result<Grpc> {
        Ok(relay_sidecar_client::connect(&self.socket).await?.raw())
    }

    /// Fails if the daemon lost its relay connection or any message.
    pub async fn check_clean(&self) -> Result<()> {
        let status = relay_sidecar_client::connect(&self.socket)
            .await?
            .status()
            .await?;
        let c = &status.counters;
        ensure!(
            c.reconnects == 0 && c.dropped == 0 && c.bounced == 0 && c.undecodable == 0,
            "daemon {}: {} reconnects, {} dropped, {} bounced, {} undecodable (a measurement \
             that loses messages means nothing):\n{}",
            self.name,
            c.reconnects,
            c.dropped,
            c.bounced,
            c.undecodable,
            tail(&self.log)
        );
        Ok(())
    }

    /// Stops the daemon as systemd would.
    pub async fn stop(mut self) {
        terminate(&mut self.child).await;
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within 5 s.
pub async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if timeout(Duration::from_secs(5), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A scratch directory for sockets, state and logs; removed on drop.
pub struct WorkDir {
    pub path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// An empty config file in the directory, for every daemon.
    const EMPTY_CONFIG: &str = "empty.toml";

    pub fn create(keep: bool) -> Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("relay-sidecar-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        std::fs::write(path.join(Self::EMPTY_CONFIG), "")?;
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("relay-sidecar-bench: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
