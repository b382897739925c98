//! Step 0c of the request path, with several `[[upstream]]`s: which one a
//! request goes to.
//!
//! An admitted request goes to an upstream that serves the body's `model`:
//! one whose `models` list names it, else one whose `models` is `"*"`.
//! Among those replicas it goes
//! to the one with the least outstanding work for its weight: (waiting +
//! running) / weight, ties broken round-robin. The choice is a [`Route`] in
//! the request's extensions; admission queues the request on that
//! upstream's own scheduler (its own `max_concurrency`), and the upstream
//! client sends it there. A model nobody serves is a 404 (`model_not_found`)
//! that lists what is served.
//!
//! `GET /v1/models` is answered with the union of every upstream's list
//! (each asked in turn; a list in the config filters what that upstream
//! reports; duplicates are dropped). Other requests that bypass admission
//! go to the first upstream.
//!
//! With a single upstream the layer passes everything straight through.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tower::{Layer, Service, ServiceExt};

use crate::admission::Scheduler;
use crate::classify::{Admit, ClassifiedBody, Model};
use crate::config::{Models, ReplicaConfig};
use crate::error::ModelNotFound;
use crate::BoxError;

/// Which upstream a request goes to: an index into the configured list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route(pub usize);

/// The index a request is routed to (0 when it was not routed).
pub fn route_of<B>(req: &Request<B>) -> usize {
    req.extensions().get::<Route>().map_or(0, |r| r.0)
}

#[derive(Debug)]
struct Shared {
    replicas: Vec<ReplicaConfig>,
    schedulers: Vec<Arc<Scheduler>>,
    next: AtomicUsize,
}

/// Builds [`RouteService`]s.
#[derive(Clone, Debug)]
pub struct RouteLayer {
    shared: Arc<Shared>,
}

impl RouteLayer {
    /// Route among `replicas`, whose schedulers are `schedulers` (same order).
    pub fn new(replicas: Vec<ReplicaConfig>, schedulers: Vec<Arc<Scheduler>>) -> Self {
        assert_eq!(replicas.len(), schedulers.len());
        Self {
            shared: Arc::new(Shared {
                replicas,
                schedulers,
                next: AtomicUsize::new(0),
            }),
        }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RouteService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Routes requests among upstreams: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct RouteService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl Shared {
    /// The replica for `model`, or what is served instead.
    fn pick(&self, model: Option<&str>) -> Result<usize, ModelNotFound> {
        // Upstreams that name the model come first; `"*"` ones take the
        // rest.
        let named = |r: &ReplicaConfig| match (&r.models, model) {
            (Models::List(l), Some(m)) => l.iter().any(|x| x == m),
            _ => false,
        };
        let any_named = self.replicas.iter().any(named);
        let serves = |r: &ReplicaConfig| {
            if any_named {
                named(r)
            } else {
                matches!(r.models, Models::Any) || model.is_none()
            }
        };
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(u64, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let r = &self.replicas[i];
            if !serves(r) {
                continue;
            }
            let (waiting, running) = self.schedulers[i].snapshot_counts();
            // Outstanding work per unit of weight, in thousandths.
            let load = (waiting + running) as u64 * 1000 / u64::from(r.weight.max(1));
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, i));
            }
        }
        best.map(|(_, i)| i)
            .ok_or_else(|| ModelNotFound::new(model.unwrap_or_default().to_owned(), self.served()))
    }

    fn served(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for r in &self.replicas {
            match &r.models {
                Models::Any => out.push(format!("any model on `{}`", r.name)),
                Models::List(l) => {
                    for m in l {
                        if !out.contains(m) {
                            out.push(m.clone());
                        }
                    }
                }
            }
        }
        out.join(", ")
    }
}

type ModelsFuture = Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>;

impl<S, B, ResB> Service<Request<ClassifiedBody<B>>> for RouteService<S>
where
    S: Service<Request<ClassifiedBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Either<Full<Bytes>, ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ClassifiedBody<B>>) -> Self::Future {
        if self.shared.replicas.len() == 1 {
            // One upstream: nothing to decide, everything passes as it is.
            return ResponseFuture::Inner {
                fut: self.inner.call(req),
            };
        }
        if req.extensions().get::<Admit>().is_some() {
            let model = req.extensions().get::<Model>().map(|m| m.as_str());
            match self.shared.pick(model) {
                Ok(i) => {
                    req.extensions_mut().insert(Route(i));
                }
                Err(e) => {
                    return ResponseFuture::Failed {
                        err: Some(e.into()),
                    }
                }
            }
        } else if req.method() == Method::GET && req.uri().path() == "/v1/models" {
            return ResponseFuture::Models {
                fut: Box::pin(models_union(self.inner.clone(), self.shared.clone(), req)),
            };
        }
        ResponseFuture::Inner {
            fut: self.inner.call(req),
        }
    }
}

/// Ask every upstream for its models and merge the lists.
async fn models_union<S, B, ResB>(
    svc: S,
    shared: Arc<Shared>,
    req: Request<ClassifiedBody<B>>,
) -> Result<Bytes, BoxError>
where
    S: Service<Request<ClassifiedBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (parts, _body) = req.into_parts();
    let mut data: Vec<serde_json::Value> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for (i, replica) in shared.replicas.iter().enumerate() {
        let mut ask = Request::builder()
            .method(Method::GET)
            .uri(parts.uri.clone())
            .body(Either::Left(Full::new(Bytes::new())))?;
        *ask.headers_mut() = parts.headers.clone();
        ask.extensions_mut().insert(Route(i));
        let one = svc.clone();
        let answer = async move {
            let resp = one.oneshot(ask).await.map_err(Into::into)?;
            if resp.status() != StatusCode::OK {
                return Err(format!("status {}", resp.status()).into());
            }
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(Into::into)?
                .to_bytes();
            Ok::<_, BoxError>(serde_json::from_slice::<serde_json::Value>(&bytes)?)
        }
        .await;
        let list = match answer {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(upstream = %replica.name, error = %e, "model list unavailable");
                continue;
            }
        };
        for m in list["data"].as_array().into_iter().flatten() {
            let Some(id) = m["id"].as_str() else { continue };
            if replica.models.serves(id) && !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
                data.push(m.clone());
            }
        }
    }
    Ok(Bytes::from(serde_json::to_vec(
        &serde_json::json!({"object": "list", "data": data}),
    )?))
}

pin_project_lite::pin_project! {
    /// Response future of [`RouteService`].
    #[project = Proj]
    #[allow(missing_docs)]
    pub enum ResponseFuture<F> {
        Inner { #[pin] fut: F },
        Models { fut: ModelsFuture },
        Failed { err: Option<BoxError> },
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Either<Full<Bytes>, ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Inner { fut } => fut
                .poll(cx)
                .map(|r| r.map(|resp| resp.map(Either::Right)).map_err(Into::into)),
            Proj::Models { fut } => fut.as_mut().poll(cx).map(|r| {
                r.map(|body| {
                    let mut resp = Response::new(Either::Left(Full::new(body)));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    resp
                })
            }),
            Proj::Failed { err } => Poll::Ready(Err(err.take().expect("polled after completion"))),
        }
    }
}
