//! A panic below the edge is a bug, but it never cuts a connection without
//! an answer or leaves a request unrecorded: the edge and telemetry stacked
//! as in the proxy, over services that panic at each point.

use crate::support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use anteroom::edge::EdgeLayer;
use anteroom::telemetry::{Outcome, Record, Recorder, TelemetryLayer};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};

/// A body that hands out `events` and then panics.
struct PanickingBody {
    events: Vec<&'static str>,
}

impl http_body::Body for PanickingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.events.is_empty() {
            panic!("a bug in a body");
        }
        let e = self.events.remove(0);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(e.as_bytes())))))
    }
}

#[derive(Clone, Copy)]
enum Where {
    Call,
    Future,
    SseBody,
    JsonBody,
}

#[derive(Clone)]
struct Buggy(Where);

impl Service<Request<Full<Bytes>>> for Buggy {
    type Response = Response<PanickingBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let at = self.0;
        if let Where::Call = at {
            panic!("a bug in a call");
        }
        Box::pin(async move {
            tokio::task::yield_now().await;
            let (ct, events) = match at {
                Where::Future => panic!("a bug in a future"),
                Where::SseBody => ("text/event-stream", vec!["data: {\"choices\":[]}\n\n"]),
                _ => ("application/json", vec!["{\"id\":"]),
            };
            Ok(Response::builder()
                .header("content-type", ct)
                .body(PanickingBody { events })
                .unwrap())
        })
    }
}

/// One request through edge → telemetry → a service panicking `at`: the
/// response, what the client read of its body (or the body's error), and
/// every record written.
async fn one(at: Where, name: &str) -> (http::response::Parts, Result<Bytes, String>, Vec<Record>) {
    let path = support::log_path(name);
    let recorder = Recorder::new(Some(&path)).unwrap();
    let svc = ServiceBuilder::new()
        .layer(EdgeLayer)
        .layer(TelemetryLayer::new(recorder.clone()))
        .service(Buggy(at));
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("x-request-id", format!("req-{name}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let read = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    recorder.flush().await;
    let records = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (parts, read, records)
}

#[tokio::test]
async fn a_panic_before_the_response_is_a_500_with_the_request_id_and_one_record() {
    for (at, name) in [(Where::Call, "panic-call"), (Where::Future, "panic-future")] {
        let (parts, body, records) = one(at, name).await;
        assert_eq!(parts.status, 500, "{name}");
        assert_eq!(
            parts.headers["x-request-id"],
            format!("req-{name}").as_str()
        );
        let body: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "internal_error", "{name}");
        assert_eq!(body["error"]["type"], "server_error", "{name}");
        // The panic's own words stay in the log.
        assert!(!body.to_string().contains("a bug"), "{body}");
        assert_eq!(records.len(), 1, "{name}");
        assert_eq!(records[0].status, 500);
        assert_eq!(records[0].error.as_deref(), Some("internal_error"));
        assert_eq!(records[0].outcome, Outcome::Error);
    }
}

#[tokio::test]
async fn a_panic_mid_stream_ends_it_with_an_error_event_and_one_record() {
    let (parts, body, records) = one(Where::SseBody, "panic-sse").await;
    assert_eq!(parts.status, 200);
    let body = String::from_utf8(body.unwrap().to_vec()).unwrap();
    assert!(body.starts_with("data: {\"choices\":[]}\n\n"), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "internal_error", "{body}");
    assert!(body.ends_with("\n\n"), "{body:?}");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].error.as_deref(), Some("internal_error"));
    assert_eq!(records[0].outcome, Outcome::Truncated);
}

#[tokio::test]
async fn a_panic_in_a_json_body_fails_the_body_and_leaves_one_record() {
    let (parts, body, records) = one(Where::JsonBody, "panic-json").await;
    assert_eq!(parts.status, 200);
    assert!(body.is_err(), "{body:?}");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].error.as_deref(), Some("internal_error"));
    assert_eq!(records[0].outcome, Outcome::Truncated);
}
