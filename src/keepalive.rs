//! Between layers 1 and 2 (inside the edge, outside telemetry), and only
//! with `queue_keepalive` set: a queued stream's connection kept busy while
//! it waits its turn.
//!
//! A client that streams and asks for it (`x-anteroom-queue-keepalive: 1`)
//! and whose request has waited `queue_keepalive` in the queue gets its
//! answer's head then, a 200 `text/event-stream`, and an SSE comment line
//! (`: …`) at once and every `queue_keepalive` after, until its stream's
//! first byte. A proxy or client with an idle timeout (nginx's 60 s
//! `proxy_read_timeout`, a cloud load balancer's idle timeout) then does not
//! cut a request that is only waiting; SSE parsers, the OpenAI SDKs among
//! them, skip comment lines. A request that starts before its first comment
//! is due is answered exactly as without the header.
//!
//! Once the head is sent its status is spent: what would have been an
//! error answer (a 429 `queue_timeout` or `deadline_exceeded`, the
//! upstream's own refusal) reaches the client as one SSE error event, the
//! OpenAI-shaped `{"error":{…}}` the SDKs raise as an `APIError`, with the
//! status as `status` and the advice a `retry-after-ms` header would have
//! carried as `retry_after_ms`.
//!
//! It sits outside telemetry, so the record is of the answer underneath:
//! its status, first byte and first token are the request's own, never a
//! comment's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::error::BadRequest;
use crate::types::RequestId;
use crate::BoxError;

/// The header a streaming client asks for keep-alive comments with.
pub const HEADER: HeaderName = HeaderName::from_static("x-anteroom-queue-keepalive");

/// The most of an error answer read to make its event of (an
/// OpenAI-shaped error is a few hundred bytes; the rest is dropped).
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// What a request's [`HEADER`] asks for: absent, `0`, `false` or `off` is
/// no; `1`, `true` or `on` is yes; anything else is a 400.
pub(crate) fn asked(headers: &HeaderMap) -> Result<bool, BadRequest> {
    let Some(value) = headers.get(&HEADER) else {
        return Ok(false);
    };
    let v = value.as_bytes().trim_ascii();
    let is = |word: &str| v.eq_ignore_ascii_case(word.as_bytes());
    if is("1") || is("true") || is("on") {
        Ok(true)
    } else if is("0") || is("false") || is("off") {
        Ok(false)
    } else {
        Err(BadRequest::new(
            "invalid_keepalive",
            format!("the {HEADER} header must be 1, true or on (or 0, false, off)"),
        ))
    }
}

/// Whether a request that asked for keep-alive comments waits in the
/// queue now: set by admission, read by [`KeepAlive`]. In the request's
/// extensions, only when it asked.
#[derive(Clone, Debug, Default)]
pub struct Queued(Arc<AtomicBool>);

impl Queued {
    /// It waits in the queue (`true`) or has a slot (`false`).
    pub fn set(&self, queued: bool) {
        self.0.store(queued, Ordering::Release);
    }

    /// Whether it waits in the queue.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Builds [`KeepAlive`] services.
#[derive(Clone, Debug)]
pub struct KeepAliveLayer {
    every: Duration,
    answered: Option<prometheus::IntCounter>,
}

impl KeepAliveLayer {
    /// A comment every `every` (at least a millisecond).
    pub fn new(every: Duration) -> Self {
        Self {
            every: every.max(Duration::from_millis(1)),
            answered: None,
        }
    }

    /// Count the streams answered early in `answered`.
    pub fn counting(mut self, answered: prometheus::IntCounter) -> Self {
        self.answered = Some(answered);
        self
    }
}

impl<S> Layer<S> for KeepAliveLayer {
    type Service = KeepAlive<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeepAlive {
            inner,
            every: self.every,
            answered: self.answered.clone(),
        }
    }
}

/// Keep-alive comments for queued streams: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct KeepAlive<S> {
    inner: S,
    every: Duration,
    answered: Option<prometheus::IntCounter>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for KeepAlive<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<KeptBody<S::Future, ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        // A malformed header is classify's 400, where it is recorded.
        if !matches!(asked(req.headers()), Ok(true)) {
            return ResponseFuture::plain(self.inner.call(req));
        }
        let queued = Queued::default();
        req.extensions_mut().insert(queued.clone());
        let id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
        ResponseFuture {
            state: Answer::Watched {
                watch: Some(Watch {
                    fut: Box::pin(self.inner.call(req)),
                    queued,
                    every: self.every,
                    tick: None,
                    since: None,
                    id,
                    answered: self.answered.clone(),
                }),
            },
        }
    }
}

