use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::{Admission, Scheduler};

/// Puts [`Admission`] in front of a service.
///
/// Cloning this layer does not create a new scheduler: every service it
/// builds shares the one it was given.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    scheduler: Arc<Scheduler>,
    queue_timeout: Duration,
}

impl AdmissionLayer {
    /// Admit through `scheduler`; a request waits at most `queue_timeout`.
    pub fn new(scheduler: Arc<Scheduler>, queue_timeout: Duration) -> Self {
        Self {
            scheduler,
            queue_timeout,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission::new(inner, self.scheduler.clone(), self.queue_timeout)
    }
}
