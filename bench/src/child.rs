//! The bench's client processes: this binary re-executed in a client mode
//! ([`Client`]), so that a client runs in a process of its own, as a worker
//! does. Parent and child speak in lines: on the child's stdout, `ready`
//! once it can be measured against, then one JSON result per measurement;
//! on its stdin, whatever its mode waits for (`go`, `stop`). Closing its
//! stdin ends it. Its stderr is the bench's.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines, Stdin};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::time::timeout;

use crate::cli::Client;
use crate::traffic::{MEASURE_TIMEOUT, START_TIMEOUT};
use crate::{limit, scale};

/// The line a child prints once it is ready.
const READY: &str = "ready";
/// How long a child whose stdin was closed gets to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs this process as the client `client`.
pub fn serve(client: Client) -> Result<()> {
    // One thread, as the daemon and the bench's in-process clients have.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async move {
        match client {
            Client::RawPeer(args) => limit::raw_peer(args).await,
            Client::IpcPeer(args) => limit::ipc_peer(args).await,
            Client::ScaleHost(args) => scale::host(args).await,
        }
    });
    // A read of stdin may still wait on its own thread: not for us.
    runtime.shutdown_background();
    outcome
}

/// A client process, as its parent sees it.
pub struct ClientProc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ClientProc {
    /// Starts this binary with `args` (a client mode and its flags).
    pub fn spawn(name: &str, args: &[String]) -> Result<ClientProc> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut child = tokio::process::Command::new(&exe)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {name}: {}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(ClientProc {
            name: name.to_owned(),
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        })
    }

    async fn line(&mut self, within: Duration, what: &str) -> Result<String> {
        match timeout(within, self.stdout.next_line()).await {
            Err(_) => bail!("{}: no {what} within {within:?}", self.name),
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => {
                let status = match timeout(EXIT_TIMEOUT, self.child.wait()).await {
                    Ok(Ok(status)) => status.to_string(),
                    _ => "its stdout closed".to_owned(),
                };
                bail!("{}: ended before its {what} ({status})", self.name)
            }
            Ok(Err(e)) => Err(e).with_context(|| format!("{}: reading its {what}", self.name)),
        }
    }

    /// Waits for the child to say it is ready.
    pub async fn ready(&mut self) -> Result<()> {
        let line = self.line(START_TIMEOUT, "readiness").await?;
        ensure!(
            line == READY,
            "{}: {line:?} instead of {READY:?}",
            self.name
        );
        Ok(())
    }

    /// Tells the child `line`.
    pub async fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// The child's next result.
    pub async fn result<T: DeserializeOwned>(&mut self) -> Result<T> {
        let line = self.line(MEASURE_TIMEOUT, "result").await?;
        serde_json::from_str(&line).with_context(|| format!("{}: printed {line:?}", self.name))
    }

    /// Closes the child's stdin and waits for it to exit cleanly.
    pub async fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = timeout(EXIT_TIMEOUT, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "{}: still running {EXIT_TIMEOUT:?} after its end",
                    self.name
                )
            })??;
        ensure!(status.success(), "{}: {status}", self.name);
        Ok(())
    }
}

/// The parent, as a client process sees it.
pub struct Parent {
    stdin: Lines<BufReader<Stdin>>,
}

impl Parent {
    pub fn new() -> Parent {
        Parent {
            stdin: BufReader::new(tokio::io::stdin()).lines(),
        }
    }

    /// Tells the parent that this client is ready.
    pub fn ready(&self) -> Result<()> {
        say(READY)
    }

    /// Hands the parent a result.
    pub fn result<T: Serialize>(&self, value: &T) -> Result<()> {
        say(&serde_json::to_string(value)?)
    }

    /// The parent's next line; `None` once it has closed our stdin.
    pub async fn next_line(&mut self) -> Result<Option<String>> {
        Ok(self.stdin.next_line().await?)
    }
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}
