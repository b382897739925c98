//! The floor under anteroom's CPU cost: a bare hyper reverse proxy with
//! nothing of anteroom's (no admission, telemetry, routing or retries),
//! built the same way: `workers` single-threaded runtimes, each with its own
//! `SO_REUSEPORT` listener, hyper's HTTP/1.1 server, and hyper-util's pooled
//! client to the upstream. The overhead bench runs it beside anteroom and
//! nginx, so what anteroom's own steps cost can be told from what hyper
//! and tokio cost.
//!
//! `cargo run --release --example bare_proxy -- LISTEN UPSTREAM [WORKERS]`

use std::convert::Infallible;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[path = "support/workers.rs"]
mod workers;

type Upstream = Client<HttpConnector, Incoming>;

async fn forward(
    client: Upstream,
    upstream: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<http_body_util::Either<Incoming, String>>, Infallible> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("http://{upstream}{path}").parse() {
        Ok(u) => u,
        Err(e) => return Ok(Response::new(http_body_util::Either::Right(e.to_string()))),
    };
    *req.uri_mut() = uri;
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(http_body_util::Either::Left),
        Err(e) => {
            let mut r = Response::new(http_body_util::Either::Right(e.to_string()));
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            r
        }
    })
}

fn main() {
    workers::run("bare_proxy", |upstream| {
        let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
        move |stream, _| {
            let client = client.clone();
            async move {
                let svc = service_fn(move |req| forward(client.clone(), upstream, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        }
    });
}
