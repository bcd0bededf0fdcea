//! What /proc says about a process: its memory and the CPU time its threads
//! have run.

use anyhow::{Context as _, Result};

/// A process's memory, from /proc/PID/status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub threads: u64,
}

impl Rss {
    pub fn of(pid: u32) -> Result<Rss> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ok(Rss {
            rss_kib: field("VmRSS:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
            threads: field("Threads:"),
        })
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn detail(&self) -> String {
        format!(
            "anonymous {:.1} MiB, file-backed {:.1} MiB, {} threads",
            self.anon_kib as f64 / 1024.0,
            self.file_kib as f64 / 1024.0,
            self.threads
        )
    }
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} MiB ({})", self.rss_mib(), self.detail())
    }
}

impl std::iter::Sum for Rss {
    fn sum<I: Iterator<Item = Rss>>(iter: I) -> Rss {
        iter.fold(Rss::default(), |total, r| Rss {
            rss_kib: total.rss_kib + r.rss_kib,
            anon_kib: total.anon_kib + r.anon_kib,
            file_kib: total.file_kib + r.file_kib,
            threads: total.threads + r.threads,
        })
    }
}

/// The process's proportional set size, KiB: its RSS with every shared page
/// divided among the processes that map it, so that a sum over many
/// processes of one binary counts the binary's pages once.
pub fn pss_kib(pid: u32) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no Pss in smaps_rollup")
}

/// The CPU time a process's threads have run so far, ns; only the threads
/// named `name` when given.
pub fn cpu_ns(pid: &str, name: Option<&str>) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        if let Some(name) = name
            && !std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == name)
        {
            continue;
        }
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(task.join("schedstat")) else {
            continue;
        };
        let ran = stat
            .split_whitespace()
            .next()
            .context("an empty schedstat")?;
        total += ran.parse::<u64>().context("schedstat")?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let me = std::process::id();
        let rss = Rss::of(me).expect("status");
        assert!(rss.rss_kib > 0 && rss.threads > 0, "{rss}");
        assert!(pss_kib(me).expect("smaps_rollup") > 0);
        assert!(cpu_ns("self", None).expect("schedstat") > 0);
        assert_eq!(cpu_ns("self", Some("no-such-thread")).expect("comm"), 0);
    }
}
