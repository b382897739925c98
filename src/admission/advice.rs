//! When a refused client should come back.
//!
//! A refused request is told how long until a request standing where it
//! would stand gets a slot. Three things go into it:
//!
//! - **The slots' next turns.** Each running request ends after its
//!   remaining time: how much longer recent requests that ran at least as
//!   long went on (the median of those residuals), so a request that has
//!   run 1.5 s of a usual 2 s frees its slot in 0.5 s, not in 2 s. After
//!   that each slot turns over every *turn time*.
//! - **A robust turn time.** The mean of the last [`WINDOW`] hold times
//!   with the top and bottom tenth left out: one 48 s generation among
//!   0.5 s ones does not move it, yet a real mix of long and short requests
//!   (which drains at the rate of their mean, not their median) is kept.
//!   Before anything completed nothing is known: the oldest running
//!   request's age (a lower bound of its hold time), at least
//!   [`COLD_TURN_SECS`], and a running request is assumed to run as long
//!   again as it has run. The first advice of a cold start is short and
//!   grows with the age of what runs, instead of guessing a constant.
//! - **The clients told already.** Every client refused at one moment
//!   sees the same queue; told the same delay, they would come back at one
//!   instant and be refused again. Refused clients are counted as a
//!   virtual line behind the queue, which drains at the slots' rate, so
//!   the n-th of a burst is advised as n-th behind the queue. On top, each
//!   advice is spread at random over a band ([`SPREAD`] of it, at least
//!   one turn of the line), always within the ceiling.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::types::Priority;

/// Hold times kept for the turn-time estimate.
pub(super) const WINDOW: usize = 64;

/// Until anything completed, a slot is assumed to turn over in at least
/// this long: short, so that a cold start's first advice is soon, and
/// grown by the age of the running requests as they run.
pub(super) const COLD_TURN_SECS: f64 = 0.1;

/// The width of the band an advice is spread over, as a share of it.
pub(super) const SPREAD: f64 = 0.2;

/// The last [`WINDOW`] hold times (dispatch to last byte), in seconds.
#[derive(Debug, Default)]
pub(super) struct TurnTimes {
    ring: Vec<f64>,
    next: usize,
    /// `ring`, sorted: kept so as each completion comes (a binary search
    /// and a move of at most [`WINDOW`] numbers), so a read never sorts.
    sorted: Vec<f64>,
}

impl TurnTimes {
    /// A request held its slot for `secs`.
    pub(super) fn record(&mut self, secs: f64) {
        if self.ring.len() < WINDOW {
            self.ring.push(secs);
        } else {
            let old = std::mem::replace(&mut self.ring[self.next], secs);
            let at = self.sorted.partition_point(|d| d.total_cmp(&old).is_lt());
            self.sorted.remove(at);
        }
        self.next = (self.next + 1) % WINDOW;
        let at = self.sorted.partition_point(|d| d.total_cmp(&secs).is_lt());
        self.sorted.insert(at, secs);
    }

    /// The turn time: the mean with the top and bottom tenth (at least one
    /// each, from three samples on) left out. None before any completion.
    pub(super) fn turn(&self) -> Option<f64> {
        let s = &self.sorted;
        let n = s.len();
        if n == 0 {
            return None;
        }
        let trim = n.div_ceil(10).min((n - 1) / 2);
        let kept = &s[trim..n - trim];
        Some(kept.iter().sum::<f64>() / kept.len() as f64)
    }

    /// How much longer a request that has held its slot for `age` seconds
    /// holds it: the median residual of the recent requests that ran
    /// longer; as long again as it ran when none did (or nothing is known).
    pub(super) fn remaining(&self, age: f64) -> f64 {
        let s = &self.sorted;
        let from = s.partition_point(|&d| d <= age);
        let longer = &s[from..];
        match longer.len() {
            0 => age.max(if s.is_empty() { COLD_TURN_SECS } else { 0.0 }),
            n => longer[n / 2] - age,
        }
    }
}

