//! Layer 7 of 8 (after admission, inside the slot): when the upstream
//! pushes back, wait and try again, within limits, instead of failing the
//! eval.
//!
//! An admitted request whose upstream answer is 429 or 503, or whose
//! connection was refused or reset before any response byte (a 502 so
//! far), is sent again after a delay: the upstream's own `retry-after-ms` /
//! `Retry-After` when it gives one, else exponential back-off with full
//! jitter (`retry_base_delay` × 2ⁿ, capped by `retry_max_delay`, a random
//! share of it). At most `max_retries` times, and only while the
//! [`RetryBudget`] allows: retries may be at most `retry_budget` of the
//! requests of the last ten seconds (plus a small reserve), so a backend
//! that refuses everything is not hammered by retries.
//!
//! The upstream may say otherwise with `x-should-retry` (as OpenAI's API and
//! gateways in front of it do, and the OpenAI SDKs obey): `false` on a
//! 429/503 passes it on untouched, neither retried nor pausing the upstream
//! (a spent quota is not a busy server); `true` on a 408, 409 or 5xx has it
//! retried like a 429, without the pause.
//!
//! Nothing of a refused answer has reached the client (this layer is below
//! the point where the response goes out), so a retry is never visible to
//! it. The request keeps its slot while it waits, and with it its place
//! ahead of less urgent work. An upstream's 429/503 also pauses the upstream
//! for everyone ([`Cooldown`]): requests about to be dispatched wait out the
//! advised time instead of each collecting a 429 of its own.
//!
//! When it gives up, the client gets the upstream's own answer, with a
//! `Retry-After` (and `retry-after-ms`) added if the upstream sent none, or
//! the 502 for a connection that never worked. Only admitted requests, whose
//! bodies are buffered and can be sent again, are retried; a time-out (504)
//! is not retried: the upstream may still be working on the request.

pub mod budget;
pub mod cooldown;
pub mod retry_after;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use tower::{Layer, Service, ServiceExt};

pub use budget::RetryBudget;
pub use cooldown::Cooldown;

use crate::config::RetryPolicy;
use crate::error::{self, UpstreamUnavailable};
use crate::telemetry::{Recorder, Tap};
use crate::types::{Admit, ClientAddr, Model, RetryReason, Route};
use crate::BoxError;

/// The upstreams a retry may go to, by route (an index into the upstream
/// table): back-off owns this trait and the router implements it, so
/// back-off depends on no routing code.
pub trait Targets: std::fmt::Debug + Send + Sync + 'static {
    /// Upstream `route`'s pause.
    fn cooldown(&self, route: usize) -> Arc<Cooldown>;
    /// Whether upstream `route` is in service.
    fn is_healthy(&self, route: usize) -> bool;
    /// Another upstream in service that serves `model`, for a retry whose
    /// upstream `from` went out of service.
    fn reroute(&self, model: Option<&str>, from: usize) -> Result<usize, BoxError>;
    /// When a client whose upstream did not answer should try again: by
    /// then its health was checked again.
    fn unavailable_advice(&self) -> Duration;
}

#[derive(Debug)]
struct Shared {
    policy: RetryPolicy,
    budget: RetryBudget,
    /// Each upstream's pause (a 429 from one replica pauses only that
    /// one); a request whose upstream went out of service is sent again to
    /// another.
    targets: Arc<dyn Targets>,
    recorder: Arc<Recorder>,
    /// The advice a 502 carries (see [`Targets::unavailable_advice`]).
    advice: Duration,
}

/// Builds [`Backoff`] services; clones share the budget and the cooldown.
#[derive(Clone, Debug)]
pub struct BackoffLayer {
    shared: Arc<Shared>,
}

impl BackoffLayer {
    /// Retry by `policy`, counting into `recorder`'s metrics, pausing each
    /// of `targets`' upstreams on its own (a request's [`Route`] picks); a
    /// retry whose upstream went out of service goes to another.
    pub fn new(policy: RetryPolicy, recorder: Arc<Recorder>, targets: Arc<dyn Targets>) -> Self {
        Self {
            shared: Arc::new(Shared {
                advice: targets.unavailable_advice(),
                budget: RetryBudget::new(policy.budget),
                policy,
                targets,
                recorder,
            }),
        }
    }
}

