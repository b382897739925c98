//! Shared helpers of the integration tests: a simulator, a proxy in front of
//! it, a client, and bounded waiting.

#![allow(dead_code, unreachable_pub)]

pub mod in_process;

use std::time::Duration;

use anteroom::cli::serve::{self, Running};
use anteroom::config::{FileConfig, Models, UpstreamEntry};
use anteroom::sim::{self, Mode, SimConfig, SimHandle};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Log to the test's output when RUST_LOG is set.
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A simulator with quick defaults.
pub fn sim_config(mode: Mode) -> SimConfig {
    SimConfig {
        mode,
        slots: 64,
        ttft: Duration::from_millis(10),
        tokens_per_second: 1000.0,
        output_tokens: 4,
        batch_slowdown: 0.0,
        ..SimConfig::default()
    }
}

pub async fn sim(cfg: SimConfig) -> SimHandle {
    sim::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

/// A proxy on loopback in front of `upstream`, with the config adjusted by `f`.
pub async fn proxy(upstream: &str, f: impl FnOnce(&mut FileConfig)) -> Running {
    let mut file = FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: upstream.into(),
        ..FileConfig::default()
    };
    f(&mut file);
    serve::start(&file.validate().unwrap()).await.unwrap()
}

/// For tests that count the upstream's connections: the backend is not
/// probed (`backend = "openai"`), so every connection is the pool's.
pub fn no_probes(c: &mut FileConfig) {
    c.backend = anteroom::config::backend::Setting::Is(anteroom::config::backend::Kind::OpenAi);
}

/// A simulator with `cfg`, a proxy in front of it adjusted by `f`, and a client.
pub async fn setup(
    cfg: SimConfig,
    f: impl FnOnce(&mut FileConfig),
) -> (SimHandle, Running, HttpClient) {
    let sim = sim(cfg).await;
    let proxy = proxy(&sim.url(), f).await;
    (sim, proxy, client())
}

/// A serial simulator behind a one-slot proxy (adjusted by `f`), with the
/// slot held by a stream long enough to outlast the test (10,000 tokens):
/// drop the returned response to free it.
pub async fn one_slot_busy(
    f: impl FnOnce(&mut FileConfig),
) -> (SimHandle, Running, HttpClient, Response<Incoming>) {
    let (sim, proxy, client) = setup(sim_config(Mode::Serial), |c| {
        c.max_concurrency = 1.into();
        f(c);
    })
    .await;
    let busy = chat(&client, &proxy.url(), None, "busy", true, 10_000).await;
    (sim, proxy, client, busy)
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A chat request body.
pub fn chat_body(stream: bool, max_tokens: usize) -> String {
    serde_json::json!({
        "model": "anteroom-sim",
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string()
}

/// POST a chat completion; `priority` goes into `x-priority`, `id` into
/// `x-request-id`.
pub async fn chat(
    client: &HttpClient,
    base: &str,
    priority: Option<i32>,
    id: &str,
    stream: bool,
    max_tokens: usize,
) -> Response<Incoming> {
    let p = priority.map(|p| p.to_string());
    let headers: Vec<(&str, &str)> = p.iter().map(|p| ("x-priority", p.as_str())).collect();
    chat_with(client, base, &headers, id, stream, max_tokens).await
}

/// [`chat`] with these headers (keys, tenants, priorities).
pub async fn chat_with(
    client: &HttpClient,
    base: &str,
    headers: &[(&str, &str)],
    id: &str,
    stream: bool,
    max_tokens: usize,
) -> Response<Incoming> {
    let mut b = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", id);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client
        .request(
            b.body(Full::new(Bytes::from(chat_body(stream, max_tokens))))
                .unwrap(),
        )
        .await
        .unwrap()
}

/// Read a whole body.
pub async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// The body as JSON.
pub async fn body_json(resp: Response<Incoming>) -> serde_json::Value {
    let b = body_bytes(resp).await;
    serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)))
}

/// Poll `cond` every few milliseconds; panic with `what` after 10 s.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `GET /status` of the admin listener at `admin` (`http://host:port`).
pub async fn status(admin: &str) -> serde_json::Value {
    let resp = client()
        .get(format!("{admin}/status").parse().unwrap())
        .await
        .unwrap();
    body_json(resp).await
}

