//! The scale row: many simulated hosts on one embedded relay. Each host is
//! a real daemon plus a client process of its own holding the host's
//! workers, each worker on its own connection; every worker keeps one
//! ping-pong going with another host, so as many messages are in flight as
//! there are workers. Measured over a window: messages delivered to workers
//! per second, the one-way time (half the round trip), the daemons' total
//! memory and their CPU time per delivered message.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::future::{join_all, try_join_all};
use relay_sidecar_client::proto::v1;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use uuid::Uuid;

use crate::child::{ClientProc, Parent};
use crate::daemon::{DaemonProc, Grpc};
use crate::procfs::{self, Rss};
use crate::report::{P50_P99, Results, Row, Unit, median};
use crate::run::{Bench, RELAY_THREADS};
use crate::sidecar::{answer, send_request, subscribe};
use crate::traffic::{payload, progress};

/// The subscription group of a host's workers: a message for the host goes
/// to one of them, a peer's answers to the worker that wrote to that peer.
const GROUP: &str = "scale";
/// How long a worker waits for the answer to its ping before the run
/// fails: under full load a round trip takes milliseconds.
const PONG_TIMEOUT: Duration = Duration::from_secs(30);

/// `scale-host`: one simulated host's workers.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// The host's daemon.
    #[arg(long)]
    socket: PathBuf,
    /// The daemon (host) each worker pings, one per worker.
    #[arg(long, value_delimiter = ',', required = true)]
    targets: Vec<Uuid>,
    /// Ping-pongs per worker before the host is ready.
    #[arg(long)]
    warmup: usize,
    #[arg(long)]
    payload: usize,
}

/// One host's figures over one measured window.
#[derive(Debug, Serialize, Deserialize)]
struct Window {
    seconds: f64,
    /// Messages its workers received (pings and answers alike).
    delivered: u64,
    /// One-way times of the ping-pongs answered in the window, µs.
    latency_us: Vec<f64>,
}

/// The host worker `worker` of `host` pings: never its own host, and the
/// workers of a host spread over the next ones.
fn target(host: usize, worker: usize, hosts: usize) -> usize {
    (host + 1 + worker % (hosts - 1)) % hosts
}

