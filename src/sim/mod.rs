//! A built-in OpenAI-compatible model server with configurable timing, for
//! tests, benches and the demo.
//!
//! `serial` mode serves one request at a time and lets the rest wait inside
//! the server, as LM Studio and a one-slot llama-server do. `batch` mode runs
//! up to `slots` at once, each token slower the more run together, as vLLM
//! does. Streams are real SSE, written token by token on a timer.
//!
//! It counts what it sees (`GET /sim/stats`): connections accepted, requests received, the peak
//! number in flight (received and not finished, waiting ones included),
//! completed and cancelled (the client went away mid-response) requests, and
//! the `x-request-id`s in the order they arrived.

mod body;
pub mod hostile;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Body;
use body::{Completion, SseBody};

/// How the simulated server schedules requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One request at a time; the rest wait inside the server.
    Serial,
    /// Up to `slots` at once, each token slower as more run together.
    Batch,
    /// Everything at once, with a throughput knee: throughput grows up to
    /// `slots` in flight, stays flat up to twice that (each request slower),
    /// and collapses beyond (time to first token and per token grow faster
    /// than the number in flight), like a GPU server past its KV cache.
    Knee,
    /// llama.cpp's `llama-server --parallel K`: accepts everything, runs
    /// `slots` at once (each token slower as more run, like `batch`), queues
    /// the rest inside itself first come first served, answers `/props`,
    /// `/slots` and `/metrics` with llama.cpp's names, and puts `timings` in
    /// its answers.
    Llama,
    /// vLLM: runs up to `slots` at once (`max_num_seqs`), the rest wait
    /// inside; `/metrics` with vLLM's names; with `max_queued`, refuses with
    /// a 503 past that many running and waiting (streamed requests, with
    /// `sse_refusal`, get vLLM's 200 with a lone error event instead).
    Vllm,
}

/// The simulated model's timing.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Scheduling mode.
    pub mode: Mode,
    /// Concurrent requests in batch mode.
    pub slots: usize,
    /// Time to first token, from the moment a request holds a slot.
    pub ttft: Duration,
    /// Output tokens per second of one request running alone.
    pub tokens_per_second: f64,
    /// Output length when the request sets no `max_tokens`.
    pub output_tokens: usize,
    /// In batch mode, each other running request makes every token this
    /// much slower (0.1: 10% per neighbour).
    pub batch_slowdown: f64,
    /// Model name reported.
    pub model: String,
    /// Share of generation requests refused with `reject_status` (0 to 1),
    /// spread evenly: 0.3 refuses the 3rd, 6th, 10th, … request.
    pub reject_share: f64,
    /// Status of a refusal: 429 (TGI, OpenAI) or 503 (vLLM, Ollama).
    pub reject_status: u16,
    /// `Retry-After` / `retry-after-ms` sent with a refusal, if any.
    pub reject_retry_after: Option<Duration>,
    /// Streams: reset the connection after this many tokens (a crash).
    pub die_after_tokens: Option<usize>,
    /// Streams: go silent forever after this many tokens (a hang).
    pub stall_after_tokens: Option<usize>,
    /// Refuse generation requests (like `reject_share`) whenever this many
    /// are already running: a server with a cap (vLLM's queue limits).
    pub reject_over: Option<usize>,
    /// Share of new connections closed at once, before any response (0 to
    /// 1): a server restarting or out of sockets.
    pub refuse_connections: f64,
    /// Put each SSE chunk's wall-clock send time in it (`x_sent_ns`), for
    /// measuring delivery delay (benches).
    pub stamp_events: bool,
    /// Close every connection after its response, though the response
    /// announced keep-alive (llama.cpp's server does).
    pub close_after_response: bool,
    /// Share of responses after which the connection, once idle, is closed
    /// a random 0–50 ms later (an upstream's idle timeout).
    pub close_idle_share: f64,
    /// `llama` mode: serve `/metrics` (llama-server's `--metrics`); without
    /// it `/metrics` answers 501 as llama-server does.
    pub metrics: bool,
    /// `vllm` mode: refuse with a 503 once this many are running and waiting
    /// (`--max-num-queued-reqs`).
    pub max_queued: Option<usize>,
    /// `vllm` mode: a refused streamed request gets 200 with one SSE error
    /// event (`"code": 503`) and `[DONE]`, as vLLM does for some.
    pub sse_refusal: bool,
    /// Streams: every third token event carries two tokens, as llama-server
    /// sometimes writes them (and vLLM's content events fall short of its
    /// tokens): counting events is then short.
    pub pair_tokens: bool,
    /// A generation for another model than `model` is a 404, as vLLM
    /// answers a name it does not serve (llama-server takes any).
    pub only_model: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Serial,
            slots: 8,
            ttft: Duration::from_millis(50),
            tokens_per_second: 100.0,
            output_tokens: 16,
            batch_slowdown: 0.1,
            model: "anteroom-sim".into(),
            reject_share: 0.0,
            reject_status: 429,
            reject_retry_after: None,
            die_after_tokens: None,
            stall_after_tokens: None,
            reject_over: None,
            refuse_connections: 0.0,
            stamp_events: false,
            close_after_response: false,
            close_idle_share: 0.0,
            metrics: true,
            max_queued: None,
            sse_refusal: false,
            pair_tokens: false,
            only_model: false,
        }
    }
}

