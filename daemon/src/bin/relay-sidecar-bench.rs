//! relay-sidecar-bench: what the sidecar costs, measured in one run against
//! the physical limit (a raw Rust WebSocket pair through the embedded relay)
//! and against what users would otherwise run (ProxyStore's Python
//! `RelayClient` pair through ProxyStore's Python relay).
//!
//! Everything runs on loopback. The embedded relay ([`DevRelay`]) runs in
//! this process on a runtime of its own; the daemons are the real
//! `relay-sidecar` binary in child processes (found next to this binary), so
//! the memory figures are a real daemon's. One-way latency is half a
//! ping-pong round trip: the two ends are different processes, which share
//! no monotonic clock. `scripts/bench` builds and runs it; see the README's
//! "Performance" section.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use relay_sidecar::codec::{self, Dialect, Frame, PeerConnection, Registration};
use relay_sidecar::devrelay::DevRelay;
use relay_sidecar::relay;
use relay_sidecar_client::proto::v1;
use relay_sidecar_client::proto::v1::relay_sidecar_client::RelaySidecarClient;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

/// Ping-pongs before the measured ones, in every latency run.
const WARMUP: usize = 100;
/// How far a raw sender may run ahead of its slowest receiver. The embedded
/// relay closes a client with 1024 frames queued for it (a reader that does
/// not keep up), so a raw sender without the daemon's own bound keeps under
/// that.
const WINDOW: u64 = 512;
/// Senders flush at least this often.
const FLUSH_EVERY: u64 = 64;
/// The bound on any one measurement, so that a broken path fails the bench
/// rather than hanging it.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(300);
/// The bound on a daemon or relay coming up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Measures relay-sidecar against a raw WebSocket pair and ProxyStore's own
/// client, on loopback, and prints a table (and JSON).
#[derive(Debug, Parser)]
#[command(name = "relay-sidecar-bench", version)]
struct Flags {
    /// Tiny counts, one repetition: checks that every path works, in
    /// seconds. The figures mean nothing.
    #[arg(long)]
    quick: bool,
    /// Skip the rows that need Python: the ProxyStore anchor and the sidecar
    /// through the Python relay.
    #[arg(long)]
    no_python: bool,
    /// Only these sections, comma-separated: raw, sidecar, memory, fanout,
    /// python. Ratios to a skipped section's rows are left out.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// The Python interpreter with proxystore 1.1.0 (default:
    /// $RELAY_SIDECAR_PYTHON, else .venv/bin/python in the repository).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// The `relay-sidecar` binary (default: next to this one).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Repetitions of every timed measurement; figures are medians over them.
    #[arg(long)]
    repetitions: Option<usize>,
    /// Measured ping-pongs per repetition (Rust paths).
    #[arg(long)]
    latency: Option<usize>,
    /// Messages per repetition for the raw and streaming throughput.
    #[arg(long)]
    throughput: Option<u64>,
    /// Messages per repetition for unary Send, over all workers.
    #[arg(long)]
    unary: Option<u64>,
    /// Concurrent unary workers, each on its own connection.
    #[arg(long, default_value_t = 16)]
    workers: u64,
    /// Messages per repetition in the fan-out (each delivered to every
    /// subscriber).
    #[arg(long)]
    fanout: Option<u64>,
    /// Ungrouped subscribers in the fan-out.
    #[arg(long)]
    fanout_subscribers: Option<u64>,
    /// Open subscriptions for the memory figure.
    #[arg(long)]
    subscriptions: Option<u64>,
    /// Connections the subscriptions are spread over in the second memory
    /// figure (the first gives each its own).
    #[arg(long, default_value_t = 10)]
    subscription_connections: u64,
    /// Ping-pongs per repetition through the Python relay.
    #[arg(long)]
    py_latency: Option<usize>,
    /// Messages per repetition through the Python relay.
    #[arg(long)]
    py_throughput: Option<u64>,
    /// Size of each message's `description`, in bytes.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Keep the scratch directory (daemon logs, sockets) and print its path.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Raw,
    Sidecar,
    Memory,
    Fanout,
    Python,
}

/// The counts of one run, from the flags and `--quick`.
#[derive(Debug, Clone, Serialize)]
struct Counts {
    repetitions: usize,
    latency: usize,
    throughput: u64,
    unary: u64,
    workers: u64,
    fanout: u64,
    fanout_subscribers: u64,
    subscriptions: u64,
    subscription_connections: u64,
    py_latency: usize,
    py_throughput: u64,
    payload: usize,
    warmup: usize,
}

