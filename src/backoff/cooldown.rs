//! The upstream's "come back later", shared by every request.
//!
//! When the upstream answers 429/503 it speaks for all requests, not just the
//! one that got the answer: the upstream is paused until the advised time,
//! and every request about to be dispatched waits for it (holding its place
//! in line) instead of each discovering the 429 on its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// See the [module docs](self).
#[derive(Debug)]
pub struct Cooldown {
    base: Instant,
    /// Nanoseconds after `base` until which the upstream is paused.
    until: AtomicU64,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            until: AtomicU64::new(0),
        }
    }
}

impl Cooldown {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos().min(u128::from(u64::MAX / 2)) as u64
    }

    /// Pause the upstream for `d` from now (a longer pause already set
    /// stands).
    pub fn pause(&self, d: Duration) {
        let until = self.now() + d.as_nanos().min(u128::from(u64::MAX / 4)) as u64;
        self.until.fetch_max(until, Ordering::AcqRel);
    }

    /// How long the pause still lasts, if it does.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let until = self.until.load(Ordering::Acquire);
        let now = self.now();
        (until > now).then(|| Duration::from_nanos(until - now))
    }
}
