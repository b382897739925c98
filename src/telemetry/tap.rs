//! The tap: a request's notes, filled in by the steps it passes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::observe;
use crate::types::{Allowance, Priority};

/// What [`classify`](crate::classify) learnt about an admitted request.
#[derive(Clone, Debug, Default)]
pub struct Classified {
    /// `model` from the body (at most 256 bytes of it).
    pub model: Option<String>,
    /// The priority it queues at.
    pub priority: Priority,
    /// `stream: true` in the body.
    pub stream: bool,
    /// The priority asked for, when the key's `max_priority` clamped it.
    pub clamped_from: Option<Priority>,
    /// A streamed chat or text completion with no `stream_options`: the
    /// backend's usage may be asked for (see [`crate::upstream::usage`]).
    pub may_ask_usage: bool,
    /// A chat or text completion that may be sent as a stream and answered
    /// as JSON, of this shape (see [`crate::upstream::upgrade`]).
    pub upgrade: Option<crate::types::Shape>,
    /// A chat or text completion: its upstream's `default_max_tokens` and
    /// `max_tokens_cap` apply.
    pub generation: bool,
    /// The `max_tokens` (or `max_completion_tokens`) it asked for.
    pub max_tokens: Option<u64>,
}

/// A request's notes, filled in by the steps it passes. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Tap(pub(super) Arc<TapInner>);

#[derive(Debug)]
pub(super) struct TapInner {
    pub(super) arrival: Instant,
    /// Nanoseconds after arrival, plus one; zero while unset.
    pub(super) dispatched: AtomicU64,
    pub(super) headers: AtomicU64,
    pub(super) retries: AtomicU32,
    pub(super) stream_error: OnceLock<&'static str>,
    pub(super) tenant: OnceLock<Arc<str>>,
    /// The upstream it was last sent to (a retry may go elsewhere).
    pub(super) upstream: parking_lot::Mutex<Option<Arc<str>>>,
    pub(super) classified: OnceLock<Classified>,
    pub(super) tokens: OnceLock<crate::types::TokenCharge>,
    /// The backend's usage, from the event anteroom asked for and took out
    /// of the stream (see [`crate::upstream::usage`]).
    pub(super) usage: OnceLock<observe::Usage>,
    /// Sent upstream as a stream and answered as JSON (see
    /// [`crate::upstream::upgrade`]): its first and last token, timed
    /// there.
    pub(super) upgraded: std::sync::atomic::AtomicBool,
    pub(super) first_token: AtomicU64,
    pub(super) last_token: AtomicU64,
    /// Times it was preempted, and the backend time those attempts had
    /// run (nanoseconds).
    pub(super) preemptions: AtomicU32,
    pub(super) preempted_ns: AtomicU64,
    /// What its rate-limit headers say, when they are sent
    /// (`rate_limit_headers`).
    /// Boxed: off, it costs the tap 8 bytes, not a hundred.
    pub(super) rate: Option<Box<parking_lot::Mutex<RateNotes>>>,
    /// Its trace, when the proxy is traced (`[traces]`).
    pub(super) trace: Option<Box<super::trace::TraceNotes>>,
}

/// What a request's `x-ratelimit-*` headers are made of, noted by the steps
/// that know it.
#[derive(Debug, Default)]
pub(super) struct RateNotes {
    /// Its key's requests-per-minute allowance (auth).
    pub(super) key: Option<Allowance>,
    /// The room of the queue it stood in (admission).
    pub(super) room: Option<Allowance>,
    /// Its key's tokens a minute (auth); what is left comes with the
    /// charge, or with the refusal.
    pub(super) tokens_limit: Option<u32>,
}

