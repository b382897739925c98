//! A streamed answer that stops without ending: the upstream resets the
//! connection mid-stream, never sends a first token, or goes quiet.
//!
//! Cutting the client's connection would leave an SDK with a half-read
//! stream and a transport error. For an SSE response the [`StreamGuard`]
//! instead ends the stream with one last event in the OpenAI error shape,
//!
//! ```text
//! data: {"error":{"message":"…","type":"upstream_error","param":null,"code":"upstream_stream_error"}}
//! ```
//!
//! which the OpenAI SDKs raise as an `APIError`, and then ends the body
//! cleanly; the upstream connection is dropped, which tells the upstream to
//! stop. The request's [`Tap`] notes the failure, so its record says
//! `truncated` with the code. Codes: `upstream_stream_error` (the upstream's
//! body failed), `first_token_timeout` (no data within
//! `first_token_timeout` of the headers), `stream_idle_timeout` (no data
//! for `stream_idle_timeout`).
//!
//! While the server drains (see [`drain`](crate::drain)) the timer is also
//! pulled in to the drain deadline, and a stream still running then ends
//! the same way with `shutting_down`. A stream whose backend is silent
//! (a long prompt before the first token, say) is not polled when the drain
//! begins, so a guarded stream's timer never sleeps longer than
//! [`DRAIN_CHECK`]: it wakes, sees the drain and moves in to its deadline.
//!
//! The idle timer is not reset per event: each frame stamps the time, and
//! when the timer fires it is re-armed from the last stamp if the stream
//! has moved since.
//!
//! A refusal dressed as a stream: vLLM answers some streamed requests it
//! has no room for with `200 OK` and a single event, `data: {"error": {…,
//! "code": 503}}`, then `[DONE]`. Passed on, the client would get a 200 that
//! carries only an error, recorded as `ok` with no tokens. So the upstream
//! client reads the first event of a stream the request asked for
//! ([`StreamGuard::poll_first_event`], under the same timeouts) before the
//! answer goes on; an error with code 429 or 503 ([`refusal`]) turns the
//! answer into what it is, a response of that status with the error as its
//! JSON body, which back-off retries like any other. Anything else goes on
//! unchanged, what was read handed on first.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::config::StreamTimeouts;
use crate::drain::Drain;
use crate::telemetry::Tap;
use crate::BoxError;

/// Longest a guarded stream's timer sleeps before it looks whether the
/// server has begun to drain: a wake-up a second per quiet stream, far below
/// any drain timeout.
pub const DRAIN_CHECK: Duration = Duration::from_secs(1);

const DRAINED: &str =
    "anteroom is shutting down and this stream ran past the drain deadline; retry the request";

/// See the [module docs](self).
pub struct StreamGuard<B> {
    /// Read ahead (a stream's first event), handed on first; or the whole
    /// body of a refusal.
    ahead: Option<Bytes>,
    inner: Option<B>,
    /// `None`: not a stream; errors pass on as errors.
    timer: Option<Pin<Box<Sleep>>>,
    timeouts: StreamTimeouts,
    /// When the headers came: the first-token timeout runs from here.
    since: Instant,
    last_data: Option<Instant>,
    tap: Option<Tap>,
    drain: Option<Drain>,
    /// Not a stream: the same timeouts end it, with an error (there is no
    /// event to put in a JSON body); timed only while the upstream makes
    /// it wait, so an answer that is all there costs no timer.
    plain: bool,
    /// A plain body's timer (in `timer`, made at its first wait) is
    /// running: the upstream keeps it waiting.
    armed: bool,
    /// A plain body has given a piece (the idle timeout applies).
    seen_data: bool,
    /// A plain body's first frame, read ahead, when it was its trailers
    /// (boxed: they almost never are).
    trailers_ahead: Option<Box<http::HeaderMap>>,
    /// The usage event anteroom asked for, to be taken out (boxed: only
    /// such streams carry it).
    strip: Option<Box<super::usage::Strip>>,
    /// The answer's `model` renamed back to the client's name (boxed: only
    /// such answers carry it).
    rename: Option<Box<super::rename::Rename>>,
}

impl<B> std::fmt::Debug for StreamGuard<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGuard").finish_non_exhaustive()
    }
}

