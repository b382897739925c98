//! The mark of a request that goes through admission.

use super::{Priority, Share};

/// Marks a request for admission, at this priority, for this tenant. Set
/// by [`Classify`](crate::classify::Classify), read by [`Admission`](crate::admission::Admission).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admit {
    /// Where it queues.
    pub priority: Priority,
    /// Whose share of the slots it uses.
    pub share: Share,
    /// The client asked for a stream (its answer reaches it token by
    /// token, so it cannot be preempted once it answered).
    pub stream: bool,
    /// The most it may wait in the queue, its own (`x-anteroom-deadline-ms`):
    /// within its priority the nearest deadline goes first.
    pub deadline: Option<std::time::Duration>,
    /// A stream that asked for keep-alive comments while it waits
    /// (`x-anteroom-queue-keepalive`, with `queue_keepalive` set).
    pub keepalive: bool,
}

impl Admit {
    /// At `priority`, for the default tenant, not streamed.
    pub fn new(priority: Priority) -> Self {
        Self {
            priority,
            share: Share::default(),
            stream: false,
            deadline: None,
            keepalive: false,
        }
    }
}