/// Seconds until the `place`-th in line (1 = next) gets a slot, at most
/// `cap`: slot `i` frees `frees[i]` seconds from now, then every `turn`.
/// The exact start of the deterministic model (found by bisection on the
/// count of starts by a time, to a millisecond).
pub(super) fn start_after(place: usize, frees: &[f64], turn: f64, cap: f64) -> f64 {
    let turn = turn.max(1e-3);
    let starts_by = |t: f64| -> usize {
        frees
            .iter()
            .filter(|&&f| f <= t)
            .map(|&f| 1 + ((t - f) / turn) as usize)
            .fold(0usize, usize::saturating_add)
    };
    if frees.is_empty() || starts_by(cap) < place {
        return cap;
    }
    let (mut lo, mut hi) = (0.0, cap);
    if starts_by(lo) >= place {
        return 0.0;
    }
    while hi - lo > 1e-3 {
        let mid = (lo + hi) / 2.0;
        if starts_by(mid) >= place {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// The clients refused lately, by priority, as a line that drains at the
/// slots' rate: the places refused clients will come back to.
#[derive(Debug, Default)]
pub(super) struct Returning {
    by_priority: BTreeMap<Priority, f64>,
    /// When it was last drained, in seconds since the scheduler's epoch.
    at: f64,
}

impl Returning {
    /// Let `(now - at) * rate` of them back in, most urgent first (they
    /// were told the shortest waits).
    pub(super) fn drain(&mut self, now: f64, rate: f64) {
        let mut out = (now - self.at).max(0.0) * rate;
        self.at = now;
        while out > 0.0 {
            let Some(mut first) = self.by_priority.first_entry() else {
                return;
            };
            let n = first.get_mut();
            if *n > out {
                *n -= out;
                return;
            }
            out -= *n;
            first.remove();
        }
    }

    /// How many come back ahead of a request at `priority` (those at least
    /// as urgent).
    pub(super) fn ahead_of(&self, priority: Priority) -> usize {
        self.by_priority
            .range(..=priority)
            .map(|(_, n)| n)
            .sum::<f64>() as usize
    }

    /// One more at `priority`, while at most `most` are counted in all
    /// (past that every advice is at the ceiling anyway).
    pub(super) fn add(&mut self, priority: Priority, most: usize) {
        let total: f64 = self.by_priority.values().sum();
        if total < most as f64 {
            *self.by_priority.entry(priority).or_default() += 1.0;
        }
    }

    /// Forget them all (nothing runs, nothing waits: the line is not
    /// moving because of load).
    pub(super) fn clear(&mut self) {
        self.by_priority.clear();
    }
}

/// `center` spread over its band by `unit` (uniform in `[0, 1)`): from
/// `center` up by [`SPREAD`] of it, at least `step` wide, never past `cap`
/// (near the ceiling the band ends at it).
pub(super) fn spread(center: Duration, step: Duration, unit: f64, cap: Duration) -> Duration {
    let lo = center.min(cap.div_f64(1.0 + SPREAD));
    let width = lo.mul_f64(SPREAD).max(step);
    (lo + width.mul_f64(unit)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_long_outlier_does_not_move_the_turn_time() {
        let mut t = TurnTimes::default();
        for _ in 0..20 {
            t.record(0.5);
        }
        t.record(48.0);
        for _ in 0..5 {
            t.record(0.5);
        }
        let turn = t.turn().unwrap();
        assert!((turn - 0.5).abs() < 1e-9, "turn {turn}");
        // A short one running for 0.4 s has 0.1 s to go; the outlier's
        // like, past every short one, runs as long again.
        assert!((t.remaining(0.4) - 0.1).abs() < 1e-9);
        assert!((t.remaining(10.0) - 38.0).abs() < 1e-9);
        assert_eq!(t.remaining(60.0), 60.0);
    }

    #[test]
    fn a_real_mix_of_lengths_keeps_its_mean() {
        // Half 1 s, half 9 s: the line drains at the rate of 5 s a turn.
        let mut t = TurnTimes::default();
        for i in 0..WINDOW {
            t.record(if i % 2 == 0 { 1.0 } else { 9.0 });
        }
        assert!((t.turn().unwrap() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn the_window_forgets_old_times() {
        let mut t = TurnTimes::default();
        for _ in 0..WINDOW {
            t.record(10.0);
        }
        for _ in 0..WINDOW {
            t.record(1.0);
        }
        assert_eq!(t.turn(), Some(1.0));
    }

    #[test]
    fn the_sorted_window_is_the_ring_sorted() {
        // Kept in order as times come and go, through several wraps and
        // with repeated values.
        let mut t = TurnTimes::default();
        let mut x = 7u64;
        for i in 0..5 * WINDOW + 3 {
            x = crate::random::splitmix(x);
            t.record(((x % 50) as f64) / 10.0);
            let mut want = t.ring.clone();
            want.sort_by(f64::total_cmp);
            assert_eq!(t.sorted, want, "after {} records", i + 1);
        }
    }

    #[test]
    fn starts_follow_the_slots_and_the_turn() {
        // Two slots, freeing in 0.5 s and 1.5 s, turning every 2 s.
        let frees = [0.5, 1.5];
        // Found to a millisecond, never before the start.
        let at = |p, want: f64| {
            let got = start_after(p, &frees, 2.0, 60.0);
            assert!((want..=want + 1e-3).contains(&got), "place {p}: {got}");
        };
        at(1, 0.5);
        at(2, 1.5);
        at(3, 2.5);
        at(4, 3.5);
        at(5, 4.5);
        assert_eq!(start_after(1000, &frees, 2.0, 60.0), 60.0);
        assert_eq!(start_after(1, &[], 2.0, 60.0), 60.0);
        assert_eq!(start_after(1, &[0.0], 2.0, 60.0), 0.0);
    }

    #[test]
    fn the_returning_line_drains_most_urgent_first() {
        let mut r = Returning::default();
        for _ in 0..3 {
            r.add(0, 100);
        }
        for _ in 0..4 {
            r.add(10, 100);
        }
        assert_eq!(r.ahead_of(0), 3);
        assert_eq!(r.ahead_of(10), 7);
        assert_eq!(r.ahead_of(-5), 0);
        // Two a second for 2 s: four back in, the three urgent first.
        r.drain(2.0, 2.0);
        assert_eq!(r.ahead_of(0), 0);
        assert_eq!(r.ahead_of(10), 3);
        r.add(10, 3);
        assert_eq!(r.ahead_of(10), 3, "no more than `most` counted");
    }

    #[test]
    fn the_band_stays_under_the_ceiling() {
        let cap = Duration::from_secs(60);
        let step = Duration::from_millis(100);
        let s = |c: u64, u| spread(Duration::from_secs(c), step, u, cap);
        assert_eq!(s(10, 0.0), Duration::from_secs(10));
        assert_eq!(s(10, 0.5), Duration::from_secs(11));
        assert!(s(100, 0.999) <= cap && s(100, 0.0) >= Duration::from_secs(50));
        // A tiny advice is spread over at least one step.
        let tiny = spread(Duration::from_millis(1), step, 0.5, cap);
        assert_eq!(tiny, Duration::from_millis(51));
    }
}
