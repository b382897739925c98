//! What the adaptive limit listens to: push-back, times to first token,
//! waits inside the backend, completed work. The request path feeds these
//! with atomic adds (no lock); the controller takes them at each tick (see
//! [`admission::adaptive`](crate::admission::adaptive)).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the controller listens to, fed from the request path with atomic
/// adds (no lock).
#[derive(Debug, Default)]
pub struct Signals {
    overloads: AtomicU64,
    ttft_sum_us: AtomicU64,
    ttft_count: AtomicU64,
    wait_sum_us: AtomicU64,
    prompt_sum_us: AtomicU64,
    wait_count: AtomicU64,
    completed: AtomicU64,
    work: AtomicU64,
}

/// What happened since the last tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Taken {
    /// Push-backs from the upstream.
    pub overloads: u64,
    /// Times to first token measured (prefill where reported): their sum
    /// in microseconds, and how many.
    pub ttft_sum_us: u64,
    /// How many times to first token were measured.
    pub ttft_n: u64,
    /// Mean time waited inside the backend and mean prefill time, where
    /// the backend reports its timings, microseconds.
    pub backend_wait_us: Option<(f64, f64)>,
    /// Admitted requests that completed.
    pub completed: u64,
    /// Their work: output tokens plus one per request.
    pub work: u64,
}

/// `d` in whole microseconds, bounded so that sums of many cannot overflow.
pub(crate) fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX >> 8)) as u64
}

impl Signals {
    /// The upstream pushed back: 429/503, a time-out, a stalled stream.
    pub(crate) fn overload(&self) {
        self.overloads.fetch_add(1, Ordering::Relaxed);
    }

    /// A time to first token was measured: the backend's prefill time where
    /// it reports one, else dispatch → first token.
    pub fn ttft(&self, d: Duration) {
        self.ttft_sum_us.fetch_add(micros(d), Ordering::Relaxed);
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
    }

    /// The backend reported its timings: `waited` inside it before
    /// `prefill` began.
    pub(crate) fn backend_wait(&self, waited: Duration, prefill: Duration) {
        self.wait_sum_us
            .fetch_add(micros(waited), Ordering::Relaxed);
        self.prompt_sum_us
            .fetch_add(micros(prefill), Ordering::Relaxed);
        self.wait_count.fetch_add(1, Ordering::Relaxed);
    }

    /// An admitted request completed with `tokens` output tokens.
    pub fn completed(&self, tokens: u64) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.work
            .fetch_add(tokens.saturating_add(1), Ordering::Relaxed);
    }

    /// Everything since the last call.
    pub fn take(&self) -> Taken {
        let mean = |sum: &AtomicU64, n: u64| sum.swap(0, Ordering::Relaxed) as f64 / n as f64;
        let w = self.wait_count.swap(0, Ordering::Relaxed);
        let backend_wait_us =
            (w > 0).then(|| (mean(&self.wait_sum_us, w), mean(&self.prompt_sum_us, w)));
        Taken {
            overloads: self.overloads.swap(0, Ordering::Relaxed),
            ttft_sum_us: self.ttft_sum_us.swap(0, Ordering::Relaxed),
            ttft_n: self.ttft_count.swap(0, Ordering::Relaxed),
            backend_wait_us,
            completed: self.completed.swap(0, Ordering::Relaxed),
            work: self.work.swap(0, Ordering::Relaxed),
        }
    }
}
