//! The limit as users meet it, and the floor under it. Workers are
//! processes of their own, so the limit is a pair of raw WebSocket clients
//! each in its own process, through the embedded relay (`raw_processes`);
//! and no local IPC can beat a raw length-prefixed ping-pong over a Unix
//! socket between two processes (`ipc`). Both sides of each run in client
//! processes ([`crate::child`]); the bench only starts them and reads their
//! results.

use std::path::PathBuf;

use anyhow::{Context as _, Result, ensure};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{Instant, timeout};
use uuid::Uuid;

use crate::child::{ClientProc, Parent};
use crate::raw::{self, PairCounts, PairRuns, RawPeer};
use crate::report::{P50, Results};
use crate::run::Bench;
use crate::traffic::{MEASURE_TIMEOUT, payload, progress};

/// The largest frame the Unix-socket echo accepts: the relay's own limit
/// on a message, far above any payload the bench sends.
const MAX_IPC_FRAME: usize = 1024 * 1024;

/// Which side of a pair a client process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// Measures: pings, sends, and prints the figures.
    Lead,
    /// Answers, counts and acknowledges.
    Follow,
}

/// `raw-peer`: one raw WebSocket client of a pair.
#[derive(Debug, clap::Args)]
pub struct RawPeerArgs {
    #[arg(long)]
    relay: String,
    #[arg(long)]
    uuid: Uuid,
    #[arg(long)]
    peer: Uuid,
    #[arg(long, value_enum)]
    side: Side,
    #[arg(long)]
    repetitions: usize,
    #[command(flatten)]
    counts: PairCounts,
}

/// `ipc-peer`: one end of a ping-pong over a Unix socket.
#[derive(Debug, clap::Args)]
pub struct IpcPeerArgs {
    /// The follower listens here, the leader connects.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    side: Side,
    #[arg(long)]
    repetitions: usize,
    #[arg(long)]
    warmup: usize,
    #[arg(long)]
    latency: usize,
    #[arg(long)]
    payload: usize,
}

pub async fn measure(bench: &Bench, results: &mut Results) -> Result<()> {
    raw_processes(bench, results)
        .await
        .context("raw clients in processes of their own")?;
    ipc(bench, results).await.context("Unix-socket ping-pong")?;
    Ok(())
}

async fn raw_processes(bench: &Bench, results: &mut Results) -> Result<()> {
    let c = &bench.counts;
    let counts = PairCounts::of(c);
    let (leader, follower) = (Uuid::new_v4(), Uuid::new_v4());
    let args = |side: &str, uuid: Uuid, peer: Uuid| {
        let mut args = vec![
            "raw-peer".to_owned(),
            format!("--relay={}", bench.relay_url),
            format!("--uuid={uuid}"),
            format!("--peer={peer}"),
            format!("--side={side}"),
            format!("--repetitions={}", c.repetitions),
        ];
        args.extend(counts.args());
        args
    };
    let runs: PairRuns = pair(
        ("raw follower", args("follow", follower, leader)),
        ("raw leader", args("lead", leader, follower)),
    )
    .await?;
    for (rep, (samples, rate)) in runs.latency_us.iter().zip(&runs.throughput).enumerate() {
        progress("raw_processes", rep, samples, Some(*rate));
    }
    raw::pair_rows(
        results,
        "raw_processes",
        "limit",
        "raw WebSocket clients, each in its own process, embedded relay",
        runs,
    );
    Ok(())
}

async fn ipc(bench: &Bench, results: &mut Results) -> Result<()> {
    let c = &bench.counts;
    let socket = bench.dir.join("ipc.sock");
    let args = |side: &str| {
        vec![
            "ipc-peer".to_owned(),
            format!("--socket={}", socket.display()),
            format!("--side={side}"),
            format!("--repetitions={}", c.repetitions),
            format!("--warmup={}", c.warmup),
            format!("--latency={}", c.latency),
            format!("--payload={}", c.payload),
        ]
    };
    let runs: PairRuns = pair(
        ("Unix-socket echo", args("follow")),
        ("Unix-socket pinger", args("lead")),
    )
    .await?;
    for (rep, samples) in runs.latency_us.iter().enumerate() {
        progress("ipc", rep, samples, None);
    }
    results.latency(
        "ipc",
        "floor",
        "length-prefixed ping-pong over a Unix socket between two processes",
        &runs.latency_us,
        P50,
        None,
    );
    Ok(())
}

