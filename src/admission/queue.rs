//! The waiting room: a bounded priority queue as plain synchronous state.
//!
//! No tokio, no I/O, no locks: [`Scheduler`](super::Scheduler) wraps it in a
//! short critical section. Keeping the ordering logic here makes it testable
//! and benchable on its own.
//!
//! Order is `(priority, arrival)`: a lower priority number is served sooner
//! (vLLM's convention), and within one priority the earlier arrival goes first.
//! Every entry is addressed by its [`Key`], so a waiter that gives up (client
//! disconnect, queue timeout) removes itself in `O(log n)`.

use std::collections::BTreeMap;

use crate::classify::Priority;

/// Where an entry stands in the queue: its priority, then its arrival number.
///
/// Keys order exactly as the queue serves them, so the smallest key is next
/// and the largest key is the least urgent, most recently queued entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    priority: Priority,
    seq: u64,
}

impl Key {
    /// The priority this entry was queued with.
    pub fn priority(&self) -> Priority {
        self.priority
    }
}

/// What happened to an entry offered to a full or non-full queue.
#[derive(Debug)]
pub enum Push<T> {
    /// Queued under this key.
    Queued(Key),
    /// Queued under `key`; to make room, the least urgent, most recently
    /// queued entry was taken out and is handed back with its key.
    Evicted {
        /// Where the new item stands.
        key: Key,
        /// The key the evicted entry had.
        victim_key: Key,
        /// The evicted entry.
        victim: T,
    },
    /// The queue is full of entries at least as urgent: the item is handed back.
    Full(T),
}

/// A bounded priority queue.
#[derive(Debug)]
pub struct PriorityQueue<T> {
    entries: BTreeMap<Key, T>,
    next_seq: u64,
    capacity: usize,
}

impl<T> PriorityQueue<T> {
    /// A queue that holds at most `capacity` entries (0: it never holds any).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            next_seq: 0,
            capacity,
        }
    }

    /// Most entries it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Change the bound. Entries already queued stay, even above a lowered
    /// bound: they were promised a place.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Offer an item. When the queue is full, a strictly more urgent item
    /// evicts the least urgent, most recently queued one; otherwise it is
    /// refused. An equally urgent item never evicts: it would be served after
    /// every entry of its priority anyway.
    pub fn push(&mut self, priority: Priority, item: T) -> Push<T> {
        let key = Key {
            priority,
            seq: self.next_seq,
        };
        if self.entries.len() < self.capacity {
            self.next_seq += 1;
            self.entries.insert(key, item);
            return Push::Queued(key);
        }
        match self.entries.last_key_value() {
            Some((worst, _)) if worst.priority > priority => {
                let (victim_key, victim) =
                    self.entries.pop_last().expect("checked non-empty above");
                self.next_seq += 1;
                self.entries.insert(key, item);
                Push::Evicted {
                    key,
                    victim_key,
                    victim,
                }
            }
            _ => Push::Full(item),
        }
    }

    /// Take the most urgent, earliest entry.
    pub fn pop(&mut self) -> Option<(Key, T)> {
        self.entries.pop_first()
    }

    /// Look at the entry [`pop`](Self::pop) would take.
    pub fn peek(&self) -> Option<(&Key, &T)> {
        self.entries.first_key_value()
    }

    /// Take out one entry, wherever it stands (a waiter that gave up).
    pub fn remove(&mut self, key: &Key) -> Option<T> {
        self.entries.remove(key)
    }

    /// How many entries would be served before an entry of `priority`
    /// arriving now. `O(n)` in the worst case: used when answering a
    /// rejection, never on the admission path.
    pub fn ahead_of_new(&self, priority: Priority) -> usize {
        let bound = Key {
            priority,
            seq: self.next_seq,
        };
        self.entries.range(..bound).count()
    }

    /// How many entries stand before `key`. `O(n)`, as [`ahead_of_new`](Self::ahead_of_new).
    pub fn ahead_of(&self, key: &Key) -> usize {
        self.entries.range(..*key).count()
    }

    /// Entries in serving order (for status pages and tests).
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &T)> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut PriorityQueue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| q.pop().map(|(_, v)| v)).collect()
    }

    #[test]
    fn serves_by_priority_then_arrival() {
        let mut q = PriorityQueue::new(10);
        q.push(5, "a5");
        q.push(0, "b0");
        q.push(5, "c5");
        q.push(-3, "d-3");
        q.push(0, "e0");
        assert_eq!(drain(&mut q), ["d-3", "b0", "e0", "a5", "c5"]);
    }

    #[test]
    fn full_queue_refuses_equal_or_less_urgent() {
        let mut q = PriorityQueue::new(2);
        q.push(1, "a");
        q.push(1, "b");
        assert!(matches!(q.push(1, "c"), Push::Full("c")));
        assert!(matches!(q.push(7, "d"), Push::Full("d")));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn more_urgent_evicts_least_urgent_most_recent() {
        let mut q = PriorityQueue::new(3);
        q.push(5, "old5");
        q.push(5, "new5");
        q.push(1, "one");
        match q.push(0, "urgent") {
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
        assert!(matches!(q.push(-100, "x"), Push::Full("x")));
        assert!(q.is_empty());
    }

    #[test]
    fn remove_takes_one_entry_out_wherever_it_stands() {
        let mut q = PriorityQueue::new(10);
        let _a = q.push(0, "a");
        let Push::Queued(b) = q.push(0, "b") else {
            panic!("room left")
        };
        q.push(0, "c");
        assert_eq!(q.remove(&b), Some("b"));
        assert_eq!(q.remove(&b), None);
        assert_eq!(drain(&mut q), ["a", "c"]);
    }

    #[test]
    fn counts_entries_ahead() {
        let mut q = PriorityQueue::new(10);
        q.push(0, "a");
        let Push::Queued(k) = q.push(3, "b") else {
            panic!()
        };
        q.push(1, "c");
        q.push(3, "d");
        assert_eq!(q.ahead_of(&k), 2);
        assert_eq!(q.ahead_of_new(3), 4);
        assert_eq!(q.ahead_of_new(1), 2);
        assert_eq!(q.ahead_of_new(-1), 0);
    }

    #[test]
    fn lowered_capacity_keeps_queued_entries() {
        let mut q = PriorityQueue::new(3);
        q.push(0, "a");
        q.push(0, "b");
        q.push(0, "c");
        q.set_capacity(1);
        assert_eq!(q.len(), 3);
        assert!(matches!(q.push(0, "d"), Push::Full("d")));
        assert_eq!(drain(&mut q), ["a", "b", "c"]);
    }
}