impl Counts {
    fn from(flags: &Flags) -> Counts {
        let q = flags.quick;
        let pick = |given: Option<u64>, quick: u64, full: u64| {
            given.unwrap_or(if q { quick } else { full })
        };
        let subscriptions = pick(flags.subscriptions, 100, 1000);
        let workers = flags.workers.max(1);
        let unary = pick(flags.unary, 320, 64_000);
        Counts {
            repetitions: flags.repetitions.unwrap_or(if q { 1 } else { 5 }).max(1),
            latency: flags.latency.unwrap_or(if q { 20 } else { 5000 }),
            throughput: pick(flags.throughput, 500, 200_000),
            // Every worker sends the same number.
            unary: unary.div_ceil(workers) * workers,
            workers,
            fanout: pick(flags.fanout, 20, 5000),
            fanout_subscribers: pick(flags.fanout_subscribers, 10, 100),
            subscriptions,
            subscription_connections: flags
                .subscription_connections
                .clamp(1, subscriptions.max(1)),
            py_latency: flags.py_latency.unwrap_or(if q { 20 } else { 2000 }),
            py_throughput: pick(flags.py_throughput, 200, 20_000),
            payload: flags.payload,
            warmup: if q { 5 } else { WARMUP },
        }
    }
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    match run(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-sidecar-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: Flags) -> Result<()> {
    let counts = Counts::from(&flags);
    let wanted = |s: Section| flags.only.is_empty() || flags.only.contains(&s);
    let python = if wanted(Section::Python) && !flags.no_python {
        Some(find_python(flags.python.as_deref())?)
    } else {
        None
    };
    let daemon = match &flags.daemon {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("relay-sidecar"),
    };
    ensure!(
        daemon.is_file(),
        "no daemon binary at {} (build it, or pass --daemon)",
        daemon.display()
    );
    let work = WorkDir::create(flags.keep)?;

    // The embedded relay gets a runtime (and so threads) of its own, as it
    // would in its own process; the bench's clients run on another.
    let relay_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-relay")
        .enable_all()
        .build()?;
    let relay = relay_runtime.block_on(DevRelay::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Dialect::Current,
        CancellationToken::new(),
    ))?;
    let bench = Bench {
        counts: counts.clone(),
        daemon,
        relay_url: relay.url(),
        dir: work.path.clone(),
    };
    // The clients (raw WebSocket peers and gRPC workers alike) share one
    // thread: on 2 cores, a second one only adds wake-ups between threads to
    // every round trip, for the raw pair as much as for the sidecar.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("bench")
        .enable_all()
        .build()?;
    let mut machine = Machine::probe();
    eprintln!(
        "relay-sidecar-bench: {} on {} cores, {}; counts {}",
        machine.cpu,
        machine.cores,
        machine.kernel,
        serde_json::to_string(&counts)?
    );
    let mut results = Results::default();
    let outcome = runtime.block_on(async {
        if wanted(Section::Raw) {
            bench.raw(&mut results).await.context("raw relay path")?;
        }
        if wanted(Section::Memory) {
            bench.memory(&mut results).await.context("memory")?;
        }
        if wanted(Section::Sidecar) {
            bench.sidecar(&mut results).await.context("sidecar path")?;
        }
        if wanted(Section::Fanout) {
            bench.fanout(&mut results).await.context("fan-out")?;
        }
        match &python {
            Some(python) => bench
                .python(python, &mut results, &mut machine)
                .await
                .context("Python relay paths")?,
            None if wanted(Section::Python) => {
                eprintln!("relay-sidecar-bench: --no-python: the ProxyStore rows are skipped");
            }
            None => {}
        }
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    relay_runtime.block_on(async {
        let _ = timeout(Duration::from_secs(5), relay.stop()).await;
    });
    relay_runtime.shutdown_timeout(Duration::from_secs(2));
    outcome?;

    machine.finish();
    let report = results.report(machine, counts);
    print!("{}", report.table());
    if let Some(path) = &flags.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("relay-sidecar-bench: wrote {}", path.display());
    }
    Ok(())
}

/// The Python with proxystore: the flag, else `RELAY_SIDECAR_PYTHON`, else
/// the repository's `.venv`.
fn find_python(given: Option<&Path>) -> Result<PathBuf> {
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
    Ok(candidate)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A scratch directory for sockets, state and logs; removed on drop.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create(keep: bool) -> Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("relay-sidecar-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
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

// ---------------------------------------------------------------------------
// The measurements
// ---------------------------------------------------------------------------

struct Bench {
    counts: Counts,
    daemon: PathBuf,
    relay_url: String,
    dir: PathBuf,
}

impl Bench {
    /// The limit: two raw WebSocket clients through the embedded relay.
    async fn raw(&self, results: &mut Results) -> Result<()> {
        let c = &self.counts;
        let mut a = RawPeer::connect(&self.relay_url, "bench-raw-a").await?;
        let mut b = RawPeer::connect(&self.relay_url, "bench-raw-b").await?;
        let mut latencies = Vec::new();
        let mut rates = Vec::new();
        for rep in 0..c.repetitions {
            let (samples, back) = raw_latency(&mut a, b, c.warmup, c.latency, c.payload).await?;
            b = back;
            let (rate, back) = raw_throughput(&mut a, b, c.throughput, c.payload).await?;
            b = back;
            progress("raw", rep, &samples, rate);
            latencies.push(samples);
            rates.push(rate);
        }
        results.latency(
            "raw",
            "limit",
            "raw WebSocket pair, embedded relay",
            latencies,
            None,
        );
        results.add(Row::new(
            "raw.throughput",
            "limit",
            "raw WebSocket pair, embedded relay: pipelined throughput".into(),
            Unit::PerSecond,
            rates,
        ));
        Ok(())
    }

    /// The sidecar path through the embedded relay.
    async fn sidecar(&self, results: &mut Results) -> Result<()> {
        let c = &self.counts;
        let a = self.start_daemon("sidecar-a", &self.relay_url).await?;
        let b = self.start_daemon("sidecar-b", &self.relay_url).await?;
        let (mut latencies, mut unary, mut stream) = (Vec::new(), Vec::new(), Vec::new());
        let mut round_trips = Vec::new();
        // CPU per message, µs: [unary, stream] x [sending, receiving daemon].
        let mut cpu: [[Vec<f64>; 2]; 2] = Default::default();
        for rep in 0..c.repetitions {
            round_trips.push(grpc_round_trips(&a, c.warmup, c.latency).await?);
            let samples = sidecar_latency(&a, &b, c.warmup, c.latency, c.payload).await?;
            let start = (a.cpu_ns()?, b.cpu_ns()?);
            let u = sidecar_unary(&a, &b, c.unary, c.workers, c.payload).await?;
            let between = (a.cpu_ns()?, b.cpu_ns()?);
            let s = sidecar_stream(&a, &b, c.throughput, c.payload).await?;
            let end = (a.cpu_ns()?, b.cpu_ns()?);
            let per_message =
                |from: u64, to: u64, count: u64| (to - from) as f64 / count as f64 / 1e3;
            cpu[0][0].push(per_message(start.0, between.0, c.unary));
            cpu[0][1].push(per_message(start.1, between.1, c.unary));
            cpu[1][0].push(per_message(between.0, end.0, c.throughput));
            cpu[1][1].push(per_message(between.1, end.1, c.throughput));
            progress("sidecar", rep, &samples, s);
            eprintln!("  unary x{}: {u:.0}/s", c.workers);
            latencies.push(samples);
            unary.push(u);
            stream.push(s);
        }
        a.check_clean().await?;
        b.check_clean().await?;
        results.latency(
            "sidecar",
            "sidecar",
            "worker > daemon > embedded relay > daemon > worker",
            latencies,
            Some(("raw", Target::RatioAtMost(2.5))),
        );
        results.add(
            Row::new(
                "sidecar.grpc_round_trip",
                "sidecar",
                "a bare gRPC round trip to a daemon (GetStatus), p50: part of every one-way trip"
                    .into(),
                Unit::Micros,
                round_trips,
            )
            .reference("raw.latency_p50"),
        );
        results.add(
            Row::new(
                "sidecar.unary_throughput",
                "sidecar",
                format!("unary Send, {} workers, end to end", c.workers),
                Unit::PerSecond,
                unary,
            )
            .reference("raw.throughput")
            .target(Target::AtLeast(40_000.0)),
        );
        results.add(
            Row::new(
                "sidecar.stream_throughput",
                "sidecar",
                "SendStream, one worker, end to end".into(),
                Unit::PerSecond,
                stream,
            )
            .reference("raw.throughput")
            .target(Target::AtLeast(500_000.0)),
        );
        let calls = [("unary", "unary Send"), ("stream", "SendStream")];
        for ((rpc, call), [sending, receiving]) in calls.into_iter().zip(cpu) {
            for (side, samples) in [("sending", sending), ("receiving", receiving)] {
                results.add(Row::new(
                    &format!("sidecar.{rpc}_cpu_{side}"),
                    "sidecar",
                    format!("{call}: CPU time of the {side} daemon per message"),
                    Unit::Micros,
                    samples,
                ));
            }
        }
        a.stop().await;
        b.stop().await;
        Ok(())
    }

    /// Daemon RSS idle, and with many open subscriptions: each on its own
    /// connection (as from that many worker processes), and shared over a
    /// few connections. Each case on a fresh daemon.
    async fn memory(&self, results: &mut Results) -> Result<()> {
        let c = &self.counts;
        let (idle, own) = self.subscribed_rss(c.subscriptions).await?;
        let (_, shared) = self.subscribed_rss(c.subscription_connections).await?;
        eprintln!(
            "memory: idle {idle}; {n} subscriptions on {n} connections {own}; on {} connections {shared}",
            c.subscription_connections,
            n = c.subscriptions,
        );
        results.add(
            Row::new(
                "memory.idle_rss",
                "memory",
                "daemon RSS, registered, idle".into(),
                Unit::MiB,
                vec![idle.rss_mib()],
            )
            .target(Target::AtMost(8.0))
            .detail(idle.detail()),
        );
        results.add(
            Row::new(
                "memory.subscribed_rss",
                "memory",
                format!(
                    "daemon RSS, {} subscriptions, each on its own connection",
                    thousands(c.subscriptions)
                ),
                Unit::MiB,
                vec![own.rss_mib()],
            )
            .target(Target::AtMost(32.0))
            .detail(own.detail()),
        );
        results.add(
            Row::new(
                "memory.subscribed_shared_rss",
                "memory",
                format!(
                    "daemon RSS, {} subscriptions on {} connections",
                    thousands(c.subscriptions),
                    c.subscription_connections
                ),
                Unit::MiB,
                vec![shared.rss_mib()],
            )
            .target(Target::AtMost(32.0))
            .detail(shared.detail()),
        );
        Ok(())
    }

    /// A fresh daemon's RSS when idle, and then with `subscriptions` open
    /// subscriptions spread over `connections` connections.
    async fn subscribed_rss(&self, connections: u64) -> Result<(Rss, Rss)> {
        let subscriptions = self.counts.subscriptions;
        let daemon = self.start_daemon("memory", &self.relay_url).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = Rss::of(daemon.pid)?;
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(daemon.client().await?);
        }
        let mut streams = Vec::new();
        for n in 0..subscriptions {
            let client = &mut clients[(n % connections) as usize];
            streams.push(subscribe(client, &format!("idle-{n}")).await?);
        }
        let mut probe = daemon.client().await?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let status = probe
                .get_status(v1::GetStatusRequest {})
                .await?
                .into_inner();
            let open = status.counters.map(|c| c.subscribers).unwrap_or(0);
            if open >= subscriptions {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "only {open} of {subscriptions} subscriptions open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let subscribed = Rss::of(daemon.pid)?;
        drop(streams);
        drop(clients);
        daemon.stop().await;
        Ok((idle, subscribed))
    }

    /// One inbound stream delivered to many ungrouped subscribers.
    async fn fanout(&self, results: &mut Results) -> Result<()> {
        let c = &self.counts;
        let daemon = self.start_daemon("fanout", &self.relay_url).await?;
        let mut source = RawPeer::connect(&self.relay_url, "bench-fanout-source").await?;
        let mut rates = Vec::new();
        for rep in 0..c.repetitions {
            let rate = fanout(
                &mut source,
                &daemon,
                c.fanout_subscribers,
                c.fanout,
                c.payload,
            )
            .await?;
            eprintln!("fanout #{rep}: {rate:.0} delivered/s");
            rates.push(rate);
        }
        daemon.check_clean().await?;
        daemon.stop().await;
        results.add(
            Row::new(
                "fanout.delivered",
                "fan-out",
                format!(
                    "one inbound stream to {} ungrouped subscribers: delivered in total",
                    c.fanout_subscribers
                ),
                Unit::PerSecond,
                rates,
            )
            .reference("raw.throughput"),
        );
        Ok(())
    }

    /// The anchor (ProxyStore's client pair through its Python relay) and
    /// the sidecar through that same relay.
    async fn python(
        &self,
        python: &Path,
        results: &mut Results,
        machine: &mut Machine,
    ) -> Result<()> {
        let c = &self.counts;
        let relay = PyRelay::start(python, &self.dir).await?;
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
        machine.python = Some(anchor.python.clone());
        machine.proxystore = Some(anchor.proxystore.clone());
        for (rep, (samples, rate)) in anchor.latency_us.iter().zip(&anchor.throughput).enumerate() {
            progress("proxystore", rep, samples, *rate);
        }
        results.latency(
            "proxystore",
            "anchor",
            "ProxyStore RelayClient pair, Python relay",
            anchor.latency_us,
            None,
        );
        results.add(Row::new(
            "proxystore.throughput",
            "anchor",
            "ProxyStore RelayClient pair, Python relay: pipelined throughput".into(),
            Unit::PerSecond,
            anchor.throughput,
        ));

        let a = self.start_daemon("py-a", &relay.url()).await?;
        let b = self.start_daemon("py-b", &relay.url()).await?;
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
            progress("sidecar via Python relay", rep, &samples, s);
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
            "worker > daemon > Python relay > daemon > worker",
            latencies,
            Some(("proxystore", Target::RatioAtMost(0.7))),
        );
        results.add(
            Row::new(
                "sidecar_py.stream_throughput",
                "sidecar via Python relay",
                "SendStream, one worker, end to end".into(),
                Unit::PerSecond,
                stream,
            )
            .reference("proxystore.throughput")
            .target(Target::RatioAtLeast(0.95)),
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

    async fn start_daemon(&self, name: &str, relay_url: &str) -> Result<DaemonProc> {
        DaemonProc::start(&self.daemon, &self.dir, name, relay_url)
            .await
            .with_context(|| format!("starting daemon {name}"))
    }
}

fn progress(path: &str, rep: usize, samples: &[f64], rate: f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "{path} #{rep}: one-way p50 {:.1} µs, p99 {:.1} µs; throughput {rate:.0}/s",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99)
    );
}

/// What `bench_proxystore.py` prints.
#[derive(Debug, serde::Deserialize)]
struct Anchor {
    proxystore: String,
    python: String,
    latency_us: Vec<Vec<f64>>,
    throughput: Vec<f64>,
}

// ---------------------------------------------------------------------------
// Raw WebSocket peers
// ---------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A relay client with nothing between the code and the socket.
struct RawPeer {
    uuid: Uuid,
    name: String,
    ws: Ws,
}

impl RawPeer {
    async fn connect(url: &str, name: &str) -> Result<RawPeer> {
        let (mut ws, _) = timeout(
            START_TIMEOUT,
            // The daemon's own read size, so that the limit is not
            // handicapped by tungstenite's larger default.
            tokio_tungstenite::connect_async_with_config(
                url,
                Some(WebSocketConfig::default().read_buffer_size(relay::READ_BUFFER_BYTES)),
                true,
            ),
        )
        .await
        .context("connecting to the relay timed out")??;
        let uuid = Uuid::new_v4();
        let registration = Frame::Registration(Registration {
            name: name.to_owned(),
            uuid,
        });
        ws.send(Message::text(codec::encode(
            &registration,
            Dialect::Current,
        )))
        .await?;
        loop {
            let next = timeout(START_TIMEOUT, ws.next())
                .await
                .context("no answer to the registration")?;
            match next {
                Some(Ok(Message::Text(text))) => match codec::decode(&text, Dialect::Current)? {
                    Frame::Response(r) if r.success => break,
                    other => bail!("registration refused: {other:?}"),
                },
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the relay closed during registration"),
            }
        }
        Ok(RawPeer {
            uuid,
            name: name.to_owned(),
            ws,
        })
    }

    fn frame(&self, to: Uuid, kind: &str, description: String) -> Message {
        Message::text(codec::encode(
            &Frame::Peer(PeerConnection {
                source_uuid: self.uuid,
                source_name: self.name.clone(),
                peer_uuid: to,
                description_type: kind.to_owned(),
                description,
                error: None,
            }),
            Dialect::Current,
        ))
    }

    /// The next peer connection message.
    async fn next_peer(&mut self) -> Result<PeerConnection> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => match codec::decode(&text, Dialect::Current)? {
                    Frame::Peer(peer) => return Ok(peer),
                    other => bail!("unexpected frame {other:?}"),
                },
                Some(Ok(Message::Close(frame))) => bail!("the relay closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the relay closed"),
            }
        }
    }
}

