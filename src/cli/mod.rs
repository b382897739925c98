//! The subcommands. Thin: each parses its arguments and calls the library.

pub mod demo;
pub mod report;
pub mod serve;
pub mod simulate;

use clap::{Parser, Subcommand};

/// anteroom: admission control, a priority queue and honest 429s in front of
/// an OpenAI-compatible model server.
#[derive(Debug, Parser)]
#[command(name = "anteroom", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy in front of a model server.
    Serve(serve::ServeArgs),
    /// Run the built-in model server simulator.
    Simulate(simulate::SimulateArgs),
    /// Start a simulator and the proxy, send a burst of mixed-priority
    /// requests, print what happened, exit.
    Demo(demo::DemoArgs),
    /// Summarise a request log: counts, rates, and queue wait / TTFT / TPOT
    /// / end-to-end percentiles.
    Report(report::ReportArgs),
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> Result<(), crate::BoxError> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Report(args) => report::run(&args),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
