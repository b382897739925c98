//! Latency capture: the request log's records, the timing headers, the
//! metrics, over real sockets with the simulator (or a canned upstream) as
//! the backend.

use crate::support;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anteroom::sim::{Mode, SimConfig};
use anteroom::telemetry::{Outcome, Record, TokenSource};
use anteroom::BoxError;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::*;

// The exact split of queue wait and model time is in `stack.rs`, on the
// paused clock.

#[tokio::test]
async fn usage_is_read_from_streams_and_json_bodies() {
    let log = log_path("usage");
    let log_s = log.display().to_string();
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| c.request_log = log_s).await;
    let url = proxy.url();
    for (id, body) in [
        (
            "u-stream",
            r#"{"model":"m1","stream":true,"stream_options":{"include_usage":true},"max_tokens":7,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "u-json",
            r#"{"model":"m2","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    ] {
        let req = Request::post(format!("{url}/v1/chat/completions"))
            .header("x-request-id", id)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    let recs = by_id(&records(&proxy, &log).await);
    let s = &recs["u-stream"];
    assert_eq!(s.timings.completion_tokens, Some(7));
    assert_eq!(s.timings.tokens_from, Some(TokenSource::Usage));
    assert!(s.timings.prompt_tokens.is_some());
    assert_eq!(s.timings.events, Some(7 + 1 + 1 + 1)); // tokens, finish, usage, [DONE]
    let j = &recs["u-json"];
    assert!(!j.stream);
    assert_eq!(j.model.as_deref(), Some("m2"));
    assert_eq!(j.timings.completion_tokens, Some(5));
    assert_eq!(j.timings.tokens_from, Some(TokenSource::Usage));
    // Its first byte came with the whole answer: no time to first token,
    // in the record or the metrics, rather than a made-up one.
    assert_eq!(j.timings.ttft_ms, None);
    assert_eq!(j.timings.backend_ttft_ms, None);
    assert!(j.timings.tpot_ms.is_none());
    assert!(j.timings.e2e_ms.unwrap() >= j.timings.queue_ms.unwrap());
    assert!(s.timings.ttft_ms.is_some() && s.timings.backend_ttft_ms.is_some());
}

/// A stream that did not ask for `usage` is counted from the backend's own
/// account where it gives one: llama.cpp's `timings` (`predicted_n`,
/// `prompt_n`), which stays right when llama-server sends two tokens in one
/// chunk. Without it, counting events is the last resort, and short.
#[tokio::test]
async fn token_counts_come_from_the_backend_before_counting_events() {
    for (mode, from, completion) in [
        (Mode::Llama, TokenSource::Timings, 10),
        // Events 0, 1+2, 3, 4+5, 6, 7+8, 9: seven for ten tokens.
        (Mode::Batch, TokenSource::Counted, 7),
    ] {
        let log = log_path("timings-counts");
        let log_s = log.display().to_string();
        let mut cfg = sim_config(mode);
        cfg.pair_tokens = true;
        let (_sim, proxy, client) = setup(cfg, |c| c.request_log = log_s).await;
        let resp = chat(&client, &proxy.url(), None, "pairs", true, 10).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
        let recs = by_id(&records(&proxy, &log).await);
        let t = recs["pairs"].timings;
        assert_eq!(t.tokens_from, Some(from), "{mode:?}");
        assert_eq!(t.completion_tokens, Some(completion), "{mode:?}");
        assert_eq!(t.prompt_tokens.is_some(), mode == Mode::Llama, "{mode:?}");
    }
}

/// A body of canned frames, optionally failing at the end. The failure
/// comes a little after the frames, as when a backend crashes mid-stream
/// (failing at once would abort the connection before the headers left).
struct Canned(
    VecDeque<Result<Bytes, &'static str>>,
    Pin<Box<tokio::time::Sleep>>,
);

impl Canned {
    fn new(frames: VecDeque<Result<Bytes, &'static str>>) -> Self {
        Self(
            frames,
            Box::pin(tokio::time::sleep(Duration::from_millis(50))),
        )
    }
}

impl HttpBody for Canned {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if matches!(self.0.front(), Some(Err(_))) {
            std::task::ready!(self.1.as_mut().poll(cx));
        }
        Poll::Ready(
            self.0
                .pop_front()
                .map(|r| r.map(Frame::data).map_err(Into::into)),
        )
    }
}

