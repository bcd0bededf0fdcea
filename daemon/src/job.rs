//! A user's daemon in the background, for a batch job (Slurm, PBS) or a
//! shell: `relay-sidecar start` runs the daemon as a child, waits until it is
//! registered (or fails with the reason), and reports what workers need;
//! `relay-sidecar stop` stops it; and a daemon started so watches the
//! process that started it and stops when that process is gone, which is
//! how it notices that its job has ended even where nothing else stops it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use relay_sidecar_client::{ConnectionState, Status};
use tokio_util::sync::CancellationToken;

use crate::SHUTDOWN_GRACE;

/// How long `start` waits, by default, for the daemon to register: long
/// enough for a few attempts with backoff (each allowed `timeout`, 10 s by
/// default), short enough that a job script with a wrong relay fails within
/// a minute rather than running its workers without one.
pub const START_WAIT: Duration = Duration::from_secs(60);
/// How long `stop` waits for the daemon to exit after SIGTERM before it
/// kills it: the daemon's own shutdown bound and a margin.
pub const STOP_WAIT: Duration = SHUTDOWN_GRACE.saturating_add(Duration::from_secs(4));
/// How often a daemon checks that the process it was told to exit with is
/// still there. The check is one read of a small `/proc` file; a job's end
/// is noticed within this.
pub const EXIT_WITH_POLL: Duration = Duration::from_secs(1);
/// How often `start` and `stop` look at the socket or the process while
/// waiting for a child they started or signalled (bounded by the waits
/// above).
const POLL: Duration = Duration::from_millis(20);

/// Why `start` or `stop` failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "a relay-sidecar (pid {pid}) is already serving on {socket}; stop it with `relay-sidecar stop`, or run one per job with --job LABEL (RELAY_SIDECAR_JOB)"
    )]
    AlreadyRunning { socket: PathBuf, pid: u32 },
    #[error("cannot start the daemon: {0}")]
    Spawn(std::io::Error),
    #[error("the daemon exited ({0}) before it registered; its message is above")]
    Exited(ExitStatus),
    #[error("the relay connection failed: {0}; the daemon was stopped")]
    Failed(String),
    #[error("not registered within {within:?} ({last}); the daemon was stopped")]
    NotRegistered { within: Duration, last: String },
    #[error("{0}")]
    Client(#[from] relay_sidecar_client::Error),
    #[error(
        "the daemon on {socket} (pid {pid}) belongs to uid {uid}, not to you; it is not yours to stop"
    )]
    NotYours { socket: PathBuf, pid: u32, uid: u32 },
    #[error("cannot signal the daemon (pid {pid}): {source}")]
    Signal { pid: u32, source: nix::Error },
    #[error("cannot reach {socket}: {source}")]
    Socket {
        socket: PathBuf,
        source: std::io::Error,
    },
}

/// A daemon that `start` left running.
#[derive(Debug)]
pub struct Started {
    pub pid: u32,
    pub socket: PathBuf,
    pub status: Status,
}

/// Runs `program args` as the daemon in the background and waits (at most
/// `wait`) until it serves on `socket` and is registered (or, `lazy`,
/// serving). `progress` sees each other state on the way. On failure the
/// child is stopped. The child's stderr is this process's, so that its log
/// goes where the job's output goes; its stdout is not, so that a shell's
/// `$(relay-sidecar start)` ends when `start` does.
pub async fn start(
    program: &Path,
    args: Vec<OsString>,
    socket: &Path,
    lazy: bool,
    wait: Duration,
    mut progress: impl FnMut(&Status),
) -> Result<Started, JobError> {
    if let Some(pid) = serving_pid(socket).await? {
        return Err(JobError::AlreadyRunning {
            socket: socket.to_path_buf(),
            pid,
        });
    }
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Not in the shell's foreground group: a Ctrl-C meant for a later
        // command does not reach it.
        .process_group(0);
    let mut child = tokio::process::Command::from(command)
        .spawn()
        .map_err(JobError::Spawn)?;
    let pid = child.id().unwrap_or_default();
    let mut last: Option<Status> = None;
    let waited = tokio::time::timeout(
        wait,
        until_registered(socket, &mut child, lazy, &mut last, &mut progress),
    )
    .await;
    let outcome = waited.unwrap_or_else(|_| {
        Err(JobError::NotRegistered {
            within: wait,
            last: match &last {
                None => format!("{} never answered", socket.display()),
                Some(s) if s.detail.is_empty() => s.state.to_string(),
                Some(s) => format!("{}: {}", s.state, s.detail),
            },
        })
    });
    match outcome {
        Ok(status) => Ok(Started {
            pid,
            socket: socket.to_path_buf(),
            status,
        }),
        Err(e) => {
            if child.try_wait().ok().flatten().is_none() {
                let _ = terminate(pid).await;
            }
            let _ = child.wait().await;
            Err(e)
        }
    }
}

