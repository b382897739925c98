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
//! the same way with `shutting_down`.
//!
//! The idle timer is not reset per event: each frame stamps the time, and
//! when the timer fires it is re-armed from the last stamp if the stream
//! has moved since.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::drain::Drain;
use crate::telemetry::Tap;
use crate::BoxError;

const DRAINED: &str =
    "anteroom is shutting down and this stream ran past the drain deadline; retry the request";

/// The stream timeouts.
#[derive(Clone, Copy, Debug)]
pub struct StreamTimeouts {
    /// Most time from the response headers to the first data.
    pub first_token: Duration,
    /// Most time between two pieces of data.
    pub idle: Duration,
}

/// See the [module docs](self).
pub struct StreamGuard<B> {
    inner: Option<B>,
    /// `None`: not a stream; errors pass on as errors.
    timer: Option<Pin<Box<Sleep>>>,
    timeouts: StreamTimeouts,
    last_data: Option<Instant>,
    tap: Option<Tap>,
    drain: Option<Drain>,
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
        Self {
            inner: Some(inner),
            timer: Some(Box::pin(tokio::time::sleep(timeouts.first_token))),
            timeouts,
            last_data: None,
            tap,
            drain,
        }
    }

    /// A body that is not an SSE stream: passed on as it is (an error
    /// cannot be put into a JSON body; it stays an error).
    pub fn passthrough(inner: B) -> Self {
        Self {
            inner: Some(inner),
            timer: None,
            timeouts: StreamTimeouts {
                first_token: Duration::ZERO,
                idle: Duration::ZERO,
            },
            last_data: None,
            tap: None,
            drain: None,
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
        let event = serde_json::json!({
            "error": {
                "message": message,
                "type": kind,
                "param": null,
                "code": code,
            }
        });
        // A leading blank line ends any event the upstream left half-written.
        Frame::data(Bytes::from(format!("\n\ndata: {event}\n\n")))
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let Some(timer) = this.timer.as_mut() else {
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
                        timer.as_mut().reset(now + this.timeouts.idle);
                    }
                    this.last_data = Some(now);
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
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if drain_at.is_some_and(|at| Instant::now() >= at) {
                return Poll::Ready(Some(Ok(this.fail("shutting_down", DRAINED))));
            }
            // The timer fired; has the stream moved since it was armed?
            let (due, code, after) = match this.last_data {
                None => (None, "first_token_timeout", this.timeouts.first_token),
                Some(t) => (
                    Some(t + this.timeouts.idle),
                    "stream_idle_timeout",
                    this.timeouts.idle,
                ),
            };
            match due {
                Some(due) if due > Instant::now() => timer.as_mut().reset(due),
                _ => {
                    let message = format!("the upstream sent nothing for {after:?}");
                    return Poll::Ready(Some(Ok(this.fail(code, &message))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // An error event may be added: never an exact length.
        let mut h = SizeHint::new();
        if let Some(b) = &self.inner {
            h.set_lower(b.size_hint().lower());
        }
        h
    }
}
