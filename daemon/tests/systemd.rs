//! The daemon under systemd, without booting one: the unit files pass
//! `systemd-analyze verify`, the sysusers and tmpfiles snippets make the user,
//! the group and the socket directory, socket activation serves the very call
//! that started the daemon, and the notification socket hears READY=1,
//! watchdog keep-alives, STATUS= and STOPPING=1. The units under a real
//! systemd are proven in tests/systemd/ (a booted container).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use relay_sidecar_client::ConnectionState;
use support::repo_root;
use support::sidecar::{daemon_command, dev_relay, registered, require_tool};
use tokio::net::UnixDatagram;

const WAIT: Duration = Duration::from_secs(20);
const INSTALL_SYSTEMD: &str = "apt-get update && apt-get install -y systemd";
const INSTALLED_BINARY: &str = "/usr/bin/relay-sidecar";

fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
}

async fn wait_for_file(path: &Path) {
    tokio::time::timeout(WAIT, async {
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} did not appear", path.display()));
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let analyze = require_tool("systemd-analyze", INSTALL_SYSTEMD);
    let dir = tempfile::tempdir().unwrap();
    let deploy = repo_root().join("deploy");
    // verify checks that ExecStart= names an executable: point it at the
    // binary under test.
    let service = std::fs::read_to_string(deploy.join("relay-sidecar.service")).unwrap();
    assert!(service.contains(&format!("ExecStart={INSTALLED_BINARY}\n")));
    let service = service.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_relay-sidecar"));
    std::fs::write(dir.path().join("relay-sidecar.service"), service).unwrap();
    std::fs::copy(
        deploy.join("relay-sidecar.socket"),
        dir.path().join("relay-sidecar.socket"),
    )
    .unwrap();
    let output = std::process::Command::new(analyze)
        .current_dir(dir.path())
        .args([
            "verify",
            "./relay-sidecar.service",
            "./relay-sidecar.socket",
        ])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    // Unknown keys and bad values are only warnings: there must be none.
    assert!(
        !said.contains("relay-sidecar."),
        "systemd-analyze verify complains:\n{said}"
    );
}

#[test]
fn the_service_has_the_hardening_and_directories_it_promises() {
    let service =
        std::fs::read_to_string(repo_root().join("deploy/relay-sidecar.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RuntimeDirectory=relay-sidecar",
        "StateDirectory=relay-sidecar",
        "ConfigurationDirectory=relay-sidecar",
        "User=relay-sidecar",
        "Group=relay-sidecar",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "PrivateMounts=yes",
        "ProtectProc=invisible",
        "ProcSubset=pid",
        // The socket's group must be able to reach it.
        "RuntimeDirectoryMode=0755",
    ] {
        assert!(
            service.lines().any(|l| l.starts_with(line)),
            "the unit lacks {line}"
        );
    }
    assert!(
        service.contains("systemctl edit relay-sidecar"),
        "drop-in advice"
    );
}

#[test]
fn the_sysusers_and_tmpfiles_snippets_make_the_user_and_the_socket_directory() {
    let sysusers = require_tool("systemd-sysusers", INSTALL_SYSTEMD);
    let tmpfiles = require_tool("systemd-tmpfiles", INSTALL_SYSTEMD);
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let run = |tool: &Path, snippet: &str| {
        let output = std::process::Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args((tool == tmpfiles).then_some("--create"))
            .arg(repo_root().join("deploy").join(snippet))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&sysusers, "relay-sidecar.sysusers");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(passwd.starts_with("relay-sidecar:"), "{passwd}");
    assert!(group.starts_with("relay-sidecar:"), "{group}");
    let uid: u32 = passwd.split(':').nth(2).unwrap().parse().unwrap();

    // Owned by the service's user, as its RuntimeDirectory= wants it, so
    // that systemd leaves a socket unit's socket inside alone; open to all,
    // so that the socket's own group decides.
    run(&tmpfiles, "relay-sidecar.tmpfile");
    let dir = std::fs::metadata(root.path().join("run/relay-sidecar")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(dir.is_dir());
    assert_eq!((dir.uid(), dir.mode() & 0o7777), (uid, 0o755));
}

#[tokio::test]
async fn socket_activation_serves_the_call_that_started_the_daemon() {
    let activate = require_tool("systemd-socket-activate", INSTALL_SYSTEMD);
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("relay.sock");
    let log = dir.path().join("daemon.log");
    let mut child = tokio::process::Command::new(activate)
        .arg(format!("--listen={}", socket.display()))
        .arg(env!("CARGO_BIN_EXE_relay-sidecar"))
        .args(["--relay-url", &relay.url(), "--log-format", "json"])
        // Callers are logged at DEBUG (a line each would be a flood at INFO).
        .args(["--log-level", "debug"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        // A socket flag the daemon must ignore: it was handed one.
        .arg("--socket")
        .arg(dir.path().join("unused.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-socket-activate runs");
    // systemd-socket-activate binds the socket, then starts the daemon only
    // when a connection comes: this call is the one that starts it.
    wait_for_file(&socket).await;
    let client = tokio::time::timeout(WAIT, async {
        let client = relay_sidecar_client::connect(&socket).await.unwrap();
        client.status().await.unwrap();
        client
    })
    .await
    .expect("the first call is served");
    let status = registered(&client).await;
    assert_eq!(status.state, ConnectionState::Registered);
    assert!(!dir.path().join("unused.sock").exists());

    sigterm(child.id().unwrap());
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the daemon stops after SIGTERM")
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(log.contains("\"activated\":true"), "{log}");
    assert!(
        log.contains("\"caller connected\"") && log.contains("\"uid\":"),
        "callers are logged with their credentials:\n{log}"
    );
    // The socket is systemd's: the daemon leaves it (RemoveOnStop= is the
    // socket unit's business).
    assert!(socket.exists(), "the activated socket is left in place");
}

/// Receives notifications until `want` has been heard `times` times in all;
/// `seen` keeps every line heard, in order.
async fn heard(notify: &UnixDatagram, want: &str, times: usize, seen: &mut Vec<String>) {
    let count = |seen: &Vec<String>| seen.iter().filter(|l| *l == want).count();
    tokio::time::timeout(WAIT, async {
        let mut buf = vec![0u8; 4096];
        while count(seen) < times {
            let n = notify.recv(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.extend(text.lines().map(str::to_owned));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {want} on NOTIFY_SOCKET; heard {seen:?}"));
}

#[tokio::test]
async fn the_notify_socket_hears_ready_watchdog_status_and_stopping() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let socket = dir.path().join("relay.sock");
    let log = dir.path().join("daemon.log");
    let mut daemon = daemon_command()
        .env("NOTIFY_SOCKET", &notify_path)
        // 200 ms: keep-alives every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .args(["--relay-url", &relay.url()])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    heard(&notify, "READY=1", 1, &mut seen).await;
    // READY=1 means the socket serves.
    let client = relay_sidecar_client::connect(&socket).await.unwrap();
    client.status().await.unwrap();
    heard(&notify, "STATUS=relay registered", 1, &mut seen).await;
    let ready = seen.iter().position(|l| l == "READY=1").unwrap();
    let keep_alives = seen.iter().filter(|l| *l == "WATCHDOG=1").count();
    heard(&notify, "WATCHDOG=1", keep_alives + 2, &mut seen).await;
    assert!(!seen.iter().any(|l| l == "STOPPING=1"), "{seen:?}");

    sigterm(daemon.id().unwrap());
    heard(&notify, "STOPPING=1", 1, &mut seen).await;
    let exit = tokio::time::timeout(WAIT, daemon.wait())
        .await
        .expect("the daemon stops")
        .unwrap();
    assert!(
        exit.success(),
        "{exit:?}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let stopping = seen.iter().position(|l| l == "STOPPING=1").unwrap();
    assert!(ready < stopping, "{seen:?}");
}
