//! A user's own daemon, as on an HPC node: an ordinary user (made by
//! `scripts/test`) with no root, no systemd and no `XDG_RUNTIME_DIR` runs a
//! job script that starts the daemon with no flag but the relay URL, runs
//! Python workers with no socket setting, and ends; against the real
//! ProxyStore relay.
//!
//! A "node" is a mount and UTS namespace: its own `/tmp` (a tmpfs, node-local
//! as on a cluster) and host name, while the home directory is shared by
//! every node, as an NFS home is. The user installs the Python SDK with pip
//! from this checkout, which it does not own. These tests need root (to make
//! the namespaces and to run as the user), as CI has; they fail, never skip,
//! otherwise.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::unistd::User;
use serde_json::Value;
use support::{Dialect, PyRelay, python, repo_root};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The ordinary user; `scripts/test` creates it.
const USER: &str = "relay-sidecar-test";
/// Bound on each step of a job (a failure guard, not a delay).
const STEP: Duration = Duration::from_secs(60);
/// The Python SDK, as the user installs it (once per run of this file).
static SDK: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();

fn user() -> User {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests make namespaces and run as another user, which needs root: run them as root (CI does)"
    );
    User::from_name(USER)
        .expect("the user database")
        .unwrap_or_else(|| {
            panic!(
                "there is no user {USER}: scripts/test creates it; by hand:\n    \
                 useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {USER}"
            )
        })
}

/// A directory the user owns, outside `/tmp` (which each node replaces), so
/// that every node sees it: a home directory, or the SDK's install.
fn user_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let user = user();
    nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// The directory of the daemon and relayctl binaries.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_relay-sidecar"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Shell commands that, in a fresh mount namespace, let other users reach
/// `paths` whose ancestors are closed to them (a toolchain or checkout under
/// `/root`): each closed directory is covered with an open tmpfs into which
/// only the entries on those paths are bound back, with their own modes.
fn open_paths(paths: &[PathBuf]) -> String {
    let mut needed: BTreeSet<(PathBuf, String)> = BTreeSet::new();
    for path in paths {
        let mut resolved = vec![path.clone()];
        if let Ok(real) = path.canonicalize() {
            resolved.push(real);
        }
        for path in resolved {
            let mut dir = PathBuf::from("/");
            for part in path.components().skip(1) {
                let part = part.as_os_str().to_string_lossy().into_owned();
                let closed = std::fs::metadata(&dir).is_ok_and(|m| m.mode() & 0o001 == 0);
                if closed {
                    needed.insert((dir.clone(), part.clone()));
                }
                dir.push(&part);
            }
        }
    }
    let mut script = String::new();
    let mut dirs: Vec<&PathBuf> = needed.iter().map(|(d, _)| d).collect();
    dirs.dedup();
    for (n, dir) in dirs.into_iter().enumerate() {
        let d = dir.display();
        script.push_str(&format!(
            "stage=/tmp/.open-{n}; mkdir $stage; mount --bind '{d}' $stage; \
             mount -t tmpfs -o mode=0755 tmpfs '{d}'\n"
        ));
        for (_, part) in needed.iter().filter(|(nd, _)| nd == dir) {
            script.push_str(&format!(
                "if [ -d $stage/'{part}' ]; then mkdir '{d}/{part}'; else touch '{d}/{part}'; fi; \
                 mount --bind $stage/'{part}' '{d}/{part}'\n"
            ));
        }
        script.push_str("umount $stage; rmdir $stage\n");
    }
    script
}

