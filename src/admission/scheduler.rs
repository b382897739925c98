//! The shared admission state: how many requests run, who waits, and how fast
//! the line moves.
//!
//! One `parking_lot::Mutex` guards it. Every critical section is a handful of
//! integer updates and one `BTreeMap` operation, with no await and no I/O
//! inside; wake-ups (oneshot sends) happen after the lock is released, but
//! for one: a preempted request is sent its new place under the lock, so
//! that the send's success decides, atomically with the slot's transfer,
//! whether it was preempted or had answered first (a send only schedules
//! the waiter's task; it never runs code of ours).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::permit::{Permit, Preempted};
use super::queue::{Key, PriorityQueue, Push, TenantMap};
use crate::config::{Limits, Preemption, Reservation};
use crate::types::{
    Overloaded, PreemptedCounts, Priority, QueueStatus, Reason, ReservationStatus, Share, TenantId,
    TenantStatus,
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

/// A tenant's counts, while it has requests waiting or running.
#[derive(Debug)]
struct TenantState {
    name: HeaderValue,
    weight: u32,
    max_in_flight: usize,
    waiting: usize,
    running: usize,
}

impl TenantState {
    fn at_cap(&self) -> bool {
        self.max_in_flight > 0 && self.running >= self.max_in_flight
    }
}

/// What a queued request receives: a permit, or the news that it was evicted.
pub type Grant = Result<Permit, Overloaded>;

/// A queued request as the queue holds it.
#[derive(Debug)]
struct Waiter {
    tx: oneshot::Sender<Grant>,
    /// Set when it could be preempted once running.
    replay: Option<Replayable>,
    /// When it first arrived (a preempted request keeps its arrival).
    arrived: Instant,
}

/// A running request that may be preempted, until it answers.
#[derive(Debug)]
struct Candidate {
    /// Its new place in the queue goes here; closed once it answered.
    tx: oneshot::Sender<Preempted>,
    tenant: TenantId,
    weight: u32,
    /// Its arrival order, kept when it is put back.
    seq: u64,
    arrived: Instant,
    started: Instant,
    replay: Replayable,
}

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

/// Smoothing factor of the service-time average: each completion moves it a
/// tenth of the way, so a few outliers do not swing the advice but a real
/// change of backend speed shows within a few dozen requests.
const EWMA_ALPHA: f64 = 0.1;

/// Until the first completion is measured, a slot is assumed to take at least
/// this long: a short LLM generation. Replaced by the measurement as soon as
/// one request completes.
const COLD_SERVICE_SECS: f64 = 1.0;

/// Admission state shared by every clone of the admission service.
///
/// Cloning the `Arc<Scheduler>` never creates a new queue: every request of
/// one proxy goes through the same one.
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    running: usize,
    max_concurrency: usize,
    /// Sorted most urgent first.
    reserved: Vec<Reservation>,
    queue: PriorityQueue<Waiter>,
    /// Tenants with requests waiting or running.
    tenants: TenantMap<TenantState>,
    /// Running requests per priority.
    running_by_priority: BTreeMap<Priority, usize>,
    /// Smoothed time a permit is held (dispatch to last byte), in seconds.
    service_secs: Option<f64>,
    /// Sum of the start times of running permits, in seconds since `epoch`,
    /// so the mean age of running requests is known before any completes.
    running_start_sum: f64,
    completed: u64,
    epoch: Instant,
    retry_after_cap: Duration,
    /// Shutting down: nothing may start that cannot finish by then.
    draining: Option<Instant>,
    queue_timeout: Duration,
    preempt: Option<Preemption>,
    /// Running requests that may be preempted, by (priority, start order):
    /// the last is the least urgent that started most recently.
    victims: BTreeMap<(Priority, u64), Candidate>,
    next_run: u64,
    /// Preemptions so far, by the victim's priority.
    preempted: BTreeMap<Priority, PreemptedCounts>,
}

