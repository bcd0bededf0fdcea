//! The README's generic-tool examples work as written: its `buf curl`
//! commands, run from a directory where the `--dev` daemon of its first
//! command serves (`.dev/relay.sock`), get the status and the health.

mod support;

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use support::repo_root;
use support::sidecar::{daemon_command, registered, require_tool};

const WAIT: Duration = Duration::from_secs(30);

/// The README's `buf curl` commands, each joined from its `\`-continued lines.
fn buf_curl_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let mut commands = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with("buf curl ") {
            continue;
        }
        let mut command = String::new();
        let mut line = line;
        while let Some(head) = line.strip_suffix('\\') {
            command.push_str(head);
            line = lines.next().unwrap_or_default();
        }
        command.push_str(line);
        commands.push(command);
    }
    commands
}

#[tokio::test]
async fn the_buf_curl_examples_work_against_the_dev_daemon() {
    require_tool("buf", "npm install -g @bufbuild/buf");
    let commands = buf_curl_commands();
    assert_eq!(commands.len(), 2, "{commands:?}");
    // The README's first command, in a directory of its own and on a free
    // port (the README's 8700 may be taken here).
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = daemon_command()
        .arg("--dev")
        .env("RELAY_SIDECAR_DEV_LISTEN", "127.0.0.1:0")
        .current_dir(dir.path())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(daemon.stderr.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("serving") {
                return;
            }
        }
        panic!("the dev daemon exited before serving");
    })
    .await
    .expect("the dev daemon serves in time");
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let client = relay_sidecar_client::connect(dir.path().join(".dev/relay.sock"))
        .await
        .unwrap();
    let uuid = registered(&client).await.uuid;

    let mut outputs = Vec::new();
    for command in &commands {
        let output = tokio::process::Command::new("sh")
            .args(["-c", command])
            .current_dir(dir.path())
            .output();
        let output = tokio::time::timeout(WAIT, output).await.unwrap().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{command}\n{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push(stdout);
    }
    assert!(
        outputs[0].contains(&uuid.to_string())
            && outputs[0].contains("CONNECTION_STATE_REGISTERED"),
        "{}",
        outputs[0]
    );
    assert!(outputs[1].contains("\"SERVING\""), "{}", outputs[1]);
    daemon.kill().await.unwrap();
}
