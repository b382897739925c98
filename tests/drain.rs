//! Graceful shutdown: SIGTERM in the middle of 50 streams. Every client gets
//! a complete stream or a clear error, every request is in the log, and the
//! process exits 0 by the drain deadline.

use crate::support;

use std::time::Duration;

use tokio::time::Instant;

use anteroom::sim::{Mode, SimConfig};
use anteroom::telemetry::Record;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

/// How one client's request ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The whole stream, through `data: [DONE]`.
    Complete,
    /// A 503 `shutting_down` before it started.
    Refused,
    /// A stream that ended with a `shutting_down` error event.
    CutWithError,
}

/// Send a streamed chat request of `tokens` tokens; how it ended. Panics on
/// anything unclear: a transport error, a cut stream without an error event,
/// another status.
async fn stream(client: HttpClient, url: String, id: String, tokens: usize) -> Ended {
    let req = Request::post(format!("{url}/v1/chat/completions"))
        .header("x-request-id", &id)
        .body(Full::new(Bytes::from(chat_body(true, tokens))))
        .unwrap();
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{id}: no answer: {e}"));
    let status = resp.status();
    let retry_after = header_u64(&resp, "retry-after");
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{id}: the body was cut: {e}"))
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    match status.as_u16() {
        200 if text.trim_end().ends_with("data: [DONE]") => Ended::Complete,
        200 if text.contains(r#""code":"shutting_down""#) => {
            let last = text.trim_end().rsplit("\n\n").next().unwrap_or_default();
            assert!(
                last.contains("shutting_down"),
                "{id}: error not last: {last}"
            );
            Ended::CutWithError
        }
        503 => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["code"], "shutting_down", "{id}");
            assert!(retry_after.is_some_and(|s| s >= 1), "{id}: no Retry-After");
            Ended::Refused
        }
        s => panic!("{id}: unclear end: {s} {text}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_50_streams_loses_nothing() {
    trace_init();
    // 100 tokens a second: most streams take 0.3 s, every fifth 10 s.
    let sim = sim(SimConfig {
        tokens_per_second: 100.0,
        ..sim_config(Mode::Batch)
    })
    .await;
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("drain-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log_s = log.display().to_string();
    let mut proc = anteroom_process(
        &sim.url(),
        &[
            "--request-log",
            &log_s,
            "--max-concurrency",
            "10",
            "--drain-timeout",
            "2s",
        ],
    )
    .await;
    let client = client();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let tokens = if i % 5 == 0 { 1000 } else { 30 };
            tokio::spawn(stream(
                client.clone(),
                proc.url.clone(),
                format!("d{i}"),
                tokens,
            ))
        })
        .collect();
    // Mid-way: ten short ones done, every slot busy, others waiting
    // (among them long ones, which cannot finish in the drain's 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&proc.admin).await;
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        if n("completed") >= 10 && n("running") == 10 && n("waiting") >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "never mid-way: {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let signalled = Instant::now();
    proc.terminate();
    let mut ended = Vec::new();
    for t in tasks {
        ended.push(t.await.unwrap());
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = proc.child.wait().unwrap();
        (status, proc)
    })
    .await
    .unwrap()
    .0;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(took < Duration::from_secs(5), "drained in {took:?}");

    let count = |e: Ended| ended.iter().filter(|x| **x == e).count();
    let (complete, refused, cut) = (
        count(Ended::Complete),
        count(Ended::Refused),
        count(Ended::CutWithError),
    );
    assert_eq!(complete + refused + cut, 50);
    // The short streams running or startable in time finish; the long ones
    // (10 s) that started run past the 2 s deadline and end with the error
    // event; what could not start in time was refused.
    let seen = format!("complete {complete}, refused {refused}, cut {cut}");
    assert!(complete >= 10 && cut >= 1 && refused >= 1, "{seen}");
    for (i, e) in ended.iter().enumerate().step_by(5) {
        assert_ne!(
            *e,
            Ended::Complete,
            "d{i}, 10 s long, cannot finish in 2 s: {seen}"
        );
    }

    // One record per request, with its outcome.
    let lines = std::fs::read_to_string(&log).unwrap();
    let records: Vec<Record> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 50, "{lines}");
    let ids: std::collections::BTreeSet<_> = records.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(ids.len(), 50);
    let truncated = records
        .iter()
        .filter(|r| r.error.as_deref() == Some("shutting_down") && r.status == 200)
        .count();
    assert_eq!(truncated, cut);
    let rejected = records.iter().filter(|r| r.status == 503).count();
    assert_eq!(rejected, refused);
}

/// A non-streamed request still waiting for its answer at the drain
/// deadline gets a 503 `shutting_down` with `Retry-After` (and its record
/// says so), where it used to be cut with its connection and logged 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_running_non_streamed_requests() {
    let sim = sim(SimConfig {
        tokens_per_second: 100.0,
        ..sim_config(Mode::Batch)
    })
    .await;
    let log = log_path("drain-json");
    let log_s = log.display().to_string();
    let mut proc = anteroom_process(
        &sim.url(),
        &[
            "--request-log",
            &log_s,
            "--max-concurrency",
            "10",
            "--drain-timeout",
            "1s",
        ],
    )
    .await;
    let client = client();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (client, url) = (client.clone(), proc.url.clone());
            tokio::spawn(async move {
                // 10 s of generation, not streamed.
                let resp = chat(&client, &url, None, &format!("j{i}"), false, 1000).await;
                let status = resp.status().as_u16();
                let retry_after = header_u64(&resp, "retry-after");
                let body = body_json(resp).await;
                (status, retry_after, body)
            })
        })
        .collect();
    wait_until("all six to run", || sim.stats().in_flight == 6).await;
    let signalled = Instant::now();
    proc.terminate();
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "shutting_down", "{body}");
        assert!(retry_after.is_some_and(|s| s >= 1));
    }
    let status = tokio::task::spawn_blocking(move || proc.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    let records: Vec<Record> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 6);
    for r in &records {
        assert_eq!(
            (r.status, r.error.as_deref()),
            (503, Some("shutting_down")),
            "{r:?}"
        );
        // It ran, and was cut: an error, not a refusal at the door, and
        // its time in the queue is the queue's, not its whole life.
        assert_eq!(r.outcome, anteroom::telemetry::Outcome::Error, "{r:?}");
        let (queue, e2e) = (r.timings.queue_ms.unwrap(), r.timings.e2e_ms.unwrap());
        assert!(queue * 2.0 < e2e, "{r:?}");
        // The backend never answered: no time to its headers.
        assert_eq!(r.timings.upstream_headers_ms, None, "{r:?}");
    }
}
