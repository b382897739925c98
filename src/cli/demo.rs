//! `anteroom demo`: the whole story in a few seconds, on loopback.
//!
//! A serial simulator (one request at a time, like LM Studio) sits behind
//! anteroom with `max_concurrency = 1` and a short queue. An eval-like burst
//! of low-priority (10) requests arrives at once, then interactive requests
//! (priority 0) arrive one by one. The table shows the interactive ones
//! jumping the line (and displacing batch work from the full queue) while the
//! batch overflow gets 429s with a measured `Retry-After`. It then prints
//! the `anteroom report` of its own request log, and, in a second part, an
//! interactive user's time to first token beside an eval flood: on an idle
//! backend, with priority alone, and with one slot reserved for urgent work.
//! Then preemption: the same user beside a flood of non-streamed eval
//! requests on one slot, with and without it, and the flood's throughput
//! with a reserved slot idle and lent out. A last part shows discovery: a llama.cpp-like simulator behind
//! `max_concurrency = "backend"`, its slots read from `/props`, and its own
//! queue empty where a limit too high fills it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::config::FileConfig;
use crate::sim::{self, Mode, SimConfig};
use crate::BoxError;

/// Flags of `anteroom demo`.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// Low-priority requests in the burst.
    #[arg(long, default_value_t = 40)]
    pub batch: usize,
    /// Interactive requests, sent one after another during the burst.
    #[arg(long, default_value_t = 6)]
    pub interactive: usize,
    /// Queue bound of the demo proxy (small, to show 429s).
    #[arg(long, default_value_t = 24)]
    pub max_queue: usize,
    /// Keep the demo's request log in this file (default: a temporary file,
    /// removed at the end).
    #[arg(long, value_name = "PATH")]
    pub request_log: Option<std::path::PathBuf>,
}

/// One request's outcome.
#[derive(Clone, Debug)]
struct Outcome {
    priority: i32,
    status: u16,
    queue_ms: Option<u64>,
    total: Duration,
    retry_after_ms: Option<u64>,
}

/// Run the demo and print the table.
pub async fn run(args: DemoArgs) -> Result<(), BoxError> {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let sim = sim::start(
        loopback,
        SimConfig {
            mode: Mode::Serial,
            ttft: Duration::from_millis(30),
            tokens_per_second: 200.0,
            output_tokens: 16,
            ..SimConfig::default()
        },
    )
    .await?;
    let (log_path, keep_log) = match &args.request_log {
        Some(p) => (p.clone(), true),
        None => (
            std::env::temp_dir().join(format!("anteroom-demo-{}.jsonl", std::process::id())),
            false,
        ),
    };
    if !keep_log {
        let _ = std::fs::remove_file(&log_path);
    }
    let file = FileConfig {
        request_log: log_path.display().to_string(),
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: sim.url().into(),
        max_concurrency: 1.into(),
        max_queue: args.max_queue,
        queue_timeout: "30s".into(),
        ..FileConfig::default()
    };
    let config = file.validate()?;
    let proxy = super::serve::start(&config).await?;
    println!(
        "anteroom demo: simulator (serial, ~105 ms per request) at {}, anteroom at {} \
         (max_concurrency 1, max_queue {})",
        sim.addr, proxy.addr, args.max_queue
    );
    println!(
        "sending {} batch requests (priority 10) at once, then {} interactive ones (priority 0)...\n",
        args.batch, args.interactive
    );

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/v1/chat/completions", proxy.url());
    let mut tasks = Vec::new();
    for _ in 0..args.batch {
        tasks.push(tokio::spawn(send(
            client.clone(),
            url.clone(),
            10,
            Duration::ZERO,
        )));
    }
    for i in 0..args.interactive {
        let delay = Duration::from_millis(200 + 300 * i as u64);
        tasks.push(tokio::spawn(send(client.clone(), url.clone(), 0, delay)));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await??);
    }
    print_table(&outcomes);
    let stats = sim.stats();
    println!(
        "\nthe simulator saw {} requests, at most {} at once (max_concurrency 1 held).",
        stats.received, stats.peak_in_flight
    );

    // The same run, as `anteroom report` sees it from the request log.
    proxy.recorder.flush().await;
    let log = std::fs::File::open(&log_path)
        .map_err(|e| format!("cannot read the demo's request log: {e}"))?;
    let report = crate::report::read(
        std::io::BufReader::new(log),
        Some(crate::report::GroupBy::Priority),
    )?;
    println!(
        "\n`anteroom report --by priority` of this run's request log:\n\n{}",
        crate::report::render(&report, &log_path.display().to_string())
    );
    if !keep_log {
        let _ = std::fs::remove_file(&log_path);
    }
    reservation().await?;
    preemption().await?;
    discovery().await
}

