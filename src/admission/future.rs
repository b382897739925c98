//! The admission response future: wait for a slot, then drive the inner call.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower::Service;

use std::sync::Arc;

use super::passing::PassSlot;
use super::scheduler::{Acquire, Ticket};
use super::Reason;
use super::{Overloaded, Permit, PermitBody};
use crate::classify::{Admit, Model};
use crate::route::{Route, Router};
use crate::BoxError;

pin_project! {
    /// Response future of [`Admission`](super::Admission).
    pub struct ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, R>
    where
        S: Service<R>,
    {
        Waiting {
            ticket: Ticket,
            #[pin]
            deadline: Sleep,
            pending: Option<(S, R)>,
            // False once the deadline fired but the ticket had already been
            // dispatched: its grant is on its way, keep waiting for it.
            timed: bool,
            // Where to queue again if its upstream goes out of service.
            router: Option<Arc<Router>>,
        },
        Running {
            #[pin]
            fut: Oneshot<S, R>,
            permit: Option<Permit>,
        },
        Passing {
            #[pin]
            fut: Oneshot<S, R>,
            passing: Option<PassSlot>,
        },
        Rejected {
            err: Option<Overloaded>,
        },
    }
}

impl<S, R> ResponseFuture<S, R>
where
    S: Service<R>,
{
    pub(crate) fn pass(svc: S, req: R, passing: Option<PassSlot>) -> Self {
        Self {
            state: State::Passing {
                fut: Oneshot::new(svc, req),
                passing,
            },
        }
    }

    pub(crate) fn admitted(svc: S, req: R, permit: Permit) -> Self {
        Self {
            state: State::Running {
                fut: Oneshot::new(svc, req),
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn queued(svc: S, req: R, ticket: Ticket, router: Option<Arc<Router>>) -> Self {
        let deadline = Instant::now() + ticket.timeout();
        Self::waiting(svc, req, ticket, deadline, router)
    }

    fn waiting(
        svc: S,
        req: R,
        ticket: Ticket,
        deadline: Instant,
        router: Option<Arc<Router>>,
    ) -> Self {
        Self {
            state: State::Waiting {
                ticket,
                deadline: tokio::time::sleep_until(deadline),
                pending: Some((svc, req)),
                timed: true,
                router,
            },
        }
    }

    pub(crate) fn rejected(err: Overloaded) -> Self {
        Self {
            state: State::Rejected { err: Some(err) },
        }
    }
}

impl<S, R, B> Future for ResponseFuture<S, R>
where
    S: Service<R, Response = Response<B>>,
    S::Error: Into<BoxError>,
    R: Reroute,
{
    type Output = Result<Response<PermitBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting {
                    ticket,
                    deadline,
                    pending,
                    timed,
                    router,
                } => {
                    let grant = match ticket.poll_grant(cx) {
                        Poll::Ready(grant) => grant,
                        Poll::Pending => {
                            if *timed && deadline.poll(cx).is_ready() {
                                match ticket.expire() {
                                    Some(err) => return Poll::Ready(Err(err.into())),
                                    None => *timed = false,
                                }
                            }
                            return Poll::Pending;
                        }
                    };
                    let permit = match (grant, router.take()) {
                        (Ok(permit), _) => permit,
                        (Err(e), Some(router)) if e.reason() == Reason::Rerouted => {
                            // Its upstream went out of service: queue at
                            // another, with the same priority and deadline.
                            let (svc, req) = pending.take().expect("polled after completion");
                            let next = requeue(svc, req, router, deadline.deadline());
                            match next {
                                Ok(next) => {
                                    this.state.set(next.state);
                                    continue;
                                }
                                Err(e) => return Poll::Ready(Err(e)),
                            }
                        }
                        (Err(e), _) => return Poll::Ready(Err(e.into())),
                    };
                    let (svc, req) = pending.take().expect("polled after completion");
                    this.state.set(State::Running {
                        fut: Oneshot::new(svc, req),
                        permit: Some(permit),
                    });
                }
                StateProj::Running { fut, permit } => {
                    // An error drops the permit with this future: the slot
                    // comes back at once.
                    let resp = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let permit = permit.take();
                    return Poll::Ready(Ok(resp.map(|body| PermitBody::new(body, permit))));
                }
                StateProj::Passing { fut, passing } => {
                    let resp = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let passing = passing.take();
                    return Poll::Ready(Ok(resp.map(|body| PermitBody::passing(body, passing))));
                }
                StateProj::Rejected { err } => {
                    let err = err.take().expect("polled after completion");
                    return Poll::Ready(Err(err.into()));
                }
            }
        }
    }
}

/// What admission needs of a request to queue it at another upstream.
pub trait Reroute {
    /// Its priority and tenant, if it is admitted.
    fn admit(&self) -> Option<&Admit>;
    /// The upstream it is routed to.
    fn route(&self) -> usize;
    /// Its `model`, if known.
    fn model(&self) -> Option<&str>;
    /// Route it to upstream `i`.
    fn set_route(&mut self, i: usize);
}

impl<B> Reroute for http::Request<B> {
    fn admit(&self) -> Option<&Admit> {
        self.extensions().get::<Admit>()
    }

    fn route(&self) -> usize {
        crate::route::route_of(self)
    }

    fn model(&self) -> Option<&str> {
        self.extensions().get::<Model>().map(Model::as_str)
    }

    fn set_route(&mut self, i: usize) {
        self.extensions_mut().insert(Route(i));
    }
}

/// Queue `req` at another upstream than the one that went out of service.
fn requeue<S, R>(
    svc: S,
    mut req: R,
    router: Arc<Router>,
    deadline: Instant,
) -> Result<ResponseFuture<S, R>, BoxError>
where
    S: Service<R>,
    R: Reroute,
{
    let admit = req.admit().cloned().unwrap_or_else(|| Admit::new(0));
    let i = router.pick(req.model(), Some(req.route()))?;
    req.set_route(i);
    Ok(match router.acquire(i, admit.priority, &admit.share) {
        Acquire::Admitted(permit) => ResponseFuture::admitted(svc, req, permit),
        Acquire::Queued(ticket) => {
            ResponseFuture::waiting(svc, req, ticket, deadline, Some(router))
        }
        Acquire::Rejected(err) => ResponseFuture::rejected(err),
    })
}

impl<S, R> std::fmt::Debug for ResponseFuture<S, R>
where
    S: Service<R>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