/// What the simulator saw, served at `GET /sim/stats`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests received.
    pub received: u64,
    /// Requests in flight now (waiting for a slot or running).
    pub in_flight: usize,
    /// Generation requests waiting inside the simulator for a slot now
    /// (llama.cpp's `requests_deferred`, vLLM's `num_requests_waiting`).
    #[serde(default)]
    pub waiting: usize,
    /// Most generation requests waiting inside at once.
    #[serde(default)]
    pub peak_waiting: usize,
    /// Most generation requests holding a slot at once.
    #[serde(default)]
    pub peak_running: usize,
    /// Most requests in flight at once.
    pub peak_in_flight: usize,
    /// Generations that ran to their end.
    pub completed: u64,
    /// Generations whose client went away before their end.
    pub cancelled: u64,
    /// Generation requests refused (`reject_share`, `reject_over`).
    pub rejected: u64,
    /// Connections closed at once (`refuse_connections`).
    pub refused_connections: u64,
    /// `x-request-id` of each generation request, in arrival order (first 100,000).
    pub order: Vec<String>,
    /// What happened to generations, in order: `start <id>` when one took
    /// a slot, then `done <id>` or `cancel <id>` (first 100,000).
    #[serde(default)]
    pub events: Vec<String>,
    /// The `traceparent` of each generation request that carried one, with
    /// its `x-request-id`, in arrival order (first 100,000): what a traced
    /// backend would make its spans' parent.
    #[serde(default)]
    pub traceparents: Vec<(String, String)>,
}

const ORDER_LOG_MAX: usize = 100_000;

/// Shared counters.
#[derive(Debug)]
pub struct SimState {
    cfg: SimConfig,
    slots: Arc<Semaphore>,
    connections: AtomicU64,
    received: AtomicU64,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    running: AtomicUsize,
    /// Generation requests waiting inside for a slot.
    waiting: AtomicUsize,
    peak_waiting: AtomicUsize,
    peak_running: AtomicUsize,
    /// Prompt and output tokens of finished generations (llama.cpp's counters).
    prompt_tokens: AtomicU64,
    predicted_tokens: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    refused_connections: AtomicU64,
    generation_requests: AtomicU64,
    responses: AtomicU64,
    order: Mutex<Vec<String>>,
    events: Mutex<Vec<String>>,
    traceparents: Mutex<Vec<(String, String)>>,
    next_id: AtomicU64,
}