/// [`status`] of a proxy.
pub async fn proxy_status(proxy: &Running) -> serde_json::Value {
    status(&format!("http://{}", proxy.admin_addr)).await
}

/// `GET /metrics` of a proxy's admin listener, as text.
pub async fn metrics_text(proxy: &Running) -> String {
    let resp = client()
        .get(
            format!("http://{}/metrics", proxy.admin_addr)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    String::from_utf8(body_bytes(resp).await.to_vec()).unwrap()
}

/// A proxy (max_concurrency 3, batch simulator) that has served four chat
/// requests at priorities 0, 5, -30 and 100, streamed and not: metrics in
/// every priority class.
pub async fn proxy_after_mixed_priorities() -> (SimHandle, Running) {
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = 3.into();
    })
    .await;
    for (i, p) in [0, 5, -30, 100].into_iter().enumerate() {
        let resp = chat(
            &client,
            &proxy.url(),
            Some(p),
            &format!("m{i}"),
            i % 2 == 0,
            4,
        )
        .await;
        body_bytes(resp).await;
    }
    (sim, proxy)
}

/// A header as a number.
pub fn header_u64<B>(resp: &Response<B>, name: &str) -> Option<u64> {
    resp.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` chat requests at once, each on a connection of its own (streamed for
/// even `i`), read to their end; their statuses, in order.
pub async fn burst(url: &str, n: usize, prefix: &str, max_tokens: usize) -> Vec<u16> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, id) = (url.to_owned(), format!("{prefix}{i}"));
        tasks.push(tokio::spawn(async move {
            let resp = chat(&client(), &url, None, &id, i % 2 == 0, max_tokens).await;
            let status = resp.status().as_u16();
            body_bytes(resp).await;
            status
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The anteroom binary, serving on free loopback ports.
pub struct Proc {
    pub child: std::process::Child,
    pub url: String,
    pub admin: String,
}

impl Proc {
    /// Send it SIGTERM.
    pub fn terminate(&self) {
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `anteroom serve` in front of `upstream` with `args` added, and wait
/// until its admin listener answers.
pub async fn anteroom_process(upstream: &str, args: &[&str]) -> Proc {
    let (port, admin) = (free_port(), free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .args(["serve", "--upstream", upstream])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(args)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let proc = Proc {
        child,
        url: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin}"),
    };
    let client = client();
    let health = format!("{}/healthz", proc.admin);
    for _ in 0..500 {
        let req = Request::get(&health).body(Full::default()).unwrap();
        if client.request(req).await.is_ok() {
            return proc;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("anteroom did not start");
}

/// A SHA-256 digest as the 64 hex digits a `[[key]]` table takes.
pub fn hex(d: [u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// An `[[upstream]]` table: `name` at `url` serving `models`, limit `max`.
pub fn entry(name: &str, url: String, models: Models, max: usize) -> UpstreamEntry {
    UpstreamEntry {
        name: name.into(),
        url,
        models,
        max_concurrency: Some(max),
        weight: 1,
        api_key: None,
        api_key_env: None,
        backend: None,
        stream_upgrade: None,
        default_max_tokens: None,
        max_tokens_cap: None,
    }
}

/// A fresh request log path under the test target dir.
pub fn log_path(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("request-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Flush the proxy's log and read every record in it.
pub async fn records(proxy: &Running, path: &std::path::Path) -> Vec<anteroom::telemetry::Record> {
    proxy.recorder.flush().await;
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
        .collect()
}

pub fn by_id(
    records: &[anteroom::telemetry::Record],
) -> std::collections::HashMap<String, anteroom::telemetry::Record> {
    let mut map = std::collections::HashMap::new();
    for r in records {
        assert!(
            map.insert(r.request_id.clone(), r.clone()).is_none(),
            "two records for {}",
            r.request_id
        );
    }
    map
}

/// Check a Prometheus text exposition as a scraper would read it, and parse
/// it: every line a comment, a `HELP`/`TYPE` line or a sample with a number;
/// every sample's family typed and documented before it; no series twice;
/// each histogram's buckets non-decreasing up to a `+Inf` bucket equal to
/// its `_count`. (`prometheus-parse` alone skips lines it cannot read.)
pub fn check_exposition(text: &str) -> Result<prometheus_parse::Scrape, String> {
    use prometheus_parse::{LineInfo, SampleType, Value};
    use std::collections::{HashMap, HashSet};
    let mut typed: HashMap<String, SampleType> = HashMap::new();
    let mut documented: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line}", n + 1);
        match LineInfo::parse(line) {
            LineInfo::Empty => {}
            LineInfo::Doc { metric_name, .. } => {
                documented.insert(metric_name.to_owned());
            }
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => {
                let family = metric_alias.unwrap_or(metric_name);
                if typed.insert(family.clone(), sample_type).is_some() {
                    return Err(at("a second TYPE for the family"));
                }
            }
            LineInfo::Sample {
                metric_name,
                labels,
                value,
                ..
            } => {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        metric_name
                            .strip_suffix(s)
                            .filter(|f| typed.get(*f) == Some(&SampleType::Histogram))
                    })
                    .unwrap_or(metric_name);
                if !typed.contains_key(family) {
                    return Err(at("a sample before its family's TYPE"));
                }
                if !documented.contains(family) {
                    return Err(at("a sample of a family without HELP"));
                }
                let number = match value {
                    "+Inf" | "-Inf" | "NaN" => true,
                    v => v.parse::<f64>().is_ok(),
                };
                if !number {
                    return Err(at("the value is not a number"));
                }
                if !series.insert(format!("{metric_name}{{{}}}", labels.unwrap_or(""))) {
                    return Err(at("the same series twice"));
                }
            }
            LineInfo::Ignored if line.trim_start().starts_with('#') => {}
            LineInfo::Ignored => return Err(at("not a sample, comment, HELP or TYPE line")),
        }
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .map_err(|e| e.to_string())?;
    for s in &scrape.samples {
        if let Value::Histogram(buckets) = &s.value {
            let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
            if counts.windows(2).any(|w| w[1] < w[0]) {
                return Err(format!("{}: buckets decrease: {counts:?}", s.metric));
            }
            let inf = buckets.iter().find(|b| b.less_than.is_infinite());
            let count = scrape
                .samples
                .iter()
                .find(|c| c.metric == format!("{}_count", s.metric) && *c.labels == *s.labels);
            match (inf, count) {
                (Some(i), Some(c)) if matches!(c.value, Value::Untyped(v) | Value::Counter(v) if v == i.count) =>
                    {}
                _ => return Err(format!("{}: no +Inf bucket equal to its _count", s.metric)),
            }
        }
    }
    Ok(scrape)
}

/// What [`closed_loop`] saw.
pub struct Driven {
    /// The proxy's limit every 100 ms.
    pub samples: Vec<usize>,
    /// Requests completed in all.
    pub done: u64,
    /// Requests completed in the second half of the run.
    pub second_half: u64,
}

/// `clients` closed-loop clients (each sends its next request when the last
/// is read to its end; every other one streamed when `streams`) against the
/// proxy for `run`, bounded in count as well; the limit is sampled every
/// 100 ms.
pub async fn closed_loop(proxy: &Running, clients: usize, run: Duration, streams: bool) -> Driven {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stop, done, url) = (stop.clone(), done.clone(), proxy.url());
        tasks.push(tokio::spawn(async move {
            let client = client();
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let stream = streams && i % 2 == 0;
                let resp = chat(&client, &url, None, &format!("c{c}-{i}"), stream, 8).await;
                assert_eq!(resp.status(), 200);
                body_bytes(resp).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut samples = Vec::new();
    let ticks = run.as_millis() / 100;
    let mut at_half = 0;
    for t in 0..ticks {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push(proxy.scheduler.snapshot().max_concurrency);
        if t == ticks / 2 {
            at_half = done.load(Ordering::Relaxed);
        }
    }
    let total = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    Driven {
        samples,
        done: total,
        second_half: total - at_half,
    }
}
