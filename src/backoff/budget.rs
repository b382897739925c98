//! A retry budget: retries may be at most a share of recent requests.
//!
//! Like finagle's and tower's `TpsBudget` (a deposit per request, a
//! withdrawal per retry, over a sliding window of a few seconds, plus a small
//! reserve so a quiet client can still retry), but lock-free: one slot per
//! second, each stamped with the second it counts, reset by whoever first
//! sees it stale. tower's version takes a mutex on every deposit; this one is
//! on every admitted request's path.
//!
//! Counting is approximate at a second's boundary (an increment racing the
//! reset may be lost): a budget, not a ledger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Seconds in the window.
const WINDOW: u64 = 10;
/// Retries always allowed per window, whatever the traffic.
pub const RESERVE: u64 = 10;

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct RetryBudget {
    share: f64,
    start: Instant,
    slots: [Slot; WINDOW as usize],
}

impl RetryBudget {
    /// Retries may be `share` of the requests of the last ten seconds (0.2:
    /// one retry per five requests), plus [`RESERVE`].
    pub fn new(share: f64) -> Self {
        Self {
            share: share.max(0.0),
            start: Instant::now(),
            slots: Default::default(),
        }
    }

    /// Seconds since start, plus one (so zero means "never used").
    fn now(&self) -> u64 {
        self.start.elapsed().as_secs() + 1
    }

    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % WINDOW) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.deposits.store(0, Ordering::Release);
            slot.withdrawals.store(0, Ordering::Release);
        }
        slot
    }

    /// A request was sent.
    pub fn deposit(&self) {
        self.slot(self.now())
            .deposits
            .fetch_add(1, Ordering::AcqRel);
    }

    /// May a retry be sent? Counts it if so.
    pub(crate) fn withdraw(&self) -> bool {
        let now = self.now();
        let (mut deposits, mut withdrawals) = (0, 0);
        for slot in &self.slots {
            let second = slot.second.load(Ordering::Acquire);
            if second != 0 && second + WINDOW > now {
                deposits += slot.deposits.load(Ordering::Acquire);
                withdrawals += slot.withdrawals.load(Ordering::Acquire);
            }
        }
        let allowed = RESERVE + (self.share * deposits as f64) as u64;
        if withdrawals < allowed {
            self.slot(now).withdrawals.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// The window the budget looks back over.
    pub fn window() -> Duration {
        Duration::from_secs(WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_recent_requests_plus_a_reserve() {
        let b = RetryBudget::new(0.2);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..1000).filter(|_| b.withdraw()).count() as u64;
        assert_eq!(granted, RESERVE + 20);
        // Ten seconds later the old requests no longer count: only the
        // reserve again.
        tokio::time::advance(Duration::from_secs(11)).await;
        let granted = (0..1000).filter(|_| b.withdraw()).count() as u64;
        assert_eq!(granted, RESERVE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_share_leaves_the_reserve() {
        let b = RetryBudget::new(0.0);
        for _ in 0..1000 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.withdraw()).count() as u64, RESERVE);
    }
}