const TOOL_STREAM: &[&str] = &[
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n",
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\"\"}}]}}]}\n",
    "\ndata: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":\\\"Paris\\\"}\"}}]}}]}\n\n",
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n",
];

const CUT_STREAM: &[&str] = &[
    "data: {\"choices\":[{\"delta\":{\"content\":\"one\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"two\"}}]}\n\ndata: {\"choices\":[{\"del",
];

/// An upstream that answers `x-case: tools | cut` with canned SSE.
async fn canned_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(anteroom::server::serve_fn(
        listener,
        |req: Request<Incoming>| async move {
            let case = req.headers()["x-case"].to_str().unwrap().to_owned();
            let frames: VecDeque<Result<Bytes, &'static str>> = match case.as_str() {
                "tools" => TOOL_STREAM.iter().map(|s| Ok(Bytes::from(*s))).collect(),
                _ => CUT_STREAM
                    .iter()
                    .map(|s| Ok(Bytes::from(*s)))
                    .chain([Err("backend crashed")])
                    .collect(),
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Canned::new(frames).boxed_unsync())
                    .unwrap(),
            )
        },
    ));
    url
}

async fn case(client: &HttpClient, url: &str, case: &str) -> (Vec<u8>, bool) {
    let req = Request::post(format!("{url}/v1/chat/completions"))
        .header("x-case", case)
        .header("x-request-id", case)
        .body(Full::new(Bytes::from(
            r#"{"model":"tool-model","stream":true}"#,
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    (got, failed)
}

#[tokio::test]
async fn tool_call_and_cut_streams_pass_unchanged_and_are_recorded() {
    trace_init();
    let upstream = canned_upstream().await;
    let log = log_path("canned");
    let log_s = log.display().to_string();
    let proxy = proxy(&upstream, |c| c.request_log = log_s).await;
    let client = client();

    let (tools, failed) = case(&client, &proxy.url(), "tools").await;
    assert!(!failed);
    assert_eq!(tools, TOOL_STREAM.concat().as_bytes());
    let (cut, failed) = case(&client, &proxy.url(), "cut").await;
    assert!(!failed, "the stream ends with an error event, not a reset");
    // Every byte the backend sent, unchanged, then anteroom's error event.
    let sent = CUT_STREAM.concat();
    assert!(cut.starts_with(sent.as_bytes()));
    let tail = std::str::from_utf8(&cut[sent.len()..]).unwrap();
    assert!(tail.starts_with("\n\ndata: {\"error\":"), "{tail}");
    assert!(
        tail.contains("\"code\":\"upstream_stream_error\""),
        "{tail}"
    );

    let recs = by_id(&records(&proxy, &log).await);
    let t = &recs["tools"];
    assert_eq!(t.outcome, Outcome::Ok);
    assert_eq!(t.model.as_deref(), Some("tool-model"));
    assert_eq!(
        t.timings.completion_tokens,
        Some(3),
        "three tool-call deltas"
    );
    assert_eq!(t.timings.tokens_from, Some(TokenSource::Counted));
    assert_eq!(t.timings.events, Some(5));
    assert!(!t.timings.malformed);
    let c = &recs["cut"];
    assert_eq!(c.outcome, Outcome::Truncated);
    assert_eq!(c.error.as_deref(), Some("upstream_stream_error"));
    assert_eq!(c.timings.completion_tokens, Some(2));
    assert!(
        c.timings.malformed,
        "a stream that stops mid-line is marked"
    );
}

#[tokio::test]
async fn every_request_leaves_exactly_one_record_under_200_concurrent() {
    let log = log_path("count");
    let log_s = log.display().to_string();
    let cfg = SimConfig {
        ttft: Duration::from_millis(5),
        ..sim_config(Mode::Batch)
    };
    let (_sim, proxy, _) = setup(cfg, |c| {
        c.max_concurrency = 2.into();
        c.max_queue = 40;
        c.request_log = log_s;
    })
    .await;
    let url = proxy.url();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // Each on its own connection, so all 200 arrive together.
            let client = client();
            let id = format!("req-{i}");
            let resp = match i % 10 {
                // A bad priority: 400 before admission.
                0 => {
                    let req = Request::post(format!("{url}/v1/chat/completions"))
                        .header("x-request-id", &id)
                        .header("x-priority", "soon")
                        .body(Full::new(Bytes::from(chat_body(false, 2))))
                        .unwrap();
                    client.request(req).await.unwrap()
                }
                // Not admitted: passes through.
                1 => {
                    let req = Request::get(format!("{url}/v1/models"))
                        .header("x-request-id", &id)
                        .body(Full::default())
                        .unwrap();
                    client.request(req).await.unwrap()
                }
                n => chat(&client, &url, Some(n), &id, n % 2 == 0, 3).await,
            };
            let status = resp.status().as_u16();
            body_bytes(resp).await;
            (id, status)
        }));
    }
    let mut seen = HashMap::new();
    for t in tasks {
        let (id, status) = t.await.unwrap();
        seen.insert(id, status);
    }
    let recs = records(&proxy, &log).await;
    assert_eq!(recs.len(), 200, "one line per request");
    let recs = by_id(&recs);
    let mut rejected = 0;
    for (id, status) in &seen {
        let r = &recs[id];
        assert_eq!(r.status, *status, "{id}");
        match status {
            200 => {
                assert_eq!(r.outcome, Outcome::Ok, "{id}");
                // One `--upstream`: its name is "upstream".
                assert_eq!(r.upstream.as_deref(), Some("upstream"), "{id}");
                let t = &r.timings;
                if r.priority.is_none() {
                    // Passed through: no queue, no tokens to time; the
                    // upstream's answer is timed.
                    assert_eq!((t.queue_ms, t.ttft_ms), (None, None), "{id}");
                    assert!(t.upstream_headers_ms.is_some(), "{id}");
                } else {
                    assert!(t.queue_ms.is_some(), "{id}");
                    // A time to first token for streams only.
                    assert_eq!(t.ttft_ms.is_some(), r.stream, "{id}: {t:?}");
                }
            }
            429 => {
                rejected += 1;
                assert_eq!(r.outcome, Outcome::Rejected);
                assert_eq!(r.error.as_deref(), Some("queue_full"));
                assert!(r.priority.is_some());
                assert_eq!(r.upstream, None, "{id} was sent nowhere");
            }
            400 => {
                assert_eq!(r.error.as_deref(), Some("invalid_priority"));
                let t = &r.timings;
                assert_eq!(
                    (t.queue_ms, t.ttft_ms, t.upstream_headers_ms),
                    (None, None, None)
                );
            }
            other => panic!("{id}: unexpected status {other}"),
        }
    }
    assert!(rejected > 0, "the queue must have overflowed");
    // The metrics agree with the log.
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains(&format!(
            "anteroom_request_rejections_total{{reason=\"queue_full\"}} {rejected}"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_is_recorded_as_cancelled() {
    let log = log_path("cancel");
    let log_s = log.display().to_string();
    let (_sim, proxy, client, busy) = one_slot_busy(|c| c.request_log = log_s).await;
    // Let the busy stream's first token through before it is dropped.
    let mut busy = busy.into_body();
    busy.frame().await.unwrap().unwrap();
    let queued = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url());
        async move { chat(&client, &url, None, "gone", false, 2).await }
    });
    wait_until("queued", || proxy.scheduler.snapshot().waiting == 1).await;
    queued.abort();
    wait_until("left the queue", || proxy.scheduler.snapshot().waiting == 0).await;
    drop(busy);
    wait_until("slot freed", || proxy.scheduler.snapshot().running == 0).await;
    let recs = by_id(&records(&proxy, &log).await);
    assert_eq!(recs["gone"].status, 499);
    assert_eq!(recs["gone"].outcome, Outcome::Cancelled);
    // It waited its whole life in the queue, and the record says so.
    let gone = recs["gone"].timings;
    assert_eq!(gone.queue_ms, gone.e2e_ms);
    assert!(gone.queue_ms.is_some());
    assert_eq!(recs["busy"].status, 200);
    assert_eq!(recs["busy"].outcome, Outcome::Cancelled);
    assert!(recs["busy"].timings.ttft_ms.is_some());
}

