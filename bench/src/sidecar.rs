//! The sidecar path through the embedded relay: worker > daemon > relay >
//! daemon > worker, with unary `Send` and with `SendStream`, and the calls
//! every measurement of a daemon makes (subscribe, send, count).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use relay_sidecar_client::proto::v1;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use crate::daemon::{DaemonProc, Grpc};
use crate::report::{P50_P99, Results, Row, Unit, percentile};
use crate::run::Bench;
use crate::traffic::{MEASURE_TIMEOUT, Progress, payload, progress, rate, reports};

/// The rows every sidecar figure is compared with: the limit as users meet
/// it (`limit`).
const LIMIT: &str = "raw_processes";
/// How often a receiver still waiting for messages checks that its daemon
/// has dropped none, so that a lost message fails the run at once.
const LOSS_CHECK: Duration = Duration::from_secs(1);

/// The sidecar path through the embedded relay.
pub async fn measure(bench: &Bench, results: &mut Results) -> Result<()> {
    let c = &bench.counts;
    let a = bench.start_daemon("sidecar-a", &bench.relay_url).await?;
    let b = bench.start_daemon("sidecar-b", &bench.relay_url).await?;
    let (mut latencies, mut unary, mut stream) = (Vec::new(), Vec::new(), Vec::new());
    let mut session_latencies = Vec::new();
    let mut round_trips = Vec::new();
    // CPU per message, µs: [unary, stream] x [sending, receiving daemon].
    let mut cpu: [[Vec<f64>; 2]; 2] = Default::default();
    for rep in 0..c.repetitions {
        round_trips.push(grpc_round_trips(&a, c.warmup, c.latency).await?);
        let samples = sidecar_latency(&a, &b, c.warmup, c.latency, c.payload).await?;
        let session = session_latency(&a, &b, c.warmup, c.latency, c.payload).await?;
        progress("session", rep, &session, None);
        session_latencies.push(session);
        let start = (a.cpu_ns()?, b.cpu_ns()?);
        let u = sidecar_unary(&a, &b, c.unary, c.workers, c.payload).await?;
        let between = (a.cpu_ns()?, b.cpu_ns()?);
        let s = sidecar_stream(&a, &b, c.throughput, c.payload).await?;
        let end = (a.cpu_ns()?, b.cpu_ns()?);
        let per_message = |from: u64, to: u64, count: u64| (to - from) as f64 / count as f64 / 1e3;
        cpu[0][0].push(per_message(start.0, between.0, c.unary));
        cpu[0][1].push(per_message(start.1, between.1, c.unary));
        cpu[1][0].push(per_message(between.0, end.0, c.throughput));
        cpu[1][1].push(per_message(between.1, end.1, c.throughput));
        progress("sidecar", rep, &samples, Some(s));
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
        "unary Send: worker > daemon > embedded relay > daemon > worker",
        &latencies,
        P50_P99,
        Some(LIMIT),
    );
    results.latency(
        "session",
        "sidecar",
        "session path (SDK Session: SendStream held open + Subscribe): worker > daemon > embedded relay > daemon > worker",
        &session_latencies,
        P50_P99,
        Some(LIMIT),
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
        .reference(&format!("{LIMIT}.latency_p50")),
    );
    results.add(
        Row::new(
            "sidecar.unary_throughput",
            "sidecar",
            format!("unary Send, {} workers, end to end", c.workers),
            Unit::PerSecond,
            unary,
        )
        .reference(&format!("{LIMIT}.throughput")),
    );
    results.add(
        Row::new(
            "sidecar.stream_throughput",
            "sidecar",
            "SendStream, one worker, end to end".into(),
            Unit::PerSecond,
            stream,
        )
        .reference(&format!("{LIMIT}.throughput")),
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

pub type Inbox = tonic::Streaming<v1::SubscribeResponse>;

pub fn send_request(to: &str, kind: &str, description: String, worker: &str) -> v1::SendRequest {
    v1::SendRequest {
        peer_uuid: to.to_owned(),
        description_type: kind.to_owned(),
        description,
        worker: worker.to_owned(),
        ..Default::default()
    }
}

/// Subscribes as `worker`; in `group`, or (empty) in a group of its own.
pub async fn subscribe(client: &mut Grpc, group: &str, worker: &str) -> Result<Inbox> {
    let request = v1::SubscribeRequest {
        group: group.to_owned(),
        worker: worker.to_owned(),
        ..Default::default()
    };
    Ok(client.subscribe(request).await?.into_inner())
}

/// Ping-pong between a worker on `a` and one on `b`: one-way times (half
/// the round trip), µs. Each ping's `Send` runs alongside the wait for its
/// pong; the next ping starts once both are done.
pub async fn sidecar_latency(
    a: &DaemonProc,
    b: &DaemonProc,
    warmup: usize,
    count: usize,
    size: usize,
) -> Result<Vec<f64>> {
    let (mut ping, mut pong) = (a.client().await?, b.client().await?);
    let mut inbox = subscribe(&mut ping, "", "ping").await?;
    let pong_inbox = subscribe(&mut pong, "", "pong").await?;
    let responder = tokio::spawn(answer(pong, pong_inbox, "pong".into(), |_, _| Ok(())));
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

/// As [`sidecar_latency`], each worker on the session path: the ping sent on
/// a SendStream held open, the pong answered on another, through the Rust
/// SDK's `Session`.
pub async fn session_latency(
    a: &DaemonProc,
    b: &DaemonProc,
    warmup: usize,
    count: usize,
    size: usize,
) -> Result<Vec<f64>> {
    use relay_sidecar_client::{DescriptionType, SubscribeOptions};

    let ping = relay_sidecar_client::connect(&a.socket)
        .await?
        .with_worker("ping");
    let pong = relay_sidecar_client::connect(&b.socket)
        .await?
        .with_worker("pong");
    let mut ping = ping.session(SubscribeOptions::new()).await?;
    let (answers, mut pong_inbox) = pong.session(SubscribeOptions::new()).await?.into_split();
    let responder = tokio::spawn(async move {
        let mut pending = FuturesUnordered::new();
        loop {
            tokio::select! {
                got = pong_inbox.next_message() => {
                    let Some(message) = got? else { return anyhow::Ok(()) };
                    ensure!(!message.bounced, "the relay returned a send: {:?}", message.error);
                    let to = message.source_uuid;
                    pending.push(answers.queue(to, DescriptionType::Answer, message.description).await);
                }
                Some(sent) = pending.next(), if !pending.is_empty() => sent?,
            }
        }
    });
    let mut samples = Vec::with_capacity(count);
    let measured = timeout(MEASURE_TIMEOUT, async {
        for seq in 0..warmup + count {
            let text = payload(seq as u64, size);
            let start = Instant::now();
            let sent = ping
                .queue(b.uuid, DescriptionType::Offer, text.clone())
                .await;
            let got = ping
                .next_message()
                .await?
                .context("the ping session ended")?;
            let arrived = Instant::now();
            sent.await?;
            ensure!(got.description == text, "ping {seq}: an unexpected answer");
            if seq >= warmup {
                samples.push((arrived - start).as_secs_f64() * 1e6 / 2.0);
            }
        }
        anyhow::Ok(())
    })
    .await;
    responder.abort();
    measured.context("session ping-pong timed out")??;
    Ok(samples)
}

/// The median round trip of `count` GetStatus calls, µs: what the gRPC
/// hops of a message cost before the daemon does anything.
pub async fn grpc_round_trips(daemon: &DaemonProc, warmup: usize, count: usize) -> Result<f64> {
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

/// Serves a worker's inbox: answers every offer to its sender at once (never
/// waiting for that send before reading the next message), after showing
/// each message, and when it arrived, to `seen`. Ends with the subscription.
pub async fn answer(
    client: Grpc,
    mut inbox: Inbox,
    worker: String,
    mut seen: impl FnMut(&v1::PeerMessage, Instant) -> Result<()>,
) -> Result<()> {
    let mut sends = FuturesUnordered::new();
    loop {
        tokio::select! {
            got = inbox.message() => {
                let Some(message) = got?.and_then(|r| r.message) else {
                    return Ok(());
                };
                let arrived = Instant::now();
                ensure!(!message.bounced, "the relay returned a send: {:?}", message.error);
                seen(&message, arrived)?;
                if message.description_type == "offer" {
                    let mut client = client.clone();
                    let request =
                        send_request(&message.source_uuid, "answer", message.description, &worker);
                    sends.push(async move { client.send(request).await });
                }
            }
            Some(sent) = sends.next(), if !sends.is_empty() => {
                sent?;
            }
        }
    }
}

/// Counts `expected` messages on `inbox`; the time the last one arrived.
pub fn count(
    mut inbox: Inbox,
    expected: u64,
    progress: Arc<Progress>,
) -> JoinHandle<Result<Instant>> {
    tokio::spawn(async move {
        let mut n = 0;
        while n < expected {
            match inbox.message().await? {
                Some(_) => n += 1,
                None => bail!("the subscription ended after {n} of {expected} messages"),
            }
            if reports(n, expected) {
                progress.set(n);
            }
        }
        Ok(Instant::now())
    })
}

/// The time `counter` counted its last message; fails as soon as the
/// receiving daemon reports a lost message, or after [`MEASURE_TIMEOUT`].
pub async fn finished(
    mut counter: JoinHandle<Result<Instant>>,
    what: &str,
    receiver: &DaemonProc,
) -> Result<Instant> {
    let deadline = Instant::now() + MEASURE_TIMEOUT;
    loop {
        match timeout(LOSS_CHECK, &mut counter).await {
            Ok(done) => return done?,
            Err(_) => {
                // A message the receiving daemon dropped would never come.
                receiver.check_clean().await.context(what.to_owned())?;
                ensure!(
                    Instant::now() < deadline,
                    "{what}: not every message arrived in {MEASURE_TIMEOUT:?}"
                );
            }
        }
    }
}

/// `workers` workers, each on its own connection to `a`, each sending its
/// share with unary `Send` one after another, to one subscriber on `b`.
/// Together they stay within `WINDOW` messages of what the subscriber
/// has received, as `SendStream` does below.
pub async fn sidecar_unary(
    a: &DaemonProc,
    b: &DaemonProc,
    total: u64,
    workers: u64,
    size: usize,
) -> Result<f64> {
    let mut receiver = b.client().await?;
    let inbox = subscribe(&mut receiver, "", "unary-receiver").await?;
    let received = Arc::new(Progress::default());
    let counter = count(inbox, total, Arc::clone(&received));
    let sent = Arc::new(AtomicU64::new(0));
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
            let (to, sent, received) = (to.clone(), Arc::clone(&sent), Arc::clone(&received));
            let worker = format!("unary-{w}");
            tokio::spawn(async move {
                for seq in 0..per_worker {
                    received
                        .window_open(sent.fetch_add(1, Ordering::Relaxed))
                        .await;
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
    let done = finished(counter, "unary", b).await?;
    Ok(rate(total, done - start))
}

/// One worker streams `total` messages to `a` with `SendStream`, to one
/// subscriber on `b`; every message must settle OK. The worker stays within
/// `WINDOW` messages of what the subscriber has received: the daemon
/// drops what a subscriber's queue cannot hold, so without such a bound
/// the figure would count lost messages.
pub async fn sidecar_stream(
    a: &DaemonProc,
    b: &DaemonProc,
    total: u64,
    size: usize,
) -> Result<f64> {
    let mut receiver = b.client().await?;
    let inbox = subscribe(&mut receiver, "", "stream-receiver").await?;
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
            received.window_open(seq).await;
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
    let done = finished(counter, "SendStream", b).await?;
    Ok(rate(total, done - start))
}
