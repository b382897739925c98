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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tower::{Layer, Service, ServiceExt};

use crate::admission::{Overloaded, Reason, Scheduler};
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

/// Health of one upstream (several upstreams only).
#[derive(Debug, Default)]
struct Health {
    ejected: AtomicBool,
    failures: AtomicU32,
}

/// The upstreams, their schedulers and their health: shared by the route
/// layer, admission (to requeue), back-off (to resend elsewhere), the
/// upstream client (which reports failures) and the health checks.
#[derive(Debug)]
pub struct Router {
    /// Their settings; a reload may replace weights and models (the list's
    /// length and order never change while serving).
    replicas: arc_swap::ArcSwap<Vec<ReplicaConfig>>,
    /// How many (fixed while serving).
    count: usize,
    schedulers: Vec<Arc<Scheduler>>,
    health: Vec<Health>,
    /// Consecutive failures that take an upstream out of service.
    eject_after: u32,
    /// When to come back if no upstream is healthy.
    retry_after: Duration,
    next: AtomicUsize,
}

impl Router {
    /// Route among `replicas`, whose schedulers are `schedulers` (same
    /// order). An upstream failing `eject_after` times in a row (requests or
    /// probes) is out of service until a probe succeeds.
    pub fn new(
        replicas: Vec<ReplicaConfig>,
        schedulers: Vec<Arc<Scheduler>>,
        eject_after: u32,
        retry_after: Duration,
    ) -> Arc<Self> {
        assert_eq!(replicas.len(), schedulers.len());
        Arc::new(Self {
            health: replicas.iter().map(|_| Health::default()).collect(),
            count: replicas.len(),
            replicas: arc_swap::ArcSwap::from_pointee(replicas),
            schedulers,
            eject_after: eject_after.max(1),
            retry_after,
            next: AtomicUsize::new(0),
        })
    }

    /// How many upstreams.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none (never: validation needs one).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Take new weights and models (a config reload). The same upstreams,
    /// in the same order, are required; others are ignored.
    pub fn update_replicas(&self, replicas: Vec<ReplicaConfig>) {
        if replicas.len() == self.count {
            self.replicas.store(Arc::new(replicas));
        }
    }

    /// Upstream `i`'s name.
    fn name(&self, i: usize) -> String {
        self.replicas
            .load()
            .get(i)
            .map(|r| r.name.clone())
            .unwrap_or_default()
    }

    /// Upstream `i`'s scheduler.
    pub fn scheduler(&self, i: usize) -> &Arc<Scheduler> {
        &self.schedulers[i.min(self.schedulers.len() - 1)]
    }

    /// Is upstream `i` in service?
    pub fn is_healthy(&self, i: usize) -> bool {
        self.health
            .get(i)
            .is_none_or(|h| !h.ejected.load(Ordering::Acquire))
    }

    /// A request to upstream `i` (or a probe) got an answer (`true`) or
    /// could not reach it (`false`). With a single upstream nothing is
    /// ejected: there is nowhere else to go.
    pub fn report(&self, i: usize, ok: bool) {
        if self.count < 2 {
            return;
        }
        let Some(h) = self.health.get(i) else { return };
        if ok {
            h.failures.store(0, Ordering::Release);
            return;
        }
        let n = h.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.eject_after && !h.ejected.swap(true, Ordering::AcqRel) {
            let moved = self.schedulers[i].reroute_waiting();
            tracing::warn!(
                upstream = %self.name(i),
                failures = n,
                requeued = moved,
                "upstream taken out of service"
            );
        }
    }

    /// A health probe of upstream `i` succeeded: back in service.
    pub fn readmit(&self, i: usize) {
        let Some(h) = self.health.get(i) else { return };
        h.failures.store(0, Ordering::Release);
        if h.ejected.swap(false, Ordering::AcqRel) {
            tracing::info!(upstream = %self.name(i), "upstream back in service");
        }
    }

