//! Upstream HTTP/1.1 connections, driven in the request's own task.
//!
//! hyper-util's pooled client runs every connection in a task of its own and
//! hands each response frame across a channel, one task wake-up (often a
//! cross-thread wake-up) per frame; for an SSE stream that is one hop per
//! event, and each event then leaves in a write of its own. Here a connection
//! is owned by whoever uses it: the request future while it waits for the
//! response headers, then the response body ([`PooledBody`]), which polls the
//! connection itself whenever it needs the next frame. Frames the connection
//! already has are handed over in the same poll, so the server writes a burst
//! of events in one go, and nothing crosses threads.
//!
//! Idle connections wait in a lock-free queue. An idle connection is not
//! polled, so one the upstream closed is found out when it is taken: it is
//! polled once on checkout and dropped if it has ended; and a request that the
//! connection never accepted (hyper hands it back) is sent again on a fresh
//! connection, which is safe because the upstream never saw it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::origin::Origin;
use crate::tls::Stream;
use crate::BoxError;

/// Most idle connections kept. Above the concurrency any one backend is run
/// at; a connection that finds the pool full is closed.
const MAX_IDLE: usize = 512;

type Io = TokioIo<Stream>;

/// Open a connection to `origin` (TCP, then TLS for `https://`), the whole
/// within `timeout`.
pub(crate) async fn connect(origin: &Origin, timeout: Duration) -> Result<Stream, BoxError> {
    let authority = origin.authority();
    if crate::memory::is_memory(authority.host()) {
        return Ok(Stream::Memory(crate::memory::connect(authority.host())?));
    }
    let addr = (
        authority.host().trim_matches(|c| c == '[' || c == ']'),
        origin.port(),
    );
    let open = async {
        let tcp = TcpStream::connect(addr).await?;
        // Each SSE event is a small write; Nagle would hold it back.
        tcp.set_nodelay(true)?;
        match origin.tls() {
            Some(tls) => tls.connect(tcp).await,
            None if origin.is_https() => Err(std::io::Error::other(
                "an https:// upstream without TLS settings",
            )),
            None => Ok(Stream::Plain(tcp)),
        }
    };
    let stream = tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| format!("connecting to {authority} took longer than {timeout:?}"))??;
    Ok(stream)
}

/// One upstream connection: the handle to send on and the connection state
/// machine that must be polled for anything to move.
struct Conn<B>
where
    B: Body + 'static,
{
    sender: http1::SendRequest<B>,
    driver: Option<http1::Connection<Io, B>>,
    idle_since: Instant,
}

impl<B> Conn<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Drive the connection. `Ready` once it has ended (closed or failed);
    /// after that it is never polled again.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        let Some(driver) = self.driver.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let polled = Pin::new(driver).poll(cx);
        if polled.is_ready() {
            self.driver = None;
        }
        polled
    }

    /// Still usable for another request?
    fn reusable(&mut self) -> bool {
        // Let it take in whatever ended the last exchange (or the upstream's
        // close) without registering anyone for a wake-up.
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx).is_pending() && self.sender.is_ready()
    }
}

/// A connection being opened.
type Connecting<'a, B> = Pin<Box<dyn Future<Output = Result<Box<Conn<B>>, BoxError>> + Send + 'a>>;

/// The connections to one upstream origin. Cloning shares them.
pub(crate) struct Pool<B>
where
    B: Body + 'static,
{
    /// Boxed: a connection (hyper's state machine) is several hundred
    /// bytes, and the response body carries it through every layer.
    idle: ArrayQueue<Box<Conn<B>>>,
    origin: Origin,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl<B> std::fmt::Debug for Pool<B>
where
    B: Body + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("origin", &self.origin)
            .field("idle", &self.idle.len())
            .finish()
    }
}

