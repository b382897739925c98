//! `anteroom serve`: the flags ([`ServeArgs`], checked against the config
//! schema), starting a proxy in the background ([`start`], [`Running`]),
//! reloading on SIGHUP, and [`run`], the process around them.

use crate::BoxError;

mod flags;
mod hangup;
mod running;

pub use flags::ServeArgs;
pub use running::{start, start_app, start_with, Running};

use hangup::{listen_for_hangup, reload_on_sighup};

/// `anteroom serve`: run until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), BoxError> {
    let config = args.config()?;
    // Each waiting client holds a descriptor, and so does its upstream
    // connection once it runs: the soft limit (often 1024) binds long before
    // max_connections. Raised to the hard limit, as nginx's
    // worker_rlimit_nofile would be set.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let hangup = listen_for_hangup();
    let app = crate::app::build(&config)?;
    let running = start_app(&config, app, config.workers).await.map_err(|e| {
        format!(
            "cannot start (listen on {} and {}, open the request log): {e}",
            config.listen, config.admin_listen
        )
    })?;
    // Reloads re-read the file and apply the same flags on top.
    let source_args = args.clone();
    running
        .reloader
        .set_source(Box::new(move || source_args.file_config()));
    let hup = tokio::spawn(reload_on_sighup(running.reloader.clone(), hangup));
    if config.keys.is_empty() && !running.addr.ip().is_loopback() {
        tracing::warn!(
            listen = %running.addr,
            "listening beyond loopback with no API keys: anyone who can reach this port can use the backend (add [[key]] entries)"
        );
    }
    tracing::info!(
        listen = %running.addr,
        admin = %running.admin_addr,
        upstream = %config.replicas[0].origin.authority(),
        max_concurrency = config.limits.max_concurrency,
        max_queue = config.limits.max_queue,
        workers = config.workers,
        "anteroom serving"
    );
    super::shutdown_signal().await;
    hup.abort();
    tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining");
    // Stop taking requests, let running ones finish, then write out every
    // record. A second signal cuts the drain short.
    let recorder = running.recorder.clone();
    let drain_timeout = config.drain_timeout;
    tokio::select! {
        _ = running.drain(drain_timeout) => {}
        _ = super::shutdown_signal() => tracing::warn!("second signal: not waiting for the drain"),
    }
    recorder.flush().await;
    tracing::info!("stopped");
    Ok(())
}
