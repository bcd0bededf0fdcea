//! Output into a pipe whose reader has gone, with real processes and pipes:
//! a daemon whose log goes through `tee` that dies first (Ctrl-C on
//! `relay-sidecar 2>&1 | tee log`) keeps serving and still stops on SIGINT;
//! `relayctl ... | head -1` exits quietly once `head` has what it wanted.

mod support;

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use relay_sidecar_client::ConnectionState;
use support::Dialect;
use support::free_port;
use support::sidecar::{TestDaemon, daemon_args, daemon_command, dev_relay, registered, relayctl};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).expect("signal a child");
}

/// `relay_sidecar_log_lines_dropped_total` from the daemon's metrics.
async fn dropped_log_lines(port: u16) -> u64 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("relay_sidecar_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no log_lines_dropped counter in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_daemon_whose_log_reader_died_keeps_serving_and_stops_on_sigint() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let (args, socket) = daemon_args(dir.path(), &relay.url());
    let metrics = free_port();

    // relay-sidecar ... 2>&1 | tee log
    let mut tee = tokio::process::Command::new("tee")
        .arg(dir.path().join("log"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tee runs");
    let tee_stdin: Stdio = tee.stdin.take().unwrap().try_into().unwrap();
    let mut daemon = daemon_command()
        .args(&args)
        // Debug: every call the test makes below writes a log line.
        .args(["--log-format", "text", "--log-level", "debug"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .stderr(tee_stdin)
        .spawn()
        .unwrap();
    let mut shown = BufReader::new(tee.stdout.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = shown.next_line().await.unwrap() {
            if line.contains("serving") {
                return;
            }
        }
        panic!("tee's output ended before the daemon served");
    })
    .await
    .expect("the daemon serves in time");
    let client = relay_sidecar_client::connect(&socket).await.unwrap();
    registered(&client).await;

    // Ctrl-C reaches tee first: the daemon's stderr is now a pipe nobody reads.
    signal(tee.id().unwrap(), Signal::SIGINT);
    tokio::time::timeout(WAIT, tee.wait())
        .await
        .expect("tee stops")
        .unwrap();
    drop(shown);

    // Each new connection logs a line into the broken pipe; the daemon,
    // its relay link and its gRPC server carry on.
    for _ in 0..3 {
        let other = relay_sidecar_client::connect(&socket).await.unwrap();
        let status = tokio::time::timeout(WAIT, other.status())
            .await
            .expect("the daemon answers with its log pipe broken")
            .expect("GetStatus");
        assert_eq!(status.state, ConnectionState::Registered);
    }
    let dropped = dropped_log_lines(metrics).await;
    assert!(dropped >= 3, "dropped log lines counted: {dropped}");

    signal(daemon.id().unwrap(), Signal::SIGINT);
    let exit = tokio::time::timeout(WAIT, daemon.wait())
        .await
        .expect("SIGINT still stops the daemon")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!socket.exists(), "the socket is removed on a clean stop");
}

#[tokio::test]
async fn relayctl_exits_quietly_when_its_reader_has_gone() {
    let relay = dev_relay().await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let client = daemon.registered_client().await;

    // `relayctl status | head -n 0`: head has exited before relayctl
    // writes, so its very first line meets EPIPE.
    let mut head = tokio::process::Command::new("head")
        .args(["-n", "0"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("head runs");
    let into_head: Stdio = head.stdin.take().unwrap().try_into().unwrap();
    assert!(head.wait().await.unwrap().success());
    // (spawn, not output(): output() would capture stdout itself.)
    let status = relayctl(&daemon.socket)
        .arg("status")
        .stdout(into_head)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(WAIT, status.wait_with_output())
        .await
        .expect("relayctl status exits")
        .unwrap();
    assert!(
        status.status.success() && status.stderr.is_empty(),
        "{status:?}: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    // `relayctl watch | head -1`: head takes the first status and exits;
    // relayctl meets EPIPE at the next change and ends quietly.
    let mut head = tokio::process::Command::new("head")
        .args(["-n", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("head runs");
    let into_head: Stdio = head.stdin.take().unwrap().try_into().unwrap();
    let watch = relayctl(&daemon.socket)
        .arg("watch")
        .stdout(into_head)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = tokio::time::timeout(WAIT, head.wait_with_output())
        .await
        .expect("head gets the first status")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("registered"),
        "{first:?}"
    );
    client.reconnect().await.unwrap();
    let watch = tokio::time::timeout(WAIT, watch.wait_with_output())
        .await
        .expect("relayctl watch ends once its reader has gone")
        .unwrap();
    assert!(
        watch.status.success() && watch.stderr.is_empty(),
        "{:?}: {}",
        watch.status,
        String::from_utf8_lossy(&watch.stderr)
    );
    daemon.stop().await;
}
