//! A request's record in the making, finished exactly once.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::headers::{CLAMPED_HEADER, QUEUE_MS_HEADER, SERVER_TIMING};
use super::{Finished, Framing, Observer, Outcome, Recorder, Tap, Timings, TokenSource};
use crate::types::HeaderBuf;
use bytes::Bytes;
use http::{HeaderValue, Method, Uri};
use tokio::time::Instant;

/// A request's record in the making; finished exactly once, at the latest
/// when it is dropped.
#[derive(Debug)]
pub(super) struct Capture {
    pub(super) recorder: Arc<Recorder>,
    pub(super) tap: Tap,
    pub(super) received: SystemTime,
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) client: Option<IpAddr>,
    pub(super) request_id: Option<HeaderValue>,
    pub(super) status: u16,
    pub(super) error: Option<&'static str>,
    pub(super) rejected: bool,
    pub(super) observer: Observer,
    pub(super) first_byte: Option<Instant>,
    pub(super) first_token: Option<Instant>,
    pub(super) last_token: Option<Instant>,
    /// Gaps between token events, microseconds.
    pub(super) gaps_us: Vec<u32>,
    pub(super) finished: bool,
}

/// Milliseconds a backend reported (finite, not negative, but any size).
fn from_ms(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX)
}

fn ms(d: Duration) -> f64 {
    // Microsecond resolution is plenty and keeps the log short.
    (d.as_micros() as f64) / 1000.0
}

impl Capture {
    /// Arrival → the (last) dispatch.
    fn queued(&self) -> Option<Duration> {
        self.tap.read(&self.tap.0.dispatched)
    }

    /// Backend time of attempts that were preempted: part of the time to
    /// the last dispatch that was not spent waiting.
    fn wasted(&self) -> Duration {
        Duration::from_nanos(self.tap.0.preempted_ns.load(Ordering::Relaxed))
    }

    /// `server-timing` and `x-anteroom-queue-ms` on an admitted response.
    pub(super) fn timing_headers(&self, headers: &mut http::HeaderMap) {
        if self.tap.0.classified.get().is_none() {
            return;
        }
        let (Some(dispatched), Some(upstream)) =
            (self.queued(), self.tap.read(&self.tap.0.headers))
        else {
            return;
        };
        let upstream = upstream.saturating_sub(dispatched);
        let queue = dispatched.saturating_sub(self.wasted());
        // By hand: float formatting cost more than the rest of this layer.
        let mut out = HeaderBuf::new();
        out.push(b"queue;dur=");
        out.millis(queue);
        out.push(b", upstream;dur=");
        out.millis(upstream);
        if let Some(v) = out.value() {
            headers.append(SERVER_TIMING, v);
        }
        headers.insert(QUEUE_MS_HEADER, HeaderValue::from(queue.as_millis() as u64));
        if let Some(c) = self.tap.0.classified.get() {
            if c.clamped_from.is_some() {
                headers.insert(CLAMPED_HEADER, HeaderValue::from(c.priority));
            }
        }
    }

    pub(super) fn on_data(&mut self, data: &Bytes) {
        let tokens = self.observer.feed(data);
        if tokens == 0 && self.first_byte.is_some() {
            return;
        }
        let now = Instant::now();
        if self.first_byte.is_none() {
            // Not a stream: its first byte is its first token for the
            // record, but that is the whole generation, not a time to first
            // token the adaptive limit could compare: no signal.
            self.first_byte = Some(now);
        }
        if tokens == 0 {
            return;
        }
        match self.last_token {
            None => {
                self.first_token = Some(now);
            }
            Some(last) => self
                .gaps_us
                .push(now.duration_since(last).as_micros().min(u32::MAX as u128) as u32),
        }
        // Several events in one frame reached the client together.
        self.gaps_us
            .extend(std::iter::repeat_n(0, tokens as usize - 1));
        self.last_token = Some(now);
    }

