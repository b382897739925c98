//! `max_concurrency = "auto"` and `"backend"`: a limit anteroom finds
//! instead of being told, that cannot move the queue into the backend.
//!
//! The queue must live in anteroom: a request sent to a backend with no
//! free slot waits inside it, where no priority reaches it and its wait is
//! counted as the model's time. So the limit is never more than the backend
//! serves at once, and grows only on evidence that more in flight gets more
//! done. Every [`TICK`] the controller looks at what happened since the
//! last one, and applies the first rule that fits:
//!
//! 1. **never above the backend's slots**: where the backend reports its
//!    slot count (llama.cpp's `total_slots`), that is the ceiling, with
//!    `auto_max_concurrency`. `"backend"` *is* that count, followed live;
//!    where the backend reports none, `"backend"` runs as `"auto"` (said in
//!    the log and `/status`).
//! 2. **down ×0.7 on push-back**: the upstream refused for capacity (429,
//!    503, a 200 whose only event is an error), timed out, or a stream went
//!    quiet. Growth then pauses for [`HOLD`].
//! 3. **down to what the backend runs, when it reports a queue of its
//!    own** (llama.cpp's `requests_deferred`, vLLM's
//!    `num_requests_waiting`, read every half second): the requests past
//!    its slots are waiting inside it, so the limit becomes the number it
//!    is processing (at most one below the current limit). Growth pauses.
//! 4. **down by one when requests wait inside the backend**, as the
//!    backend's own timings show (llama.cpp's `timings`: time to first
//!    token minus its `prompt_ms`, averaged over the tick, more than
//!    [`WAIT_FLOOR`] and half the prompt time): the same queue, seen
//!    without `/metrics`. Growth pauses.
//! 5. **down by a tenth when the model slows**: time to first token
//!    (the backend's prefill time where it reports one, else dispatch →
//!    first token) averaged over a window of measurement (below) is more
//!    than [`TOLERANCE`] × its baseline, the lowest window's average
//!    (drifting up by 2% of the gap a window, so a change of model or
//!    prompts is followed). A window, not a tick: one slow request in a
//!    quarter second is noise, not a trend. Only where the backend reports
//!    no slots: one that does has said what it serves at once, and time to
//!    first token grows with every sequence batched beside it (streamed
//!    answers only: a non-streamed answer's first byte is its last).
//! 6. **up on evidence**: only while requests wait in anteroom and the
//!    slots are in use, and only once a window at the current limit has
//!    seen enough completions (at least `2 × limit`, 4, and a second) to
//!    measure its throughput (output tokens, plus one per request, per
//!    second; half a second suffices in slow start, below). A step up is a
//!    probe: if the next window's throughput is not
//!    [`GAIN`] above the last, the limit steps back and holds there for
//!    [`HOLD`] before probing again. Steps double the limit at first (TCP's
//!    slow start), while each brings at least half the gain proportional
//!    to it; after the first that does not, or any step down, they are of
//!    one. A tick with no completions is no evidence: it never moves the
//!    limit up.
//!
//! The limit starts at `auto_min_concurrency` and stays within
//! `auto_min_concurrency ..= auto_max_concurrency`. Lowering it never cuts
//! a running request: running ones finish, fewer start.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Adaptive, AdaptiveBounds};
use crate::telemetry::{micros, Taken};
use crate::types::BackendLoad;

/// How often the limit moves.
pub const TICK: Duration = Duration::from_millis(250);
/// How far above its baseline the time to first token may go.
pub const TOLERANCE: f64 = 1.5;
/// How much more throughput a step up must bring to be kept.
pub const GAIN: f64 = 0.05;
/// How long growth pauses after a step back or a shrink.
pub const HOLD: Duration = Duration::from_secs(30);
/// The least time a window of measurement lasts.
pub(crate) const MIN_WINDOW: Duration = Duration::from_secs(1);
/// Time waited inside the backend below this is not a queue (its own
/// scheduling step, the network).
pub const WAIT_FLOOR: Duration = Duration::from_millis(100);

/// Anteroom's own state at a tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests waiting in anteroom's queue.
    pub waiting: usize,
    /// Requests in flight at the upstream.
    pub running: usize,
}

