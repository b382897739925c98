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

use super::queue::TenantId;
use super::scheduler::Scheduler;
use crate::classify::Priority;

/// One slot at the upstream. Dropping it frees the slot and hands it to the
/// most urgent waiter.
#[derive(Debug)]
pub struct Permit {
    scheduler: Option<Arc<Scheduler>>,
    priority: Priority,
    tenant: TenantId,
    started: Instant,
}

impl Permit {
    pub(crate) fn new(
        scheduler: Arc<Scheduler>,
        priority: Priority,
        tenant: TenantId,
        started: Instant,
    ) -> Self {
        Self {
            scheduler: Some(scheduler),
            priority,
            tenant,
            started,
        }
    }

    /// When the request was dispatched.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The priority it runs at.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Forget the slot without releasing it: the scheduler accounts for it
    /// itself (a permit that could not be delivered).
    pub(crate) fn disarm(mut self) {
        self.scheduler = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(scheduler) = self.scheduler.take() {
            scheduler.release(self.priority, self.tenant, self.started);
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
