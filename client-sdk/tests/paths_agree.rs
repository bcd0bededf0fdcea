//! The socket rule is written twice, in Rust (`paths`) and in Python
//! (`relay_sidecar/_paths.py`): this runs both over one table of
//! environments and requires the same answer from each, and that wherever a
//! daemon in that environment would bind, its clients look.
//!
//! The Python side runs under `$RELAY_SIDECAR_PYTHON` (set by
//! `scripts/test`), loading `_paths.py` from the source tree: it uses only
//! the standard library, so nothing needs installing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use relay_sidecar_client::paths::{Environment, MAX_JOB_LEN, Scope};
use serde_json::{Value, json};

/// (uid, variables): what each client sees.
fn table() -> Vec<(u32, Vec<(&'static str, String)>)> {
    let s = |v: &str| v.to_owned();
    let long_job = "7".repeat(MAX_JOB_LEN);
    let too_long_job = "7".repeat(MAX_JOB_LEN + 1);
    vec![
        (1000, vec![]),
        (1000, vec![("XDG_RUNTIME_DIR", s("/run/user/1000"))]),
        (1000, vec![("XDG_RUNTIME_DIR", s("relative/dir"))]),
        (1000, vec![("XDG_RUNTIME_DIR", s(""))]),
        (
            1000,
            vec![
                ("RELAY_SIDECAR_SOCKET", s("/x/s.sock")),
                ("XDG_RUNTIME_DIR", s("/run/user/1000")),
            ],
        ),
        (1000, vec![("RELAY_SIDECAR_SOCKET", s("relay.sock"))]),
        (
            1000,
            vec![
                ("RELAY_SIDECAR_SOCKET", s("")),
                ("XDG_RUNTIME_DIR", s("/run/user/1000")),
            ],
        ),
        (0, vec![]),
        (0, vec![("XDG_RUNTIME_DIR", s("/run/user/0"))]),
        (1000, vec![("RUNTIME_DIRECTORY", s("/run/worker-service"))]),
        (
            1000,
            vec![("STATE_DIRECTORY", s("/var/lib/worker-service"))],
        ),
        (1000, vec![("RELAY_SIDECAR_JOB", s("123456"))]),
        (
            1000,
            vec![
                ("RELAY_SIDECAR_JOB", s("1234.pbs-01.cluster_x")),
                ("XDG_RUNTIME_DIR", s("/run/user/1000")),
            ],
        ),
        (
            1000,
            vec![
                ("RELAY_SIDECAR_JOB", s("7")),
                ("RELAY_SIDECAR_SOCKET", s("/explicit.sock")),
            ],
        ),
        (0, vec![("RELAY_SIDECAR_JOB", s("9"))]),
        (1000, vec![("RELAY_SIDECAR_JOB", s(""))]),
        (1000, vec![("RELAY_SIDECAR_JOB", long_job)]),
        (1000, vec![("RELAY_SIDECAR_JOB", too_long_job)]),
        (1000, vec![("RELAY_SIDECAR_JOB", s("../escape"))]),
        (1000, vec![("RELAY_SIDECAR_JOB", s(".hidden"))]),
        (1000, vec![("RELAY_SIDECAR_JOB", s("a b"))]),
        (1000, vec![("RELAY_SIDECAR_JOB", s("a/b"))]),
        (1000, vec![("RELAY_SIDECAR_JOB", s("café"))]),
        (4_294_967_294, vec![("HOME", s("/nonexistent"))]),
    ]
}

/// What the Rust rule says: the sockets, or "refused".
fn rust_answer(env: &Environment) -> Value {
    match env.client_sockets() {
        Ok(sockets) => json!(sockets),
        Err(_) => json!("refused"),
    }
}

const PYTHON_SIDE: &str = r#"
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_paths", sys.argv[1])
paths = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paths)
answers = []
for row in json.load(sys.stdin):
    try:
        answers.append(paths.socket_candidates(dict(row["vars"]), row["uid"]))
    except ValueError:
        answers.append("refused")
print(json.dumps(answers))
"#;

fn python() -> PathBuf {
    match std::env::var_os("RELAY_SIDECAR_PYTHON").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => panic!(
            "RELAY_SIDECAR_PYTHON is not set: this test runs the Python SDK's socket rule. \
             scripts/test sets it; by hand: export RELAY_SIDECAR_PYTHON=$PWD/.venv/bin/python \
             (any Python 3.9+ will do)"
        ),
    }
}

#[test]
fn rust_and_python_find_the_same_sockets() {
    let rows = table();
    let input: Vec<Value> = rows
        .iter()
        .map(|(uid, vars)| json!({"uid": uid, "vars": vars}))
        .collect();
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/src/relay_sidecar/_paths.py");
    let mut child = Command::new(python())
        .arg("-c")
        .arg(PYTHON_SIDE)
        .arg(&module)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the Python interpreter runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let python: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(python.len(), rows.len());
    let mut refused = 0;
    for ((uid, vars), python) in rows.iter().zip(&python) {
        let env = Environment::from_vars(vars.iter().cloned(), *uid);
        let rust = rust_answer(&env);
        assert_eq!(&rust, python, "uid {uid}, {vars:?}");
        if rust == "refused" {
            refused += 1;
            continue;
        }
        // Wherever a daemon in this environment binds (with
        // $XDG_RUNTIME_DIR usable or not), its clients look there: a user
        // daemon's own, or the system service at its default place.
        let sockets: Vec<PathBuf> = serde_json::from_value(rust).unwrap();
        let defaults_to_system = env.runtime_directory.is_none();
        if env.socket.is_none() && (env.scope() == Scope::User || defaults_to_system) {
            for usable in [true, false] {
                let dir = env.daemon_runtime_dir(|_| usable).unwrap();
                let socket = dir.join("relay.sock");
                assert!(
                    sockets.contains(&socket),
                    "uid {uid}, {vars:?}: a daemon would bind {socket:?}; clients try {sockets:?}"
                );
            }
        }
    }
    assert_eq!(refused, 6, "the bad job labels of the table");
}
