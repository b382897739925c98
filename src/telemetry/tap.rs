//! The tap: a request's notes, filled in by the steps it passes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::observe;
use crate::types::Priority;

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
}

impl Tap {
    pub(crate) fn new(arrival: Instant) -> Self {
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
        }))
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

    /// Note who is asking (the API key's name).
    pub(crate) fn set_tenant(&self, name: Arc<str>) {
        let _ = self.0.tenant.set(name);
    }

    /// Note the tokens charged to the key's tokens-per-minute limit, to be
    /// corrected from `usage` when the request ends.
    pub(crate) fn set_token_charge(&self, charge: crate::types::TokenCharge) {
        let _ = self.0.tokens.set(charge);
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
