//! Layer 8 of 8, the innermost service: send the request to the upstream
//! origin over a pooled keep-alive connection.
//!
//! The request's path and query are kept and its scheme and authority
//! replaced by the upstream's (an absolute-form URI or a Host header naming
//! another host never takes the request elsewhere). Hop-by-hop headers are
//! removed both ways ([`rewrite`]). The response body is handed back as it
//! arrives: nothing is buffered.

pub mod guard;
mod pool;
pub mod rename;
pub mod rewrite;
pub mod upgrade;
pub mod usage;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::origin::Origin;
pub use guard::StreamGuard;
pub(crate) use pool::{connect, Pool};
pub use pool::{PooledBody, Replay};

use crate::config::{ClientSettings, ConfigError, ReplicaConfig, StreamTimeouts};
use crate::drain::Drain;
use crate::error::{UpstreamTimeout, UpstreamUnavailable};
use crate::telemetry::Tap;
use crate::BoxError;

/// Attach TLS settings to the `https://` upstreams among `replicas`: the
/// webpki roots, plus the CAs of `ca_file`, read now. With neither an
/// `https://` upstream nor a CA file, nothing is read.
pub(crate) fn secure(
    replicas: &mut [ReplicaConfig],
    ca_file: Option<&std::path::Path>,
) -> Result<(), ConfigError> {
    if !replicas.iter().any(|r| r.origin.is_https()) && ca_file.is_none() {
        return Ok(());
    }
    let client = crate::tls::client_config(ca_file).map_err(ConfigError)?;
    for r in replicas {
        r.origin = r
            .origin
            .clone()
            .with_tls(client.clone())
            .map_err(|e| ConfigError(format!("upstream `{}`: {e}", r.name)))?;
    }
    Ok(())
}

/// One `GET path` to `origin` on a fresh connection (a server that stopped
/// accepting, or restarted, must not look alive through an old keep-alive
/// connection), with the upstream's key if anteroom holds one: its status and
/// at most `max_bytes` of its body, the whole within `timeout`. For probes
/// (health, the backend's endpoints), never for a client's request.
pub(crate) async fn get(
    origin: &Origin,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
) -> Result<(http::StatusCode, Bytes), BoxError> {
    exchange(origin, http::Method::GET, path, None, timeout, max_bytes).await
}

/// [`get`], for any method, with a JSON body if given.
pub(crate) async fn exchange(
    origin: &Origin,
    method: http::Method,
    path: &str,
    json: Option<Bytes>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<(http::StatusCode, Bytes), BoxError> {
    use http_body_util::BodyExt;
    let one = async {
        let stream = connect(origin, timeout).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driving = tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(origin.path_for(path))
            .header(http::header::HOST, origin.host_header().clone());
        if let Some(auth) = origin.authorization() {
            req = req.header(http::header::AUTHORIZATION, auth.clone());
        }
        if json.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let answer = async {
            let body = http_body_util::Full::new(json.unwrap_or_default());
            let resp = sender.send_request(req.body(body)?).await?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), max_bytes)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, BoxError>((status, body))
        }
        .await;
        driving.abort();
        answer
    };
    tokio::time::timeout(timeout, one)
        .await
        .map_err(|_| format!("no answer to {path} within {timeout:?}"))?
}

/// What a client needs to know of the server behind its upstream, as far
/// as it is known yet ([`crate::backend`] learns it and implements this).
pub trait Peer: Send + Sync + std::fmt::Debug {
    /// Whether a stream that did not ask for its usage may be asked for it
    /// and given the stream it asked for ([`usage`]): vLLM.
    fn honours_stream_usage(&self) -> bool;
    /// Whether its streamed and non-streamed answers to one request are
    /// known field by field, so a non-streamed one may be asked for as a
    /// stream and put back together ([`upgrade`]): llama.cpp.
    fn answers_alike_streamed(&self) -> bool;
    /// Its upstream's own `stream_upgrade`, if set.
    fn stream_upgrade(&self) -> Option<bool>;
    /// Whether it may answer a stream with a refusal dressed as one, so a
    /// stream's first event is read ahead ([`guard`]).
    fn may_dress_refusals(&self) -> bool;
    /// Its upstream's `default_max_tokens` and `max_tokens_cap`.
    fn max_tokens(&self) -> crate::types::TokenBounds;
    /// For a request for `model`, when its upstream names it otherwise
    /// for the backend: that name as a JSON string, and the rewriting of
    /// the answer ([`rename`]).
    fn alias(&self, model: &str) -> Option<(Bytes, rename::Rename)>;
}