/// A request that asked for comments, until its answer or its first.
struct Watch<F> {
    fut: Pin<Box<F>>,
    queued: Queued,
    every: Duration,
    tick: Option<Pin<Box<Sleep>>>,
    /// When it was first seen in the queue.
    since: Option<Instant>,
    id: Option<HeaderValue>,
    answered: Option<prometheus::IntCounter>,
}

pin_project! {
    /// Response future of [`KeepAlive`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: Answer<F>,
    }
}

pin_project! {
    #[project = AnswerProj]
    enum Answer<F> {
        // Did not ask: the answer as it comes.
        Plain {
            #[pin]
            fut: F,
        },
        // Asked: answered early if it waits long enough in the queue.
        Watched {
            watch: Option<Watch<F>>,
        },
    }
}

impl<F> ResponseFuture<F> {
    fn plain(fut: F) -> Self {
        Self {
            state: Answer::Plain { fut },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<KeptBody<F, B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let watch = match self.project().state.project() {
            AnswerProj::Plain { fut } => {
                let resp = ready!(fut.poll(cx)).map_err(Into::into)?;
                return Poll::Ready(Ok(resp.map(KeptBody::plain)));
            }
            AnswerProj::Watched { watch } => watch,
        };
        let w = watch.as_mut().expect("polled after completion");
        if let Poll::Ready(result) = w.fut.as_mut().poll(cx) {
            *watch = None;
            let resp = result.map_err(Into::into)?;
            return Poll::Ready(Ok(resp.map(KeptBody::plain)));
        }
        // Admission marks it while it waits (and again if it is preempted);
        // waiting for an upstream that has it is no reason to answer early.
        if !w.queued.get() {
            w.tick = None;
            return Poll::Pending;
        }
        w.since.get_or_insert_with(Instant::now);
        let every = w.every;
        let tick = w
            .tick
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        ready!(tick.as_mut().poll(cx));
        let w = watch.take().expect("checked above");
        Poll::Ready(Ok(w.commit()))
    }
}

impl<F> Watch<F> {
    /// Answer now: a stream's head and, at once, a first comment.
    fn commit<B>(self) -> Response<KeptBody<F, B>> {
        if let Some(c) = &self.answered {
            c.inc();
        }
        let since = self.since.unwrap_or_else(Instant::now);
        let kept = Kept {
            stage: Stage::Answer(self.fut),
            tick: Box::pin(tokio::time::sleep(self.every)),
            every: self.every,
            since,
            queued: self.queued,
            due: true,
            id: self.id,
        };
        let mut resp = Response::new(KeptBody {
            state: Sent::Kept {
                kept: Box::new(kept),
            },
        });
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        h.insert(HEADER, HeaderValue::from_static("1"));
        resp
    }
}

pin_project! {
    /// Response body of [`KeepAlive`]: the answer's own, or comments and
    /// then the stream (or its error as an event).
    pub struct KeptBody<F, B> {
        #[pin]
        state: Sent<F, B>,
    }
}

pin_project! {
    #[project = SentProj]
    enum Sent<F, B> {
        // The answer's body as it is.
        Plain {
            #[pin]
            body: B,
        },
        // Answered early.
        Kept {
            kept: Box<Kept<F, B>>,
        },
    }
}

impl<F, B> KeptBody<F, B> {
    fn plain(body: B) -> Self {
        Self {
            state: Sent::Plain { body },
        }
    }
}

/// An answer sent early: what it waits for, and when its next comment is
/// due.
struct Kept<F, B> {
    stage: Stage<F, B>,
    tick: Pin<Box<Sleep>>,
    every: Duration,
    since: Instant,
    queued: Queued,
    /// A comment is due at once (the first).
    due: bool,
    id: Option<HeaderValue>,
}

enum Stage<F, B> {
    /// Waiting for the answer.
    Answer(Pin<Box<F>>),
    /// The answer is a 200: its body, with comments until its first piece.
    Stream {
        body: Pin<Box<B>>,
        started: bool,
    },
    /// The answer is an error: read into one error event.
    Failing {
        body: crate::Body,
        status: StatusCode,
        advice: Option<u64>,
        read: Vec<u8>,
    },
    Done,
}

impl<F, B> std::fmt::Debug for Kept<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match self.stage {
            Stage::Answer(_) => "answer",
            Stage::Stream { .. } => "stream",
            Stage::Failing { .. } => "failing",
            Stage::Done => "done",
        };
        f.debug_struct("Kept").field("stage", &stage).finish()
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B> std::fmt::Debug for KeptBody<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            Sent::Plain { .. } => f.write_str("KeptBody::Plain"),
            Sent::Kept { kept } => kept.fmt(f),
        }
    }
}