    /// The upstream for a request for `model`: among those that serve it
    /// and are in service (not `exclude`), the least loaded for its weight.
    pub fn pick(&self, model: Option<&str>, exclude: Option<usize>) -> Result<usize, BoxError> {
        // Upstreams that name the model come first; `"*"` ones take the rest,
        // and what the named ones cannot take while out of service.
        let named = |r: &ReplicaConfig| match (&r.models, model) {
            (Models::List(l), Some(m)) => l.iter().any(|x| x == m),
            _ => false,
        };
        let any = |r: &ReplicaConfig| matches!(r.models, Models::Any) || model.is_none();
        let mut served = false;
        for tier in [&named as &dyn Fn(&ReplicaConfig) -> bool, &any] {
            let (best, seen) = self.least_loaded(tier, exclude);
            served |= seen;
            if let Some(i) = best {
                return Ok(i);
            }
        }
        if served {
            Err(Overloaded::new(Reason::Rerouted, self.retry_after).into())
        } else {
            Err(ModelNotFound::new(model.unwrap_or_default().to_owned(), self.served()).into())
        }
    }

    /// The in-service upstream among those `serves` accepts with the least
    /// outstanding work per weight (ties: round-robin), and whether any
    /// upstream serves at all.
    fn least_loaded(
        &self,
        serves: &dyn Fn(&ReplicaConfig) -> bool,
        exclude: Option<usize>,
    ) -> (Option<usize>, bool) {
        let replicas = self.replicas.load();
        let n = replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(u64, usize)> = None;
        let mut served = false;
        for k in 0..n {
            let i = (start + k) % n;
            let r = &replicas[i];
            if !serves(r) {
                continue;
            }
            served = true;
            if Some(i) == exclude || !self.is_healthy(i) {
                continue;
            }
            let (waiting, running) = self.schedulers[i].snapshot_counts();
            // Outstanding work per unit of weight, in thousandths.
            let load = (waiting + running) as u64 * 1000 / u64::from(r.weight.max(1));
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, i));
            }
        }
        (best.map(|(_, i)| i), served)
    }

    fn served(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for r in self.replicas.load().iter() {
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

/// Builds [`RouteService`]s.
#[derive(Clone, Debug)]
pub struct RouteLayer {
    shared: Arc<Router>,
}

impl RouteLayer {
    /// Route by `router`.
    pub fn new(router: Arc<Router>) -> Self {
        Self { shared: router }
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
    shared: Arc<Router>,
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
        if self.shared.count == 1 {
            // One upstream: nothing to decide, everything passes as it is.
            return ResponseFuture::Inner {
                fut: self.inner.call(req),
            };
        }
        if req.extensions().get::<Admit>().is_some() {
            let model = req.extensions().get::<Model>().map(|m| m.as_str());
            match self.shared.pick(model, None) {
                Ok(i) => {
                    req.extensions_mut().insert(Route(i));
                }
                Err(e) => return ResponseFuture::Failed { err: Some(e) },
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
    shared: Arc<Router>,
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
    let replicas = shared.replicas.load_full();
    for (i, replica) in replicas.iter().enumerate() {
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

/// One probe: GET `path` on a fresh connection (a server that stopped
/// accepting, or restarted, must not look alive through an old keep-alive
/// connection), with the upstream's key if anteroom holds one. True on 200.
async fn probe(origin: &crate::upstream::Origin, path: &str, timeout: Duration) -> bool {
    let Ok(stream) = crate::upstream::connect(origin, timeout).await else {
        return false;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return false;
    };
    let driving = tokio::spawn(conn);
    let mut req = http::Request::get(origin.path_for(path))
        .header(http::header::HOST, origin.host_header().clone());
    if let Some(auth) = origin.authorization() {
        req = req.header(http::header::AUTHORIZATION, auth.clone());
    }
    let ok = match req.body(http_body_util::Empty::<Bytes>::new()) {
        Ok(req) => match sender.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status() == StatusCode::OK;
                let _ = resp.into_body().collect().await;
                ok
            }
            Err(_) => false,
        },
        Err(_) => false,
    };
    driving.abort();
    ok
}

/// Probe upstream `i` every `health.interval` until dropped: a 200 on
/// `health.path` puts it (back) in service, anything else counts as a
/// failure towards ejecting it.
pub async fn health_checks(
    router: Arc<Router>,
    i: usize,
    origin: crate::upstream::Origin,
    health: crate::config::HealthConfig,
) {
    let timeout = health.interval.min(Duration::from_secs(5));
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = tokio::time::timeout(timeout, probe(&origin, &health.path, timeout))
            .await
            .unwrap_or(false);
        if ok {
            router.readmit(i);
        } else {
            router.report(i, false);
        }
    }
}