/// Where a client tells whether a request reached upstream `i` of the
/// table (the passive health of several upstreams; see [`crate::route`]).
pub trait Reports: Send + Sync {
    /// Whether a request reached upstream `i` (any answer, even a 429,
    /// shows it is up).
    fn report(&self, i: usize, reached: bool);
}

/// The upstream origin behind a pool of keep-alive HTTP/1.1 connections.
/// The request path reaches it through the route table's
/// [`Clients`](crate::route::Clients), one per upstream.
///
/// Cloning shares the pool.
#[derive(Debug)]
pub struct Upstream<B>
where
    B: Body + 'static,
{
    pool: Arc<Pool<B>>,
    origin: Origin,
    /// Its name, for the request's record.
    name: Arc<str>,
    response_timeout: Duration,
    stream: StreamTimeouts,
    stream_usage: bool,
    stream_upgrade: bool,
    drain: Option<Drain>,
    /// What its backend is: whether a stream's first event is read ahead
    /// (see [`guard`]), whether its streams' usage is asked for (see
    /// [`usage`]). Without one, read ahead, not asked.
    backend: Option<Arc<dyn Peer>>,
}

// By hand: a derive would require `B: Clone`, which request bodies are not.
impl<B> Clone for Upstream<B>
where
    B: Body + 'static,
{
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            origin: self.origin.clone(),
            name: self.name.clone(),
            response_timeout: self.response_timeout,
            stream: self.stream,
            stream_usage: self.stream_usage,
            stream_upgrade: self.stream_upgrade,
            drain: self.drain.clone(),
            backend: self.backend.clone(),
        }
    }
}

impl<B> Upstream<B>
where
    B: Body<Data = Bytes> + Send + Unpin + Replay + 'static,
    B::Error: Into<BoxError>,
{
    /// A client for `origin`.
    pub fn new(origin: Origin, settings: &ClientSettings) -> Self {
        Self {
            pool: Pool::new(
                origin.clone(),
                settings.connect_timeout,
                settings.pool_idle_timeout,
            ),
            origin,
            name: Arc::from("upstream"),
            response_timeout: settings.response_timeout,
            stream: settings.stream,
            stream_usage: settings.stream_usage,
            stream_upgrade: settings.stream_upgrade,
            drain: None,
            backend: None,
        }
    }

    /// Read streams ahead only as `backend`'s kind needs.
    pub(crate) fn of_backend(mut self, backend: Arc<dyn Peer>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Name it (in records); "upstream" unless named.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Arc::from(name);
        self
    }

    /// End streams still running at `drain`'s deadline with an error event.
    pub(crate) fn with_drain(mut self, drain: Drain) -> Self {
        self.drain = Some(drain);
        self
    }
}

impl<B> Upstream<B>
where
    B: Body<Data = Bytes> + Send + Unpin + Replay + 'static,
    B::Error: Into<BoxError>,
{
    /// Idle pooled connections now.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_len()
    }

    /// Close the idle connections the upstream closed or that idled too
    /// long; how many idle ones are left.
    pub(crate) fn reap(&self) -> usize {
        self.pool.reap()
    }
}

type SendFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<PooledBody<B>>, BoxError>> + Send>>;