impl<F> std::fmt::Debug for Watch<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("queued", &self.queued.get())
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Kept<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match &mut self.stage {
                Stage::Answer(fut) => {
                    let failed = match fut.as_mut().poll(cx) {
                        Poll::Pending => return self.comment(cx),
                        Poll::Ready(Ok(resp)) if resp.status() == StatusCode::OK => {
                            self.stage = Stage::Stream {
                                body: Box::pin(resp.into_body()),
                                started: false,
                            };
                            continue;
                        }
                        Poll::Ready(Ok(resp)) => resp.map(|b| b.map_err(Into::into).boxed_unsync()),
                        Poll::Ready(Err(e)) => crate::edge::rescued(e.into(), self.id.as_ref())
                            .map(|b| b.map_err(|never| match never {}).boxed_unsync()),
                    };
                    self.stage = Stage::Failing {
                        status: failed.status(),
                        advice: advice_ms(failed.headers()),
                        body: failed.into_body(),
                        read: Vec::new(),
                    };
                }
                Stage::Stream { body, started } => {
                    return match body.as_mut().poll_frame(cx) {
                        Poll::Pending if !*started => self.comment(cx),
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(None) => {
                            self.stage = Stage::Done;
                            Poll::Ready(None)
                        }
                        Poll::Ready(Some(Ok(frame))) => {
                            // Comments only between whole events: none
                            // once the stream's own bytes flow.
                            if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                                *started = true;
                            }
                            Poll::Ready(Some(Ok(frame)))
                        }
                        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    };
                }
                Stage::Failing {
                    body,
                    status,
                    advice,
                    read,
                } => {
                    let ended = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                        Some(Ok(frame)) => {
                            if let Some(d) = frame.data_ref() {
                                let room = MAX_ERROR_BYTES.saturating_sub(read.len());
                                read.extend_from_slice(&d[..d.len().min(room)]);
                            }
                            false
                        }
                        // What was read is all there is.
                        Some(Err(_)) | None => true,
                    };
                    if ended {
                        let event = error_event(*status, *advice, read);
                        self.stage = Stage::Done;
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                }
                Stage::Done => return Poll::Ready(None),
            }
        }
    }

    /// The next comment, if one is due.
    fn comment(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.due && self.tick.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.due = false;
        let now = Instant::now();
        self.tick.as_mut().reset(now + self.every);
        let waited = now.saturating_duration_since(self.since).as_secs_f64();
        let line = if self.queued.get() {
            format!(": queued, waited {waited:.1} s\n\n")
        } else {
            format!(": started, waiting for the first token ({waited:.1} s since queued)\n\n")
        };
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
    }
}

impl<F, B, E> Body for KeptBody<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().state.project() {
            SentProj::Plain { body } => body.poll_frame(cx).map_err(Into::into),
            SentProj::Kept { kept } => kept.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Sent::Plain { body } => body.is_end_stream(),
            Sent::Kept { kept } => matches!(kept.stage, Stage::Done),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Sent::Plain { body } => body.size_hint(),
            Sent::Kept { .. } => SizeHint::default(),
        }
    }
}

/// The advice of an error answer's headers, in milliseconds.
fn advice_ms(headers: &HeaderMap) -> Option<u64> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    number("retry-after-ms").or_else(|| number("retry-after").map(|s| s.saturating_mul(1000)))
}

