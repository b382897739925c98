//! The waiting room: a bounded priority queue with fair sharing among
//! tenants, as plain synchronous state.
//!
//! No I/O, no locks: [`Scheduler`](super::Scheduler) wraps it in a short
//! critical section. Keeping the ordering logic here makes it testable and
//! benchable on its own.
//!
//! # Order
//! Across priorities the order is strict: a lower priority number is served
//! sooner (vLLM's convention). Within one priority, tenants share by weight
//! with start-time fair queuing (Goyal, Vin & Cheng, 1996): each entry gets a
//! virtual start tag `max(V, F)`, where `V` is the tag of the entry of that
//! priority served last and `F` the finish tag of the tenant's previous
//! entry; the tenant's finish tag then moves on by `1 / weight`. Entries are
//! served by `(priority, tag, arrival)`. A tenant that floods 500 requests
//! gets tags 0, 1, 2, …; one that then sends 20 starts at the current `V`,
//! so its requests interleave with the flood instead of waiting behind it,
//! and weights 3:1 serve three of one for each of the other. With a single
//! tenant the tags grow with arrival and the order is plain FIFO.
//!
//! Every entry is addressed by its [`Place`], so a waiter that gives up (client
//! disconnect, queue timeout) removes itself in `O(log n)`.
//!
//! # Per-tenant caps and aging
//! A tenant may be at its cap of requests in flight: the scheduler then
//! [`park`](PriorityQueue::park)s its entry, out of the way of the others,
//! and [`unpark`](PriorityQueue::unpark)s one when one of the tenant's
//! requests finishes. With aging on, an entry that has waited longer than the
//! promotion age is served before everything else (oldest first), so low
//! priority work is never starved forever.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::types::{Priority, TenantId};

/// Virtual time one request of a weight-1 tenant takes. A tenant of weight
/// `w` advances by `VIRTUAL_UNIT / w`.
const VIRTUAL_UNIT: u64 = 1 << 20;

/// Maps keyed by tenant ids. The ids are hashes already, so they are mixed
/// with one multiply instead of SipHash (which cost ~500 instructions per
/// request across the scheduler's lookups). Not exposed to attackers: ids of
/// other tenants than keys are SipHash outputs of what clients send.
pub(crate) type TenantMap<V> = HashMap<TenantId, V, std::hash::BuildHasherDefault<IdHasher>>;

/// See [`TenantMap`].
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_i32(&mut self, n: i32) {
        self.write_u64(n as u64);
    }
}

/// Where an entry stands in the queue.
///
/// Places order exactly as the queue serves them (aging aside), so the
/// smallest is next and the largest is the least urgent entry of the tenant
/// furthest ahead of its share: the one to evict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    priority: Priority,
    /// Its deadline (milliseconds from the queue's epoch), `u64::MAX`
    /// without one: within a priority, the nearest goes first.
    due: u64,
    tag: u64,
    seq: u64,
    tenant: TenantId,
}

impl Place {
    /// The priority this entry was queued with.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The tenant it belongs to.
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// Its place in the arrival order.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether it was queued with a deadline of its own.
    pub fn has_deadline(&self) -> bool {
        self.due != NO_DEADLINE
    }
}

/// The `due` of a place without a deadline: after every one with one.
const NO_DEADLINE: u64 = u64::MAX;

/// What happened to an entry offered to a full or non-full queue.
#[derive(Debug)]
pub enum Push<T> {
    /// Queued under this key.
    Queued(Place),
    /// Queued under `key`; to make room, the least urgent entry was taken
    /// out and is handed back with its key.
    Evicted {
        /// Where the new item stands.
        key: Place,
        /// The key the evicted entry had.
        victim_key: Place,
        /// The evicted entry.
        victim: T,
    },
    /// The queue is full of entries at least as urgent: the item is handed back.
    Full(T),
}

#[derive(Debug)]
struct Slot<T> {
    item: T,
    arrived: Instant,
}

/// One priority's fair-queuing state.
#[derive(Debug, Default)]
struct Level {
    /// Entries of this priority, parked ones included.
    waiting: usize,
    /// Tag of the entry of this priority served last.
    vtime: u64,
}

