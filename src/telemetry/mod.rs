//! Step 0b of the request path: where every request's time goes, kept as one
//! [`Record`] per request.
//!
//! The [`Telemetry`] layer sits just inside the edge's rescue, so it sees
//! every request: admitted, passed through, rejected or failed. It puts a
//! [`Tap`] in the request's extensions, which the steps below fill in as the
//! request passes them ([`classify`](crate::classify) notes the model,
//! priority and `stream`; the [`upstream`](crate::upstream) notes when the
//! request was dispatched and when the response headers came back), and it
//! wraps the response body in a [`TimedBody`] that watches the bytes go out:
//! the first token, each token event, the `usage` numbers, the last byte.
//! The body is observed, never changed (see [`observe`]).
//!
//! When the body ends, fails, or is dropped because the client left, or when
//! the request fails before it has a response, the record is finished once:
//! counted in the [`Metrics`] and handed to the [`RequestLog`] if there is
//! one. A request whose client leaves while it is queued is recorded too
//! (status 499, outcome `cancelled`).
//!
//! ```text
//! arrival ── queue_ms ──▶ dispatch ── upstream_headers_ms ──▶ headers ──▶ first token ──▶ … ──▶ last byte
//!    │                       └──────────── backend_ttft_ms ───────────────────┘                      │
//!    └──────────────────────────────── ttft_ms ──────────────────────────────┘                      │
//!    └──────────────────────────────────────────── e2e_ms ──────────────────────────────────────────┘
//! ```
//!
//! Admitted responses also get `server-timing: queue;dur=…, upstream;dur=…`
//! (W3C Server Timing, milliseconds) and `x-anteroom-queue-ms`, so a client
//! can take the queue out of its own latency figures.

pub mod log;
pub mod metrics;
pub mod observe;
pub mod record;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

pub use log::RequestLog;
pub use metrics::Metrics;
pub use observe::{Framing, Observer};
pub use record::{Finished, Outcome, Record, Timings, TokenSource};

use crate::admission::adaptive::Signals;
use crate::error;
use crate::types::ClientAddr;
use crate::types::Overloaded;
use crate::types::Priority;
use crate::types::REQUEST_ID;
use crate::BoxError;

/// The W3C Server-Timing header.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// On an admitted response whose priority the key's `max_priority` clamped:
/// the priority it ran at.
pub const CLAMPED_HEADER: HeaderName = HeaderName::from_static("x-anteroom-priority-clamped");
/// The OpenAI SDKs' retry counter: above 0 on a client's own retry.
const CLIENT_RETRY: HeaderName = HeaderName::from_static("x-stainless-retry-count");
/// Milliseconds the request spent queued (arrival → dispatch), on admitted
/// responses.
pub const QUEUE_MS_HEADER: HeaderName = HeaderName::from_static("x-anteroom-queue-ms");

/// Where finished records go: the metrics, and the request log if any.
#[derive(Debug)]
pub struct Recorder {
    /// The Prometheus metrics.
    pub metrics: Metrics,
    /// Latency and push-back, for the adaptive limit.
    pub signals: Arc<Signals>,
    log: Option<RequestLog>,
}

impl Recorder {
    /// A recorder writing the request log to `log_path`, if given.
    pub fn new(log_path: Option<&Path>) -> io::Result<Arc<Self>> {
        let metrics = Metrics::new();
        let log = log_path
            .map(|p| RequestLog::open(p, metrics.log_written.clone(), metrics.log_dropped.clone()))
            .transpose()?;
        Ok(Arc::new(Self {
            metrics,
            signals: Arc::default(),
            log,
        }))
    }

    /// Count a finished request and log it.
    pub fn record(&self, finished: Finished, gaps_us: &[u32]) {
        self.metrics.observe(&finished, gaps_us);
        if let Some(log) = &self.log {
            log.send(finished);
        }
    }

