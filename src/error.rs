//! Errors of the request path and the one place that turns them into
//! responses.
//!
//! Inside the stack every failure is a small named struct carried as a
//! [`BoxError`]. At the edge, [`rescue`] walks the error's `source()` chain
//! and answers with the right status and an OpenAI-shaped body:
//!
//! ```json
//! {"error":{"message":"…","type":"…","param":null,"code":"…"}}
//! ```
//!
//! | status | `type` | `code` | when |
//! |---|---|---|---|
//! | 400 | `invalid_request_error` | `invalid_priority`, `invalid_deadline`, `invalid_keepalive`, `invalid_body`, `invalid_path` | bad `x-priority`, `x-anteroom-deadline-ms` or `x-anteroom-queue-keepalive`; unreadable body; an endpoint spelled otherwise (see [`crate::path`]) |
//! | 429 | `rate_limit_error` | `rate_limit_exceeded` | the key is over its `requests_per_minute` |
//! | 401 | `invalid_request_error` | `invalid_api_key` | keys are configured and none (or a wrong one) was presented |
//! | 405 | `invalid_request_error` | `method_not_allowed` | CONNECT (anteroom is not a forward proxy) |
//! | 404 | `invalid_request_error` | `model_not_found` | no `[[upstream]]` serves the body's `model` |
//! | 408 | `invalid_request_error` | `request_timeout` | no piece of the request body for `body_read_timeout` |
//! | 413 | `invalid_request_error` | `request_too_large` | body over `max_body_bytes` |
//! | 429 | `rate_limit_error` | `queue_full`, `queue_timeout` | queue full (or displaced by a more urgent request); waited too long |
//! | 502 | `upstream_error` | `upstream_unavailable` | upstream refused, reset, or answered garbage |
//! | 503 | `server_error` | `shutting_down`, `buffers_full` | the proxy is closing; the bodies it holds reach `max_buffered_bytes` |
//! | 504 | `upstream_error` | `upstream_timeout` | no response headers within `upstream_timeout` |
//! | 500 | `server_error` | `internal_error` | anything else (a bug) |
//!
//! A 429 also carries `Retry-After` (whole seconds, at least 1) and
//! `retry-after-ms` (milliseconds, at least 1).

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::types::{Overloaded, Reason};
use crate::BoxError;

/// The request itself is wrong (400).
#[derive(Debug)]
pub struct BadRequest {
    code: &'static str,
    message: String,
}

impl BadRequest {
    pub(crate) fn new(code: &'static str, message: String) -> Self {
        Self { code, message }
    }

    /// Its `code`.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for BadRequest {}

/// CONNECT: anteroom is not a forward proxy (405).
#[derive(Debug)]
pub struct MethodNotAllowed;

impl fmt::Display for MethodNotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CONNECT is not served: anteroom only forwards to its configured upstreams")
    }
}

impl StdError for MethodNotAllowed {}

/// No API key, or a wrong one (401).
#[derive(Debug)]
pub struct Unauthorized {
    why: &'static str,
}

impl Unauthorized {
    pub(crate) fn new(why: &'static str) -> Self {
        Self { why }
    }
}

impl fmt::Display for Unauthorized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.why)
    }
}

impl StdError for Unauthorized {}

/// A key is over its rate limit (429), allowed again after `retry_after`.
#[derive(Debug)]
pub struct RateLimited {
    retry_after: Duration,
    limit: &'static str,
}

impl RateLimited {
    /// Over the requests-per-minute limit.
    pub(crate) fn requests(retry_after: Duration) -> Self {
        Self {
            retry_after,
            limit: "requests-per-minute",
        }
    }

    /// Over the tokens-per-minute limit.
    pub(crate) fn tokens(retry_after: Duration) -> Self {
        Self {
            retry_after,
            limit: "tokens-per-minute",
        }
    }

    /// When the request would pass.
    pub(crate) fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The tokens-per-minute limit refused it (else requests-per-minute).
    pub(crate) fn on_tokens(&self) -> bool {
        self.limit == "tokens-per-minute"
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this API key is over its {} limit; retry after {:.3}s",
            self.limit,
            self.retry_after.as_secs_f64()
        )
    }
}

