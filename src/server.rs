//! The accept loop: TCP → hyper-util's HTTP/1.1-or-HTTP/2 connection → service.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt;

use std::sync::Arc;

use crate::app::Stack;
use crate::config::ServerLimits;
use crate::tls::Stream;
use crate::types::ClientAddr;
use crate::Body;

/// Serve the proxy stack on `listener` until `shutdown` resolves with a
/// drain deadline; then drain (see `accept_loop`). Each request carries
/// its connection's [`ClientAddr`].
pub async fn serve(
    listener: TcpListener,
    stack: Stack,
    shutdown: impl Future<Output = Instant>,
    limits: ServerLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    gate: Arc<ConnGate>,
) {
    let over_tls = tls.is_some();
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    accept_loop(listener, shutdown, limits, tls, gate, move |addr| {
        let client = if over_tls {
            ClientAddr::new(addr).over_tls()
        } else {
            ClientAddr::new(addr)
        };
        let svc = stack
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(client.clone());
                req
            });
        Some(Served::new(TowerToHyperService::new(svc)))
    })
    .await
}

/// Serve a plain async function (the admin listener, the simulator) until the
/// task is dropped.
pub async fn serve_fn<F, Fut>(listener: TcpListener, f: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    accept_loop(
        listener,
        std::future::pending::<Instant>(),
        ServerLimits::default(),
        None,
        Arc::default(),
        move |_| Some(Served::new(hyper::service::service_fn(f.clone()))),
    )
    .await
}