/// Shell commands that give a fresh mount namespace its own empty /tmp,
/// keeping the entries of the old one that `paths` lie in (a checkout or a
/// target directory under /tmp), reached through a descriptor of the old
/// /tmp held open across the mount (and not canonicalized, which would
/// turn it back into a path in the new /tmp).
fn fresh_tmp(paths: &[PathBuf]) -> String {
    let mut kept: BTreeSet<String> = BTreeSet::new();
    for path in paths {
        for path in [Some(path.clone()), path.canonicalize().ok()]
            .into_iter()
            .flatten()
        {
            if let Ok(rest) = path.strip_prefix("/tmp")
                && let Some(first) = rest.components().next()
            {
                kept.insert(first.as_os_str().to_string_lossy().into_owned());
            }
        }
    }
    let mut script = String::from("exec 3</tmp\nmount -t tmpfs -o mode=1777 tmpfs /tmp\n");
    for entry in kept {
        script.push_str(&format!(
            "old=/proc/$$/fd/3/'{entry}'; \
             if [ -d \"$old\" ]; then mkdir /tmp/'{entry}'; else touch /tmp/'{entry}'; fi; \
             mount --no-canonicalize --bind \"$old\" /tmp/'{entry}'\n"
        ));
    }
    script.push_str("exec 3<&-\n");
    script
}

/// A "node": its own /tmp and host name, the rest of the machine shared.
struct Node {
    name: String,
    pid: u32,
    _holder: Child,
}

impl Node {
    async fn boot(name: &str) -> Node {
        let reach = [
            python(Dialect::Current),
            bin_dir(),
            repo_root(),
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        ];
        let script = format!(
            "set -e\n{}{}hostname {name}\necho ready $$\nexec cat\n",
            fresh_tmp(&reach),
            open_paths(&reach)
        );
        let mut holder = Command::new("unshare")
            .args([
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--fork",
                "sh",
                "-c",
            ])
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(STEP, lines.next_line())
            .await
            .expect("the node boots in time")
            .unwrap()
            .unwrap_or_else(|| panic!("node {name} did not boot (see its stderr above)"));
        let pid = ready
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("node {name}: {ready:?}"));
        Node {
            name: name.to_owned(),
            pid,
            _holder: holder,
        }
    }

    /// `argv` in this node as root.
    async fn root(&self, argv: &[&str]) -> String {
        let output = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "--mount", "--uts", "--"])
            .args(argv)
            .output();
        let output = tokio::time::timeout(STEP, output).await.unwrap().unwrap();
        assert!(output.status.success(), "{argv:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    /// A shell script run in this node as the user, with a bare environment
    /// (no XDG_RUNTIME_DIR, no RELAY_SIDECAR_*): `home`, a PATH with the
    /// daemon, relayctl and the Python environment, and `env`.
    fn job(&self, home: &Path, env: &[(&str, String)], script: &str) -> Job {
        let sdk = SDK.get().expect("the SDK is installed first");
        let python_bin = python(Dialect::Current).parent().unwrap().to_path_buf();
        let path = format!(
            "{}:{}:/usr/bin:/bin",
            bin_dir().display(),
            python_bin.display()
        );
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid.to_string(), "--mount", "--uts", "--"])
            .args(["runuser", "-u", USER, "--", "env", "-i"])
            .arg(format!("HOME={}", home.display()))
            .arg(format!("PATH={path}"))
            .arg(format!("PYTHONPATH={}", sdk.display()))
            .args([format!("USER={USER}"), format!("LOGNAME={USER}")]);
        for (key, value) in env {
            command.arg(format!("{key}={value}"));
        }
        command
            .args(["sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("nsenter runs");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stdin = child.stdin.take();
        Job {
            node: self.name.clone(),
            child,
            stdin,
            stdout,
            seen: Vec::new(),
        }
    }
}

/// A job script running on a node. It reads its stdin once where it waits
/// for the test ("the rest of the job"), and ends when that is closed.
struct Job {
    node: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
}