impl StdError for RateLimited {}

/// No upstream serves the requested model (404).
#[derive(Debug)]
pub struct ModelNotFound {
    model: String,
    served: String,
}

impl ModelNotFound {
    pub(crate) fn new(model: String, served: String) -> Self {
        Self { model, served }
    }
}

impl fmt::Display for ModelNotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the model `{}` is not served here; served: {}",
            self.model, self.served
        )
    }
}

impl StdError for ModelNotFound {}

/// The request body is larger than `max_body_bytes` (413).
#[derive(Debug)]
pub struct BodyTooLarge {
    limit: usize,
}

impl BodyTooLarge {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request body is larger than the {} bytes this proxy buffers (max_body_bytes)",
            self.limit
        )
    }
}

impl StdError for BodyTooLarge {}

/// A bug: code below the edge panicked while serving this request (500).
/// The client is told nothing of it but that; the panic's message goes to
/// the log, with the request's id (see [`crate::edge`]).
#[derive(Debug)]
pub struct Panicked {
    message: String,
}

impl Panicked {
    /// From a panic's payload, as `catch_unwind` gives it.
    pub(crate) fn new(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = match (
            payload.downcast_ref::<&str>(),
            payload.downcast_ref::<String>(),
        ) {
            (Some(s), _) => (*s).to_owned(),
            (None, Some(s)) => s.clone(),
            (None, None) => "(a panic without a message)".to_owned(),
        };
        Self { message }
    }

    /// What the panic said (for the log only).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anteroom failed while serving this request (an internal error, logged with its request id)")
    }
}

impl StdError for Panicked {}

/// The last event of a stream anteroom ends itself: an OpenAI-shaped error
/// as one SSE `data:` event, after a blank line that ends any event left
/// half-written.
pub(crate) fn error_event(kind: &str, code: &str, message: &str) -> Bytes {
    let event = serde_json::json!({
        "error": {
            "message": message,
            "type": kind,
            "param": null,
            "code": code,
        }
    });
    Bytes::from(format!("\n\ndata: {event}\n\n"))
}

/// The upstream could not be reached or broke the exchange (502).
#[derive(Debug)]
pub struct UpstreamUnavailable {
    source: BoxError,
    how: Broke,
}

/// How an exchange with the upstream broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broke {
    /// Nothing came back: refused, reset or closed before any answer.
    Unanswered,
    /// Bytes came back that are not HTTP (a broken status line or head).
    NotHttp,
    /// The answer's headers came, then its body broke off before a byte.
    CutShort,
}

impl UpstreamUnavailable {
    /// Nothing came back: refused, reset or closed before any answer.
    pub(crate) fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            how: Broke::Unanswered,
        }
    }

    /// The upstream answered, but not in HTTP (a malformed status line or
    /// head): it had the whole request.
    pub(crate) fn malformed(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            how: Broke::NotHttp,
        }
    }

    /// The upstream's answer broke off after its headers, before any of
    /// its body: it had the whole request.
    pub(crate) fn cut_short(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            how: Broke::CutShort,
        }
    }

    /// Whether the request may be sent again: only if no byte of an
    /// answer came back.
    pub(crate) fn may_retry(&self) -> bool {
        self.how == Broke::Unanswered
    }
}

impl fmt::Display for UpstreamUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause (addresses, the upstream's own words) is for the log:
        // see `rescue`.
        f.write_str(match self.how {
            Broke::Unanswered => "the upstream server could not be reached",
            Broke::NotHttp => "the upstream server's answer was not valid HTTP",
            Broke::CutShort => "the upstream server's answer broke off after its headers",
        })
    }
}

impl StdError for UpstreamUnavailable {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// An error that says when to try again: a 502 from an upstream that is
/// down carries the time until its health is next checked. Reads as the
/// error it wraps.
#[derive(Debug)]
pub(crate) struct Advised {
    inner: BoxError,
    after: Duration,
}

impl Advised {
    /// `inner`, with `after` as the advice, unless it has advice already.
    pub(crate) fn wrap(inner: BoxError, after: Duration) -> BoxError {
        if cause::<Advised>(&*inner).is_some() {
            return inner;
        }
        Box::new(Self { inner, after })
    }
}

impl fmt::Display for Advised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl StdError for Advised {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.inner)
    }
}

