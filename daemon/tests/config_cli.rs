//! The daemon's configuration commands and log formats, through the binary:
//! `default-config` prints the example, `check-config` prints the effective
//! settings (file, then environment, then flags) with secrets masked, and
//! logs are plain lines with priorities under journald, JSON on request.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use support::repo_root;
use support::sidecar::daemon_command;

const WAIT: Duration = Duration::from_secs(20);

async fn run(command: &mut tokio::process::Command) -> Output {
    tokio::time::timeout(WAIT, command.output())
        .await
        .expect("the daemon exits in time")
        .expect("the daemon runs")
}

#[tokio::test]
async fn default_config_prints_the_example() {
    // Whatever else is set, and even if it is wrong.
    let output = run(daemon_command()
        .arg("default-config")
        .env("RELAY_SIDECAR_BACKLOG", "not a number"))
    .await;
    assert!(output.status.success());
    let example = std::fs::read_to_string(repo_root().join("deploy/config.toml")).unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), example);
}

#[tokio::test]
async fn check_config_prints_the_effective_settings_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "relay_url = \"wss://user:hunter2@relay.internal\"\n\
         name = \"from-file\"\nbacklog = 5\nsubscriber_queue = 9\n\
         [headers]\n\"X-Api-Key\" = \"s3cret-key\"\n",
    )
    .unwrap();
    let output = run(daemon_command()
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .env("RELAY_SIDECAR_BACKLOG", "7")
        .env("RELAY_SIDECAR_ALLOW_UIDS", "1000,1001")
        .args(["--name", "from-flag", "--socket-group", "0"]))
    .await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "name = \"from-flag\"",
        "backlog = 7",
        "subscriber_queue = 9",
        "allow_uids = [1000, 1001]",
        "socket_group = \"0\"",
        "relay_url = \"wss://user:****@relay.internal\"",
        "X-Api-Key = \"****\"",
        "# uuid: unset",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in\n{stdout}"
        );
    }
    assert!(stdout.contains(&file.display().to_string()), "{stdout}");
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("s3cret"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_config_fails_with_one_line_naming_the_key() {
    for (args, key) in [
        (
            vec!["--relay-url", "ws://h:1", "--socket-group", "no-such-group"],
            "socket_group",
        ),
        (
            vec!["--relay-url", "ws://h:1", "--allow-gids", "wheel"],
            "allow_gids",
        ),
        (
            vec!["--relay-url", "ws://h:1", "--metrics-listen", "9464"],
            "metrics_listen",
        ),
        (
            vec!["--relay-url", "wss://h", "--config", "/nonexistent.toml"],
            "config",
        ),
    ] {
        let output = run(daemon_command().arg("check-config").args(&args)).await;
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(key), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty());
    }
}

#[tokio::test]
async fn check_config_refuses_what_would_fail_later_and_accepts_dev_null() {
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("config.toml");
    std::fs::write(
        &example,
        std::fs::read_to_string(repo_root().join("deploy/config.toml")).unwrap(),
    )
    .unwrap();
    let cases: [(&[&str], (&str, &str), &str); 4] = [
        // The example as installed, before its placeholder is replaced.
        (
            &["--config", example.to_str().unwrap()],
            ("RELAY_SIDECAR_UNUSED", ""),
            "relay_url (in ",
        ),
        (
            &["--relay-url", "ws://relay.internal:1"],
            ("RELAY_SIDECAR_TOKEN_FILE", "/nonexistent/token"),
            "token_file (from RELAY_SIDECAR_TOKEN_FILE): cannot read /nonexistent/token",
        ),
        (
            &["--relay-url", "wss://relay.internal"],
            ("RELAY_SIDECAR_CA_FILE", "/nonexistent/ca.pem"),
            "ca_file (from RELAY_SIDECAR_CA_FILE): cannot read /nonexistent/ca.pem",
        ),
        (
            &["--relay-url", "ws://relay.internal:99999"],
            ("RELAY_SIDECAR_UNUSED", ""),
            "relay_url (from --relay-url): \"ws://relay.internal:99999\": port 99999 is not a port",
        ),
    ];
    for (args, (var, value), wanted) in cases {
        let output = run(daemon_command()
            .arg("check-config")
            .args(args)
            .env(var, value))
        .await;
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(!output.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
    }

    // An empty file, even one that is not a regular file, is a config
    // with nothing in it.
    let output = run(daemon_command().args([
        "check-config",
        "--config",
        "/dev/null",
        "--relay-url",
        "ws://relay.internal:1",
    ]))
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("config file: /dev/null"));
}

/// Runs the daemon (on a relay that is not there) until it logs "serving",
/// then stops it; returns its stderr, written to a file at `log`.
async fn logs(log: &Path, configure: impl FnOnce(&mut tokio::process::Command)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = daemon_command();
    command
        .args(["--relay-url", "ws://127.0.0.1:1"])
        .arg("--socket")
        .arg(dir.path().join("relay.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(std::fs::OpenOptions::new().append(true).open(log).unwrap());
    configure(&mut command);
    let mut child = command.spawn().unwrap();
    tokio::time::timeout(WAIT, async {
        while !std::fs::read_to_string(log).unwrap().contains("serving") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the daemon logs \"serving\"");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(log).unwrap();
    assert!(exit.success(), "{exit:?}\n{text}");
    text
}

#[tokio::test]
async fn under_journald_lines_carry_priorities_and_no_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    // What systemd sets when stderr is connected to the journal.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let text = logs(&log, |c| {
        c.env("JOURNAL_STREAM", &stream);
    })
    .await;
    let serving = text.lines().find(|l| l.contains("serving")).unwrap();
    // The priority, then the message: no level word, no space.
    assert!(serving.starts_with("<6>serving socket="), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("<4>")),
        "the refused relay connection is a warning:\n{text}"
    );
    assert!(
        text.lines().all(|l| l.starts_with('<')),
        "every line has a priority and no timestamp:\n{text}"
    );

    // The variable naming another stream (inherited, stderr redirected):
    // ordinary text with timestamps.
    let other = dir.path().join("other");
    std::fs::write(&other, "").unwrap();
    let text = logs(&other, |c| {
        c.env("JOURNAL_STREAM", &stream);
    })
    .await;
    assert!(
        !text.contains("<6>") && text.lines().all(|l| l.starts_with("20")),
        "{text}"
    );
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line_at_the_configured_level() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    std::fs::write(&log, "").unwrap();
    let text = logs(&log, |c| {
        c.args(["--log-format", "json", "--log-level", "relay_sidecar=debug"]);
    })
    .await;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(lines.iter().any(|l| l["message"] == "serving"), "{text}");
    assert!(lines.iter().any(|l| l["level"] == "DEBUG"), "{text}");
}