impl Job {
    /// Reads output lines until one starts with `prefix`; returns it.
    async fn line(&mut self, prefix: &str) -> String {
        loop {
            let next = tokio::time::timeout(STEP, self.stdout.next_line()).await;
            match next {
                Ok(Ok(Some(line))) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                _ => {
                    let _ = self.child.start_kill();
                    let stderr = self.stderr().await;
                    panic!(
                        "job on {}: no line {prefix:?}; output:\n{}\nstderr:\n{stderr}",
                        self.node,
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// The JSON object on the line after `prefix `.
    async fn json(&mut self, prefix: &str) -> Value {
        let line = self.line(prefix).await;
        serde_json::from_str(line[prefix.len()..].trim()).unwrap()
    }

    /// Everything written to the job's stderr until every process holding
    /// it has exited, the daemons it started included (their log goes
    /// there, as a batch job's does).
    async fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let read = tokio::time::timeout(STEP, err.read_to_string(&mut text)).await;
            assert!(
                read.is_ok(),
                "job on {}: a process it started is still running after {STEP:?}:\n{text}",
                self.node
            );
        }
        text
    }

    /// Lets the script go on past its `read`, waits for it to end, and for
    /// every process it started to exit; its stderr.
    async fn end(mut self) -> (bool, String) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"end\n").await;
        }
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("the job ends in time")
            .unwrap();
        (status.success(), self.stderr().await)
    }
}

/// Installs the Python SDK as the user, with pip, from this checkout (owned
/// by root): the build writes nothing into the checkout.
async fn install_sdk() -> PathBuf {
    let dir = user_dir("sdk-");
    let target = dir.path().join("lib");
    let node = Node::boot("installer").await;
    let package = repo_root().join("client-sdk/python");
    let before: BTreeSet<_> = std::fs::read_dir(&package)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let home = dir.path().to_path_buf();
    let output = Command::new("nsenter")
        .args(["-t", &node.pid.to_string(), "--mount", "--uts", "--"])
        .args(["runuser", "-u", USER, "--", "env", "-i"])
        .arg(format!("HOME={}", home.display()))
        .args(["PATH=/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK=1"])
        .arg(python(Dialect::Current))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
        ])
        .arg("--target")
        .arg(&target)
        .arg(&package)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), output)
        .await
        .expect("pip ends in time")
        .unwrap();
    assert!(
        output.status.success(),
        "pip install from a checkout the user does not own: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after: BTreeSet<_> = std::fs::read_dir(&package)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "the build wrote into the checkout");
    // Kept until the test process ends: the jobs import from it.
    std::mem::forget(dir);
    target
}

async fn sdk() {
    SDK.get_or_init(install_sdk).await;
}

/// A worker with no socket setting: finds the daemon, subscribes, sends to
/// its own host and gets the message back through the relay.
const WORKER: &str = r#"
import json, os, relay_sidecar
with relay_sidecar.Client() as client:
    status = client.status()
    with client.subscribe(timeout=30) as messages:
        client.send(status.uuid, "offer", "hello from " + os.environ.get("RELAY_SIDECAR_JOB", "me"))
        message = next(messages)
print("worker", json.dumps({"socket": client.socket_path, "uuid": str(status.uuid),
    "state": status.state.name, "got": message.description}))
"#;

/// The job script of the README's "On a cluster", reduced to its steps: start
/// the daemon with only the relay URL, run two workers, wait for the test.
fn job_script(extra_before_read: &str) -> String {
    format!(
        "set -e\n\
         relay-sidecar start --relay-url \"$RELAY\"\n\
         python3 -c '{WORKER}' &\n\
         python3 -c '{WORKER}' &\n\
         wait\n\
         echo status $(relayctl --json status)\n\
         {extra_before_read}\
         echo ready\n\
         read _\n"
    )
}

fn home_state(home: &Path, host: &str) -> PathBuf {
    home.join(".local/state/relay-sidecar").join(host)
}

