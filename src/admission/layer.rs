use std::sync::Arc;

use tower::Layer;

use super::passing::Passing;
use super::{Admission, Schedulers};

/// Puts [`Admission`] in front of a service.
///
/// Cloning this layer does not create a new scheduler: every service it
/// builds shares the ones it was given.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    schedulers: Arc<dyn Schedulers>,
    passing: Option<Arc<Passing>>,
}

impl AdmissionLayer {
    /// Admit through the scheduler of the upstream each request is routed
    /// to (see [`route`](crate::route)); a request whose upstream is taken
    /// out of service while it waits is queued at another. A request waits
    /// at most its scheduler's `queue_timeout`.
    pub fn new(schedulers: Arc<dyn Schedulers>) -> Self {
        Self {
            schedulers,
            passing: None,
        }
    }

    /// Bound the requests that pass without admission by `passing` (see
    /// [`passing`](super::passing)); without it they are not bounded.
    pub fn passing(mut self, passing: Arc<Passing>) -> Self {
        self.passing = Some(passing);
        self
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission::new(inner, self.schedulers.clone(), self.passing.clone())
    }
}
