//! The adaptive limit's loop on the first upstream.

use std::sync::Arc;

use super::Router;

/// Run the adaptive limit's controller (see
/// [`adaptive`](crate::admission::adaptive)) on the first upstream's
/// scheduler until dropped (or the router closes).
pub async fn run_adaptive(
    router: Arc<Router>,
    signals: Arc<crate::telemetry::Signals>,
    adaptive: crate::config::Adaptive,
) {
    use crate::admission::adaptive::{Controller, Load, Source, TICK};
    use tokio::time::Instant;
    let mut controller = Controller::new(adaptive);
    let row = |router: &Router| {
        let table = router.table();
        table.row(table.first()).clone()
    };
    {
        let row = row(&router);
        row.scheduler.set_max_concurrency(controller.limit());
        row.backend.set_limit(controller.source().as_str());
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut said = None;
    while !router.is_closed() {
        tick.tick().await;
        let row = row(&router);
        let taken = signals.take();
        let (waiting, running) = row.scheduler.snapshot_counts();
        let before = controller.limit();
        let view = row.backend.view();
        let limit = controller.step(Instant::now(), taken, Load { waiting, running }, view);
        let source = controller.source();
        row.backend.set_limit(source.as_str());
        if said != Some(source) {
            match source {
                Source::AutoFallback => tracing::warn!(
                    upstream = %row.config.name,
                    "max_concurrency = \"backend\", but the backend reports no slots: finding the limit as \"auto\" does"
                ),
                Source::Backend => tracing::info!(
                    upstream = %row.config.name,
                    limit,
                    "max_concurrency follows the backend's slots"
                ),
                Source::Auto => {}
            }
            said = Some(source);
        }
        if limit != before {
            tracing::debug!(
                limit,
                before,
                ?taken,
                waiting,
                running,
                ?view,
                "adaptive limit moved"
            );
            row.scheduler.set_max_concurrency(limit);
        }
    }
}