#[tokio::test]
async fn a_job_runs_a_daemon_and_workers_with_no_settings() {
    let user = user();
    sdk().await;
    let relay = PyRelay::start(Dialect::Current).await;
    let home = user_dir("home-");
    let node = Node::boot("node-a").await;
    let uid = user.uid.as_raw();
    let run_dir = format!("/tmp/relay-sidecar-{uid}");
    let socket = format!("{run_dir}/relay.sock");

    let env = [("RELAY", relay.url())];
    let mut job = node.job(home.path(), &env, &job_script(""));
    let export = job.line("export ").await;
    assert_eq!(export, format!("export RELAY_SIDECAR_SOCKET={socket}"));
    let mut uuids = BTreeSet::new();
    for _ in 0..2 {
        let worker = job.json("worker ").await;
        assert_eq!(worker["socket"], socket.as_str(), "{worker}");
        assert_eq!(worker["state"], "REGISTERED");
        assert_eq!(
            worker["got"], "hello from me",
            "round trip through the relay"
        );
        uuids.insert(worker["uuid"].as_str().unwrap().to_owned());
    }
    assert_eq!(uuids.len(), 1, "both workers are the host's one peer");
    let status = job.json("status ").await;
    assert_eq!(status["state"], "registered");
    job.line("ready").await;

    // The socket 0600 in a 0700 directory, both the user's; the identity
    // 0600 in a 0700 directory kept per host in the shared home.
    let modes = node.root(&["stat", "-c", "%a %U", &run_dir, &socket]).await;
    assert_eq!(modes, format!("700 {USER}\n600 {USER}\n"));
    let state = home_state(home.path(), "node-a");
    let identity = state.join("identity.json");
    assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(&identity).unwrap().mode() & 0o777, 0o600);
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&identity).unwrap()).unwrap();
    assert_eq!(stored["host"], "node-a");
    assert!(uuids.contains(stored["uuid"].as_str().unwrap()));

    // A second daemon of the same user (not a job of its own) is refused,
    // and says how to run one per job.
    let mut second = node.job(
        home.path(),
        &env,
        "relay-sidecar start --relay-url \"$RELAY\" || echo refused $?\necho done\n",
    );
    second.line("refused 1").await;
    let (_, stderr) = second.end().await;
    assert!(
        stderr.contains("already serving on") && stderr.contains("--job"),
        "{stderr}"
    );

    // The job ends: its daemon notices, stops and removes its socket (and
    // exits: the job's stderr, which it holds, is closed).
    let (ended, stderr) = job.end().await;
    assert!(ended, "{stderr}");
    assert!(
        stderr.contains("the process that started this daemon has exited; stopping")
            && stderr.contains("socket removed"),
        "{stderr}"
    );
    let mut after = node.job(
        home.path(),
        &env,
        "relayctl status 2>&1 || echo failed\npython3 -c 'import relay_sidecar; relay_sidecar.Client()' 2>&1 | tail -1\n",
    );
    let message = after.line("relayctl: ").await;
    assert!(
        message.contains(&format!("tried {socket} (no such socket)"))
            && message.contains("/run/relay-sidecar/relay.sock")
            && message.contains("relay-sidecar start --relay-url URL"),
        "{message}"
    );
    let python = after.line("relay_sidecar.errors.ConnectError").await;
    assert!(
        python.contains(&format!("tried {socket} (no such socket)"))
            && python.contains("RELAY_SIDECAR_SOCKET=PATH"),
        "{python}"
    );
    after.end().await;
}

/// A job of `label`: starts its own daemon, runs a worker, waits for the
/// test, then runs `at_end`.
fn job_of(label: &str, at_end: &str) -> String {
    format!(
        "set -e\n\
         export RELAY_SIDECAR_JOB={label}\n\
         {at_end}\n\
         relay-sidecar start --relay-url \"$RELAY\"\n\
         python3 -c '{WORKER}'\n\
         echo ready\n\
         read _\n"
    )
}

