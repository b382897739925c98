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
use super::preempt::Replay;
use super::scheduler::{Acquire, Replayable, Ticket};
use super::Schedulers;
use super::{Permit, PermitBody};
use crate::types::{Admit, Model, Overloaded, Reason, Route};
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
            router: Arc<dyn Schedulers>,
            // Times it was preempted so far.
            preemptions: u32,
            // Its entry for `GET /status/requests/{id}`, while it waits.
            listed: Option<super::listed::Listed>,
        },
        Running {
            #[pin]
            fut: Oneshot<S, R>,
            permit: Option<Permit>,
            // While it may be preempted: what it takes to go again.
            again: Option<Box<Again<S, R>>>,
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

/// What a preemptible request keeps while it runs, to queue and go again.
struct Again<S, R> {
    svc: S,
    req: R,
    /// Queue time it has left; `None`: all of it (it never waited).
    left: Option<std::time::Duration>,
    router: Arc<dyn Schedulers>,
}

impl<S, R> ResponseFuture<S, R>
where
    S: Service<R> + Clone,
    R: Reroute,
{
    pub(crate) fn pass(svc: S, req: R, passing: Option<PassSlot>) -> Self {
        Self {
            state: State::Passing {
                fut: Oneshot::new(svc, req),
                passing,
            },
        }
    }

    pub(crate) fn admitted(svc: S, req: R, permit: Permit, router: &Arc<dyn Schedulers>) -> Self {
        Self {
            state: State::running(svc, req, permit, None, router),
        }
    }

    pub(crate) fn queued(
        svc: S,
        req: R,
        ticket: Ticket,
        router: &Arc<dyn Schedulers>,
        listed: Option<super::listed::Listed>,
    ) -> Self {
        let deadline = Instant::now() + ticket.timeout();
        Self {
            state: State::waiting(svc, req, ticket, deadline, router.clone(), 0, listed),
        }
    }

    pub(crate) fn rejected(err: Overloaded) -> Self {
        Self {
            state: State::Rejected { err: Some(err) },
        }
    }
}

impl<S, R> State<S, R>
where
    S: Service<R>,
    R: Reroute,
{
    /// Run `req` in `permit`'s slot; a preemptible one keeps a copy to go
    /// again (the only cost preemption adds, and only when it is on).
    fn running(
        svc: S,
        req: R,
        permit: Permit,
        left: Option<std::time::Duration>,
        router: &Arc<dyn Schedulers>,
    ) -> Self
    where
        S: Clone,
    {
        let copy = match permit.is_preemptible() {
            true => req.replay(),
            false => None,
        };
        match copy {
            Some(copy) => State::Running {
                fut: Oneshot::new(svc.clone(), copy),
                permit: Some(permit),
                again: Some(Box::new(Again {
                    svc,
                    req,
                    left,
                    router: router.clone(),
                })),
            },
            None => {
                let mut permit = permit;
                if permit.is_preemptible() {
                    // No copy to go again with (a body that cannot be
                    // replayed): it must not be chosen, as it could not
                    // give its slot back.
                    drop(permit.answered());
                }
                State::Running {
                    fut: Oneshot::new(svc, req),
                    permit: Some(permit),
                    again: None,
                }
            }
        }
    }

    /// Preempted: stop the attempt (dropping it closes the upstream
    /// call) and wait at the new place, with the queue time that was left.
    fn preempted(again: Again<S, R>, ticket: Ticket, started: Instant, preemptions: u32) -> Self {
        let Again {
            svc,
            req,
            left,
            router,
        } = again;
        req.preempted(started.elapsed());
        let deadline = Instant::now() + left.unwrap_or_else(|| ticket.timeout());
        State::waiting(svc, req, ticket, deadline, router, preemptions, None)
    }

    fn waiting(
        svc: S,
        req: R,
        ticket: Ticket,
        deadline: Instant,
        router: Arc<dyn Schedulers>,
        preemptions: u32,
        listed: Option<super::listed::Listed>,
    ) -> Self {
        req.mark_queued(true);
        State::Waiting {
            ticket,
            deadline: tokio::time::sleep_until(deadline),
            pending: Some((svc, req)),
            timed: true,
            router,
            preemptions,
            listed,
        }
    }
}

impl<S, R, B> Future for ResponseFuture<S, R>
where
    S: Service<R, Response = Response<B>> + Clone,
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
                    preemptions,
                    listed,
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
                    let permit = match grant {
                        Ok(permit) => permit,
                        Err(e) if e.reason() == Reason::Rerouted => {
                            // Its upstream went out of service: queue at
                            // another, with the same priority and deadline.
                            let (svc, req) = pending.take().expect("polled after completion");
                            let next = requeue(
                                svc,
                                req,
                                router,
                                deadline.deadline(),
                                *preemptions,
                                listed.take(),
                            );
                            match next {
                                Ok(next) => {
                                    this.state.set(next.state);
                                    continue;
                                }
                                Err(e) => return Poll::Ready(Err(e)),
                            }
                        }
                        Err(e) => return Poll::Ready(Err(e.into())),
                    };
                    let (svc, req) = pending.take().expect("polled after completion");
                    req.mark_queued(false);
                    let left = deadline
                        .deadline()
                        .saturating_duration_since(Instant::now());
                    let next = State::running(svc, req, permit, Some(left), router);
                    this.state.set(next);
                }
                StateProj::Running { fut, permit, again } => {
                    if let Some(p) = permit.as_mut() {
                        // A slot taken from a preempted request: only once
                        // that one has dropped its upstream call.
                        ready!(p.poll_handover(cx));
                        if again.is_some() {
                            if let Poll::Ready(stop) = p.poll_preempted(cx) {
                                let (started, n) = (p.started(), p.preemptions() + 1);
                                let again = again.take().expect("checked above");
                                this.state
                                    .set(State::preempted(*again, stop.ticket, started, n));
                                // Its upstream call is gone with the old state.
                                drop(stop.handed);
                                continue;
                            }
                        }
                    }
                    // An error drops the permit with this future: the slot
                    // comes back at once.
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    if let Some(again) = again.take() {
                        // Answered: from here its bytes may reach the
                        // client, so it may no longer be preempted, unless
                        // it was a moment ago (then this answer goes).
                        if let Some(p) = permit.as_mut() {
                            let (started, n) = (p.started(), p.preemptions() + 1);
                            if let Some(stop) = p.answered() {
                                drop(result);
                                this.state
                                    .set(State::preempted(*again, stop.ticket, started, n));
                                drop(stop.handed);
                                continue;
                            }
                        }
                    }
                    let resp = result?;
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

/// What admission needs of a request to queue it at another upstream, or
/// to send it again after it was preempted.
pub trait Reroute: Sized {
    /// Its priority and tenant, if it is admitted.
    fn admit(&self) -> Option<&Admit>;
    /// The upstream it is routed to.
    fn route(&self) -> usize;
    /// Its `model`, if known.
    fn model(&self) -> Option<&str>;
    /// Route it to upstream `i`.
    fn set_route(&mut self, i: usize);
    /// What preemption needs to know of it, if its body can be sent again.
    fn replayable(&self) -> Option<Replayable>;
    /// A copy to send (its body is held whole), if it can be.
    fn replay(&self) -> Option<Self>;
    /// It was preempted after running `wasted` at the backend.
    fn preempted(&self, wasted: std::time::Duration);
    /// It waits in the queue now (`true`) or holds a slot (`false`): for
    /// `queue_keepalive`, when it asked for comments.
    fn mark_queued(&self, queued: bool) {
        let _ = queued;
    }
}

impl<B: Replay> Reroute for http::Request<B> {
    fn admit(&self) -> Option<&Admit> {
        self.extensions().get::<Admit>()
    }

    fn route(&self) -> usize {
        crate::types::route_of(self)
    }

    fn model(&self) -> Option<&str> {
        self.extensions().get::<Model>().map(Model::as_str)
    }

    fn set_route(&mut self, i: usize) {
        self.extensions_mut().insert(Route(i));
    }

    fn replayable(&self) -> Option<Replayable> {
        let admit = self.admit()?;
        self.body().can_replay().then_some(Replayable {
            preemptions: 0,
            stream: admit.stream,
        })
    }

    fn replay(&self) -> Option<Self> {
        super::preempt::copy(self)
    }

    fn preempted(&self, wasted: std::time::Duration) {
        if let Some(tap) = self.extensions().get::<crate::telemetry::Tap>() {
            tap.preempted(wasted);
        }
    }

    fn mark_queued(&self, queued: bool) {
        if self.admit().is_some_and(|a| a.keepalive) {
            if let Some(q) = self.extensions().get::<crate::keepalive::Queued>() {
                q.set(queued);
            }
        }
    }
}

/// Queue `req` at another upstream than the one that went out of service.
fn requeue<S, R>(
    svc: S,
    mut req: R,
    router: &Arc<dyn Schedulers>,
    deadline: Instant,
    preemptions: u32,
    listed: Option<super::listed::Listed>,
) -> Result<ResponseFuture<S, R>, BoxError>
where
    S: Service<R> + Clone,
    R: Reroute,
{
    let mut admit = req.admit().cloned().unwrap_or_else(|| Admit::new(0));
    // What is left of its own deadline, if it had one.
    admit.deadline = admit
        .deadline
        .map(|_| deadline.saturating_duration_since(Instant::now()));
    let i = router.reroute(req.model(), req.route())?;
    req.set_route(i);
    let replay = || req.replayable().map(|r| Replayable { preemptions, ..r });
    Ok(match router.acquire(i, &admit, &replay) {
        Acquire::Admitted(permit) => {
            req.mark_queued(false);
            let left = deadline.saturating_duration_since(Instant::now());
            ResponseFuture {
                state: State::running(svc, req, permit, Some(left), router),
            }
        }
        Acquire::Queued(ticket) => {
            if let Some(l) = &listed {
                l.moved(&ticket);
            }
            ResponseFuture {
                state: State::waiting(
                    svc,
                    req,
                    ticket,
                    deadline,
                    router.clone(),
                    preemptions,
                    listed,
                ),
            }
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