async fn until_registered(
    socket: &Path,
    child: &mut tokio::process::Child,
    lazy: bool,
    last: &mut Option<Status>,
    progress: &mut impl FnMut(&Status),
) -> Result<Status, JobError> {
    let client = loop {
        if let Some(exit) = child.try_wait().map_err(JobError::Spawn)? {
            return Err(JobError::Exited(exit));
        }
        match relay_sidecar_client::connect(socket).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(POLL).await,
        }
    };
    let mut statuses = client.watch_status().await?;
    loop {
        tokio::select! {
            exit = child.wait() => return Err(JobError::Exited(exit.map_err(JobError::Spawn)?)),
            status = statuses.next() => {
                let Some(status) = status.transpose()? else {
                    let exit = child.wait().await.map_err(JobError::Spawn)?;
                    return Err(JobError::Exited(exit));
                };
                match status.state {
                    ConnectionState::Registered => return Ok(status),
                    ConnectionState::Idle if lazy => return Ok(status),
                    ConnectionState::Failed => return Err(JobError::Failed(status.detail)),
                    _ => progress(&status),
                }
                *last = Some(status);
            }
        }
    }
}

/// Stops the daemon serving on `socket`: SIGTERM, then (after
/// [`STOP_WAIT`]) SIGKILL. Which process that is comes from the socket
/// itself (the peer credentials of its listener); only the caller's own
/// daemon is stopped. `Ok(None)`: nothing serves there.
pub async fn stop(socket: &Path) -> Result<Option<u32>, JobError> {
    let Some(pid) = serving_pid(socket).await? else {
        return Ok(None);
    };
    terminate(pid).await?;
    Ok(Some(pid))
}

/// The pid of the process listening on `socket`, if one answers and it is
/// the caller's (or the caller is root).
async fn serving_pid(socket: &Path) -> Result<Option<u32>, JobError> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => {
            return Err(JobError::Socket {
                socket: socket.to_path_buf(),
                source,
            });
        }
    };
    let cred = stream.peer_cred().map_err(|source| JobError::Socket {
        socket: socket.to_path_buf(),
        source,
    })?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let you = nix::unistd::geteuid();
    if cred.uid() != you.as_raw() && !you.is_root() {
        return Err(JobError::NotYours {
            socket: socket.to_path_buf(),
            pid,
            uid: cred.uid(),
        });
    }
    Ok(Some(pid))
}

/// SIGTERM, a bounded wait, then SIGKILL.
async fn terminate(pid: u32) -> Result<(), JobError> {
    let target = Pid::from_raw(pid as i32);
    let signal = |signal| {
        kill(target, signal).or_else(|e| match e {
            nix::Error::ESRCH => Ok(()),
            source => Err(JobError::Signal { pid, source }),
        })
    };
    signal(Signal::SIGTERM)?;
    let gone = async {
        while Process::find(pid).is_some() {
            tokio::time::sleep(POLL).await;
        }
    };
    if tokio::time::timeout(STOP_WAIT, gone).await.is_err() {
        tracing::warn!(pid, wait = ?STOP_WAIT, "the daemon did not stop; killing it");
        signal(Signal::SIGKILL)?;
    }
    Ok(())
}

/// Cancels `shutdown` once process `pid` has exited: the shell or job
/// script that started this daemon. A pid reused by another process does
/// not count as the same (its start time differs).
pub async fn exit_with(pid: u32, shutdown: CancellationToken) {
    let Some(watched) = Process::find(pid) else {
        tracing::info!(pid, "the process to exit with is already gone; stopping");
        shutdown.cancel();
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(EXIT_WITH_POLL) => {}
        }
        if Process::find(pid) != Some(watched) {
            tracing::info!(
                pid,
                "the process that started this daemon has exited; stopping"
            );
            shutdown.cancel();
            return;
        }
    }
}

/// A running process, told apart from a later one with the same pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Process {
    pid: u32,
    /// Clock ticks after boot at which it started (`/proc/PID/stat` field 22).
    started: u64,
}

impl Process {
    /// The process `pid`, unless it is gone (or a zombie: it has exited and
    /// only waits for its parent to notice).
    fn find(pid: u32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let state = *fields.first()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let started = fields.get(19)?.parse().ok()?;
        Some(Process { pid, started })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_found_until_it_exits() {
        let me = Process::find(std::process::id()).unwrap();
        assert_eq!(Process::find(std::process::id()), Some(me));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(Process::find(pid), None);
    }

    #[tokio::test]
    async fn exit_with_stops_when_the_process_is_gone() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let shutdown = CancellationToken::new();
        let watch = tokio::spawn(exit_with(child.id().unwrap(), shutdown.clone()));
        assert!(!shutdown.is_cancelled());
        child.kill().await.unwrap();
        tokio::time::timeout(EXIT_WITH_POLL * 10, shutdown.cancelled())
            .await
            .expect("noticed within a few polls");
        watch.await.unwrap();
    }
}
