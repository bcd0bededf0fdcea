//! Log output: human text on a terminal, plain lines without timestamps under
//! journald (which adds its own) with each line's priority as a `<N>` prefix,
//! JSON when asked for. Whatever happens to stderr, logging never stops the
//! daemon: a line that cannot be written is dropped and counted.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Log lines lost because stderr would not take them (a closed pipe, a full
/// disk), since start; the metrics endpoint serves it.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many log lines could not be written so far.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Installs the global subscriber. `format` is "auto", "text" or "json";
/// `level` is the filter used when `RUST_LOG` is unset.
pub fn init(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Not even tracing-subscriber's own complaints: it prints them with
    // eprintln!, which panics when stderr is a closed pipe.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .log_internal_errors(false);
    match format {
        "json" => builder.json().flatten_event(true).init(),
        "auto" if stderr_is_journal() => builder.with_ansi(false).event_format(Journald).init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Whether stderr is the journal stream systemd connected: `JOURNAL_STREAM`
/// names it by device and inode, so a child whose stderr was redirected
/// elsewhere, but which inherited the variable, is not fooled.
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    names_stream(&stream.to_string_lossy(), stat.st_dev, stat.st_ino)
}

fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// stderr for the log: each event arrives as one `write_all` of a whole
/// line, which either goes out or is dropped and counted. An error is never
/// passed up: tracing-subscriber has nowhere better to report it.
#[derive(Debug, Clone, Copy)]
struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(line).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The syslog priority journald reads from a `<N>` line prefix.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// One journal entry per event: `<N>` (its priority, so that `journalctl -p
/// warning` and the journal's colours work), then the message and its
/// fields, `serving socket=/run/relay-sidecar/relay.sock ...`. No level word:
/// the priority is the level. Line breaks inside a field (a relay's close
/// reason, say) would start entries of their own, at the default priority
/// and looking like the daemon's own: they become `\n`.
#[derive(Debug)]
struct Journald;

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = String::new();
        ctx.format_fields(Writer::new(&mut fields), event)?;
        writeln!(
            writer,
            "<{}>{}",
            priority(event.metadata().level()),
            one_line(&fields)
        )
    }
}

fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(['\n', '\r']) {
        text.replace('\n', "\\n").replace('\r', "\\r").into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_stream() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(!names_stream("8:12345", 8, 1));
        assert!(!names_stream("8", 8, 12345));
        assert!(!names_stream("", 0, 0));
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }

    /// What the journal would store for each event, formatted as under
    /// journald.
    fn journal_lines(log: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let out = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(Journald)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn journal_lines_are_the_priority_then_the_message() {
        let text = journal_lines(|| {
            tracing::info!(socket = "/run/x.sock", "serving");
            tracing::warn!(detail = %"closed\nfake: line", "relay connection will retry");
        });
        assert_eq!(
            text,
            "<6>serving socket=\"/run/x.sock\"\n\
             <4>relay connection will retry detail=closed\\nfake: line\n"
        );
    }
}
