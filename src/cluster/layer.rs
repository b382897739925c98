//! Between admission and back-off, with `[cluster]` set: an admitted
//! request that has its replica's slot waits for a lease from the cluster
//! before it is sent, and gives it back at the end of its response body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::{Layer, Service};

use super::{Cluster, Lease};
use crate::route::Router;
use crate::types::{Admit, Overloaded, Reason};
use crate::BoxError;

/// Builds [`Clustered`] services.
#[derive(Clone, Debug)]
pub struct ClusterLayer {
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    queue_timeout: Duration,
}

impl ClusterLayer {
    /// Lease slots from `cluster` for the upstreams of `router`; a request
    /// waits at most `queue_timeout` for one (then 429 `queue_timeout`).
    pub fn new(cluster: Arc<Cluster>, router: Arc<Router>, queue_timeout: Duration) -> Self {
        Self {
            cluster,
            router,
            queue_timeout,
        }
    }
}

impl<S> Layer<S> for ClusterLayer {
    type Service = Clustered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Clustered {
            inner,
            layer: self.clone(),
        }
    }
}

/// Shared slots: see the [module docs](super).
#[derive(Clone, Debug)]
pub struct Clustered<S> {
    inner: S,
    layer: ClusterLayer,
}

type Leasing = Pin<Box<dyn Future<Output = Result<Lease, BoxError>> + Send>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for Clustered<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<LeaseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<ReqB>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service's readiness is driven by the Oneshot, once
        // the request has its lease.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let svc = self.inner.clone();
        let Some(priority) = req.extensions().get::<Admit>().map(|a| a.priority) else {
            // Not admitted: not counted against the slots.
            return ResponseFuture {
                state: State::Calling {
                    fut: Oneshot::new(svc, req),
                    lease: None,
                },
            };
        };
        let table = self.layer.router.table();
        let row = table.row(crate::types::route_of(&req));
        let (upstream, limit) = (row.config.name.clone(), row.scheduler.max_concurrency());
        let scheduler = row.scheduler.clone();
        let tenant = req.extensions().get::<crate::types::Tenant>();
        let tap = req.extensions().get::<crate::telemetry::Tap>();
        let tokens = tenant.and_then(|t| t.tokens.clone()).and_then(|budget| {
            let tap = tap?;
            let charged = tap.token_charge()?.charged;
            Some((budget, charged, tap.clone()))
        });
        let refused = tenant.map(|t| t.rate_limited.clone());
        let rates = tenant
            .filter(|t| t.requests_per_minute.is_some() || tokens.is_some())
            .map(|t| super::Rates {
                tenant: t.name.clone(),
                requests_per_minute: t.requests_per_minute.unwrap_or(0),
                tokens,
            });
        let cluster = self.layer.cluster.clone();
        let wait = self.layer.queue_timeout;
        let leasing: Leasing = Box::pin(async move {
            let leased =
                match tokio::time::timeout(wait, cluster.lease(upstream, limit, priority, rates))
                    .await
                {
                    Ok(lease) => lease,
                    // Advice as for one next in line here: the other
                    // replicas' turns reach it as the cluster's drain rate.
                    Err(_) => {
                        Err(Overloaded::new(Reason::QueueTimeout, scheduler.advise(1)).into())
                    }
                };
            if let (Err(e), Some(n)) = (&leased, refused) {
                if e.is::<crate::error::RateLimited>() {
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            leased
        });
        ResponseFuture {
            state: State::Leasing {
                leasing,
                pending: Some((svc, req)),
            },
        }
    }
}

pin_project! {
    /// Response future of [`Clustered`].
    pub struct ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, R>
    where
        S: Service<R>,
    {
        Leasing {
            leasing: Leasing,
            pending: Option<(S, R)>,
        },
        Calling {
            #[pin]
            fut: Oneshot<S, R>,
            lease: Option<Lease>,
        },
    }
}

impl<S, R> std::fmt::Debug for ResponseFuture<S, R>
where
    S: Service<R>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, R, B> Future for ResponseFuture<S, R>
where
    S: Service<R, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<LeaseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Leasing { leasing, pending } => {
                    let lease = ready!(leasing.as_mut().poll(cx))?;
                    let (svc, req) = pending.take().expect("polled after completion");
                    this.state.set(State::Calling {
                        fut: Oneshot::new(svc, req),
                        lease: Some(lease),
                    });
                }
                StateProj::Calling { fut, lease } => {
                    // An error drops the lease with this future.
                    let resp = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let lease = lease.take();
                    return Poll::Ready(Ok(resp.map(|inner| LeaseBody { inner, lease })));
                }
            }
        }
    }
}

pin_project! {
    /// A response body that holds its request's lease until its end.
    #[derive(Debug)]
    pub struct LeaseBody<B> {
        #[pin]
        inner: B,
        lease: Option<Lease>,
    }
}

impl<B> Body for LeaseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            // The end, or a failure: the slot goes back at once.
            this.lease.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