impl<S> Layer<S> for BackoffLayer {
    type Service = Backoff<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Backoff {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl Shared {
    /// The pause of upstream `route`.
    fn cooldown(&self, route: usize) -> Arc<Cooldown> {
        self.targets.cooldown(route)
    }
}

/// Retries refused requests: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Backoff<S> {
    inner: S,
    shared: Arc<Shared>,
}

type Req<B> = Request<Either<Full<Bytes>, B>>;
type RetryFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, B, ResB> Service<Req<B>> for Backoff<S>
where
    S: Service<Req<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Response<ResB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req<B>) -> Self::Future {
        // Only admitted requests, whose bodies are in memory, can be sent
        // again; the rest go straight through.
        let admitted = req.extensions().get::<Admit>().is_some();
        let advice = self.shared.advice;
        if !admitted || self.shared.policy.max_retries == 0 {
            return ResponseFuture::direct(self.inner.call(req), advice);
        }
        let (parts, body) = req.into_parts();
        let body = match body {
            Either::Left(full) => full,
            Either::Right(streamed) => {
                let req = Request::from_parts(parts, Either::Right(streamed));
                return ResponseFuture::direct(self.inner.call(req), advice);
            }
        };
        // Every attempt, the first included, waits out a pause first, so it
        // goes through a clone made ready in the loop.
        let retry = retry_loop(self.inner.clone(), parts, body, self.shared.clone());
        ResponseFuture::retrying(Box::pin(retry), advice)
    }
}

/// The upstream's `x-should-retry`: `Some(true)`, `Some(false)`, or `None`
/// when absent or neither.
fn should_retry(headers: &http::HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry")?.as_bytes() {
        b"true" => Some(true),
        b"false" => Some(false),
        _ => None,
    }
}

