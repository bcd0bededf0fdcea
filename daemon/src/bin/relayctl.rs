//! relayctl: a command-line client for the relay-sidecar daemon, a thin shell
//! over the `relay-sidecar-client` SDK. Text that peers or the relay control
//! (names, descriptions, errors, close reasons) is printed with control
//! characters shown as escapes, never sent to the terminal as they are.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::pin::pin;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use futures_util::{Stream, StreamExt};
use relay_sidecar_client::{
    Client, DescriptionType, Error, NoDaemon, PeerMessage, SendOptions, Status, paths,
};
use serde_json::{Value, json};
use tracing_subscriber::fmt::{
    format::Writer,
    time::{FormatTime, SystemTime},
};
use uuid::Uuid;

/// Every line relayctl prints goes through here, not std's `println!`, which
/// panics when the reader has gone: `relayctl status | head -1` or
/// `relayctl listen | head` end relayctl quietly, with status 0, once the
/// reader has what it wanted.
macro_rules! println {
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*))
    };
}

/// Likewise for stderr: a message that cannot be shown is no reason to
/// panic.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("relayctl: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// Query and use the relay-sidecar daemon over its Unix socket.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The daemon's socket [default: $RELAY_SIDECAR_SOCKET, else the first
    /// that answers of your own daemon's ($XDG_RUNTIME_DIR/relay-sidecar/relay.sock,
    /// /tmp/relay-sidecar-$UID/relay.sock) and the system service's
    /// (/run/relay-sidecar/relay.sock)]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The daemon of a job, as started with --job LABEL [default: $RELAY_SIDECAR_JOB]
    #[arg(long, global = true, value_name = "LABEL")]
    job: Option<String>,
    /// Print JSON, one object per line.
    #[arg(long, global = true)]
    json: bool,
    /// A worker label for send and listen: a peer's replies go preferably to
    /// the listener with its sender's label [default: the calling process]
    #[arg(long, global = true)]
    worker: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the identity, the relay connection's state and the counters.
    Status,
    /// Print the status at every change of the connection state, until Ctrl-C.
    Watch,
    /// Send one message to a peer; prints nothing on success.
    Send {
        /// The receiving peer's uuid.
        peer: Uuid,
        /// "offer" or "answer".
        #[arg(value_name = "TYPE")]
        kind: DescriptionType,
        /// The payload.
        text: String,
        /// How long to wait for the relay connection to be registered.
        #[arg(long, value_name = "SECS", value_parser = seconds)]
        timeout: Option<Duration>,
    },
    /// Print messages from peers and bounces of this host's sends, until Ctrl-C.
    Listen {
        /// The delivery group to share messages with (default: see every message).
        #[arg(long)]
        group: Option<String>,
        /// Exit after this many messages.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Drop the relay connection and register again (the way out of FAILED).
    Reconnect,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relayctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = connect(cli.socket, cli.job).await?;
    let client = match cli.worker {
        Some(worker) => client.with_worker(worker),
        None => client,
    };
    match cli.command {
        Command::Status => {
            let status = client.status().await?;
            if cli.json {
                println!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
        }
        Command::Watch => {
            until_ctrl_c(client.watch_status().await?, |s| {
                let (time, state) = (now(), s.state);
                match (cli.json, s.detail.is_empty()) {
                    (true, _) => println!("{}", json!({"time": time, "status": status_json(&s)})),
                    (false, true) => println!("{time} {state}"),
                    (false, false) => println!("{time} {state}: {}", shown(&s.detail)),
                }
                true
            })
            .await?;
        }
        Command::Send {
            peer,
            kind,
            text,
            timeout,
        } => {
            let options = timeout.map_or_else(SendOptions::new, |t| SendOptions::new().timeout(t));
            client.send_with(peer, kind, text, options).await?;
        }
        Command::Listen { group, count } => {
            let messages = client.subscribe(group.as_deref()).await?;
            let mut left = count;
            if left != Some(0) {
                until_ctrl_c(messages, |m| {
                    print_message(&m, cli.json);
                    left = left.map(|n| n - 1);
                    left != Some(0)
                })
                .await?;
            }
        }
        Command::Reconnect => client.reconnect().await?,
    }
    Ok(())
}

/// The daemon at `socket`, else the one the shared rule finds (for `job`).
async fn connect(socket: Option<PathBuf>, job: Option<String>) -> Result<Client, Error> {
    let Some(path) = socket else {
        let mut env = paths::Environment::current();
        env.job = job.or(env.job);
        return relay_sidecar_client::connect_by_rule(&env).await;
    };
    match relay_sidecar_client::connect(&path).await {
        Err(Error::Connect { path, source }) => Err(Error::NoDaemon(NoDaemon {
            tried: vec![(path, source)],
            named: false,
        })),
        other => other,
    }
}

/// Hands each item to `each` until it returns false or Ctrl-C; the daemon
/// ending the stream first is an error.
async fn until_ctrl_c<T>(
    mut items: impl Stream<Item = Result<T, Error>> + Unpin,
    mut each: impl FnMut(T) -> bool,
) -> Result<()> {
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            item = items.next() => match item {
                Some(item) => if !each(item?) { return Ok(()) },
                None => bail!("the daemon ended the stream"),
            },
        }
    }
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

