//! The command line: the flags of a bench run, the counts they come to, and
//! the hidden client modes the bench re-executes itself in.

use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;

use crate::{limit, scale, traffic};

/// Measures relay-sidecar against raw WebSocket clients, a Unix-socket
/// floor and ProxyStore's own client, on loopback, and prints a table (and
/// JSON).
#[derive(Debug, Parser)]
#[command(name = "relay-sidecar-bench", version)]
pub struct Flags {
    /// Tiny counts, one repetition: checks that every path works, in
    /// seconds. The figures mean nothing.
    #[arg(long)]
    pub quick: bool,
    /// Skip the rows that need Python: the ProxyStore anchor and the sidecar
    /// through the Python relay.
    #[arg(long)]
    pub no_python: bool,
    /// Only these sections, comma-separated: raw (the in-process pair),
    /// limit (raw clients in processes of their own, and the Unix-socket
    /// floor), sidecar, memory, fanout, scale, python. Ratios to a skipped
    /// section's rows are left out.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// The Python interpreter with proxystore 1.1.0 (default:
    /// $RELAY_SIDECAR_PYTHON, else .venv/bin/python in the repository).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// The `relay-sidecar` binary (default: next to this one).
    #[arg(long, value_name = "PATH")]
    pub daemon: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Repetitions of every timed measurement; figures are medians over them.
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// Measured ping-pongs per repetition (Rust paths and the Unix socket).
    #[arg(long)]
    pub latency: Option<usize>,
    /// Messages per repetition for the raw and streaming throughput.
    #[arg(long)]
    pub throughput: Option<u64>,
    /// Messages per repetition for unary Send, over all workers.
    #[arg(long)]
    pub unary: Option<u64>,
    /// Concurrent unary workers, each on its own connection.
    #[arg(long, default_value_t = 16)]
    pub workers: u64,
    /// Messages per repetition in the fan-out (each delivered to every
    /// subscriber).
    #[arg(long)]
    pub fanout: Option<u64>,
    /// Ungrouped subscribers in the fan-out.
    #[arg(long)]
    pub fanout_subscribers: Option<u64>,
    /// Open subscriptions for the memory figure.
    #[arg(long)]
    pub subscriptions: Option<u64>,
    /// Connections the subscriptions are spread over in the second memory
    /// figure (the first gives each its own).
    #[arg(long, default_value_t = 10)]
    pub subscription_connections: u64,
    /// Simulated hosts in the scale row: each a daemon on the embedded relay.
    #[arg(long)]
    pub scale_hosts: Option<usize>,
    /// Workers per simulated host, each pinging a worker on another host.
    #[arg(long)]
    pub scale_workers: Option<usize>,
    /// Seconds measured per repetition of the scale row.
    #[arg(long)]
    pub scale_seconds: Option<f64>,
    /// Ping-pongs per repetition through the Python relay.
    #[arg(long)]
    pub py_latency: Option<usize>,
    /// Messages per repetition through the Python relay.
    #[arg(long)]
    pub py_throughput: Option<u64>,
    /// Size of each message's `description`, in bytes.
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Keep the scratch directory (daemon logs, sockets) and print its path.
    #[arg(long)]
    pub keep: bool,
    #[command(subcommand)]
    pub client: Option<Client>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Raw,
    Limit,
    Sidecar,
    Memory,
    Fanout,
    Scale,
    Python,
}

/// The bench's own client processes (see `child`): not for people, so
/// hidden from `--help`.
#[derive(Debug, clap::Subcommand)]
pub enum Client {
    /// A raw WebSocket relay client.
    #[command(hide = true)]
    RawPeer(limit::RawPeerArgs),
    /// One end of a length-prefixed ping-pong over a Unix socket.
    #[command(hide = true)]
    IpcPeer(limit::IpcPeerArgs),
    /// A simulated host's workers, all on one daemon.
    #[command(hide = true)]
    ScaleHost(scale::HostArgs),
}

/// The counts of one run, from the flags and `--quick`.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub repetitions: usize,
    pub latency: usize,
    pub throughput: u64,
    pub unary: u64,
    pub workers: u64,
    pub fanout: u64,
    pub fanout_subscribers: u64,
    pub subscriptions: u64,
    pub subscription_connections: u64,
    pub scale_hosts: usize,
    pub scale_workers: usize,
    pub scale_seconds: f64,
    pub py_latency: usize,
    pub py_throughput: u64,
    pub payload: usize,
    pub warmup: usize,
}

impl Counts {
    pub fn from(flags: &Flags) -> Counts {
        let q = flags.quick;
        let pick = |given: Option<u64>, quick: u64, full: u64| {
            given.unwrap_or(if q { quick } else { full })
        };
        let subscriptions = pick(flags.subscriptions, 100, 1000);
        let workers = flags.workers.max(1);
        let unary = pick(flags.unary, 320, 64_000);
        // Every scale worker pings a host other than its own.
        let scale_hosts = flags.scale_hosts.unwrap_or(if q { 4 } else { 64 }).max(2);
        let scale_workers = flags.scale_workers.unwrap_or(if q { 2 } else { 4 }).max(1);
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
            scale_hosts,
            scale_workers,
            scale_seconds: flags
                .scale_seconds
                .unwrap_or(if q { 0.3 } else { 3.0 })
                .max(0.05),
            py_latency: flags.py_latency.unwrap_or(if q { 20 } else { 2000 }),
            py_throughput: pick(flags.py_throughput, 200, 20_000),
            payload: flags.payload,
            warmup: if q { 5 } else { traffic::WARMUP },
        }
    }
}