#[tokio::test]
async fn two_jobs_of_one_user_on_one_node_run_side_by_side() {
    let user = user();
    sdk().await;
    let relay = PyRelay::start(Dialect::Current).await;
    let home = user_dir("home-");
    let node = Node::boot("node-j").await;
    let run_dir = format!("/tmp/relay-sidecar-{}", user.uid.as_raw());
    let env = [("RELAY", relay.url())];

    // One ends with an explicit stop, one with a shell trap.
    let mut first = node.job(
        home.path(),
        &env,
        &format!("{}relay-sidecar stop\n", job_of("101", "")),
    );
    let mut second = node.job(
        home.path(),
        &env,
        &job_of("102", "trap 'relay-sidecar stop' EXIT"),
    );
    let mut workers = Vec::new();
    for (job, label) in [(&mut first, "101"), (&mut second, "102")] {
        let export = job.line("export ").await;
        let socket = format!("{run_dir}/job-{label}/relay.sock");
        assert_eq!(export, format!("export RELAY_SIDECAR_SOCKET={socket}"));
        let worker = job.json("worker ").await;
        assert_eq!(
            worker["socket"],
            socket.as_str(),
            "found with RELAY_SIDECAR_JOB alone"
        );
        assert_eq!(worker["got"], format!("hello from {label}"));
        job.line("ready").await;
        workers.push(worker);
    }
    assert_ne!(
        workers[0]["uuid"], workers[1]["uuid"],
        "an identity per job"
    );

    // Both registered at once, neither displaced by the other.
    let mut check = node.job(
        home.path(),
        &env,
        "echo a $(relayctl --job 101 --json status)\necho b $(relayctl --job 102 --json status)\n",
    );
    for (prefix, worker) in [("a ", &workers[0]), ("b ", &workers[1])] {
        let status = check.json(prefix).await;
        assert_eq!(status["state"], "registered", "{status}");
        assert_eq!(status["counters"]["reconnects"], 0, "{status}");
        assert_eq!(status["uuid"], worker["uuid"]);
    }
    check.end().await;

    // Each job's end stops its own daemon and removes its directory (the
    // socket and the identity); the other goes on.
    let (ok, stderr) = first.end().await;
    assert!(ok && stderr.contains("stopped the daemon (pid"), "{stderr}");
    let left = node.root(&["ls", "-a", &run_dir]).await;
    assert!(
        !left.contains("job-101") && left.contains("job-102"),
        "{left}"
    );
    let mut check = node.job(
        home.path(),
        &env,
        "echo b $(relayctl --job 102 --json status)\n",
    );
    assert_eq!(check.json("b ").await["state"], "registered");
    check.end().await;
    let (ok, stderr) = second.end().await;
    assert!(ok && stderr.contains("stopped the daemon (pid"), "{stderr}");
    let left = node.root(&["ls", "-a", &run_dir]).await;
    assert!(!left.contains("job-"), "{left}");
}

#[tokio::test]
async fn nodes_sharing_a_home_directory_have_their_own_identities() {
    sdk().await;
    let relay = PyRelay::start(Dialect::Current).await;
    let home = user_dir("home-");
    let (a, b) = (Node::boot("node-a").await, Node::boot("node-b").await);
    let env = [("RELAY", relay.url())];
    let script = format!(
        "set -e\nrelay-sidecar start --relay-url \"$RELAY\"\npython3 -c '{WORKER}'\necho ready\nread _\n"
    );
    let mut on_a = a.job(home.path(), &env, &script);
    let mut on_b = b.job(home.path(), &env, &script);
    let from_a = on_a.json("worker ").await;
    let from_b = on_b.json("worker ").await;
    assert_ne!(from_a["uuid"], from_b["uuid"], "one identity per host");
    for (node, worker) in [("node-a", &from_a), ("node-b", &from_b)] {
        let file = home_state(home.path(), node).join("identity.json");
        let stored: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(
            (&stored["uuid"], &stored["host"]),
            (&worker["uuid"], &Value::from(node))
        );
    }
    on_a.line("ready").await;
    on_b.line("ready").await;
    on_a.end().await;
    on_b.end().await;

    // Told to share one state directory, the second host refuses, saying why.
    let shared = "relay-sidecar start --relay-url \"$RELAY\" --state-dir \"$HOME/shared\"";
    let mut on_a = a.job(
        home.path(),
        &env,
        &format!("set -e\n{shared}\necho ready\nread _\n"),
    );
    on_a.line("ready").await;
    let mut on_b = b.job(home.path(), &env, &format!("{shared} || echo refused\n"));
    on_b.line("refused").await;
    let (_, stderr) = on_b.end().await;
    assert!(
        stderr.contains("was made on host node-a, and this is node-b"),
        "{stderr}"
    );
    on_a.end().await;
}