/// Part four: the limit read from the backend, and the backend's own queue
/// with it and with a limit too high.
async fn discovery() -> Result<(), BoxError> {
    const SLOTS: usize = 3;
    const STREAMS: usize = 12;
    println!(
        "\nKnowing the backend: a llama.cpp-like simulator (--mode llama --slots {SLOTS}) \
         and {STREAMS} streams at once.\n"
    );
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for (label, limit) in [
        (
            "max_concurrency = \"backend\"",
            crate::config::Concurrency::Backend,
        ),
        ("max_concurrency = 16", 16.into()),
    ] {
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let sim = sim::start(
            loopback,
            SimConfig {
                mode: Mode::Llama,
                slots: SLOTS,
                ttft: Duration::from_millis(30),
                tokens_per_second: 200.0,
                ..SimConfig::default()
            },
        )
        .await?;
        let file = FileConfig {
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            upstream: sim.url().into(),
            max_concurrency: limit,
            ..FileConfig::default()
        };
        let proxy = super::serve::start(&file.validate()?).await?;
        // Discovery runs at start; wait (bounded) for the limit to follow.
        let deadline = Instant::now() + Duration::from_secs(5);
        let backend = loop {
            let table = proxy.router.table();
            let slot = table.row(table.first()).clone();
            drop(table);
            let status = slot.backend.status();
            let known = status.kind.is_some()
                && (limit != crate::config::Concurrency::Backend
                    || slot.scheduler.snapshot().max_concurrency == SLOTS);
            if known || Instant::now() > deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let url = format!("{}/v1/chat/completions", proxy.url());
        let tasks: Vec<_> = (0..STREAMS)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { stream_all(&client, &url, 10, 16).await })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let stats = sim.stats();
        println!(
            "  {label:<30} identified {} with {} slots; limit {:>2}: at most {} running in the backend, {:>2} waiting inside it",
            backend.kind.unwrap_or("nothing"),
            backend.slots.map_or("no".into(), |n| n.to_string()),
            proxy.scheduler.snapshot().max_concurrency,
            stats.peak_running,
            stats.peak_waiting,
        );
    }
    println!(
        "\n  (waiting inside the backend, a request has no priority, and its wait counts as the model's time)"
    );
    Ok(())
}