impl SimState {
    fn new(cfg: SimConfig) -> Arc<Self> {
        let slots = match cfg.mode {
            Mode::Serial => 1,
            Mode::Batch | Mode::Llama | Mode::Vllm => cfg.slots.max(1),
            Mode::Knee => 1 << 16,
        };
        Arc::new(Self {
            cfg,
            slots: Arc::new(Semaphore::new(slots)),
            connections: AtomicU64::new(0),
            received: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            peak_waiting: AtomicUsize::new(0),
            peak_running: AtomicUsize::new(0),
            prompt_tokens: AtomicU64::new(0),
            predicted_tokens: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            generation_requests: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            order: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
            traceparents: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.connections.load(Ordering::SeqCst),
            received: self.received.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            waiting: self.waiting.load(Ordering::SeqCst),
            peak_waiting: self.peak_waiting.load(Ordering::SeqCst),
            peak_running: self.peak_running.load(Ordering::SeqCst),
            peak_in_flight: self.peak.load(Ordering::SeqCst),
            completed: self.completed.load(Ordering::SeqCst),
            cancelled: self.cancelled.load(Ordering::SeqCst),
            rejected: self.rejected.load(Ordering::SeqCst),
            refused_connections: self.refused_connections.load(Ordering::SeqCst),
            order: self.order.lock().clone(),
            events: self.events.lock().clone(),
            traceparents: self.traceparents.lock().clone(),
        }
    }

    /// Time between two tokens of one request now, given how many run.
    /// Below a microsecond it is zero: tokio's timer resolves to a
    /// millisecond, and a bench that asks for a million tokens a second wants
    /// no waiting at all, not a millisecond per token.
    fn token_interval(&self) -> Duration {
        let base = 1.0 / self.cfg.tokens_per_second.max(1e-3);
        if base <= 1e-6 {
            return Duration::ZERO;
        }
        let factor = match self.cfg.mode {
            Mode::Serial => 1.0,
            Mode::Batch | Mode::Llama | Mode::Vllm => {
                let others = self.running.load(Ordering::Relaxed).saturating_sub(1);
                1.0 + self.cfg.batch_slowdown * others as f64
            }
            Mode::Knee => self.knee_factor(),
        };
        Duration::from_secs_f64(base * factor)
    }

    /// Time to first token now: in knee mode it grows with the load.
    pub(crate) fn ttft(&self) -> Duration {
        match self.cfg.mode {
            Mode::Knee => self.cfg.ttft.mul_f64(self.knee_factor()),
            _ => self.cfg.ttft,
        }
    }

    /// How much slower than alone each request runs with `running` in
    /// flight: 1 up to the knee `p` (= slots), k/p up to 2p (throughput
    /// flat), then k/p × (1 + k − 2p) (throughput collapses).
    fn knee_factor(&self) -> f64 {
        let p = self.cfg.slots.max(1) as f64;
        let k = self.running.load(Ordering::Relaxed).max(1) as f64;
        if k <= p {
            1.0
        } else if k <= 2.0 * p {
            k / p
        } else {
            k / p * (1.0 + k - 2.0 * p)
        }
    }
}

/// Counts a request in flight until dropped; `finish` marks it completed,
/// a drop without it marks it cancelled.
#[derive(Debug)]
pub(crate) struct InFlight {
    state: Arc<SimState>,
    finished: bool,
    /// Set once it holds a slot: its end goes into the event log.
    logged: Option<String>,
}

impl InFlight {
    fn enter(state: &Arc<SimState>) -> Self {
        state.received.fetch_add(1, Ordering::SeqCst);
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak.fetch_max(now, Ordering::SeqCst);
        Self {
            state: state.clone(),
            finished: false,
            logged: None,
        }
    }

    /// It took a slot: log its start, and later its end.
    fn started(&mut self, id: &str) {
        self.state.event("start", id);
        self.logged = Some(id.to_owned());
    }