impl<B> StreamGuard<B> {
    /// Guard `inner`, an SSE body whose headers just arrived; end it at
    /// `drain`'s deadline if the server drains.
    pub fn new(inner: B, timeouts: StreamTimeouts, tap: Option<Tap>, drain: Option<Drain>) -> Self {
        let since = Instant::now();
        let wake = wake_at(since + timeouts.first_token, drain.as_ref(), since);
        Self {
            ahead: None,
            inner: Some(inner),
            timer: Some(Box::pin(tokio::time::sleep_until(wake))),
            timeouts,
            since,
            last_data: None,
            tap,
            drain,
            plain: false,
            armed: false,
            seen_data: false,
            trailers_ahead: None,
            strip: None,
            rename: None,
        }
    }

    /// Take the usage event anteroom asked for out of this stream, noting
    /// its usage in the request's tap (see [`usage`](super::usage)).
    pub(crate) fn stripping_usage(mut self) -> Self {
        self.strip = Some(Box::default());
        self
    }

    /// Rename the answer's `model` back to the client's name from here on.
    pub(crate) fn renaming(&mut self, rename: Box<super::rename::Rename>) {
        self.rename = Some(rename);
    }

    /// What of `data` the client gets: all of it, unless usage is taken
    /// out (`None`: nothing of it yet).
    fn pass(&mut self, data: Bytes) -> Option<Bytes> {
        let Some(strip) = self.strip.as_mut() else {
            return Some(data);
        };
        let out = strip.pass(data);
        if let (Some(usage), Some(tap)) = (strip.take_usage(), &self.tap) {
            tap.stream_usage(usage);
        }
        (!out.is_empty()).then_some(out)
    }

    /// A body that is not an SSE stream (JSON, Ollama's NDJSON, anything):
    /// passed on as it is, an error staying an error (it cannot be put
    /// into a JSON body). Under the same timeouts as a stream: nothing for
    /// `first_token` after the headers, or for `idle` between pieces, ends
    /// it with an error and drops the upstream connection, so a backend
    /// that stalls mid-answer holds its slot only that long.
    pub fn passthrough(inner: B, timeouts: StreamTimeouts, tap: Option<Tap>) -> Self {
        let mut guard = Self::passthrough_none();
        guard.inner = Some(inner);
        guard.timeouts = timeouts;
        guard.tap = tap;
        guard.plain = true;
        guard
    }

    /// A body of `json` alone: a refusal's, in place of the stream that
    /// carried it (dropped: its connection is not reused).
    pub fn refused(json: Bytes) -> Self {
        let mut guard = Self::passthrough_none();
        guard.ahead = Some(json);
        guard
    }

    fn passthrough_none() -> Self {
        Self {
            ahead: None,
            inner: None,
            timer: None,
            timeouts: StreamTimeouts {
                first_token: Duration::ZERO,
                idle: Duration::ZERO,
            },
            since: Instant::now(),
            last_data: None,
            tap: None,
            drain: None,
            plain: false,
            armed: false,
            seen_data: false,
            trailers_ahead: None,
            strip: None,
            rename: None,
        }
    }

    /// Hand `bytes` on before anything else of the body.
    pub fn read_ahead(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.ahead = Some(bytes);
        }
    }

    /// End the stream with an error event instead of `inner`.
    fn fail(&mut self, code: &'static str, message: &str) -> Frame<Bytes> {
        self.inner = None;
        if let Some(tap) = &self.tap {
            tap.stream_failed(code);
        }
        let kind = if code == "shutting_down" {
            tracing::info!(code, message, "stream cut at the drain deadline");
            "server_error"
        } else {
            tracing::warn!(code, message, "upstream stream ended early");
            "upstream_error"
        };
        let event = crate::error::error_event(kind, code, message);
        // What came of an event the usage strip held goes first, as it
        // would have without it.
        match self.strip.as_mut().and_then(|s| s.flush()) {
            Some(held) => Frame::data([held, event].concat().into()),
            None => Frame::data(event),
        }
    }
}

/// When a guarded stream's timer should next fire for a timeout `due`: no
/// later than the drain deadline once there is one, and before that no
/// later than a [`DRAIN_CHECK`] from `now`.
pub(crate) fn wake_at(due: Instant, drain: Option<&Drain>, now: Instant) -> Instant {
    match drain {
        None => due,
        Some(d) => due.min(d.deadline().unwrap_or(now + DRAIN_CHECK)),
    }
}

