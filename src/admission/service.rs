use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::future::ResponseFuture;
use super::scheduler::{Acquire, Scheduler};
use super::PermitBody;
use crate::classify::Admit;
use crate::route::Router;
use crate::BoxError;

/// Admission control in front of `S`: see the [module docs](super).
#[derive(Clone, Debug)]
pub struct Admission<S> {
    inner: S,
    /// One per upstream; a request's [`Route`](crate::route::Route) picks.
    schedulers: Arc<[Arc<Scheduler>]>,
    /// Where to requeue a request whose upstream went out of service.
    router: Option<Arc<Router>>,
}

impl<S> Admission<S> {
    /// Admit through `scheduler` in front of `inner`.
    pub fn new(inner: S, scheduler: Arc<Scheduler>) -> Self {
        Self::per_upstream(inner, Arc::from(vec![scheduler]), None)
    }

    /// Admit through the scheduler of the upstream each request is routed
    /// to.
    pub fn per_upstream(
        inner: S,
        schedulers: Arc<[Arc<Scheduler>]>,
        router: Option<Arc<Router>>,
    ) -> Self {
        Self {
            inner,
            schedulers,
            router,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwrap the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Admission<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<PermitBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<ReqBody>>;

    /// Always ready: `poll_ready` cannot see the request's priority, so the
    /// waiting happens in the response future. The inner service's readiness
    /// is awaited there too, once the request holds a slot.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let inner = self.inner.clone();
        let Some(admit) = req.extensions().get::<Admit>() else {
            return ResponseFuture::pass(inner, req);
        };
        let scheduler = match &*self.schedulers {
            [one] => one,
            many => &many[crate::route::route_of(&req).min(many.len() - 1)],
        };
        match scheduler.acquire(admit.priority, &admit.share) {
            Acquire::Admitted(permit) => ResponseFuture::admitted(inner, req, permit),
            Acquire::Queued(ticket) => {
                ResponseFuture::queued(inner, req, ticket, self.router.clone())
            }
            Acquire::Rejected(err) => ResponseFuture::rejected(err),
        }
    }
}
