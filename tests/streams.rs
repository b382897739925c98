//! Streams that stop without ending: the client gets a clean error event in
//! the OpenAI shape, the slot comes back, and the record says so.

use crate::support;

use std::path::PathBuf;
use std::time::Duration;

use anteroom::sim::{Mode, SimConfig};
use anteroom::telemetry::{Outcome, Record};
use http_body_util::BodyExt;
use support::*;

/// Read a whole body; a transport error fails the test (the point is that
/// there is none).
async fn read_all(resp: http::Response<hyper::body::Incoming>) -> String {
    let bytes = resp
        .into_body()
        .collect()
        .await
        .expect("the stream ends cleanly, with an error event")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The last SSE data payload of a stream, as JSON.
fn last_event(body: &str) -> serde_json::Value {
    let data = body
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("an event");
    serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"))
}

async fn only_record(proxy: &anteroom::cli::serve::Running, log: &PathBuf) -> Record {
    proxy.recorder.flush().await;
    let text = std::fs::read_to_string(log).unwrap();
    let recs: Vec<Record> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 1, "{text}");
    recs.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_backend_crash_mid_stream_ends_with_an_error_event() {
    trace_init();
    let log = log_path("crash");
    let log_s = log.display().to_string();
    let cfg = SimConfig {
        die_after_tokens: Some(3),
        ..sim_config(Mode::Batch)
    };
    let (_sim, proxy, client) = setup(cfg, |c| c.request_log = log_s).await;
    let resp = chat(&client, &proxy.url(), None, "crash", true, 10).await;
    assert_eq!(resp.status(), 200);
    let body = read_all(resp).await;
    assert_eq!(body.matches("\"content\"").count(), 3, "{body}");
    let err = last_event(&body);
    assert_eq!(err["error"]["code"], "upstream_stream_error", "{body}");
    assert_eq!(err["error"]["type"], "upstream_error");
    assert!(err["error"]["message"].as_str().unwrap().contains("stream"));
    assert!(err["error"].get("param").is_some());
    wait_until("slot back", || proxy.scheduler.snapshot().running == 0).await;
    let r = only_record(&proxy, &log).await;
    assert_eq!(r.outcome, Outcome::Truncated);
    assert_eq!(r.error.as_deref(), Some("upstream_stream_error"));
    assert_eq!(r.timings.completion_tokens, Some(3));
}

#[tokio::test]
async fn a_stream_that_goes_quiet_is_ended_and_its_slot_freed() {
    let log = log_path("stall");
    let log_s = log.display().to_string();
    let cfg = SimConfig {
        stall_after_tokens: Some(2),
        ..sim_config(Mode::Batch)
    };
    let (sim, proxy, client) = setup(cfg, |c| {
        c.max_concurrency = 1.into();
        c.stream_idle_timeout = "300ms".into();
        c.request_log = log_s;
    })
    .await;
    let resp = chat(&client, &proxy.url(), None, "stall", true, 10).await;
    let body = read_all(resp).await;
    assert_eq!(body.matches("\"content\"").count(), 2, "{body}");
    assert_eq!(last_event(&body)["error"]["code"], "stream_idle_timeout");
    // The upstream connection was dropped, which stops the generation.
    wait_until("the simulator saw the cancel", || {
        sim.stats().cancelled == 1
    })
    .await;
    wait_until("slot back", || proxy.scheduler.snapshot().running == 0).await;
    let r = only_record(&proxy, &log).await;
    assert_eq!(r.outcome, Outcome::Truncated);
    assert_eq!(r.error.as_deref(), Some("stream_idle_timeout"));
}

#[tokio::test]
async fn no_first_token_in_time_is_an_error_event() {
    let cfg = SimConfig {
        ttft: Duration::from_secs(30),
        ..sim_config(Mode::Batch)
    };
    let (_sim, proxy, client) = setup(cfg, |c| c.first_token_timeout = "300ms".into()).await;
    let resp = chat(&client, &proxy.url(), None, "slow", true, 10).await;
    assert_eq!(resp.status(), 200);
    let body = read_all(resp).await;
    assert!(!body.contains("\"content\""), "{body}");
    assert_eq!(last_event(&body)["error"]["code"], "first_token_timeout");
}

#[tokio::test]
async fn a_healthy_stream_is_untouched_by_the_guard() {
    let cfg = SimConfig {
        tokens_per_second: 200.0,
        ..sim_config(Mode::Batch)
    };
    // Idle timeout well above the 5 ms token gap, below the whole stream.
    let (_sim, proxy, client) = setup(cfg, |c| {
        c.stream_idle_timeout = "100ms".into();
        c.first_token_timeout = "100ms".into();
    })
    .await;
    let resp = chat(&client, &proxy.url(), None, "fine", true, 40).await;
    let body = read_all(resp).await;
    assert_eq!(body.matches("\"content\"").count(), 40);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(!body.contains("\"error\""));
}

#[tokio::test]
async fn a_stream_of_any_case_is_guarded() {
    // `Text/Event-Stream` (media types are case-insensitive) that never
    // sends a token: it used to skip the guard and hang; now it ends with
    // the first-token timeout's event.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(anteroom::server::serve_fn(
        listener,
        |req: http::Request<hyper::body::Incoming>| async move {
            let _ = req.into_body().collect().await;
            let silent = Silent;
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("content-type", "Text/Event-Stream; charset=utf-8")
                    .body(silent.boxed_unsync())
                    .unwrap(),
            )
        },
    ));
    let proxy = proxy(&url, |c| {
        c.first_token_timeout = "300ms".into();
        no_probes(c);
    })
    .await;
    let resp = chat(&client(), &proxy.url(), None, "cased", true, 10).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), read_all(resp))
        .await
        .expect("the guard ends a silent stream");
    assert_eq!(last_event(&body)["error"]["code"], "first_token_timeout");
}

/// A body that never sends a byte.
struct Silent;

impl http_body::Body for Silent {
    type Data = bytes::Bytes;
    type Error = anteroom::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}