impl<B> Body for StreamGuard<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.rename.is_none() {
            return this.poll_guarded(cx);
        }
        loop {
            let polled = this.poll_guarded(cx);
            let Some(rename) = this.rename.as_mut() else {
                return polled;
            };
            return match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = rename.feed(data);
                        if out.is_empty() {
                            // All of it held: the next piece completes it.
                            continue;
                        }
                        Poll::Ready(Some(Ok(Frame::data(out))))
                    }
                    Err(trailers) => {
                        // What was held goes before the trailers.
                        if let Some(held) = rename.finish() {
                            this.trailers_ahead = trailers.into_trailers().ok().map(Box::new);
                            return Poll::Ready(Some(Ok(Frame::data(held))));
                        }
                        Poll::Ready(Some(Ok(trailers)))
                    }
                },
                Poll::Ready(None) => match rename.finish() {
                    Some(held) => Poll::Ready(Some(Ok(Frame::data(held)))),
                    None => Poll::Ready(None),
                },
                other => other,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none()
            && self.trailers_ahead.is_none()
            && self.rename.as_ref().is_none_or(|r| !r.holds())
            && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.rename.is_some() {
            // Renamed: any length.
            return SizeHint::new();
        }
        let ahead = self.ahead.as_ref().map_or(0, |a| a.len() as u64);
        match &self.inner {
            // A refusal's body: exactly what was put ahead.
            None => SizeHint::with_exact(ahead),
            // An error event may be added: never an exact length.
            Some(b) => {
                let mut h = SizeHint::new();
                h.set_lower(b.size_hint().lower() + ahead);
                h
            }
        }
    }
}

impl<B> StreamGuard<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The next frame, guarded, before any rename.
    fn poll_guarded(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        if let Some(ahead) = this.ahead.take() {
            if let Some(ahead) = this.pass(ahead) {
                return Poll::Ready(Some(Ok(Frame::data(ahead))));
            }
        }
        if let Some(trailers) = this.trailers_ahead.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if this.plain {
            let polled = Pin::new(inner).poll_frame(cx);
            let Poll::Pending = polled else {
                this.armed = false;
                this.seen_data = true;
                return polled.map_err(Into::into);
            };
            let (after, code) = if this.seen_data {
                (this.timeouts.idle, "stream_idle_timeout")
            } else {
                (this.timeouts.first_token, "first_token_timeout")
            };
            if !crate::deadline::waited(&mut this.timer, &mut this.armed, after, cx) {
                return Poll::Pending;
            }
            this.inner = None;
            if !this.seen_data {
                // Read ahead, before the answer goes on: a 504 in its place.
                return Poll::Ready(Some(Err(
                    crate::error::UpstreamTimeout::first_byte(after).into()
                )));
            }
            if let Some(tap) = &this.tap {
                tap.stream_failed(code);
            }
            tracing::warn!(code, ?after, "upstream answer stalled; cut");
            return Poll::Ready(Some(Err(format!(
                "the upstream sent nothing of its answer for {after:?} ({code})"
            )
            .into())));
        }
        let Some(timer) = this.timer.as_mut() else {
            // A refusal's body.
            return Pin::new(inner).poll_frame(cx).map_err(Into::into);
        };
        let drain_at = this.drain.as_ref().and_then(Drain::deadline);
        if let Some(at) = drain_at {
            if Instant::now() >= at {
                return Poll::Ready(Some(Ok(this.fail("shutting_down", DRAINED))));
            }
            if timer.deadline() > at {
                timer.as_mut().reset(at);
            }
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data() {
                    let now = Instant::now();
                    if this.last_data.is_none() {
                        // From now on the idle timeout applies.
                        let due = now + this.timeouts.idle;
                        timer.as_mut().reset(wake_at(due, this.drain.as_ref(), now));
                    }
                    this.last_data = Some(now);
                    if this.strip.is_some() {
                        let data = frame.into_data().unwrap_or_default();
                        return match this.pass(data) {
                            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                            None => {
                                // All of it held or taken out: poll again.
                                cx.waker().wake_by_ref();
                                Poll::Pending
                            }
                        };
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                let message = format!("the upstream's stream failed: {}", crate::error::chain(&*e));
                return Poll::Ready(Some(Ok(this.fail("upstream_stream_error", &message))));
            }
            Poll::Ready(None) => {
                this.inner = None;
                // An event held to its end, that never ended: as it came.
                if let Some(held) = this.strip.as_mut().and_then(|s| s.flush()) {
                    return Poll::Ready(Some(Ok(Frame::data(held))));
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The timer fired: a timeout, the drain deadline, a drain check,
            // or a stream that has moved since the timer was armed.
            let now = Instant::now();
            if this
                .drain
                .as_ref()
                .and_then(Drain::deadline)
                .is_some_and(|at| now >= at)
            {
                return Poll::Ready(Some(Ok(this.fail("shutting_down", DRAINED))));
            }
            let (due, code, after) = match this.last_data {
                None => (
                    this.since + this.timeouts.first_token,
                    "first_token_timeout",
                    this.timeouts.first_token,
                ),
                Some(t) => (
                    t + this.timeouts.idle,
                    "stream_idle_timeout",
                    this.timeouts.idle,
                ),
            };
            if due <= now {
                let message = format!("the upstream sent nothing for {after:?}");
                return Poll::Ready(Some(Ok(this.fail(code, &message))));
            }
            timer.as_mut().reset(wake_at(due, this.drain.as_ref(), now));
        }
    }
}

impl<B> StreamGuard<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Read a plain body's first piece, to hand on first: an answer whose
    /// body breaks (or stalls) before its first byte can then still become
    /// an error response with a status line, where hyper, with the headers
    /// handed to it, could only close the connection on a client that has
    /// nothing. Ready with the failure, if it failed.
    pub(crate) fn poll_first_piece(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match Pin::new(&mut *self).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Ok(())),
            Poll::Ready(Some(Ok(frame))) => {
                match frame.into_data() {
                    Ok(data) => self.read_ahead(data),
                    Err(frame) => self.trailers_ahead = frame.into_trailers().ok().map(Box::new),
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Some(Err(e))) => {
                self.inner = None;
                Poll::Ready(Err(e))
            }
        }
    }
}

