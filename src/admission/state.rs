//! The admission state itself, behind the [`Scheduler`](super::Scheduler)'s
//! lock: the running count, the queue, tenants, reservations, preemption
//! candidates and the service-time average. Its methods are plain state
//! updates given the time (`now`), with no lock, await or I/O, so each is
//! tested as it is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::advice::{self, Returning, TurnTimes};
use super::permit::{Permit, Preempted};
use super::queue::{Place, PriorityQueue, TenantMap};
use super::scheduler::{Grant, Replayable, Scheduler};
use super::ticket::Ticket;
use crate::config::{Limits, Preemption, Reservation};
use crate::types::{PreemptedCounts, Priority, ReservationStatus, Share, TenantId};

/// A tenant's counts, while it has requests waiting or running.
#[derive(Debug)]
pub(super) struct TenantState {
    pub(super) name: HeaderValue,
    pub(super) weight: u32,
    pub(super) max_in_flight: usize,
    pub(super) waiting: usize,
    pub(super) running: usize,
}

impl TenantState {
    pub(super) fn at_cap(&self) -> bool {
        self.max_in_flight > 0 && self.running >= self.max_in_flight
    }
}

/// A queued request as the queue holds it.
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<Grant>,
    /// Set when it could be preempted once running.
    pub(super) replay: Option<Replayable>,
    /// When it first arrived (a preempted request keeps its arrival).
    pub(super) arrived: Instant,
}

/// A running request that may be preempted, until it answers.
#[derive(Debug)]
pub(super) struct Candidate {
    /// Its new place in the queue goes here; closed once it answered.
    pub(super) tx: oneshot::Sender<Preempted>,
    pub(super) tenant: TenantId,
    pub(super) weight: u32,
    /// Its arrival order, kept when it is put back.
    pub(super) seq: u64,
    pub(super) arrived: Instant,
    pub(super) started: Instant,
    /// Its entry among the running requests' start times.
    pub(super) slot: u32,
    pub(super) replay: Replayable,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) running: usize,
    pub(super) max_concurrency: usize,
    /// Sorted most urgent first.
    pub(super) reserved: Vec<Reservation>,
    pub(super) queue: PriorityQueue<Waiter>,
    /// Tenants with requests waiting or running.
    pub(super) tenants: TenantMap<TenantState>,
    /// Running requests per priority.
    pub(super) running_by_priority: BTreeMap<Priority, usize>,
    /// Recent times a permit was held (dispatch to last byte).
    pub(super) turns: TurnTimes,
    /// Start times of the running permits, in seconds since `epoch`, by
    /// the slot each permit holds (NaN: free), so the advice knows how long
    /// each has run.
    pub(super) starts: Vec<f64>,
    /// Free entries of `starts`.
    pub(super) free_starts: Vec<u32>,
    /// Refused clients that will come back (see [`advice`](super::advice)).
    pub(super) returning: Returning,
    /// State of the advice's jitter.
    pub(super) jitter: u64,
    pub(super) completed: u64,
    pub(super) epoch: Instant,
    pub(super) retry_after_cap: Duration,
    /// Shutting down: nothing may start that cannot finish by then.
    pub(super) draining: Option<Instant>,
    pub(super) queue_timeout: Duration,
    pub(super) preempt: Option<Preemption>,
    /// Running requests that may be preempted, by (priority, start order):
    /// the last is the least urgent that started most recently.
    pub(super) victims: BTreeMap<(Priority, u64), Candidate>,
    pub(super) next_run: u64,
    /// Preemptions so far, by the victim's priority.
    pub(super) preempted: BTreeMap<Priority, PreemptedCounts>,
    /// In cluster mode, the turn time of a slot at this replica's share of
    /// the cluster's measured drain rate: the estimate until this replica
    /// has measured its own.
    pub(super) shared_turn: Option<f64>,
}

pub(super) fn dec(map: &mut BTreeMap<Priority, usize>, priority: Priority) {
    if let Some(n) = map.get_mut(&priority) {
        *n -= 1;
        if *n == 0 {
            map.remove(&priority);
        }
    }
}

impl State {
    /// Nothing running or waiting, under `limits`.
    pub(super) fn new(limits: &Limits) -> Self {
        State {
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
            turns: TurnTimes::default(),
            starts: Vec::new(),
            free_starts: Vec::new(),
            returning: Returning::default(),
            jitter: 0x2545_f491_4f6c_dd1d,
            completed: 0,
            epoch: Instant::now(),
            retry_after_cap: limits.retry_after_cap,
            draining: None,
            queue_timeout: limits.queue_timeout,
            preempt: limits.preempt,
            victims: BTreeMap::new(),
            next_run: 0,
            preempted: BTreeMap::new(),
            shared_turn: None,
        }
    }

