//! Health checks of several upstreams: a probe every `health_interval`.

use std::time::Duration;

use http::StatusCode;

use super::Router;

/// One probe: GET `path` on a fresh connection, true on 200.
async fn probe(origin: &crate::origin::Origin, path: &str, timeout: Duration) -> bool {
    // The body is read to its end, but none of it is needed.
    matches!(
        crate::upstream::get(origin, path, timeout, crate::backend::PROBE_MAX_BYTES).await,
        Ok((StatusCode::OK, _))
    )
}

/// Probe upstream `id` every `health.interval` while it is in service (a
/// reload that removes or re-addresses it ends this; a new address gets a
/// loop of its own) and there are several: a 200 on `health.path` puts it
/// (back) in service, anything else counts as a failure towards ejecting it.
pub(super) async fn health_checks(
    weak: std::sync::Weak<Router>,
    id: u64,
    health: crate::config::HealthConfig,
) {
    let timeout = health.interval.min(Duration::from_secs(5));
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The router (and so the loop's end) as of now, while it is in service.
    let find = |weak: &std::sync::Weak<Router>| {
        let router = weak.upgrade()?;
        if router.is_closed() {
            return None;
        }
        let (i, origin, active) = router.find(id)?;
        Some((router, i, origin, active))
    };
    loop {
        tick.tick().await;
        let Some((_, _, origin, active)) = find(&weak) else {
            return;
        };
        if active < 2 {
            continue;
        }
        let ok = tokio::time::timeout(timeout, probe(&origin, &health.path, timeout))
            .await
            .unwrap_or(false);
        let Some((router, i, _, _)) = find(&weak) else {
            return;
        };
        if ok {
            router.readmit(i);
        } else {
            router.report(i, false);
        }
    }
}
