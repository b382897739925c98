//! The accept loop: TCP → hyper-util's HTTP/1.1-or-HTTP/2 connection → service.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt;

use std::sync::Arc;

use crate::app::Stack;
use crate::tls::Stream;
use crate::upstream::rewrite::ClientAddr;
use crate::Body;

/// Serve the proxy stack on `listener` until `shutdown` resolves with a
/// drain deadline; then drain (see [`accept_loop`]). Each request carries
/// its connection's [`ClientAddr`].
pub async fn serve(
    listener: TcpListener,
    stack: Stack,
    shutdown: impl Future<Output = Instant>,
    limits: ServerLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let over_tls = tls.is_some();
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    accept_loop(listener, shutdown, limits, tls, move |addr| {
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
        move |_| Some(Served::new(hyper::service::service_fn(f.clone()))),
    )
    .await
}

/// What one client connection may send before the server gives up on it.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Most time to receive a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; larger:
    /// 431.
    pub max_header_bytes: usize,
    /// Most request headers; more: 431.
    pub max_headers: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
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
    make: M,
) where
    M: Fn(SocketAddr) -> Option<Served<S>>,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    let (draining, drain_rx) = tokio::sync::watch::channel(false);
    let deadline = loop {
        let (stream, addr) = tokio::select! {
            deadline = &mut shutdown => break deadline,
            // Reap finished connections as they end, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or a connection reset before
                    // accept: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // SSE events are small writes: send each at once.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let Some(Served { svc, close }) = make(addr) else {
            continue;
        };
        let builder = builder.clone();
        let mut drain_rx = drain_rx.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let stream = match tls {
                None => Stream::Plain(stream),
                // The handshake is bounded like the request head: a client
                // that stalls it holds only its own socket.
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                        Ok(Ok(s)) => Stream::ServerTls(Box::new(s)),
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
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let close = async {
                match close {
                    Some(close) => close.notified().await,
                    None => std::future::pending().await,
                }
            };
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = close => {
                    // Finish what is in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                _ = async { drain_rx.wait_for(|d| *d).await.is_ok() } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, %addr, "connection ended with an error");
            }
        });
    };
    drop(listener);
    let _ = draining.send(true);
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
