//! Reloading on SIGHUP.

use std::sync::Arc;

/// SIGHUP, listened for from before the listeners accept: a SIGHUP sent
/// the moment the process is ready (an `ExecReload`, a test) would
/// otherwise find no handler and kill the process, or be lost where the
/// signal is ignored (under `nohup`).
#[cfg(unix)]
pub(super) type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub(super) type Hangup = ();

pub(super) fn listen_for_hangup() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: reload with POST /reload");
                None
            }
        }
    }
}

/// Reload the config on every SIGHUP until dropped.
pub(super) async fn reload_on_sighup(reloader: Arc<crate::reload::Reloader>, hup: Hangup) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hup else { return };
        while hup.recv().await.is_some() {
            match reloader.reload() {
                Ok(what) => tracing::info!(%what, "config reloaded (SIGHUP)"),
                Err(e) => {
                    tracing::error!(error = %e, "config reload refused; the running config stays")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, hup);
        std::future::pending::<()>().await;
    }
}