#[tokio::test]
async fn metrics_parse_and_count_requests() {
    let (_sim, proxy) = proxy_after_mixed_priorities().await;
    let text = metrics_text(&proxy).await;
    for want in [
        "anteroom_requests_total{status=\"200\"} 4",
        "anteroom_request_outcomes_total{outcome=\"ok\"} 4",
        "anteroom_generation_tokens_total{priority=\"5\"} 4",
        "anteroom_e2e_request_latency_seconds_count{priority=\"<-20\"} 1",
        // Streamed at -30, not streamed at 100: a time to first token
        // for the stream only.
        "anteroom_time_to_first_token_seconds_count{priority=\"<-20\"} 1",
        "anteroom_time_to_first_token_seconds_count{priority=\">20\"} 0",
        "anteroom_max_concurrency 3",
        "anteroom_num_requests_waiting{priority=\"0\"} 0",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    // A scraper reads all of it, and the parsed numbers are the counts.
    let scrape = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let value = |name: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        value("anteroom_requests_total", ("status", "200")),
        Some(4.0)
    );
    assert_eq!(
        value("anteroom_request_outcomes_total", ("outcome", "ok")),
        Some(4.0)
    );
    let queue = scrape
        .samples
        .iter()
        .find(|s| s.metric == "anteroom_request_queue_time_seconds")
        .expect("the queue time histogram");
    assert!(matches!(queue.value, prometheus_parse::Value::Histogram(_)));
}