/// Counts open client connections against `max_connections` and
/// `max_connections_per_ip`, across every worker's accept loop. One atomic
/// add per connection; the per-address map (behind a mutex, touched once
/// at accept and once at close, never per request) only when a per-address
/// limit is set.
#[derive(Debug, Default)]
pub struct ConnGate {
    max: usize,
    max_per_ip: usize,
    open: std::sync::atomic::AtomicUsize,
    per_ip: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl ConnGate {
    /// A gate for these limits.
    pub fn new(limits: &ServerLimits) -> Arc<Self> {
        Arc::new(Self {
            max: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            ..Self::default()
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections open now from `ip`, where `max_connections_per_ip` is
    /// set (0 where it is not: they are not counted by address).
    pub fn open_from(&self, ip: std::net::IpAddr) -> usize {
        self.per_ip.lock().get(&ip).copied().unwrap_or(0)
    }

    /// Let a connection from `ip` in, or not.
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ConnTicket> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.open.fetch_add(1, Relaxed);
        if self.max > 0 && n >= self.max {
            self.open.fetch_sub(1, Relaxed);
            return None;
        }
        if self.max_per_ip > 0 {
            let mut per_ip = self.per_ip.lock();
            let mine = per_ip.entry(ip).or_default();
            if *mine >= self.max_per_ip {
                drop(per_ip);
                self.open.fetch_sub(1, Relaxed);
                return None;
            }
            *mine += 1;
        }
        Some(ConnTicket {
            gate: self.clone(),
            ip,
        })
    }
}

/// A connection's place in the [`ConnGate`], given back on drop.
struct ConnTicket {
    gate: Arc<ConnGate>,
    ip: std::net::IpAddr,
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        self.gate
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if self.gate.max_per_ip > 0 {
            let mut per_ip = self.gate.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// "Close once idle", raised for every connection of an accept loop when it
/// drains. Each connection task polls its wait on every wake-up, so the wait
/// must be cheap: an atomic load, with the wake-up registered once (again
/// only if the task's waker changes). tokio's `watch` and `Notify` lock a
/// mutex shared by every connection on each such poll, which measured as
/// +2 µs of CPU per small request and +6 µs per 32-event stream.
#[derive(Debug, Default)]
struct DrainFlag {
    raised: std::sync::atomic::AtomicBool,
    wakers: parking_lot::Mutex<std::collections::HashMap<u64, std::task::Waker>>,
    next: std::sync::atomic::AtomicU64,
}

impl DrainFlag {
    fn raise(&self) {
        self.raised
            .store(true, std::sync::atomic::Ordering::Release);
        for (_, w) in self.wakers.lock().drain() {
            w.wake();
        }
    }

    fn wait(flag: &Arc<Self>) -> DrainWait {
        DrainWait {
            flag: flag.clone(),
            id: flag.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            waker: None,
        }
    }
}

/// Resolves once its [`DrainFlag`] is raised.
struct DrainWait {
    flag: Arc<DrainFlag>,
    id: u64,
    waker: Option<std::task::Waker>,
}

impl Future for DrainWait {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::sync::atomic::Ordering::Acquire;
        if self.flag.raised.load(Acquire) {
            return std::task::Poll::Ready(());
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let flag = self.flag.clone();
            let mut wakers = flag.wakers.lock();
            // Raised between the load and the lock: its wake-ups are gone.
            if flag.raised.load(Acquire) {
                return std::task::Poll::Ready(());
            }
            wakers.insert(self.id, cx.waker().clone());
            drop(wakers);
            self.waker = Some(cx.waker().clone());
        }
        std::task::Poll::Pending
    }
}

impl Drop for DrainWait {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.flag.wakers.lock().remove(&self.id);
        }
    }
}

/// A connection's service, and a signal to close the connection once what is
/// in flight is done (the simulator's closing modes).
pub(crate) struct Served<S> {
    pub(crate) svc: S,
    pub(crate) close: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl<S> Served<S> {
    pub(crate) fn new(svc: S) -> Self {
        Self { svc, close: None }
    }
}

/// hyper's default bound on request headers (`DEFAULT_MAX_HEADERS`).
const HYPER_MAX_HEADERS: usize = 100;

/// Accept connections until `shutdown`, serving each with the service `make`
/// builds for its peer address (`None`: close the connection at once), with
/// `limits` on each connection.
///
/// `shutdown` resolves with a drain deadline: the listener is closed, every
/// connection is told to close once its in-flight requests are answered
/// (hyper's graceful shutdown: idle keep-alive connections at once, HTTP/2
/// with GOAWAY), and the loop returns when they all have, or
/// [`GRACE`](crate::drain::GRACE) after the deadline, when the rest are
/// dropped (their bodies' records finish as `cancelled`).
pub(crate) async fn accept_loop<S, M>(
    listener: TcpListener,
    shutdown: impl Future<Output = Instant>,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    gate: Arc<ConnGate>,
    make: M,
) where
    M: Fn(SocketAddr) -> Option<Served<S>>,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(crate::h2::Exec {
        timeout: limits.client_write_timeout,
    });
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    // hyper's own limit is 100 headers, parsed into an inline array; a limit
    // set explicitly, even to 100, makes it build a SmallVec element by
    // element for every request (1.5k instructions each, callgrind). So the
    // limit is handed over only when it differs from hyper's.
    if limits.max_headers != HYPER_MAX_HEADERS {
        builder.http1().max_headers(limits.max_headers);
    }
    // HTTP/2: a bound on streams per connection (advertised in SETTINGS; a
    // client that opens more gets them refused) and on header lists.
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    // A plaintext client's first bytes tell HTTP/1.1 from h2c (see
    // `sniff`); serving it with a builder for that version only spares
    // hyper-util's own sniffing, whose 24-byte replay made hyper's first
    // read short and so doubled every HTTP/1.1 connection's read buffer
    // to 16 KiB (dhat). TLS connections keep the sniffing builder.
    let builders = Arc::new(Builders {
        http1: builder.clone().http1_only(),
        http2: builder.clone().http2_only(),
        either: builder,
    });
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    let draining = Arc::new(DrainFlag::default());
    let (mut accept_errors, mut last_said) = (0u64, None);
    let deadline = loop {
        let (stream, addr) = tokio::select! {
            deadline = &mut shutdown => break deadline,
            // Reap finished connections as they end, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or a connection reset before
                    // accept: keep serving the others. Said once per 10 s
                    // with how many there were, not 20 lines a second.
                    accept_errors += 1;
                    if last_said.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(error = %e, failures = accept_errors, "accept failed (counted since the last report)");
                        accept_errors = 0;
                        last_said = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // SSE events are small writes: send each at once.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let Some(ticket) = gate.enter(addr.ip()) else {
            tracing::debug!(%addr, open = gate.open(), "connection limit reached: closed");
            continue;
        };
        let Some(Served { svc, close }) = make(addr) else {
            continue;
        };
        let builders = builders.clone();
        let drain_now = DrainFlag::wait(&draining);
        let tls = tls.clone();
        connections.spawn(async move {
            let _ticket = ticket;
            // Which builder serves the connection, and whether it is
            // watched for idleness: every connection that may be HTTP/2.
            let (builder, idle, stream) = match tls {
                None => {
                    // Bounded like the request head: a client that sends
                    // nothing, or a part of the preface, holds only its
                    // own socket, and that not for long.
                    match tokio::time::timeout(limits.header_read_timeout, sniff(&stream)).await {
                        Ok(Some(Version::Http1)) => (&builders.http1, None, Stream::Plain(stream)),
                        Ok(Some(Version::Http2)) => (
                            &builders.http2,
                            Some(crate::h2::watch()),
                            Stream::Plain(stream),
                        ),
                        // Closed before saying anything.
                        Ok(None) => return,
                        Err(_) => {
                            tracing::debug!(%addr, "no request before the header read timeout");
                            return;
                        }
                    }
                }
                // The handshake is bounded like the request head: a client
                // that stalls it holds only its own socket.
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                        Ok(Ok(s)) => {
                            // Without ALPN it may still be HTTP/2.
                            let http1 = s.get_ref().1.alpn_protocol() == Some(b"http/1.1");
                            let idle = (!http1).then(crate::h2::watch);
                            (&builders.either, idle, Stream::ServerTls(Box::new(s)))
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %addr, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%addr, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let stream = crate::deadline::WriteDeadline::new(stream, limits.client_write_timeout);
            // Served with the service as it is, or, where the connection is
            // watched for idleness, counting what it has open: a
            // connection that is not watched (HTTP/1.1) pays nothing for
            // the watch.
            match idle {
                None => drive(builder, stream, svc, close, drain_now, None, limits, addr).await,
                Some(idle) => {
                    let idle_for =
                        crate::h2::IdleFor::new(idle.clone(), limits.client_idle_timeout);
                    let svc = crate::h2::Counting::new(svc, idle);
                    drive(
                        builder,
                        stream,
                        svc,
                        close,
                        drain_now,
                        Some(idle_for),
                        limits,
                        addr,
                    )
                    .await
                }
            }
        });
    };
    drop(listener);
    draining.raise();
    let all_closed = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline + crate::drain::GRACE, all_closed)
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "drain deadline passed: dropping the connections still open"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Serve one connection with `svc` until it ends; or until `close` (the
/// simulator's closing modes) or the drain tells it to close once what is
/// in flight is answered; or, when it is watched, until it has been idle
/// for `client_idle_timeout`.
#[allow(clippy::too_many_arguments)]
async fn drive<S, B>(
    builder: &auto::Builder<crate::h2::Exec>,
    stream: crate::deadline::WriteDeadline<Stream>,
    svc: S,
    close: Option<Arc<tokio::sync::Notify>>,
    drain_now: DrainWait,
    idle: Option<crate::h2::IdleFor>,
    limits: ServerLimits,
    addr: SocketAddr,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError>,
{
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let close = async {
        match close {
            Some(close) => close.notified().await,
            None => std::future::pending().await,
        }
    };
    let watched = idle.is_some();
    let idle_for = async {
        match idle {
            Some(idle) => idle.await,
            None => std::future::pending().await,
        }
    };
    // Biased: the connection first, and no random draw per poll.
    let ended = tokio::select! {
        biased;
        ended = conn.as_mut() => ended,
        _ = close => {
            // Finish what is in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = drain_now => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        // Not polled at all for a connection that is not watched.
        () = idle_for, if watched => {
            tracing::debug!(%addr, "idle for client_idle_timeout: closed");
            // GOAWAY; h2 then waits for the client's answer to a PING,
            // which a client that went quiet may never send. Nothing is
            // open, so nothing is lost by not waiting.
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(limits.header_read_timeout, conn.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, %addr, "connection ended with an error");
    }
}

/// The server's connection builders: for HTTP/1.1 only, h2c only, and
/// either (telling them apart by the first bytes, as hyper-util does).
struct Builders {
    http1: auto::Builder<crate::h2::Exec>,
    http2: auto::Builder<crate::h2::Exec>,
    either: auto::Builder<crate::h2::Exec>,
}

/// The protocol a plaintext client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which protocol a plaintext client speaks, from its first bytes, read
/// with `MSG_PEEK` so hyper still reads them itself: HTTP/2 if they are the
/// preface, HTTP/1.1 as soon as they differ from it. `None` if the client
/// closed first. A client that sends a part of the preface and stops is
/// peeked at again every few milliseconds until it says more (the caller
/// bounds the wait); hyper-util's own sniffing would wait for the rest
/// with no bound.
async fn sniff(tcp: &tokio::net::TcpStream) -> Option<Version> {
    let mut buf = [0u8; 24];
    loop {
        let n = tcp.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if let Some(v) = version_of(&buf[..n]) {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`sniff`]'s decision on the bytes read so far.
fn version_of(first: &[u8]) -> Option<Version> {
    if first.is_empty() {
        None
    } else if !H2_PREFACE.starts_with(first) {
        Some(Version::Http1)
    } else if first.len() == H2_PREFACE.len() {
        Some(Version::Http2)
    } else {
        None
    }
}

#[cfg(test)]
mod sniff_tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_http1_from_h2c() {
        assert_eq!(
            version_of(b"POST /v1/chat/completions HTTP/1.1\r\n"),
            Some(Version::Http1)
        );
        assert_eq!(version_of(b"GET / HTTP/1.1\r\n"), Some(Version::Http1));
        assert_eq!(version_of(b"PUT"), Some(Version::Http1));
        assert_eq!(version_of(H2_PREFACE), Some(Version::Http2));
        // Not decided yet: a prefix of the preface, or nothing.
        assert_eq!(version_of(b"P"), None);
        assert_eq!(version_of(b"PRI * HTTP/2"), None);
        assert_eq!(version_of(b""), None);
    }
}
