use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::future::{Reroute, ResponseFuture};
use super::passing::Passing;
use super::scheduler::Acquire;
use super::PermitBody;
use super::Schedulers;
use crate::types::Admit;
use crate::BoxError;

/// Admission control in front of `S`: see the [module docs](super).
#[derive(Clone, Debug)]
pub struct Admission<S> {
    inner: S,
    schedulers: Arc<dyn Schedulers>,
    passing: Option<Arc<Passing>>,
}

impl<S> Admission<S> {
    /// Admit in front of `inner` through the scheduler of the upstream each
    /// request is routed to; without `passing`, requests that are not
    /// admitted are not bounded.
    pub fn new(inner: S, schedulers: Arc<dyn Schedulers>, passing: Option<Arc<Passing>>) -> Self {
        Self {
            inner,
            schedulers,
            passing,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// A request that can stop sharing memory with its connection while it
/// waits in the queue.
///
/// hyper hands a request's header values, path and body out as slices of the
/// connection's 8 KiB read buffer, which then stays allocated for as long as
/// any of them lives, and hyper takes a second buffer for its next read. A
/// request that is about to wait copies out what it holds (a few hundred
/// bytes, once, off the hot path of requests that start at once), so a
/// waiting HTTP/1.1 connection keeps one buffer instead of two.
///
/// [`Admission`] requires it of the requests it serves; anteroom's classified
/// requests implement it (see `classify`).
pub trait Detach {
    /// Copy out of the connection's buffers whatever still points into them.
    fn detach(&mut self);
}

/// Requests whose bodies hold nothing of a connection (tests, examples):
/// nothing to detach. For a body of your own, an empty impl does too.
macro_rules! nothing_to_detach {
    ($($body:ty),*) => {
        $(impl Detach for Request<$body> {
            fn detach(&mut self) {}
        })*
    };
}
nothing_to_detach!((), String, http_body_util::Empty<bytes::Bytes>);

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Admission<S>
where
    Request<ReqBody>: Detach,
    ReqBody: super::preempt::Replay,
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
            // Not admitted: bounded only by `max_passthrough`.
            return match self.passing.as_ref().map(Passing::enter).transpose() {
                Ok(slot) => ResponseFuture::pass(inner, req, slot),
                Err(refused) => ResponseFuture::rejected(refused),
            };
        };
        let route = crate::types::route_of(&req);
        let acquired = self.schedulers.acquire(route, admit, &|| req.replayable());
        // What is left for the next, when the client is told (it costs a
        // lock, so only then).
        if let Some(tap) = req
            .extensions()
            .get::<crate::telemetry::Tap>()
            .filter(|t| t.wants_rate_headers())
        {
            if let Some(room) = self.schedulers.room(route, admit.priority) {
                tap.set_room(room);
            }
        }
        match acquired {
            Acquire::Admitted(permit) => {
                ResponseFuture::admitted(inner, req, permit, &self.schedulers)
            }
            Acquire::Queued(ticket) => {
                let listed = self.schedulers.waiting().and_then(|w| {
                    let id = req.extensions().get::<crate::types::RequestId>()?;
                    let tap = req.extensions().get::<crate::telemetry::Tap>();
                    Some(w.list(
                        bytes::Bytes::copy_from_slice(id.0.as_bytes()),
                        tap.and_then(|t| t.tenant()).cloned(),
                        &ticket,
                        tokio::time::Instant::now(),
                    ))
                });
                let mut req = req;
                req.detach();
                ResponseFuture::queued(inner, req, ticket, &self.schedulers, listed)
            }
            Acquire::Rejected(err) => ResponseFuture::rejected(err),
        }
    }
}