    pub(crate) fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.state.completed.fetch_add(1, Ordering::SeqCst);
            if let Some(id) = &self.logged {
                self.state.event("done", id);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
            if let Some(id) = &self.logged {
                self.state.event("cancel", id);
            }
        }
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SimState {
    fn event(&self, what: &str, id: &str) {
        let mut events = self.events.lock();
        if events.len() < ORDER_LOG_MAX {
            events.push(format!("{what} {id}"));
        }
    }
}

/// A slot of the simulated server, holding the running count.
#[derive(Debug)]
pub(crate) struct Slot {
    state: Arc<SimState>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes one off a counter when dropped.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running simulator.
#[derive(Debug)]
pub struct SimHandle {
    /// Where it listens (unspecified, port 0, for one in process).
    pub addr: SocketAddr,
    /// How to reach it.
    url: String,
    /// Its counters.
    pub state: Arc<SimState>,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    /// `http://addr`, or `http://host` in process.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start a simulator on `listener` in the background.
pub fn spawn(listener: TcpListener, cfg: SimConfig) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let state = SimState::new(cfg);
    let task = tokio::spawn(serve(listener, state.clone()));
    Ok(SimHandle {
        addr,
        url: format!("http://{addr}"),
        state,
        task,
    })
}

/// Start a simulator in process, on `host` (ending in
/// [`memory::HOST_SUFFIX`](crate::memory::HOST_SUFFIX)): the same HTTP/1.1
/// over a pipe instead of a socket, so a test on tokio's paused clock sees
/// its exact timings. Connection-closing modes are not simulated here.
pub fn spawn_in_memory(host: &str, cfg: SimConfig) -> std::io::Result<SimHandle> {
    let mut listener = crate::memory::Listener::bind(host)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrInUse, host.to_owned()))?;
    let state = SimState::new(cfg);
    let serving = state.clone();
    let task = tokio::spawn(async move {
        while let Some(io) = listener.accept().await {
            serving.connections.fetch_add(1, Ordering::SeqCst);
            let state = serving.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc),
            );
        }
    });
    Ok(SimHandle {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        url: format!("http://{host}"),
        state,
        task,
    })
}

/// Bind `addr` and start a simulator on it.
pub async fn start(addr: SocketAddr, cfg: SimConfig) -> std::io::Result<SimHandle> {
    spawn(TcpListener::bind(addr).await?, cfg)
}

/// Serve until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<SimState>) {
    let limits = crate::config::ServerLimits::default();
    crate::server::accept_loop(
        listener,
        std::future::pending(),
        limits,
        None,
        Arc::default(),
        move |_addr| {
            let n = state.connections.fetch_add(1, Ordering::SeqCst) as f64;
            let share = state.cfg.refuse_connections.clamp(0.0, 1.0);
            if ((n + 1.0) * share).floor() > (n * share).floor() {
                state.refused_connections.fetch_add(1, Ordering::SeqCst);
                return None;
            }
            let state = state.clone();
            let close = Arc::new(tokio::sync::Notify::new());
            let closer = close.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (state, closer) = (state.clone(), closer.clone());
                async move {
                    let resp = handle(state.clone(), req).await;
                    state.maybe_close(closer);
                    Ok::<_, Infallible>(resp)
                }
            });
            Some(crate::server::Served {
                svc,
                close: Some(close),
            })
        },
    )
    .await;
}

async fn handle(state: Arc<SimState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/models") => json(
            StatusCode::OK,
            serde_json::json!({
                "object": "list",
                "data": [{"id": state.cfg.model, "object": "model", "created": 0, "owned_by": "anteroom-sim"}],
            }),
        ),
        (Method::GET, "/sim/stats") => json(
            StatusCode::OK,
            serde_json::to_value(state.stats()).unwrap_or_default(),
        ),
        (Method::GET, "/health") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (Method::GET, "/props") if state.cfg.mode == Mode::Llama => llama_props(&state),
        (Method::GET, "/slots") if state.cfg.mode == Mode::Llama => llama_slots(&state, &req),
        (Method::GET, "/metrics") if state.cfg.mode == Mode::Llama => llama_metrics(&state),
        (Method::GET, "/metrics") if state.cfg.mode == Mode::Vllm => vllm_metrics(&state),
        (Method::POST, "/v1/chat/completions" | "/v1/completions") if state.vllm_full() => {
            vllm_refuse(state, req).await
        }
        (Method::POST, "/v1/chat/completions" | "/v1/completions") if state.refuses() => {
            refuse(state, req).await
        }
        (Method::POST, "/v1/chat/completions") => generate(state, req, true).await,
        (Method::POST, "/v1/completions") => generate(state, req, false).await,
        (Method::POST, "/v1/embeddings") => embed(state, req).await,
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": {"message": format!("no route {path}"), "type": "invalid_request_error", "param": null, "code": "not_found"}}),
        ),
    }
}

