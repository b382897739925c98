//! The scheduler: the shared admission state (see [`state`](super::state))
//! behind its lock, and the operations the request path calls: acquire,
//! release, cancel, time out, drain, reconfigure, and the snapshot for
//! `/status`. Tickets are in [`ticket`](super::ticket).
//!
//! One `parking_lot::Mutex` guards the state. Every critical section is a handful of
//! integer updates and one `BTreeMap` operation, with no await and no I/O
//! inside; wake-ups (oneshot sends) happen after the lock is released, but
//! for one: a preempted request is sent its new place under the lock, so
//! that the send's success decides, atomically with the slot's transfer,
//! whether it was preempted or had answered first (a send only schedules
//! the waiter's task; it never runs code of ours).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::permit::Permit;
use super::queue::{Place, Push};
use super::state::{State, Waiter};
pub use super::ticket::Ticket;
use crate::config::Limits;
use crate::types::{
    Allowance, Overloaded, Priority, QueueStatus, Reason, Share, TenantId, TenantStatus,
};

/// What admission may do with a request whose body is held whole, so that
/// it can be stopped and sent again: how often that happened already, and
/// whether its client asked for a stream (a stream's head goes out with
/// its first byte, so it may not borrow a reserved slot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replayable {
    /// Times it was preempted already.
    pub preemptions: u32,
    /// The client asked for a stream.
    pub stream: bool,
}

/// What a queued request receives: a permit, or the news that it was evicted.
pub type Grant = Result<Permit, Overloaded>;

/// The outcome of asking for a slot.
#[derive(Debug)]
pub enum Acquire {
    /// A slot was free and nobody waited: go.
    Admitted(Permit),
    /// Wait on this ticket.
    Queued(Ticket),
    /// No room in the queue.
    Rejected(Overloaded),
}

/// Admission state shared by every clone of the admission service.
///
/// Cloning the `Arc<Scheduler>` never creates a new queue: every request of
/// one proxy goes through the same one.
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<State>,
}