/// A message's description: its sequence number, padded to `size` bytes.
fn payload(seq: u64, size: usize) -> String {
    const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let mut text = String::with_capacity(size.max(24));
    let _ = write!(text, "{seq}:");
    while text.len() < size {
        let n = (size - text.len()).min(PAD.len());
        text.push_str(&PAD[..n]);
    }
    text
}

/// Ping-pong between two raw peers: one-way times (half the round trip), µs.
async fn raw_latency(
    a: &mut RawPeer,
    mut b: RawPeer,
    warmup: usize,
    count: usize,
    size: usize,
) -> Result<(Vec<f64>, RawPeer)> {
    let total = warmup + count;
    let (a_uuid, b_uuid) = (a.uuid, b.uuid);
    let echo = tokio::spawn(async move {
        for _ in 0..total {
            let ping = b.next_peer().await?;
            let pong = b.frame(a_uuid, "answer", ping.description);
            b.ws.send(pong).await?;
        }
        anyhow::Ok(b)
    });
    let mut samples = Vec::with_capacity(count);
    let measured = timeout(MEASURE_TIMEOUT, async {
        for seq in 0..total {
            let text = payload(seq as u64, size);
            let start = Instant::now();
            a.ws.send(a.frame(b_uuid, "offer", text.clone())).await?;
            let got = a.next_peer().await?;
            let elapsed = start.elapsed();
            ensure!(got.description == text, "ping {seq}: an unexpected answer");
            if seq >= warmup {
                samples.push(elapsed.as_secs_f64() * 1e6 / 2.0);
            }
        }
        anyhow::Ok(())
    })
    .await;
    if !matches!(measured, Ok(Ok(()))) {
        echo.abort();
    }
    measured.context("raw ping-pong timed out")??;
    let b = echo.await??;
    Ok((samples, b))
}