/// Send, and send again while the upstream pushes back and the policy allows.
async fn retry_loop<S, B, ResB>(
    svc: S,
    parts: http::request::Parts,
    body: Full<Bytes>,
    shared: Arc<Shared>,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Req<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
{
    let policy = &shared.policy;
    let metrics = &shared.recorder.metrics;
    let mut parts = parts;
    let mut route = parts.extensions.get::<Route>().map_or(0, |r| r.0);
    let mut cooldown = shared.cooldown(route);
    // The first try takes the request's extensions as they are; a retry
    // gets a copy of the few that the steps below read.
    let mut carried = Carried::of(&parts.extensions);
    let model = parts.extensions.get::<Model>().cloned();
    let first = std::mem::take(&mut parts.extensions);
    shared.budget.deposit();
    let mut result = attempt(svc.clone(), &parts, first, &body, &cooldown).await;
    let mut retries = 0u32;
    loop {
        // Read only on a refusal: a success skips the header lookup.
        let said = match &result {
            Ok(resp) if !resp.status().is_success() => should_retry(resp.headers()),
            _ => None,
        };
        let (reason, advised) = match &result {
            Ok(resp) if said == Some(false) => {
                if matches!(
                    resp.status(),
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                ) {
                    metrics.retries_given_up("upstream_said_no");
                }
                return result;
            }
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => (
                RetryReason::TooManyRequests,
                retry_after::parse(resp.headers()),
            ),
            Ok(resp) if resp.status() == StatusCode::SERVICE_UNAVAILABLE => {
                (RetryReason::Unavailable, retry_after::parse(resp.headers()))
            }
            Ok(resp)
                if said == Some(true)
                    && (resp.status().is_server_error()
                        || resp.status() == StatusCode::REQUEST_TIMEOUT
                        || resp.status() == StatusCode::CONFLICT) =>
            {
                (RetryReason::Advised, retry_after::parse(resp.headers()))
            }
            // A refused certificate is a settings problem: not retried.
            // Only if no byte of an answer came back: a malformed answer
            // means the upstream had the request (it may be generating).
            Err(e)
                if error::cause::<UpstreamUnavailable>(&**e).is_some_and(|u| u.may_retry())
                    && !error::is_tls_failure(&**e) =>
            {
                (RetryReason::Connection, None)
            }
            _ => return result,
        };
        let delay = advised.unwrap_or_else(|| {
            let ceiling = policy
                .base_delay
                .saturating_mul(1u32 << retries.min(20))
                .min(policy.max_delay);
            jitter(ceiling)
        });
        if matches!(
            reason,
            RetryReason::TooManyRequests | RetryReason::Unavailable
        ) {
            // The upstream speaks for every request: pause it for all, and
            // tell the adaptive limit.
            cooldown.pause(delay.min(policy.max_delay));
            metrics.upstream_pauses.inc();
            shared.recorder.signals.overload();
        }
        let give_up = if retries >= policy.max_retries {
            Some("max_retries")
        } else if delay > policy.max_delay {
            Some("too_long")
        } else if !shared.budget.withdraw() {
            Some("budget")
        } else {
            None
        };
        if let Some(why) = give_up {
            metrics.retries_given_up(why);
            tracing::debug!(
                reason = reason.as_str(),
                why,
                retries,
                "upstream refused; giving up"
            );
            return result.map(|resp| with_retry_advice(resp, delay));
        }
        retries += 1;
        metrics.retry(reason);
        if let Some(tap) = &carried.tap {
            tap.retried();
        }
        tracing::debug!(
            reason = reason.as_str(),
            ?delay,
            retries,
            "upstream refused; retrying"
        );
        // The refused answer is dropped unread: its connection is not reused.
        drop(result);
        tokio::time::sleep(delay).await;
        if !shared.targets.is_healthy(route) {
            // Its upstream went out of service meanwhile: another.
            if let Ok(i) = shared
                .targets
                .reroute(model.as_ref().map(Model::as_str), route)
            {
                route = i;
                cooldown = shared.cooldown(i);
                carried.route = Some(Route(i));
            }
        }
        result = attempt(svc.clone(), &parts, carried.extensions(), &body, &cooldown).await;
    }
}

/// What the steps below back-off read of a request's extensions: the
/// upstream it is routed to, its telemetry tap (dispatch and first-byte
/// times) and the client's address (`x-forwarded-for`). A retry carries
/// just these: copying every extension cost an allocation each.
#[derive(Clone, Debug)]
struct Carried {
    route: Option<Route>,
    tap: Option<Tap>,
    client: Option<ClientAddr>,
}

impl Carried {
    fn of(ext: &http::Extensions) -> Self {
        Self {
            route: ext.get::<Route>().copied(),
            tap: ext.get::<Tap>().cloned(),
            client: ext.get::<ClientAddr>().cloned(),
        }
    }

    fn extensions(&self) -> http::Extensions {
        let mut ext = http::Extensions::new();
        if let Some(r) = self.route {
            ext.insert(r);
        }
        if let Some(t) = &self.tap {
            ext.insert(t.clone());
        }
        if let Some(c) = &self.client {
            ext.insert(c.clone());
        }
        ext
    }
}

/// One try: wait out any pause of the upstream, then send a copy with
/// `extensions`.
async fn attempt<S, B, ResB>(
    svc: S,
    parts: &http::request::Parts,
    extensions: http::Extensions,
    body: &Full<Bytes>,
    cooldown: &Cooldown,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Req<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
{
    // Several requests may have slept through one pause and another may
    // have begun meanwhile: wait until none is on.
    while let Some(wait) = cooldown.remaining() {
        tokio::time::sleep(wait).await;
    }
    let mut req = Request::new(Either::Left(body.clone()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = extensions;
    let mut svc = svc.ready_oneshot().await.map_err(Into::into)?;
    svc.call(req).await.map_err(Into::into)
}

/// The upstream's refusal as the client gets it: with a `Retry-After` even if
/// the upstream sent none.
/// The upstream's own advice is kept where it can be read; advice that
/// cannot (`Retry-After: soon`, `retry-after-ms: NaN`) is replaced, so a
/// client never gets a wait it cannot parse.
fn with_retry_advice<B>(mut resp: Response<B>, delay: Duration) -> Response<B> {
    let h = resp.headers_mut();
    let (secs, ms) = error::retry_after_values(delay);
    let readable = h
        .get(http::header::RETRY_AFTER)
        .and_then(retry_after::seconds_or_date)
        .is_some();
    if !readable {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    match h.get("retry-after-ms").map(retry_after::millis) {
        Some(Some(_)) => {}
        // Unreadable, or absent beside a Retry-After of ours.
        Some(None) => {
            h.insert("retry-after-ms", HeaderValue::from(ms));
        }
        None if !readable => {
            h.insert("retry-after-ms", HeaderValue::from(ms));
        }
        None => {}
    }
    resp
}

/// Full jitter: a uniformly random delay in `[0, ceiling]`.
fn jitter(ceiling: Duration) -> Duration {
    static STATE: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
    let unit = crate::random::unit(STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
    ceiling.mul_f64(unit)
}

pin_project_lite::pin_project! {
    /// Response future of [`Backoff`].
    pub struct ResponseFuture<F, T> {
        #[pin]
        state: State<F, T>,
        // What a 502 advises: without it, a client's SDK adds retries of
        // its own, on its own schedule, to those already made here.
        advice: Duration,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, T> {
        // Not retryable: the inner call as it is.
        Direct { #[pin] fut: F },
        // Retryable: the retry loop.
        Retrying { fut: RetryFuture<T> },
    }
}

impl<F, T> ResponseFuture<F, T> {
    fn direct(fut: F, advice: Duration) -> Self {
        Self {
            state: State::Direct { fut },
            advice,
        }
    }

    fn retrying(fut: RetryFuture<T>, advice: Duration) -> Self {
        Self {
            state: State::Retrying { fut },
            advice,
        }
    }
}

impl<F, T> std::fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = match this.state.project() {
            StateProj::Direct { fut } => fut.poll(cx).map_err(Into::into),
            StateProj::Retrying { fut } => fut.as_mut().poll(cx),
        };
        match polled {
            Poll::Ready(Err(e)) if error::cause::<UpstreamUnavailable>(&*e).is_some() => {
                Poll::Ready(Err(error::Advised::wrap(e, *this.advice)))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