/// The checker refuses what a scraper would trip on.
#[test]
fn the_exposition_check_can_fail() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
    assert!(check_exposition(ok).is_ok());
    for bad in [
        "a_total 3\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total three\n",
        "# HELP a_total A.\n# TYPE a_total counter\na_total 1\na_total 2\n",
        "# HELP a_total A.\n# TYPE a_total counter\n{oops} 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
    ] {
        assert!(check_exposition(bad).is_err(), "accepted:\n{bad}");
    }
}

#[tokio::test]
async fn the_report_command_summarises_a_request_log() {
    let log = log_path("report");
    let log_s = log.display().to_string();
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| c.request_log = log_s).await;
    for (i, p) in [0, 0, 0, 7, 7].into_iter().enumerate() {
        let resp = chat(
            &client,
            &proxy.url(),
            Some(p),
            &format!("r{i}"),
            i % 2 == 0,
            3,
        )
        .await;
        body_bytes(resp).await;
    }
    let resp = client
        .request(
            Request::get(format!("{}/v1/models", proxy.url()))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    body_bytes(resp).await;
    proxy.recorder.flush().await;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"truncated\": \n"))
        .unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .args(["report", "--json", "--by", "priority"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lines"], 7);
    assert_eq!(r["malformed_lines"], 1);
    assert_eq!(r["passed_through"], 1);
    assert_eq!(r["all"]["requests"], 5);
    assert_eq!(r["all"]["succeeded"], 5);
    assert_eq!(r["all"]["output_tokens"], 15);
    assert_eq!(r["by"]["0"]["requests"], 3);
    assert_eq!(r["by"]["7"]["requests"], 2);
    // Three of the five were streamed: the others have no time to first
    // token.
    assert_eq!(r["all"]["ttft_ms"]["n"], 3);
    assert!(r["all"]["e2e_ms"]["p50"].as_f64().unwrap() > 0.0);

    let text = std::process::Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .arg("report")
        .arg(&log)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("| all | 5 | 5 | 0 | 0 | 0 | 100.0% |"),
        "{text}"
    );
    assert!(text.contains("| all | backend TTFT | 3 |"), "{text}");
}

