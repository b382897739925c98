//! The whole stack in one process on tokio's paused clock: hyper serves the
//! stack over a pipe, every layer runs as in production (the pooled
//! upstream client included), and the simulator answers over a pipe of its
//! own (see `anteroom::memory`). No socket, so no real time passes: a test
//! reads exact figures instead of tolerances, and waits without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anteroom::app::Stack;
use anteroom::config::FileConfig;
use anteroom::route::Router;
use anteroom::sim::{SimConfig, SimHandle};
use anteroom::telemetry::{Record, Recorder};
use anteroom::types::ClientAddr;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

/// Sends requests to an [`InProcess`] stack from a task of its own.
#[derive(Clone)]
pub struct Sender {
    stack: Stack,
}

/// A proxy and its simulator, in process.
pub struct InProcess {
    /// What the server runs per request.
    pub stack: Stack,
    /// The upstream table, with each upstream's scheduler.
    pub router: Arc<Router>,
    /// Where records go.
    pub recorder: Arc<Recorder>,
    /// The simulators behind it, kept running.
    pub sims: Vec<SimHandle>,
    config: anteroom::config::Config,
    log: std::path::PathBuf,
}

/// A host for an in-process listener, unique in this test binary (tests run
/// in parallel).
pub fn memory_host(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}{}",
        N.fetch_add(1, Ordering::Relaxed),
        anteroom::memory::HOST_SUFFIX
    )
}

/// A simulator with `cfg` on a host of its own.
pub fn memory_sim(name: &str, cfg: SimConfig) -> SimHandle {
    anteroom::sim::spawn_in_memory(&memory_host(name), cfg).expect("a free host")
}

/// A simulator with `sim` and the proxy in front of it, its config
/// adjusted by `f`; `name` names the log and the pipe.
pub fn in_process(name: &str, sim: SimConfig, f: impl FnOnce(&mut FileConfig)) -> InProcess {
    let sim = memory_sim(name, sim);
    let url = sim.url();
    let mut p = stack(name, |c| {
        c.upstream = url.into();
        f(c)
    });
    p.sims.push(sim);
    p
}

/// The proxy alone, its config (upstreams included) set by `f`.
pub fn stack(name: &str, f: impl FnOnce(&mut FileConfig)) -> InProcess {
    let log = super::log_path(name);
    let mut file = FileConfig {
        request_log: log.display().to_string(),
        ..FileConfig::default()
    };
    // Nothing reads the backend's load here: no watcher runs.
    super::no_probes(&mut file);
    f(&mut file);
    let config = file.validate().expect("a valid config");
    let app = anteroom::app::build(&config).expect("a config that builds");
    let router = app.router.clone();
    let recorder = Recorder::new(config.request_log.as_deref()).expect("a log to open");
    let stack = anteroom::app::build_stack(&config, &app, recorder.clone());
    InProcess {
        stack,
        router,
        recorder,
        sims: Vec::new(),
        config,
        log,
    }
}

impl InProcess {
    /// Send `req` on a connection of its own, as a client would.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        self.clone_sender().send(req).await
    }

    /// Probe the upstreams every `health_interval`, as serving does.
    pub fn start_health_checks(&self) {
        self.router.start_health_checks(self.config.health.clone());
    }

    /// A non-streamed chat request for `model`, of two tokens.
    pub fn ask(&self, model: &str, id: &str) -> Request<Full<Bytes>> {
        let body = serde_json::json!({
            "model": model,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
        });
        Request::post("/v1/chat/completions")
            .header("host", "anteroom")
            .header("x-request-id", id)
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a valid request")
    }

    /// A handle to send with from another task.
    pub fn clone_sender(&self) -> Sender {
        Sender {
            stack: self.stack.clone(),
        }
    }

    /// A chat request of `max_tokens` tokens, with id `id`.
    pub fn chat(
        &self,
        id: &str,
        priority: Option<i32>,
        stream: bool,
        max_tokens: usize,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::post("/v1/chat/completions")
            .header("host", "anteroom")
            .header("content-type", "application/json")
            .header("x-request-id", id);
        if let Some(p) = priority {
            b = b.header("x-priority", p.to_string());
        }
        b.body(Full::new(Bytes::from(super::chat_body(stream, max_tokens))))
            .expect("a valid request")
    }

    /// Every record so far, by request id.
    pub async fn records(&self) -> std::collections::HashMap<String, Record> {
        self.recorder.flush().await;
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
            .collect();
        super::by_id(&all)
    }

    /// The first upstream's waiting and running counts.
    pub fn counts(&self) -> (usize, usize) {
        self.router.table().row(0).scheduler.snapshot_counts()
    }
}

impl Sender {
    /// Send `req` on a connection of its own, as a client would.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        let stack = self.stack.clone();
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            // What the server sets on every request it reads.
            req.extensions_mut()
                .insert(ClientAddr::new(([127, 0, 0, 1], 40000).into()));
            stack.clone().oneshot(req)
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(theirs), svc),
        );
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .expect("a handshake over a pipe");
        tokio::spawn(conn);
        send.send_request(req).await.expect("an answer")
    }
}

/// Let every task run until all wait on the clock or on each other; on the
/// paused clock, time does not move meanwhile.
pub async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

/// Wait, on the paused clock, until `cond` holds: checked every virtual
/// millisecond, for at most a virtual minute.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
