//! Layer 4 of 8 (after auth, before route): decide whether a request goes
//! through admission, and at what priority.
//!
//! A request is *admitted* (queued and counted) when its method is POST and its
//! path is one of the configured generation endpoints. For those, the body is
//! buffered up to `max_body_bytes` (larger: 413) so its priority can be read
//! and so it can be replayed later; the buffered body is forwarded unchanged.
//! The priority comes from the `x-priority` header (an integer; anything else
//! is a 400), else from the body's top-level `priority` field (vLLM's request
//! field) when it is an integer, else the default. Lower is sooner.
//!
//! Everything else passes through with its body streamed, untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::{Layer, Service};

use crate::config::AdmitRules;
use crate::deadline::{BodyTimeout, ReadTimeout};
use crate::error::{BadRequest, BodyTooLarge, MethodNotAllowed, RateLimited};
use crate::json_scan;
use crate::telemetry::{Classified, Tap};
use crate::types::{
    hashed_tenant, Admit, ClientAddr, Model, Priority, Share, Tenant, PRIORITY_HEADER,
    TENANT_HEADER,
};
use crate::BoxError;

/// The longest `model` name kept for the request's record.
const MAX_MODEL_LEN: usize = 256;

/// The longest `x-tenant` value taken as a tenant; longer ones are cut.
const MAX_TENANT_LEN: usize = 128;

/// Whose share of the slots a request uses: its API key's tenant; without
/// keys the `x-tenant` header when trusted, else the client's address.
fn share_of<B>(req: &Request<B>, trust_tenant_header: bool) -> Share {
    if let Some(t) = req.extensions().get::<Tenant>() {
        return t.share.clone();
    }
    let named = trust_tenant_header
        .then(|| req.headers().get(&TENANT_HEADER))
        .flatten()
        .filter(|v| !v.is_empty());
    let (id, name) = match named {
        Some(v) => {
            let name = if v.len() <= MAX_TENANT_LEN {
                v.clone()
            } else {
                HeaderValue::from_bytes(&v.as_bytes()[..MAX_TENANT_LEN])
                    .unwrap_or_else(|_| v.clone())
            };
            (hashed_tenant(name.as_bytes()), name)
        }
        // The address's id was hashed once, when the connection came.
        None => match req.extensions().get::<ClientAddr>() {
            Some(c) => (c.tenant(), c.ip().clone()),
            None => return Share::default(),
        },
    };
    Share {
        id,
        weight: 1,
        max_in_flight: 0,
        name,
    }
}

/// The shape of a request's answer if it may be upgraded: a chat or text
/// completion, not streamed, with no `stream_options` of its own.
fn upgrade_shape(path: &str, fields: &crate::json_scan::Fields<'_>) -> Option<crate::types::Shape> {
    if fields.stream == Some(true) || fields.stream_options {
        return None;
    }
    if path.ends_with("/chat/completions") {
        Some(crate::types::Shape::Chat)
    } else if path.ends_with("/completions") {
        Some(crate::types::Shape::Text)
    } else {
        None
    }
}

/// The body handed on: buffered for admitted requests, streamed otherwise
/// (under `body_read_timeout`). The streamed one is boxed: few requests
/// stream a body (a GET's empty one is passed as buffered), and every
/// request's type, moved from layer to layer, is as small as the buffered
/// body's.
pub type ClassifiedBody<B> = Either<Full<Bytes>, Pin<Box<ReadTimeout<B>>>>;

/// A classified request lets go of its connection's read buffer: its header
/// values, path, buffered body and model name are copied (see
/// [`Detach`](crate::admission::Detach)).
impl<B> crate::admission::Detach for Request<ClassifiedBody<B>> {
    fn detach(&mut self) {
        for v in self.headers_mut().values_mut() {
            if let Ok(mut copy) = HeaderValue::from_bytes(v.as_bytes()) {
                copy.set_sensitive(v.is_sensitive());
                *v = copy;
            }
        }
        if let Ok(uri) = http::Uri::try_from(self.uri().to_string()) {
            *self.uri_mut() = uri;
        }
        if let Either::Left(full) = self.body_mut() {
            let data = std::mem::take(full).into_inner().unwrap_or_default();
            *full = Full::new(Bytes::copy_from_slice(&data));
        }
        if let Some(model) = self.extensions_mut().get_mut::<Model>() {
            model.0 = Bytes::copy_from_slice(&model.0);
        }
    }
}

