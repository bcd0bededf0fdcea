//! One bench run: the embedded relay and the scratch directory, every
//! section asked for in turn, then the report on stdout (and as JSON).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use relay_sidecar::codec::Dialect;
use relay_sidecar::devrelay::DevRelay;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::cli::{Counts, Flags, Section};
use crate::daemon::{DaemonProc, WorkDir};
use crate::machine::Machine;
use crate::report::Results;
use crate::{fanout, limit, memory, python, raw, scale, sidecar};

/// The name of the embedded relay's threads, by which their CPU time is
/// told from the bench's.
pub const RELAY_THREADS: &str = "bench-relay";

/// What every section needs: the counts, the daemon binary, the embedded
/// relay and the scratch directory.
pub struct Bench {
    pub counts: Counts,
    pub daemon: PathBuf,
    pub relay_url: String,
    pub dir: PathBuf,
}

impl Bench {
    /// A daemon in a child process, registered with `relay_url`.
    pub async fn start_daemon(&self, name: &str, relay_url: &str) -> Result<DaemonProc> {
        DaemonProc::start(&self.daemon, &self.dir, name, relay_url)
            .await
            .with_context(|| format!("starting daemon {name}"))
    }
}

pub fn run(flags: Flags) -> Result<()> {
    let counts = Counts::from(&flags);
    let wanted = |s: Section| flags.only.is_empty() || flags.only.contains(&s);
    let python = if wanted(Section::Python) && !flags.no_python {
        Some(python::find(flags.python.as_deref())?)
    } else {
        None
    };
    let daemon = match &flags.daemon {
        Some(path) => std::path::absolute(path)?,
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("relay-sidecar"),
    };
    ensure!(
        daemon.is_file(),
        "no daemon binary at {} (build it: cargo build --release -p relay-sidecar; \
         or pass --daemon)",
        daemon.display()
    );
    let work = WorkDir::create(flags.keep)?;

    // The embedded relay gets a runtime (and so threads) of its own, as it
    // would in its own process; the bench's clients run on another.
    let relay_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(RELAY_THREADS)
        .enable_all()
        .build()?;
    let relay = relay_runtime.block_on(DevRelay::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Dialect::Current,
        CancellationToken::new(),
    ))?;
    let bench = Bench {
        counts: counts.clone(),
        daemon,
        relay_url: relay.url(),
        dir: work.path.clone(),
    };
    // The in-process clients (the reference pair and the gRPC workers alike)
    // share one thread: on 2 cores, a second one only adds wake-ups between
    // threads to every round trip, for the raw pair as much as for the
    // sidecar.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("bench")
        .enable_all()
        .build()?;
    let mut machine = Machine::probe();
    eprintln!(
        "relay-sidecar-bench: {} on {} cores, {}; counts {}",
        machine.cpu,
        machine.cores,
        machine.kernel,
        serde_json::to_string(&counts)?
    );
    let mut results = Results::default();
    let outcome = runtime.block_on(async {
        let r = &mut results;
        if wanted(Section::Raw) {
            raw::measure(&bench, r)
                .await
                .context("in-process raw pair")?;
        }
        if wanted(Section::Limit) {
            limit::measure(&bench, r).await?;
        }
        if wanted(Section::Memory) {
            memory::measure(&bench, r).await.context("memory")?;
        }
        if wanted(Section::Sidecar) {
            sidecar::measure(&bench, r).await.context("sidecar path")?;
        }
        if wanted(Section::Fanout) {
            fanout::measure(&bench, r).await.context("fan-out")?;
        }
        if wanted(Section::Scale) {
            scale::measure(&bench, r).await.context("scale")?;
        }
        match &python {
            Some(python) => python::measure(&bench, python, r, &mut machine)
                .await
                .context("Python relay paths")?,
            None if wanted(Section::Python) => {
                eprintln!("relay-sidecar-bench: --no-python: the ProxyStore rows are skipped");
            }
            None => {}
        }
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    relay_runtime.block_on(async {
        let _ = timeout(Duration::from_secs(5), relay.stop()).await;
    });
    relay_runtime.shutdown_timeout(Duration::from_secs(2));
    outcome?;

    machine.finish();
    let report = results.report(machine, counts);
    print!("{}", report.table());
    if let Some(path) = &flags.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("relay-sidecar-bench: wrote {}", path.display());
    }
    Ok(())
}