    /// Wait until every record taken so far is written (no-op without a log).
    pub async fn flush(&self) {
        if let Some(log) = &self.log {
            log.flush().await;
        }
    }
}

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
    pub upgrade: Option<crate::upstream::upgrade::Shape>,
}

/// A request's notes, filled in by the steps it passes. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Tap(Arc<TapInner>);

#[derive(Debug)]
struct TapInner {
    arrival: Instant,
    /// Nanoseconds after arrival, plus one; zero while unset.
    dispatched: AtomicU64,
    headers: AtomicU64,
    retries: AtomicU32,
    stream_error: OnceLock<&'static str>,
    tenant: OnceLock<Arc<str>>,
    /// The upstream it was last sent to (a retry may go elsewhere).
    upstream: parking_lot::Mutex<Option<Arc<str>>>,
    classified: OnceLock<Classified>,
    tokens: OnceLock<crate::types::TokenCharge>,
    /// The backend's usage, from the event anteroom asked for and took out
    /// of the stream (see [`crate::upstream::usage`]).
    usage: OnceLock<observe::Usage>,
    /// Sent upstream as a stream and answered as JSON (see
    /// [`crate::upstream::upgrade`]): its first and last token, timed
    /// there.
    upgraded: std::sync::atomic::AtomicBool,
    first_token: AtomicU64,
    last_token: AtomicU64,
    /// Times it was preempted, and the backend time those attempts had
    /// run (nanoseconds).
    preemptions: AtomicU32,
    preempted_ns: AtomicU64,
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
    pub fn dispatched_to(&self, name: &Arc<str>) {
        self.dispatched();
        *self.0.upstream.lock() = Some(name.clone());
    }

    /// The upstream it was last handed to.
    pub fn upstream(&self) -> Option<Arc<str>> {
        self.0.upstream.lock().clone()
    }

    /// Note who is asking (the API key's name).
    pub fn set_tenant(&self, name: Arc<str>) {
        let _ = self.0.tenant.set(name);
    }

    /// Note the tokens charged to the key's tokens-per-minute limit, to be
    /// corrected from `usage` when the request ends.
    pub fn set_token_charge(&self, charge: crate::types::TokenCharge) {
        let _ = self.0.tokens.set(charge);
    }

    /// Who is asking, if keys are configured.
    pub fn tenant(&self) -> Option<&Arc<str>> {
        self.0.tenant.get()
    }

    /// Note that the upstream's stream failed part-way, with this code
    /// (the client got an error event instead of the rest).
    pub fn stream_failed(&self, code: &'static str) {
        let _ = self.0.stream_error.set(code);
    }

    /// Note that the request went upstream as a stream, to be answered as
    /// JSON.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }

    /// Whether it went upstream as a stream, answered as JSON.
    pub fn was_upgraded(&self) -> bool {
        self.0.upgraded.load(Ordering::Relaxed)
    }

