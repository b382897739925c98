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
use std::net::SocketAddr;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpSocket;

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
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: bare_proxy LISTEN UPSTREAM [WORKERS]");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().expect("LISTEN is host:port");
    let upstream: &'static str = Box::leak(args[2].clone().into_boxed_str());
    let workers: usize = args.get(3).and_then(|w| w.parse().ok()).unwrap_or(2);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let socket = TcpSocket::new_v4().expect("socket");
                    socket.set_reuseaddr(true).expect("reuseaddr");
                    socket.set_reuseport(true).expect("reuseport");
                    socket.bind(listen).expect("bind");
                    let listener = socket.listen(1024).expect("listen");
                    let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let client = client.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| forward(client.clone(), upstream, req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                });
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