/// A window of measurement at one limit.
#[derive(Clone, Copy, Debug)]
struct Window {
    since: Instant,
    completed: u64,
    work: u64,
    ticks: u32,
    saturated: u32,
    ttft_sum_us: u64,
    ttft_n: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            completed: 0,
            work: 0,
            ticks: 0,
            saturated: 0,
            ttft_sum_us: 0,
            ttft_n: 0,
        }
    }
}

/// Why the limit is what it is, for `/status` and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `"backend"`, with the backend's slots.
    Backend,
    /// `"auto"`.
    Auto,
    /// `"backend"`, but the backend reports no slots: as `"auto"`.
    AutoFallback,
}

impl Source {
    /// As `/status` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Backend => "backend",
            Source::Auto => "auto",
            Source::AutoFallback => "auto (the backend reports no slots)",
        }
    }
}

/// The controller's state between ticks: plain state, no I/O, so that it
/// is tested tick by tick on made-up inputs.
#[derive(Debug)]
pub struct Controller {
    adaptive: Adaptive,
    limit: usize,
    baseline_us: Option<f64>,
    window: Option<Window>,
    /// The limit before a step up and the throughput measured there, while
    /// the current limit is a probe.
    below: Option<(usize, f64)>,
    /// Doubling while each step up nearly doubles throughput (TCP's slow
    /// start); over at the first step that does not, or any step down.
    slow_start: bool,
    /// No growth before this.
    hold_until: Option<Instant>,
    /// The last backend load reading acted on.
    readings: u64,
    source: Source,
}