impl SimState {
    /// After a response: close its connection when a closing mode says so.
    fn maybe_close(&self, close: Arc<tokio::sync::Notify>) {
        if self.cfg.close_after_response {
            // Taken up by the connection task once it next waits, which is
            // after this response's head is written (so it still announces
            // keep-alive, as llama.cpp's does) and before it reads another
            // request. (A task spawned to notify ran late under load, and
            // the connection served the next request meanwhile.)
            close.notify_one();
            return;
        }
        let share = self.cfg.close_idle_share.clamp(0.0, 1.0);
        if share == 0.0 {
            return;
        }
        let n = self.responses.fetch_add(1, Ordering::SeqCst);
        let x = crate::random::splitmix(n ^ 0x5eed);
        if (x >> 11) as f64 / (1u64 << 53) as f64 >= share {
            return;
        }
        let delay = Duration::from_millis(x % 51);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            close.notify_one();
        });
    }

    /// Whether this generation request is one of the `reject_share`.
    fn refuses(&self) -> bool {
        if self
            .cfg
            .reject_over
            .is_some_and(|cap| self.running.load(Ordering::SeqCst) >= cap)
        {
            return true;
        }
        let share = self.cfg.reject_share.clamp(0.0, 1.0);
        if share == 0.0 {
            return false;
        }
        let n = self.generation_requests.fetch_add(1, Ordering::SeqCst) as f64;
        ((n + 1.0) * share).floor() > (n * share).floor()
    }
}

/// Refuse a generation request as an overloaded server does.
async fn refuse(state: Arc<SimState>, req: Request<Incoming>) -> Response<Body> {
    state.received.fetch_add(1, Ordering::SeqCst);
    state.rejected.fetch_add(1, Ordering::SeqCst);
    // Read the body so the connection stays usable.
    let _ = req.into_body().collect().await;
    let status =
        StatusCode::from_u16(state.cfg.reject_status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut resp = json(
        status,
        serde_json::json!({"error": {"message": "Model is overloaded", "type": "server_error", "param": null, "code": "overloaded"}}),
    );
    if let Some(after) = state.cfg.reject_retry_after {
        let h = resp.headers_mut();
        h.insert(
            "retry-after",
            http::HeaderValue::from(after.as_secs_f64().ceil().max(1.0) as u64),
        );
        h.insert(
            "retry-after-ms",
            http::HeaderValue::from(after.as_millis() as u64),
        );
    }
    resp
}

/// A generation request the simulator has read and given a slot.
struct Admitted {
    guard: InFlight,
    value: serde_json::Value,
    prompt_tokens: usize,
    slot: Slot,
    /// Its `x-request-id`, or "-".
    request_id: String,
}

/// Parse the request and take a slot; `Err` with an error response.
async fn admit(state: &Arc<SimState>, req: Request<Incoming>) -> Result<Admitted, Response<Body>> {
    let mut guard = InFlight::enter(state);
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    {
        let mut order = state.order.lock();
        if order.len() < ORDER_LOG_MAX {
            order.push(id.clone());
        }
    }
    if let Some(tp) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        let mut seen = state.traceparents.lock();
        if seen.len() < ORDER_LOG_MAX {
            seen.push((id.clone(), tp.to_owned()));
        }
    }
    let bytes = match req.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            // The client went away while sending.
            return Err(json(StatusCode::BAD_REQUEST, serde_json::json!({})));
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            guard.finish();
            return Err(json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": {"message": format!("invalid JSON: {e}"), "type": "invalid_request_error", "param": null, "code": "invalid_json"}}),
            ));
        }
    };
    if state.cfg.only_model {
        let asked = value.get("model").and_then(|v| v.as_str()).unwrap_or("");
        if asked != state.cfg.model {
            guard.finish();
            return Err(json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": {"message": format!("The model `{asked}` does not exist."), "type": "NotFoundError", "param": "model", "code": 404}}),
            ));
        }
    }
    // From the prompt, not the whole body: a request's other fields (its
    // `stream`, say) do not change how long its prompt is.
    let prompt_len = value
        .get("messages")
        .or_else(|| value.get("prompt"))
        .map_or(bytes.len(), |p| p.to_string().len());
    let prompt_tokens = (prompt_len / 4).max(1);
    let permit = match state.slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            // No free slot: counted as waiting inside until it holds one (or
            // its client leaves while it waits).
            let now = state.waiting.fetch_add(1, Ordering::SeqCst) + 1;
            state.peak_waiting.fetch_max(now, Ordering::SeqCst);
            let _waiting = Decrement(&state.waiting);
            state
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the simulator never closes its semaphore")
        }
    };
    let running = state.running.fetch_add(1, Ordering::SeqCst) + 1;
    state.peak_running.fetch_max(running, Ordering::SeqCst);
    guard.started(&id);
    let slot = Slot {
        state: state.clone(),
        _permit: permit,
    };
    Ok(Admitted {
        guard,
        value,
        prompt_tokens,
        slot,
        request_id: id,
    })
}