/// An error whose answer carries these headers as well (a refusal's
/// `x-ratelimit-*` headers): the wrapper the telemetry layer puts on an
/// error, as it sees errors before they become answers.
#[derive(Debug)]
pub(crate) struct Headed {
    inner: BoxError,
    headers: http::HeaderMap,
}

impl Headed {
    /// `inner`, answered with `headers` too (none: `inner` as it is).
    pub(crate) fn wrap(inner: BoxError, headers: http::HeaderMap) -> BoxError {
        if headers.is_empty() {
            return inner;
        }
        Box::new(Self { inner, headers })
    }
}

impl fmt::Display for Headed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl StdError for Headed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.inner)
    }
}

/// The upstream sent no response headers in time (504).
#[derive(Debug)]
pub struct UpstreamTimeout {
    after: Duration,
    setting: &'static str,
}

impl UpstreamTimeout {
    /// No response headers within `upstream_timeout`.
    pub(crate) fn new(after: Duration) -> Self {
        Self {
            after,
            setting: "upstream_timeout",
        }
    }

    /// Headers, then no byte of a (non-streamed) body within
    /// `first_token_timeout`.
    pub(crate) fn first_byte(after: Duration) -> Self {
        Self {
            after,
            setting: "first_token_timeout",
        }
    }
}

impl fmt::Display for UpstreamTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the upstream server sent no response within {:?} ({})",
            self.after, self.setting
        )
    }
}

impl StdError for UpstreamTimeout {}

/// A request-path error, as the error body describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Described {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// Stable `code`, also the metric label.
    pub code: &'static str,
    /// Advised delay before a retry.
    pub retry_after: Option<Duration>,
}

