//! What measuring costs: the SSE observer per event, a whole stream through
//! the Telemetry layer (timing, observing, the record, the metrics), and
//! `anteroom report` on a log of a million lines.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};

use anteroom::report;
use anteroom::telemetry::{Framing, Observer, Recorder, TelemetryLayer};

const EVENTS: usize = 256;

/// A vLLM-like chat stream: a role chunk, `EVENTS` content chunks, a finish
/// chunk, a usage chunk and `[DONE]`, one event per frame.
fn stream() -> Vec<Bytes> {
    let head = r#"{"id":"chatcmpl-9f3c2a1b7d8e4f60a1b2c3d4e5f60718","object":"chat.completion.chunk","created":1764277503,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":"#;
    let mut frames = vec![Bytes::from(format!(
        "data: {head}{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
    ))];
    for i in 0..EVENTS {
        frames.push(Bytes::from(format!(
            "data: {head}{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        )));
    }
    frames.push(Bytes::from(format!(
        "data: {head}{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}]}}\n\n"
    )));
    frames.push(Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-9f3c\",\"object\":\"chat.completion.chunk\",\"created\":1764277503,\"model\":\"m\",\"choices\":[],\"usage\":{{\"prompt_tokens\":812,\"completion_tokens\":{EVENTS},\"total_tokens\":{}}}}}\n\n",
        812 + EVENTS
    )));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

/// The same bytes cut every 100 bytes, so most events straddle frames.
fn split(frames: &[Bytes]) -> Vec<Bytes> {
    let all: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
    all.chunks(100).map(Bytes::copy_from_slice).collect()
}

struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn bench_observer(c: &mut Criterion) {
    let frames = stream();
    let cut = split(&frames);
    let mut group = c.benchmark_group("sse observer");
    group.throughput(Throughput::Elements(frames.len() as u64));
    group.bench_function("one event per frame (per stream of 260 events)", |b| {
        b.iter(|| {
            let mut o = Observer::new(Framing::Sse);
            for f in &frames {
                black_box(o.feed(f));
            }
            o.finish();
            assert_eq!(o.token_events as usize, EVENTS);
            black_box(o.usage)
        })
    });
    group.bench_function("cut every 100 bytes (per stream of 260 events)", |b| {
        b.iter(|| {
            let mut o = Observer::new(Framing::Sse);
            for f in &cut {
                black_box(o.feed(f));
            }
            o.finish();
            assert_eq!(o.token_events as usize, EVENTS);
            black_box(o.usage)
        })
    });
    group.finish();

    // The whole layer: tap, timed body, observer, record, metrics (no log).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let recorder = Recorder::new(None).unwrap();
    let svc = TelemetryLayer::new(recorder).layer(tower::service_fn(move |_req: Request<()>| {
        let body = Frames(frames.clone().into());
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap(),
            )
        }
    }));
    let mut group = c.benchmark_group("telemetry layer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one 260-event stream, end to end", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = svc.clone().oneshot(Request::new(())).await.unwrap();
                let mut body = resp.into_body();
                while let Some(f) = body.frame().await {
                    black_box(f.unwrap());
                }
            })
        })
    });
    group.finish();
}

/// A request log of `n` lines, made once and kept in the target directory.
fn log_of(n: usize) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("request-log-{n}.jsonl"));
    if path.exists() {
        return path;
    }
    let mut out = BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..n {
        let q = (i % 997) as f64 * 1.3;
        let model = ["llama-8b", "qwen-7b"][i % 2];
        let priority = [0, 10, 10, 10][i % 4];
        let line = serde_json::json!({
            "request_id": format!("{i:032x}"),
            "received": format!("2026-11-27T{:02}:{:02}:{:02}.{:03}Z", 10 + i / 3_600_000, i / 60_000 % 60, i / 1000 % 60, i % 1000),
            "method": "POST", "path": "/v1/chat/completions", "model": model,
            "priority": priority, "client": "127.0.0.1", "stream": true,
            "status": if i % 50 == 0 { 429 } else { 200 }, "error": if i % 50 == 0 { Some("queue_full") } else { None },
            "outcome": if i % 50 == 0 { "rejected" } else { "ok" },
            "queue_ms": q, "upstream_headers_ms": 0.4, "ttft_ms": q + 150.0, "backend_ttft_ms": 150.0,
            "e2e_ms": q + 2150.0, "tpot_ms": 20.0, "itl_p50_ms": 20.0, "itl_p90_ms": 21.0, "itl_p99_ms": 25.0,
            "itl_max_ms": 31.0, "prompt_tokens": 812, "completion_tokens": 100, "tokens_from": "usage",
            "events": 103, "malformed": false
        });
        serde_json::to_writer(&mut out, &line).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
    path
}

fn bench_report(c: &mut Criterion) {
    let path = log_of(1_000_000);
    let mut group = c.benchmark_group("report");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(1_000_000));
    group.bench_function("1M-line log, --by priority", |b| {
        b.iter(|| {
            let file = std::fs::File::open(&path).unwrap();
            let r = report::read(
                std::io::BufReader::with_capacity(1 << 20, file),
                Some(report::GroupBy::Priority),
            )
            .unwrap();
            assert_eq!(r.lines, 1_000_000);
            black_box(r)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_observer, bench_report);
criterion_main!(benches);
