//! Step 2 of the request path, the innermost service: send the request to the
//! upstream origin over a pooled keep-alive connection.
//!
//! The request's path and query are kept and its scheme and authority
//! replaced by the upstream's (an absolute-form URI or a Host header naming
//! another host never takes the request elsewhere). Hop-by-hop headers are
//! removed both ways ([`rewrite`]). The response body is handed back as it
//! arrives: nothing is buffered.

pub mod rewrite;

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture as ClientFuture};
use hyper_util::rt::TokioExecutor;
use pin_project_lite::pin_project;
use tokio::time::Timeout;
use tower::Service;

pub use rewrite::Origin;

use crate::error::{UpstreamTimeout, UpstreamUnavailable};
use crate::BoxError;

/// Connection settings of the upstream client.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Most time to open a TCP connection.
    pub connect_timeout: Duration,
    /// Most time from sending the request to the response headers.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
}

/// The upstream origin behind a pooled HTTP/1.1 client.
///
/// Cloning shares the connection pool.
#[derive(Debug)]
pub struct Upstream<B> {
    client: Client<HttpConnector, B>,
    origin: Origin,
    response_timeout: Duration,
}

// By hand: a derive would require `B: Clone`, which request bodies are not.
impl<B> Clone for Upstream<B> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            origin: self.origin.clone(),
            response_timeout: self.response_timeout,
        }
    }
}

impl<B> Upstream<B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A client for `origin`.
    pub fn new(origin: Origin, settings: &ClientSettings) -> Self {
        let mut connector = HttpConnector::new();
        // Each SSE event is a small write; Nagle would hold it back.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .build(connector);
        Self {
            client,
            origin,
            response_timeout: settings.response_timeout,
        }
    }
}

impl<B> Service<Request<B>> for Upstream<B>
where
    B: Body<Data = Bytes> + Send + 'static + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pooled client is always ready: it opens connections on demand.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        rewrite::request(&mut req, &self.origin);
        ResponseFuture {
            inner: tokio::time::timeout(self.response_timeout, self.client.request(req)),
            after: self.response_timeout,
        }
    }
}

pin_project! {
    /// Response future of [`Upstream`].
    #[derive(Debug)]
    pub struct ResponseFuture {
        #[pin]
        inner: Timeout<ClientFuture>,
        after: Duration,
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Incoming>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.inner.poll(cx)) {
            Ok(Ok(mut resp)) => {
                rewrite::response(&mut resp);
                Ok(resp)
            }
            Ok(Err(e)) => Err(UpstreamUnavailable::new(e).into()),
            Err(_elapsed) => Err(UpstreamTimeout::new(*this.after).into()),
        })
    }
}