async fn generate(state: Arc<SimState>, req: Request<Incoming>, chat: bool) -> Response<Body> {
    let Admitted {
        guard,
        value,
        prompt_tokens,
        slot,
        request_id,
    } = match admit(&state, req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let max = value
        .get("max_tokens")
        .or_else(|| value.get("max_completion_tokens"))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    // `sim_stop_after`: the model ends its answer early (as at an end of
    // sequence token), whatever max_tokens allowed.
    let stop = value
        .get("sim_stop_after")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    let n = match (max, stop) {
        (Some(m), Some(s)) => m.min(s),
        (m, s) => m.or(s).unwrap_or(state.cfg.output_tokens),
    };
    let stream = value
        .get("stream")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let include_usage = value
        .pointer("/stream_options/include_usage")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let model = value
        .get("model")
        .and_then(|v| v.as_str())
        .unwrap_or(&state.cfg.model)
        .to_string();
    let completion = Completion {
        // The request id when given, so two runs of one request (direct and
        // through the proxy) produce identical bytes.
        id: if request_id == "-" {
            state.next_id.fetch_add(1, Ordering::Relaxed).to_string()
        } else {
            request_id
        },
        model,
        chat,
        tokens: n,
        prompt_tokens,
        include_usage,
        interval: value
            .get("sim_tokens_per_second")
            .and_then(|v| v.as_f64())
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(1.0 / r)),
        stamp: state.cfg.stamp_events,
        timings: state.cfg.mode == Mode::Llama,
    };
    if stream {
        // `sim_hold_head_ms`: the head waits that long (as a server that
        // answers a stream only once its first token is ready).
        if let Some(ms) = value.get("sim_hold_head_ms").and_then(|v| v.as_u64()) {
            pause(Duration::from_millis(ms)).await;
        }
        let body = SseBody::new(state.clone(), completion, guard, slot);
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(body.boxed_unsync())
            .expect("static headers are valid");
    }
    let started = tokio::time::Instant::now();
    pause(state.ttft()).await;
    let first = tokio::time::Instant::now();
    for _ in 1..n {
        pause(state.token_interval()).await;
    }
    let mut guard = guard;
    guard.finish();
    state.count_tokens(completion.prompt_tokens, n);
    drop(slot);
    json_text(
        StatusCode::OK,
        completion.full_response(body::Phases {
            started,
            first,
            last: tokio::time::Instant::now(),
        }),
    )
}

async fn embed(state: Arc<SimState>, req: Request<Incoming>) -> Response<Body> {
    let Admitted {
        mut guard,
        prompt_tokens,
        slot,
        ..
    } = match admit(&state, req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    pause(state.ttft()).await;
    guard.finish();
    drop(slot);
    json(
        StatusCode::OK,
        serde_json::json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
            "model": state.cfg.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }),
    )
}

/// Sleep, but not at all for zero (a zero sleep still waits for the timer's
/// next millisecond tick).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

impl SimState {
    /// A generation finished with these token counts.
    pub(crate) fn count_tokens(&self, prompt: usize, predicted: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.predicted_tokens
            .fetch_add(predicted as u64, Ordering::Relaxed);
    }

    /// vLLM with `max_queued`: as many running and waiting as it takes.
    fn vllm_full(&self) -> bool {
        self.cfg.mode == Mode::Vllm
            && self.cfg.max_queued.is_some_and(|cap| {
                self.running.load(Ordering::SeqCst) + self.waiting.load(Ordering::SeqCst) >= cap
            })
    }
}

