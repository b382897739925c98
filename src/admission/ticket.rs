//! A place in a scheduler's queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::queue::Place;
use super::scheduler::{Grant, Scheduler};
use crate::types::{Overloaded, Priority, Reason};

/// A place in the queue. Await it with [`Ticket::wait`]; dropping it gives the
/// place up (and, if a permit was already on its way, the slot back).
#[derive(Debug)]
pub struct Ticket {
    scheduler: Arc<Scheduler>,
    key: Place,
    rx: oneshot::Receiver<Grant>,
    pub(super) done: bool,
    timeout: Duration,
    /// What its timeout is: `queue_timeout`, or its own shorter deadline.
    expires: Reason,
}

impl Ticket {
    pub(super) fn new(
        scheduler: Arc<Scheduler>,
        key: Place,
        rx: oneshot::Receiver<Grant>,
        timeout: Duration,
    ) -> Self {
        Self {
            scheduler,
            key,
            rx,
            done: false,
            timeout,
            expires: Reason::QueueTimeout,
        }
    }

    /// Its timeout is the request's own deadline, shorter than
    /// `queue_timeout`.
    pub(super) fn by_deadline(mut self) -> Self {
        self.expires = Reason::Deadline;
        self
    }

    /// The most time it may wait (the scheduler's `queue_timeout` when it
    /// was queued, or the request's own shorter deadline).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The scheduler it waits at.
    pub(crate) fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// The priority it waits at.
    pub fn priority(&self) -> Priority {
        self.key.priority()
    }

    /// Its place: tickets order as the queue serves them.
    pub fn place(&self) -> Place {
        self.key
    }

    /// The grant, if it has arrived, without waiting.
    pub fn try_take(&mut self) -> Option<Grant> {
        let grant = self.rx.try_recv().ok()?;
        self.done = true;
        Some(grant)
    }

    /// Poll for the grant.
    pub(crate) fn poll_grant(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Grant> {
        use std::future::Future;
        match std::pin::Pin::new(&mut self.rx).poll(cx) {
            std::task::Poll::Ready(Ok(grant)) => {
                self.done = true;
                std::task::Poll::Ready(grant)
            }
            // The scheduler never drops a sender without sending, except when
            // the scheduler itself is gone.
            std::task::Poll::Ready(Err(_)) => {
                self.done = true;
                std::task::Poll::Ready(Err(Overloaded::new(Reason::Closed, Duration::from_secs(1))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// The queue timeout fired: leave the queue and say when to come back.
    /// `None` when the ticket had already left the queue (dispatched or
    /// evicted at the same moment): its grant is on its way, keep polling.
    pub(crate) fn expire(&mut self) -> Option<Overloaded> {
        let err = self.scheduler.time_out(&self.key, self.expires)?;
        self.done = true;
        Some(err)
    }

    /// Wait for the grant.
    pub async fn wait(mut self) -> Grant {
        std::future::poll_fn(|cx| self.poll_grant(cx)).await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            // Leave the queue. If the permit was already sent, dropping `rx`
            // right after drops it, which hands the slot to the next waiter.
            self.scheduler.cancel(&self.key);
        }
    }
}