/// Starts the follower, then (once it is ready) the leader; the leader's
/// result once both have ended cleanly.
async fn pair(
    (follower_name, follower_args): (&str, Vec<String>),
    (leader_name, leader_args): (&str, Vec<String>),
) -> Result<PairRuns> {
    let mut follower = ClientProc::spawn(follower_name, &follower_args)?;
    follower.ready().await?;
    let mut leader = ClientProc::spawn(leader_name, &leader_args)?;
    let runs = leader.result().await?;
    leader.finish().await?;
    follower.finish().await?;
    Ok(runs)
}

/// The `raw-peer` client process.
pub async fn raw_peer(args: RawPeerArgs) -> Result<()> {
    let parent = Parent::new();
    let name = format!("bench-raw-{:?}", args.side).to_lowercase();
    let mut peer = RawPeer::connect(&args.relay, &name, args.uuid).await?;
    match args.side {
        Side::Follow => {
            parent.ready()?;
            for _ in 0..args.repetitions {
                peer.follow(args.peer, args.counts).await?;
            }
        }
        Side::Lead => {
            let mut runs = PairRuns::default();
            for _ in 0..args.repetitions {
                let (samples, rate) = peer.lead(args.peer, args.counts).await?;
                runs.latency_us.push(samples);
                runs.throughput.push(rate);
            }
            parent.result(&runs)?;
        }
    }
    Ok(())
}

/// The `ipc-peer` client process.
pub async fn ipc_peer(args: IpcPeerArgs) -> Result<()> {
    let parent = Parent::new();
    match args.side {
        Side::Follow => {
            let _ = std::fs::remove_file(&args.socket);
            let listener = UnixListener::bind(&args.socket)
                .with_context(|| format!("binding {}", args.socket.display()))?;
            parent.ready()?;
            let (stream, _) = listener.accept().await?;
            echo(stream).await
        }
        Side::Lead => {
            let mut stream = UnixStream::connect(&args.socket)
                .await
                .with_context(|| format!("connecting to {}", args.socket.display()))?;
            let mut runs = PairRuns::default();
            for _ in 0..args.repetitions {
                let samples = timeout(MEASURE_TIMEOUT, ping(&mut stream, &args))
                    .await
                    .context("Unix-socket ping-pong timed out")??;
                runs.latency_us.push(samples);
            }
            parent.result(&runs)
        }
    }
}

/// Sends every frame back as it came, until the other end closes.
async fn echo(stream: UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut frame = Vec::new();
    loop {
        let mut prefix = [0; 4];
        match read.read_exact(&mut prefix).await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        };
        let len = u32::from_be_bytes(prefix) as usize;
        ensure!(len <= MAX_IPC_FRAME, "a {len}-byte frame");
        frame.clear();
        frame.extend_from_slice(&prefix);
        frame.resize(4 + len, 0);
        read.read_exact(&mut frame[4..]).await?;
        write.write_all(&frame).await?;
    }
}

/// `warmup + latency` ping-pongs: one-way times (half the round trip), µs.
async fn ping(stream: &mut UnixStream, args: &IpcPeerArgs) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(args.latency);
    let mut answer = Vec::new();
    for seq in 0..args.warmup + args.latency {
        let body = payload(seq as u64, args.payload);
        let len = u32::try_from(body.len()).context("payload size")?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(body.as_bytes());
        let start = Instant::now();
        stream.write_all(&frame).await?;
        answer.resize(frame.len(), 0);
        stream.read_exact(&mut answer).await?;
        let elapsed = start.elapsed();
        ensure!(answer == frame, "ping {seq}: an unexpected answer");
        if seq >= args.warmup {
            samples.push(elapsed.as_secs_f64() * 1e6 / 2.0);
        }
    }
    Ok(samples)
}