#[tokio::test]
async fn after_sigterm_the_log_holds_every_finished_request() {
    let sim = sim(sim_config(Mode::Batch)).await;
    let log = log_path("sigterm");
    let log_s = log.display().to_string();
    let mut proc = anteroom_process(&sim.url(), &["--request-log", &log_s]).await;
    let client = client();
    let url = proc.url.clone();
    const N: usize = 40;
    for i in 0..N {
        let resp = chat(&client, &url, None, &format!("t{i}"), i % 2 == 0, 2).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    proc.terminate();
    let status = proc.child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let lines = std::fs::read_to_string(&log).unwrap();
    let ids: std::collections::BTreeSet<String> = lines
        .lines()
        .map(|l| serde_json::from_str::<Record>(l).unwrap().request_id)
        .collect();
    assert_eq!(lines.lines().count(), N);
    assert_eq!(ids.len(), N);
}

/// Every figure of `anteroom report` equals one computed here from the raw
/// log by other means (a sweep over interval ends for the busy time,
/// nearest-rank percentiles over a sorted copy), on a log with refusals,
/// streamed and non-streamed answers, two priorities and an idle gap
/// between two bursts (so busy time and wall span differ). Two logs side
/// by side give their differences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_agrees_with_an_independent_recomputation() {
    let log = log_path("report-recomputed");
    let log_s = log.display().to_string();
    let mut cfg = sim_config(Mode::Batch);
    cfg.tokens_per_second = 200.0;
    let (_sim, proxy, _client) = setup(cfg, |c| {
        c.request_log = log_s;
        c.max_concurrency = 2.into();
        c.max_queue = 3;
    })
    .await;
    for round in 0..2 {
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let url = proxy.url();
                tokio::spawn(async move {
                    let p = if i % 3 == 0 { 0 } else { 5 };
                    let id = format!("b{round}-{i}");
                    let resp = chat(&client(), &url, Some(p), &id, i % 2 == 0, 4 + i).await;
                    body_bytes(resp).await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    proxy.recorder.flush().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let report = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_anteroom"))
            .arg("report")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r = report(&["--json", "--by", "priority", &log.display().to_string()]);

    // Milliseconds of a `received` stamp (the test runs within a month).
    let ms = |s: &str| -> f64 {
        let n = |a: usize, b: usize| s[a..b].parse::<f64>().unwrap();
        (((n(8, 10) * 24.0 + n(11, 13)) * 60.0 + n(14, 16)) * 60.0 + n(17, 19)) * 1000.0 + n(20, 23)
    };
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64();
    let close = |what: &str, got: &serde_json::Value, want: f64| {
        let got = got.as_f64().unwrap_or_else(|| panic!("{what}: {got}"));
        assert!(
            (got - want).abs() <= 1e-3 * want.abs().max(1.0),
            "{what}: report {got}, recomputed {want}"
        );
    };
    let start = lines.iter().map(|l| ms(l["received"].as_str().unwrap()));
    let end = lines
        .iter()
        .map(|l| ms(l["received"].as_str().unwrap()) + num(l, "e2e_ms").unwrap_or(0.0));
    let span = (end.fold(f64::MIN, f64::max) - start.fold(f64::MAX, f64::min)) / 1000.0;
    close("span", &r["span_seconds"], span);

    let check = |what: &str, group: &serde_json::Value, mine: Vec<&serde_json::Value>| {
        let count = |o: &str| mine.iter().filter(|l| l["outcome"] == o).count() as f64;
        close(
            &format!("{what} requests"),
            &group["requests"],
            mine.len() as f64,
        );
        close(
            &format!("{what} succeeded"),
            &group["succeeded"],
            count("ok"),
        );
        close(
            &format!("{what} rejected"),
            &group["rejected"],
            count("rejected"),
        );
        let ok: Vec<_> = mine.iter().filter(|l| l["outcome"] == "ok").collect();
        let tokens: f64 = ok.iter().filter_map(|l| num(l, "completion_tokens")).sum();
        close(&format!("{what} tokens"), &group["output_tokens"], tokens);
        close(
            &format!("{what} tok/s wall"),
            &group["output_tokens_per_second"],
            tokens / span,
        );
        // Busy time by a sweep: +1 at each start, -1 at each end.
        let mut ends: Vec<(f64, i32)> = Vec::new();
        for l in &mine {
            let (Some(q), Some(e)) = (num(l, "queue_ms"), num(l, "e2e_ms")) else {
                continue;
            };
            if l["outcome"] != "rejected" && e > q {
                let at = ms(l["received"].as_str().unwrap());
                ends.push((at + q, 1));
                ends.push((at + e, -1));
            }
        }
        ends.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        let (mut open, mut since, mut busy) = (0, 0.0, 0.0);
        for (t, d) in ends {
            if open == 0 && d == 1 {
                since = t;
            }
            open += d;
            if open == 0 {
                busy += t - since;
            }
        }
        close(
            &format!("{what} busy"),
            &group["busy_seconds"],
            busy / 1000.0,
        );
        close(
            &format!("{what} tok/s busy"),
            &group["output_tokens_per_busy_second"],
            tokens * 1000.0 / busy,
        );
        // Nearest-rank percentiles and the mean of the succeeded ones.
        for (field, of) in [
            ("ttft_ms", "ttft_ms"),
            ("queue_ms", "queue_ms"),
            ("e2e_ms", "e2e_ms"),
            ("model_ms", "model"),
        ] {
            let mut v: Vec<f64> = ok
                .iter()
                .filter_map(|l| match of {
                    "model" => Some(num(l, "e2e_ms")? - num(l, "queue_ms")?),
                    f => num(l, f),
                })
                .collect();
            v.sort_by(f64::total_cmp);
            let s = &group[field];
            close(&format!("{what} {field} n"), &s["n"], v.len() as f64);
            if v.is_empty() {
                continue;
            }
            let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).max(1) - 1];
            close(
                &format!("{what} {field} mean"),
                &s["mean"],
                v.iter().sum::<f64>() / v.len() as f64,
            );
            for (k, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
                close(&format!("{what} {field} {k}"), &s[k], rank(q));
            }
        }
    };
    let admitted: Vec<_> = lines.iter().filter(|l| !l["priority"].is_null()).collect();
    assert!(
        admitted.iter().any(|l| l["outcome"] == "rejected"),
        "some refused"
    );
    check("all", &r["all"], admitted.clone());
    for p in [0, 5] {
        let mine = admitted
            .iter()
            .copied()
            .filter(|l| l["priority"] == p)
            .collect();
        check(&p.to_string(), &r["by"][p.to_string()], mine);
    }
    // The idle gaps are out of the busy time.
    assert!(r["all"]["busy_seconds"].as_f64().unwrap() < span - 0.3);

    // Side by side: each run, and the second's differences from the first.
    let path = log.display().to_string();
    let both = report(&["--json", &path, &path]);
    assert_eq!(both["runs"][0]["file"], path.as_str());
    assert_eq!(both["runs"][1]["report"]["all"], r["all"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .args(["report", &path, &path])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Runs side by side"), "{text}");
    assert!(text.contains(" +0.0% |"), "{text}");
}

/// `stream_upgrade`: a non-streamed request to a llama.cpp upstream goes as
/// a stream and comes back as the JSON the upstream would have sent (field
/// by field, but for the timings), with a true time to first token, time
/// per output token and the backend's counts in its record. The header
/// turns it off (or on) per request; a stream that breaks is a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streamed_request_can_be_timed_as_a_stream() {
    use anteroom::telemetry::TokenSource;
    let log = log_path("upgrade");
    let log_s = log.display().to_string();
    let mut cfg = sim_config(Mode::Llama);
    cfg.tokens_per_second = 100.0;
    cfg.ttft = Duration::from_millis(80);
    let (sim, proxy, client) = setup(cfg, |c| {
        c.backend =
            anteroom::config::backend::Setting::Is(anteroom::config::backend::Kind::LlamaCpp);
        c.request_log = log_s;
        c.stream_upgrade = true;
    })
    .await;
    let send = |base: String,
                path: &'static str,
                id: &'static str,
                body: &'static str,
                header: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut req = Request::post(format!("{base}{path}")).header("x-request-id", id);
            if let Some(h) = header {
                req = req.header("x-anteroom-stream-upgrade", h);
            }
            let resp = client
                .request(req.body(Full::new(Bytes::from(body))).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
            let mut v: serde_json::Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
            // The timings are the two runs' own.
            v.as_object_mut().unwrap().remove("timings");
            (status, ct, v)
        }
    };
    let chat = r#"{"model":"m","max_tokens":12,"messages":[{"role":"user","content":"hi"}]}"#;
    let text = r#"{"model":"m","max_tokens":12,"stream":false,"prompt":"once upon a time"}"#;
    for (path, id, body) in [
        ("/v1/chat/completions", "up-chat", chat),
        ("/v1/completions", "up-text", text),
    ] {
        let (_, _, direct) = send(sim.url(), path, id, body, None).await;
        let (status, ct, upgraded) = send(proxy.url(), path, id, body, None).await;
        assert_eq!(status, 200);
        assert!(ct.starts_with("application/json"), "{ct}");
        assert_eq!(upgraded, direct, "{path}");
    }
    let (_, _, _) = send(
        proxy.url(),
        "/v1/chat/completions",
        "not-up",
        chat,
        Some("0"),
    )
    .await;
    proxy.recorder.flush().await;
    let recs = by_id(&records(&proxy, &log).await);
    for id in ["up-chat", "up-text"] {
        let r = &recs[id];
        let t = r.timings;
        assert!(r.upgraded && !r.stream, "{r:?}");
        assert_eq!(t.completion_tokens, Some(12), "{id}");
        assert_eq!(t.tokens_from, Some(TokenSource::Usage));
        // The first token came about 80 ms in, long before the answer.
        let (ttft, e2e) = (t.ttft_ms.unwrap(), t.e2e_ms.unwrap());
        assert!(ttft >= 80.0 && ttft < e2e - 50.0, "{t:?}");
        assert!(t.backend_ttft_ms.unwrap() <= ttft);
        assert!(t.tpot_ms.unwrap() >= 5.0, "{t:?}");
    }
    let not = &recs["not-up"];
    assert!(!not.upgraded);
    assert_eq!(not.timings.ttft_ms, None);

    // An [[upstream]] table's own stream_upgrade, the top level's off.
    let log = log_path("upgrade-per-upstream");
    let log_s = log.display().to_string();
    let (_sim2, proxy2, _) = setup(sim_config(Mode::Llama), |c| {
        let mut e = entry("own", sim.url(), anteroom::config::Models::Any, 4);
        e.backend = Some(anteroom::config::backend::Setting::Is(
            anteroom::config::backend::Kind::LlamaCpp,
        ));
        e.stream_upgrade = Some(true);
        c.upstream = anteroom::config::Upstreams::Many(vec![e]);
        c.request_log = log_s;
    })
    .await;
    let (status, _, _) = send(proxy2.url(), "/v1/chat/completions", "own-up", chat, None).await;
    assert_eq!(status, 200);
    let recs = by_id(&records(&proxy2, &log).await);
    assert!(recs["own-up"].upgraded, "{:?}", recs["own-up"]);

    // A stream that breaks off cannot be put together: a 502, never a
    // half answer.
    let mut cfg = sim_config(Mode::Llama);
    cfg.die_after_tokens = Some(3);
    let (_sim, proxy, client) = setup(cfg, |c| {
        c.backend =
            anteroom::config::backend::Setting::Is(anteroom::config::backend::Kind::LlamaCpp);
        c.stream_upgrade = true;
    })
    .await;
    let req = Request::post(format!("{}/v1/chat/completions", proxy.url()))
        .body(Full::new(Bytes::from(chat)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 502);
    let v: serde_json::Value = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert!(v["error"]["message"].as_str().is_some(), "{v}");
}