impl Controller {
    /// Start at the lowest limit.
    pub fn new(adaptive: Adaptive) -> Self {
        Self {
            adaptive,
            limit: adaptive.bounds.min,
            baseline_us: None,
            window: None,
            below: None,
            slow_start: true,
            hold_until: None,
            readings: 0,
            source: if adaptive.follow_backend {
                Source::AutoFallback
            } else {
                Source::Auto
            },
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Why it is what it is.
    pub fn source(&self) -> Source {
        self.source
    }

    /// A new limit from here on: measurement starts again, and growth
    /// waits `hold` if given.
    fn set(&mut self, limit: usize, now: Instant, hold: bool) -> usize {
        self.limit = limit.clamp(self.adaptive.bounds.min, self.adaptive.bounds.max.max(1));
        self.window = None;
        self.below = None;
        self.slow_start = false;
        if hold {
            self.hold_until = Some(now + HOLD);
        }
        self.limit
    }

    /// One tick: the new limit, from what happened since the last.
    pub fn step(&mut self, now: Instant, taken: Taken, load: Load, backend: BackendLoad) -> usize {
        let AdaptiveBounds { min, max } = self.adaptive.bounds;
        let fresh = backend.readings != self.readings;
        self.readings = backend.readings;

        // 1. "backend": the slots it reports.
        if self.adaptive.follow_backend {
            if let Some(slots) = backend.slots {
                self.source = Source::Backend;
                self.limit = slots.max(1);
                return self.limit;
            }
            self.source = Source::AutoFallback;
        }
        let ceiling = backend.slots.map_or(max, |s| s.min(max)).max(min);
        if self.limit > ceiling {
            return self.set(ceiling, now, false);
        }

        // 2. Push-back.
        if taken.overloads > 0 {
            let to = (self.limit as f64 * 0.7).floor() as usize;
            return self.set(to, now, true);
        }
        // 3. The backend reports a queue of its own.
        if fresh {
            if let Some(queued) = backend.waiting.filter(|&w| w > 0) {
                let serving = backend
                    .running
                    .unwrap_or_else(|| load.running.saturating_sub(queued));
                let to = serving.min(self.limit.saturating_sub(1));
                return self.set(to, now, true);
            }
        }
        // 4. Requests wait inside the backend (its timings say so).
        if let Some((wait, prefill)) = taken.backend_wait_us {
            if wait > micros(WAIT_FLOOR) as f64 && wait > 0.5 * prefill {
                return self.set(self.limit.saturating_sub(1), now, true);
            }
        }
        // 5 and 6: measured over a window at this limit, while there is
        // demand.
        if load.waiting == 0 {
            // Nothing waits: no reason to go higher, and no measurement of
            // what this limit can do.
            self.window = None;
            return self.limit;
        }
        let w = self.window.get_or_insert_with(|| Window::new(now));
        w.ticks += 1;
        w.saturated += u32::from(load.running >= self.limit);
        w.completed += taken.completed;
        w.work += taken.work;
        w.ttft_sum_us = w.ttft_sum_us.saturating_add(taken.ttft_sum_us);
        w.ttft_n += taken.ttft_n;
        let elapsed = now.duration_since(w.since);
        let enough = (2 * self.limit as u64).max(4);
        // A doubling is judged against a near-doubling: half the window
        // tells that apart.
        let least = if self.slow_start {
            MIN_WINDOW / 2
        } else {
            MIN_WINDOW
        };
        if w.completed < enough || elapsed < least {
            return self.limit;
        }
        let window = *w;
        self.window = None;
        if window.saturated * 4 < window.ticks * 3 {
            // The slots were not in use most of the time: what the window
            // measured is the demand, not this limit.
            return self.limit;
        }
        // 5. The model slows: the window's time to first token against
        // the baseline (the lowest window's, drifting up slowly).
        if window.ttft_n > 0 && backend.slots.is_none() {
            let mean = window.ttft_sum_us as f64 / window.ttft_n as f64;
            let slow = self.baseline_us.is_some_and(|base| mean > base * TOLERANCE);
            self.baseline_us = Some(match self.baseline_us {
                Some(base) if mean >= base => base + (mean - base) * 0.02,
                _ => mean,
            });
            if slow {
                let to = self.limit.saturating_sub((self.limit / 10).max(1));
                return self.set(to, now, false);
            }
        }
        let rate = window.work as f64 / elapsed.as_secs_f64();
        let may_grow = self.limit < ceiling && self.hold_until.is_none_or(|t| now >= t);
        if let Some((before, below)) = self.below {
            if rate <= below * (1.0 + GAIN) {
                // The step up bought nothing: back, and stay a while.
                tracing::debug!(limit = self.limit, rate, below, "no gain from the step up");
                return self.set(before, now, true);
            }
            // Slow start goes on while a step buys at least half of what
            // its share of slots would if throughput grew in proportion.
            let proportional = self.limit as f64 / before as f64;
            if rate < below * (1.0 + 0.5 * (proportional - 1.0)) {
                self.slow_start = false;
            }
        }
        if may_grow {
            let step = if self.slow_start { self.limit } else { 1 };
            let before = self.limit;
            self.limit = (self.limit + step.max(1)).min(ceiling);
            self.below = Some((before, rate));
        } else {
            self.below = None;
        }
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: Adaptive = Adaptive {
        bounds: AdaptiveBounds { min: 1, max: 32 },
        follow_backend: false,
    };

    /// A backend whose throughput (work per second) at `k` in flight is
    /// `rate(k)`, served under load for `secs` seconds of ticks; returns the
    /// limit after each tick.
    fn drive(
        c: &mut Controller,
        secs: u64,
        rate: impl Fn(usize) -> f64,
        backend: impl Fn(usize) -> BackendLoad,
        t: &mut Instant,
    ) -> Vec<usize> {
        let mut out = Vec::new();
        let mut owed = 0.0;
        for _ in 0..secs * 4 {
            *t += TICK;
            let k = c.limit();
            // Completions of 10 units of work each.
            owed += rate(k) * TICK.as_secs_f64() / 10.0;
            let completed = owed.floor() as u64;
            owed -= completed as f64;
            let taken = Taken {
                completed,
                work: completed * 10,
                ..Taken::default()
            };
            let load = Load {
                waiting: 100,
                running: k,
            };
            out.push(c.step(*t, taken, load, backend(k)));
        }
        out
    }

    fn quiet(_: usize) -> BackendLoad {
        BackendLoad::default()
    }

    #[test]
    fn no_growth_without_samples() {
        let mut c = Controller::new(AUTO);
        let mut t = Instant::now();
        // A hundred ticks with requests waiting and the slot busy, but
        // nothing completing (long generations): no evidence, no growth.
        for _ in 0..100 {
            t += TICK;
            let load = Load {
                waiting: 50,
                running: 1,
            };
            assert_eq!(c.step(t, Taken::default(), load, BackendLoad::default()), 1);
        }
        // Nothing waiting: completions are no reason to grow either.
        for _ in 0..100 {
            t += TICK;
            let taken = Taken {
                completed: 10,
                work: 100,
                ..Taken::default()
            };
            assert_eq!(c.step(t, taken, Load::default(), BackendLoad::default()), 1);
        }
    }

    #[test]
    fn climbs_to_the_knee_and_stays() {
        // Throughput grows to 4 in flight, flat to 8, collapses beyond.
        let knee = |k: usize| {
            let k = k as f64;
            if k <= 4.0 {
                100.0 * k
            } else if k <= 8.0 {
                400.0
            } else {
                400.0 / (1.0 + k - 8.0)
            }
        };
        let mut c = Controller::new(AUTO);
        let mut t = Instant::now();
        let limits = drive(&mut c, 120, knee, quiet, &mut t);
        let settled = &limits[limits.len() / 2..];
        assert!(settled.iter().all(|&l| (4..=6).contains(&l)), "{limits:?}");
        assert!(
            settled.iter().filter(|&&l| l == 4).count() > settled.len() / 2,
            "{limits:?}"
        );
        // Climbing took seconds, not minutes.
        let first4 = limits.iter().position(|&l| l == 4).unwrap();
        assert!(first4 < 4 * 20, "{limits:?}");
    }

    #[test]
    fn slow_start_doubles_then_steps_by_one() {
        // Throughput in proportion to the limit up to 8, then 30 more per
        // extra slot: doubling to 16 (a gain, though far from double),
        // then one at a time, and back when a step buys under 5%.
        let rate = |k: usize| {
            let k = k as f64;
            if k <= 8.0 {
                100.0 * k
            } else {
                800.0 + 30.0 * (k - 8.0)
            }
        };
        let mut c = Controller::new(AUTO);
        let mut t = Instant::now();
        let limits = drive(&mut c, 30, rate, quiet, &mut t);
        let mut distinct = limits.clone();
        distinct.dedup();
        assert_eq!(distinct, [1, 2, 4, 8, 16, 17, 16], "{limits:?}");
    }

    #[test]
    fn stops_at_the_backends_slots() {
        let linear = |k: usize| 100.0 * k as f64;
        let slots = |_| BackendLoad {
            slots: Some(3),
            ..BackendLoad::default()
        };
        let mut c = Controller::new(AUTO);
        let mut t = Instant::now();
        let limits = drive(&mut c, 60, linear, slots, &mut t);
        assert_eq!(*limits.iter().max().unwrap(), 3, "{limits:?}");
        assert_eq!(*limits.last().unwrap(), 3);
        // Reported fewer later (restarted with fewer slots): down at once.
        let fewer = |_| BackendLoad {
            slots: Some(2),
            ..BackendLoad::default()
        };
        let limits = drive(&mut c, 1, linear, fewer, &mut t);
        assert_eq!(limits[0], 2);
    }

    #[test]
    fn shrinks_on_a_reported_backend_queue() {
        let mut c = Controller::new(AUTO);
        let mut t = Instant::now();
        let linear = |k: usize| 100.0 * k as f64;
        drive(&mut c, 30, linear, quiet, &mut t);
        let high = c.limit();
        assert!(high >= 6, "{high}");
        // The backend says it runs 2 and queues the rest.
        t += TICK;
        let view = BackendLoad {
            running: Some(2),
            waiting: Some(high - 2),
            readings: 1,
            ..BackendLoad::default()
        };
        let load = Load {
            waiting: 10,
            running: high,
        };
        assert_eq!(c.step(t, Taken::default(), load, view), 2);
        // The same reading again is not news; and growth holds for a while
        // however good the evidence.
        let limits = drive(
            &mut c,
            HOLD.as_secs() - 1,
            linear,
            |_| BackendLoad {
                readings: 1,
                ..BackendLoad::default()
            },
            &mut t,
        );
        assert!(limits.iter().all(|&l| l == 2), "{limits:?}");
        // A fresh reading with no queue: growth may resume after the hold.
        let limits = drive(&mut c, 10, linear, quiet, &mut t);
        assert!(*limits.last().unwrap() > 2, "{limits:?}");
    }

    #[test]
    fn shrinks_when_the_backends_timings_show_a_wait() {
        let mut c = Controller::new(AUTO);
        let mut t = Instant::now();
        drive(&mut c, 20, |k| 100.0 * k as f64, quiet, &mut t);
        let high = c.limit();
        t += TICK;
        let taken = Taken {
            // 900 ms waited inside for a 200 ms prefill.
            backend_wait_us: Some((900_000.0, 200_000.0)),
            ..Taken::default()
        };
        let load = Load {
            waiting: 1,
            running: high,
        };
        assert_eq!(c.step(t, taken, load, BackendLoad::default()), high - 1);
        // A wait within the backend's own scheduling step is no queue.
        let mut c = Controller::new(AUTO);
        drive(&mut c, 20, |k| 100.0 * k as f64, quiet, &mut t);
        let high = c.limit();
        t += TICK;
        let taken = Taken {
            backend_wait_us: Some((20_000.0, 200_000.0)),
            ..Taken::default()
        };
        assert_eq!(c.step(t, taken, load, BackendLoad::default()), high);
    }

    #[test]
    fn backs_off_on_push_back_and_on_latency() {
        let mut c = Controller::new(AUTO);
        let mut t = Instant::now();
        drive(&mut c, 40, |k| 100.0 * k as f64, quiet, &mut t);
        let high = c.limit();
        assert!(high >= 10, "{high}");
        let step = |c: &mut Controller, t: &mut Instant, taken: Taken| {
            *t += TICK;
            let load = Load {
                waiting: 5,
                running: c.limit(),
            };
            c.step(*t, taken, load, BackendLoad::default())
        };
        let push = Taken {
            overloads: 2,
            ..Taken::default()
        };
        assert_eq!(step(&mut c, &mut t, push), (high as f64 * 0.7) as usize);
        // Ticks of completions whose time to first token is `us`, until a
        // window closes (the limit moves, or 40 ticks pass).
        let window = |c: &mut Controller, t: &mut Instant, us: u64| {
            let before = c.limit();
            for _ in 0..40 {
                let taken = Taken {
                    completed: 20,
                    work: 200,
                    ttft_sum_us: 20 * us,
                    ttft_n: 20,
                    ..Taken::default()
                };
                if step(c, t, taken) != before {
                    break;
                }
            }
            c.limit()
        };
        // Growth is on hold after the push-back; the baseline is learnt.
        let l = c.limit();
        assert_eq!(window(&mut c, &mut t, 100_000), l);
        // A window twice as slow: down by a tenth; one as slow as the
        // baseline is no reason.
        assert_eq!(window(&mut c, &mut t, 200_000), l - (l / 10).max(1));
        let l = c.limit();
        assert_eq!(window(&mut c, &mut t, 110_000), l);
        for _ in 0..20 {
            step(&mut c, &mut t, push);
        }
        assert_eq!(c.limit(), 1, "never below the bound");
    }

    #[test]
    fn backend_mode_follows_the_slots_or_falls_back() {
        let mut c = Controller::new(Adaptive {
            follow_backend: true,
            ..AUTO
        });
        let mut t = Instant::now();
        t += TICK;
        let view = |slots| BackendLoad {
            slots,
            ..BackendLoad::default()
        };
        assert_eq!(
            c.step(t, Taken::default(), Load::default(), view(Some(4))),
            4
        );
        assert_eq!(c.source(), Source::Backend);
        assert_eq!(
            c.step(t, Taken::default(), Load::default(), view(Some(1))),
            1
        );
        // No slots reported: "auto" from where it is.
        let limits = drive(&mut c, 20, |k| 100.0 * k as f64, |_| view(None), &mut t);
        assert_eq!(c.source(), Source::AutoFallback);
        assert!(*limits.last().unwrap() > 1, "{limits:?}");
    }
}