    /// The tenant's state, created (or refreshed from `share`) as needed.
    pub(super) fn tenant(&mut self, share: &Share) -> &mut TenantState {
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

    pub(super) fn waiting_one_more(&mut self, tenant: TenantId) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.waiting += 1;
        }
    }

    pub(super) fn waiting_one_less(&mut self, tenant: TenantId) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.waiting = t.waiting.saturating_sub(1);
        }
        self.forget_if_idle(tenant);
    }

    pub(super) fn forget_if_idle(&mut self, tenant: TenantId) {
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
    pub(super) fn take_all_waiting(&mut self) -> Vec<Waiter> {
        let waiters = self.queue.drain();
        self.tenants.retain(|_, t| {
            t.waiting = 0;
            t.running > 0
        });
        waiters
    }

    /// Could a request started now be expected to finish by `deadline`?
    pub(super) fn can_finish_by(&mut self, deadline: Instant, now: Instant) -> bool {
        let took = self.service_estimate(now).unwrap_or(0.0);
        now + Duration::from_secs_f64(took) < deadline
    }

    /// Set aside first entries whose tenants are at their cap.
    pub(super) fn park_capped_heads(&mut self) {
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
    pub(super) fn next_to_start(&mut self, now: Instant) -> Option<Place> {
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
    pub(super) fn headroom_for(
        &self,
        priority: Priority,
        lend: bool,
        freed: Option<Priority>,
    ) -> usize {
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
    pub(super) fn lends(&self, key: &Place) -> bool {
        self.preempt.is_some()
            && self
                .queue
                .get(key)
                .and_then(|w| w.replay)
                .is_some_and(|r| !r.stream)
    }

    /// `replay`, if preemption is on and it may be preempted once more.
    pub(super) fn may_preempt(&self, replay: Option<Replayable>) -> Option<Replayable> {
        let p = self.preempt?;
        replay.filter(|r| r.preemptions < p.max_preemptions)
    }

    /// The share a queued entry's tenant was queued with.
    pub(super) fn tenant_share(&self, tenant: TenantId) -> Share {
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
    pub(super) fn candidate(
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
                slot: permit.slot(),
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
    pub(super) fn preempt_for(
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
                    self.abandon(vp, c.tenant, c.slot);
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

    pub(super) fn running_less_urgent_than(&self, p: Priority) -> usize {
        self.running_by_priority
            .range((std::ops::Bound::Excluded(p), std::ops::Bound::Unbounded))
            .map(|(_, n)| n)
            .sum()
    }

    pub(super) fn reservations(&self) -> Vec<ReservationStatus> {
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

    pub(super) fn secs(&self, t: Instant) -> f64 {
        t.duration_since(self.epoch).as_secs_f64()
    }

    /// A request starts running now: returns the slot its start time is
    /// kept in (its permit carries it).
    pub(super) fn start(&mut self, priority: Priority, tenant: TenantId, now: Instant) -> u32 {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.running += 1;
        }
        self.running += 1;
        *self.running_by_priority.entry(priority).or_default() += 1;
        let at = self.secs(now);
        match self.free_starts.pop() {
            Some(slot) => {
                self.starts[slot as usize] = at;
                slot
            }
            None => {
                self.starts.push(at);
                (self.starts.len() - 1) as u32
            }
        }
    }

    /// A running request stops without completing (preempted, or never
    /// delivered): its slot is free, no hold time is recorded.
    pub(super) fn abandon(&mut self, priority: Priority, tenant: TenantId, slot: u32) {
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
        if let Some(s) = self.starts.get_mut(slot as usize) {
            if !s.is_nan() {
                *s = f64::NAN;
                self.free_starts.push(slot);
            }
        }
    }

    /// A running request completed: its hold time is recorded.
    pub(super) fn finish(
        &mut self,
        priority: Priority,
        tenant: TenantId,
        slot: u32,
        started: Instant,
        now: Instant,
    ) {
        self.abandon(priority, tenant, slot);
        self.completed += 1;
        self.turns.record(now.duration_since(started).as_secs_f64());
    }

    /// The time one slot takes to turn over: the robust mean of recent hold
    /// times once any request completed; before that, the oldest running
    /// request's age, at least [`advice::COLD_TURN_SECS`]. None when
    /// nothing ran and nothing runs.
    pub(super) fn service_estimate(&mut self, now: Instant) -> Option<f64> {
        if let Some(s) = self.turns.turn() {
            return Some(s);
        }
        let now = self.secs(now);
        let oldest = self
            .starts
            .iter()
            .filter(|s| !s.is_nan())
            .map(|&s| now - s)
            .reduce(f64::max);
        match self.shared_turn {
            // The cluster's drain, until this replica measured its own.
            Some(shared) => Some(shared.max(oldest.unwrap_or(0.0))),
            None => oldest.map(|age| age.max(advice::COLD_TURN_SECS)),
        }
    }

    /// The room for requests at `priority` (see [`Scheduler::room`]): the
    /// slots they may use (what reservations of more urgent levels leave)
    /// plus the queue's places; what of it is free; and the time the slots
    /// take to work through what fills the rest, at the turn time.
    pub(super) fn room(&mut self, priority: Priority, now: Instant) -> crate::types::Allowance {
        let reserved: usize = self
            .reserved
            .iter()
            .filter(|r| priority > r.max_priority)
            .map(|r| r.slots)
            .sum();
        let slots = self.max_concurrency.saturating_sub(reserved);
        let queue = self.queue.capacity();
        let free =
            self.headroom_for(priority, false, None) + queue.saturating_sub(self.queue.len());
        let limit = slots.saturating_add(queue).min(u32::MAX as usize) as u32;
        let remaining = free.min(limit as usize) as u32;
        let turn = self.service_estimate(now).unwrap_or(0.0);
        let busy = f64::from(limit - remaining);
        let secs = busy * turn / self.max_concurrency.max(1) as f64;
        crate::types::Allowance {
            limit,
            remaining,
            reset: Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX),
        }
    }

    /// For a request with its own `deadline` that would queue: the refusal
    /// to answer at once when it cannot start in time (its predicted start,
    /// at the place its deadline gives it, is past the deadline; a deadline
    /// of zero waits for nothing), else `None`. Nothing measured yet
    /// predicts no wait: it is not refused on a guess.
    pub(super) fn past_deadline(
        &mut self,
        priority: Priority,
        tenant: crate::types::TenantId,
        deadline: Duration,
        now: Instant,
    ) -> Option<crate::types::Overloaded> {
        let cap = self.retry_after_cap;
        let most = self.places_that_matter(cap);
        let due = Some(now + deadline.min(self.queue_timeout));
        let place = self.queue.ahead_of_new(priority, due, tenant, most) + 1;
        if !deadline.is_zero() {
            let turn = self.service_estimate(now);
            if self.wait_at(place, cap, turn, now) <= deadline {
                return None;
            }
        }
        let retry = self.advise_refused(priority, place);
        Some(crate::types::Overloaded::new(
            crate::types::Reason::Deadline,
            retry,
        ))
    }

    /// Where `key` stands: its place in line (1: next) and its predicted
    /// start from `now` (`None` before anything is measured); `None` when
    /// it no longer waits.
    pub(super) fn standing(
        &mut self,
        key: &Place,
        now: Instant,
    ) -> Option<(usize, Option<Duration>)> {
        if !self.queue.contains(key) {
            return None;
        }
        let place = self.queue.ahead_of(key, usize::MAX) + 1;
        let turn = self.service_estimate(now);
        // No request waits past `queue_timeout`: the estimate ends there.
        let cap = self.queue_timeout;
        let start = turn.map(|_| self.wait_at(place, cap, turn, now));
        Some((place, start))
    }

    /// How far back in line a place still changes the advice: past it, the
    /// wait is at `cap`.
    pub(super) fn places_that_matter(&mut self, cap: Duration) -> usize {
        let turn = self.service_estimate(Instant::now());
        self.places_within(cap, turn)
    }

    /// [`places_that_matter`](Self::places_that_matter) at this `turn`.
    fn places_within(&self, cap: Duration, turn: Option<f64>) -> usize {
        let slots = self.max_concurrency.max(1) as f64;
        match turn {
            Some(s) if s > 0.0 => {
                let n = (cap.as_secs_f64() * slots / s).ceil();
                if n.is_finite() && n < usize::MAX as f64 {
                    (n as usize).saturating_add(slots as usize)
                } else {
                    usize::MAX
                }
            }
            // Nothing measured: every place advises the same.
            _ => 1,
        }
    }

    /// When each of the `max_concurrency` slots frees, in seconds from
    /// `now`, soonest first: free ones at once, the others when their
    /// request ends (running requests over a lowered limit end first).
    fn frees(&mut self, now: Instant) -> Vec<f64> {
        let now = self.secs(now);
        let mut ends: Vec<f64> = Vec::with_capacity(self.running);
        // Nothing measured here: the cluster's turn, if it measured one.
        let shared = self.shared_turn.filter(|_| self.turns.turn().is_none());
        for i in 0..self.starts.len() {
            let s = self.starts[i];
            if !s.is_nan() {
                let age = (now - s).max(0.0);
                ends.push(match shared {
                    // What is left of the cluster's turn, or as long
                    // again as it ran once past it.
                    Some(turn) => {
                        if age < turn {
                            turn - age
                        } else {
                            age
                        }
                    }
                    _ => self.turns.remaining(age),
                });
            }
        }
        ends.sort_by(f64::total_cmp);
        let k = self.max_concurrency;
        let mut frees = vec![0.0; k.saturating_sub(ends.len())];
        let over = ends.len().saturating_sub(k);
        frees.extend_from_slice(&ends[over..]);
        frees
    }

    /// The wait of a request standing `place`-th in line (1 = next), at
    /// most `cap`: see [`advice`](super::advice).
    pub(super) fn retry_after(&mut self, place: usize, cap: Duration) -> Duration {
        let now = Instant::now();
        let turn = self.service_estimate(now);
        self.wait_at(place, cap, turn, now)
    }

    /// [`retry_after`](Self::retry_after) at this `turn`.
    fn wait_at(
        &mut self,
        place: usize,
        cap: Duration,
        turn: Option<f64>,
        now: Instant,
    ) -> Duration {
        let secs = match turn {
            Some(turn) => {
                let frees = self.frees(now);
                advice::start_after(place, &frees, turn, cap.as_secs_f64())
            }
            // Nothing has run yet and nothing is running, so the line is not
            // moving because of load: the earliest sensible retry.
            None => 0.0,
        };
        Duration::from_secs_f64(secs.max(0.001)).min(cap)
    }

    /// The advice for a client refused now at `priority`, that would have
    /// stood `place`-th in the queue: behind the clients refused before it
    /// (which it then joins), spread over a band.
    pub(super) fn advise_refused(&mut self, priority: Priority, place: usize) -> Duration {
        let cap = self.retry_after_cap;
        let now = Instant::now();
        let slots = self.max_concurrency.max(1) as f64;
        // Asked once: each ask sums the window.
        let turn = self.service_estimate(now);
        let step = match turn {
            Some(turn) => {
                self.returning.drain(self.secs(now), slots / turn.max(1e-3));
                turn / slots
            }
            None => {
                self.returning.clear();
                0.0
            }
        };
        let ahead = self.returning.ahead_of(priority);
        let center = self.wait_at(place.saturating_add(ahead), cap, turn, now);
        let most = self.places_within(cap, turn);
        self.returning.add(priority, most);
        self.jitter = self.jitter.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let unit = crate::random::unit(self.jitter);
        advice::spread(center, Duration::from_secs_f64(step), unit, cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(max_concurrency: usize, reserved: &[(Priority, usize)]) -> State {
        State::new(&Limits {
            max_concurrency,
            max_queue: 16,
            queue_timeout: Duration::from_secs(30),
            retry_after_cap: Duration::from_secs(60),
            reserved: reserved
                .iter()
                .map(|&(max_priority, slots)| Reservation {
                    max_priority,
                    slots,
                })
                .collect(),
            promote_after: None,
            preempt: None,
        })
    }

    #[test]
    fn reservations_nest_and_keep_their_slots_from_less_urgent_work() {
        // 6 slots: 1 for priority <= -10, 2 more for <= 0, 3 for anyone.
        let mut st = state(6, &[(0, 2), (-10, 1)]);
        assert_eq!(st.headroom_for(5, false, None), 3);
        assert_eq!(st.headroom_for(0, false, None), 5);
        assert_eq!(st.headroom_for(-10, false, None), 6);
        let now = Instant::now();
        for _ in 0..3 {
            st.start(5, 0, now);
        }
        // The shared three are used: only reserved slots are left.
        assert_eq!(st.headroom_for(5, false, None), 0);
        assert_eq!(st.headroom_for(0, false, None), 2);
        assert_eq!(st.headroom_for(-10, false, None), 3);
        // Counting a request that is just finishing as gone frees its slot.
        assert_eq!(st.headroom_for(5, false, Some(5)), 1);
        st.start(0, 0, now);
        st.start(0, 0, now);
        assert_eq!(st.headroom_for(0, false, None), 0);
        assert_eq!(st.headroom_for(-10, false, None), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn advice_follows_the_place_the_turn_time_and_what_runs() {
        let mut st = state(2, &[]);
        let cap = Duration::from_secs(60);
        // Nothing ran and nothing runs: the earliest sensible retry.
        assert_eq!(st.retry_after(5, cap), Duration::from_millis(1));
        let t0 = Instant::now();
        let slot = st.start(0, 0, t0);
        tokio::time::advance(Duration::from_secs(4)).await;
        st.finish(0, 0, slot, t0, Instant::now());
        // One turn took 4 s. Both slots taken now, one 1 s ago, one just.
        st.start(0, 0, Instant::now() - Duration::from_secs(1));
        st.start(0, 0, Instant::now());
        let ms = |st: &mut State, p| st.retry_after(p, cap).as_millis();
        // Slots free in 3 s and 4 s, then every 4 s.
        let near = |got: u128, want: u128| got.abs_diff(want) <= 1;
        assert!(near(ms(&mut st, 1), 3000), "{}", ms(&mut st, 1));
        assert!(near(ms(&mut st, 2), 4000));
        assert!(near(ms(&mut st, 3), 7000));
        assert!(near(ms(&mut st, 4), 8000));
        assert_eq!(st.retry_after(1000, cap), cap);
        // Past 60 s * 2 / 4 s = 30 places (and a turn of the slots), every
        // place advises the cap.
        assert_eq!(st.places_that_matter(cap), 32);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_measured_nothing_advises_from_the_clusters_turn() {
        let cap = Duration::from_secs(60);
        let mut st = state(2, &[]);
        st.start(0, 0, Instant::now());
        st.start(0, 0, Instant::now());
        tokio::time::advance(Duration::from_millis(500)).await;
        // Cold, alone: each running request is assumed to run as long
        // again as it ran (0.5 s), then a slot turns every 0.5 s.
        let ms = |st: &mut State, p| st.retry_after(p, cap).as_millis();
        assert_eq!(ms(&mut st, 1), 500);
        assert_eq!(ms(&mut st, 3), 1000);
        // The cluster drains a slot every 2 s at this replica's share: the
        // running ones have 1.5 s left, then every 2 s.
        st.shared_turn = Some(2.0);
        assert_eq!(ms(&mut st, 1), 1500);
        assert_eq!(ms(&mut st, 3), 3500);
        // Once this replica measured its own turns, they decide.
        let slot = st.start(0, 0, Instant::now());
        tokio::time::advance(Duration::from_millis(300)).await;
        st.finish(
            0,
            0,
            slot,
            Instant::now() - Duration::from_millis(300),
            Instant::now(),
        );
        assert!(ms(&mut st, 3) < 1500, "{}", ms(&mut st, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_refusals_is_told_to_come_back_one_after_another() {
        let mut st = state(1, &[]);
        for _ in 0..10 {
            let t0 = Instant::now();
            let slot = st.start(0, 0, t0);
            tokio::time::advance(Duration::from_millis(500)).await;
            st.finish(0, 0, slot, t0, Instant::now());
        }
        let running = st.start(0, 0, Instant::now());
        // Fifty refused at once, all seeing the same queue (place 3).
        let advised: Vec<Duration> = (0..50).map(|_| st.advise_refused(0, 3)).collect();
        // Each comes back after the one before, by about a turn.
        let mut sorted = advised.clone();
        sorted.sort();
        let spread = sorted[49] - sorted[0];
        assert!(spread >= Duration::from_secs(20), "spread {spread:?}");
        assert!(advised[49] > advised[0]);
        // The first is told when place 3 starts (1.5 s: the running
        // request's 0.5 s and two turns), the last when place 52 would
        // (26 s), each up to a fifth later.
        let first = advised[0].as_secs_f64();
        assert!((1.5..=1.8).contains(&first), "{first}");
        let last = advised[49].as_secs_f64();
        assert!((26.0..=31.2).contains(&last), "{last}");
        // Time passes, the slot turning every 0.5 s: the line they form
        // drains with it.
        let mut slot = running;
        for _ in 0..50 {
            tokio::time::advance(Duration::from_millis(500)).await;
            st.finish(
                0,
                0,
                slot,
                Instant::now() - Duration::from_millis(500),
                Instant::now(),
            );
            slot = st.start(0, 0, Instant::now());
        }
        let later = st.advise_refused(0, 3).as_secs_f64();
        assert!((1.5..=1.8).contains(&later), "{later}");
    }
}
