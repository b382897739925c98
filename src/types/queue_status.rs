//! What `/status` and the metrics report of a scheduler: its queue, its
//! running requests, its reservations, tenants and preemptions.

use std::collections::BTreeMap;

use super::Priority;

/// A scheduler's state, for `/status` and the metrics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueStatus {
    /// Requests waiting.
    pub waiting: usize,
    /// Requests in flight at the upstream.
    pub running: usize,
    /// The current limit.
    pub max_concurrency: usize,
    /// The queue's bound.
    pub max_queue: usize,
    /// Requests completed since start.
    pub completed: u64,
    /// The turn time a slot takes (the mean of the last 64 hold times
    /// without their top and bottom tenth), in milliseconds, once measured.
    pub service_time_ms: Option<f64>,
    /// Waiting requests by priority.
    pub waiting_by_priority: BTreeMap<Priority, usize>,
    /// Running requests by priority.
    pub running_by_priority: BTreeMap<Priority, usize>,
    /// Reserved slots, most urgent level first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<ReservationStatus>,
    /// Tenants with requests waiting or running, most waiting first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<TenantStatus>,
    /// With preemption on: requests preempted so far, by their priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preempted: Option<BTreeMap<Priority, PreemptedCounts>>,
}

impl QueueStatus {
    /// Add another scheduler's state to this one (several upstreams).
    pub fn merge(&mut self, other: &QueueStatus) {
        self.waiting += other.waiting;
        self.running += other.running;
        self.max_concurrency += other.max_concurrency;
        self.max_queue += other.max_queue;
        self.completed += other.completed;
        self.service_time_ms = match (self.service_time_ms, other.service_time_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for (p, n) in &other.waiting_by_priority {
            *self.waiting_by_priority.entry(*p).or_default() += n;
        }
        for (p, n) in &other.running_by_priority {
            *self.running_by_priority.entry(*p).or_default() += n;
        }
        self.reservations.extend(other.reservations.iter().cloned());
        for t in &other.tenants {
            match self.tenants.iter_mut().find(|m| m.name == t.name) {
                Some(m) => {
                    m.waiting += t.waiting;
                    m.running += t.running;
                }
                None => self.tenants.push(t.clone()),
            }
        }
        self.tenants
            .sort_by(|a, b| b.waiting.cmp(&a.waiting).then(a.name.cmp(&b.name)));
        if let Some(other) = &other.preempted {
            let mine = self.preempted.get_or_insert_with(BTreeMap::new);
            for (p, c) in other {
                let m = mine.entry(*p).or_default();
                m.preemptions += c.preemptions;
                m.wasted_seconds += c.wasted_seconds;
            }
        }
    }
}

/// One tenant in /status.
#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct TenantStatus {
    /// Its name.
    pub name: String,
    /// Its requests waiting.
    pub waiting: usize,
    /// Its requests in flight.
    pub running: usize,
    /// Its weight.
    pub weight: u32,
    /// Its cap of requests in flight, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<usize>,
}

/// A reservation's state, for /status and metrics.
#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct ReservationStatus {
    /// The least urgent priority that may use it.
    pub max_priority: Priority,
    /// Its slots.
    pub slots: usize,
    /// Running requests at `max_priority` or more urgent.
    pub used: usize,
    /// How many more requests at `max_priority` could start now.
    pub free: usize,
}

/// Preemptions so far, for /status.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, PartialEq)]
pub struct PreemptedCounts {
    /// Requests preempted (each time counts).
    pub preemptions: u64,
    /// Backend time they had run, thrown away, in seconds.
    pub wasted_seconds: f64,
}
