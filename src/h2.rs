//! What hyper's HTTP/2 server leaves to us: connections that stay idle,
//! and streams whose client does not read them.
//!
//! **Idle connections.** A client connection with nothing open is closed
//! after `client_idle_timeout`: an HTTP/2 connection that sends only its
//! preface, or whose last stream ended long ago, holds a socket and a
//! connection task, and hyper never closes it by itself. (An idle HTTP/1.1
//! connection is hyper's: the wait for its next request head is bounded by
//! `header_read_timeout`.) A connection is open for as long as one of its
//! requests is, from the service call to the end of its response body.
//! [`Counting`] wraps the service of a connection that is watched,
//! [`IdleFor`] is the connection task's wait.
//!
//! **Unread streams.** An HTTP/2 client can stop reading one response
//! without stopping its connection: it withholds the stream's
//! flow-control window. Its socket keeps being read, so the connection's
//! write deadline ([`crate::deadline::WriteDeadline`]) never fires, and
//! hyper stops polling the response body, so the body's own timers never
//! run: the slot would be held for as long as the client likes. So each
//! stream's task is spawned by [`Exec`], which cuts the stream (RST_STREAM
//! CANCEL; the body dropped, its slot freed, its upstream closed) once
//! hyper has held a piece of its body for `client_write_timeout` without
//! asking for the next.
//!
//! A connection that is not watched (HTTP/1.1) is served without either:
//! it pays nothing for them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

/// What one watched connection has open, shared by its requests and its
/// connection task.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    open: AtomicUsize,
    /// The connection task waits to hear that the last open request ended.
    wants: AtomicBool,
    waker: parking_lot::Mutex<Option<Waker>>,
}

impl Idle {
    fn enter(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, SeqCst);
        Open(self.clone())
    }
}

/// One open request of a watched connection; its drop ends it.
#[derive(Debug)]
struct Open(Arc<Idle>);

impl Drop for Open {
    fn drop(&mut self) {
        // SeqCst with the store and load in `IdleFor::poll`: either the
        // task sees this request gone, or this drop sees it waiting.
        if self.0.open.fetch_sub(1, SeqCst) == 1 && self.0.wants.swap(false, SeqCst) {
            if let Some(w) = self.0.waker.lock().take() {
                w.wake();
            }
        }
    }
}

/// A watched connection task's wait: resolves once nothing has been open
/// on the connection for `timeout`.
pub(crate) struct IdleFor {
    idle: Arc<Idle>,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleFor {
    /// Wait on what `idle` counts.
    pub(crate) fn new(idle: Arc<Idle>, timeout: Duration) -> Self {
        Self {
            idle,
            timeout,
            timer: None,
            armed: false,
        }
    }
}

impl Future for IdleFor {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let idle = &this.idle;
        // Not waiting to hear: the first poll, or the last open request
        // has ended since (its drop took the waker), so the idle time
        // starts again. The task's waker is the same on every poll (one
        // connection task), so it is stored only then.
        if !idle.wants.load(SeqCst) {
            *idle.waker.lock() = Some(cx.waker().clone());
            idle.wants.store(true, SeqCst);
            this.armed = false;
        }
        if idle.open.load(SeqCst) > 0 {
            this.armed = false;
            return Poll::Pending;
        }
        if crate::deadline::waited(&mut this.timer, &mut this.armed, this.timeout, cx) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A watched connection's service, counting what is open.
#[derive(Clone, Debug)]
pub(crate) struct Counting<S> {
    svc: S,
    idle: Arc<Idle>,
}

impl<S> Counting<S> {
    /// `svc`, counted against `idle`.
    pub(crate) fn new(svc: S, idle: Arc<Idle>) -> Self {
        Self { svc, idle }
    }
}

impl<S, B> hyper::service::Service<Request<hyper::body::Incoming>> for Counting<S>
where
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = Response<B>>,
{
    type Response = Response<Counted<B>>;
    type Error = S::Error;
    type Future = CountingFuture<S::Future>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        CountingFuture {
            open: Some(self.idle.enter()),
            fut: self.svc.call(req),
        }
    }
}

pin_project! {
    /// [`Counting`]'s response future: the request is open from the call.
    pub(crate) struct CountingFuture<F> {
        #[pin]
        fut: F,
        open: Option<Open>,
    }
}

impl<F, B, E> Future for CountingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Counted<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.fut.poll(cx))?;
        let open = this.open.take();
        // Polled in the stream's own task: an HTTP/2 stream's, if `Exec`
        // spawned it.
        let unread = STREAM.try_with(Arc::clone).ok();
        Poll::Ready(Ok(resp.map(|inner| Counted {
            inner,
            _open: open,
            unread,
        })))
    }
}