/// The most read while looking for the end of a stream's first event: a
/// first event longer than this is not an error event.
const MAX_FIRST_EVENT: usize = 64 * 1024;

impl<B> StreamGuard<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Read the stream's first event into `read` (up to its blank line,
    /// `MAX_FIRST_EVENT` or the end), under the stream's timeouts (a
    /// first token that never comes ends in the usual error event, read
    /// like any other). Ready when it has; then hand `read` back with
    /// [`read_ahead`](Self::read_ahead) unless it was a [`refusal`].
    pub fn poll_first_event(&mut self, read: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match Pin::new(&mut *self).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        read.extend_from_slice(&data);
                        let ended = memchr::memmem::find(read, b"\n\n").is_some()
                            || memchr::memmem::find(read, b"\r\n\r\n").is_some();
                        if ended || read.len() > MAX_FIRST_EVENT {
                            return Poll::Ready(());
                        }
                    } else {
                        // Trailers: no more of the first event will come.
                        return Poll::Ready(());
                    }
                }
                // The guard turns failures into events; an end is an end.
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
            }
        }
    }
}

/// The status a stream's first event refuses with: an `{"error": …}`
/// object whose `code` is 429 or 503 (a number, or a string of one), and
/// that object as a JSON body.
pub fn refusal(event: &[u8]) -> Option<(StatusCode, Bytes)> {
    // The first `data:` line only, and only one that opens with the error
    // object (`{"error"`, the OpenAI error shape): a stream's ordinary
    // first frame is turned down with a few byte compares, whatever follows.
    let mut rest = event;
    let line = loop {
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
        if let Some(data) = line.strip_prefix(b"data:") {
            break data.trim_ascii();
        }
        if end == rest.len() {
            return None;
        }
        rest = &rest[end + 1..];
    };
    let opens = line
        .strip_prefix(b"{")
        .is_some_and(|l| l.trim_ascii_start().starts_with(b"\"error\""));
    if !opens {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let data = line;
    let code = v.get("error")?.get("code")?;
    let code = code
        .as_u64()
        .or_else(|| code.as_str().and_then(|s| s.parse().ok()))?;
    let status = match code {
        429 => StatusCode::TOO_MANY_REQUESTS,
        503 => StatusCode::SERVICE_UNAVAILABLE,
        _ => return None,
    };
    Some((status, Bytes::copy_from_slice(data)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A backend body that sends `first` (if any) and then nothing, ever.
    struct Quiet(Option<&'static str>);

    impl Body for Quiet {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(data) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
                }
                None => Poll::Pending,
            }
        }
    }

    const TIMEOUTS: StreamTimeouts = StreamTimeouts {
        first_token: Duration::from_secs(600),
        idle: Duration::from_secs(120),
    };

    /// The text of the next frame and when it came, from `t0`.
    async fn next(guard: &mut StreamGuard<Quiet>, t0: Instant) -> (String, Duration) {
        let frame = guard.frame().await.expect("a frame").expect("no error");
        let data = frame.into_data().expect("data");
        (String::from_utf8_lossy(&data).into_owned(), t0.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_ends_at_the_drain_deadline_not_at_its_timeout() {
        let drain = Drain::new();
        let t0 = Instant::now();
        let mut guard = StreamGuard::new(Quiet(None), TIMEOUTS, None, Some(drain.clone()));
        // Nobody polls the stream when the drain begins, 5.5 s in.
        let begin = drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5_500)).await;
            begin.begin(Instant::now() + Duration::from_secs(3));
        });
        let (text, at) = next(&mut guard, t0).await;
        assert!(text.contains("\"code\":\"shutting_down\""), "{text}");
        assert_eq!(at, Duration::from_millis(8_500));
        assert!(guard.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_checks_do_not_cut_a_quiet_stream_early() {
        let t0 = Instant::now();
        let timeouts = StreamTimeouts {
            first_token: Duration::from_millis(10_300),
            idle: Duration::from_millis(4_700),
        };
        let mut guard = StreamGuard::new(Quiet(None), timeouts, None, Some(Drain::new()));
        let (text, at) = next(&mut guard, t0).await;
        assert!(text.contains("\"code\":\"first_token_timeout\""), "{text}");
        assert_eq!(at, Duration::from_millis(10_300));

        let t0 = Instant::now();
        let mut guard = StreamGuard::new(
            Quiet(Some("data: {}\n\n")),
            timeouts,
            None,
            Some(Drain::new()),
        );
        assert_eq!(
            next(&mut guard, t0).await,
            ("data: {}\n\n".to_string(), Duration::ZERO)
        );
        let (text, at) = next(&mut guard, t0).await;
        assert!(text.contains("\"code\":\"stream_idle_timeout\""), "{text}");
        assert_eq!(at, Duration::from_millis(4_700));
    }

    const VLLM_REFUSAL: &str = "data: {\"error\": {\"object\": \"error\", \"message\": \"busy\", \"type\": \"ServiceUnavailableError\", \"param\": null, \"code\": 503}}\n\ndata: [DONE]\n\n";

    #[test]
    fn refusals_are_told_by_their_code() {
        let (status, json) = refusal(VLLM_REFUSAL.as_bytes()).unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(json.starts_with(b"{\"error\""));
        assert_eq!(
            refusal(b"data: {\"error\":{\"code\":\"429\",\"message\":\"slow down\"}}\n\n")
                .map(|r| r.0),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        for other in [
            // A real first chunk.
            &b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"[..],
            // An error that is not about capacity.
            b"data: {\"error\":{\"code\":400,\"message\":\"bad\"}}\n\n",
            // anteroom's own timeout event.
            b"\n\ndata: {\"error\":{\"code\":\"first_token_timeout\"}}\n\n",
            // Content that talks about errors.
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"error\\\" 503\"}}]}\n\n",
            b"data: [DONE]\n\n",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(refusal(other), None, "{:?}", String::from_utf8_lossy(other));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_event_is_read_ahead_and_handed_on_first() {
        // Two events in one frame, then more: the first frame is read, and
        // comes out first, unchanged, followed by the rest.
        let frames = Frames(["data: {\"a\":1}\n\ndata: {\"b\":2}\n\n", "data: [DONE]\n\n"].into());
        let mut guard = StreamGuard::new(frames, TIMEOUTS, None, None);
        let mut read = BytesMut::new();
        std::future::poll_fn(|cx| guard.poll_first_event(&mut read, cx)).await;
        assert_eq!(&read[..], b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n");
        assert!(refusal(&read).is_none());
        guard.read_ahead(read.freeze());
        let all = guard.collect().await.unwrap().to_bytes();
        assert_eq!(
            &all[..],
            b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n"
        );
        // A silent backend: the read ends with the first-token timeout's
        // own event, which is no refusal.
        let mut guard = StreamGuard::new(Quiet(None), TIMEOUTS, None, None);
        let mut read = BytesMut::new();
        std::future::poll_fn(|cx| guard.poll_first_event(&mut read, cx)).await;
        assert!(String::from_utf8_lossy(&read).contains("first_token_timeout"));
        assert!(refusal(&read).is_none());
        // A refusal's replacement body is exactly its JSON.
        let refused = StreamGuard::<Quiet>::refused(Bytes::from_static(b"{}"));
        assert_eq!(refused.size_hint().exact(), Some(2));
        assert_eq!(&refused.collect().await.unwrap().to_bytes()[..], b"{}");
    }

    /// A body of these frames, then its end.
    struct Frames(std::collections::VecDeque<&'static str>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|f| Ok(Frame::data(Bytes::from_static(f.as_bytes())))),
            )
        }
    }
}