impl<B> Upstream<B>
where
    B: Body<Data = Bytes> + Send + Unpin + Replay + 'static,
    B::Error: Into<BoxError>,
{
    /// Send `req`; the response future also times it and guards its body.
    pub(crate) fn send(&self, mut req: Request<B>) -> ResponseFuture<B> {
        rewrite::request(&mut req, &self.origin);
        let tap = req.extensions_mut().remove::<Tap>();
        if let Some(tap) = &tap {
            tap.dispatched_to(&self.name);
            tap.trace_upstream(req.headers_mut());
        }
        // A vLLM stream that did not ask for its usage: ask, and take the
        // answer's usage event out again.
        let strip_usage = self.stream_usage
            && tap
                .as_ref()
                .and_then(Tap::classified)
                .is_some_and(|c| c.may_ask_usage)
            && self
                .backend
                .as_ref()
                .is_some_and(|b| b.honours_stream_usage())
            && rewrite_body(&mut req, usage::ask);
        // A llama.cpp answer that is not streamed: ask for a stream, time
        // it, answer with the JSON put back together. Cheapest test first:
        // a request to another backend, or a stream, never looks for the
        // header.
        let upgrade = tap
            .as_ref()
            .and_then(Tap::classified)
            .and_then(|c| c.upgrade)
            .filter(|_| {
                self.backend
                    .as_ref()
                    .is_some_and(|b| b.answers_alike_streamed())
            })
            .filter(|_| {
                // The request's word, else its upstream's, else the top
                // level's.
                upgrade::asked(req.headers())
                    .or_else(|| self.backend.as_ref().and_then(|b| b.stream_upgrade()))
                    .unwrap_or(self.stream_upgrade)
            })
            .filter(|_| rewrite_body(&mut req, upgrade::ask_stream));
        // A model its upstream names otherwise for the backend: that name
        // up, and the client's back in the answer.
        let rename = self.backend.as_ref().and_then(|b| {
            let model = tap.as_ref().and_then(Tap::classified)?.model.as_deref()?;
            let (name, rename) = b.alias(model)?;
            rewrite_body_with(&mut req, &|body| {
                crate::json_scan::with_value(body, b"model", &name)
            })
            .then(|| Box::new(rename))
        });
        // An upstream's bounds on a generation's length, when it has any.
        let bounded = tap
            .as_ref()
            .and_then(Tap::classified)
            .filter(|c| c.generation)
            .and_then(|c| {
                let to = self.backend.as_ref()?.max_tokens().apply(c.max_tokens)?;
                rewrite_body_with(&mut req, &|b| crate::json_scan::with_max_tokens(b, to))
                    .then_some(Bounded {
                        to,
                        asked: c.max_tokens,
                    })
            });
        // One allocation per request: hyper's send future cannot be named.
        let send: SendFuture<B> = Box::pin(self.pool.clone().send(req));
        let now = Instant::now();
        let due = now + self.response_timeout;
        ResponseFuture {
            send,
            sleep: tokio::time::sleep_until(guard::wake_at(due, self.drain.as_ref(), now)),
            due,
            after: self.response_timeout,
            stream: self.stream,
            drain: self.drain.clone(),
            tap,
            report: None,
            reading: None,
            read_ahead: self.backend.as_ref().is_none_or(|b| b.may_dress_refusals()),
            strip_usage,
            upgrade,
            assembling: None,
            first_piece: None,
            extra: (bounded.is_some() || rename.is_some())
                .then(|| Box::new(After { bounded, rename })),
        }
    }
}

/// A generation sent with `max_tokens` set to `to` by its upstream's
/// bounds (it `asked` for more, or for none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounded {
    to: u64,
    asked: Option<u64>,
}

impl Bounded {
    /// Say so in the answer's headers: `x-anteroom-max-tokens` (what it was
    /// sent with) and `x-anteroom-max-tokens-asked` (what it asked for, or
    /// `none`).
    fn tell(self, headers: &mut http::HeaderMap) {
        headers.insert("x-anteroom-max-tokens", http::HeaderValue::from(self.to));
        headers.insert(
            "x-anteroom-max-tokens-asked",
            match self.asked {
                Some(n) => http::HeaderValue::from(n),
                None => http::HeaderValue::from_static("none"),
            },
        );
    }
}