/// The bytes of admitted request bodies held now, by every worker: what
/// `max_buffered_bytes` bounds. Shared by the stacks of one proxy.
#[derive(Debug, Default)]
pub struct Buffered {
    held: std::sync::atomic::AtomicUsize,
}

impl Buffered {
    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Take `n` more bytes, if that stays within `max` (0: no bound).
    fn take(self: &Arc<Self>, n: usize, max: usize) -> Option<Held> {
        use std::sync::atomic::Ordering::Relaxed;
        let before = self.held.fetch_add(n, Relaxed);
        if max > 0 && before.saturating_add(n) > max {
            self.held.fetch_sub(n, Relaxed);
            return None;
        }
        Some(Held {
            buffered: self.clone(),
            bytes: n,
        })
    }
}

/// Bytes of one request's body counted in [`Buffered`], given back when
/// the request is done with them (its response has come, or it failed).
#[derive(Debug)]
struct Held {
    buffered: Arc<Buffered>,
    bytes: usize,
}

impl Held {
    /// Keep only `n` of the bytes taken (the body came shorter).
    fn keep(&mut self, n: usize) {
        if n < self.bytes {
            let extra = self.bytes - n;
            self.buffered
                .held
                .fetch_sub(extra, std::sync::atomic::Ordering::Relaxed);
            self.bytes = n;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.buffered
            .held
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a request gets when the bodies held are at their bound: a 503 with
/// a short wait (bodies are let go of as requests are answered).
fn buffers_full() -> BoxError {
    crate::types::Overloaded::new(
        crate::types::Reason::BuffersFull,
        std::time::Duration::from_secs(1),
    )
    .into()
}

/// Whether `rules` admit a request of `method` to `path`.
fn admits(rules: &AdmitRules, method: &Method, path: &str) -> bool {
    method == Method::POST && rules.admit_paths.iter().any(|p| p == path)
}

/// The endpoint `path` names without being spelled as it (see
/// [`crate::path`]): `/v1/chat/%63ompletions` for `/v1/chat/completions`.
fn disguised_endpoint<'r>(rules: &'r AdmitRules, path: &str) -> Option<&'r str> {
    if crate::path::is_plain(path) || rules.admit_paths.iter().any(|p| p == path) {
        // Plain and not an endpoint, or the endpoint as written (a GET).
        return None;
    }
    let form = crate::path::normal_form(path);
    rules
        .admit_paths
        .iter()
        .find(|p| p.as_bytes().eq_ignore_ascii_case(&form))
        .map(String::as_str)
}

/// The rules, replaceable while serving (a config reload): each request
/// reads the current ones, lock-free.
pub type SharedAdmitRules = Arc<arc_swap::ArcSwap<AdmitRules>>;

/// Builds [`Classify`] services. Cloning shares the rules.
#[derive(Clone, Debug)]
pub struct ClassifyLayer {
    rules: SharedAdmitRules,
    buffered: Arc<Buffered>,
    keepalive: bool,
}

impl ClassifyLayer {
    /// Classify by these rules.
    pub fn new(rules: AdmitRules) -> Self {
        Self::shared(Arc::new(arc_swap::ArcSwap::from_pointee(rules)))
    }

    /// Classify by whatever rules `rules` holds at each request.
    pub fn shared(rules: SharedAdmitRules) -> Self {
        Self {
            rules,
            buffered: Arc::default(),
            keepalive: false,
        }
    }

    /// Count admitted bodies in `buffered`, shared with other stacks.
    pub fn counting(mut self, buffered: Arc<Buffered>) -> Self {
        self.buffered = buffered;
        self
    }

    /// Read `x-anteroom-queue-keepalive` (`queue_keepalive` is set): a
    /// malformed one is a 400, and a stream that asks is marked for it.
    pub fn keepalive(mut self, on: bool) -> Self {
        self.keepalive = on;
        self
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classify<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Classify {
            inner,
            rules: self.rules.clone(),
            buffered: self.buffered.clone(),
            keepalive: self.keepalive,
        }
    }
}

/// Marks generation requests for admission: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Classify<S> {
    inner: S,
    rules: SharedAdmitRules,
    buffered: Arc<Buffered>,
    keepalive: bool,
}

