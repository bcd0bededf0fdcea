//! The results: rows with their figures, ratios and targets, printed as a
//! Markdown table and written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::Counts;
use crate::machine::Machine;

/// What each figure should reach, by row key: the README's targets, in one
/// place. A ratio target is met by the ratio to the row's reference.
/// `session.latency_p50` is the one-way p50 over the session RPC (one
/// stream open both ways); its row comes with that RPC, next to
/// `sidecar.latency_p50` in `sidecar::measure`, and its target is here
/// already.
const TARGETS: [(&str, Target); 10] = [
    ("session.latency_p50", Target::RatioAtMost(2.0)),
    ("sidecar.latency_p50", Target::RatioAtMost(4.0)),
    ("sidecar.unary_throughput", Target::AtLeast(40_000.0)),
    ("sidecar.stream_throughput", Target::RatioAtLeast(0.8)),
    ("sidecar_py.latency_p50", Target::RatioAtMost(0.7)),
    ("sidecar_py.stream_throughput", Target::RatioAtLeast(1.0)),
    ("sidecar_py.unary_throughput", Target::RatioAtLeast(1.0)),
    ("memory.idle_rss", Target::AtMost(8.0)),
    ("memory.subscribed_rss", Target::AtMost(32.0)),
    ("memory.subscribed_shared_rss", Target::AtMost(32.0)),
];

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    #[serde(rename = "us")]
    Micros,
    #[serde(rename = "msg/s")]
    PerSecond,
    #[serde(rename = "MiB")]
    MiB,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
    RatioAtMost(f64),
    RatioAtLeast(f64),
}