pin_project! {
    /// Response future of [`Upstream`].
    pub struct ResponseFuture<B>
    where
        B: Body,
        B: 'static,
    {
        send: SendFuture<B>,
        // Until the response headers: `upstream_timeout`, and while the
        // server runs, a look each `DRAIN_CHECK` at whether it drains (a
        // request still waiting at the drain deadline is answered 503
        // `shutting_down`, not cut with its connection); the look costs
        // nothing for a request answered within the second.
        #[pin]
        sleep: Sleep,
        // When `upstream_timeout` runs out.
        due: Instant,
        after: Duration,
        stream: StreamTimeouts,
        drain: Option<Drain>,
        tap: Option<Tap>,
        // Several upstreams: tell the table whether this one answered.
        report: Option<(Arc<dyn Reports>, usize)>,
        // A stream the request asked for, while its first event is read
        // (boxed: only streams carry it).
        reading: Option<Box<Reading<B>>>,
        // Whether the backend may dress a refusal as a stream.
        read_ahead: bool,
        // Whether usage was asked for, its event to be taken out.
        strip_usage: bool,
        // Sent as a stream for an answer of this shape.
        upgrade: Option<crate::types::Shape>,
        // An upgraded answer's stream, being read (boxed: only upgraded
        // requests carry it).
        assembling: Option<Box<upgrade::Assembling<StreamGuard<PooledBody<B>>>>>,
        // A plain answer while its first piece is read (boxed: only an
        // answer whose body lags its headers carries it).
        first_piece: Option<Box<Response<StreamGuard<PooledBody<B>>>>>,
        // What the answer is told or changed by, when the request was
        // (boxed: few requests carry it, and every future's size counts).
        extra: Option<Box<After>>,
    }
}

/// What a request's answer is told or changed by.
#[derive(Debug)]
struct After {
    // Its `max_tokens` was set by the upstream's bounds.
    bounded: Option<Bounded>,
    // Its `model` was renamed for the backend: the answer's is renamed
    // back.
    rename: Option<Box<rename::Rename>>,
}

impl<B: Body + 'static> ResponseFuture<B> {
    /// Tell `to` whether this request reached upstream `i`.
    pub(crate) fn reporting_to(mut self, to: Arc<dyn Reports>, i: usize) -> Self {
        self.report = Some((to, i));
        self
    }
}

/// Why a request stopped waiting for its answer's headers.
enum Cut {
    /// `upstream_timeout` passed.
    Elapsed,
    /// The drain deadline passed.
    Drained,
}

/// A streamed answer, and what has been read of its first event.
type Reading<B> = (Response<StreamGuard<PooledBody<B>>>, bytes::BytesMut);

/// The answer once its first event is read: a refusal turned into what it
/// is (see [`guard`]), anything else with what was read handed on first.
fn after_first_event<B>(reading: Reading<B>) -> Response<StreamGuard<PooledBody<B>>>
where
    B: Body + 'static,
{
    let (resp, read) = reading;
    let read = read.freeze();
    match guard::refusal(&read) {
        Some((status, json)) => {
            let (mut parts, _refused) = resp.into_parts();
            parts.status = status;
            let h = &mut parts.headers;
            h.remove(http::header::CONTENT_LENGTH);
            h.remove(http::header::TRANSFER_ENCODING);
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Response::from_parts(parts, StreamGuard::refused(json))
        }
        None => {
            let mut resp = resp;
            resp.body_mut().read_ahead(read);
            resp
        }
    }
}

/// Replace a buffered request body with `f` of it, its length with the new
/// one's; whether it was (`f` gave one).
fn rewrite_body<B: Replay>(req: &mut Request<B>, f: fn(&[u8]) -> Option<Vec<u8>>) -> bool {
    rewrite_body_with(req, &f)
}

/// [`rewrite_body`] with a closure.
fn rewrite_body_with<B: Replay>(
    req: &mut Request<B>,
    f: &dyn Fn(&[u8]) -> Option<Vec<u8>>,
) -> bool {
    match req.body_mut().rewrite(f) {
        Some(len) => {
            req.headers_mut()
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
            true
        }
        None => false,
    }
}