/// An error answer as the one SSE event a stream ends with: its own
/// OpenAI-shaped `error` object when it has one (llama-server's, vLLM's,
/// anteroom's), else one made of its status and words; with the status
/// and the advice added.
fn error_event(status: StatusCode, advice: Option<u64>, body: &[u8]) -> Bytes {
    use serde_json::{json, Map, Value};
    let own = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut o)) => match o.remove("error") {
            Some(Value::Object(e)) => Some(e),
            // Ollama's `{"error": "…"}`.
            Some(Value::String(message)) => {
                let mut e = Map::new();
                e.insert("message".into(), Value::String(message));
                Some(e)
            }
            _ => None,
        },
        _ => None,
    };
    let mut error = own.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
        let text = text.trim();
        let mut e = Map::new();
        let message = match text.is_empty() {
            true => format!("the upstream answered {status}"),
            false => format!("the upstream answered {status}: {text}"),
        };
        e.insert("message".into(), Value::String(message));
        e
    });
    let kind = match status.as_u16() {
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "upstream_error",
    };
    error.entry("type").or_insert_with(|| json!(kind));
    error.entry("param").or_insert(Value::Null);
    error
        .entry("code")
        .or_insert_with(|| json!(status.as_u16()));
    error.insert("status".into(), json!(status.as_u16()));
    if let Some(ms) = advice {
        error.insert("retry_after_ms".into(), json!(ms));
    }
    Bytes::from(format!("\n\ndata: {}\n\n", json!({ "error": error })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn the_header_says_yes_no_or_is_refused() {
        assert!(!asked(&HeaderMap::new()).unwrap());
        for yes in ["1", "true", "ON", " on "] {
            assert!(asked(&headers(yes)).unwrap(), "{yes}");
        }
        for no in ["0", "false", "Off"] {
            assert!(!asked(&headers(no)).unwrap(), "{no}");
        }
        for bad in ["", "yes please", "2", "-1"] {
            let e = asked(&headers(bad)).unwrap_err();
            assert_eq!(e.code(), "invalid_keepalive", "{bad}");
        }
    }

    fn event_json(event: &Bytes) -> serde_json::Value {
        let text = std::str::from_utf8(event).unwrap();
        let data = text.trim().strip_prefix("data: ").unwrap();
        assert!(text.ends_with("\n\n"), "{text:?}");
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn an_openai_shaped_error_keeps_its_object_and_gains_status_and_advice() {
        let body = br#"{"error":{"message":"waited too long","type":"rate_limit_error","param":null,"code":"queue_timeout"}}"#;
        let e = event_json(&error_event(
            StatusCode::TOO_MANY_REQUESTS,
            Some(1500),
            body,
        ));
        assert_eq!(e["error"]["code"], "queue_timeout");
        assert_eq!(e["error"]["message"], "waited too long");
        assert_eq!(e["error"]["type"], "rate_limit_error");
        assert_eq!(e["error"]["status"], 429);
        assert_eq!(e["error"]["retry_after_ms"], 1500);
    }

    #[test]
    fn other_errors_are_put_in_the_openai_shape() {
        let e = event_json(&error_event(
            StatusCode::BAD_GATEWAY,
            None,
            b"upstream exploded\n",
        ));
        assert_eq!(
            e["error"]["message"],
            "the upstream answered 502 Bad Gateway: upstream exploded"
        );
        assert_eq!(e["error"]["type"], "upstream_error");
        assert_eq!(e["error"]["code"], 502);
        assert!(e["error"].get("retry_after_ms").is_none());
        let ollama = event_json(&error_event(
            StatusCode::NOT_FOUND,
            None,
            br#"{"error":"model 'x' not found"}"#,
        ));
        assert_eq!(ollama["error"]["message"], "model 'x' not found");
        assert_eq!(ollama["error"]["type"], "invalid_request_error");
        let empty = event_json(&error_event(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(2000),
            b"",
        ));
        assert_eq!(
            empty["error"]["message"],
            "the upstream answered 503 Service Unavailable"
        );
        assert_eq!(empty["error"]["retry_after_ms"], 2000);
    }

    #[test]
    fn advice_is_read_in_milliseconds_or_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(advice_ms(&h), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(advice_ms(&h), Some(3000));
        h.insert("retry-after-ms", HeaderValue::from_static("2500"));
        assert_eq!(advice_ms(&h), Some(2500));
    }
}
