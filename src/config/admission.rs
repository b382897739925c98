//! The admission step's settings: each upstream's limit and queue, slots
//! kept for urgent work, preemption, and the adaptive limit's range.

use std::time::Duration;

use crate::types::Priority;

/// Settings of the admission step, the slice of the config it needs.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most requests in flight at the upstream.
    pub max_concurrency: usize,
    /// Most requests waiting.
    pub max_queue: usize,
    /// Most time a request may wait.
    pub queue_timeout: Duration,
    /// Ceiling of the advised retry delay.
    pub retry_after_cap: Duration,
    /// Slots kept for urgent work (see [`Reservation`]).
    pub reserved: Vec<Reservation>,
    /// Serve a request that waited this long before any other (anti-starvation).
    pub promote_after: Option<Duration>,
    /// Urgent requests may stop less urgent ones nobody has seen an answer
    /// of yet (see [`preempt`](crate::admission::preempt)); none: never.
    pub preempt: Option<Preemption>,
}

/// Who may preempt, and how often one request may be preempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preemption {
    /// The least urgent priority that may preempt.
    pub max_priority: Priority,
    /// Most times one request is preempted; after that it runs to its end.
    pub max_preemptions: u32,
}

/// `slots` of the limit only requests at `max_priority` or more urgent
/// (lower) may use. Levels nest: a request may use the slots of every
/// reservation whose `max_priority` it meets, and the unreserved rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// The least urgent priority that may use these slots.
    pub max_priority: Priority,
    /// How many.
    pub slots: usize,
}

/// The range the limit moves in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptiveBounds {
    /// Lowest limit.
    pub min: usize,
    /// Highest limit.
    pub max: usize,
}

/// An adaptive limit: its range, and whether it follows the backend's slots
/// (`"backend"`) or finds its own (`"auto"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adaptive {
    /// The range.
    pub bounds: AdaptiveBounds,
    /// `max_concurrency = "backend"`.
    pub follow_backend: bool,
}
