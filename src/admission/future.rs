//! The admission response future: wait for a slot, then drive the inner call.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower::Service;

use super::scheduler::Ticket;
use super::{Overloaded, Permit, PermitBody};
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
        },
        Running {
            #[pin]
            fut: Oneshot<S, R>,
            permit: Option<Permit>,
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
    pub(crate) fn pass(svc: S, req: R) -> Self {
        Self::running(svc, req, None)
    }

    pub(crate) fn admitted(svc: S, req: R, permit: Permit) -> Self {
        Self::running(svc, req, Some(permit))
    }

    fn running(svc: S, req: R, permit: Option<Permit>) -> Self {
        Self {
            state: State::Running {
                fut: Oneshot::new(svc, req),
                permit,
            },
        }
    }

    pub(crate) fn queued(svc: S, req: R, ticket: Ticket, timeout: Duration) -> Self {
        Self {
            state: State::Waiting {
                ticket,
                deadline: tokio::time::sleep_until(Instant::now() + timeout),
                pending: Some((svc, req)),
                timed: true,
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
                    let permit = grant?;
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
                StateProj::Rejected { err } => {
                    let err = err.take().expect("polled after completion");
                    return Poll::Ready(Err(err.into()));
                }
            }
        }
    }
}

impl<S, R> std::fmt::Debug for ResponseFuture<S, R>
where
    S: Service<R>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