pub async fn measure(bench: &Bench, results: &mut Results) -> Result<()> {
    let c = &bench.counts;
    let (hosts, workers) = (c.scale_hosts, c.scale_workers);
    eprintln!("scale: {hosts} daemons, {workers} workers each");
    let names: Vec<String> = (0..hosts).map(|h| format!("scale-{h:02}")).collect();
    let daemons = try_join_all(
        names
            .iter()
            .map(|name| bench.start_daemon(name, &bench.relay_url)),
    )
    .await?;
    let mut clients = Vec::with_capacity(hosts);
    for (h, daemon) in daemons.iter().enumerate() {
        let targets: Vec<String> = (0..workers)
            .map(|w| daemons[target(h, w, hosts)].uuid.to_string())
            .collect();
        let args = [
            "scale-host".to_owned(),
            format!("--socket={}", daemon.socket.display()),
            format!("--targets={}", targets.join(",")),
            format!("--warmup={}", c.warmup),
            format!("--payload={}", c.payload),
        ];
        clients.push(ClientProc::spawn(&format!("scale host {h}"), &args)?);
    }
    for client in &mut clients {
        client.ready().await?;
    }

    let window = Duration::from_secs_f64(c.scale_seconds);
    let (mut rates, mut runs, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut daemon_cpu, mut relay_cpu) = (Vec::new(), Vec::new());
    let mut memory_detail = String::new();
    for rep in 0..c.repetitions {
        let cpu_before = (daemons_cpu_ns(&daemons)?, relay_cpu_ns()?);
        for client in &mut clients {
            client.say("go").await?;
        }
        tokio::time::sleep(window).await;
        // Under load, as the daemons run.
        let memory: Rss = daemons
            .iter()
            .map(|d| Rss::of(d.pid))
            .sum::<Result<Rss>>()?;
        let pss_kib: u64 = daemons
            .iter()
            .map(|d| procfs::pss_kib(d.pid))
            .sum::<Result<u64>>()?;
        for client in &mut clients {
            client.say("stop").await?;
        }
        let cpu_after = (daemons_cpu_ns(&daemons)?, relay_cpu_ns()?);
        let mut windows = Vec::with_capacity(hosts);
        for client in &mut clients {
            windows.push(client.result::<Window>().await?);
        }
        let delivered: u64 = windows.iter().map(|w| w.delivered).sum();
        ensure!(delivered > 0, "no message delivered in {window:?}");
        let rate: f64 = windows.iter().map(|w| w.delivered as f64 / w.seconds).sum();
        let samples: Vec<f64> = windows.into_iter().flat_map(|w| w.latency_us).collect();
        progress("scale", rep, &samples, Some(rate));
        let per_message =
            |before: u64, after: u64| (after - before) as f64 / delivered as f64 / 1e3;
        daemon_cpu.push(per_message(cpu_before.0, cpu_after.0));
        relay_cpu.push(per_message(cpu_before.1, cpu_after.1));
        rates.push(rate);
        runs.push(samples);
        rss.push(memory.rss_mib());
        memory_detail = format!(
            "{:.1} MiB each; in total: proportional (shared pages counted once) {:.1} MiB, {}",
            memory.rss_mib() / hosts as f64,
            pss_kib as f64 / 1024.0,
            memory.detail()
        );
    }
    // While the load still runs: a worker that ends takes its answers with it.
    for daemon in &daemons {
        daemon.check_clean().await?;
    }
    for client in clients {
        client.finish().await?;
    }
    join_all(daemons.into_iter().map(DaemonProc::stop)).await;

    let what = format!("{hosts} daemons on one embedded relay, {workers} workers each");
    results.add(Row::new(
        "scale.delivered",
        "scale",
        format!("{what}, each in a ping-pong with another host: delivered in total"),
        Unit::PerSecond,
        rates,
    ));
    results.latency("scale", "scale", &what, &runs, P50_P99, None);
    results.add(
        Row::new(
            "scale.total_rss",
            "scale",
            format!("{what}: the daemons' RSS, summed"),
            Unit::MiB,
            rss,
        )
        .detail(memory_detail),
    );
    let relay = median(&relay_cpu);
    results.add(
        Row::new(
            "scale.cpu_per_message",
            "scale",
            format!("{what}: the daemons' CPU time per delivered message, summed"),
            Unit::Micros,
            daemon_cpu,
        )
        .detail(format!("the embedded relay's: {relay:.2} µs per message")),
    );
    Ok(())
}

fn daemons_cpu_ns(daemons: &[DaemonProc]) -> Result<u64> {
    daemons.iter().map(DaemonProc::cpu_ns).sum()
}

/// The CPU time of the embedded relay's threads in this process, ns.
fn relay_cpu_ns() -> Result<u64> {
    procfs::cpu_ns("self", Some(RELAY_THREADS))
}

/// What a host's workers share: the count of messages they received, and
/// the measured window's one-way times.
#[derive(Debug, Default)]
struct Tally {
    delivered: AtomicU64,
    measuring: AtomicBool,
    latency_us: Mutex<Vec<f64>>,
}

impl Tally {
    fn record(&self, one_way_us: f64) {
        if self.measuring.load(Ordering::Relaxed) {
            self.latency_us
                .lock()
                .expect("a worker panicked")
                .push(one_way_us);
        }
    }
}

