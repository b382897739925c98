//! The admin listener, on a port of its own so no upstream path is shadowed:
//! `GET /healthz`, `GET /status` and `GET /metrics` (Prometheus).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::admission::Scheduler;
use crate::telemetry::Recorder;
use crate::Body;

/// Serve the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, scheduler: Arc<Scheduler>, recorder: Arc<Recorder>) {
    crate::server::serve_fn(listener, move |req| {
        let scheduler = scheduler.clone();
        let recorder = recorder.clone();
        async move { Ok::<_, Infallible>(handle(&scheduler, &recorder, &req)) }
    })
    .await
}

fn handle(scheduler: &Scheduler, recorder: &Recorder, req: &Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/status") => {
            let body = serde_json::to_string_pretty(&scheduler.snapshot())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            text(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            recorder.metrics.encode(&scheduler.snapshot()),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the admin listener serves GET /healthz, GET /status and GET /metrics\n"
                .into(),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static headers are valid")
}
