//! Why admission turned a request away.

use std::fmt;
use std::time::Duration;

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The queue was full of requests at least as urgent.
    QueueFull,
    /// The request waited `queue_timeout` without being dispatched.
    QueueTimeout,
    /// The request would not start, or did not, within its own deadline
    /// (`x-anteroom-deadline-ms`).
    Deadline,
    /// The request was queued, then pushed out by a more urgent one.
    Evicted,
    /// The proxy is shutting down (or the scheduler went away).
    Closed,
    /// Its upstream was taken out of service while it waited: it is to be
    /// queued at another (see [`route`](crate::route)).
    Rerouted,
    /// The request bodies anteroom holds already add up to
    /// `max_buffered_bytes`.
    BuffersFull,
    /// It was still waiting for its answer at the drain deadline.
    PastDrain,
    /// It was not to be admitted, and `max_passthrough` such requests were
    /// already passing through.
    PassthroughFull,
}

impl Reason {
    /// The stable label of this reason, used in error bodies and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Reason::QueueFull | Reason::Evicted => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::Deadline => "deadline_exceeded",
            Reason::Closed | Reason::PastDrain => "shutting_down",
            Reason::Rerouted => "no_healthy_upstream",
            Reason::BuffersFull => "buffers_full",
            Reason::PassthroughFull => "passthrough_full",
        }
    }
}

/// The request was not admitted; come back after `retry_after`.
#[derive(Clone, Debug)]
pub struct Overloaded {
    reason: Reason,
    retry_after: Duration,
}

impl Overloaded {
    /// Refused for `reason`; come back after `retry_after`.
    pub fn new(reason: Reason, retry_after: Duration) -> Self {
        Self {
            reason,
            retry_after,
        }
    }

    /// Why.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// When the request would likely be admitted, from the measured drain rate.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::QueueFull => f.write_str("the queue is full; retry after the advised delay"),
            Reason::QueueTimeout => {
                f.write_str("the request waited in the queue for the longest time allowed; retry after the advised delay")
            }
            Reason::Deadline => f.write_str(
                "the request could not start within its deadline (x-anteroom-deadline-ms); retry after the advised delay",
            ),
            Reason::Evicted => f.write_str(
                "the queue is full and this request was displaced by a more urgent one; retry after the advised delay",
            ),
            Reason::Closed => f.write_str(
                "the proxy is shutting down and cannot start this request in time; retry after the advised delay",
            ),
            Reason::Rerouted => f.write_str(
                "no healthy upstream serves this model; retry after the advised delay",
            ),
            Reason::PastDrain => f.write_str(
                "the proxy is shutting down and this request was still waiting for its answer at the drain deadline; retry the request",
            ),
            Reason::BuffersFull => f.write_str(
                "anteroom holds as many request bodies as max_buffered_bytes allows; retry after the advised delay",
            ),
            Reason::PassthroughFull => f.write_str(
                "as many requests as max_passthrough allows are passing through to the upstream; retry after the advised delay",
            ),
        }
    }
}

impl std::error::Error for Overloaded {}