/// Part two: an interactive user's time to first token beside an eval flood,
/// with priority alone and with a reserved slot.
async fn reservation() -> Result<(), BoxError> {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let sim = sim::start(
        loopback,
        SimConfig {
            mode: Mode::Batch,
            slots: 2,
            ttft: Duration::from_millis(30),
            tokens_per_second: 200.0,
            batch_slowdown: 0.0,
            ..SimConfig::default()
        },
    )
    .await?;
    println!(
        "Reserved capacity: a batch simulator with 2 slots behind max_concurrency 2; an eval \
         flood of 1 s streams (priority 10) and an interactive user (priority 0).\n"
    );
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut rows = Vec::new();
    for (label, reserve, flood) in [
        ("idle backend", false, false),
        ("under the flood, priority only", false, true),
        (
            "under the flood, 1 slot reserved for priority <= 0",
            true,
            true,
        ),
    ] {
        let file = FileConfig {
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            upstream: sim.url().into(),
            max_concurrency: 2.into(),
            reserve: if reserve {
                vec![crate::config::Reservation {
                    max_priority: 0,
                    slots: 1,
                }]
            } else {
                vec![]
            },
            ..FileConfig::default()
        };
        let proxy = super::serve::start(&file.validate()?).await?;
        let url = format!("{}/v1/chat/completions", proxy.url());
        let mut background = Vec::new();
        if flood {
            for _ in 0..4 {
                let (client, url) = (client.clone(), url.clone());
                background.push(tokio::spawn(async move {
                    // Back to back, each read to its end, like an eval worker.
                    loop {
                        if stream_all(&client, &url, 10, 200).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            // Let the flood fill the slots and the queue.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let mut ttft = Vec::new();
        for _ in 0..3 {
            ttft.push(first_token(&client, &url, 0, 4).await?.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for b in background {
            b.abort();
        }
        ttft.sort_unstable();
        rows.push((label, ttft[ttft.len() / 2]));
    }
    for (label, ms) in rows {
        println!("  interactive time to first token, {label:<52} {ms:>5} ms");
    }
    Ok(())
}

/// A demo proxy in front of `sim`, adjusted by `f`.
async fn demo_proxy(
    sim: &sim::SimHandle,
    f: impl FnOnce(&mut FileConfig),
) -> Result<super::serve::Running, BoxError> {
    let mut file = FileConfig {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: sim.url().into(),
        ..FileConfig::default()
    };
    f(&mut file);
    Ok(super::serve::start(&file.validate()?).await?)
}

/// `workers` eval workers sending non-streamed requests of `tokens` back to
/// back at priority 10; each completion adds its tokens to the count.
fn json_flood(
    client: &DemoClient,
    url: &str,
    workers: usize,
    tokens: usize,
    done: &std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|_| {
            let (client, url, done) = (client.clone(), url.to_owned(), done.clone());
            tokio::spawn(async move {
                loop {
                    let body = serde_json::json!({
                        "model": "anteroom-sim",
                        "max_tokens": tokens,
                        "messages": [{"role": "user", "content": "Answer the question."}],
                    });
                    let Ok(req) = Request::post(&url)
                        .header("content-type", "application/json")
                        .header("x-priority", 10)
                        .body(Full::new(Bytes::from(body.to_string())))
                    else {
                        break;
                    };
                    let Ok(resp) = client.request(req).await else {
                        break;
                    };
                    let ok = resp.status().is_success();
                    if resp.into_body().collect().await.is_err() {
                        break;
                    }
                    if ok {
                        done.fetch_add(tokens as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// Part three: preemption. An interactive user beside a flood of
/// non-streamed eval requests on one slot, with and without preemption;
/// then the flood's throughput on two slots with none reserved, one
/// reserved and idle, and one reserved but lent out.
async fn preemption() -> Result<(), BoxError> {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let serial = sim::start(
        loopback,
        SimConfig {
            mode: Mode::Serial,
            ttft: Duration::from_millis(30),
            tokens_per_second: 200.0,
            ..SimConfig::default()
        },
    )
    .await?;
    println!(
        "\nPreemption: a serial simulator (1 slot) behind max_concurrency 1; an eval flood of \
         non-streamed 1 s requests (priority 10, nobody sees them until they are done) and an \
         interactive user (priority 0).\n"
    );
    let client: DemoClient = Client::builder(TokioExecutor::new()).build_http();
    for (label, preempt) in [
        ("under the flood, no preemption", false),
        ("under the flood, preempt = true", true),
    ] {
        let proxy = demo_proxy(&serial, |c| {
            c.max_concurrency = 1.into();
            c.preempt = preempt;
        })
        .await?;
        let url = format!("{}/v1/chat/completions", proxy.url());
        let done = std::sync::Arc::default();
        let flood = json_flood(&client, &url, 4, 200, &done);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut ttft = Vec::new();
        for _ in 0..3 {
            ttft.push(first_token(&client, &url, 0, 4).await?.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        for f in flood {
            f.abort();
        }
        ttft.sort_unstable();
        let snap = proxy.scheduler.snapshot();
        let wasted = snap
            .preempted
            .map(|p| p.values().map(|c| c.wasted_seconds).sum::<f64>())
            .unwrap_or(0.0);
        println!(
            "  interactive time to first token, {label:<52} {:>5} ms",
            ttft[ttft.len() / 2]
        );
        if preempt {
            println!("    (the eval requests' generation thrown away: {wasted:.2} s)");
        }
    }
    let batch = sim::start(
        loopback,
        SimConfig {
            mode: Mode::Batch,
            slots: 2,
            ttft: Duration::from_millis(10),
            tokens_per_second: 200.0,
            batch_slowdown: 0.0,
            ..SimConfig::default()
        },
    )
    .await?;
    println!(
        "\n  the flood alone on a batch simulator with 2 slots (max_concurrency 2), no urgent work:"
    );
    for (label, reserve, preempt) in [
        ("no reservation", false, false),
        ("1 slot reserved for priority <= 0, idle", true, false),
        ("1 slot reserved, lent out (preempt = true)", true, true),
    ] {
        let proxy = demo_proxy(&batch, |c| {
            c.max_concurrency = 2.into();
            c.preempt = preempt;
            if reserve {
                c.reserve = vec![crate::config::Reservation {
                    max_priority: 0,
                    slots: 1,
                }];
            }
        })
        .await?;
        let url = format!("{}/v1/chat/completions", proxy.url());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let window = Duration::from_secs(2);
        let flood = json_flood(&client, &url, 4, 40, &done);
        tokio::time::sleep(window).await;
        for f in flood {
            f.abort();
        }
        let tokens = done.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "  eval throughput, {label:<52} {:>5.0} tokens/s",
            tokens as f64 / window.as_secs_f64()
        );
    }
    Ok(())
}

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A streamed chat request at `priority` for `max_tokens`.
fn stream_request(
    url: &str,
    priority: i32,
    max_tokens: usize,
) -> Result<Request<Full<Bytes>>, BoxError> {
    let body = serde_json::json!({
        "model": "anteroom-sim",
        "stream": true,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say something."}],
    });
    Ok(Request::post(url)
        .header("content-type", "application/json")
        .header("x-priority", priority)
        .body(Full::new(Bytes::from(body.to_string())))?)
}

/// Send a streamed request and read it to its end.
async fn stream_all(
    client: &DemoClient,
    url: &str,
    priority: i32,
    max_tokens: usize,
) -> Result<(), BoxError> {
    let req = stream_request(url, priority, max_tokens)?;
    client.request(req).await?.into_body().collect().await?;
    Ok(())
}

/// Send a streamed request and return the time to its first data.
async fn first_token(
    client: &DemoClient,
    url: &str,
    priority: i32,
    max_tokens: usize,
) -> Result<Duration, BoxError> {
    let req = stream_request(url, priority, max_tokens)?;
    let start = Instant::now();
    let resp = client.request(req).await?;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if frame?.data_ref().is_some_and(|d| !d.is_empty()) {
            return Ok(start.elapsed());
        }
    }
    Err("the stream ended without data".into())
}

async fn send(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: String,
    priority: i32,
    delay: Duration,
) -> Result<Outcome, BoxError> {
    tokio::time::sleep(delay).await;
    let body = serde_json::json!({
        "model": "anteroom-sim",
        "stream": true,
        "messages": [{"role": "user", "content": "Say something."}],
    });
    let req = Request::post(url)
        .header("content-type", "application/json")
        .header("x-priority", priority)
        .body(Full::new(Bytes::from(body.to_string())))?;
    let start = Instant::now();
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let queue_ms = header(crate::telemetry::QUEUE_MS_HEADER.as_str());
    let retry_after_ms = header("retry-after-ms");
    resp.into_body().collect().await?;
    Ok(Outcome {
        priority,
        status,
        queue_ms,
        total: start.elapsed(),
        retry_after_ms,
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:>8} {:>5} {:>4} {:>5} {:>15} {:>15} {:>15} {:>16}",
        "priority",
        "sent",
        "ok",
        "429",
        "queue p50 ms",
        "queue max ms",
        "total p50 ms",
        "retry-after ms"
    );
    let mut priorities: Vec<i32> = outcomes.iter().map(|o| o.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    for p in priorities {
        let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.priority == p).collect();
        let ok = of.iter().filter(|o| o.status == 200).count();
        let rejected = of.iter().filter(|o| o.status == 429).count();
        let mut queue: Vec<u64> = of.iter().filter_map(|o| o.queue_ms).collect();
        queue.sort_unstable();
        let mut total: Vec<u64> = of
            .iter()
            .filter(|o| o.status == 200)
            .map(|o| o.total.as_millis() as u64)
            .collect();
        total.sort_unstable();
        let mut retry: Vec<u64> = of.iter().filter_map(|o| o.retry_after_ms).collect();
        retry.sort_unstable();
        let retry = if retry.is_empty() {
            "-".to_string()
        } else {
            format!("{}..{}", retry[0], retry[retry.len() - 1])
        };
        println!(
            "{:>8} {:>5} {:>4} {:>5} {:>15} {:>15} {:>15} {:>16}",
            p,
            of.len(),
            ok,
            rejected,
            percentile(&queue, 0.5),
            queue.last().copied().unwrap_or(0),
            percentile(&total, 0.5),
            retry
        );
    }
}
