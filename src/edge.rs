//! Layer 1 of 8, the outermost (see [`app`](crate::app)): gives every
//! request an id and turns every error into a response.
//!
//! It sits first so that whatever fails below it (a bad header, a full queue,
//! an unreachable upstream) reaches the client as an OpenAI-shaped error with
//! the request's `x-request-id`, instead of an error that makes hyper reset
//! the connection. It is also where the one boxing of the response body
//! happens, so the stack has one concrete response type.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::random::splitmix;
use crate::types::{RequestId, REQUEST_ID};
use crate::{error, Body, BoxError};

/// Builds [`Edge`] services.
#[derive(Clone, Copy, Debug, Default)]
pub struct EdgeLayer;

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge { inner }
    }
}

/// Request ids and error rescue: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Edge<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Edge<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Every layer below is always ready; if one ever is not, its error
        // cannot become a response here (there is no request yet), so wait.
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                tracing::error!(error = %e, "inner service failed readiness");
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let id = match req.headers().get(&REQUEST_ID) {
            Some(v) if usable_id(v) => v.clone(),
            _ => {
                let v = generate_id();
                req.headers_mut().insert(REQUEST_ID, v.clone());
                v
            }
        };
        req.extensions_mut().insert(RequestId(id.clone()));
        let http1 = req.version() <= http::Version::HTTP_11;
        ResponseFuture {
            inner: self.inner.call(req),
            id: Some(id),
            http1,
        }
    }
}

/// A refusal that advises a wait longer than an idle keep-alive connection
/// lives (`header_read_timeout`, 10 s by default, closes it) also closes
/// its HTTP/1.1 connection: the client's retry then opens a fresh one
/// instead of writing into one anteroom is closing. Past 2 s, so a quick
/// retry keeps its connection.
fn close_before_a_long_wait(resp: &mut Response<Body>) {
    let waits = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .is_some_and(|secs| secs > 2);
    if waits {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A client's id is kept when it is short and printable, so it can go into
/// logs and headers as it is.
fn usable_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 200 && b.iter().all(|c| c.is_ascii_graphic())
}

/// 32 hex digits: a per-process random seed mixed with a counter. Unique within
/// the process, unpredictable enough to not collide across processes; no
/// syscall and no lock per request.
fn generate_id() -> HeaderValue {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Hex by hand: `format!` cost more than the rest of this layer.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let halves = [splitmix(seed ^ n), splitmix(seed.rotate_left(17) ^ n)];
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        let word = halves[i / 16];
        *byte = HEX[((word >> (60 - 4 * (i % 16))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// The answer to an error from below: logged when it is a panic (a bug),
/// with the request's id.
pub(crate) fn rescued(
    e: BoxError,
    id: Option<&HeaderValue>,
) -> Response<http_body_util::Full<Bytes>> {
    if let Some(p) = error::cause::<error::Panicked>(&*e) {
        tracing::error!(
            request_id = ?id,
            panic = p.message(),
            "a panic while serving a request (a bug): answered 500"
        );
    }
    error::rescue(&*e)
}

pin_project! {
    /// Response future of [`Edge`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
        http1: bool,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut resp = match result {
            Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed_unsync()),
            Err(e) => rescued(e.into(), this.id.as_ref())
                .map(|b| b.map_err(|never| match never {}).boxed_unsync()),
        };
        if let Some(id) = this.id.take() {
            resp.headers_mut().insert(REQUEST_ID, id);
        }
        if *this.http1 && matches!(resp.status().as_u16(), 429 | 503) {
            close_before_a_long_wait(&mut resp);
        }
        Poll::Ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_and_usable() {
        let a = generate_id();
        let b = generate_id();
        assert_ne!(a, b);
        assert!(usable_id(&a));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn generated_ids_are_lowercase_hex_of_both_halves() {
        let id = generate_id();
        let s = id.to_str().unwrap();
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{s}"
        );
        // Both 64-bit halves are filled (not zero-padded).
        assert_ne!(&s[..16], "0000000000000000");
        assert_ne!(&s[16..], "0000000000000000");
    }

    #[test]
    fn odd_client_ids_are_replaced() {
        assert!(usable_id(&HeaderValue::from_static("abc-123")));
        assert!(!usable_id(&HeaderValue::from_static("")));
        assert!(!usable_id(&HeaderValue::from_static("has space")));
        assert!(!usable_id(
            &HeaderValue::from_str(&"x".repeat(201)).unwrap()
        ));
    }
}