/// An upgraded answer, put back together: its head and JSON as a response.
fn put_together<B>(
    put: Result<(http::response::Parts, Bytes), BoxError>,
) -> Result<Response<StreamGuard<PooledBody<B>>>, BoxError>
where
    B: Body + 'static,
{
    put.map(|(parts, json)| Response::from_parts(parts, StreamGuard::refused(json)))
}

/// What a plain answer whose body failed before a byte becomes: a 504 for
/// a body that never came, a 502 for one that broke off (never sent
/// again: the upstream had the request).
fn first_piece_failed(e: BoxError) -> BoxError {
    if e.is::<UpstreamTimeout>() {
        return e;
    }
    UpstreamUnavailable::cut_short(e).into()
}

/// Why a request got no response from the upstream, as the client and the
/// back-off see it:
/// - the client's own request body failed (a malformed chunk, a client
///   that left mid-body): 400 `invalid_body`, the upstream not blamed;
/// - the upstream answered with something that is not HTTP: 502, never
///   sent again (it had the request);
/// - else (refused, reset, closed with no answer): 502, which back-off may
///   send again.
fn failure(e: BoxError) -> BoxError {
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        if h.is_user() {
            if let Some(t) = crate::error::cause::<crate::deadline::BodyTimeout>(&*e) {
                return crate::deadline::BodyTimeout(t.0).into();
            }
            return crate::error::BadRequest::new(
                "invalid_body",
                format!(
                    "could not read the request body: {}",
                    crate::error::chain(&*e)
                ),
            )
            .into();
        }
        if h.is_parse() {
            return UpstreamUnavailable::malformed(e).into();
        }
    }
    UpstreamUnavailable::new(e).into()
}

impl<B> std::fmt::Debug for ResponseFuture<B>
where
    B: Body + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B> Future for ResponseFuture<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<StreamGuard<PooledBody<B>>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = ready!(self.as_mut().poll_answer(cx));
        // Renamed once the answer is what goes on: its first piece, first
        // event or put-together JSON was read as the backend wrote it.
        let rename = self.project().extra.as_mut().and_then(|a| a.rename.take());
        Poll::Ready(match rename {
            Some(rename) => answer.map(|mut resp| {
                resp.headers_mut().remove(http::header::CONTENT_LENGTH);
                resp.body_mut().renaming(rename);
                resp
            }),
            None => answer,
        })
    }
}