impl<S, B> Service<Request<B>> for Classify<S>
where
    S: Service<Request<ClassifiedBody<B>>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is driven by the Oneshot in the future, once the body is in.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.method() == Method::CONNECT {
            // Never a tunnel to wherever the client names.
            return ResponseFuture::failed(MethodNotAllowed.into());
        }
        let svc = self.inner.clone();
        let rules = self.rules.load();
        if !admits(&rules, req.method(), req.uri().path()) {
            if let Some(endpoint) = disguised_endpoint(&rules, req.uri().path()) {
                return ResponseFuture::failed(
                    BadRequest::new(
                        "invalid_path",
                        format!(
                            "this path names the endpoint {endpoint} without being spelled as it \
                             (escapes, case, repeated or trailing slashes, dot segments); \
                             send it as {endpoint}"
                        ),
                    )
                    .into(),
                );
            }
            // An empty body (a GET) is passed as a buffered one, so the
            // upstream client can send it again if a pooled connection
            // closes under it; anything else streams through.
            let req = if req.body().is_end_stream() {
                req.map(|_| Either::Left(Full::new(Bytes::new())))
            } else {
                let timeout = rules.body_read_timeout;
                req.map(|b| Either::Right(Box::pin(ReadTimeout::new(b, timeout))))
            };
            return ResponseFuture::calling(svc, req);
        }
        let header_priority = match header_priority(&req) {
            Ok(p) => p,
            Err(e) => return ResponseFuture::failed(e.into()),
        };
        let deadline = match header_deadline(&req) {
            Ok(d) => d,
            Err(e) => return ResponseFuture::failed(e.into()),
        };
        let keepalive = match self.keepalive {
            false => false,
            true => match crate::keepalive::asked(req.headers()) {
                Ok(asked) => asked,
                Err(e) => return ResponseFuture::failed(e.into()),
            },
        };
        let limit = rules.max_body_bytes;
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return ResponseFuture::failed(BodyTooLarge::new(limit).into());
        }
        // A declared length is counted before a byte is read, so bodies
        // past the bound are refused unread; one without is counted once
        // it is in.
        let held = match declared {
            Some(n) => match self.buffered.take(n as usize, rules.max_buffered_bytes) {
                Some(h) => Some(h),
                None => return ResponseFuture::failed(buffers_full()),
            },
            None => None,
        };
        let share = share_of(&req, rules.trust_tenant_header);
        let (parts, body) = req.into_parts();
        ResponseFuture {
            state: State::Collecting {
                collect: Limited::new(ReadTimeout::new(body, rules.body_read_timeout), limit)
                    .collect(),
                rest: Some(Pending {
                    parts,
                    svc,
                    header_priority,
                    deadline,
                    keepalive,
                    share,
                    default_priority: rules.default_priority,
                    limit,
                    keep_model: rules.keep_model,
                    held,
                    buffered: self.buffered.clone(),
                    max_buffered: rules.max_buffered_bytes,
                }),
            },
        }
    }
}

/// What classify decides of an admitted request from what it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decision {
    /// The priority it is queued at.
    priority: Priority,
    /// What it asked for, when its key's `max_priority` clamped it.
    clamped_from: Option<Priority>,
    /// Whether the body's `priority` must be rewritten to `priority`.
    rewrite_body: bool,
}

/// The priority of a request: its `x-priority` header, else its body's
/// `priority`, else its key's default, else the admit rules' default; never
/// more urgent than its key's `max_priority`. A key with a most-urgent
/// priority also decides what the backend reads (vLLM schedules by the
/// body's `priority`): the body is rewritten to the priority the request
/// is queued at whenever it says anything else, or says it more than once
/// ("-1000", -1e3, twice).
fn decide(
    header: Option<Priority>,
    fields: &json_scan::Fields<'_>,
    tenant: Option<&Tenant>,
    default: Priority,
) -> Decision {
    let asked = header
        .or(fields.priority)
        .or(tenant.and_then(|t| t.default_priority))
        .unwrap_or(default);
    let priority = match tenant.and_then(|t| t.max_priority) {
        Some(most) if asked < most => most,
        _ => asked,
    };
    let limited = tenant.is_some_and(|t| t.max_priority.is_some());
    Decision {
        priority,
        clamped_from: (priority != asked).then_some(asked),
        rewrite_body: limited
            && fields.priority_keys > 0
            && (fields.priority != Some(priority) || fields.priority_keys > 1),
    }
}