/// The Rust SDK's subscription outlives a daemon killed with SIGKILL and
/// started again on the same socket: it resumes and delivers what comes
/// after.
#[tokio::test]
async fn a_rust_subscription_resumes_after_the_daemon_is_killed() {
    use futures_util::StreamExt;
    use relay_sidecar_client::DescriptionType;
    use support::sidecar::{daemon_args, registered, spawn_daemon};

    let relay = PyRelay::start(Dialect::Current).await;
    let dir = tempfile::tempdir().unwrap();
    let (args, socket) = daemon_args(dir.path(), &relay.url());
    let mut daemon = spawn_daemon(&args).await;
    let client = relay_sidecar_client::connect(&socket).await.unwrap();
    let me = registered(&client).await.uuid;
    let mut messages = client.subscribe(None).await.unwrap();

    daemon.kill().await.unwrap();
    let _daemon = spawn_daemon(&args).await;
    let sender = relay_sidecar_client::connect(&socket).await.unwrap();
    registered(&sender).await;
    // Kept for the first subscriber, the resumed subscription.
    sender
        .send(me, DescriptionType::Offer, "after the kill")
        .await
        .unwrap();
    let message = tokio::time::timeout(STEP, messages.next())
        .await
        .expect("a message in time")
        .expect("the subscription goes on")
        .expect("a message, not an error");
    assert_eq!(message.description, "after the kill");
    assert_eq!(messages.resumed(), 1);
}

/// The `systemd --user` unit passes `systemd-analyze --user verify` with no
/// complaint, and sets none of the directories that would make the daemon
/// take itself for the system service.
#[test]
fn the_user_unit_passes_systemd_analyze_verify() {
    let analyze = support::sidecar::require_tool(
        "systemd-analyze",
        "apt-get update && apt-get install -y systemd",
    );
    let unit =
        std::fs::read_to_string(repo_root().join("deploy/user/relay-sidecar.service")).unwrap();
    let exec = "ExecStart=%h/.cargo/bin/relay-sidecar\n";
    assert!(unit.contains(exec), "{unit}");
    for key in ["RuntimeDirectory=", "StateDirectory=", "User=", "Group="] {
        assert!(
            !unit.lines().any(|l| l.starts_with(key)),
            "{key} in the user unit"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    // verify checks that ExecStart= names an executable: the binary under test.
    let unit = unit.replace(
        exec,
        &format!("ExecStart={}\n", env!("CARGO_BIN_EXE_relay-sidecar")),
    );
    std::fs::write(dir.path().join("relay-sidecar.service"), unit).unwrap();
    let output = std::process::Command::new(analyze)
        .current_dir(dir.path())
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["--user", "verify", "./relay-sidecar.service"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    assert!(
        !said.contains("relay-sidecar.service"),
        "systemd-analyze complains:\n{said}"
    );
}

/// A default path the user may not write (here: the system service's,
/// chosen because systemd's variables are set) stops the daemon with one
/// line that names the path and the setting that moves it.
#[tokio::test]
async fn permission_denied_on_a_default_path_says_which_setting_moves_it() {
    sdk().await;
    let home = user_dir("home-");
    let node = Node::boot("node-p").await;
    let env = [("RELAY", "ws://127.0.0.1:9".to_owned())];
    let mut job = node.job(
        home.path(),
        &env,
        "RUNTIME_DIRECTORY=/run/relay-sidecar-denied relay-sidecar --relay-url \"$RELAY\" 2>&1 || echo exit $?\n\
         STATE_DIRECTORY=/var/lib/relay-sidecar-denied relay-sidecar --relay-url \"$RELAY\" \
         --socket /tmp/mine/relay.sock 2>&1 || echo exit $?\n",
    );
    let socket = job.line("relay-sidecar: socket").await;
    assert!(
        socket.contains("cannot create /run/relay-sidecar-denied: Permission denied")
            && socket.contains("move the socket with --socket PATH (RELAY_SIDECAR_SOCKET"),
        "{socket}"
    );
    job.line("exit 1").await;
    let state = job.line("relay-sidecar: state_dir").await;
    assert!(
        state.contains("cannot create /var/lib/relay-sidecar-denied: Permission denied")
            && state.contains("state_dir moves it (--state-dir DIR, RELAY_SIDECAR_STATE_DIR)"),
        "{state}"
    );
    job.line("exit 1").await;
    job.end().await;
}
