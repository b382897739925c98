//! The route layer: puts a request's [`Route`] in its extensions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower::{Layer, Service};

use super::models::models_union;
use super::Router;
use crate::classify::ClassifiedBody;
use crate::types::{Admit, Model, Route};
use crate::BoxError;

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

/// AdmitRules requests among upstreams: see the [module docs](crate::route).
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
        let table = self.shared.table();
        // One upstream that takes any model as it is named: its list is
        // the backend's, as it is.
        if table.active_len() == 1
            && !(req.method() == Method::GET
                && req.uri().path() == "/v1/models"
                && !table.row(table.first()).config.models.is_plain_any())
        {
            // One upstream: nothing to decide, everything passes as it is
            // (named only when a reload made it other than the first).
            let only = table.first();
            if only != 0 {
                req.extensions_mut().insert(Route(only));
            }
            drop(table);
            return ResponseFuture::Inner {
                fut: self.inner.call(req),
            };
        }
        let first = table.first();
        drop(table);
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
        } else if first != 0 {
            // Not admitted: to the first upstream in service.
            req.extensions_mut().insert(Route(first));
        }
        ResponseFuture::Inner {
            fut: self.inner.call(req),
        }
    }
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