/// How many messages a receiver has counted, for a sender that keeps a
/// bounded window ahead of it.
#[derive(Debug, Default)]
struct Progress {
    received: AtomicU64,
    changed: Arc<Notify>,
}

impl Progress {
    fn sharing(changed: &Arc<Notify>) -> Progress {
        Progress {
            received: AtomicU64::new(0),
            changed: Arc::clone(changed),
        }
    }

    fn get(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    fn set(&self, n: u64) {
        self.received.store(n, Ordering::Release);
        self.changed.notify_one();
    }
}

/// Pipelined messages from `a` to `b`: messages/s from the first send to the
/// last receive.
async fn raw_throughput(
    a: &mut RawPeer,
    mut b: RawPeer,
    count: u64,
    size: usize,
) -> Result<(f64, RawPeer)> {
    let to = b.uuid;
    let progress = Arc::new(Progress::default());
    let seen = Arc::clone(&progress);
    let receiver = tokio::spawn(async move {
        for n in 1..=count {
            b.next_peer().await?;
            if n % FLUSH_EVERY == 0 || n == count {
                seen.set(n);
            }
        }
        anyhow::Ok((b, Instant::now()))
    });
    let start = Instant::now();
    let sent = timeout(MEASURE_TIMEOUT, async {
        for seq in 0..count {
            while seq - progress.get() >= WINDOW {
                a.ws.flush().await?;
                progress.changed.notified().await;
            }
            a.ws.feed(a.frame(to, "offer", payload(seq, size))).await?;
            if seq % FLUSH_EVERY == FLUSH_EVERY - 1 {
                a.ws.flush().await?;
            }
        }
        a.ws.flush().await?;
        anyhow::Ok(())
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        receiver.abort();
    }
    sent.context("raw sender timed out")??;
    let (b, done) = timeout(MEASURE_TIMEOUT, receiver)
        .await
        .context("raw receiver timed out")???;
    Ok((rate(count, done - start), b))
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

// ---------------------------------------------------------------------------
// The sidecar path
// ---------------------------------------------------------------------------

type Grpc = RelaySidecarClient<Channel>;
type Inbox = tonic::Streaming<v1::SubscribeResponse>;

fn send_request(to: &str, kind: &str, description: String, worker: &str) -> v1::SendRequest {
    v1::SendRequest {
        peer_uuid: to.to_owned(),
        description_type: kind.to_owned(),
        description,
        worker: worker.to_owned(),
    }
}

async fn subscribe(client: &mut Grpc, worker: &str) -> Result<Inbox> {
    let request = v1::SubscribeRequest {
        group: String::new(),
        worker: worker.to_owned(),
        ..Default::default()
    };
    Ok(client.subscribe(request).await?.into_inner())
}

/// Ping-pong between a worker on `a` and one on `b`: one-way times (half
/// the round trip), µs. Each ping's `Send` runs alongside the wait for its
/// pong; the next ping starts once both are done.
async fn sidecar_latency(
    a: &DaemonProc,
    b: &DaemonProc,
    warmup: usize,
    count: usize,
    size: usize,
) -> Result<Vec<f64>> {
    let (mut ping, mut pong) = (a.client().await?, b.client().await?);
    let mut inbox = subscribe(&mut ping, "ping").await?;
    let pong_inbox = subscribe(&mut pong, "pong").await?;
    let responder = tokio::spawn(answer(pong, pong_inbox, a.uuid.to_string()));
    let to = b.uuid.to_string();
    let total = warmup + count;
    let mut samples = Vec::with_capacity(count);
    let measured = timeout(MEASURE_TIMEOUT, async {
        for seq in 0..total {
            let text = payload(seq as u64, size);
            let mut client = ping.clone();
            let request = send_request(&to, "offer", text.clone(), "ping");
            let start = Instant::now();
            let send = client.send(request);
            let receive = async {
                let got = inbox.message().await;
                (got, Instant::now())
            };
            let (sent, (got, arrived)) = tokio::join!(send, receive);
            sent?;
            let got = got?
                .and_then(|r| r.message)
                .context("the ping subscription ended")?;
            ensure!(got.description == text, "ping {seq}: an unexpected answer");
            if seq >= warmup {
                samples.push((arrived - start).as_secs_f64() * 1e6 / 2.0);
            }
        }
        anyhow::Ok(())
    })
    .await;
    responder.abort();
    measured.context("sidecar ping-pong timed out")??;
    Ok(samples)
}

/// The median round trip of `count` GetStatus calls, µs: what the gRPC
/// hops of a message cost before the daemon does anything.
async fn grpc_round_trips(daemon: &DaemonProc, warmup: usize, count: usize) -> Result<f64> {
    let mut client = daemon.client().await?;
    let mut samples = Vec::with_capacity(count);
    for n in 0..warmup + count {
        let start = Instant::now();
        client.get_status(v1::GetStatusRequest {}).await?;
        if n >= warmup {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(percentile(&samples, 0.5))
}

/// Answers every message on `inbox` with one to `to`, never waiting for a
/// send before reading the next message.
async fn answer(client: Grpc, mut inbox: Inbox, to: String) -> Result<()> {
    let mut sends = FuturesUnordered::new();
    loop {
        tokio::select! {
            got = inbox.message() => {
                let Some(message) = got?.and_then(|r| r.message) else {
                    return Ok(());
                };
                let mut client = client.clone();
                let request = send_request(&to, "answer", message.description, "pong");
                sends.push(async move { client.send(request).await });
            }
            Some(sent) = sends.next(), if !sends.is_empty() => {
                sent?;
            }
        }
    }
}

/// Counts `expected` messages on `inbox`; the time the last one arrived.
fn count(mut inbox: Inbox, expected: u64, progress: Arc<Progress>) -> JoinHandle<Result<Instant>> {
    tokio::spawn(async move {
        let mut n = 0;
        while n < expected {
            match inbox.message().await? {
                Some(_) => n += 1,
                None => bail!("the subscription ended after {n} of {expected} messages"),
            }
            if n % FLUSH_EVERY == 0 || n == expected {
                progress.set(n);
            }
        }
        Ok(Instant::now())
    })
}

async fn finished(counter: JoinHandle<Result<Instant>>, what: &str) -> Result<Instant> {
    timeout(MEASURE_TIMEOUT, counter)
        .await
        .with_context(|| format!("{what}: not every message arrived in time"))??
}

/// `workers` workers, each on its own connection to `a`, each sending its
/// share with unary `Send` one after another, to one subscriber on `b`.
async fn sidecar_unary(
    a: &DaemonProc,
    b: &DaemonProc,
    total: u64,
    workers: u64,
    size: usize,
) -> Result<f64> {
    let mut receiver = b.client().await?;
    let inbox = subscribe(&mut receiver, "unary-receiver").await?;
    let counter = count(inbox, total, Arc::new(Progress::default()));
    let mut clients = Vec::new();
    for _ in 0..workers {
        clients.push(a.client().await?);
    }
    let per_worker = total / workers;
    let to = b.uuid.to_string();
    let start = Instant::now();
    let senders: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, mut client)| {
            let to = to.clone();
            let worker = format!("unary-{w}");
            tokio::spawn(async move {
                for seq in 0..per_worker {
                    client
                        .send(send_request(&to, "offer", payload(seq, size), &worker))
                        .await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for sender in senders {
        timeout(MEASURE_TIMEOUT, sender)
            .await
            .context("unary senders timed out")???;
    }
    let done = finished(counter, "unary").await?;
    Ok(rate(total, done - start))
}

/// One worker streams `total` messages to `a` with `SendStream`, to one
/// subscriber on `b`; every message must settle OK. The worker stays within
/// [`WINDOW`] messages of what the subscriber has received: the daemon
/// drops what a subscriber's queue cannot hold, so without such a bound
/// the figure would count lost messages.
async fn sidecar_stream(a: &DaemonProc, b: &DaemonProc, total: u64, size: usize) -> Result<f64> {
    let mut receiver = b.client().await?;
    let inbox = subscribe(&mut receiver, "stream-receiver").await?;
    let received = Arc::new(Progress::default());
    let counter = count(inbox, total, Arc::clone(&received));
    let mut client = a.client().await?;
    let to = b.uuid.to_string();
    let requests = futures_util::stream::unfold(0, move |seq| {
        let (to, received) = (to.clone(), Arc::clone(&received));
        async move {
            if seq == total {
                return None;
            }
            while seq - received.get() >= WINDOW {
                received.changed.notified().await;
            }
            Some((send_request(&to, "offer", payload(seq, size), ""), seq + 1))
        }
    });
    let start = Instant::now();
    let settled = timeout(MEASURE_TIMEOUT, async {
        let mut responses = client.send_stream(requests).await?.into_inner();
        let mut settled = 0;
        while settled < total {
            let response = responses
                .message()
                .await?
                .with_context(|| format!("SendStream ended after {settled} of {total}"))?;
            if let Some(failure) = response.failures.first() {
                bail!(
                    "SendStream: {} failures, the first: message {} code {}: {}",
                    response.failures.len(),
                    failure.index,
                    failure.code,
                    failure.message
                );
            }
            settled = response.settled;
        }
        anyhow::Ok(())
    })
    .await;
    if !matches!(settled, Ok(Ok(()))) {
        counter.abort();
    }
    settled.context("SendStream timed out")??;
    let done = finished(counter, "SendStream").await?;
    Ok(rate(total, done - start))
}

/// A raw peer streams `count` messages to `daemon`, where `subscribers`
/// ungrouped subscriptions each receive all of them: deliveries per second.
/// The source stays within [`WINDOW`] of the slowest subscriber, so that
/// none of them loses messages to a full queue.
async fn fanout(
    source: &mut RawPeer,
    daemon: &DaemonProc,
    subscribers: u64,
    messages: u64,
    size: usize,
) -> Result<f64> {
    let changed = Arc::new(Notify::new());
    let mut progress = Vec::new();
    let mut counters = Vec::new();
    for n in 0..subscribers {
        let mut client = daemon.client().await?;
        let inbox = subscribe(&mut client, &format!("fanout-{n}")).await?;
        let p = Arc::new(Progress::sharing(&changed));
        counters.push(count(inbox, messages, Arc::clone(&p)));
        progress.push(p);
    }
    let slowest = || progress.iter().map(|p| p.get()).min().unwrap_or(messages);
    let start = Instant::now();
    let sent = timeout(MEASURE_TIMEOUT, async {
        for seq in 0..messages {
            while seq - slowest() >= WINDOW {
                source.ws.flush().await?;
                changed.notified().await;
            }
            source
                .ws
                .feed(source.frame(daemon.uuid, "offer", payload(seq, size)))
                .await?;
            if seq % FLUSH_EVERY == FLUSH_EVERY - 1 {
                source.ws.flush().await?;
            }
        }
        source.ws.flush().await?;
        anyhow::Ok(())
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        counters.iter().for_each(JoinHandle::abort);
    }
    sent.context("fan-out source timed out")??;
    let mut done = start;
    for counter in counters {
        done = done.max(finished(counter, "fan-out").await?);
    }
    Ok(rate(messages * subscribers, done - start))
}

// ---------------------------------------------------------------------------
// Processes: daemons and the Python relay
// ---------------------------------------------------------------------------

/// A `relay-sidecar` daemon in a child process, registered with a relay.
struct DaemonProc {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    uuid: Uuid,
}

impl DaemonProc {
    /// The CPU time the daemon has used so far, all threads, ns.
    fn cpu_ns(&self) -> Result<u64> {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            // A thread may end between the listing and the read.
            let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
                continue;
            };
            let ran = stat
                .split_whitespace()
                .next()
                .context("an empty schedstat")?;
            total += ran.parse::<u64>().context("schedstat")?;
        }
        Ok(total)
    }

    async fn start(exe: &Path, dir: &Path, name: &str, relay_url: &str) -> Result<DaemonProc> {
        let socket = dir.join(format!("{name}.sock"));
        let state = dir.join(format!("{name}-state"));
        let log = dir.join(format!("{name}.log"));
        let config = dir.join("empty.toml");
        std::fs::write(&config, "")?;
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
    async fn client(&self) -> Result<Grpc> {
        Ok(relay_sidecar_client::connect(&self.socket).await?.raw())
    }

    /// Fails if the daemon lost its relay connection or any message.
    async fn check_clean(&self) -> Result<()> {
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

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
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
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A process's memory, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
struct Rss {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

impl Rss {
    fn of(pid: u32) -> Result<Rss> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ok(Rss {
            rss_kib: field("VmRSS:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
            threads: field("Threads:"),
        })
    }

    fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    fn detail(&self) -> String {
        format!(
            "anonymous {:.1} MiB, file-backed {:.1} MiB, {} threads",
            self.anon_kib as f64 / 1024.0,
            self.file_kib as f64 / 1024.0,
            self.threads
        )
    }
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} MiB ({})", self.rss_mib(), self.detail())
    }
}

// ---------------------------------------------------------------------------
// The machine and the report
// ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
    /// UTC, when the run started.
    started: String,
    /// /proc/loadavg at the start and at the end: other load skews figures.
    load_start: String,
    load_end: String,
    build: &'static str,
    version: &'static str,
    relay: &'static str,
    python: Option<String>,
    proxystore: Option<String>,
}

impl Machine {
    fn probe() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: format!("Linux {}", read("/proc/sys/kernel/osrelease").trim()),
            started: utc_now(),
            load_start: loadavg(),
            load_end: String::new(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            version: env!("CARGO_PKG_VERSION"),
            relay: "embedded DevRelay in the bench process (own 2-thread tokio runtime); \
                    daemons: relay-sidecar child processes",
            python: None,
            proxystore: None,
        }
    }

    fn finish(&mut self) {
        self.load_end = loadavg();
    }
}

fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Now, as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Unit {
    #[serde(rename = "us")]
    Micros,
    #[serde(rename = "msg/s")]
    PerSecond,
    #[serde(rename = "MiB")]
    MiB,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
enum Target {
    AtMost(f64),
    AtLeast(f64),
    RatioAtMost(f64),
    RatioAtLeast(f64),
}

#[derive(Debug, Serialize)]
struct Row {
    key: String,
    section: String,
    measure: String,
    unit: Unit,
    /// The median over the repetitions.
    value: f64,
    /// One figure per repetition.
    samples: Vec<f64>,
    /// The limit or anchor this figure is compared with.
    reference: Option<String>,
    /// `value` divided by the reference's value.
    ratio: Option<f64>,
    target: Option<Target>,
    met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Row {
    fn new(key: &str, section: &str, measure: String, unit: Unit, samples: Vec<f64>) -> Row {
        Row {
            key: key.to_owned(),
            section: section.to_owned(),
            measure,
            unit,
            value: median(&samples),
            samples,
            reference: None,
            ratio: None,
            target: None,
            met: None,
            detail: None,
        }
    }

    fn reference(mut self, key: &str) -> Row {
        self.reference = Some(key.to_owned());
        self
    }

    fn target(mut self, target: Target) -> Row {
        self.target = Some(target);
        self
    }

    fn detail(mut self, detail: String) -> Row {
        self.detail = Some(detail);
        self
    }
}

#[derive(Debug, Default)]
struct Results {
    rows: Vec<Row>,
}

impl Results {
    fn add(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// The p50 and p99 rows of a latency measurement (one sample list per
    /// repetition); `compare` names the path whose figures they are
    /// compared with, and the p50 target.
    fn latency(
        &mut self,
        path: &str,
        section: &str,
        what: &str,
        runs: Vec<Vec<f64>>,
        compare: Option<(&str, Target)>,
    ) {
        for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
            let per_run: Vec<f64> = runs
                .iter()
                .map(|samples| {
                    let mut sorted = samples.clone();
                    sorted.sort_by(f64::total_cmp);
                    percentile(&sorted, p)
                })
                .collect();
            let mut row = Row::new(
                &format!("{path}.latency_{name}"),
                section,
                format!("{what}: one-way latency {name}"),
                Unit::Micros,
                per_run,
            );
            if let Some((reference, target)) = compare {
                row = row.reference(&format!("{reference}.latency_{name}"));
                if name == "p50" {
                    row = row.target(target);
                }
            }
            self.add(row);
        }
    }

    fn report(mut self, machine: Machine, counts: Counts) -> Report {
        let values: Vec<(String, f64)> =
            self.rows.iter().map(|r| (r.key.clone(), r.value)).collect();
        for row in &mut self.rows {
            row.ratio = row.reference.as_ref().and_then(|key| {
                let (_, reference) = values.iter().find(|(k, _)| k == key)?;
                Some(row.value / reference)
            });
            row.met = row.target.and_then(|target| match target {
                Target::AtMost(limit) => Some(row.value <= limit),
                Target::AtLeast(limit) => Some(row.value >= limit),
                Target::RatioAtMost(limit) => row.ratio.map(|r| r <= limit),
                Target::RatioAtLeast(limit) => row.ratio.map(|r| r >= limit),
            });
        }
        Report {
            machine,
            counts,
            rows: self.rows,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    counts: Counts,
    rows: Vec<Row>,
}

impl Report {
    /// The results as a Markdown table, with the machine above it.
    fn table(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nrelay-sidecar {} ({} build), {}; {} cores ({}), {} GiB, {}",
            m.version, m.build, m.started, m.cores, m.cpu, m.memory_gib, m.kernel
        );
        let _ = writeln!(
            out,
            "load average {} at the start, {} at the end; medians of {} repetitions; payload {} bytes",
            m.load_start, m.load_end, self.counts.repetitions, self.counts.payload
        );
        if let (Some(python), Some(proxystore)) = (&m.python, &m.proxystore) {
            let _ = writeln!(out, "Python {python}, proxystore {proxystore}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "| section | measure | value | ratio | target | met |");
        let _ = writeln!(out, "| --- | --- | ---: | ---: | --- | --- |");
        for row in &self.rows {
            let ratio = match (&row.ratio, &row.reference) {
                (Some(r), Some(reference)) => format!("{r:.2}x {}", short(reference)),
                _ => String::new(),
            };
            let target = match row.target {
                Some(Target::AtMost(v)) => format!("<= {}", figure(v, row.unit)),
                Some(Target::AtLeast(v)) => format!(">= {}", figure(v, row.unit)),
                Some(Target::RatioAtMost(v)) => format!("<= {v}x"),
                Some(Target::RatioAtLeast(v)) => format!(">= {v}x"),
                None => String::new(),
            };
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {ratio} | {target} | {met} |",
                row.section,
                row.measure,
                figure(row.value, row.unit)
            );
        }
        out
    }
}

/// A reference row's key, short: `raw.latency_p50` -> `raw`.
fn short(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

fn figure(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Micros if value < 10.0 => format!("{value:.2} µs"),
        Unit::Micros => format!("{value:.0} µs"),
        Unit::PerSecond => format!("{} msg/s", thousands(value.round() as u64)),
        Unit::MiB => format!("{value:.1} MiB"),
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `p` quantile of sorted samples (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_medians() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 51.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(figure(40_000.4, Unit::PerSecond), "40,000 msg/s");
        assert_eq!(short("raw.latency_p50"), "raw");
    }

    #[test]
    fn payloads_have_the_asked_size_and_their_number() {
        for size in [0, 5, 128, 1000] {
            let text = payload(123_456, size);
            assert!(text.starts_with("123456:"));
            assert_eq!(text.len(), size.max("123456:".len()));
        }
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        let now = utc_now();
        assert_eq!(now.len(), "2026-01-01 00:00:00 UTC".len(), "{now}");
        assert!(now.starts_with("20"), "{now}");
    }
}
