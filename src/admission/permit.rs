//! The slot a running request holds, and the body that carries it.
//!
//! tower's `ConcurrencyLimit` releases its permit when the response future
//! resolves, that is when the *headers* arrive. A streamed generation runs for
//! seconds to minutes after that, so here the permit moves into the response
//! body (as tower-http's `InFlightRequests` moves its guard) and is released
//! when the body ends, fails, or is dropped because the client went away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use tokio::sync::oneshot;

use super::scheduler::{Scheduler, Ticket};
use crate::types::{Priority, TenantId};

/// One slot at the upstream. Dropping it frees the slot and hands it to the
/// most urgent waiter.
#[derive(Debug)]
pub struct Permit {
    scheduler: Option<Arc<Scheduler>>,
    priority: Priority,
    /// Where the scheduler keeps its start time.
    slot: u32,
    tenant: TenantId,
    started: Instant,
    /// Only with preemption on (boxed: a permit travels inside the
    /// response body, which is moved layer by layer; without preemption it
    /// stays as small as it was).
    preempt: Option<Box<Preemption>>,
}

/// A permit's part in preemption (see [`preempt`](super::preempt)).
#[derive(Debug, Default)]
struct Preemption {
    /// Set while it may be preempted.
    victim: Option<Victim>,
    /// Times its request was preempted before this run.
    preemptions: u32,
    /// Its slot was taken from a preempted request: resolves once that
    /// request dropped its upstream call, so the backend is asked to stop
    /// that one before it is sent this one.
    handover: Option<oneshot::Receiver<()>>,
}

/// What a preempted request is sent: its new place in the queue, and the
/// signal (dropped once its upstream call was) the request that took its
/// slot waits for.
#[derive(Debug)]
pub(crate) struct Preempted {
    pub(crate) ticket: Ticket,
    pub(crate) handed: oneshot::Sender<()>,
}

/// A preemptible permit's side of its candidacy.
#[derive(Debug)]
struct Victim {
    /// Its entry among the scheduler's candidates.
    run: u64,
    /// Its new place in the queue arrives here if it is preempted; closed
    /// once it answered.
    rx: Option<oneshot::Receiver<Preempted>>,
}

impl Permit {
    pub(crate) fn new(
        scheduler: Arc<Scheduler>,
        priority: Priority,
        tenant: TenantId,
        slot: u32,
        started: Instant,
    ) -> Self {
        Self {
            scheduler: Some(scheduler),
            priority,
            slot,
            tenant,
            started,
            preempt: None,
        }
    }

    /// When the request was dispatched.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Where the scheduler keeps its start time.
    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    /// The priority it runs at.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Make it a preemption candidate (the scheduler did, as `run`).
    pub(crate) fn preemptible(&mut self, run: u64, rx: oneshot::Receiver<Preempted>) {
        self.preemption().victim = Some(Victim { run, rx: Some(rx) });
    }

    /// Note how often its request was preempted before.
    pub(crate) fn set_preemptions(&mut self, n: u32) {
        self.preemption().preemptions = n;
    }

    /// Wait for the request it took the slot from to have dropped its
    /// upstream call.
    pub(crate) fn handed_over(&mut self, rx: oneshot::Receiver<()>) {
        self.preemption().handover = Some(rx);
    }

    /// Ready once its slot is its own to use (at once, unless it was taken
    /// from a preempted request that has not stopped yet).
    pub(crate) fn poll_handover(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use std::future::Future;
        if let Some(p) = &mut self.preempt {
            if let Some(rx) = &mut p.handover {
                // Sent or dropped: either way the other request is done.
                std::task::ready!(Pin::new(rx).poll(cx)).ok();
                p.handover = None;
            }
        }
        Poll::Ready(())
    }

    /// Whether it may still be preempted: its request must be kept to be
    /// sent again.
    pub(crate) fn is_preemptible(&self) -> bool {
        self.victim().is_some_and(|v| v.rx.is_some())
    }

    /// Times its request was preempted before this run.
    pub fn preemptions(&self) -> u32 {
        self.preempt.as_ref().map_or(0, |p| p.preemptions)
    }

    /// Its entry among the scheduler's candidates, if it was one.
    pub(crate) fn run(&self) -> Option<u64> {
        self.victim().map(|v| v.run)
    }

    /// Ready with its request's new place once it was preempted: its slot
    /// went to a more urgent request, and dropping the permit then frees
    /// nothing.
    pub(crate) fn poll_preempted(&mut self, cx: &mut Context<'_>) -> Poll<Preempted> {
        use std::future::Future;
        let Some(rx) = self.victim_mut().and_then(|v| v.rx.as_mut()) else {
            return Poll::Pending;
        };
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(p)) => Poll::Ready(self.revoked(p)),
            Poll::Ready(Err(_)) => {
                // No longer a candidate (preemption was turned off).
                if let Some(v) = self.victim_mut() {
                    v.rx = None;
                }
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Its request answered: from now on it cannot be preempted. `Some`
    /// with the new place if it was preempted first (the answer must then
    /// be thrown away).
    pub(crate) fn answered(&mut self) -> Option<Preempted> {
        let mut rx = self.victim_mut()?.rx.take()?;
        // After `close`, a place sent before it is still there to take.
        rx.close();
        let p = rx.try_recv().ok()?;
        Some(self.revoked(p))
    }

    fn revoked(&mut self, p: Preempted) -> Preempted {
        // The scheduler already counted the slot as freed.
        self.scheduler = None;
        if let Some(v) = self.victim_mut() {
            v.rx = None;
        }
        p
    }

    fn preemption(&mut self) -> &mut Preemption {
        self.preempt.get_or_insert_with(Box::default)
    }

    fn victim(&self) -> Option<&Victim> {
        self.preempt.as_ref()?.victim.as_ref()
    }

    fn victim_mut(&mut self) -> Option<&mut Victim> {
        self.preempt.as_mut()?.victim.as_mut()
    }

    /// Forget the slot without releasing it: the scheduler accounts for it
    /// itself (a permit that could not be delivered).
    pub(crate) fn disarm(mut self) {
        self.scheduler = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Preempted before its request noticed (its client left meanwhile):
        // the slot is given away already, and the new place is given up
        // with the ticket.
        if self.answered().is_some() {
            return;
        }
        if let Some(scheduler) = self.scheduler.take() {
            let run = self.run();
            scheduler.release(self.priority, self.tenant, self.slot, self.started, run);
        }
    }
}

pin_project! {
    /// A response body that holds the request's [`Permit`] until its last
    /// frame was taken, it failed, or it was dropped.
    #[derive(Debug)]
    pub struct PermitBody<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
        passing: Option<super::passing::PassSlot>,
    }
}

impl<B> PermitBody<B> {
    /// Wrap `inner`, holding `permit` (none for requests that pass without
    /// admission).
    pub fn new(inner: B, permit: Option<Permit>) -> Self {
        Self {
            inner,
            permit,
            passing: None,
        }
    }

    /// Wrap `inner` of a request that passes without admission, holding
    /// its place among those passing (see [`passing`](super::passing)).
    pub(crate) fn passing(inner: B, passing: Option<super::passing::PassSlot>) -> Self {
        Self {
            inner,
            permit: None,
            passing,
        }
    }
}

impl<B> Body for PermitBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            // The end, or a failure: the upstream is done with this request.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                drop(this.permit.take());
                drop(this.passing.take());
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
