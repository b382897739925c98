use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::{Admission, Scheduler};

/// Puts [`Admission`] in front of a service.
///
/// Cloning this layer does not create a new scheduler: every service it
/// builds shares the ones it was given.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    schedulers: Arc<[Arc<Scheduler>]>,
    queue_timeout: Duration,
}

impl AdmissionLayer {
    /// Admit through `scheduler`; a request waits at most `queue_timeout`.
    pub fn new(scheduler: Arc<Scheduler>, queue_timeout: Duration) -> Self {
        Self::per_upstream(vec![scheduler], queue_timeout)
    }

    /// Admit through the scheduler of the upstream each request is routed
    /// to (see [`route`](crate::route)), one per upstream in config order.
    pub fn per_upstream(schedulers: Vec<Arc<Scheduler>>, queue_timeout: Duration) -> Self {
        assert!(!schedulers.is_empty(), "at least one scheduler");
        Self {
            schedulers: schedulers.into(),
            queue_timeout,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission::per_upstream(inner, self.schedulers.clone(), self.queue_timeout)
    }
}