impl Scheduler {
    /// A scheduler with these limits.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                running: 0,
                max_concurrency: limits.max_concurrency,
                reserved: {
                    let mut r = limits.reserved.clone();
                    r.sort_by_key(|r| r.max_priority);
                    r
                },
                queue: {
                    let mut q = PriorityQueue::new(limits.max_queue);
                    q.set_promote_after(limits.promote_after);
                    q
                },
                tenants: TenantMap::default(),
                running_by_priority: BTreeMap::new(),
                service_secs: None,
                running_start_sum: 0.0,
                completed: 0,
                epoch: Instant::now(),
                retry_after_cap: limits.retry_after_cap,
                draining: None,
                queue_timeout: limits.queue_timeout,
                preempt: limits.preempt,
                victims: BTreeMap::new(),
                next_run: 0,
                preempted: BTreeMap::new(),
            }),
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
                st.start(priority, share.id, now);
                let mut permit = Permit::new(self.clone(), priority, share.id, now);
                if let Some(rx) = handover {
                    permit.handed_over(rx);
                }
                if let Some(replay) = replay {
                    let seq = st.queue.next_seq();
                    st.candidate(&mut permit, share, seq, now, replay);
                }
                Acquire::Admitted(permit)
            } else {
                let (tx, rx) = oneshot::channel();
                let waiter = Waiter {
                    tx,
                    replay,
                    arrived: now,
                };
                match st.queue.push(priority, share.id, share.weight, now, waiter) {
                    Push::Queued(key) => {
                        st.waiting_one_more(share.id);
                        Acquire::Queued(Ticket::new(self.clone(), key, rx, st.queue_timeout))
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
                        let retry = st.retry_after(place, cap);
                        evicted = Some((victim, retry));
                        Acquire::Queued(Ticket::new(self.clone(), key, rx, st.queue_timeout))
                    }
                    Push::Full(_) => {
                        st.forget_if_idle(share.id);
                        let most = st.places_that_matter(cap);
                        let place = st.queue.ahead_of_new(priority, share.id, most) + 1;
                        let retry = st.retry_after(place, cap);
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
    pub fn set_max_concurrency(self: &Arc<Self>, max: usize) {
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
            service_time_ms: st.service_secs.map(|s| s * 1000.0),
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

    /// The delay to advise a request that would stand `place`-th in line.
    pub fn advise(&self, place: usize) -> Duration {
        let st = self.state.lock();
        st.retry_after(place, st.retry_after_cap)
    }

    /// Called by a [`Permit`] when its request is over: account for it, then
    /// hand the slot to the next waiter, if any.
    pub(crate) fn release(
        self: &Arc<Self>,
        priority: Priority,
        tenant: TenantId,
        started: Instant,
        run: Option<u64>,
    ) {
        {
            let mut st = self.state.lock();
            if let Some(run) = run {
                st.victims.remove(&(priority, run));
            }
            st.finish(priority, tenant, started, Instant::now());
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
                st.start(key.priority(), key.tenant(), now);
                let mut permit = Permit::new(self.clone(), key.priority(), key.tenant(), now);
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
                permit.disarm();
                let mut st = self.state.lock();
                if let Some(run) = run {
                    st.victims.remove(&(key.priority(), run));
                }
                st.abandon(key.priority(), key.tenant(), now);
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
    pub fn reroute_waiting(&self) -> usize {
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
    pub(crate) fn cancel(&self, key: &Key) -> bool {
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
    pub(crate) fn time_out(&self, key: &Key) -> Option<Overloaded> {
        let mut st = self.state.lock();
        let cap = st.retry_after_cap;
        let most = st.places_that_matter(cap);
        let place = st.queue.ahead_of(key, most) + 1;
        st.queue.remove(key)?;
        st.waiting_one_less(key.tenant());
        let retry = st.retry_after(place, cap);
        Some(Overloaded::new(Reason::QueueTimeout, retry))
    }
}

/// A client turned away by a draining server: come back when it is gone
/// (a restarted or other instance will answer), at least a second.
fn drain_retry(deadline: Instant, now: Instant, cap: Duration) -> Duration {
    deadline
        .saturating_duration_since(now)
        .clamp(Duration::from_secs(1), cap.max(Duration::from_secs(1)))
}

fn dec(map: &mut BTreeMap<Priority, usize>, priority: Priority) {
    if let Some(n) = map.get_mut(&priority) {
        *n -= 1;
        if *n == 0 {
            map.remove(&priority);
        }
    }
}

impl State {
    /// The tenant's state, created (or refreshed from `share`) as needed.
    fn tenant(&mut self, share: &Share) -> &mut TenantState {
        let t = self.tenants.entry(share.id).or_insert_with(|| TenantState {
            name: share.name.clone(),
            weight: share.weight,
            max_in_flight: share.max_in_flight,
            waiting: 0,
            running: 0,
        });
        // A reload may have changed the key's settings.
        t.weight = share.weight;
        t.max_in_flight = share.max_in_flight;
        t
    }

    fn waiting_one_more(&mut self, tenant: TenantId) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.waiting += 1;
        }
    }

    fn waiting_one_less(&mut self, tenant: TenantId) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.waiting = t.waiting.saturating_sub(1);
        }
        self.forget_if_idle(tenant);
    }

    fn forget_if_idle(&mut self, tenant: TenantId) {
        if self
            .tenants
            .get(&tenant)
            .is_some_and(|t| t.waiting == 0 && t.running == 0)
        {
            self.tenants.remove(&tenant);
        }
    }

    /// Every waiter, parked ones included, out of the queue (to be answered
    /// outside the lock); tenants keep only their running counts.
    fn take_all_waiting(&mut self) -> Vec<Waiter> {
        let waiters = self.queue.drain();
        self.tenants.retain(|_, t| {
            t.waiting = 0;
            t.running > 0
        });
        waiters
    }

    /// Could a request started now be expected to finish by `deadline`?
    fn can_finish_by(&self, deadline: Instant, now: Instant) -> bool {
        let took = self.service_estimate(now).unwrap_or(0.0);
        now + Duration::from_secs_f64(took) < deadline
    }

    /// Set aside first entries whose tenants are at their cap.
    fn park_capped_heads(&mut self) {
        while let Some(key) = self.queue.first() {
            if !self
                .tenants
                .get(&key.tenant())
                .is_some_and(TenantState::at_cap)
            {
                return;
            }
            self.queue.park(&key);
        }
    }

    /// The waiter to start now, if any may: the queue's choice, unless its
    /// tenant is at its cap (then it is parked and the next one considered)
    /// or no slot is open to its priority.
    fn next_to_start(&mut self, now: Instant) -> Option<Key> {
        if let Some(deadline) = self.draining {
            if !self.can_finish_by(deadline, now) {
                return None;
            }
        }
        loop {
            let key = self.queue.next(now)?;
            if self
                .tenants
                .get(&key.tenant())
                .is_some_and(TenantState::at_cap)
            {
                self.queue.park(&key);
                continue;
            }
            if self.headroom_for(key.priority(), self.lends(&key), None) > 0 {
                return Some(key);
            }
            // A promoted entry may be held back by a reservation that the
            // most urgent waiter can use. Anyone behind the first entry is no
            // more urgent, so is held back too.
            let first = self.queue.first()?;
            return (first != key
                && self.headroom_for(first.priority(), self.lends(&first), None) > 0)
                .then_some(first);
        }
    }

    /// How many requests at `priority` could start now: free slots, less
    /// those reserved for more urgent work than it. A request that `lend`s
    /// (preemptible to its end) may borrow the reservations of priorities
    /// that may preempt it; with `freed`, as if a running request of that
    /// priority had stopped.
    fn headroom_for(&self, priority: Priority, lend: bool, freed: Option<Priority>) -> usize {
        let running = self.running - usize::from(freed.is_some());
        let mut room = self.max_concurrency.saturating_sub(running);
        // Levels are most urgent first, so those whose every priority may
        // preempt are a prefix.
        let lent = match (lend, self.preempt) {
            (true, Some(p)) => Some(p.max_priority),
            _ => None,
        };
        let mut reserved_so_far = 0;
        for r in &self.reserved {
            if lent.is_some_and(|m| r.max_priority <= m) {
                continue;
            }
            reserved_so_far += r.slots;
            if priority > r.max_priority {
                // Requests less urgent than this level share what is left
                // of the limit after it and the more urgent levels.
                let pool = self.max_concurrency.saturating_sub(reserved_so_far);
                let using = self.running_less_urgent_than(r.max_priority)
                    - usize::from(freed.is_some_and(|f| f > r.max_priority));
                room = room.min(pool.saturating_sub(using));
            }
        }
        room
    }

    /// Whether a queued entry would borrow a reserved slot.
    fn lends(&self, key: &Key) -> bool {
        self.preempt.is_some()
            && self
                .queue
                .get(key)
                .and_then(|w| w.replay)
                .is_some_and(|r| !r.stream)
    }

    /// `replay`, if preemption is on and it may be preempted once more.
    fn may_preempt(&self, replay: Option<Replayable>) -> Option<Replayable> {
        let p = self.preempt?;
        replay.filter(|r| r.preemptions < p.max_preemptions)
    }

    /// The share a queued entry's tenant was queued with.
    fn tenant_share(&self, tenant: TenantId) -> Share {
        match self.tenants.get(&tenant) {
            Some(t) => Share {
                id: tenant,
                weight: t.weight,
                max_in_flight: t.max_in_flight,
                name: t.name.clone(),
            },
            None => Share {
                id: tenant,
                ..Share::default()
            },
        }
    }

    /// Make a just-started request a preemption candidate: it gets the
    /// receiving end of its new place, should it be preempted.
    fn candidate(
        &mut self,
        permit: &mut Permit,
        share: &Share,
        seq: u64,
        arrived: Instant,
        replay: Replayable,
    ) {
        let run = self.next_run;
        self.next_run += 1;
        let (tx, rx) = oneshot::channel();
        self.victims.insert(
            (permit.priority(), run),
            Candidate {
                tx,
                tenant: share.id,
                weight: share.weight,
                seq,
                arrived,
                started: permit.started(),
                replay,
            },
        );
        permit.preemptible(run, rx);
        permit.set_preemptions(replay.preemptions);
    }

    /// With preemption on and `priority` urgent enough: stop the least
    /// urgent running request of a strictly less urgent priority that has
    /// not answered (the most recently started of them: the least work
    /// lost), put it back in the queue at its place, and free its slot for
    /// the caller to take, with the signal that the victim has stopped.
    /// None when there is no victim, or freeing one would not give
    /// `priority` a slot.
    fn preempt_for(
        &mut self,
        scheduler: &Arc<Scheduler>,
        priority: Priority,
    ) -> Option<oneshot::Receiver<()>> {
        let p = self.preempt?;
        if priority > p.max_priority {
            return None;
        }
        loop {
            let (&(vp, run), _) = self.victims.iter().next_back()?;
            if vp <= priority || self.headroom_for(priority, false, Some(vp)) == 0 {
                return None;
            }
            let c = self.victims.remove(&(vp, run))?;
            if c.tx.is_closed() {
                // It answered (or left) since: no longer a candidate.
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let replay = Replayable {
                preemptions: c.replay.preemptions + 1,
                ..c.replay
            };
            let waiter = Waiter {
                tx,
                replay: Some(replay),
                arrived: c.arrived,
            };
            let key = self
                .queue
                .restore(vp, c.tenant, c.weight, c.seq, c.arrived, waiter);
            let ticket = Ticket::new(scheduler.clone(), key, rx, self.queue_timeout);
            let (handed, handover) = oneshot::channel();
            match c.tx.send(Preempted { ticket, handed }) {
                Ok(()) => {
                    // Waiting again before it stops running, so its
                    // tenant is not forgotten in between.
                    self.waiting_one_more(c.tenant);
                    self.abandon(vp, c.tenant, c.started);
                    let now = Instant::now();
                    let counts = self.preempted.entry(vp).or_default();
                    counts.preemptions += 1;
                    counts.wasted_seconds += now.duration_since(c.started).as_secs_f64();
                    return Some(handover);
                }
                Err(Preempted { mut ticket, .. }) => {
                    // It answered between the check and the send.
                    self.queue.remove(&key);
                    ticket.done = true;
                }
            }
        }
    }

    fn running_less_urgent_than(&self, p: Priority) -> usize {
        self.running_by_priority
            .range((std::ops::Bound::Excluded(p), std::ops::Bound::Unbounded))
            .map(|(_, n)| n)
            .sum()
    }

    fn reservations(&self) -> Vec<ReservationStatus> {
        self.reserved
            .iter()
            .map(|r| ReservationStatus {
                max_priority: r.max_priority,
                slots: r.slots,
                used: self.running - self.running_less_urgent_than(r.max_priority),
                free: self.headroom_for(r.max_priority, false, None),
            })
            .collect()
    }

    fn secs(&self, t: Instant) -> f64 {
        t.duration_since(self.epoch).as_secs_f64()
    }

    fn start(&mut self, priority: Priority, tenant: TenantId, now: Instant) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.running += 1;
        }
        self.running += 1;
        *self.running_by_priority.entry(priority).or_default() += 1;
        self.running_start_sum += self.secs(now);
    }

    fn abandon(&mut self, priority: Priority, tenant: TenantId, started: Instant) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            let was_at_cap = t.at_cap();
            t.running = t.running.saturating_sub(1);
            if was_at_cap {
                // It may start one more: its most urgent parked entry, if
                // any, goes back in line.
                self.queue.unpark(tenant);
            }
        }
        self.forget_if_idle(tenant);
        self.running -= 1;
        dec(&mut self.running_by_priority, priority);
        self.running_start_sum -= self.secs(started);
        if self.running == 0 {
            self.running_start_sum = 0.0;
        }
    }

    fn finish(&mut self, priority: Priority, tenant: TenantId, started: Instant, now: Instant) {
        self.abandon(priority, tenant, started);
        self.completed += 1;
        let took = now.duration_since(started).as_secs_f64();
        self.service_secs = Some(match self.service_secs {
            None => took,
            Some(avg) => avg + EWMA_ALPHA * (took - avg),
        });
    }

    /// The time one slot takes to turn over: the smoothed service time once
    /// any request completed. Before that, the mean age of the running
    /// requests (a lower bound of their service time), but at least
    /// [`COLD_SERVICE_SECS`]: at a cold start every request arrived at once,
    /// their age is near zero, and advising a retry in milliseconds would
    /// spend a client's few retries before anything could have finished.
    fn service_estimate(&self, now: Instant) -> Option<f64> {
        if let Some(s) = self.service_secs {
            return Some(s);
        }
        if self.running > 0 {
            let mean_start = self.running_start_sum / self.running as f64;
            return Some((self.secs(now) - mean_start).max(COLD_SERVICE_SECS));
        }
        None
    }

    /// How far back in line a place still changes the advice: past it, the
    /// wait is at `cap`.
    fn places_that_matter(&self, cap: Duration) -> usize {
        let slots = self.max_concurrency.max(1) as f64;
        match self.service_estimate(Instant::now()) {
            Some(s) if s > 0.0 => {
                let n = (cap.as_secs_f64() * slots / s).ceil();
                if n.is_finite() && n < usize::MAX as f64 {
                    (n as usize).saturating_add(1)
                } else {
                    usize::MAX
                }
            }
            // Nothing measured: every place advises the same.
            _ => 1,
        }
    }

    /// The wait of a request standing `place`-th in line (1 = next): the line
    /// drains at `max_concurrency / service_time` requests per second.
    fn retry_after(&self, place: usize, cap: Duration) -> Duration {
        let slots = self.max_concurrency.max(1) as f64;
        let secs = match self.service_estimate(Instant::now()) {
            Some(s) => place as f64 * s / slots,
            // Nothing has run yet and nothing is running, so the line is not
            // moving because of load: the earliest sensible retry.
            None => 0.0,
        };
        Duration::from_secs_f64(secs.max(0.001)).min(cap)
    }
}

/// A place in the queue. Await it with [`Ticket::wait`]; dropping it gives the
/// place up (and, if a permit was already on its way, the slot back).
#[derive(Debug)]
pub struct Ticket {
    scheduler: Arc<Scheduler>,
    key: Key,
    rx: oneshot::Receiver<Grant>,
    done: bool,
    timeout: Duration,
}

impl Ticket {
    fn new(
        scheduler: Arc<Scheduler>,
        key: Key,
        rx: oneshot::Receiver<Grant>,
        timeout: Duration,
    ) -> Self {
        Self {
            scheduler,
            key,
            rx,
            done: false,
            timeout,
        }
    }

    /// The most time it may wait (the scheduler's `queue_timeout` when it
    /// was queued).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The priority it waits at.
    pub fn priority(&self) -> Priority {
        self.key.priority()
    }

    /// Its place: tickets order as the queue serves them.
    pub fn key(&self) -> Key {
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
        let err = self.scheduler.time_out(&self.key)?;
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
