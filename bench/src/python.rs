//! The anchor, what users would otherwise run: ProxyStore 1.1.0's own
//! `RelayClient` pair through ProxyStore's Python relay; and the sidecar
//! path through that same relay.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::daemon::{tail, terminate};
use crate::machine::Machine;
use crate::raw::{PairRuns, pair_rows};
use crate::report::{P50_P99, Results, Row, Unit};
use crate::run::Bench;
use crate::sidecar::{sidecar_latency, sidecar_stream, sidecar_unary};
use crate::traffic::{MEASURE_TIMEOUT, START_TIMEOUT, progress};

/// What `tests/python/bench_proxystore.py` prints.
#[derive(Debug, serde::Deserialize)]
struct Anchor {
    proxystore: String,
    python: String,
    #[serde(flatten)]
    runs: PairRuns,
}

/// The Python with proxystore: the flag, else `RELAY_SIDECAR_PYTHON`, else
/// the repository's `.venv`. Made absolute (not canonical: the venv's
/// `bin/python` is a symlink that must stay one), so that it names the same
/// file whatever directory a child runs in.
pub fn find(given: Option<&Path>) -> Result<PathBuf> {
    let candidate = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("RELAY_SIDECAR_PYTHON").map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    ensure!(
        candidate.is_file(),
        "no Python with proxystore at {} (run scripts/test to build .venv, pass --python, \
         or --no-python to skip the ProxyStore rows)",
        candidate.display()
    );
    Ok(std::path::absolute(&candidate)?)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The anchor and the sidecar through the Python relay.
pub async fn measure(
    bench: &Bench,
    python: &Path,
    results: &mut Results,
    machine: &mut Machine,
) -> Result<()> {
    let c = &bench.counts;
    let relay = PyRelay::start(python, &bench.dir).await?;
    let script = repo_root().join("tests/python/bench_proxystore.py");
    let output = timeout(
        MEASURE_TIMEOUT,
        tokio::process::Command::new(python)
            .arg(&script)
            .args(["--url", &relay.url()])
            .args(["--latency", &c.py_latency.to_string()])
            .args(["--throughput", &c.py_throughput.to_string()])
            .args(["--repetitions", &c.repetitions.to_string()])
            .args(["--payload", &c.payload.to_string()])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the ProxyStore anchor timed out")?
    .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let anchor: Anchor = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{} printed no result", script.display()))?;
    machine.python = Some(anchor.python);
    machine.proxystore = Some(anchor.proxystore);
    let runs = anchor.runs;
    for (rep, (samples, rate)) in runs.latency_us.iter().zip(&runs.throughput).enumerate() {
        progress("proxystore", rep, samples, Some(*rate));
    }
    pair_rows(
        results,
        "proxystore",
        "anchor",
        "ProxyStore RelayClient pair, Python relay",
        runs,
    );

    let a = bench.start_daemon("py-a", &relay.url()).await?;
    let b = bench.start_daemon("py-b", &relay.url()).await?;
    let (mut latencies, mut stream, mut unary) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..c.repetitions {
        let samples = sidecar_latency(&a, &b, c.warmup, c.py_latency, c.payload).await?;
        let s = sidecar_stream(&a, &b, c.py_throughput, c.payload).await?;
        let u = sidecar_unary(
            &a,
            &b,
            c.py_throughput.div_ceil(c.workers) * c.workers,
            c.workers,
            c.payload,
        )
        .await?;
        progress("sidecar via Python relay", rep, &samples, Some(s));
        eprintln!("  unary x{}: {u:.0}/s", c.workers);
        latencies.push(samples);
        stream.push(s);
        unary.push(u);
    }
    a.check_clean().await?;
    b.check_clean().await?;
    a.stop().await;
    b.stop().await;
    relay.stop().await;
    results.latency(
        "sidecar_py",
        "sidecar via Python relay",
        "unary Send: worker > daemon > Python relay > daemon > worker",
        &latencies,
        P50_P99,
        Some("proxystore"),
    );
    results.add(
        Row::new(
            "sidecar_py.stream_throughput",
            "sidecar via Python relay",
            "SendStream, one worker, end to end".into(),
            Unit::PerSecond,
            stream,
        )
        .reference("proxystore.throughput"),
    );
    results.add(
        Row::new(
            "sidecar_py.unary_throughput",
            "sidecar via Python relay",
            format!("unary Send, {} workers, end to end", c.workers),
            Unit::PerSecond,
            unary,
        )
        .reference("proxystore.throughput"),
    );
    Ok(())
}

/// ProxyStore's relay (`proxystore-relay` from the venv) in a child process,
/// logging at `warning` so that no log line is written per message.
struct PyRelay {
    child: tokio::process::Child,
    port: u16,
}

impl PyRelay {
    async fn start(python: &Path, dir: &Path) -> Result<PyRelay> {
        let program = python.with_file_name("proxystore-relay");
        ensure!(
            program.is_file(),
            "no {} (is proxystore installed there?)",
            program.display()
        );
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port();
        let log = dir.join("proxystore-relay.log");
        let mut child = tokio::process::Command::new(&program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--log-level", "warning"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::create(&log)?.try_clone()?))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("proxystore-relay exited with {status}:\n{}", tail(&log));
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(PyRelay { child, port });
            }
            ensure!(
                Instant::now() < deadline,
                "proxystore-relay not up:\n{}",
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    async fn stop(mut self) {
        terminate(&mut self.child).await;
    }
}
