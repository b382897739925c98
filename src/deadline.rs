//! Time limits on a peer that stops: a client that stops reading its
//! response ([`WriteDeadline`]) or stops sending its request body
//! ([`ReadTimeout`]).
//!
//! Both arm a timer only once the peer has made them wait, so a peer that
//! keeps up costs a branch per read or write and no timer at all. That is
//! why these are ours and not tower-http's `RequestBodyTimeout`, which
//! creates and polls a fresh timer on every poll of the body (an
//! `Instant::now()` and a timer-wheel registration per request, though
//! almost every admitted body is already there when it is first polled).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::BoxError;

/// A wait on a peer: armed when the peer makes us wait, disarmed when it
/// moves; its timer is allocated at the first wait and reset after.
#[derive(Debug, Default)]
struct Stall {
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Stall {
    /// The peer moved.
    fn moved(&mut self) {
        self.armed = false;
    }

    /// The peer made us wait: whether it has for `timeout` now (else the
    /// task is woken when it will have).
    fn expired(&mut self, timeout: Duration, cx: &mut Context<'_>) -> bool {
        waited(&mut self.timer, &mut self.armed, timeout, cx)
    }
}

/// A [`Stall`] in parts, for a type that keeps its timer for other uses too
/// (the stream guard): the peer made us wait; arm `timer` from now unless
/// `armed` (making it at the first wait), and say whether the wait has
/// lasted `timeout` (else the task is woken when it will have).
pub(crate) fn waited(
    timer: &mut Option<Pin<Box<Sleep>>>,
    armed: &mut bool,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> bool {
    let timer = match timer {
        Some(t) => {
            if !*armed {
                t.as_mut().reset(Instant::now() + timeout);
            }
            t
        }
        None => timer.insert(Box::pin(tokio::time::sleep(timeout))),
    };
    *armed = true;
    timer.as_mut().poll(cx).is_ready()
}

pin_project! {
    /// A client connection whose writes may not stay blocked longer than a
    /// timeout: a client that stops reading (its receive window full, the
    /// socket's send buffer full behind it) gets a write error, so hyper
    /// closes the connection and drops what its responses held (their
    /// slots, their upstream connections, which tells the backends to
    /// stop). Without it hyper waits forever, and a response body, no
    /// longer polled, never sees its own timeouts. A slow reader that makes
    /// progress is never cut.
    pub struct WriteDeadline<T> {
        #[pin]
        io: T,
        timeout: Duration,
        stall: Stall,
    }
}

impl<T> WriteDeadline<T> {
    /// `io`, whose writes may block for at most `timeout`.
    pub fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            stall: Stall::default(),
        }
    }
}

/// After a write that returned `polled`: on progress the wait is over; a
/// blocked write fails once it has been blocked for `timeout`.
fn write_polled<R>(
    polled: Poll<std::io::Result<R>>,
    stall: &mut Stall,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<R>> {
    if polled.is_ready() {
        stall.moved();
        return polled;
    }
    if !stall.expired(timeout, cx) {
        return Poll::Pending;
    }
    Poll::Ready(Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the client read nothing for {timeout:?} (client_write_timeout)"),
    )))
}

impl<T: tokio::io::AsyncRead> tokio::io::AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite> tokio::io::AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        write_polled(polled, this.stall, *this.timeout, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        write_polled(polled, this.stall, *this.timeout, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        write_polled(polled, this.stall, *this.timeout, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

pin_project! {
    /// A request body that fails with [`BodyTimeout`] when no piece of it
    /// comes for a timeout: a client that trickles its body, or stops
    /// sending it, holds its place and any upstream connection only that
    /// long.
    pub struct ReadTimeout<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        stall: Stall,
    }
}

impl<B> ReadTimeout<B> {
    /// `inner`, whose pieces may be at most `timeout` apart.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stall: Stall::default(),
        }
    }
}

impl<B> std::fmt::Debug for ReadTimeout<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadTimeout")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ReadTimeout<B>
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
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.stall.moved();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.stall.expired(*this.timeout, cx) => {
                Poll::Ready(Some(Err(BodyTimeout(*this.timeout).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// No piece of a request body came for this long (408).
#[derive(Debug)]
pub struct BodyTimeout(pub Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no part of the request body came for {:?} (body_read_timeout)",
            self.0
        )
    }
}

impl std::error::Error for BodyTimeout {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that gives one piece, then waits forever.
    struct Trickle(bool);

    impl Body for Trickle {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{")))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_fails_after_the_timeout_from_its_last_piece() {
        let mut body = ReadTimeout::new(Trickle(false), Duration::from_secs(5));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "{");
        let start = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(err.is::<BodyTimeout>(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_already_there_arms_no_timer() {
        let mut body = ReadTimeout::new(
            http_body_util::Full::new(Bytes::from_static(b"{}")),
            Duration::from_secs(5),
        );
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "{}"
        );
        assert!(body.stall.timer.is_none());
    }
}
