//! The timed response body: watches the bytes go out.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::capture::Capture;
use super::{Framing, Outcome};
use crate::error;
use crate::BoxError;

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

impl<B: Body> TimedBody<B> {
    /// Time `inner`, finishing `capture` when it ends.
    pub(super) fn new(inner: B, capture: Capture) -> Self {
        Self {
            inner,
            capture,
            panicked: false,
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