/// The `scale-host` client process: the host's workers ping and answer
/// from the start; the parent's `go` and `stop` bound a measured window,
/// and closing stdin ends the host.
pub async fn host(args: HostArgs) -> Result<()> {
    let mut parent = Parent::new();
    let tally = Arc::new(Tally::default());
    let workers = args.targets.len();
    // Answers reach the worker whose ping they answer: the daemon sends a
    // peer's messages to the worker that wrote to it last, and when two
    // workers of a host talk to one peer (few hosts), the worker's number
    // in the description settles it.
    let (answers, inboxes): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    let answers = Arc::new(answers);
    let (warm_tx, mut warm) = mpsc::channel(workers);
    let mut tasks = JoinSet::new();
    for (w, (target, inbox)) in args.targets.iter().zip(inboxes).enumerate() {
        let mut client = relay_sidecar_client::connect(&args.socket).await?.raw();
        let label = format!("w{w}");
        let subscription = subscribe(&mut client, GROUP, &label).await?;
        let (answers, seen) = (Arc::clone(&answers), Arc::clone(&tally));
        tasks.spawn(answer(
            client.clone(),
            subscription,
            label.clone(),
            move |message, arrived| {
                seen.delivered.fetch_add(1, Ordering::Relaxed);
                if message.description_type == "answer" {
                    route(&answers, message, arrived)?;
                }
                Ok(())
            },
        ));
        let pinger = Pinger {
            client,
            label,
            target: target.to_string(),
            payload: args.payload,
            tally: Arc::clone(&tally),
        };
        tasks.spawn(pinger.run(inbox, args.warmup, warm_tx.clone()));
    }
    for _ in 0..workers {
        warm.recv().await.context("a worker ended in its warm-up")?;
    }
    parent.ready()?;
    let mut started = (Instant::now(), 0);
    loop {
        tokio::select! {
            line = parent.next_line() => match line?.as_deref() {
                Some("go") => {
                    tally.latency_us.lock().expect("a worker panicked").clear();
                    started = (Instant::now(), tally.delivered.load(Ordering::Relaxed));
                    tally.measuring.store(true, Ordering::Relaxed);
                }
                Some("stop") => {
                    tally.measuring.store(false, Ordering::Relaxed);
                    let latency_us =
                        std::mem::take(&mut *tally.latency_us.lock().expect("a worker panicked"));
                    parent.result(&Window {
                        seconds: started.0.elapsed().as_secs_f64(),
                        delivered: tally.delivered.load(Ordering::Relaxed) - started.1,
                        latency_us,
                    })?;
                }
                Some(other) => bail!("unknown command {other:?}"),
                None => return Ok(()),
            },
            Some(ended) = tasks.join_next() => {
                ended??;
                bail!("a worker's subscription ended");
            }
        }
    }
}

/// Hands an answer to the worker whose ping it answers.
fn route(
    answers: &[mpsc::UnboundedSender<(u64, Instant)>],
    message: &v1::PeerMessage,
    arrived: Instant,
) -> Result<()> {
    let mut fields = message.description.splitn(3, ':');
    let (Some(worker), Some(seq)) = (fields.next(), fields.next()) else {
        bail!("an answer not to a ping: {:?}", message.description);
    };
    let (worker, seq): (usize, u64) = (worker.parse()?, seq.parse()?);
    let to = answers.get(worker).context("an answer for no worker")?;
    // The worker waits for each answer before its next ping, so at most
    // one is queued: the channel needs no bound of its own.
    let _ = to.send((seq, arrived));
    Ok(())
}

/// One worker's side of its ping-pong.
struct Pinger {
    client: Grpc,
    label: String,
    target: String,
    payload: usize,
    tally: Arc<Tally>,
}

impl Pinger {
    /// Pings until the host ends; says so on `warm` after `warmup`.
    async fn run(
        mut self,
        mut answers: mpsc::UnboundedReceiver<(u64, Instant)>,
        warmup: usize,
        warm: mpsc::Sender<()>,
    ) -> Result<()> {
        let worker = &self.label[1..];
        for seq in 0.. {
            if seq == warmup as u64 {
                warm.send(()).await?;
            }
            let description = format!("{worker}:{}", payload(seq, self.payload));
            let request = send_request(&self.target, "offer", description, &self.label);
            let start = Instant::now();
            self.client.send(request).await?;
            let (answered, arrived) = timeout(PONG_TIMEOUT, answers.recv())
                .await
                .with_context(|| format!("no answer to ping {seq} within {PONG_TIMEOUT:?}"))?
                .context("the inbox ended")?;
            ensure!(
                answered == seq,
                "the answer to ping {answered} for ping {seq}"
            );
            self.tally
                .record((arrived - start).as_secs_f64() * 1e6 / 2.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_pings_another_host() {
        for hosts in [2, 3, 4, 64] {
            for host in 0..hosts {
                for worker in 0..8 {
                    let t = target(host, worker, hosts);
                    assert!(t < hosts && t != host, "{host}/{worker} of {hosts} -> {t}");
                }
            }
        }
        // 64 hosts, 4 workers: each host's workers reach 4 different hosts.
        let targets: Vec<usize> = (0..4).map(|w| target(10, w, 64)).collect();
        assert_eq!(targets, [11, 12, 13, 14]);
    }
}
