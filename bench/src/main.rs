//! relay-sidecar-bench: what the sidecar costs, measured in one run against
//! the limit as users meet it (raw WebSocket clients, each in its own
//! process, through the embedded relay), the floor under any local IPC (a
//! raw ping-pong over a Unix socket) and what users would otherwise run
//! (ProxyStore's Python `RelayClient` pair through ProxyStore's Python
//! relay). `scripts/bench` builds and runs it; see the README's
//! "Performance" section.
//!
//! The same binary is also each of its client processes: the hidden client
//! modes ([`cli::Client`]) are how it re-executes itself.

mod child;
mod cli;
mod daemon;
mod fanout;
mod limit;
mod machine;
mod memory;
mod procfs;
mod python;
mod raw;
mod report;
mod run;
mod scale;
mod sidecar;
mod traffic;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let flags = cli::Flags::parse();
    let outcome = match flags.client {
        Some(client) => child::serve(client),
        None => run::run(flags),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-sidecar-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
