//! `max_concurrency = "auto"` and `"backend"` against the best fixed limit,
//! in front of the simulator's llama.cpp mode with 1, 2, 4 and 8 slots.
//!
//! For each backend and each way of setting the limit: an eval flood (32
//! closed-loop clients, streams at priority 10) for `RUN`, and an
//! interactive request (priority -1) every half second. Printed per row:
//! the settled limit, the time to reach it, eval throughput over the
//! second half (against the best fixed limit), the backend's own queue
//! (waiting inside it for a slot: most, and mean over 50 ms polls) and the
//! interactive user's median time to first token. In process, on
//! loopback, bounded in time and count. Run: `cargo bench --bench adaptive`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anteroom::config::{Concurrency, FileConfig};
use anteroom::sim::{self, Mode, SimConfig};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

const RUN: Duration = Duration::from_secs(12);
const CLIENTS: usize = 32;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(url: &str, priority: i32, tokens: usize) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "m",
        "stream": true,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "Evaluate this."}],
    });
    Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-priority", priority)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request")
}

/// Time to the first body bytes, then the rest read.
async fn first_token(client: &HttpClient, url: &str) -> Option<Duration> {
    let start = Instant::now();
    let resp = client.request(request(url, -1, 8)).await.ok()?;
    let mut body = resp.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if first.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
            first = Some(start.elapsed());
        }
    }
    first
}

struct Row {
    limit: String,
    settled: usize,
    settled_after: Option<Duration>,
    done_second_half: u64,
    most_waiting: usize,
    mean_waiting: f64,
    interactive_p50: Option<Duration>,
}

async fn run(slots: usize, limit: Concurrency) -> Row {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let sim = sim::start(
        loopback,
        SimConfig {
            mode: Mode::Llama,
            slots,
            ttft: Duration::from_millis(50),
            tokens_per_second: 100.0,
            batch_slowdown: 0.1,
            ..SimConfig::default()
        },
    )
    .await
    .expect("the simulator starts");
    let file = FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: sim.url().into(),
        max_concurrency: limit,
        ..FileConfig::default()
    };
    let proxy = anteroom::cli::serve::start(&file.validate().expect("a valid config"))
        .await
        .expect("the proxy starts");
    // Discovery first, as a user's proxy has it long before a run.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let table = proxy.router.table();
        if table.row(table.first()).backend.status().slots.is_some() {
            break;
        }
        drop(table);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = proxy.url();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for _ in 0..CLIENTS {
        let (stop, done, url) = (stop.clone(), done.clone(), url.clone());
        flood.push(tokio::spawn(async move {
            let client = client();
            for _ in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(resp) = client.request(request(&url, 10, 16)).await {
                    if resp.into_body().collect().await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    let interactive_client = client();
    let mut limits = Vec::new();
    let mut waiting = Vec::new();
    let mut interactive = Vec::new();
    let mut at_half = None;
    let mut next_interactive = start + Duration::from_millis(500);
    while start.elapsed() < RUN {
        tokio::time::sleep(Duration::from_millis(50)).await;
        limits.push((start.elapsed(), proxy.scheduler.snapshot().max_concurrency));
        waiting.push(sim.stats().waiting);
        if at_half.is_none() && start.elapsed() >= RUN / 2 {
            at_half = Some(done.load(Ordering::Relaxed));
        }
        if Instant::now() >= next_interactive {
            next_interactive += Duration::from_millis(500);
            if start.elapsed() >= RUN / 2 {
                if let Some(t) = first_token(&interactive_client, &url).await {
                    interactive.push(t);
                }
            }
        }
    }
    let second_half = done.load(Ordering::Relaxed) - at_half.unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        let _ = t.await;
    }
    let settled = limits.last().map_or(0, |l| l.1);
    // When the limit last changed to what it settled at.
    let settled_after = limits
        .iter()
        .rposition(|&(_, l)| l != settled)
        .map_or(Some(Duration::ZERO), |i| limits.get(i + 1).map(|l| l.0));
    interactive.sort_unstable();
    Row {
        limit: match limit {
            Concurrency::Fixed(n) => format!("fixed {n}"),
            Concurrency::Auto => "auto".into(),
            Concurrency::Backend => "backend".into(),
        },
        settled,
        settled_after,
        done_second_half: second_half,
        most_waiting: waiting.iter().copied().max().unwrap_or(0),
        mean_waiting: waiting.iter().sum::<usize>() as f64 / waiting.len().max(1) as f64,
        interactive_p50: interactive.get(interactive.len() / 2).copied(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "llama-like backend (--mode llama, 50 ms prefill, 100 tok/s, 10% slower per neighbour), \
         {CLIENTS} eval streams of 16 tokens, {} s\n",
        RUN.as_secs()
    );
    println!(
        "| slots | limit | settled | settled after | eval req in 2nd half | vs best fixed | backend waiting: most / mean | interactive TTFT p50 |"
    );
    println!("|--:|---|--:|--:|--:|--:|--:|--:|");
    for slots in [1usize, 2, 4, 8] {
        let mut rows = Vec::new();
        let mut fixed: Vec<usize> = vec![slots];
        if slots > 1 {
            fixed.insert(0, slots / 2);
        }
        fixed.push(slots * 2);
        for n in fixed {
            rows.push(run(slots, Concurrency::Fixed(n)).await);
        }
        rows.push(run(slots, Concurrency::Auto).await);
        rows.push(run(slots, Concurrency::Backend).await);
        let best = rows
            .iter()
            .filter(|r| r.limit.starts_with("fixed"))
            .map(|r| r.done_second_half)
            .max()
            .unwrap_or(1)
            .max(1);
        for r in rows {
            println!(
                "| {slots} | {} | {} | {} | {} | {:.0}% | {} / {:.2} | {} |",
                r.limit,
                r.settled,
                r.settled_after
                    .map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
                r.done_second_half,
                100.0 * r.done_second_half as f64 / best as f64,
                r.most_waiting,
                r.mean_waiting,
                r.interactive_p50
                    .map_or("-".into(), |d| format!("{} ms", d.as_millis())),
            );
        }
    }
}