fn print_status(s: &Status) {
    let row = |key: &str, value: &dyn std::fmt::Display| println!("{key:<15}{value}");
    let c = &s.counters;
    row("uuid", &s.uuid);
    row("name", &shown(&s.name));
    row("relay", &shown(&s.relay_url));
    row("dialect", &shown(&s.dialect));
    row("state", &s.state);
    if !s.detail.is_empty() {
        row("detail", &shown(&s.detail));
    }
    if let Some(code) = s.close_code {
        row("close code", &code);
    }
    row("attempt", &s.attempt);
    if let Some(d) = s.retry_in {
        row("retry in", &format_args!("{:.1}s", d.as_secs_f64()));
    }
    let (sent, received, delivered) = (c.sent, c.received, c.delivered);
    let (bounced, dropped, undecodable) = (c.bounced, c.dropped, c.undecodable);
    row(
        "messages",
        &format_args!(
            "sent {sent}, received {received}, delivered {delivered}, bounced {bounced}, dropped {dropped}, undecodable {undecodable}"
        ),
    );
    row(
        "confirmed",
        &format_args!("{sent} sends in {} round trips", c.confirmations),
    );
    row(
        "dropped",
        &format_args!(
            "no subscriber {}, queue full {}, expired {}, no conversation {}",
            c.dropped_no_subscriber,
            c.dropped_queue_full,
            c.dropped_expired,
            c.dropped_no_conversation
        ),
    );
    row(
        "conversations",
        &format_args!(
            "held {}, conflicts {}, expired {}, offers refused {}",
            c.conversations, c.conversation_conflicts, c.conversations_expired, c.offers_refused
        ),
    );
    row(
        "connection",
        &format_args!(
            "reconnects {}, subscribers {}, workers {}",
            c.reconnects, c.subscribers, c.workers
        ),
    );
    row("version", &shown(&s.version));
}

fn status_json(s: &Status) -> Value {
    let c = &s.counters;
    json!({
        "uuid": s.uuid, "name": s.name, "relay_url": s.relay_url, "dialect": s.dialect,
        "state": s.state.to_string(), "close_code": s.close_code, "detail": s.detail,
        "attempt": s.attempt, "retry_in_secs": s.retry_in.map(|d| d.as_secs_f64()),
        "counters": {
            "sent": c.sent, "received": c.received, "bounced": c.bounced, "dropped": c.dropped,
            "reconnects": c.reconnects, "subscribers": c.subscribers,
            "undecodable": c.undecodable, "delivered": c.delivered,
            "dropped_no_subscriber": c.dropped_no_subscriber,
            "dropped_queue_full": c.dropped_queue_full, "workers": c.workers,
            "dropped_expired": c.dropped_expired,
            "dropped_no_conversation": c.dropped_no_conversation,
            "conversations": c.conversations,
            "conversation_conflicts": c.conversation_conflicts,
            "conversations_expired": c.conversations_expired,
            "offers_refused": c.offers_refused,
            "confirmations": c.confirmations,
        },
        "version": s.version,
    })
}

fn print_message(m: &PeerMessage, as_json: bool) {
    if as_json {
        let fields = json!({
            "source_uuid": m.source_uuid, "source_name": m.source_name, "peer_uuid": m.peer_uuid,
            "description_type": m.description_type, "description": m.description,
            "error": m.error, "bounced": m.bounced,
        });
        println!("{fields}");
    } else if m.bounced {
        let error = m.error.as_deref().unwrap_or("no reason given");
        println!("bounced to {}: {}", m.peer_uuid, shown(error));
    } else {
        let (name, uuid) = (shown(&m.source_name), m.source_uuid);
        println!(
            "from {name} ({uuid}) {}: {}",
            shown(&m.description_type),
            shown(&m.description)
        );
    }
}

/// `text` as it may go to a terminal: control characters (escape sequences,
/// carriage returns, newlines) and the Unicode controls that reorder text
/// on screen are written as escapes (`\u{1b}`, `\r`, `\n`), and a
/// backslash as `\\`, so what is shown is what was sent and one message
/// stays on one line.
fn shown(text: &str) -> Cow<'_, str> {
    let escaped = |c: char| c == '\\' || c.is_control() || is_bidi_control(c);
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if escaped(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Unicode's explicit bidirectional formatting characters (embeddings,
/// overrides, isolates, marks): they make a terminal show text in an order
/// other than the one it has.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{61c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The time now, RFC 3339 in UTC (from tracing-subscriber, already at hand).
fn now() -> String {
    let mut time = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut time));
    time
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_shown_escaped() {
        assert_eq!(shown("v=0 plain"), "v=0 plain");
        assert_eq!(
            shown("\u{1b}]0;pwned\u{7}\u{1b}[2J"),
            "\\u{1b}]0;pwned\\u{7}\\u{1b}[2J"
        );
        assert_eq!(shown("a\r\nb\\c"), "a\\r\\nb\\\\c");
        assert_eq!(shown("\u{9b}31m \u{202e}txt"), "\\u{9b}31m \\u{202e}txt");
        assert_eq!(shown("héllo ünïcode 日本"), "héllo ünïcode 日本");
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert!(seconds("-1").is_err() && seconds("soon").is_err());
    }
}
