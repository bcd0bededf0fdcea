//! The daemon binary as an operator meets it: bad settings are one line that
//! names the key, a second daemon on a live socket is refused, and SIGTERM
//! stops it cleanly.

mod support;

use std::time::Duration;

use relay_sidecar_client::ConnectionState;
use support::sidecar::{daemon_args, daemon_command, dev_relay, spawn_daemon, wait_for_state};

const WAIT: Duration = Duration::from_secs(20);

/// Runs the daemon with `args` and expects it to refuse to start.
async fn refused<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let output = tokio::time::timeout(WAIT, daemon_command().args(args).output())
        .await
        .expect("the daemon exits in time")
        .expect("the daemon runs");
    assert!(!output.status.success(), "{args:?} must fail");
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    lines[0].to_owned()
}

#[tokio::test]
async fn bad_settings_are_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let socket = socket.to_str().unwrap();
    for (args, key) in [
        (vec!["--relay-url", "http://relay:8700"], "relay_url"),
        (vec!["--relay-url", "relay:8700"], "relay_url"),
        (vec![], "relay_url"),
        (
            vec!["--relay-url", "ws://h", "--dialect", "modern"],
            "dialect",
        ),
        (vec!["--relay-url", "ws://h", "--uuid", "1234"], "uuid"),
        (
            vec!["--relay-url", "ws://h", "--socket", &"/deep".repeat(30)],
            "socket",
        ),
        (vec!["--config", "/nonexistent/config.toml"], "config"),
    ] {
        let mut args = args;
        if !args.contains(&"--socket") {
            args.extend(["--socket", socket]);
        }
        let line = refused(&args).await;
        assert!(line.contains(key), "{args:?}: {line:?} should name {key}");
    }
}

#[tokio::test]
async fn corrupt_identity_file_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let file = state.join("identity.json");
    std::fs::write(&file, "{\"uuid\": \"garbage\"}").unwrap();
    let line = refused(&[
        "--relay-url",
        "ws://127.0.0.1:1",
        "--state-dir",
        state.to_str().unwrap(),
        "--socket",
        dir.path().join("s.sock").to_str().unwrap(),
    ])
    .await;
    assert!(line.contains(file.to_str().unwrap()), "{line}");
    // The file is left as it was, not replaced by a new identity.
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "{\"uuid\": \"garbage\"}"
    );
}

#[tokio::test]
async fn second_daemon_on_a_live_socket_is_refused_and_sigterm_stops_the_first() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let (args, socket) = daemon_args(dir.path(), &relay.url());
    let mut first = spawn_daemon(&args).await;
    let client = relay_sidecar_client::connect(&socket).await.unwrap();
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;

    let line = refused(&args).await;
    assert!(line.contains("already serving"), "{line}");
    assert!(
        socket.exists(),
        "the refused daemon left the live socket alone"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Open streams end rather than hang.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match statuses.next_status().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the status stream ends at shutdown");
    let status = tokio::time::timeout(WAIT, first.wait())
        .await
        .expect("the daemon exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket file is removed on exit");
    relay.stop().await;
}