/// Charge a key's tokens-per-minute budget for a request with a body of
/// `body_len` bytes: the prompt's estimate and the most it may generate
/// (corrected from its usage at the end). Nothing without a budget; a 429
/// `rate_limit_exceeded` when the budget cannot take it.
fn charge_tokens(
    tenant: Option<&Tenant>,
    body_len: usize,
    max_tokens: Option<u64>,
) -> Result<Option<crate::types::TokenCharge>, BoxError> {
    let Some((tenant, budget)) = tenant.and_then(|t| Some((t, t.tokens.as_ref()?))) else {
        return Ok(None);
    };
    let prompt = crate::types::prompt_estimate(body_len);
    // Saturating: a client's `max_tokens` near u64::MAX must not wrap into
    // a small charge.
    let charged =
        prompt.saturating_add(max_tokens.unwrap_or(crate::types::DEFAULT_COMPLETION_ESTIMATE));
    let left = match budget.charge(charged) {
        Ok(left) => left,
        Err(wait) => {
            tenant
                .rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(RateLimited::tokens(wait).into());
        }
    };
    Ok(Some(crate::types::TokenCharge {
        budget: budget.clone(),
        // What was counted: a charge is cut to a minute's tokens, and so is
        // its correction (else a huge max_tokens earns a credit).
        charged: charged.min(budget.largest_charge()),
        prompt,
        left,
        shared: Default::default(),
    }))
}

/// What the record learns of a request to `path` with these `fields`.
fn classified(
    path: &str,
    fields: &json_scan::Fields<'_>,
    priority: Priority,
    clamped_from: Option<Priority>,
) -> Classified {
    Classified {
        model: fields
            .model
            .map(|m| String::from_utf8_lossy(&m[..m.len().min(MAX_MODEL_LEN)]).into_owned()),
        priority,
        stream: fields.stream.unwrap_or(false),
        clamped_from,
        may_ask_usage: fields.stream == Some(true)
            && !fields.stream_options
            && path.ends_with("/completions"),
        upgrade: upgrade_shape(path, fields),
        generation: path.ends_with("/completions"),
        max_tokens: fields.max_tokens,
    }
}

/// Read `x-priority`: absent is `None`, anything but an `i32` is an error.
fn header_priority<B>(req: &Request<B>) -> Result<Option<Priority>, BadRequest> {
    let Some(value) = req.headers().get(&PRIORITY_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<Priority>().ok())
        .map(Some)
        .ok_or_else(|| {
            BadRequest::new(
                "invalid_priority",
                format!(
                    "the {PRIORITY_HEADER} header must be an integer from {} to {} (lower is served sooner)",
                    Priority::MIN,
                    Priority::MAX
                ),
            )
        })
}

/// The header a client bounds its request's wait in the queue with.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-anteroom-deadline-ms");

/// Read `x-anteroom-deadline-ms`: absent is `None`; a whole number of
/// milliseconds is the most the request may wait (0: only if it can start
/// at once; more than fits is as long as can be, and `queue_timeout`
/// bounds it); anything else (negative, a fraction, not a number) is an
/// error.
fn header_deadline<B>(req: &Request<B>) -> Result<Option<std::time::Duration>, BadRequest> {
    let Some(value) = req.headers().get(&DEADLINE_HEADER) else {
        return Ok(None);
    };
    let digits = value.as_bytes().trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(BadRequest::new(
            "invalid_deadline",
            format!(
                "the {DEADLINE_HEADER} header must be a whole number of milliseconds, 0 or more (the most this request may wait in the queue)"
            ),
        ));
    }
    // Digits only: the one failure left is a number too large, which is
    // as long as can be.
    let ms = std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    Ok(Some(std::time::Duration::from_millis(ms)))
}

struct Pending<S> {
    parts: Parts,
    svc: S,
    header_priority: Option<Priority>,
    deadline: Option<std::time::Duration>,
    keepalive: bool,
    share: Share,
    default_priority: Priority,
    limit: usize,
    keep_model: bool,
    held: Option<Held>,
    buffered: Arc<Buffered>,
    max_buffered: usize,
}