pin_project! {
    /// A response body that keeps its request open until it is dropped.
    pub(crate) struct Counted<B> {
        #[pin]
        inner: B,
        _open: Option<Open>,
        unread: Option<Arc<Unread>>,
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Some(unread) = this.unread {
            let data = matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data());
            unread.polled(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

tokio::task_local! {
    /// The HTTP/2 stream whose task is being polled (set by [`Exec`]).
    static STREAM: Arc<Unread>;
}

/// Whether hyper holds a piece of a stream's body and has not asked for
/// the next: the number of polls of the body times two, plus one if the
/// last poll handed over a data frame. Written only by the body.
#[derive(Debug, Default)]
pub(crate) struct Unread(AtomicU64);

impl Unread {
    fn polled(&self, handed_data: bool) {
        let polls = (self.0.load(Relaxed) >> 1) + 1;
        self.0.store(polls << 1 | u64::from(handed_data), Relaxed);
    }
}

/// The HTTP/2 server's executor: spawns each stream's task on tokio,
/// watched for a client that does not read it (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exec {
    /// `client_write_timeout`.
    pub(crate) timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let unread = Arc::<Unread>::default();
        tokio::spawn(Watched {
            fut: STREAM.scope(unread.clone(), fut),
            unread,
            timeout: self.timeout,
            timer: None,
            armed: false,
            since: 0,
        });
    }
}

pin_project! {
    /// A stream's task, cut once its body has been held, unread, for
    /// `timeout`.
    struct Watched<F> {
        #[pin]
        fut: F,
        unread: Arc<Unread>,
        timeout: Duration,
        timer: Option<Pin<Box<Sleep>>>,
        armed: bool,
        // The body's state when the wait began.
        since: u64,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.fut.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let now = this.unread.0.load(Relaxed);
        if now & 1 == 0 {
            // Waiting for the upstream, whose timers are the body's own.
            *this.armed = false;
            return Poll::Pending;
        }
        if now != *this.since {
            // A new piece held: its wait starts now.
            *this.since = now;
            *this.armed = false;
        }
        if crate::deadline::waited(this.timer, this.armed, *this.timeout, cx) {
            tracing::debug!(
                timeout = ?this.timeout,
                "an HTTP/2 client read nothing of a response for client_write_timeout: stream cut"
            );
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A watch for a new connection.
pub(crate) fn watch() -> Arc<Idle> {
    Arc::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;

    fn open(idle: &Arc<Idle>) -> Open {
        idle.enter()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_done_after_its_timeout() {
        let idle = watch();
        let t0 = tokio::time::Instant::now();
        IdleFor::new(idle, Duration::from_secs(60)).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_time_counts_from_the_last_request_end() {
        let idle = watch();
        let t0 = tokio::time::Instant::now();
        let first = open(&idle);
        let wait = tokio::spawn(IdleFor::new(idle.clone(), Duration::from_secs(60)));
        // Open for 100 s: not idle, however long.
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!wait.is_finished());
        drop(first);
        // Idle from 100 s; a short request at 130 s starts it again.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(open(&idle));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!wait.is_finished(), "closed 59 s after the last request");
        wait.await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(190));
    }

    /// A stream task that hands over a data frame every `every` until
    /// `pieces` are out, then holds the last one unread forever (a client
    /// that withholds its window).
    async fn stream(every: Duration, pieces: u32) {
        let unread = STREAM.with(Arc::clone);
        for _ in 0..pieces {
            unread.polled(true);
            tokio::time::sleep(every).await;
            unread.polled(false);
        }
        unread.polled(true);
        std::future::pending::<()>().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_held_unread_is_cut_after_the_write_timeout() {
        let t0 = tokio::time::Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Each piece is taken after 50 s, under the 60 s limit: 10 of
        // them (500 s), then one held for good.
        Exec {
            timeout: Duration::from_secs(60),
        }
        .execute(async move {
            let _tx = tx;
            stream(Duration::from_secs(50), 10).await;
        });
        // Cut: the task (and what it held) dropped, 60 s after the last
        // piece was handed over.
        let _ = rx.await;
        assert_eq!(t0.elapsed(), Duration::from_secs(560));
    }
}
