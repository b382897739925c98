use std::sync::Arc;

use tower::Layer;

use super::passing::Passing;
use super::service::Schedulers;
use super::{Admission, Scheduler};
use crate::route::Router;

/// Puts [`Admission`] in front of a service.
///
/// Cloning this layer does not create a new scheduler: every service it
/// builds shares the ones it was given.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    schedulers: Schedulers,
    passing: Option<Arc<Passing>>,
}

impl AdmissionLayer {
    /// Admit through `scheduler` (a request waits at most its
    /// `queue_timeout`).
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        Self {
            schedulers: Schedulers::One(scheduler),
            passing: None,
        }
    }

    /// Admit through the scheduler of the upstream each request is routed
    /// to (see [`route`](crate::route)); a request whose upstream is taken
    /// out of service while it waits is queued at another.
    pub fn routed(router: Arc<Router>) -> Self {
        Self {
            schedulers: Schedulers::Routed(router),
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
        Admission::with(inner, self.schedulers.clone(), self.passing.clone())
    }
}
