use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::{Admission, Scheduler};
use crate::route::Router;

/// Puts [`Admission`] in front of a service.
///
/// Cloning this layer does not create a new scheduler: every service it
/// builds shares the ones it was given.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    schedulers: Arc<[Arc<Scheduler>]>,
    router: Option<Arc<Router>>,
    queue_timeout: Duration,
}

impl AdmissionLayer {
    /// Admit through `scheduler`; a request waits at most `queue_timeout`.
    pub fn new(scheduler: Arc<Scheduler>, queue_timeout: Duration) -> Self {
        Self {
            schedulers: Arc::from(vec![scheduler]),
            router: None,
            queue_timeout,
        }
    }

    /// Admit through the scheduler of the upstream each request is routed
    /// to (see [`route`](crate::route)); a request whose upstream is taken
    /// out of service while it waits is queued at another.
    pub fn routed(router: Arc<Router>, queue_timeout: Duration) -> Self {
        Self {
            schedulers: (0..router.len())
                .map(|i| router.scheduler(i).clone())
                .collect(),
            router: Some(router),
            queue_timeout,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission::per_upstream(
            inner,
            self.schedulers.clone(),
            self.router.clone(),
            self.queue_timeout,
        )
    }
}