pin_project! {
    /// Response future of [`Classify`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ClassifiedBody<B>>>,
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<ClassifiedBody<B>>>,
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        Collecting {
            #[pin]
            collect: Collect<Limited<ReadTimeout<B>>>,
            rest: Option<Pending<S>>,
        },
        Calling {
            #[pin]
            fut: Oneshot<S, Request<ClassifiedBody<B>>>,
            // The body's bytes, counted until the request is done.
            held: Option<Held>,
        },
        Failed {
            err: Option<BoxError>,
        },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<ClassifiedBody<B>>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn calling(svc: S, req: Request<ClassifiedBody<B>>) -> Self {
        Self {
            state: State::Calling {
                fut: Oneshot::new(svc, req),
                held: None,
            },
        }
    }

    fn failed(err: BoxError) -> Self {
        Self {
            state: State::Failed { err: Some(err) },
        }
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<ClassifiedBody<B>>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Collecting { collect, rest } => {
                    let collected = ready!(collect.poll(cx));
                    let Pending {
                        mut parts,
                        svc,
                        header_priority,
                        deadline,
                        keepalive,
                        share,
                        default_priority,
                        limit,
                        keep_model,
                        held,
                        buffered,
                        max_buffered,
                    } = rest.take().expect("polled after completion");
                    let bytes = match collected {
                        Ok(c) => c.to_bytes(),
                        Err(e) if e.is::<LengthLimitError>() => {
                            return Poll::Ready(Err(BodyTooLarge::new(limit).into()))
                        }
                        Err(e) if e.is::<BodyTimeout>() => return Poll::Ready(Err(e)),
                        Err(e) => {
                            return Poll::Ready(Err(BadRequest::new(
                                "invalid_body",
                                format!("could not read the request body: {e}"),
                            )
                            .into()))
                        }
                    };
                    let held = match held {
                        Some(mut h) => {
                            h.keep(bytes.len());
                            h
                        }
                        None => match buffered.take(bytes.len(), max_buffered) {
                            Some(h) => h,
                            None => return Poll::Ready(Err(buffers_full())),
                        },
                    };
                    let fields = json_scan::scan(&bytes);
                    if fields.empty_messages && parts.uri.path().ends_with("/chat/completions") {
                        // Started, it would generate from nothing until the
                        // context is full, holding a slot (curator's probe).
                        return Poll::Ready(Err(BadRequest::new(
                            "empty_messages",
                            "`messages` is empty: a chat completion needs at least one message"
                                .into(),
                        )
                        .into()));
                    }
                    let tenant = parts.extensions.get::<Tenant>();
                    let Decision {
                        priority,
                        clamped_from,
                        rewrite_body,
                    } = decide(header_priority, &fields, tenant, default_priority);
                    let rewritten = rewrite_body
                        .then(|| json_scan::with_priority(&bytes, priority))
                        .flatten()
                        .map(|body| {
                            parts.headers.insert(
                                http::header::CONTENT_LENGTH,
                                HeaderValue::from(body.len()),
                            );
                            Bytes::from(body)
                        });
                    let charge = match charge_tokens(tenant, bytes.len(), fields.max_tokens) {
                        Ok(charge) => charge,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    if let Some(tap) = parts.extensions.get::<Tap>() {
                        tap.classify(classified(
                            parts.uri.path(),
                            &fields,
                            priority,
                            clamped_from,
                        ));
                        if let Some(charge) = charge {
                            tap.set_token_charge(charge);
                        }
                    }
                    if keep_model {
                        if let Some(m) = fields.model {
                            parts.extensions.insert(Model(bytes.slice_ref(m)));
                        }
                    }
                    parts.extensions.insert(Admit {
                        priority,
                        share,
                        stream: fields.stream == Some(true),
                        deadline,
                        keepalive: keepalive && fields.stream == Some(true),
                    });
                    let body = rewritten.unwrap_or(bytes);
                    let req = Request::from_parts(parts, Either::Left(Full::new(body)));
                    this.state.set(State::Calling {
                        fut: Oneshot::new(svc, req),
                        held: Some(held),
                    });
                }
                StateProj::Calling { fut, .. } => return fut.poll(cx).map_err(Into::into),
                StateProj::Failed { err } => {
                    return Poll::Ready(Err(err.take().expect("polled after completion")))
                }
            }
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ClassifiedBody<B>>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Detach;

    #[test]
    fn a_detached_request_points_into_none_of_its_connections_buffer() {
        // As hyper hands it out: every part a slice of one read buffer.
        let buf = Bytes::from(
            b"/v1/chat/completions?x=1 Bearer-abc {\"model\":\"m\",\"priority\":3}".to_vec(),
        );
        let inside = |p: *const u8| buf.as_ptr_range().contains(&p);
        let mut req = Request::builder()
            .uri(http::Uri::from_maybe_shared(buf.slice(0..24)).unwrap())
            .header(
                "authorization",
                HeaderValue::from_maybe_shared(buf.slice(25..35)).unwrap(),
            )
            .body(Either::<_, Pin<Box<ReadTimeout<()>>>>::Left(Full::new(
                buf.slice(36..),
            )))
            .unwrap();
        if let Some(v) = req.headers_mut().get_mut("authorization") {
            v.set_sensitive(true);
        }
        req.extensions_mut().insert(Model(buf.slice(46..47)));
        assert!(inside(req.uri().path().as_ptr()));

        req.detach();
        let (parts, body) = req.into_parts();
        assert_eq!(parts.uri, "/v1/chat/completions?x=1");
        assert!(!inside(parts.uri.path().as_ptr()));
        let auth = &parts.headers["authorization"];
        assert_eq!(auth, "Bearer-abc");
        assert!(auth.is_sensitive());
        assert!(!inside(auth.as_bytes().as_ptr()));
        let model = parts.extensions.get::<Model>().unwrap();
        assert_eq!(model.as_str(), "m");
        assert!(!inside(model.0.as_ptr()));
        let Either::Left(full) = body else {
            panic!("buffered")
        };
        let data = full.into_inner().unwrap();
        assert_eq!(&data[..], b"{\"model\":\"m\",\"priority\":3}");
        assert!(!inside(data.as_ptr()));
    }

    fn tenant(default: Option<Priority>, most: Option<Priority>) -> Tenant {
        Tenant {
            name: "k".into(),
            default_priority: default,
            max_priority: most,
            share: crate::types::Share::default(),
            tokens: None,
            rate_limited: Default::default(),
            requests_per_minute: None,
        }
    }

    #[test]
    fn the_priority_comes_from_the_header_then_the_body_then_the_key_then_the_routes() {
        let body = json_scan::scan(br#"{"priority": 3}"#);
        let none = json_scan::scan(b"{}");
        let key = tenant(Some(7), None);
        let p = |h, f, t| decide(h, f, t, 9).priority;
        assert_eq!(p(Some(1), &body, Some(&key)), 1);
        assert_eq!(p(None, &body, Some(&key)), 3);
        assert_eq!(p(None, &none, Some(&key)), 7);
        assert_eq!(p(None, &none, None), 9);
        // Without a most-urgent priority the body is never touched.
        assert!(!decide(Some(1), &body, Some(&key), 9).rewrite_body);
    }

    #[test]
    fn a_key_is_clamped_and_the_backend_reads_the_priority_it_was_queued_at() {
        let key = tenant(None, Some(0));
        let urgent = json_scan::scan(br#"{"priority": -5}"#);
        assert_eq!(
            decide(None, &urgent, Some(&key), 0),
            Decision {
                priority: 0,
                clamped_from: Some(-5),
                rewrite_body: true,
            }
        );
        // Within the bound: kept, and the body already says it once.
        let fine = json_scan::scan(br#"{"priority": 4}"#);
        assert_eq!(
            decide(None, &fine, Some(&key), 0),
            Decision {
                priority: 4,
                clamped_from: None,
                rewrite_body: false,
            }
        );
        // Said twice (a parser may take either): rewritten to one.
        let twice = json_scan::scan(br#"{"priority": 4, "priority": -9}"#);
        assert!(decide(None, &twice, Some(&key), 0).rewrite_body);
        // The header asks for more urgency than the body: clamped, and the
        // body, which says 4, is rewritten to the 0 it is queued at.
        let d = decide(Some(-3), &fine, Some(&key), 0);
        assert_eq!(
            (d.priority, d.clamped_from, d.rewrite_body),
            (0, Some(-3), true)
        );
    }

    #[test]
    fn a_token_charge_saturates_and_is_refused_past_the_budget() {
        let mut key = tenant(None, None);
        assert!(charge_tokens(Some(&key), 4000, Some(10)).unwrap().is_none());
        key.tokens = crate::types::TokenBudget::new(1000);
        let c = charge_tokens(Some(&key), 400, Some(100)).unwrap().unwrap();
        assert_eq!(c.charged, c.prompt + 100);
        // max_tokens near u64::MAX: refused (more than the budget has
        // left), not wrapped into a small charge that would pass.
        assert!(charge_tokens(Some(&key), 400, Some(u64::MAX)).is_err());
        assert_eq!(
            key.rate_limited.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