impl Scheduler {
    /// A scheduler with these limits.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::new(&limits)),
        })
    }

    /// Ask for a slot at `priority`, for `share`'s tenant, for a request
    /// that cannot be sent again (its body is streamed): never preempted.
    pub fn acquire(self: &Arc<Self>, priority: Priority, share: &Share) -> Acquire {
        self.acquire_as(priority, share, || None)
    }

    /// Ask for a slot at `priority`, for `share`'s tenant; `replay` says,
    /// when asked (only with preemption on), whether the request could be
    /// stopped and sent again. With preemption on, an urgent request that
    /// finds no slot takes one from a less urgent running request that has
    /// not answered yet.
    pub fn acquire_as(
        self: &Arc<Self>,
        priority: Priority,
        share: &Share,
        replay: impl FnOnce() -> Option<Replayable>,
    ) -> Acquire {
        self.acquire_within(priority, share, None, replay)
    }

    /// [`acquire_as`](Self::acquire_as) for a request that waits at most
    /// `deadline` (its own, `x-anteroom-deadline-ms`; `queue_timeout`
    /// stays the ceiling): within its priority it is served nearest
    /// deadline first, and when its predicted start is already past the
    /// deadline (or, with a deadline of zero, whenever it would wait at
    /// all) it is refused at once instead of after waiting in vain.
    pub fn acquire_within(
        self: &Arc<Self>,
        priority: Priority,
        share: &Share,
        deadline: Option<Duration>,
        replay: impl FnOnce() -> Option<Replayable>,
    ) -> Acquire {
        let now = Instant::now();
        let mut evicted = None;
        let outcome = {
            let mut st = self.state.lock();
            let cap = st.retry_after_cap;
            if let Some(deadline) = st.draining {
                return Acquire::Rejected(Overloaded::new(
                    Reason::Closed,
                    drain_retry(deadline, now, cap),
                ));
            }
            let tenant = st.tenant(share);
            let at_cap = tenant.at_cap();
            // No barging: only when no waiter is at least as urgent (and
            // could start: one whose tenant is at its cap is set aside).
            st.park_capped_heads();
            let ahead = st.queue.first().is_some_and(|k| k.priority() <= priority);
            let replay = match st.preempt {
                Some(_) => st.may_preempt(replay()),
                None => None,
            };
            let lend = replay.is_some_and(|r| !r.stream);
            let room = !ahead && !at_cap && st.headroom_for(priority, lend, None) > 0;
            let handover = match room || ahead || at_cap {
                true => None,
                false => st.preempt_for(self, priority),
            };
            if room || handover.is_some() {
                let slot = st.start(priority, share.id, now);
                let mut permit = Permit::new(self.clone(), priority, share.id, slot, now);
                if let Some(rx) = handover {
                    permit.handed_over(rx);
                }
                if let Some(replay) = replay {
                    let seq = st.queue.next_seq();
                    st.candidate(&mut permit, share, seq, now, replay);
                }
                Acquire::Admitted(permit)
            } else if let Some(late) = deadline
                .filter(|d| *d < st.queue_timeout)
                .and_then(|d| st.past_deadline(priority, share.id, d, now))
            {
                st.forget_if_idle(share.id);
                Acquire::Rejected(late)
            } else {
                let (tx, rx) = oneshot::channel();
                let waiter = Waiter {
                    tx,
                    replay,
                    arrived: now,
                };
                // The wait: `queue_timeout`, or the request's own shorter
                // deadline (a longer one is clamped to the ceiling, which
                // every request has: it is as none).
                let own = deadline.filter(|d| *d < st.queue_timeout);
                let timeout = own.unwrap_or(st.queue_timeout);
                let due = own.map(|d| now + d);
                let ticket = |key| {
                    let t = Ticket::new(self.clone(), key, rx, timeout);
                    match own {
                        Some(_) => t.by_deadline(),
                        None => t,
                    }
                };
                match st
                    .queue
                    .push_due(priority, due, share.id, share.weight, now, waiter)
                {
                    Push::Queued(key) => {
                        st.waiting_one_more(share.id);
                        Acquire::Queued(ticket(key))
                    }
                    Push::Evicted {
                        key,
                        victim_key,
                        victim,
                    } => {
                        st.waiting_one_more(share.id);
                        st.waiting_one_less(victim_key.tenant());
                        // The victim was last in line; had it stayed, it would
                        // now stand behind everyone queued.
                        let place = st.queue.len() + 1;
                        let retry = st.advise_refused(victim_key.priority(), place);
                        evicted = Some((victim, retry));
                        Acquire::Queued(ticket(key))
                    }
                    Push::Full(_) => {
                        st.forget_if_idle(share.id);
                        let most = st.places_that_matter(cap);
                        let place = st.queue.ahead_of_new(priority, due, share.id, most) + 1;
                        let retry = st.advise_refused(priority, place);
                        Acquire::Rejected(Overloaded::new(Reason::QueueFull, retry))
                    }
                }
            }
        };
        if let Some((victim, retry)) = evicted {
            // A closed receiver means that client already left: nothing to tell.
            let _ = victim.tx.send(Err(Overloaded::new(Reason::Evicted, retry)));
        }
        outcome
    }

    /// Change the concurrency limit (hot reload, adaptive limits). Raising it
    /// dispatches waiters at once; lowering it lets running requests finish.
    pub(crate) fn set_max_concurrency(self: &Arc<Self>, max: usize) {
        self.state.lock().max_concurrency = max;
        self.dispatch();
    }

    /// Take new limits (a config reload). Requests already waiting keep
    /// their place and deadline, even above a lowered `max_queue`; running
    /// ones finish above a lowered `max_concurrency`, and no new one starts
    /// until the count is below it. `max_concurrency` is left alone when
    /// `keep_concurrency` (the adaptive limit owns it).
    pub fn reconfigure(self: &Arc<Self>, limits: &Limits, keep_concurrency: bool) {
        {
            let mut st = self.state.lock();
            if !keep_concurrency {
                st.max_concurrency = limits.max_concurrency;
            }
            st.queue.set_capacity(limits.max_queue);
            st.queue.set_promote_after(limits.promote_after);
            st.queue_timeout = limits.queue_timeout;
            st.retry_after_cap = limits.retry_after_cap;
            let mut reserved = limits.reserved.clone();
            reserved.sort_by_key(|r| r.max_priority);
            st.reserved = reserved;
            st.preempt = limits.preempt;
            if st.preempt.is_none() {
                // Dropping their senders tells the running candidates they
                // are no longer preemptible.
                st.victims.clear();
            }
        }
        // A raised limit or a smaller reservation frees slots now.
        self.dispatch();
    }

    /// In cluster mode: a slot's turn time at this replica's share of the
    /// cluster's drain rate (seconds), the advice's estimate until this
    /// replica has measured its own; `None` when the cluster measured none.
    pub fn set_shared_turn(&self, secs: Option<f64>) {
        self.state.lock().shared_turn = secs.filter(|s| s.is_finite() && *s > 0.0);
    }

    /// The most requests it lets run at once, now.
    pub fn max_concurrency(&self) -> usize {
        self.state.lock().max_concurrency
    }

    /// Waiting and running now, without the per-priority maps.
    pub fn snapshot_counts(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.queue.len(), st.running)
    }

    /// A snapshot of the state, for /status.
    pub fn snapshot(&self) -> QueueStatus {
        let st = self.state.lock();
        QueueStatus {
            waiting: st.queue.len(),
            running: st.running,
            max_concurrency: st.max_concurrency,
            max_queue: st.queue.capacity(),
            completed: st.completed,
            service_time_ms: st.turns.turn().map(|s| s * 1000.0),
            waiting_by_priority: st.queue.waiting_by_priority().collect(),
            running_by_priority: st.running_by_priority.clone(),
            reservations: st.reservations(),
            preempted: st.preempt.map(|_| st.preempted.clone()),
            tenants: {
                let mut t: Vec<_> = st
                    .tenants
                    .values()
                    .map(|t| TenantStatus {
                        name: String::from_utf8_lossy(t.name.as_bytes()).into_owned(),
                        waiting: t.waiting,
                        running: t.running,
                        weight: t.weight,
                        max_in_flight: (t.max_in_flight > 0).then_some(t.max_in_flight),
                    })
                    .collect();
                t.sort_by(|a, b| b.waiting.cmp(&a.waiting).then(a.name.cmp(&b.name)));
                t
            },
        }
    }

    /// The room for requests at `priority`, as a rate-limit allowance: the
    /// slots they may use and the queue's places when all are free, those
    /// free now, and how long until all are at the measured turn time.
    pub fn room(&self, priority: Priority) -> Allowance {
        self.state.lock().room(priority, Instant::now())
    }

    /// The delay to advise a request that would stand `place`-th in line.
    pub fn advise(&self, place: usize) -> Duration {
        let mut st = self.state.lock();
        let cap = st.retry_after_cap;
        st.retry_after(place, cap)
    }

    /// Called by a [`Permit`] when its request is over: account for it, then
    /// hand the slot to the next waiter, if any.
    pub(crate) fn release(
        self: &Arc<Self>,
        priority: Priority,
        tenant: TenantId,
        slot: u32,
        started: Instant,
        run: Option<u64>,
    ) {
        {
            let mut st = self.state.lock();
            if let Some(run) = run {
                st.victims.remove(&(priority, run));
            }
            st.finish(priority, tenant, slot, started, Instant::now());
        }
        self.dispatch();
    }

    /// Give free slots to waiters, most urgent first. Sends happen outside the
    /// lock; a waiter whose client has left is skipped and its slot offered on.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let now = Instant::now();
            let next = {
                let mut st = self.state.lock();
                let Some(key) = st.next_to_start(now) else {
                    return;
                };
                let Some(waiter) = st.queue.take(&key) else {
                    return;
                };
                // Start before the waiting count drops, so the tenant's
                // state is not forgotten in between.
                let slot = st.start(key.priority(), key.tenant(), now);
                let mut permit = Permit::new(self.clone(), key.priority(), key.tenant(), slot, now);
                if let Some(r) = waiter.replay {
                    permit.set_preemptions(r.preemptions);
                }
                if let Some(replay) = waiter.replay.and_then(|r| st.may_preempt(Some(r))) {
                    let share = st.tenant_share(key.tenant());
                    st.candidate(&mut permit, &share, key.seq(), waiter.arrived, replay);
                }
                st.waiting_one_less(key.tenant());
                (key, waiter.tx, permit)
            };
            let (key, tx, permit) = next;
            if let Err(Ok(permit)) = tx.send(Ok(permit)) {
                // The waiter went away between our take and the send: undo
                // the start without recording a service time, and try the
                // next one.
                let run = permit.run();
                let slot = permit.slot();
                permit.disarm();
                let mut st = self.state.lock();
                if let Some(run) = run {
                    st.victims.remove(&(key.priority(), run));
                }
                st.abandon(key.priority(), key.tenant(), slot);
            }
        }
    }

    /// Shut down by `deadline`: from now on nothing new is admitted, and a
    /// waiter starts only while a request can be expected (by the measured
    /// service time) to finish before it. Call [`shed_late`](Self::shed_late)
    /// as time passes to answer the waiters that no longer can.
    pub fn drain(self: &Arc<Self>, deadline: Instant) {
        self.state.lock().draining = Some(deadline);
        self.shed_late();
        // Raising nothing, but a waiter that may still start should not
        // wait for the next release.
        self.dispatch();
    }

    /// While draining: answer every waiter with 503 `shutting_down` once
    /// none could start and still finish before the deadline. Returns how
    /// many were answered.
    pub fn shed_late(&self) -> usize {
        let now = Instant::now();
        let (waiters, retry) = {
            let mut st = self.state.lock();
            let Some(deadline) = st.draining else {
                return 0;
            };
            if st.can_finish_by(deadline, now) {
                return 0;
            }
            let waiters = st.take_all_waiting();
            (waiters, drain_retry(deadline, now, st.retry_after_cap))
        };
        let n = waiters.len();
        for w in waiters {
            let _ = w.tx.send(Err(Overloaded::new(Reason::Closed, retry)));
        }
        n
    }

    /// Send every waiter away to be queued elsewhere (its upstream was
    /// taken out of service). Running requests are not touched.
    pub(crate) fn reroute_waiting(&self) -> usize {
        let waiters = self.state.lock().take_all_waiting();
        let n = waiters.len();
        for w in waiters {
            let _ =
                w.tx.send(Err(Overloaded::new(Reason::Rerouted, Duration::ZERO)));
        }
        n
    }

    /// Take a waiter out of the queue (it gave up). Returns true when it was
    /// still there, false when it had already been dispatched or evicted.
    /// Where a waiting `key` stands (see [`State::standing`]).
    pub(crate) fn standing(&self, key: &Place) -> Option<(usize, Option<Duration>)> {
        self.state.lock().standing(key, Instant::now())
    }

    pub(crate) fn cancel(&self, key: &Place) -> bool {
        let mut st = self.state.lock();
        if st.queue.remove(key).is_some() {
            st.waiting_one_less(key.tenant());
            true
        } else {
            false
        }
    }

    /// Take a waiter out of the queue because it waited too long, and say
    /// when to come back: after the requests that stood ahead of it drain.
    pub(crate) fn time_out(&self, key: &Place, reason: Reason) -> Option<Overloaded> {
        let mut st = self.state.lock();
        let cap = st.retry_after_cap;
        let most = st.places_that_matter(cap);
        let place = st.queue.ahead_of(key, most) + 1;
        st.queue.remove(key)?;
        st.waiting_one_less(key.tenant());
        let retry = st.advise_refused(key.priority(), place);
        Some(Overloaded::new(reason, retry))
    }
}

/// A client turned away by a draining server: come back when it is gone
/// (a restarted or other instance will answer), at least a second.
fn drain_retry(deadline: Instant, now: Instant, cap: Duration) -> Duration {
    deadline
        .saturating_duration_since(now)
        .clamp(Duration::from_secs(1), cap.max(Duration::from_secs(1)))
}