/// A tenant's state at one priority.
#[derive(Debug)]
struct Flow {
    /// Its entries at this priority, parked ones included.
    waiting: usize,
    /// Tag its next entry starts at, at the earliest.
    finish: u64,
}

/// A bounded priority queue, fair among tenants within a priority.
#[derive(Debug)]
pub struct PriorityQueue<T> {
    entries: BTreeMap<Place, Slot<T>>,
    levels: BTreeMap<Priority, Level>,
    flows: HashMap<(TenantId, Priority), Flow, std::hash::BuildHasherDefault<IdHasher>>,
    /// Entries of tenants at their cap, by tenant, out of the serving order.
    parked: TenantMap<BTreeMap<Place, Slot<T>>>,
    parked_len: usize,
    /// With aging on: the entries in `entries`, by arrival.
    arrivals: Option<BTreeMap<u64, Place>>,
    promote_after: Duration,
    next_seq: u64,
    capacity: usize,
    /// What deadlines are counted from.
    epoch: Instant,
}

impl<T> PriorityQueue<T> {
    /// A queue that holds at most `capacity` entries (0: it never holds any).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            levels: BTreeMap::new(),
            flows: HashMap::default(),
            parked: TenantMap::default(),
            parked_len: 0,
            arrivals: None,
            promote_after: Duration::MAX,
            next_seq: 0,
            capacity,
            epoch: Instant::now(),
        }
    }

    /// A deadline as a place's `due`.
    fn due(&self, deadline: Option<Instant>) -> u64 {
        match deadline {
            None => NO_DEADLINE,
            Some(t) => {
                let ms = t.saturating_duration_since(self.epoch).as_millis();
                ms.min(u128::from(NO_DEADLINE - 1)) as u64
            }
        }
    }

    /// Serve an entry that has waited `age` before anything else (none: never).
    pub fn set_promote_after(&mut self, age: Option<Duration>) {
        match age {
            Some(age) => {
                self.promote_after = age;
                if self.arrivals.is_none() {
                    self.arrivals = Some(self.entries.keys().map(|k| (k.seq, *k)).collect());
                }
            }
            None => {
                self.promote_after = Duration::MAX;
                self.arrivals = None;
            }
        }
    }

    /// Most entries it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Change the bound. Entries already queued stay, even above a lowered
    /// bound: they were promised a place.
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Entries waiting, parked ones included.
    pub fn len(&self) -> usize {
        self.entries.len() + self.parked_len
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries waiting at each priority, parked ones included.
    pub fn waiting_by_priority(&self) -> impl Iterator<Item = (Priority, usize)> + '_ {
        self.levels.iter().map(|(p, l)| (*p, l.waiting))
    }

    /// The key an entry of `tenant` at `priority` (due by `deadline`)
    /// would get now.
    fn key_for(&self, priority: Priority, deadline: Option<Instant>, tenant: TenantId) -> Place {
        let vtime = self.levels.get(&priority).map_or(0, |l| l.vtime);
        let finish = self.flows.get(&(tenant, priority)).map_or(0, |f| f.finish);
        Place {
            priority,
            due: self.due(deadline),
            tag: vtime.max(finish),
            seq: self.next_seq,
            tenant,
        }
    }

    /// Offer an item of `tenant` (of `weight`, at least 1) at `priority`.
    /// When the queue is full, a strictly more urgent item evicts the least
    /// urgent entry (of the tenant furthest ahead of its share, its most
    /// recent); otherwise it is refused. An equally urgent item never evicts.
    pub fn push(
        &mut self,
        priority: Priority,
        tenant: TenantId,
        weight: u32,
        now: Instant,
        item: T,
    ) -> Push<T> {
        self.push_due(priority, None, tenant, weight, now, item)
    }

    /// [`push`](Self::push) an item that must start by `deadline`: within
    /// its priority it goes before those due later and those without one
    /// (it still takes a fair-queuing tag, so its tenant's share counts it).
    pub fn push_due(
        &mut self,
        priority: Priority,
        deadline: Option<Instant>,
        tenant: TenantId,
        weight: u32,
        now: Instant,
        item: T,
    ) -> Push<T> {
        if self.len() >= self.capacity {
            let victim_key = match self.entries.last_key_value() {
                Some((worst, _)) if worst.priority > priority => *worst,
                _ => return Push::Full(item),
            };
            let victim = self.remove(&victim_key).expect("the last key is present");
            let key = self.insert(priority, deadline, tenant, weight, now, item);
            return Push::Evicted {
                key,
                victim_key,
                victim,
            };
        }
        Push::Queued(self.insert(priority, deadline, tenant, weight, now, item))
    }

    fn insert(
        &mut self,
        priority: Priority,
        deadline: Option<Instant>,
        tenant: TenantId,
        weight: u32,
        now: Instant,
        item: T,
    ) -> Place {
        let key = self.key_for(priority, deadline, tenant);
        self.next_seq += 1;
        self.levels.entry(priority).or_default().waiting += 1;
        let flow = self.flows.entry((tenant, priority)).or_insert(Flow {
            waiting: 0,
            finish: 0,
        });
        flow.waiting += 1;
        flow.finish = key.tag + VIRTUAL_UNIT / u64::from(weight.max(1));
        self.entries.insert(key, Slot { item, arrived: now });
        if let Some(arrivals) = &mut self.arrivals {
            arrivals.insert(key.seq, key);
        }
        key
    }

    /// A place in the arrival order for a request that started without
    /// waiting, should it ever be put back (see [`restore`](Self::restore)).
    pub(crate) fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Put back a request that was taken out to run and stopped (a
    /// preempted one), ahead of everything of its priority that arrived
    /// after it: with its arrival `seq` and `arrived` (for aging), and a tag
    /// no later than the one served last, so it is first of its priority
    /// among those queued since. Above the bound if need be: it had a place
    /// already. Returns its key.
    pub fn restore(
        &mut self,
        priority: Priority,
        tenant: TenantId,
        weight: u32,
        seq: u64,
        arrived: Instant,
        item: T,
    ) -> Place {
        let level = self.levels.entry(priority).or_default();
        level.waiting += 1;
        let key = Place {
            priority,
            due: NO_DEADLINE,
            tag: level.vtime,
            seq,
            tenant,
        };
        let flow = self.flows.entry((tenant, priority)).or_insert(Flow {
            waiting: 0,
            finish: 0,
        });
        flow.waiting += 1;
        flow.finish = flow
            .finish
            .max(key.tag + VIRTUAL_UNIT / u64::from(weight.max(1)));
        self.entries.insert(key, Slot { item, arrived });
        if let Some(arrivals) = &mut self.arrivals {
            arrivals.insert(key.seq, key);
        }
        key
    }

    /// Whether `key` waits here (parked or not).
    pub fn contains(&self, key: &Place) -> bool {
        self.entries.contains_key(key)
            || self
                .parked
                .get(&key.tenant)
                .is_some_and(|p| p.contains_key(key))
    }

    /// The item of a queued (not parked) entry.
    pub fn get(&self, key: &Place) -> Option<&T> {
        self.entries.get(key).map(|s| &s.item)
    }

    /// The entry to serve next: the oldest one if it has waited past the
    /// promotion age, else the first in order. Parked entries are not
    /// candidates.
    pub fn next(&self, now: Instant) -> Option<Place> {
        if let Some((_, oldest)) = self.arrivals.as_ref().and_then(|a| a.first_key_value()) {
            let slot = &self.entries[oldest];
            if now.saturating_duration_since(slot.arrived) >= self.promote_after {
                return Some(*oldest);
            }
        }
        self.first()
    }

    /// The first entry in order (by priority, fair tag, arrival).
    pub fn first(&self) -> Option<Place> {
        self.entries.first_key_value().map(|(k, _)| *k)
    }

    /// Take the entry [`next`](Self::next) chose (or any other) to serve
    /// it: its priority's virtual time moves to its tag.
    pub fn take(&mut self, key: &Place) -> Option<T> {
        let item = self.remove(key)?;
        // One served ahead of its turn for its deadline does not move the
        // virtual time: the others' next tags stay where fair shares put
        // them.
        if let Some(level) = self
            .levels
            .get_mut(&key.priority)
            .filter(|_| !key.has_deadline())
        {
            level.vtime = level.vtime.max(key.tag);
        }
        Some(item)
    }

    /// Take the next entry to serve, as [`next`](Self::next) chooses.
    pub fn pop(&mut self, now: Instant) -> Option<(Place, T)> {
        let key = self.next(now)?;
        let item = self.take(&key)?;
        Some((key, item))
    }

    /// Take out one entry, wherever it stands (a waiter that gave up, an
    /// evicted one). Serving order is not affected.
    pub fn remove(&mut self, key: &Place) -> Option<T> {
        let slot = match self.entries.remove(key) {
            Some(slot) => {
                if let Some(arrivals) = &mut self.arrivals {
                    arrivals.remove(&key.seq);
                }
                slot
            }
            None => {
                let parked = self.parked.get_mut(&key.tenant)?;
                let slot = parked.remove(key)?;
                if parked.is_empty() {
                    self.parked.remove(&key.tenant);
                }
                self.parked_len -= 1;
                slot
            }
        };
        if let Some(level) = self.levels.get_mut(&key.priority) {
            level.waiting -= 1;
            if level.waiting == 0 {
                // Nothing left at this priority, so no flow either: virtual
                // time may start again from zero.
                self.levels.remove(&key.priority);
            }
        }
        let flow_key = (key.tenant, key.priority);
        if let Some(flow) = self.flows.get_mut(&flow_key) {
            flow.waiting -= 1;
            if flow.waiting == 0 {
                self.flows.remove(&flow_key);
            }
        }
        Some(slot.item)
    }

    /// Set an entry aside: its tenant may not start more now. It keeps its
    /// key and its place in the bound.
    pub fn park(&mut self, key: &Place) {
        if let Some(slot) = self.entries.remove(key) {
            if let Some(arrivals) = &mut self.arrivals {
                arrivals.remove(&key.seq);
            }
            self.parked
                .entry(key.tenant)
                .or_default()
                .insert(*key, slot);
            self.parked_len += 1;
        }
    }

    /// Put the most urgent parked entry of `tenant` back in line (one of its
    /// requests finished).
    pub fn unpark(&mut self, tenant: TenantId) {
        let Some(parked) = self.parked.get_mut(&tenant) else {
            return;
        };
        let Some((key, slot)) = parked.pop_first() else {
            return;
        };
        if parked.is_empty() {
            self.parked.remove(&tenant);
        }
        self.parked_len -= 1;
        if let Some(arrivals) = &mut self.arrivals {
            arrivals.insert(key.seq, key);
        }
        self.entries.insert(key, slot);
    }

    /// Take every entry out, parked ones included, in no particular order.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out: Vec<T> = std::mem::take(&mut self.entries)
            .into_values()
            .map(|s| s.item)
            .collect();
        for (_, parked) in self.parked.drain() {
            out.extend(parked.into_values().map(|s| s.item));
        }
        self.parked_len = 0;
        self.levels.clear();
        self.flows.clear();
        if let Some(arrivals) = &mut self.arrivals {
            arrivals.clear();
        }
        out
    }

    /// How many entries would be served before an entry of `tenant` at
    /// `priority` arriving now, counted up to `most` (past it the answer
    /// changes nothing: the advised wait is at its cap). `O(most)`: a
    /// rejection, under the scheduler's lock, costs no more with 10,000
    /// queued than with a hundred.
    pub fn ahead_of_new(
        &self,
        priority: Priority,
        deadline: Option<Instant>,
        tenant: TenantId,
        most: usize,
    ) -> usize {
        let bound = self.key_for(priority, deadline, tenant);
        self.entries.range(..bound).take(most).count()
    }

    /// How many entries stand before `key`, up to `most`, as
    /// [`ahead_of_new`](Self::ahead_of_new).
    pub(crate) fn ahead_of(&self, key: &Place, most: usize) -> usize {
        self.entries.range(..*key).take(most).count()
    }

    /// Entries in serving order, parked ones left out (for tests).
    pub fn iter(&self) -> impl Iterator<Item = (&Place, &T)> {
        self.entries.iter().map(|(k, s)| (k, &s.item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    fn push<T>(q: &mut PriorityQueue<T>, priority: Priority, item: T) -> Push<T> {
        q.push(priority, 0, 1, now(), item)
    }

    fn drain<T>(q: &mut PriorityQueue<T>) -> Vec<T> {
        let t = now();
        std::iter::from_fn(|| q.pop(t).map(|(_, v)| v)).collect()
    }

    #[test]
    fn serves_by_priority_then_arrival() {
        let mut q = PriorityQueue::new(10);
        push(&mut q, 5, "a5");
        push(&mut q, 0, "b0");
        push(&mut q, 5, "c5");
        push(&mut q, -3, "d-3");
        push(&mut q, 0, "e0");
        assert_eq!(drain(&mut q), ["d-3", "b0", "e0", "a5", "c5"]);
    }

    #[test]
    fn full_queue_refuses_equal_or_less_urgent() {
        let mut q = PriorityQueue::new(2);
        push(&mut q, 1, "a");
        push(&mut q, 1, "b");
        assert!(matches!(push(&mut q, 1, "c"), Push::Full("c")));
        assert!(matches!(push(&mut q, 7, "d"), Push::Full("d")));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn more_urgent_evicts_least_urgent_most_recent() {
        let mut q = PriorityQueue::new(3);
        push(&mut q, 5, "old5");
        push(&mut q, 5, "new5");
        push(&mut q, 1, "one");
        match push(&mut q, 0, "urgent") {
            Push::Evicted {
                key,
                victim_key,
                victim,
            } => {
                assert_eq!(victim, "new5");
                assert_eq!(victim_key.priority(), 5);
                assert_eq!(key.priority(), 0);
            }
            other => panic!("expected eviction, got {other:?}"),
        }
        assert_eq!(drain(&mut q), ["urgent", "one", "old5"]);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut q = PriorityQueue::new(0);
        assert!(matches!(push(&mut q, -100, "x"), Push::Full("x")));
        assert!(q.is_empty());
    }

    #[test]
    fn remove_takes_one_entry_out_wherever_it_stands() {
        let mut q = PriorityQueue::new(10);
        push(&mut q, 0, "a");
        let Push::Queued(b) = push(&mut q, 0, "b") else {
            panic!("room left")
        };
        push(&mut q, 0, "c");
        assert_eq!(q.remove(&b), Some("b"));
        assert_eq!(q.remove(&b), None);
        assert_eq!(drain(&mut q), ["a", "c"]);
    }

    #[test]
    fn counts_entries_ahead() {
        let mut q = PriorityQueue::new(10);
        push(&mut q, 0, "a");
        let Push::Queued(k) = push(&mut q, 3, "b") else {
            panic!()
        };
        push(&mut q, 1, "c");
        push(&mut q, 3, "d");
        assert_eq!(q.ahead_of(&k, usize::MAX), 2);
        assert_eq!(q.ahead_of_new(3, None, 0, usize::MAX), 4);
        assert_eq!(q.ahead_of_new(1, None, 0, usize::MAX), 2);
        assert_eq!(q.ahead_of_new(-1, None, 0, usize::MAX), 0);
        // Counted only as far as it matters.
        assert_eq!(q.ahead_of(&k, 1), 1);
        assert_eq!(q.ahead_of_new(3, None, 0, 3), 3);
    }

    #[test]
    fn lowered_capacity_keeps_queued_entries() {
        let mut q = PriorityQueue::new(3);
        push(&mut q, 0, "a");
        push(&mut q, 0, "b");
        push(&mut q, 0, "c");
        q.set_capacity(1);
        assert_eq!(q.len(), 3);
        assert!(matches!(push(&mut q, 0, "d"), Push::Full("d")));
        assert_eq!(drain(&mut q), ["a", "b", "c"]);
    }

    /// Serve `n` entries; which tenant each belonged to.
    fn serve(q: &mut PriorityQueue<TenantId>, n: usize) -> Vec<TenantId> {
        let t = now();
        (0..n).filter_map(|_| q.pop(t).map(|(_, v)| v)).collect()
    }

    #[test]
    fn a_late_tenant_interleaves_with_a_flood() {
        let mut q = PriorityQueue::new(1000);
        for _ in 0..500 {
            q.push(0, 1, 1, now(), 1);
        }
        // Two of the flood are served before the other tenant shows up.
        assert_eq!(serve(&mut q, 2), [1, 1]);
        for _ in 0..20 {
            q.push(0, 2, 1, now(), 2);
        }
        let order = serve(&mut q, 40);
        for pair in order.chunks(2) {
            assert!(
                pair.contains(&1) && pair.contains(&2),
                "turn about: {order:?}"
            );
        }
        assert!(serve(&mut q, 1000).iter().all(|t| *t == 1));
    }

    #[test]
    fn weights_set_the_shares() {
        let mut q = PriorityQueue::new(10_000);
        for _ in 0..1000 {
            q.push(0, 1, 3, now(), 1);
            q.push(0, 2, 1, now(), 2);
        }
        let first = serve(&mut q, 400);
        let ones = first.iter().filter(|t| **t == 1).count();
        assert_eq!(ones, 300, "3:1 over any long enough window");
        // Within every window of four, three of the weight-3 tenant.
        for w in first.chunks(4) {
            assert_eq!(w.iter().filter(|t| **t == 1).count(), 3, "{w:?}");
        }
    }

    #[test]
    fn fairness_stays_within_a_priority() {
        let mut q = PriorityQueue::new(100);
        for _ in 0..5 {
            q.push(5, 1, 1, now(), 1);
        }
        for _ in 0..5 {
            q.push(0, 2, 1, now(), 2);
        }
        assert_eq!(serve(&mut q, 10), [2, 2, 2, 2, 2, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn eviction_hits_the_tenant_furthest_ahead_of_its_share() {
        let mut q = PriorityQueue::new(6);
        for _ in 0..5 {
            q.push(5, 1, 1, now(), 1);
        }
        q.push(5, 2, 1, now(), 2);
        let Push::Evicted { victim, .. } = q.push(0, 3, 1, now(), 3) else {
            panic!("full: expected an eviction")
        };
        assert_eq!(victim, 1);
        assert_eq!(q.len(), 6);
    }

    #[test]
    fn parked_entries_wait_aside_and_come_back_in_order() {
        let mut q = PriorityQueue::new(10);
        let mut keys = vec![];
        for i in 0..3 {
            if let Push::Queued(k) = q.push(0, 1, 1, now(), 10 + i) {
                keys.push(k);
            }
        }
        q.push(0, 2, 1, now(), 20);
        // Tenant 1 is at its cap: its entries go aside, tenant 2's is next.
        for k in &keys {
            q.park(k);
        }
        assert_eq!(q.len(), 4);
        assert_eq!(q.pop(now()).map(|(_, v)| v), Some(20));
        assert_eq!(q.pop(now()), None);
        q.unpark(1);
        assert_eq!(q.pop(now()).map(|(_, v)| v), Some(10));
        // A parked entry can still leave (its client went away).
        assert_eq!(q.remove(&keys[2]), Some(12));
        q.unpark(1);
        assert_eq!(drain(&mut q), [11]);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_older_than_the_promotion_age_goes_first() {
        let mut q = PriorityQueue::new(10);
        q.set_promote_after(Some(Duration::from_secs(10)));
        q.push(10, 1, 1, Instant::now(), "batch");
        tokio::time::advance(Duration::from_secs(6)).await;
        q.push(0, 2, 1, Instant::now(), "chat1");
        q.push(0, 2, 1, Instant::now(), "chat2");
        assert_eq!(q.pop(Instant::now()).map(|(_, v)| v), Some("chat1"));
        tokio::time::advance(Duration::from_secs(5)).await;
        // The batch entry waited 11 s: promoted past the waiting chat2.
        assert_eq!(drain(&mut q), ["batch", "chat2"]);
    }

    #[test]
    fn levels_and_flows_are_forgotten_when_empty() {
        let mut q = PriorityQueue::new(10);
        for p in 0..5 {
            q.push(p, p as u64, 1, now(), ());
        }
        drain(&mut q);
        assert!(q.levels.is_empty() && q.flows.is_empty() && q.parked.is_empty());
    }
}