    /// Finish the record. `ended` is how the body ended as far as the body
    /// knows: `Ok` (its end was reached), `Truncated` or `Cancelled`.
    pub(super) fn finish(&mut self, ended: Outcome) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let partial = self.observer.finish();
        let e2e = self.tap.0.arrival.elapsed();
        let classified = self.tap.0.classified.get();
        let dispatched = self.queued();
        let headers = self.tap.read(&self.tap.0.headers);
        if let Some(code) = self.tap.0.stream_error.get() {
            self.error.get_or_insert(code);
        }
        if matches!(
            self.error,
            Some("upstream_timeout" | "first_token_timeout" | "stream_idle_timeout")
        ) {
            self.recorder.signals.overload();
        }
        let outcome = match ended {
            Outcome::Ok if self.tap.0.stream_error.get().is_some() => Outcome::Truncated,
            Outcome::Ok if self.rejected => Outcome::Rejected,
            Outcome::Ok if self.status >= 400 => Outcome::Error,
            other => other,
        };
        let sse = self.observer.framing() == Framing::Sse;
        let arrival = self.tap.0.arrival;
        let first = if sse {
            self.first_token
        } else {
            self.first_byte
        };
        // A time to first token only where there are tokens to time: a
        // stream's first token event. A plain body's first byte comes when
        // the whole answer is done (a non-streamed generation, an error),
        // so it is no one's time to first token: null, never made up.
        // An upgraded request's tokens were timed as they came from the
        // backend's stream (see `upstream::upgrade`).
        let upgraded = self.tap.0.upgraded.load(Ordering::Relaxed);
        let (up_first, up_last) = match upgraded {
            true => (
                self.tap.read(&self.tap.0.first_token),
                self.tap.read(&self.tap.0.last_token),
            ),
            false => (None, None),
        };
        let ttft = match sse {
            true => self.first_token.map(|t| t.duration_since(arrival)),
            false => up_first,
        };
        // The backend's own counts first: its `usage`, else llama.cpp's
        // `timings`; counting a stream's token events is the last resort
        // (short when one event carries two tokens).
        let mut usage = self.observer.usage;
        if usage.completion_tokens.is_none() {
            if let Some(asked) = self.tap.0.usage.get() {
                usage = *asked;
            }
        }
        let bt = self.observer.timings;
        let (completion_tokens, tokens_from) = match (usage.completion_tokens, bt.predicted_n) {
            (Some(n), _) => (Some(n), Some(TokenSource::Usage)),
            (None, Some(n)) => (Some(n), Some(TokenSource::Timings)),
            (None, None) if sse => (
                Some(u64::from(self.observer.token_events)),
                Some(TokenSource::Counted),
            ),
            (None, None) => (None, None),
        };
        usage.prompt_tokens = usage.prompt_tokens.or(bt.prompt_n);
        if let Some(c) = self.tap.0.tokens.get() {
            // What the request really used: nothing if it never reached the
            // upstream, else its usage (the estimates where usage is silent).
            let used = match dispatched {
                Some(_) => usage
                    .prompt_tokens
                    .unwrap_or(c.prompt)
                    .saturating_add(completion_tokens.unwrap_or(0)),
                None => 0,
            };
            c.budget.correct(
                c.charged,
                used,
                c.shared.load(std::sync::atomic::Ordering::Relaxed),
            );
        }
        let tpot = match (self.first_token, self.last_token, completion_tokens) {
            (Some(a), Some(b), Some(n)) if sse && n > 1 => {
                Some(ms(b.duration_since(a)) / (n - 1) as f64)
            }
            _ => match (up_first, up_last, completion_tokens) {
                (Some(a), Some(b), Some(n)) if n > 1 => {
                    Some(ms(b.saturating_sub(a)) / (n - 1) as f64)
                }
                _ => None,
            },
        };
        self.gaps_us.sort_unstable();
        let pct = |q: f64| -> Option<f64> {
            let n = self.gaps_us.len();
            (n > 0).then(|| {
                let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
                f64::from(self.gaps_us[i]) / 1000.0
            })
        };
        // Only an admitted request queues: arrival → dispatch; refused or
        // left while waiting, its whole life was the wait. A request that
        // passes through has no queue. A preempted one's attempts that
        // were stopped ran, not waited: their time is taken out.
        let wasted = self.wasted();
        let queue_ms = match (dispatched, classified) {
            (Some(d), Some(_)) => Some(ms(d.saturating_sub(wasted))),
            (Some(_), None) => None,
            (None, _) if self.rejected => Some(ms(e2e.saturating_sub(wasted))),
            (None, Some(_)) if outcome == Outcome::Cancelled => {
                Some(ms(e2e.saturating_sub(wasted)))
            }
            (None, _) => None,
        };
        // The backend's own account, where it gives one: its prefill time,
        // and so how long the request waited inside it first.
        let backend_prompt = bt.prompt_ms;
        let backend_wait = match (dispatched, first, bt.prompt_ms) {
            (Some(d), Some(f), Some(prompt)) => {
                let to_first = ms(f.duration_since(arrival).saturating_sub(d));
                // A JSON body's first byte comes after the whole generation.
                let held = if sse {
                    to_first - prompt
                } else {
                    to_first - prompt - bt.predicted_ms.unwrap_or(0.0)
                };
                // Negative only if the two clocks disagree: no figure then.
                (held >= 0.0).then_some(held)
            }
            _ => None,
        };
        if outcome == Outcome::Ok && classified.is_some() && dispatched.is_some() {
            // The adaptive limit: throughput, and time to first token
            // (the backend's prefill where it says, else dispatch → first
            // token of a stream), and the wait inside the backend.
            let signals = &self.recorder.signals;
            signals.completed(completion_tokens.unwrap_or(0));
            let ttft_ms = backend_prompt.or(match (sse || upgraded, ttft, dispatched) {
                (true, Some(t), Some(d)) => Some(ms(t.saturating_sub(d))),
                _ => None,
            });
            if let Some(t) = ttft_ms {
                signals.ttft(from_ms(t));
            }
            if let (Some(w), Some(p)) = (backend_wait, backend_prompt) {
                signals.backend_wait(from_ms(w), from_ms(p));
            }
        }
        let timings = Timings {
            queue_ms,
            upstream_headers_ms: match (dispatched, headers) {
                (Some(d), Some(h)) => Some(ms(h.saturating_sub(d))),
                _ => None,
            },
            ttft_ms: ttft.map(ms),
            backend_ttft_ms: match (ttft, dispatched) {
                (Some(t), Some(d)) => Some(ms(t.saturating_sub(d))),
                _ => None,
            },
            backend_prompt_ms: backend_prompt,
            backend_wait_ms: backend_wait,
            e2e_ms: Some(ms(e2e)),
            tpot_ms: tpot,
            itl_p50_ms: pct(0.5),
            itl_p90_ms: pct(0.9),
            itl_p99_ms: pct(0.99),
            itl_max_ms: pct(1.0),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens,
            tokens_from,
            events: sse.then_some(self.observer.events),
            malformed: self.observer.malformed > 0 || partial,
            upstream_retries: self.tap.0.retries.load(Ordering::Relaxed),
            preemptions: self.tap.0.preemptions.load(Ordering::Relaxed),
            preempted_ms: ms(wasted),
        };
        let finished = Finished {
            request_id: self.request_id.take(),
            received: self.received,
            method: std::mem::take(&mut self.method),
            uri: std::mem::take(&mut self.uri),
            tap: self.tap.clone(),
            client: self.client,
            priority: classified.map(|c| c.priority),
            stream: sse || classified.is_some_and(|c| c.stream),
            status: self.status,
            error: self.error,
            outcome,
            timings,
        };
        self.recorder.record(finished, &self.gaps_us);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // The client left before there was a response (or a body to time).
        self.finish(Outcome::Cancelled);
    }
}