impl<B> Pool<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(
        origin: Origin,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            idle: ArrayQueue::new(MAX_IDLE),
            origin,
            connect_timeout,
            idle_timeout,
        })
    }

    /// An idle connection that is still good, if there is one.
    fn checkout(&self) -> Option<Box<Conn<B>>> {
        while let Some(mut conn) = self.idle.pop() {
            if conn.idle_since.elapsed() < self.idle_timeout && conn.reusable() {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn idle_len(&self) -> usize {
        self.idle.len()
    }

    /// Close idle connections that have ended (the upstream closed them)
    /// or idled past the timeout, instead of holding them until the next
    /// checkout. Returns how many are left.
    pub(crate) fn reap(&self) -> usize {
        for _ in 0..self.idle.len() {
            let Some(mut conn) = self.idle.pop() else {
                break;
            };
            if conn.idle_since.elapsed() < self.idle_timeout && conn.reusable() {
                // Reaping is not use: keep its idle time.
                if let Err(conn) = self.idle.push(conn) {
                    drop(conn);
                }
            }
        }
        self.idle.len()
    }

    fn checkin(&self, mut conn: Box<Conn<B>>) {
        if conn.reusable() {
            conn.idle_since = Instant::now();
            // A full pool closes the connection.
            let _ = self.idle.push(conn);
        }
    }

    /// [`connect`](Self::connect)'s future on the heap: its TCP and TLS
    /// handshake state would otherwise sit inside every request's send
    /// future (which is boxed and moved per request) though most requests
    /// reuse a connection.
    fn connect_boxed(&self) -> Connecting<'_, B>
    where
        B: Send,
        B::Data: Send,
    {
        Box::pin(self.connect())
    }

    async fn connect(&self) -> Result<Box<Conn<B>>, BoxError> {
        let stream = connect(&self.origin, self.connect_timeout).await?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        Ok(Box::new(Conn {
            sender,
            driver: Some(driver),
            idle_since: Instant::now(),
        }))
    }

    /// Send `req` and wait for the response headers. The response body owns
    /// the connection and returns it here when it has been read to the end.
    pub(crate) async fn send(
        self: Arc<Self>,
        mut req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, BoxError>
    where
        B: Replay,
    {
        let mut reused = true;
        let mut conn = match self.checkout() {
            Some(c) => c,
            None => {
                reused = false;
                self.connect_boxed().await?
            }
        };
        loop {
            // On a reused connection the upstream may close it just as the
            // request goes out (llama.cpp closes after every stream): keep a
            // copy to send again if nothing at all comes back.
            let replay = if reused { replay(&req) } else { None };
            let mut response = std::pin::pin!(conn.sender.try_send_request(req));
            let outcome = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = response.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                // The connection writes the request and reads the response
                // as we drive it; look again at once for what it delivered
                // (when it ended, the response resolves with an error).
                let _ = conn.drive(cx);
                response.as_mut().poll(cx)
            })
            .await;
            match outcome {
                Ok(resp) => {
                    let pool = self.clone();
                    return Ok(resp.map(|incoming| PooledBody {
                        incoming,
                        conn: Some(conn),
                        pool,
                        checkin: Pool::checkin,
                    }));
                }
                Err(mut e) => match (e.take_message(), replay) {
                    // Never written: the upstream closed this idle connection
                    // under us. Safe to send again, once, on a fresh one.
                    (Some(back), _) if reused => {
                        tracing::debug!(error = %e.error(), "pooled connection was closed; reconnecting");
                        req = back;
                        reused = false;
                        conn = self.connect_boxed().await?;
                    }
                    // Written, but the connection closed without a byte of
                    // answer: the upstream was closing it (it does not read
                    // past the response it meant to be the last). Once.
                    (None, Some(copy)) if closed_unanswered(e.error()) => {
                        tracing::debug!(
                            "pooled connection closed as the request went out; resending"
                        );
                        req = copy;
                        reused = false;
                        conn = self.connect_boxed().await?;
                    }
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// The connection ended without a byte of answer: closed (EOF) or reset
/// while the request went out.
fn closed_unanswered(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = err.source();
    }
    false
}

/// Request bodies that can be sent again without having been kept by the
/// caller: buffered ones.
pub trait Replay: Sized {
    /// A copy to send again, if this body can be.
    fn replay(&self) -> Option<Self>;

    /// Replace a buffered body with `f` of it, if `f` gives one: its new
    /// length. A streamed body is left as it is (`None`).
    fn rewrite(&mut self, f: &dyn Fn(&[u8]) -> Option<Vec<u8>>) -> Option<usize> {
        let _ = f;
        None
    }
}

impl Replay for http_body_util::Full<Bytes> {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<B> Replay for http_body_util::Either<http_body_util::Full<Bytes>, B> {
    fn replay(&self) -> Option<Self> {
        match self {
            http_body_util::Either::Left(full) => Some(http_body_util::Either::Left(full.clone())),
            http_body_util::Either::Right(_) => None,
        }
    }

    fn rewrite(&mut self, f: &dyn Fn(&[u8]) -> Option<Vec<u8>>) -> Option<usize> {
        let http_body_util::Either::Left(full) = self else {
            return None;
        };
        let data = std::mem::take(full).into_inner().unwrap_or_default();
        let (body, len) = match f(&data) {
            Some(new) => {
                let len = new.len();
                (Bytes::from(new), Some(len))
            }
            None => (data, None),
        };
        *full = http_body_util::Full::new(body);
        len
    }
}

fn replay<B: Replay>(req: &Request<B>) -> Option<Request<B>> {
    let body = req.body().replay()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    // Extensions are not needed past this point (the upstream ignores them).
    Some(copy)
}

/// The upstream's response body, holding the connection it arrives on.
///
/// Dropped before its end (the client went away), it closes the connection,
/// which is how the upstream learns to stop generating.
pub struct PooledBody<B>
where
    B: Body + 'static,
{
    incoming: Incoming,
    conn: Option<Box<Conn<B>>>,
    pool: Arc<Pool<B>>,
    /// `Pool::checkin`, captured where its bounds are known, so `Drop` (which
    /// cannot add bounds) can call it.
    checkin: fn(&Pool<B>, Box<Conn<B>>),
}

impl<B> std::fmt::Debug for PooledBody<B>
where
    B: Body + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl<B> PooledBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Read to the end: the connection can serve another request.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn);
        }
    }
}

impl<B> Drop for PooledBody<B>
where
    B: Body + 'static,
{
    fn drop(&mut self) {
        // A body that was empty from the start (HEAD, 204, 304) is never
        // polled: hyper's server trusts is_end_stream. Its connection is
        // still good. Anything else dropped before its end closes it.
        if self.incoming.is_end_stream() {
            if let Some(conn) = self.conn.take() {
                (self.checkin)(&self.pool, conn);
            }
        }
    }
}

impl<B> Body for PooledBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut drove = false;
        loop {
            match Pin::new(&mut this.incoming).poll_frame(cx) {
                Poll::Ready(None) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(frame)) => {
                    // A reader that trusts is_end_stream (hyper's server does,
                    // for a body of known length) never asks again: give the
                    // connection back with the last frame.
                    if this.incoming.is_end_stream() {
                        this.release();
                    }
                    return Poll::Ready(Some(frame));
                }
                Poll::Pending => {}
            }
            // No frame yet: drive the connection once, which reads the socket
            // and hands over what it decoded, then look again. After that we
            // are registered for both the socket and the frame channel.
            if drove {
                return Poll::Pending;
            }
            drove = true;
            if let Some(conn) = this.conn.as_mut() {
                if conn.drive(cx).is_ready() {
                    // It ended (or failed): the body now yields its end or
                    // the error, and the connection is gone.
                    this.conn = None;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use http_body_util::{BodyExt, Either, Full};

    use super::*;
    use crate::sim::{Mode, SimConfig, SimHandle};

    /// A simulator in process, and a pool to it that keeps idle
    /// connections a minute.
    fn setup(name: &str) -> (SimHandle, Arc<Pool<Sent>>) {
        static N: AtomicU64 = AtomicU64::new(0);
        let host = format!(
            "pool-{name}-{}{}",
            N.fetch_add(1, Ordering::Relaxed),
            crate::memory::HOST_SUFFIX
        );
        let sim = crate::sim::spawn_in_memory(
            &host,
            SimConfig {
                mode: Mode::Batch,
                ttft: Duration::from_millis(10),
                output_tokens: 2,
                ..SimConfig::default()
            },
        )
        .expect("a free host");
        let origin = Origin::parse(&sim.url()).expect("the simulator's URL");
        let pool = Pool::new(origin, Duration::from_secs(5), Duration::from_secs(60));
        (sim, pool)
    }

    /// A buffered request body, as admitted requests have.
    type Sent = Either<Full<Bytes>, Full<Bytes>>;

    fn chat() -> Request<Sent> {
        let mut req = Request::post("/v1/chat/completions")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Either::Left(Full::new(Bytes::from_static(
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            ))))
            .expect("a request");
        crate::upstream::rewrite::request(
            &mut req,
            &Origin::parse("http://pool.memory.invalid").expect("an origin"),
        );
        req
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_read_to_its_end_is_used_again() {
        let (sim, pool) = setup("reuse");
        for n in 1..=3 {
            let resp = pool.clone().send(chat()).await.expect("an answer");
            assert_eq!(resp.status(), 200);
            // Until the body is read, the connection is the body's.
            assert_eq!(pool.idle_len(), 0);
            resp.into_body().collect().await.expect("the body");
            assert_eq!(pool.idle_len(), 1, "request {n}");
        }
        assert_eq!(sim.stats().connections, 1);
        assert_eq!(sim.stats().received, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_dropped_unread_takes_its_connection_with_it() {
        let (sim, pool) = setup("dropped");
        let resp = pool.clone().send(chat()).await.expect("an answer");
        drop(resp);
        assert_eq!(pool.idle_len(), 0);
        let resp = pool.clone().send(chat()).await.expect("an answer");
        resp.into_body().collect().await.expect("the body");
        assert_eq!(sim.stats().connections, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_past_the_timeout_are_reaped_and_not_used() {
        let (sim, pool) = setup("idle");
        let resp = pool.clone().send(chat()).await.expect("an answer");
        resp.into_body().collect().await.expect("the body");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(pool.reap(), 1, "within the idle timeout: kept");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(pool.reap(), 0, "past it: closed");
        let resp = pool.clone().send(chat()).await.expect("an answer");
        resp.into_body().collect().await.expect("the body");
        assert_eq!(sim.stats().connections, 2);
    }
}