/// llama.cpp's `GET /props`: its slot count and build.
fn llama_props(state: &SimState) -> Response<Body> {
    json(
        StatusCode::OK,
        serde_json::json!({
            "default_generation_settings": {"n_ctx": 4096, "params": {"n_predict": -1}},
            "total_slots": state.cfg.slots.max(1),
            "model_path": format!("/models/{}.gguf", state.cfg.model),
            "chat_template": "",
            "modalities": {"vision": false, "audio": false},
            "build_info": "b0-anteroom-sim",
        }),
    )
}

/// llama.cpp's `GET /slots` (`?fail_on_no_slot=1`: 503 when all are busy).
fn llama_slots(state: &SimState, req: &Request<Incoming>) -> Response<Body> {
    let slots = state.cfg.slots.max(1);
    let busy = state.running.load(Ordering::SeqCst).min(slots);
    let fail = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "fail_on_no_slot=1"));
    if fail && busy == slots {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}),
        );
    }
    let list: Vec<serde_json::Value> = (0..slots)
        .map(|id| serde_json::json!({"id": id, "n_ctx": 4096, "is_processing": id < busy, "params": {}}))
        .collect();
    json(StatusCode::OK, serde_json::Value::Array(list))
}

/// llama.cpp's `GET /metrics` (`--metrics`), with its names.
fn llama_metrics(state: &SimState) -> Response<Body> {
    if !state.cfg.metrics {
        return json(
            StatusCode::NOT_IMPLEMENTED,
            serde_json::json!({"error": {"code": 501, "message": "This server does not support metrics endpoint. Start it with `--metrics`", "type": "not_supported_error"}}),
        );
    }
    let mut out = String::new();
    let counts = [
        (
            "counter",
            "prompt_tokens_total",
            "Number of prompt tokens processed.",
            state.prompt_tokens.load(Ordering::Relaxed),
        ),
        (
            "counter",
            "tokens_predicted_total",
            "Number of generation tokens processed.",
            state.predicted_tokens.load(Ordering::Relaxed),
        ),
        (
            "gauge",
            "requests_processing",
            "Number of requests processing.",
            state.running.load(Ordering::SeqCst) as u64,
        ),
        (
            "gauge",
            "requests_deferred",
            "Number of requests deferred.",
            state.waiting.load(Ordering::SeqCst) as u64,
        ),
    ];
    for (kind, name, help, v) in counts {
        out += &format!(
            "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {v}\n"
        );
    }
    text(out)
}

/// vLLM's `GET /metrics`: its scheduler gauges, labelled as vLLM labels them.
fn vllm_metrics(state: &SimState) -> Response<Body> {
    let labels = format!("engine=\"0\",model_name=\"{}\"", state.cfg.model);
    let running = state.running.load(Ordering::SeqCst);
    let waiting = state.waiting.load(Ordering::SeqCst);
    let out = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{{labels}}} {running}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{{labels}}} {waiting}.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{{labels}}} {kv}\n\
         # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
         # TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{{{labels}}} {gen}.0\n",
        kv = running as f64 / state.cfg.slots.max(1) as f64,
        gen = state.predicted_tokens.load(Ordering::Relaxed),
    );
    text(out)
}

/// vLLM past `--max-num-queued-reqs`: a 503 with its error body and no
/// `Retry-After`, or, for a stream with `sse_refusal`, a 200 whose only event
/// is that error.
async fn vllm_refuse(state: Arc<SimState>, req: Request<Incoming>) -> Response<Body> {
    state.received.fetch_add(1, Ordering::SeqCst);
    state.rejected.fetch_add(1, Ordering::SeqCst);
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let stream = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
        .unwrap_or(false);
    let error = serde_json::json!({"error": {"message": "The server is at capacity: too many requests queued.", "type": "ServiceUnavailableError", "param": null, "code": 503}});
    if stream && state.cfg.sse_refusal {
        return Response::builder()
            .header("content-type", "text/event-stream; charset=utf-8")
            .body(
                Full::new(Bytes::from(format!("data: {error}\n\ndata: [DONE]\n\n")))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .expect("static headers are valid");
    }
    json(StatusCode::SERVICE_UNAVAILABLE, error)
}

fn text(body: String) -> Response<Body> {
    Response::builder()
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static headers are valid")
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    json_text(status, value.to_string())
}

fn json_text(status: StatusCode, text: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static headers are valid")
}