/// The first error of type `E` in `err`'s source chain.
pub(crate) fn cause<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// A TLS failure with the upstream (its certificate was refused, the
/// handshake failed): a settings problem that trying again will not fix.
/// rustls' error travels inside an `io::Error`, whose `source()` skips it,
/// so the `io::Error`s of the chain are looked into.
pub(crate) fn is_tls_failure(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// Classify an error: status, type, code and retry advice. A flat list, most
/// specific first.
pub(crate) fn describe(err: &(dyn StdError + 'static)) -> Described {
    let d = |status, kind, code, retry_after| Described {
        status,
        kind,
        code,
        retry_after,
    };
    if let Some(e) = cause::<Overloaded>(err) {
        return match e.reason() {
            Reason::Closed
            | Reason::Rerouted
            | Reason::BuffersFull
            | Reason::PastDrain
            | Reason::PassthroughFull => d(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.reason().code(),
                Some(e.retry_after()),
            ),
            _ => d(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                e.reason().code(),
                Some(e.retry_after()),
            ),
        };
    }
    if cause::<crate::cluster::Unavailable>(err).is_some() {
        return d(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "cluster_unavailable",
            Some(Duration::from_secs(1)),
        );
    }
    if let Some(e) = cause::<BadRequest>(err) {
        return d(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            e.code,
            None,
        );
    }
    if cause::<MethodNotAllowed>(err).is_some() {
        return d(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            None,
        );
    }
    if let Some(e) = cause::<RateLimited>(err) {
        return d(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            Some(e.retry_after),
        );
    }
    if cause::<Unauthorized>(err).is_some() {
        return d(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            None,
        );
    }
    if cause::<ModelNotFound>(err).is_some() {
        return d(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            None,
        );
    }
    if cause::<crate::deadline::BodyTimeout>(err).is_some() {
        return d(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            None,
        );
    }
    if cause::<BodyTooLarge>(err).is_some() {
        return d(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            None,
        );
    }
    if cause::<UpstreamTimeout>(err).is_some() {
        return d(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
            None,
        );
    }
    if cause::<UpstreamUnavailable>(err).is_some() {
        return d(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_unavailable",
            cause::<Advised>(err).map(|a| a.after),
        );
    }
    d(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "internal_error",
        None,
    )
}

/// Turn any request-path error into the response the client gets.
pub fn rescue(err: &(dyn StdError + 'static)) -> Response<Full<Bytes>> {
    let mut resp = answer(err);
    if let Some(h) = cause::<Headed>(err) {
        for (name, value) in &h.headers {
            resp.headers_mut().insert(name, value.clone());
        }
    }
    resp
}

fn answer(err: &(dyn StdError + 'static)) -> Response<Full<Bytes>> {
    let d = describe(err);
    if d.status.is_server_error() {
        tracing::warn!(code = d.code, error = %chain(err), "request failed");
        // What went wrong inside (an upstream's address, its own words, a
        // panic) is for the log; the client is told what happened.
        let top = match cause::<UpstreamUnavailable>(err) {
            // A settings problem the operator must see named.
            Some(u) if is_tls_failure(err) => {
                format!("{u}: its TLS certificate was refused (the log says why)")
            }
            Some(u) => u.to_string(),
            None => err.to_string(),
        };
        return error_response(&d, &top);
    }
    tracing::debug!(code = d.code, error = %chain(err), "request refused");
    error_response(&d, &chain(err))
}

/// An OpenAI-shaped error response.
pub(crate) fn error_response(d: &Described, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": d.kind,
            "param": null,
            "code": d.code,
        }
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = d.status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(after) = d.retry_after {
        let (secs, ms) = retry_after_values(after);
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        h.insert("retry-after-ms", HeaderValue::from(ms));
    }
    resp
}

/// `Retry-After` in whole seconds (rounded up, at least 1) and
/// `retry-after-ms` (rounded up, at least 1).
pub fn retry_after_values(after: Duration) -> (u64, u64) {
    // Saturating: an upstream's advice can be any size.
    let ms = u64::try_from(after.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1);
    let secs = ms.div_ceil(1000).max(1);
    (secs, ms)
}

/// `err` and its sources, joined by ": ", without repeating a message that a
/// wrapper already included.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_never_says_zero() {
        assert_eq!(retry_after_values(Duration::ZERO), (1, 1));
        assert_eq!(retry_after_values(Duration::from_micros(1)), (1, 1));
        assert_eq!(retry_after_values(Duration::from_millis(1000)), (1, 1000));
        assert_eq!(retry_after_values(Duration::from_millis(1001)), (2, 1001));
        assert_eq!(retry_after_values(Duration::from_secs(60)), (60, 60000));
    }

    #[test]
    fn overloaded_is_a_429_with_retry_advice() {
        let err: BoxError =
            Overloaded::new(Reason::QueueTimeout, Duration::from_millis(1500)).into();
        let resp = rescue(&*err);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["retry-after-ms"], "1500");
    }

    #[test]
    fn causes_are_found_through_wrappers() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err: BoxError = UpstreamUnavailable::new(inner).into();
        let d = describe(&*err);
        assert_eq!(d.status, StatusCode::BAD_GATEWAY);
        assert_eq!(d.code, "upstream_unavailable");
        assert!(chain(&*err).contains("refused"));
    }

    #[tokio::test]
    async fn an_upstream_failure_tells_the_client_what_happened_not_where() {
        use http_body_util::BodyExt;
        let inner = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "tcp connect to 10.1.2.3:8000: connection refused",
        );
        for err in [
            UpstreamUnavailable::new(inner),
            UpstreamUnavailable::malformed("invalid HTTP status-code parsed"),
        ] {
            let may_retry = err.may_retry();
            let err: BoxError = err.into();
            let resp = rescue(&*err);
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("upstream_unavailable"), "{body}");
            assert!(
                !body.contains("10.1.2.3") && !body.contains("status-code"),
                "{body}"
            );
            let said = if may_retry {
                "could not be reached"
            } else {
                "not valid HTTP"
            };
            assert!(body.contains(said), "{body}");
        }
    }

    #[test]
    fn unknown_errors_are_internal() {
        let err: BoxError = "something odd".into();
        assert_eq!(describe(&*err).status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
