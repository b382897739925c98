//! The telemetry layer: puts a tap in each request and a timed body on
//! each response.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use http::{HeaderValue, Request, Response, Uri};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::capture::Capture;
use super::headers::CLIENT_RETRY;
use super::{Framing, Observer, Outcome, Recorder, Tap, TimedBody};
use crate::error;
use crate::types::{ClientAddr, Overloaded, REQUEST_ID};
use crate::BoxError;

/// Builds [`Telemetry`] services.
#[derive(Clone, Debug)]
pub struct TelemetryLayer {
    recorder: Arc<Recorder>,
    rate_headers: bool,
}

impl TelemetryLayer {
    /// Record into `recorder`.
    pub fn new(recorder: Arc<Recorder>) -> Self {
        Self {
            recorder,
            rate_headers: false,
        }
    }

    /// Also answer with OpenAI's `x-ratelimit-*` headers, from what the
    /// steps below note in the tap (see [`crate::types::ratelimit`]).
    pub fn rate_limit_headers(mut self, on: bool) -> Self {
        self.rate_headers = on;
        self
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Telemetry {
            inner,
            recorder: self.recorder.clone(),
            rate_headers: self.rate_headers,
        }
    }
}

/// Times every request and keeps its record: see the [module docs](crate::telemetry).
#[derive(Clone, Debug)]
pub struct Telemetry<S> {
    inner: S,
    recorder: Arc<Recorder>,
    rate_headers: bool,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Telemetry<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
{
    type Response = Response<TimedBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        if req
            .headers()
            .get(CLIENT_RETRY)
            .is_some_and(|v| v.as_bytes() != b"0")
        {
            self.recorder.metrics.client_retries.inc();
        }
        let now = Instant::now();
        // Traced: the request's ids, and whether its spans are kept (then
        // its path and id are, as for the log).
        let trace = self
            .recorder
            .tracer
            .as_ref()
            .map(|t| t.begin(req.headers()));
        let keep = self.recorder.log.is_some() || trace.as_ref().is_some_and(|t| t.sampled);
        let tap = Tap::new(now, self.rate_headers, trace);
        let capture = Capture {
            recorder: self.recorder.clone(),
            tap: tap.clone(),
            received: SystemTime::now(),
            method: req.method().clone(),
            // Only the log reads these; a copy, so that a waiting request's
            // record does not hold its connection's read buffer (see
            // `admission::Detach`).
            uri: match keep {
                true => Uri::try_from(req.uri().path()).unwrap_or_default(),
                false => Uri::default(),
            },
            client: req.extensions().get::<ClientAddr>().map(|c| c.addr().ip()),
            request_id: match keep {
                true => req
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()),
                false => None,
            },
            status: 499,
            error: None,
            rejected: false,
            observer: Observer::new(Framing::Opaque),
            first_byte: None,
            first_token: None,
            last_token: None,
            gaps_us: Vec::new(),
            finished: false,
        };
        req.extensions_mut().insert(tap);
        // A panic below (in a call or a poll) is a bug, but it must not cut
        // the connection with no answer and no record: it becomes a 500
        // here, recorded as one. Not tower-http's CatchPanic: that boxes
        // every response body a second time, does not see panics while the
        // body is read, and would sit outside the record (or need one more
        // layer). catch_unwind costs nothing until something panics.
        let inner = match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(fut) => Called::Running { fut },
            Err(payload) => Called::Panicked {
                error: Some(error::Panicked::new(&*payload)),
            },
        };
        ResponseFuture {
            inner,
            capture: Some(capture),
        }
    }
}

pin_project! {
    #[project = CalledProj]
    #[derive(Debug)]
    enum Called<F> {
        Running { #[pin] fut: F },
        Panicked { error: Option<error::Panicked> },
    }
}

pin_project! {
    /// Response future of [`Telemetry`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Called<F>,
        capture: Option<Capture>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body,
{
    type Output = Result<Response<TimedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result: Result<Response<B>, BoxError> = match this.inner.project() {
            CalledProj::Running { fut } => {
                match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(r)) => r.map_err(Into::into),
                    // Never polled again: the caller has its answer.
                    Err(payload) => Err(error::Panicked::new(&*payload).into()),
                }
            }
            CalledProj::Panicked { error } => {
                Err(error.take().expect("polled after completion").into())
            }
        };
        let mut capture = this.capture.take().expect("polled after completion");
        match result {
            Ok(mut resp) => {
                capture.status = resp.status().as_u16();
                let ct = resp.headers().get(http::header::CONTENT_TYPE);
                capture.observer = Observer::new(Framing::of(ct.map(HeaderValue::as_bytes)));
                capture.timing_headers(resp.headers_mut());
                capture.tap.rate_headers(resp.headers_mut(), None);
                Poll::Ready(Ok(resp.map(|inner| TimedBody::new(inner, capture))))
            }
            Err(e) => {
                let d = error::describe(&*e);
                capture.status = d.status.as_u16();
                capture.error = Some(d.code);
                // Turned away at the door; not a request that ran and was
                // cut at the drain deadline (an error, its queue time its
                // own).
                capture.rejected = error::cause::<Overloaded>(&*e)
                    .is_some_and(|o| o.reason() != crate::types::Reason::PastDrain)
                    || error::cause::<error::RateLimited>(&*e).is_some();
                capture.finish(Outcome::Ok);
                let e = match capture.tap.wants_rate_headers() {
                    true => {
                        let mut headers = http::HeaderMap::new();
                        let refused = error::cause::<error::RateLimited>(&*e);
                        capture.tap.rate_headers(&mut headers, refused);
                        error::Headed::wrap(e, headers)
                    }
                    false => e,
                };
                Poll::Ready(Err(e))
            }
        }
    }
}