#[derive(Debug, Serialize)]
pub struct Row {
    key: String,
    section: String,
    measure: String,
    unit: Unit,
    /// The median over the repetitions.
    value: f64,
    /// One figure per repetition.
    samples: Vec<f64>,
    /// The limit or anchor this figure is compared with.
    reference: Option<String>,
    /// `value` divided by the reference's value.
    ratio: Option<f64>,
    target: Option<Target>,
    met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Row {
    pub fn new(key: &str, section: &str, measure: String, unit: Unit, samples: Vec<f64>) -> Row {
        Row {
            key: key.to_owned(),
            section: section.to_owned(),
            measure,
            unit,
            value: median(&samples),
            samples,
            reference: None,
            ratio: None,
            target: None,
            met: None,
            detail: None,
        }
    }

    pub fn reference(mut self, key: &str) -> Row {
        self.reference = Some(key.to_owned());
        self
    }

    pub fn detail(mut self, detail: String) -> Row {
        self.detail = Some(detail);
        self
    }
}

/// The p50 and the p99.
pub const P50_P99: &[(&str, f64)] = &[("p50", 0.50), ("p99", 0.99)];
/// The p50 alone.
pub const P50: &[(&str, f64)] = &[("p50", 0.50)];

#[derive(Debug, Default)]
pub struct Results {
    rows: Vec<Row>,
}

impl Results {
    pub fn add(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// The rows `{path}.latency_{q}` of a latency measurement (one sample
    /// list per repetition), one per quantile; `compare` names the path
    /// whose rows of the same quantile they are compared with.
    pub fn latency(
        &mut self,
        path: &str,
        section: &str,
        what: &str,
        runs: &[Vec<f64>],
        quantiles: &[(&str, f64)],
        compare: Option<&str>,
    ) {
        for &(name, p) in quantiles {
            let per_run: Vec<f64> = runs
                .iter()
                .map(|samples| {
                    let mut sorted = samples.clone();
                    sorted.sort_by(f64::total_cmp);
                    percentile(&sorted, p)
                })
                .collect();
            let mut row = Row::new(
                &format!("{path}.latency_{name}"),
                section,
                format!("{what}: one-way latency {name}"),
                Unit::Micros,
                per_run,
            );
            if let Some(reference) = compare {
                row = row.reference(&format!("{reference}.latency_{name}"));
            }
            self.add(row);
        }
    }

    pub fn report(mut self, machine: Machine, counts: Counts) -> Report {
        let values: Vec<(String, f64)> =
            self.rows.iter().map(|r| (r.key.clone(), r.value)).collect();
        for row in &mut self.rows {
            row.ratio = row.reference.as_ref().and_then(|key| {
                let (_, reference) = values.iter().find(|(k, _)| k == key)?;
                Some(row.value / reference)
            });
            row.target = TARGETS
                .iter()
                .find(|(key, _)| *key == row.key)
                .map(|&(_, target)| target);
            row.met = row.target.and_then(|target| match target {
                Target::AtMost(limit) => Some(row.value <= limit),
                Target::AtLeast(limit) => Some(row.value >= limit),
                Target::RatioAtMost(limit) => row.ratio.map(|r| r <= limit),
                Target::RatioAtLeast(limit) => row.ratio.map(|r| r >= limit),
            });
        }
        Report {
            machine,
            counts,
            rows: self.rows,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    machine: Machine,
    counts: Counts,
    rows: Vec<Row>,
}

impl Report {
    /// The results as a Markdown table, with the machine above it.
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nrelay-sidecar {} ({} build), {}; {} cores ({}), {} GiB, {}",
            m.version, m.build, m.started, m.cores, m.cpu, m.memory_gib, m.kernel
        );
        let _ = writeln!(
            out,
            "load average {} at the start, {} at the end; medians of {} repetitions; payload {} bytes",
            m.load_start, m.load_end, self.counts.repetitions, self.counts.payload
        );
        if let (Some(python), Some(proxystore)) = (&m.python, &m.proxystore) {
            let _ = writeln!(out, "Python {python}, proxystore {proxystore}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "| section | measure | value | ratio | target | met |");
        let _ = writeln!(out, "| --- | --- | ---: | ---: | --- | --- |");
        for row in &self.rows {
            let ratio = match (&row.ratio, &row.reference) {
                (Some(r), Some(reference)) => format!("{r:.2}x {}", short(reference)),
                _ => String::new(),
            };
            let target = match row.target {
                Some(Target::AtMost(v)) => format!("<= {}", figure(v, row.unit)),
                Some(Target::AtLeast(v)) => format!(">= {}", figure(v, row.unit)),
                Some(Target::RatioAtMost(v)) => format!("<= {v}x"),
                Some(Target::RatioAtLeast(v)) => format!(">= {v}x"),
                None => String::new(),
            };
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {ratio} | {target} | {met} |",
                row.section,
                row.measure,
                figure(row.value, row.unit)
            );
        }
        out
    }
}

/// A reference row's key, short: `raw_processes.latency_p50` -> `raw_processes`.
fn short(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

fn figure(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Micros if value < 10.0 => format!("{value:.2} µs"),
        Unit::Micros => format!("{value:.0} µs"),
        Unit::PerSecond => format!("{} msg/s", thousands(value.round() as u64)),
        Unit::MiB => format!("{value:.1} MiB"),
    }
}

pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `p` quantile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_medians() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 51.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(figure(40_000.4, Unit::PerSecond), "40,000 msg/s");
        assert_eq!(short("raw_processes.latency_p50"), "raw_processes");
    }

    #[test]
    fn targets_judge_values_and_ratios_to_their_reference() {
        let mut results = Results::default();
        results.add(Row::new(
            "raw_processes.latency_p50",
            "limit",
            "limit".into(),
            Unit::Micros,
            vec![10.0],
        ));
        results.add(
            Row::new(
                "sidecar.latency_p50",
                "sidecar",
                "sidecar".into(),
                Unit::Micros,
                vec![50.0],
            )
            .reference("raw_processes.latency_p50"),
        );
        results.add(Row::new(
            "memory.idle_rss",
            "memory",
            "idle".into(),
            Unit::MiB,
            vec![7.0],
        ));
        let report = results.report(Machine::probe(), test_counts());
        let [limit, sidecar, idle] = &report.rows[..] else {
            panic!("three rows: {:?}", report.rows);
        };
        assert_eq!((limit.target.is_none(), limit.met), (true, None));
        assert_eq!(sidecar.ratio, Some(5.0));
        assert_eq!(sidecar.met, Some(false), "5.0x against <= 4.0x");
        assert_eq!(idle.met, Some(true), "7 MiB against <= 8 MiB");
        assert!(
            report
                .table()
                .contains("| 5.00x raw_processes | <= 4x | **no** |")
        );
    }

    fn test_counts() -> Counts {
        use clap::Parser as _;
        Counts::from(&crate::cli::Flags::parse_from([
            "relay-sidecar-bench",
            "--quick",
        ]))
    }
}