    /// A token came out of an upgraded request's stream, now.
    pub fn token_out(&self) {
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
    pub fn headers_arrived(&self) {
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

    fn read(&self, at: &AtomicU64) -> Option<Duration> {
        match at.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }
}

/// Builds [`Telemetry`] services.
#[derive(Clone, Debug)]
pub struct TelemetryLayer {
    recorder: Arc<Recorder>,
}

impl TelemetryLayer {
    /// Record into `recorder`.
    pub fn new(recorder: Arc<Recorder>) -> Self {
        Self { recorder }
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Telemetry {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// Times every request and keeps its record: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Telemetry<S> {
    inner: S,
    recorder: Arc<Recorder>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Telemetry<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
{
    type Response = Response<TimedBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        if req
            .headers()
            .get(CLIENT_RETRY)
            .is_some_and(|v| v.as_bytes() != b"0")
        {
            self.recorder.metrics.client_retries.inc();
        }
        let now = Instant::now();
        let tap = Tap::new(now);
        let capture = Capture {
            recorder: self.recorder.clone(),
            tap: tap.clone(),
            received: SystemTime::now(),
            method: req.method().clone(),
            // Only the log reads these; a copy, so that a waiting request's
            // record does not hold its connection's read buffer (see
            // `admission::Detach`).
            uri: match self.recorder.log {
                Some(_) => Uri::try_from(req.uri().path()).unwrap_or_default(),
                None => Uri::default(),
            },
            client: req.extensions().get::<ClientAddr>().map(|c| c.addr().ip()),
            request_id: match self.recorder.log {
                Some(_) => req
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()),
                None => None,
            },
            status: 499,
            error: None,
            rejected: false,
            observer: Observer::new(Framing::Opaque),
            first_byte: None,
            first_token: None,
            last_token: None,
            gaps_us: Vec::new(),
            finished: false,
        };
        req.extensions_mut().insert(tap);
        // A panic below (in a call or a poll) is a bug, but it must not cut
        // the connection with no answer and no record: it becomes a 500
        // here, recorded as one. Not tower-http's CatchPanic: that boxes
        // every response body a second time, does not see panics while the
        // body is read, and would sit outside the record (or need one more
        // layer). catch_unwind costs nothing until something panics.
        let inner = match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(fut) => Called::Running { fut },
            Err(payload) => Called::Panicked {
                error: Some(error::Panicked::new(&*payload)),
            },
        };
        ResponseFuture {
            inner,
            capture: Some(capture),
        }
    }
}

pin_project! {
    #[project = CalledProj]
    #[derive(Debug)]
    enum Called<F> {
        Running { #[pin] fut: F },
        Panicked { error: Option<error::Panicked> },
    }
}

pin_project! {
    /// Response future of [`Telemetry`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Called<F>,
        capture: Option<Capture>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body,
{
    type Output = Result<Response<TimedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result: Result<Response<B>, BoxError> = match this.inner.project() {
            CalledProj::Running { fut } => {
                match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(r)) => r.map_err(Into::into),
                    // Never polled again: the caller has its answer.
                    Err(payload) => Err(error::Panicked::new(&*payload).into()),
                }
            }
            CalledProj::Panicked { error } => {
                Err(error.take().expect("polled after completion").into())
            }
        };
        let mut capture = this.capture.take().expect("polled after completion");
        match result {
            Ok(mut resp) => {
                capture.status = resp.status().as_u16();
                let ct = resp.headers().get(http::header::CONTENT_TYPE);
                capture.observer = Observer::new(Framing::of(ct.map(HeaderValue::as_bytes)));
                capture.timing_headers(resp.headers_mut());
                Poll::Ready(Ok(resp.map(|inner| TimedBody {
                    inner,
                    capture,
                    panicked: false,
                })))
            }
            Err(e) => {
                let d = error::describe(&*e);
                capture.status = d.status.as_u16();
                capture.error = Some(d.code);
                // Turned away at the door; not a request that ran and was
                // cut at the drain deadline (an error, its queue time its
                // own).
                capture.rejected = error::cause::<Overloaded>(&*e)
                    .is_some_and(|o| o.reason() != crate::types::Reason::PastDrain)
                    || error::cause::<error::RateLimited>(&*e).is_some();
                capture.finish(Outcome::Ok);
                Poll::Ready(Err(e))
            }
        }
    }
}

/// A request's record in the making; finished exactly once, at the latest
/// when it is dropped.
#[derive(Debug)]
struct Capture {
    recorder: Arc<Recorder>,
    tap: Tap,
    received: SystemTime,
    method: Method,
    uri: Uri,
    client: Option<IpAddr>,
    request_id: Option<HeaderValue>,
    status: u16,
    error: Option<&'static str>,
    rejected: bool,
    observer: Observer,
    first_byte: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// Gaps between token events, microseconds.
    gaps_us: Vec<u32>,
    finished: bool,
}

/// A small header value built on the stack.
struct Buf {
    bytes: [u8; 64],
    len: usize,
}

impl Buf {
    fn new() -> Self {
        Self {
            bytes: [0; 64],
            len: 0,
        }
    }

