//! Log output: human text on a terminal, plain lines without timestamps under
//! journald (which adds its own), JSON when asked for.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `format` is "auto", "text" or "json";
/// `level` is the filter used when `RUST_LOG` is unset.
pub fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match format {
        "json" => builder.json().flatten_event(true).init(),
        _ if journald && format == "auto" => builder
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
