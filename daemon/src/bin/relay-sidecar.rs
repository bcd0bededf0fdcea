//! The relay-sidecar daemon: flags, settings, logging, then the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use relay_sidecar::cli::{self, Command, Flags};
use relay_sidecar::config::{self, Settings};
use relay_sidecar::{logging, systemd};

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.command == Some(Command::DefaultConfig) {
        return print(config::EXAMPLE);
    }
    let load = match flags.command {
        Some(Command::Stop) => Settings::load_for_socket,
        _ => Settings::load,
    };
    let settings = match load(flags.sources()) {
        Ok(settings) => settings,
        Err(e) => return fail(&e),
    };
    if matches!(flags.command, Some(Command::Start { .. } | Command::Stop)) {
        return cli::job_command(&flags, settings);
    }
    if flags.command == Some(Command::CheckConfig) {
        if let Err(e) = cli::check(&settings) {
            return fail(&e);
        }
        return print(&cli::effective_config(&settings, flags.config.as_deref()));
    }
    // Before the runtime starts any thread: this clears LISTEN_FDS.
    let activated = match systemd::take_listener() {
        Ok(listener) => listener,
        Err(e) => return fail(&e),
    };
    logging::init(&settings.log_format, &settings.log_level);
    // One thread: the daemon's work is short hops between sockets, and on a
    // busy host handing each hop to another thread costs more than it saves
    // (measured: the "Performance" section of the README).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    match runtime.block_on(cli::run(settings, activated, flags.exit_with)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints `text` to stdout; a reader that stopped early
/// (`relay-sidecar default-config | head`) is no error. print! would panic.
fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(&e),
        _ => ExitCode::SUCCESS,
    }
}

/// Reports `e` on stderr, if stderr will take it (eprintln! would panic).
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "relay-sidecar: {e}");
    ExitCode::FAILURE
}
