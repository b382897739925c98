//! `queue_keepalive`: a queued stream that asks is answered early and kept
//! alive with SSE comments; its record stays the request's own. In process
//! on the paused clock (see `support::in_process`), so every comment's time
//! is exact.

use std::time::Duration;

use anteroom::sim::{Mode, SimConfig};
use anteroom::telemetry::Outcome;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::support::in_process::{in_process, settle, InProcess};
use crate::support::sim_config;

const ASK: &str = "x-anteroom-queue-keepalive";

/// A simulator whose requests take 1.5 s to their first token and 20 ms a
/// token after, one at a time.
fn slow_first_token() -> SimConfig {
    SimConfig {
        ttft: Duration::from_millis(1500),
        tokens_per_second: 50.0,
        ..sim_config(Mode::Serial)
    }
}

/// `p.chat(…)` with `headers` added.
fn chat(
    p: &InProcess,
    id: &str,
    stream: bool,
    tokens: usize,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut req = p.chat(id, None, stream, tokens);
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    req
}

/// Hold the one slot with a stream of `tokens` from a task of its own:
/// 1.5 s + (tokens − 1) × 20 ms.
async fn hold(p: &InProcess, id: &str, tokens: usize) -> tokio::task::JoinHandle<()> {
    let (sender, req) = (p.clone_sender(), p.chat(id, None, true, tokens));
    let task = tokio::spawn(async move {
        sender.send(req).await.into_body().collect().await.unwrap();
    });
    settle().await;
    assert_eq!(p.counts(), (0, 1), "{id} holds the slot");
    task
}

