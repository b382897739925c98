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
use tower::ServiceExt;

use crate::app::Stack;
use crate::upstream::rewrite::ClientAddr;
use crate::Body;

/// Serve the proxy stack on `listener` until `shutdown` resolves. Each request
/// carries its connection's [`ClientAddr`].
pub async fn serve(
    listener: TcpListener,
    stack: Stack,
    shutdown: impl Future<Output = ()>,
    limits: ServerLimits,
) {
    accept_loop(listener, shutdown, limits, move |addr| {
        let client = ClientAddr::new(addr);
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
        std::future::pending(),
        ServerLimits::default(),
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
pub(crate) async fn accept_loop<S, M>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    limits: ServerLimits,
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
    loop {
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => return,
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
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let ended = match close {
                None => conn.await,
                Some(close) => tokio::select! {
                    ended = conn.as_mut() => ended,
                    _ = close.notified() => {
                        // Finish what is in flight, then close.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                },
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, %addr, "connection ended with an error");
            }
        });
    }
}
