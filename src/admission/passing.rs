//! The bound on requests that pass without admission (`max_passthrough`).
//!
//! A request anteroom does not admit (`GET /v1/models`, a backend's own
//! endpoints) goes straight to the upstream, each on a connection of its
//! own while it runs. Unbounded, clients that trickle such requests pin
//! as many backend connections as they like, and a backend that serves
//! each connection with a thread of a small pool (llama-server) has none
//! left for the generations anteroom admitted. So they are counted, from
//! the call to the end of the response body, like a slot; past the bound a
//! request is refused at once with 503 `passthrough_full` and a short
//! `Retry-After`, as Envoy's circuit breaker refuses a request past
//! `max_requests`: these requests are short, and a client that gets one
//! refused comes back in a second. Requests that are admitted never touch
//! it.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::types::{Overloaded, Reason};

/// Requests passing through now, across every worker, and their bound.
#[derive(Debug, Default)]
pub struct Passing {
    open: AtomicUsize,
    /// 0: no bound.
    max: AtomicUsize,
}

impl Passing {
    /// A bound of `max` requests at once (0: none).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// Change the bound (a reload); requests passing now finish.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Relaxed);
    }

    /// Requests passing through now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Let one more through, or refuse it.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<PassSlot, Overloaded> {
        let max = self.max.load(Relaxed);
        let before = self.open.fetch_add(1, Relaxed);
        if max > 0 && before >= max {
            self.open.fetch_sub(1, Relaxed);
            return Err(Overloaded::new(
                Reason::PassthroughFull,
                Duration::from_secs(1),
            ));
        }
        Ok(PassSlot(self.clone()))
    }
}

/// One request passing through; given back on drop (its response body
/// ended, failed or was dropped).
#[derive(Debug)]
pub struct PassSlot(Arc<Passing>);

impl Drop for PassSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_bound_a_request_is_refused_until_one_ends() {
        let gate = Passing::new(2);
        let a = gate.enter().unwrap();
        let _b = gate.enter().unwrap();
        let refused = gate.enter().unwrap_err();
        assert_eq!(refused.reason(), Reason::PassthroughFull);
        assert_eq!(gate.open(), 2);
        drop(a);
        let _c = gate.enter().unwrap();
        // A reload that lifts the bound lets more in at once.
        gate.set_max(0);
        let more: Vec<_> = (0..10).map(|_| gate.enter().unwrap()).collect();
        assert_eq!(gate.open(), 12);
        drop(more);
        assert_eq!(gate.open(), 2);
    }
}
