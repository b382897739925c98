//! The subcommands. Thin: each parses its arguments and calls the library.

pub mod demo;
pub mod healthcheck;
pub mod probe;
pub mod report;
pub mod serve;
pub mod simulate;

use clap::{Parser, Subcommand};

/// anteroom: admission control, a priority queue and honest 429s in front of
/// an OpenAI-compatible model server.
#[derive(Debug, Parser)]
#[command(name = "anteroom", version, about)]
pub struct Cli {
    /// Server log lines: `human` (default) or `json` (one object a line,
    /// for log shippers). The level comes from RUST_LOG (default info).
    /// One line per request is the request log's job, not this log's.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The server log's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object a line.
    Json,
}

/// Set up the server log (stderr) in `format`, at RUST_LOG's level.
/// Human lines are coloured only on a terminal (and not with `NO_COLOR`
/// set): a log redirected to a file or collected by a container runtime
/// holds no escape codes.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
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
    /// Test a backend before a benchmark: what it is, its models and slots,
    /// how its answers look (usage, timings, priority), and the settings
    /// anteroom would use.
    Probe(probe::ProbeArgs),
    /// GET the admin listener's /healthz; exit 0 on 200 (for container
    /// HEALTHCHECKs without curl).
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> Result<(), crate::BoxError> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Report(args) => report::run(&args),
        Command::Probe(args) => probe::run(args).await,
        Command::Healthcheck(args) => healthcheck::run(args).await,
    }
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