impl Tap {
    /// A request's tap; with `rate`, it also collects what its
    /// `x-ratelimit-*` headers say.
    pub(crate) fn new(
        arrival: Instant,
        rate: bool,
        trace: Option<Box<super::trace::TraceNotes>>,
    ) -> Self {
        Self(Arc::new(TapInner {
            arrival,
            dispatched: AtomicU64::new(0),
            headers: AtomicU64::new(0),
            retries: AtomicU32::new(0),
            stream_error: OnceLock::new(),
            tenant: OnceLock::new(),
            upstream: parking_lot::Mutex::new(None),
            classified: OnceLock::new(),
            tokens: OnceLock::new(),
            usage: OnceLock::new(),
            upgraded: std::sync::atomic::AtomicBool::new(false),
            first_token: AtomicU64::new(0),
            last_token: AtomicU64::new(0),
            preemptions: AtomicU32::new(0),
            preempted_ns: AtomicU64::new(0),
            rate: rate.then(Default::default),
            trace,
        }))
    }

    /// Its trace, when the proxy is traced.
    pub(crate) fn trace(&self) -> Option<&super::trace::TraceNotes> {
        self.0.trace.as_deref()
    }

    /// Time since arrival.
    fn since_arrival(&self) -> Duration {
        self.0.arrival.elapsed()
    }

    /// Note an attempt upstream beginning now, and give the upstream its
    /// `traceparent` (traced proxies only).
    pub(crate) fn trace_upstream(&self, headers: &mut http::HeaderMap) {
        if let Some(t) = &self.0.trace {
            t.to_upstream(self.since_arrival(), headers);
        }
    }

    /// Note that the running attempt upstream ended now: answered with
    /// `status`, or not (`error`).
    pub(crate) fn attempt_ended(&self, status: Option<u16>, error: Option<&'static str>) {
        if let Some(t) = &self.0.trace {
            t.attempt_ended(self.since_arrival(), status, error);
        }
    }

    /// What classify found, if it has run.
    pub fn classified(&self) -> Option<&Classified> {
        self.0.classified.get()
    }

    /// Note what classify found.
    pub fn classify(&self, c: Classified) {
        let _ = self.0.classified.set(c);
    }

    /// Note that the request was handed to the upstream now.
    pub fn dispatched(&self) {
        self.stamp(&self.0.dispatched);
    }

    /// Note that the request was handed now to the upstream `name`.
    pub(crate) fn dispatched_to(&self, name: &Arc<str>) {
        self.dispatched();
        *self.0.upstream.lock() = Some(name.clone());
    }

    /// The upstream it was last handed to.
    pub fn upstream(&self) -> Option<Arc<str>> {
        self.0.upstream.lock().clone()
    }

    /// Whether its rate-limit headers are sent: what they say is worth
    /// finding out.
    pub(crate) fn wants_rate_headers(&self) -> bool {
        self.0.rate.is_some()
    }

    /// Note its key's requests-per-minute allowance, after it.
    pub(crate) fn set_key_allowance(&self, a: Allowance) {
        if let Some(r) = &self.0.rate {
            r.lock().key = Some(a);
        }
    }

    /// Note the room of the queue it stands in, after it.
    pub(crate) fn set_room(&self, a: Allowance) {
        if let Some(r) = &self.0.rate {
            r.lock().room = Some(a);
        }
    }

    /// Note its key's tokens-per-minute limit.
    pub(crate) fn set_tokens_limit(&self, per_minute: u32) {
        if let Some(r) = &self.0.rate {
            r.lock().tokens_limit = Some(per_minute);
        }
    }

    /// The `x-ratelimit-*` headers of its answer; `refused`, when a key's
    /// limit refused it (that allowance is then empty until the wait).
    pub(super) fn rate_headers(
        &self,
        headers: &mut http::HeaderMap,
        refused: Option<&crate::error::RateLimited>,
    ) {
        let Some(r) = &self.0.rate else {
            return;
        };
        let notes = r.lock();
        let mut key = notes.key;
        let mut tokens = self
            .0
            .tokens
            .get()
            .map(|c| Allowance::per_minute(c.budget.per_minute().get(), c.left));
        if let Some(e) = refused {
            let (limit, a) = match e.on_tokens() {
                true => (notes.tokens_limit, &mut tokens),
                false => (key.map(|k| k.limit), &mut key),
            };
            if let Some(limit) = limit {
                *a = Some(Allowance::exhausted(limit, e.retry_after()));
            }
        }
        let requests = match (key, notes.room) {
            (Some(k), Some(room)) => Some(k.within(room)),
            (k, room) => k.or(room),
        };
        crate::types::ratelimit::write(headers, requests, tokens, notes.tokens_limit);
    }

