//! Raw WebSocket relay clients, with nothing between the code and the
//! socket: the pair that every other path is compared with. Here both run
//! in the bench's own process (the in-process reference row); `limit` runs
//! the same two sides in processes of their own.

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use relay_sidecar::codec::{self, Dialect, Frame, PeerConnection, Registration};
use relay_sidecar::relay;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::cli::Counts;
use crate::report::{P50_P99, Results, Row, Unit};
use crate::run::Bench;
use crate::traffic::{
    FLUSH_EVERY, MEASURE_TIMEOUT, START_TIMEOUT, WINDOW, payload, progress, rate, reports, wait_for,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one repetition of a pair does: `warmup + latency` ping-pongs, then
/// `throughput` pipelined messages one way.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PairCounts {
    #[arg(long)]
    pub warmup: usize,
    #[arg(long)]
    pub latency: usize,
    #[arg(long)]
    pub throughput: u64,
    #[arg(long)]
    pub payload: usize,
}

impl PairCounts {
    /// A raw pair's share of the run's counts.
    pub fn of(c: &Counts) -> PairCounts {
        PairCounts {
            warmup: c.warmup,
            latency: c.latency,
            throughput: c.throughput,
            payload: c.payload,
        }
    }

    /// The same counts as command-line arguments, for a client process.
    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--warmup={}", self.warmup),
            format!("--latency={}", self.latency),
            format!("--throughput={}", self.throughput),
            format!("--payload={}", self.payload),
        ]
    }
}

/// A pair's figures, one entry per repetition.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PairRuns {
    /// One-way times, µs.
    pub latency_us: Vec<Vec<f64>>,
    /// Messages/s, pipelined.
    #[serde(default)]
    pub throughput: Vec<f64>,
}

/// The in-process reference: both raw clients on the bench's own thread,
/// the relay on its own runtime in the same process.
pub async fn measure(bench: &Bench, results: &mut Results) -> Result<()> {
    let c = &bench.counts;
    let counts = PairCounts::of(c);
    let mut a = RawPeer::connect(&bench.relay_url, "bench-raw-a", Uuid::new_v4()).await?;
    let mut b = RawPeer::connect(&bench.relay_url, "bench-raw-b", Uuid::new_v4()).await?;
    let mut runs = PairRuns::default();
    for rep in 0..c.repetitions {
        let (a_uuid, b_uuid) = (a.uuid, b.uuid);
        let follower = tokio::spawn(async move {
            b.follow(a_uuid, counts).await?;
            anyhow::Ok(b)
        });
        let led = a.lead(b_uuid, counts).await;
        if led.is_err() {
            follower.abort();
        }
        let (samples, rate) = led?;
        b = follower.await??;
        progress("raw", rep, &samples, Some(rate));
        runs.latency_us.push(samples);
        runs.throughput.push(rate);
    }
    pair_rows(
        results,
        "raw",
        "in-process reference",
        "raw WebSocket pair in one process, embedded relay",
        runs,
    );
    Ok(())
}

/// The rows of a raw pair: one-way p50 and p99, pipelined throughput.
pub fn pair_rows(results: &mut Results, path: &str, section: &str, what: &str, runs: PairRuns) {
    results.latency(path, section, what, &runs.latency_us, P50_P99, None);
    results.add(Row::new(
        &format!("{path}.throughput"),
        section,
        format!("{what}: pipelined throughput"),
        Unit::PerSecond,
        runs.throughput,
    ));
}

/// A relay client with nothing between the code and the socket.
pub struct RawPeer {
    pub uuid: Uuid,
    name: String,
    ws: Ws,
}

