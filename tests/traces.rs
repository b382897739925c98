//! OpenTelemetry traces: a collector in the test (OTLP/HTTP, decoded with
//! `opentelemetry-proto`, the real wire format) receives each request's
//! spans; the simulator shows the `traceparent` the upstream got.

use crate::support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anteroom::config::TracesEntry;
use anteroom::sim::Mode;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use support::*;

/// What the test collector does with an export.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// 200, and keep the spans.
    Accept,
    /// Never answer.
    Hang,
}

/// An OTLP/HTTP collector on loopback.
struct Collector {
    url: String,
    spans: Arc<parking_lot::Mutex<Vec<Span>>>,
    resources: Arc<parking_lot::Mutex<Vec<HashMap<String, String>>>>,
    posts: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn collector(answer: Answer) -> Collector {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let resources = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let posts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, r, p) = (spans.clone(), resources.clone(), posts.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (s, r, p) = (s.clone(), r.clone(), p.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (s, r, p) = (s.clone(), r.clone(), p.clone());
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        if answer == Answer::Hang {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        let export = ExportTraceServiceRequest::decode(body).expect("OTLP");
                        for rs in export.resource_spans {
                            let attrs = rs
                                .resource
                                .map(|res| {
                                    res.attributes
                                        .into_iter()
                                        .filter_map(|kv| match kv.value?.value? {
                                            Value::StringValue(v) => Some((kv.key, v)),
                                            _ => None,
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            r.lock().push(attrs);
                            for ss in rs.scope_spans {
                                s.lock().extend(ss.spans);
                            }
                        }
                        let ok = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(ok))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Collector {
        url,
        spans,
        resources,
        posts,
        task,
    }
}

fn traces_to(url: &str, ratio: f64) -> TracesEntry {
    TracesEntry {
        otlp_endpoint: url.to_owned(),
        otlp_protocol: "http/protobuf".into(),
        otlp_headers: Default::default(),
        sampling_ratio: ratio,
        service_name: "anteroom-test".into(),
        resource_attributes: [("deployment.environment.name".into(), "test".into())].into(),
        batch_delay: "20ms".into(),
        max_queued_traces: 2048,
        export_timeout: "2s".into(),
    }
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
    match attr(s, key)? {
        Value::StringValue(v) => Some(v),
        _ => None,
    }
}

fn int(s: &Span, key: &str) -> Option<i64> {
    match attr(s, key)? {
        Value::IntValue(v) => Some(*v),
        _ => None,
    }
}

fn float(s: &Span, key: &str) -> Option<f64> {
    match attr(s, key)? {
        Value::DoubleValue(v) => Some(*v),
        _ => None,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The request span of each `x-request-id`, with its children.
struct Trace {
    root: Span,
    children: Vec<Span>,
}

impl Trace {
    fn of_kind(&self, kind: SpanKind) -> Vec<&Span> {
        let mut v: Vec<&Span> = self
            .children
            .iter()
            .filter(|s| s.kind == kind as i32)
            .collect();
        v.sort_by_key(|s| s.start_time_unix_nano);
        v
    }
}

/// Wait until the collector holds a request span for each of `ids`; their
/// traces.
async fn traces(c: &Collector, ids: &[&str]) -> HashMap<String, Trace> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        {
            let spans = c.spans.lock();
            let roots: HashMap<String, &Span> = spans
                .iter()
                .filter(|s| s.kind == SpanKind::Server as i32)
                .filter_map(|s| Some((text(s, "anteroom.request_id")?.to_owned(), s)))
                .collect();
            if ids.iter().all(|id| roots.contains_key(*id)) {
                return ids
                    .iter()
                    .map(|id| {
                        let root = roots[*id].clone();
                        let children = spans
                            .iter()
                            .filter(|s| s.parent_span_id == root.span_id)
                            .cloned()
                            .collect();
                        (id.to_string(), Trace { root, children })
                    })
                    .collect();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans for {ids:?} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A collector, and a proxy tracing to it at `ratio` in front of the
/// simulator.
async fn traced(
    ratio: f64,
) -> (
    Collector,
    anteroom::sim::SimHandle,
    anteroom::cli::serve::Running,
    HttpClient,
) {
    let col = collector(Answer::Accept).await;
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.traces = Some(traces_to(&col.url, ratio));
    })
    .await;
    (col, sim, proxy, client)
}

/// The `traceparent` the simulator got with each request id.
fn sent(sim: &anteroom::sim::SimHandle) -> HashMap<String, String> {
    sim.stats().traceparents.into_iter().collect()
}

#[tokio::test]
async fn streamed_and_plain_requests_become_spans_with_the_genai_attributes() {
    let (col, sim, proxy, client) = traced(1.0).await;
    let url = proxy.url();
    let resp = chat(&client, &url, Some(3), "s1", true, 5).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let resp = chat(&client, &url, None, "j1", false, 4).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let t = traces(&col, &["s1", "j1"]).await;

    let s = &t["s1"].root;
    assert_eq!(s.name, "chat anteroom-sim");
    assert!(s.parent_span_id.is_empty(), "a trace of its own");
    assert_eq!(text(s, "gen_ai.operation.name"), Some("chat"));
    assert_eq!(text(s, "gen_ai.request.model"), Some("anteroom-sim"));
    assert_eq!(int(s, "gen_ai.request.max_tokens"), Some(5));
    assert_eq!(int(s, "gen_ai.usage.output_tokens"), Some(5));
    let ttft = float(s, "gen_ai.server.time_to_first_token").expect("a stream's ttft");
    assert!(ttft > 0.0 && ttft < 10.0, "seconds: {ttft}");
    assert!(float(s, "gen_ai.server.time_per_output_token").is_some());
    assert_eq!(int(s, "http.response.status_code"), Some(200));
    assert_eq!(text(s, "http.request.method"), Some("POST"));
    assert_eq!(text(s, "url.path"), Some("/v1/chat/completions"));
    assert_eq!(int(s, "anteroom.priority"), Some(3));
    assert_eq!(text(s, "anteroom.upstream"), Some("upstream"));
    assert_eq!(text(s, "anteroom.outcome"), Some("ok"));
    assert_eq!(attr(s, "anteroom.stream"), Some(&Value::BoolValue(true)));
    assert_eq!(int(s, "anteroom.upstream_retries"), Some(0));
    assert_eq!(int(s, "anteroom.preemptions"), Some(0));
    assert!(float(s, "anteroom.queue_ms").is_some());
    assert!(s.events.iter().any(|e| e.name == "first_token"
        && e.time_unix_nano > s.start_time_unix_nano
        && e.time_unix_nano <= s.end_time_unix_nano));
    assert_eq!(
        s.status.as_ref().map(|st| st.code),
        Some(StatusCode::Unset as i32)
    );

    // Its queue wait and its one attempt upstream, children in time order;
    // the attempt that answered lasts to the last byte.
    let queue = t["s1"].of_kind(SpanKind::Internal);
    let attempts = t["s1"].of_kind(SpanKind::Client);
    assert_eq!((queue.len(), attempts.len()), (1, 1));
    let (q, a) = (queue[0], attempts[0]);
    assert_eq!(q.name, "queue");
    assert_eq!(q.trace_id, s.trace_id);
    assert_eq!(q.start_time_unix_nano, s.start_time_unix_nano);
    assert!(q.end_time_unix_nano <= a.start_time_unix_nano);
    assert_eq!(a.end_time_unix_nano, s.end_time_unix_nano);
    assert_eq!(int(a, "http.response.status_code"), Some(200));
    assert_eq!(int(a, "anteroom.attempt"), Some(1));

    // The upstream was handed the attempt's span as its parent.
    let sent = sent(&sim);
    assert_eq!(
        sent["s1"].as_str(),
        format!("00-{}-{}-01", hex(&s.trace_id), hex(&a.span_id))
    );

    // A plain answer: its tokens, and no time to first token (its first
    // byte came with the whole answer): absent, never made up.
    let j = &t["j1"].root;
    assert_eq!(int(j, "gen_ai.usage.output_tokens"), Some(4));
    assert!(int(j, "gen_ai.usage.input_tokens").is_some_and(|n| n > 0));
    assert_eq!(attr(j, "gen_ai.server.time_to_first_token"), None);
    assert_eq!(attr(j, "anteroom.stream"), Some(&Value::BoolValue(false)));
    assert_ne!(j.trace_id, s.trace_id, "one trace per request");

    let res = col.resources.lock().clone();
    assert!(res.iter().all(
        |r| r.get("service.name").map(String::as_str) == Some("anteroom-test")
            && r.get("deployment.environment.name").map(String::as_str) == Some("test")
    ));
    let text = metrics_text(&proxy).await;
    assert!(
        !text.contains("anteroom_trace_spans_exported_total 0"),
        "exports counted: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_cancelled_requests_leave_spans_of_their_wait() {
    let col = collector(Answer::Accept).await;
    let (_sim, proxy, client, busy) = one_slot_busy(|c| {
        c.max_queue = 1;
        c.queue_timeout = "60s".into();
        c.traces = Some(traces_to(&col.url, 1.0));
    })
    .await;
    let url = proxy.url();
    let (c1, u1) = (client.clone(), url.clone());
    let gone = tokio::spawn(async move { chat(&c1, &u1, None, "gone", false, 1).await });
    wait_until("queued", || proxy.scheduler.snapshot().waiting == 1).await;
    let refused = chat(&client, &url, None, "refused", false, 1).await;
    assert_eq!(refused.status(), 429);
    body_bytes(refused).await;
    gone.abort();
    wait_until("left", || proxy.scheduler.snapshot().waiting == 0).await;
    drop(busy);
    let t = traces(&col, &["refused", "gone", "busy"]).await;

    let r = &t["refused"];
    assert_eq!(int(&r.root, "http.response.status_code"), Some(429));
    assert_eq!(text(&r.root, "anteroom.outcome"), Some("rejected"));
    assert_eq!(text(&r.root, "error.type"), Some("queue_full"));
    assert!(r.of_kind(SpanKind::Client).is_empty(), "never sent");
    let q = r.of_kind(SpanKind::Internal);
    assert_eq!(q.len(), 1);
    assert_eq!(text(q[0], "anteroom.outcome"), Some("rejected"));
    assert_eq!(q[0].end_time_unix_nano, r.root.end_time_unix_nano);

    let g = &t["gone"];
    assert_eq!(int(&g.root, "http.response.status_code"), Some(499));
    assert_eq!(text(&g.root, "anteroom.outcome"), Some("cancelled"));
    assert!(g.of_kind(SpanKind::Client).is_empty());
    let q = g.of_kind(SpanKind::Internal);
    assert_eq!(q.len(), 1);
    assert_eq!(text(q[0], "anteroom.outcome"), Some("cancelled"));
    assert!(float(&g.root, "anteroom.queue_ms").is_some_and(|ms| ms > 0.0));

    // The stream cut by its client: one attempt, ended with the request.
    let b = &t["busy"];
    assert_eq!(text(&b.root, "anteroom.outcome"), Some("cancelled"));
    let a = b.of_kind(SpanKind::Client);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].end_time_unix_nano, b.root.end_time_unix_nano);
}

#[tokio::test]
async fn a_clients_trace_is_continued_and_the_backend_nests_under_anteroom() {
    let (col, sim, proxy, client) = traced(0.0).await;
    let url = proxy.url();
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let tp = format!("00-{client_trace}-{client_span}-01");
    let headers = [
        ("traceparent", tp.as_str()),
        ("tracestate", "rojo=00f067aa0ba902b7"),
    ];
    let resp = chat_with(&client, &url, &headers, "continued", true, 3).await;
    body_bytes(resp).await;
    // Sampled by the client though the ratio is 0: its decision holds.
    let t = traces(&col, &["continued"]).await;
    let root = &t["continued"].root;
    assert_eq!(hex(&root.trace_id), client_trace);
    assert_eq!(hex(&root.parent_span_id), client_span);
    assert_eq!(root.trace_state, "rojo=00f067aa0ba902b7");
    assert_ne!(root.flags & 0x200, 0, "the parent is remote");
    let attempt = t["continued"].of_kind(SpanKind::Client)[0].clone();
    assert_eq!(attempt.trace_id, root.trace_id);

    // A client's unsampled trace: no spans, and its header goes on as it
    // came. A request with no trace at ratio 0: not sampled, and the
    // backend is told so under a trace id of anteroom's.
    let unsampled = format!("00-{client_trace}-{client_span}-00");
    let resp = chat_with(
        &client,
        &url,
        &[("traceparent", &unsampled)],
        "quiet",
        false,
        1,
    )
    .await;
    body_bytes(resp).await;
    let resp = chat(&client, &url, None, "fresh", false, 1).await;
    body_bytes(resp).await;
    proxy.recorder.flush().await;

    let sent = sent(&sim);
    assert_eq!(
        sent["continued"].as_str(),
        format!("00-{client_trace}-{}-01", hex(&attempt.span_id))
    );
    assert_eq!(sent["quiet"], unsampled);
    let fresh = &sent["fresh"];
    assert!(
        fresh.starts_with("00-") && fresh.ends_with("-00"),
        "{fresh}"
    );
    assert!(!fresh.contains(client_trace));
    let spans = col.spans.lock();
    assert!(
        spans
            .iter()
            .all(|s| text(s, "anteroom.request_id").is_none_or(|id| id == "continued")),
        "only the sampled request was exported"
    );
}

#[tokio::test]
async fn without_traces_the_upstream_gets_the_clients_headers_untouched() {
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |_| {}).await;
    let url = proxy.url();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = chat_with(&client, &url, &[("traceparent", tp)], "theirs", false, 1).await;
    body_bytes(resp).await;
    let resp = chat(&client, &url, None, "none", false, 1).await;
    body_bytes(resp).await;
    let stats = sim.stats();
    assert_eq!(
        stats.traceparents,
        vec![("theirs".to_string(), tp.to_string())]
    );
}

/// A collector that takes exports and never answers: requests are served
/// as ever, and every span it cost is counted (exports time out; past the
/// queue's room, records are dropped at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_collector_costs_requests_nothing_and_its_spans_are_counted() {
    let col = collector(Answer::Hang).await;
    let (_sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        let mut t = traces_to(&col.url, 1.0);
        t.max_queued_traces = 4;
        t.export_timeout = "300ms".into();
        c.traces = Some(t);
    })
    .await;
    let url = proxy.url();
    for i in 0..40 {
        let resp = chat(&client, &url, None, &format!("r{i}"), false, 1).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    let text = loop {
        let text = metrics_text(&proxy).await;
        let dropped = |reason: &str| -> u64 {
            let key = format!("anteroom_trace_spans_dropped_total{{reason=\"{reason}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        // Each request is three spans (itself, its wait, its attempt).
        if dropped("queue_full") > 0 && dropped("export_failed") > 0 {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(col.posts.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(
        text.contains("anteroom_trace_spans_exported_total 0"),
        "nothing was accepted: {text}"
    );
}

#[test]
fn the_traces_table_is_checked() {
    let parse = |extra: &str| {
        let toml = format!("upstream = \"http://127.0.0.1:1\"\n[traces]\n{extra}");
        anteroom::config::FileConfig::parse(&toml).and_then(|f| f.validate())
    };
    let ok =
        parse("otlp_endpoint = \"http://127.0.0.1:4318\"\nsampling_ratio = 0.25").expect("valid");
    let t = ok.traces.expect("on");
    assert_eq!(t.sampling_ratio, 0.25);
    assert_eq!(t.batch_delay, Duration::from_secs(1));
    assert_eq!(t.service_name, "anteroom");
    for (bad, says) in [
        ("otlp_endpoint = \"127.0.0.1:4318\"", "otlp_endpoint"),
        (
            "otlp_endpoint = \"http://h:4318\"\nsampling_ratio = 1.5",
            "sampling_ratio",
        ),
        (
            "otlp_endpoint = \"http://h:4318\"\notlp_protocol = \"grpc\"",
            "grpc",
        ),
        (
            "otlp_endpoint = \"http://h:4318\"\notlp_protocol = \"thrift\"",
            "otlp_protocol",
        ),
        (
            "otlp_endpoint = \"http://h:4318\"\nmax_queued_traces = 0",
            "max_queued_traces",
        ),
        (
            "otlp_endpoint = \"http://h:4318\"\nbatch_delay = \"soon\"",
            "batch_delay",
        ),
        (
            "otlp_endpoint = \"http://h:4318\"\n[traces.otlp_headers]\n\"bad header\" = \"x\"",
            "otlp_headers",
        ),
        ("sampling_ratio = 1.0", "otlp_endpoint"),
    ] {
        let e = parse(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(e.to_string().contains(says), "{bad:?}: {e}");
    }
}