    /// Note who is asking (the API key's name).
    pub(crate) fn set_tenant(&self, name: Arc<str>) {
        let _ = self.0.tenant.set(name);
    }

    /// Note the tokens charged to the key's tokens-per-minute limit, to be
    /// corrected from `usage` when the request ends.
    pub(crate) fn set_token_charge(&self, charge: crate::types::TokenCharge) {
        let _ = self.0.tokens.set(charge);
    }

    /// The tokens charged to the key's tokens-per-minute limit, if any.
    pub(crate) fn token_charge(&self) -> Option<&crate::types::TokenCharge> {
        self.0.tokens.get()
    }

    /// Its tokens were charged to the key's shared budget too (cluster
    /// mode): their correction is due there as well.
    pub(crate) fn tokens_shared(&self) {
        if let Some(c) = self.0.tokens.get() {
            c.shared.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Who is asking, if keys are configured.
    pub fn tenant(&self) -> Option<&Arc<str>> {
        self.0.tenant.get()
    }

    /// Note that the upstream's stream failed part-way, with this code
    /// (the client got an error event instead of the rest).
    pub(crate) fn stream_failed(&self, code: &'static str) {
        let _ = self.0.stream_error.set(code);
    }

    /// Note that the request went upstream as a stream, to be answered as
    /// JSON.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }

    /// Whether it went upstream as a stream, answered as JSON.
    pub(crate) fn was_upgraded(&self) -> bool {
        self.0.upgraded.load(Ordering::Relaxed)
    }

    /// A token came out of an upgraded request's stream, now.
    pub(crate) fn token_out(&self) {
        if self.0.first_token.load(Ordering::Relaxed) == 0 {
            self.stamp(&self.0.first_token);
        }
        self.stamp(&self.0.last_token);
    }

    /// The backend's usage, from an event the client does not see.
    pub fn stream_usage(&self, usage: observe::Usage) {
        let _ = self.0.usage.set(usage);
    }

    /// Note that the request is being sent again.
    pub fn retried(&self) {
        self.0.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Note that the request was preempted after running `wasted` at the
    /// backend: what that attempt stamped is forgotten (the next attempt
    /// is timed afresh; its client saw nothing of this one).
    pub fn preempted(&self, wasted: Duration) {
        if let Some(trace) = &self.0.trace {
            trace.preempted(self.since_arrival());
        }
        let t = &self.0;
        t.preemptions.fetch_add(1, Ordering::Relaxed);
        let ns = wasted.as_nanos().min(u128::from(u64::MAX)) as u64;
        t.preempted_ns.fetch_add(ns, Ordering::Relaxed);
        for at in [&t.dispatched, &t.headers, &t.first_token, &t.last_token] {
            at.store(0, Ordering::Relaxed);
        }
        t.upgraded.store(false, Ordering::Relaxed);
    }

    /// Note that the upstream's response headers arrived now.
    pub(crate) fn headers_arrived(&self) {
        self.stamp(&self.0.headers);
    }

    fn stamp(&self, at: &AtomicU64) {
        let ns = self
            .0
            .arrival
            .elapsed()
            .as_nanos()
            .min(u64::MAX as u128 - 1) as u64;
        at.store(ns + 1, Ordering::Relaxed);
    }

    pub(super) fn read(&self, at: &AtomicU64) -> Option<Duration> {
        match at.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }
}