    fn push(&mut self, b: &[u8]) {
        let end = (self.len + b.len()).min(self.bytes.len());
        self.bytes[self.len..end].copy_from_slice(&b[..end - self.len]);
        self.len = end;
    }

    /// `d` as milliseconds with three decimals, e.g. `12.345`.
    fn push_millis(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut digits = [0u8; 24];
        let mut i = digits.len();
        let mut n = us;
        for _ in 0..3 {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        i -= 1;
        digits[i] = b'.';
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
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
    fn timing_headers(&self, headers: &mut http::HeaderMap) {
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
        let mut out = Buf::new();
        out.push(b"queue;dur=");
        out.push_millis(queue);
        out.push(b", upstream;dur=");
        out.push_millis(upstream);
        if let Ok(v) = HeaderValue::from_bytes(out.as_bytes()) {
            headers.append(SERVER_TIMING, v);
        }
        headers.insert(QUEUE_MS_HEADER, HeaderValue::from(queue.as_millis() as u64));
        if let Some(c) = self.tap.0.classified.get() {
            if c.clamped_from.is_some() {
                headers.insert(CLAMPED_HEADER, HeaderValue::from(c.priority));
            }
        }
    }

    fn on_data(&mut self, data: &Bytes) {
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
    fn finish(&mut self, ended: Outcome) {
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
            c.budget.correct(c.charged, used);
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

pin_project! {
    /// A response body that times its bytes and observes its events on the
    /// way to the client. The bytes pass unchanged.
    #[derive(Debug)]
    pub struct TimedBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: B,
        capture: Capture,
        // The inner body panicked: it is never touched again.
        panicked: bool,
    }

    impl<B> PinnedDrop for TimedBody<B>
    where
        B: Body,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A body that is known to be over (HEAD, an empty body) need not
            // be polled to its end; anything else dropped early is a client
            // that left.
            let ended = if *this.panicked || this.inner.is_end_stream() {
                Outcome::Ok
            } else {
                Outcome::Cancelled
            };
            this.capture.finish(ended);
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.panicked {
            return Poll::Ready(None);
        }
        let frame = match catch_unwind(AssertUnwindSafe(|| this.inner.as_mut().poll_frame(cx))) {
            Ok(frame) => ready!(frame).map(|f| f.map_err(Into::into)),
            Err(payload) => {
                // A bug below: the record says so, and the client gets an
                // end it can read (an error event on a stream, else the
                // body fails and the connection closes).
                *this.panicked = true;
                let e = error::Panicked::new(&*payload);
                tracing::error!(
                    panic = e.message(),
                    "a panic while a response body was read (a bug)"
                );
                this.capture.error = Some("internal_error");
                this.capture.finish(Outcome::Truncated);
                return Poll::Ready(Some(if this.capture.observer.framing() == Framing::Sse {
                    Ok(Frame::data(error::error_event(
                        "server_error",
                        "internal_error",
                        &e.to_string(),
                    )))
                } else {
                    Err(e.into())
                }));
            }
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    this.capture.on_data(data);
                }
                if this.inner.is_end_stream() {
                    this.capture.finish(Outcome::Ok);
                }
            }
            Some(Err(_)) => this.capture.finish(Outcome::Truncated),
            None => this.capture.finish(Outcome::Ok),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.panicked || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.panicked {
            return SizeHint::with_exact(0);
        }
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_are_written_with_three_decimals() {
        for (us, want) in [
            (0, "0.000"),
            (7, "0.007"),
            (999, "0.999"),
            (12_345, "12.345"),
            (1_234_567_891, "1234567.891"),
        ] {
            let mut b = Buf::new();
            b.push_millis(Duration::from_micros(us));
            assert_eq!(std::str::from_utf8(b.as_bytes()).unwrap(), want);
        }
        let mut b = Buf::new();
        b.push(&[b'x'; 100]);
        assert_eq!(b.as_bytes().len(), 64, "never past the buffer");
    }
}
