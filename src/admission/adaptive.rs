//! `max_concurrency = "auto"`: find the limit instead of being told it.
//!
//! A person who has not measured their backend does not know how many
//! requests it serves best at once. Past its knee a server gets no more
//! done per second, its time to first token grows, and at worst it refuses
//! (429/503) or times out. So the limit moves, in the spirit of TCP's AIMD
//! and Netflix's Gradient2, every [`TICK`]:
//!
//! - **down ×0.7** when the upstream pushed back since the last tick (a
//!   429/503, a time-out, a stream that went quiet);
//! - **down by a tenth (at least 1)** when the backend's time to first
//!   token (dispatch → first token, the model's own latency, queue
//!   excluded) averaged over the tick is more than [`TOLERANCE`] × its
//!   baseline;
//! - **up by 1** when requests are waiting for a slot and latency holds;
//! - else it stays.
//!
//! The baseline is the lowest tick average seen, drifting up slowly
//! (2% of the gap per tick) so that a change of model or prompt mix is
//! followed. The limit stays within `auto_min_concurrency ..=
//! auto_max_concurrency` and starts at the minimum. Lowering it never cuts
//! a running request: running ones finish, fewer start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Scheduler;

/// How often the limit moves.
pub const TICK: Duration = Duration::from_millis(250);
/// How far above its baseline the time to first token may go.
pub const TOLERANCE: f64 = 1.5;

/// The range the limit moves in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptiveBounds {
    /// Lowest limit.
    pub min: usize,
    /// Highest limit.
    pub max: usize,
}

/// What the controller listens to, fed from the request path with atomic
/// adds (no lock).
#[derive(Debug, Default)]
pub struct Signals {
    overloads: AtomicU64,
    ttft_sum_us: AtomicU64,
    ttft_count: AtomicU64,
}

impl Signals {
    /// The upstream pushed back: 429/503, a time-out, a stalled stream.
    pub fn overload(&self) {
        self.overloads.fetch_add(1, Ordering::Relaxed);
    }

    /// A backend time to first token was measured.
    pub fn ttft(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX >> 8)) as u64;
        self.ttft_sum_us.fetch_add(us, Ordering::Relaxed);
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Overloads and the mean TTFT since the last call.
    fn take(&self) -> (u64, Option<f64>) {
        let overloads = self.overloads.swap(0, Ordering::Relaxed);
        let sum = self.ttft_sum_us.swap(0, Ordering::Relaxed);
        let n = self.ttft_count.swap(0, Ordering::Relaxed);
        (overloads, (n > 0).then(|| sum as f64 / n as f64))
    }
}

/// The controller's state between ticks.
#[derive(Debug)]
pub struct Controller {
    bounds: AdaptiveBounds,
    limit: usize,
    baseline_us: Option<f64>,
}

impl Controller {
    /// Start at the lowest limit.
    pub fn new(bounds: AdaptiveBounds) -> Self {
        Self {
            bounds,
            limit: bounds.min,
            baseline_us: None,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// One tick: the new limit, from what happened since the last.
    pub fn step(&mut self, overloads: u64, ttft_us: Option<f64>, waiting: usize) -> usize {
        let AdaptiveBounds { min, max } = self.bounds;
        let slow = match (ttft_us, self.baseline_us) {
            (Some(now), Some(base)) => now > base * TOLERANCE,
            _ => false,
        };
        if let Some(now) = ttft_us {
            self.baseline_us = Some(match self.baseline_us {
                Some(base) if now >= base => base + (now - base) * 0.02,
                _ => now,
            });
        }
        self.limit = if overloads > 0 {
            ((self.limit as f64 * 0.7).floor() as usize).max(min)
        } else if slow {
            self.limit.saturating_sub((self.limit / 10).max(1)).max(min)
        } else if waiting > 0 {
            (self.limit + 1).min(max)
        } else {
            self.limit
        };
        self.limit
    }
}

/// Run the controller on `scheduler` until dropped.
pub async fn run(scheduler: Arc<Scheduler>, signals: Arc<Signals>, bounds: AdaptiveBounds) {
    let mut controller = Controller::new(bounds);
    scheduler.set_max_concurrency(controller.limit());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (overloads, ttft) = signals.take();
        let waiting = scheduler.snapshot_counts().0;
        let before = controller.limit();
        let limit = controller.step(overloads, ttft, waiting);
        if limit != before {
            tracing::debug!(
                limit,
                before,
                overloads,
                ?ttft,
                waiting,
                "adaptive limit moved"
            );
            scheduler.set_max_concurrency(limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: AdaptiveBounds = AdaptiveBounds { min: 1, max: 32 };

    #[test]
    fn climbs_while_requests_wait_and_latency_holds() {
        let mut c = Controller::new(B);
        for i in 0..10 {
            assert_eq!(c.step(0, Some(100_000.0), 5), 2 + i);
        }
        // Nobody waiting: no reason to go higher.
        assert_eq!(c.step(0, Some(100_000.0), 0), 11);
        // Never above the bound.
        for _ in 0..100 {
            c.step(0, Some(100_000.0), 5);
        }
        assert_eq!(c.limit(), 32);
    }

    #[test]
    fn backs_off_multiplicatively_on_push_back_and_gently_on_latency() {
        let mut c = Controller::new(B);
        for _ in 0..19 {
            c.step(0, Some(100_000.0), 5);
        }
        assert_eq!(c.limit(), 20);
        assert_eq!(c.step(2, Some(100_000.0), 5), 14, "×0.7 on a 429");
        assert_eq!(c.step(0, Some(200_000.0), 5), 13, "TTFT 2× baseline: −1");
        assert_eq!(c.step(0, Some(140_000.0), 5), 14, "within tolerance: +1");
        for _ in 0..20 {
            c.step(1, None, 5);
        }
        assert_eq!(c.limit(), 1, "never below the bound");
    }

    #[test]
    fn the_baseline_follows_a_lasting_change_slowly() {
        let mut c = Controller::new(AdaptiveBounds { min: 4, max: 4 });
        c.step(0, Some(100_000.0), 0);
        // A slower model: at first every tick is "slow", then the
        // baseline catches up and it no longer is.
        let mut slow_ticks = 0;
        for _ in 0..200 {
            let before = c.baseline_us.unwrap();
            c.step(0, Some(300_000.0), 0);
            if 300_000.0 > before * TOLERANCE {
                slow_ticks += 1;
            }
        }
        assert!(slow_ticks > 10 && slow_ticks < 200, "{slow_ticks}");
    }
}