/// Every piece of `resp`'s body, with when it came (ms after `t0`).
async fn pieces(resp: http::Response<Incoming>, t0: Instant) -> Vec<(u128, String)> {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            out.push((
                t0.elapsed().as_millis(),
                String::from_utf8_lossy(d).into_owned(),
            ));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_queued_stream_that_asked_gets_comments_then_its_tokens_and_a_true_record() {
    let p = in_process("keepalive-stream", slow_first_token(), |c| {
        c.max_concurrency = 1.into();
        c.queue_keepalive = "1s".into();
    });
    // A holds the slot for 1.5 s + 99 × 20 ms = 3.48 s.
    let a = hold(&p, "ka-a", 100).await;
    let t0 = Instant::now();
    let b = p.send(chat(&p, "ka-b", true, 5, &[(ASK, "1")])).await;
    // The head comes when B has waited a second, not when it starts.
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(b.status(), 200);
    assert_eq!(b.headers()["content-type"], "text/event-stream");
    assert_eq!(b.headers()[ASK], "1");
    assert_eq!(b.headers()["x-request-id"], "ka-b");
    assert!(
        !b.headers().contains_key("x-anteroom-queue-ms"),
        "the queue time is not known yet"
    );
    let got = pieces(b, t0).await;
    a.await.unwrap();
    // Comments every second while it waits (1, 2, 3 s), and while the
    // model reads its prompt (admitted at 3.48 s, first token at 4.98 s).
    let comments: Vec<_> = got.iter().filter(|(_, s)| s.starts_with(':')).collect();
    assert_eq!(
        comments,
        [
            &(1000, ": queued, waited 1.0 s\n\n".to_owned()),
            &(2000, ": queued, waited 2.0 s\n\n".to_owned()),
            &(3000, ": queued, waited 3.0 s\n\n".to_owned()),
            &(
                4000,
                ": started, waiting for the first token (4.0 s since queued)\n\n".to_owned()
            ),
        ]
    );
    // Then the stream itself, whole and untouched: none after its first byte.
    let rest: String = got
        .iter()
        .skip_while(|(_, s)| s.starts_with(':'))
        .map(|(_, s)| s.as_str())
        .collect();
    assert!(got[4].0 == 4980, "first token at 3.48 + 1.5 s: {got:?}");
    assert!(!rest.contains("\n:"), "{rest}");
    let tokens: String = rest
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(tokens, "tok0 tok1 tok2 tok3 tok4 ");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");

    // The record is the request's: its queue wait, and its first token
    // when the model sent it, not the first comment.
    let recs = p.records().await;
    let (a, b) = (&recs["ka-a"], &recs["ka-b"]);
    assert_eq!((b.status, b.outcome, b.stream), (200, Outcome::Ok, true));
    assert_eq!(b.timings.queue_ms, a.timings.e2e_ms);
    assert_eq!(b.timings.queue_ms, Some(3480.0));
    assert_eq!(b.timings.ttft_ms, Some(4980.0));
    assert_eq!(b.timings.completion_tokens, Some(5));
    assert_eq!(p.recorder.metrics.queue_keepalives.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn only_a_stream_that_asked_and_waited_long_enough_is_answered_early() {
    let p = in_process("keepalive-not", slow_first_token(), |c| {
        c.max_concurrency = 1.into();
        c.queue_keepalive = "5s".into();
    });
    let a = hold(&p, "kn-a", 100).await;
    let (sender, req) = (
        p.clone_sender(),
        chat(&p, "kn-json", false, 2, &[(ASK, "1")]),
    );
    let json = tokio::spawn(async move { sender.send(req).await });
    let (sender, req) = (p.clone_sender(), chat(&p, "kn-quiet", true, 2, &[]));
    let quiet = tokio::spawn(async move { sender.send(req).await });
    let t0 = Instant::now();
    // Started (3.48 s) before its first comment was due (5 s): as usual.
    let b = p.send(chat(&p, "kn-b", true, 2, &[(ASK, "true")])).await;
    assert!(t0.elapsed() >= Duration::from_millis(3480));
    assert_eq!(b.status(), 200);
    assert!(!b.headers().contains_key(ASK));
    assert!(b.headers().contains_key("x-anteroom-queue-ms"));
    let body = b.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"data: "), "{body:?}");
    a.await.unwrap();
    // A JSON answer is never turned into a stream, whatever it asked.
    let json = json.await.unwrap();
    assert_eq!(json.headers()["content-type"], "application/json");
    assert!(!json.headers().contains_key(ASK));
    let quiet = quiet.await.unwrap();
    assert!(!quiet.headers().contains_key(ASK));
    assert_eq!(p.recorder.metrics.queue_keepalives.get(), 0);
    // A header that says neither is refused, and recorded.
    let bad = p
        .send(chat(&p, "kn-bad", true, 2, &[(ASK, "please")]))
        .await;
    assert_eq!(bad.status(), 400);
    let err: serde_json::Value =
        serde_json::from_slice(&bad.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(err["error"]["code"], "invalid_keepalive");
    assert_eq!(p.records().await["kn-bad"].status, 400);
}

#[tokio::test(start_paused = true)]
async fn without_queue_keepalive_the_header_changes_nothing() {
    let p = in_process("keepalive-off", slow_first_token(), |c| {
        c.max_concurrency = 1.into();
    });
    let a = hold(&p, "ko-a", 100).await;
    let b = p.send(chat(&p, "ko-b", true, 2, &[(ASK, "1")])).await;
    assert_eq!(b.status(), 200);
    assert!(!b.headers().contains_key(ASK));
    assert!(b.headers().contains_key("x-anteroom-queue-ms"));
    b.into_body().collect().await.unwrap();
    // Not read at all: no 400 either.
    let odd = p
        .send(chat(&p, "ko-odd", true, 2, &[(ASK, "please")]))
        .await;
    assert_eq!(odd.status(), 200);
    odd.into_body().collect().await.unwrap();
    a.await.unwrap();
}

/// The `error` object of the one `data:` event in `pieces`.
fn error_of(pieces: &[(u128, String)]) -> (u128, serde_json::Value) {
    let (at, event) = pieces
        .iter()
        .find(|(_, s)| s.contains("data: "))
        .unwrap_or_else(|| panic!("an error event: {pieces:?}"));
    let data = event.trim().strip_prefix("data: ").unwrap();
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    (*at, v["error"].clone())
}

#[tokio::test(start_paused = true)]
async fn a_refusal_after_the_head_is_an_error_event_and_the_record_keeps_its_status() {
    let p = in_process("keepalive-refused", slow_first_token(), |c| {
        c.max_concurrency = 1.into();
        c.queue_keepalive = "500ms".into();
        c.queue_timeout = "2s".into();
    });
    let a = hold(&p, "kr-a", 100).await;
    let t0 = Instant::now();
    let (sender, req) = (
        p.clone_sender(),
        chat(
            &p,
            "kr-deadline",
            true,
            2,
            &[(ASK, "1"), ("x-anteroom-deadline-ms", "1200")],
        ),
    );
    let deadline = tokio::spawn(async move { pieces(sender.send(req).await, t0).await });
    let timeout = p.send(chat(&p, "kr-timeout", true, 2, &[(ASK, "1")])).await;
    assert_eq!(timeout.status(), 200);
    assert_eq!(t0.elapsed(), Duration::from_millis(500));
    let got = pieces(timeout, t0).await;
    let (at, error) = error_of(&got);
    assert_eq!(at, 2000, "{got:?}");
    assert_eq!(error["code"], "queue_timeout");
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["status"], 429);
    assert!(error["retry_after_ms"].as_u64().unwrap() >= 1, "{error}");
    assert_eq!(got.last().unwrap().0, 2000, "the event ends it: {got:?}");
    assert_eq!(
        got.iter().filter(|(_, s)| s.starts_with(':')).count(),
        3,
        "comments at 0.5, 1 and 1.5 s; at 2 s the answer came first: {got:?}"
    );
    let got = deadline.await.unwrap();
    let (at, error) = error_of(&got);
    assert_eq!((at, &error["code"]), (1200, &"deadline_exceeded".into()));
    a.await.unwrap();
    let recs = p.records().await;
    for (id, code) in [
        ("kr-timeout", "queue_timeout"),
        ("kr-deadline", "deadline_exceeded"),
    ] {
        assert_eq!(recs[id].status, 429, "{id}");
        assert_eq!(recs[id].error.as_deref(), Some(code), "{id}");
    }
    assert_eq!(p.recorder.metrics.queue_keepalives.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_upstreams_own_refusal_after_the_head_is_an_error_event() {
    let cfg = SimConfig {
        only_model: true,
        ..slow_first_token()
    };
    let p = in_process("keepalive-upstream", cfg, |c| {
        c.max_concurrency = 1.into();
        c.queue_keepalive = "1s".into();
    });
    let a = hold(&p, "ku-a", 100).await;
    let body = serde_json::json!({
        "model": "not-served",
        "stream": true,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let req = Request::post("/v1/chat/completions")
        .header("host", "anteroom")
        .header("x-request-id", "ku-b")
        .header(ASK, "1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let t0 = Instant::now();
    let b = p.send(req).await;
    assert_eq!(b.status(), 200);
    let got = pieces(b, t0).await;
    let (at, error) = error_of(&got);
    assert_eq!(at, 3480, "when it was sent, and refused: {got:?}");
    // The simulator's own object (vLLM's words), and the status it came with.
    assert_eq!(error["code"], 404);
    assert_eq!(error["type"], "NotFoundError");
    assert_eq!(error["status"], 404);
    assert!(error["message"].as_str().unwrap().contains("not-served"));
    a.await.unwrap();
    assert_eq!(p.records().await["ku-b"].status, 404);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_after_the_head_leaves_the_queue() {
    let p = in_process("keepalive-gone", slow_first_token(), |c| {
        c.max_concurrency = 1.into();
        c.queue_keepalive = "1s".into();
    });
    let a = hold(&p, "kg-a", 100).await;
    let b = p.send(chat(&p, "kg-b", true, 2, &[(ASK, "1")])).await;
    let mut body = b.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b": queued"));
    assert_eq!(p.counts(), (1, 1));
    drop(body);
    settle().await;
    assert_eq!(p.counts(), (0, 1), "its place is given up at once");
    a.await.unwrap();
    let rec = &p.records().await["kg-b"];
    assert_eq!(rec.outcome, Outcome::Cancelled);
    assert_eq!(
        rec.timings.ttft_ms, None,
        "no first token: it never started"
    );
}