impl RawPeer {
    /// Connects and registers as `uuid`.
    pub async fn connect(url: &str, name: &str, uuid: Uuid) -> Result<RawPeer> {
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

    /// The leading side of one repetition with `peer` (which runs
    /// [`RawPeer::follow`]): ping-pongs, then pipelined messages. Returns
    /// the one-way times (half the round trip), µs, and the messages/s from
    /// the first send to the peer's acknowledgement of the last.
    pub async fn lead(&mut self, peer: Uuid, c: PairCounts) -> Result<(Vec<f64>, f64)> {
        let samples = timeout(MEASURE_TIMEOUT, self.ping(peer, c))
            .await
            .context("raw ping-pong timed out")??;
        let rate = timeout(MEASURE_TIMEOUT, self.pipeline(peer, c))
            .await
            .context("raw pipelined sends timed out")??;
        Ok((samples, rate))
    }

    async fn ping(&mut self, peer: Uuid, c: PairCounts) -> Result<Vec<f64>> {
        let mut samples = Vec::with_capacity(c.latency);
        for seq in 0..c.warmup + c.latency {
            let text = payload(seq as u64, c.payload);
            let start = Instant::now();
            self.ws
                .send(self.frame(peer, "offer", text.clone()))
                .await?;
            let got = self.next_peer().await?;
            let elapsed = start.elapsed();
            ensure!(got.description == text, "ping {seq}: an unexpected answer");
            if seq >= c.warmup {
                samples.push(elapsed.as_secs_f64() * 1e6 / 2.0);
            }
        }
        Ok(samples)
    }

    /// Sends `c.throughput` messages, staying within [`WINDOW`] of what the
    /// peer has acknowledged: the relay closes a client that lets too many
    /// frames queue up for it.
    async fn pipeline(&mut self, peer: Uuid, c: PairCounts) -> Result<f64> {
        let count = c.throughput;
        let mut acked = 0;
        let start = Instant::now();
        for seq in 0..count {
            while seq - acked >= WINDOW {
                self.ws.flush().await?;
                acked = acked.max(self.next_ack().await?);
            }
            self.ws
                .feed(self.frame(peer, "offer", payload(seq, c.payload)))
                .await?;
            if seq % FLUSH_EVERY == FLUSH_EVERY - 1 {
                self.ws.flush().await?;
            }
        }
        self.ws.flush().await?;
        while acked < count {
            acked = acked.max(self.next_ack().await?);
        }
        Ok(rate(count, start.elapsed()))
    }

    /// Sends `count` messages to `to`, staying within [`WINDOW`] of
    /// `taken()`, what the receiving side has taken so far; waits for
    /// `changed` while the window is full.
    pub async fn send_within(
        &mut self,
        to: Uuid,
        count: u64,
        size: usize,
        taken: impl Fn() -> u64,
        changed: &Notify,
    ) -> Result<()> {
        for seq in 0..count {
            if seq - taken() >= WINDOW {
                self.ws.flush().await?;
                wait_for(changed, || seq - taken() < WINDOW).await;
            }
            self.ws
                .feed(self.frame(to, "offer", payload(seq, size)))
                .await?;
            if seq % FLUSH_EVERY == FLUSH_EVERY - 1 {
                self.ws.flush().await?;
            }
        }
        self.ws.flush().await?;
        Ok(())
    }

    async fn next_ack(&mut self) -> Result<u64> {
        let ack = self.next_peer().await?;
        ack.description
            .parse()
            .with_context(|| format!("not an acknowledgement: {:?}", ack.description))
    }

    /// The other side of [`RawPeer::lead`]: answers every ping with its own
    /// description, then counts the pipelined messages and acknowledges
    /// every [`FLUSH_EVERY`]th (and the last) with the count so far.
    pub async fn follow(&mut self, peer: Uuid, c: PairCounts) -> Result<()> {
        for _ in 0..c.warmup + c.latency {
            let ping = self.next_peer().await?;
            self.ws
                .send(self.frame(peer, "answer", ping.description))
                .await?;
        }
        for n in 1..=c.throughput {
            self.next_peer().await?;
            if reports(n, c.throughput) {
                self.ws
                    .send(self.frame(peer, "answer", n.to_string()))
                    .await?;
            }
        }
        Ok(())
    }
}