impl<B> ResponseFuture<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// The answer as it will go on, but for the rename.
    fn poll_answer(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<StreamGuard<PooledBody<B>>>, BoxError>> {
        let mut this = self.project();
        if let Some(resp) = this.first_piece.as_mut() {
            let read = ready!(resp.body_mut().poll_first_piece(cx));
            let resp = this.first_piece.take().expect("being read");
            return Poll::Ready(read.map(|()| *resp).map_err(first_piece_failed));
        }
        if let Some(asm) = this.assembling.as_mut() {
            let put = ready!(asm.poll(cx));
            this.assembling.take();
            return Poll::Ready(put_together(put));
        }
        if let Some(reading) = this.reading.as_mut() {
            let (resp, read) = &mut **reading;
            ready!(resp.body_mut().poll_first_event(read, cx));
            let reading = this.reading.take().expect("being read");
            return Poll::Ready(Ok(after_first_event(*reading)));
        }
        let result = match this.send.as_mut().poll(cx) {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => loop {
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let now = Instant::now();
                let drain_at = this.drain.as_ref().and_then(Drain::deadline);
                if drain_at.is_some_and(|at| now >= at) {
                    break Err(Cut::Drained);
                }
                if now >= *this.due {
                    break Err(Cut::Elapsed);
                }
                let next = guard::wake_at(*this.due, this.drain.as_ref(), now);
                this.sleep.as_mut().reset(next);
            },
        };
        let tap = this.tap.take();
        // Only an answer has headers: a timeout, a drain cut or a broken
        // connection leaves the record's `upstream_headers_ms` null.
        if let (Some(tap), Ok(Ok(_))) = (&tap, &result) {
            tap.headers_arrived();
        }
        let result = result.map(|sent| sent.map_err(failure));
        if let Some(tap) = tap.as_ref().filter(|t| t.trace().is_some()) {
            match &result {
                Ok(Ok(resp)) => tap.attempt_ended(Some(resp.status().as_u16()), None),
                Ok(Err(e)) => tap.attempt_ended(None, Some(crate::error::describe(&**e).code)),
                Err(Cut::Elapsed) => tap.attempt_ended(None, Some("upstream_timeout")),
                Err(Cut::Drained) => tap.attempt_ended(None, Some("drained")),
            }
        }
        if let Some((router, i)) = this.report.take() {
            // Any answer (even a 429) shows the upstream is up; a request
            // whose own body failed says nothing of it.
            match &result {
                Ok(Err(e))
                    if crate::error::cause::<crate::error::BadRequest>(&**e).is_some()
                        || crate::error::cause::<crate::deadline::BodyTimeout>(&**e).is_some() => {}
                r => router.report(i, matches!(r, Ok(Ok(_)))),
            }
        }
        Poll::Ready(match result {
            Ok(Ok(mut resp)) => {
                rewrite::response(&mut resp);
                if let Some(b) = this.extra.as_ref().and_then(|a| a.bounded) {
                    b.tell(resp.headers_mut());
                }
                // Media types are case-insensitive (RFC 9110 §8.3.1):
                // `Text/Event-Stream` is a stream, and is guarded as one.
                let sse = crate::telemetry::Framing::of(
                    resp.headers()
                        .get(http::header::CONTENT_TYPE)
                        .map(|v| v.as_bytes()),
                ) == crate::telemetry::Framing::Sse;
                let stream = *this.stream;
                let drain = this.drain.take();
                // The first event of a stream an admitted request asked for
                // is read before the answer goes on: it may be a refusal.
                let read_first = sse
                    && *this.read_ahead
                    && tap
                        .as_ref()
                        .and_then(Tap::classified)
                        .is_some_and(|c| c.stream);
                let strip_usage = *this.strip_usage;
                // An upgraded answer's tokens are timed into its tap.
                let upgrade_tap = this.upgrade.and(tap.clone());
                let mut resp = resp.map(|body| {
                    if sse {
                        let guard = StreamGuard::new(body, stream, tap, drain);
                        if strip_usage {
                            guard.stripping_usage()
                        } else {
                            guard
                        }
                    } else {
                        StreamGuard::passthrough(body, stream, tap)
                    }
                });
                if let (true, Some(shape)) =
                    (sse && resp.status() == http::StatusCode::OK, *this.upgrade)
                {
                    if let Some(tap) = &upgrade_tap {
                        tap.upgraded();
                    }
                    let mut asm = Box::new(upgrade::Assembling::new(resp, shape, upgrade_tap));
                    let put = match asm.poll(cx) {
                        Poll::Pending => {
                            *this.assembling = Some(asm);
                            return Poll::Pending;
                        }
                        Poll::Ready(put) => put,
                    };
                    return Poll::Ready(put_together(put));
                }
                if read_first {
                    let mut reading = Box::new((resp, bytes::BytesMut::new()));
                    let (resp, read) = &mut *reading;
                    if resp.body_mut().poll_first_event(read, cx).is_pending() {
                        *this.reading = Some(reading);
                        return Poll::Pending;
                    }
                    return Poll::Ready(Ok(after_first_event(*reading)));
                }
                if !sse && !resp.body().is_end_stream() {
                    match resp.body_mut().poll_first_piece(cx) {
                        Poll::Pending => {
                            *this.first_piece = Some(Box::new(resp));
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(first_piece_failed(e))),
                        Poll::Ready(Ok(())) => {}
                    }
                }
                Ok(resp)
            }
            Ok(Err(e)) => Err(e),
            Err(Cut::Elapsed) => Err(UpstreamTimeout::new(*this.after).into()),
            Err(Cut::Drained) => {
                tracing::info!("request still waiting for its answer at the drain deadline: 503");
                Err(crate::types::Overloaded::new(
                    crate::types::Reason::PastDrain,
                    Duration::from_secs(1),
                )
                .into())
            }
        })
    }
}
