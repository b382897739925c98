//! What passes through: streams byte for byte and as they are written,
//! headers, ids; and what is refused, with which error.

use crate::support;

use std::time::Duration;

use anteroom::sim::Mode;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_the_proxy_is_byte_identical_to_a_direct_one() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |_| {}).await;
    for (stream, include_usage) in [(true, false), (true, true), (false, false)] {
        let body = serde_json::json!({
            "model": "m", "stream": stream, "max_tokens": 12,
            "stream_options": {"include_usage": include_usage},
            "messages": [{"role": "user", "content": "hi"}],
        })
        .to_string();
        let send = |base: String| {
            let client = client.clone();
            let body = body.clone();
            async move {
                let req = Request::post(format!("{base}/v1/chat/completions"))
                    .header("x-request-id", "same-id")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                let ct = resp.headers()["content-type"].clone();
                (ct, body_bytes(resp).await)
            }
        };
        let (direct_ct, direct) = send(sim.url()).await;
        let (proxied_ct, proxied) = send(proxy.url()).await;
        assert_eq!(direct_ct, proxied_ct);
        assert_eq!(direct, proxied, "stream={stream} usage={include_usage}");
        if stream {
            let text = String::from_utf8_lossy(&proxied);
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert_eq!(text.contains("\"usage\""), include_usage);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_event_arrives_before_the_backend_wrote_the_last() {
    trace_init();
    let mut cfg = sim_config(Mode::Serial);
    cfg.tokens_per_second = 20.0;
    let (sim, proxy, client) = setup(cfg, |_| {}).await;
    let mut resp = chat(&client, &proxy.url(), None, "s", true, 20).await;
    assert_eq!(resp.status(), 200);
    let frame = resp.body_mut().frame().await.unwrap().unwrap();
    let data = frame.into_data().unwrap();
    assert!(data.starts_with(b"data: {"), "{data:?}");
    assert!(data.ends_with(b"\n\n"), "one whole event");
    let stats = sim.stats();
    assert_eq!(
        (stats.completed, stats.in_flight),
        (0, 1),
        "the backend is still writing"
    );
    let rest = body_bytes(resp).await;
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(sim.stats().completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_or_generated_and_returned() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |_| {}).await;
    let resp = chat(&client, &proxy.url(), None, "my-id-1", false, 1).await;
    assert_eq!(resp.headers()["x-request-id"], "my-id-1");
    assert!(resp.headers().contains_key("x-anteroom-queue-ms"));
    body_bytes(resp).await;
    let resp = client
        .request(
            Request::post(format!("{}/v1/chat/completions", proxy.url()))
                .body(Full::new(Bytes::from(chat_body(false, 1))))
                .unwrap(),
        )
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 32);
    body_bytes(resp).await;
    assert_eq!(
        sim.stats().order,
        ["my-id-1", generated.as_str()],
        "the upstream got the same ids"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_priority_header_is_a_400() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |_| {}).await;
    for bad in ["high", "1.5", "", "99999999999"] {
        let req = Request::post(format!("{}/v1/chat/completions", proxy.url()))
            .header("x-priority", bad)
            .body(Full::new(Bytes::from(chat_body(false, 1))))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 400, "x-priority: {bad:?}");
        let body = body_json(resp).await;
        assert_eq!(body["error"]["code"], "invalid_priority");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(sim.stats().received, 0);
}

/// A chat request with no messages (curator's start-up probe) would have
/// the backend generate from nothing until its context is full: refused
/// before it takes a slot. Ollama's `/api/chat` with none loads the model
/// and is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_request_with_no_messages_is_a_400() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |_| {}).await;
    for body in [
        r#"{"model":"m","messages":[]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"messages":[ ]}"#,
    ] {
        let req = Request::post(format!("{}/v1/chat/completions", proxy.url()))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let body = body_json(resp).await;
        assert_eq!(body["error"]["code"], "empty_messages");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(sim.stats().received, 0);
    let resp = client
        .request(
            Request::post(format!("{}/v1/chat/completions", proxy.url()))
                .body(Full::new(Bytes::from(chat_body(false, 1))))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    assert_eq!(sim.stats().received, 1);
}

/// `default_max_tokens` bounds a generation that names none (a client's
/// probe, a forgotten limit), `max_tokens_cap` clamps a larger ask; the
/// upstream sees the bounded request and the answer says what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_is_given_a_default_and_a_cap() {
    trace_init();
    let mut cfg = sim_config(Mode::Batch);
    cfg.output_tokens = 40;
    let (_sim, proxy, client) = setup(cfg, |c| {
        c.default_max_tokens = Some(3);
        c.max_tokens_cap = Some(5);
    })
    .await;
    let ask = |body: String| {
        Request::post(format!("{}/v1/chat/completions", proxy.url()))
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let header = |resp: &http::Response<_>, name: &str| {
        resp.headers()
            .get(name)
            .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
    };
    for (body, tokens, asked) in [
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#.to_owned(),
            3,
            Some("none"),
        ),
        (chat_body(false, 50), 5, Some("50")),
        (chat_body(false, 4), 4, None),
    ] {
        let resp = client.request(ask(body.clone())).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "x-anteroom-max-tokens-asked").as_deref(),
            asked,
            "{body}"
        );
        let sent = header(&resp, "x-anteroom-max-tokens");
        assert_eq!(sent.is_some(), asked.is_some(), "{body}");
        let json = body_json(resp).await;
        assert_eq!(json["usage"]["completion_tokens"], tokens, "{body}");
    }
    // Streamed: the same bound.
    let resp = client.request(ask(chat_body(true, 50))).await.unwrap();
    assert_eq!(header(&resp, "x-anteroom-max-tokens").as_deref(), Some("5"));
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    assert_eq!(text.matches("tok").count(), 5, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_a_413_whether_declared_or_streamed() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| c.max_body_bytes = 1000).await;
    let big = format!("{{\"prompt\":\"{}\"}}", "x".repeat(2000));
    let req = Request::post(format!("{}/v1/completions", proxy.url()))
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(body_json(resp).await["error"]["code"], "request_too_large");

    // Chunked, no content-length: found while reading.
    let chunks = big
        .as_bytes()
        .chunks(300)
        .map(Bytes::copy_from_slice)
        .collect();
    let chunked_client: hyper_util::client::legacy::Client<_, Chunked> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = Request::post(format!("{}/v1/completions", proxy.url()))
        .body(Chunked(chunks))
        .unwrap();
    let resp = chunked_client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(sim.stats().received, 0);
}

/// A body of unknown length, sent chunked.
struct Chunked(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_json_body_is_forwarded_at_the_default_priority() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |_| {}).await;
    let req = Request::post(format!("{}/v1/chat/completions", proxy.url()))
        .header("x-request-id", "garbage")
        .body(Full::new(Bytes::from_static(b"this is { not json")))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    // The backend judged it, not the proxy.
    assert_eq!(resp.status(), 400);
    assert_eq!(body_json(resp).await["error"]["code"], "invalid_json");
    assert_eq!(sim.stats().order, ["garbage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502() {
    trace_init();
    // Bind then drop: nothing listens on that port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = proxy(&format!("http://127.0.0.1:{port}"), |_| {}).await;
    let client = client();
    for stream in [false, true] {
        let resp = chat(&client, &proxy.url(), None, "x", stream, 1).await;
        assert_eq!(resp.status(), 502);
        // Come back once its health was checked again, not at once (a
        // client's SDK would otherwise add retries of its own).
        let advised = |resp: &http::Response<_>| {
            let h = |n| {
                resp.headers()
                    .get(n)
                    .and_then(|v: &http::HeaderValue| v.to_str().ok())
                    .map(str::to_owned)
            };
            (h("retry-after"), h("retry-after-ms"))
        };
        assert_eq!(advised(&resp), (Some("5".into()), Some("5000".into())));
        let body = body_json(resp).await;
        assert_eq!(body["error"]["code"], "upstream_unavailable");
        assert_eq!(body["error"]["type"], "upstream_error");
    }
    assert_eq!(
        proxy.scheduler.snapshot().running,
        0,
        "failed requests return their slot"
    );
    let resp = client
        .get(format!("{}/v1/models", proxy.url()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_a_504() {
    trace_init();
    let mut cfg = sim_config(Mode::Batch);
    cfg.ttft = Duration::from_secs(5);
    let (sim, proxy, client) = setup(cfg, |c| c.upstream_timeout = "100ms".into()).await;
    let resp = chat(&client, &proxy.url(), None, "slow", false, 1).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(body_json(resp).await["error"]["code"], "upstream_timeout");
    assert_eq!(proxy.scheduler.snapshot().running, 0);
    wait_until("the backend to see the request dropped", || {
        sim.stats().cancelled == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_reports_health_and_status() {
    trace_init();
    let (_sim, proxy, client) =
        setup(sim_config(Mode::Serial), |c| c.max_concurrency = 1.into()).await;
    let admin = format!("http://{}", proxy.admin_addr);
    let resp = client
        .get(format!("{admin}/healthz").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let busy = chat(&client, &proxy.url(), Some(3), "busy", true, 10_000).await;
    let (c, u) = (client.clone(), proxy.url());
    let waiting = tokio::spawn(async move { chat(&c, &u, Some(7), "w", false, 1).await.status() });
    wait_until("queued", || proxy.scheduler.snapshot().waiting == 1).await;
    let status = body_json(
        client
            .get(format!("{admin}/status").parse().unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status["running"], 1);
    assert_eq!(status["waiting"], 1);
    assert_eq!(status["max_concurrency"], 1);
    assert_eq!(status["running_by_priority"]["3"], 1);
    assert_eq!(status["waiting_by_priority"]["7"], 1);
    drop(busy);
    assert_eq!(waiting.await.unwrap(), 200);
    let resp = client
        .get(format!("{admin}/v1/models").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), no_probes).await;
    for i in 0..10 {
        // Non-streamed (known length), streamed (chunked), and a GET.
        let resp = chat(&client, &proxy.url(), None, &format!("n{i}"), false, 3).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
        let resp = chat(&client, &proxy.url(), None, &format!("s{i}"), true, 3).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
        let resp = client
            .get(format!("{}/v1/models", proxy.url()).parse().unwrap())
            .await
            .unwrap();
        body_bytes(resp).await;
    }
    // Bodiless responses (HEAD) are never read to an end by the server.
    for _ in 0..5 {
        let req = Request::head(format!("{}/v1/models", proxy.url()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        body_bytes(client.request(req).await.unwrap()).await;
    }
    let stats = sim.stats();
    assert_eq!(stats.received, 20);
    assert_eq!(
        stats.connections, 1,
        "one keep-alive connection served every request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_client_is_not_reused() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), no_probes).await;
    let mut resp = chat(&client, &proxy.url(), None, "cut", true, 10_000).await;
    resp.body_mut().frame().await.unwrap().unwrap();
    drop(resp);
    wait_until("the cut stream to reach the backend", || {
        sim.stats().cancelled == 1
    })
    .await;
    // The next request gets a fresh connection and a whole answer.
    let resp = chat(&client, &proxy.url(), None, "next", false, 3).await;
    assert_eq!(resp.status(), 200);
    assert!(body_json(resp).await["choices"][0]["message"]["content"].is_string());
    assert_eq!(sim.stats().connections, 2);
}

/// An upstream that announces keep-alive but closes every connection after
/// its response, as llama.cpp's server does: a pooled connection it closed
/// must never surface as a 502.
async fn closing_upstream() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    closing_upstream_after(Duration::ZERO).await
}

/// Like [`closing_upstream`], but the close comes `delay` after the response
/// (an idle timeout on the upstream's side).
async fn closing_upstream_after(
    delay: Duration,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
                    )
                    .await;
                // Close after the response, keep-alive notwithstanding (at
                // once when there is no delay: even a zero sleep would
                // wait for the next timer tick).
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_after_each_response_never_causes_a_502() {
    trace_init();
    let (url, accepted) = closing_upstream().await;
    let proxy = proxy(&url, no_probes).await;
    let client = client();
    for i in 0..50 {
        let resp = client
            .get(format!("{}/v1/models", proxy.url()).parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(&body_bytes(resp).await[..], b"ok");
        if i % 2 == 0 {
            // Half the time give the close a moment to land in the pool.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 50);
}

#[tokio::test]
async fn idle_connections_the_upstream_closed_are_reaped_without_a_request() {
    let (url, accepted) = closing_upstream_after(Duration::from_millis(100)).await;
    let proxy = proxy(&url, no_probes).await;
    let resp = client()
        .get(format!("{}/v1/models", proxy.url()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(&body_bytes(resp).await[..], b"ok");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Pooled while the upstream still held it open ...
    assert_eq!(proxy.upstream.idle_connections(), 1);
    // ... and dropped by the housekeeping tick once the upstream closed it,
    // with no request coming to find out.
    wait_until("closed idle connection reaped", || {
        proxy.upstream.idle_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_every_connection_gives_no_errors_under_load() {
    let (url, accepted) = closing_upstream().await;
    let proxy = proxy(&url, |c| c.max_concurrency = 16.into()).await;
    let client = client();
    // 1,000 back to back, no pause: each pooled connection is closed by the
    // upstream as (or just after) the next request goes out.
    for i in 0..1000 {
        let req = if i % 2 == 0 {
            http::Request::get(format!("{}/v1/models", proxy.url()))
                .body(http_body_util::Full::default())
                .unwrap()
        } else {
            http::Request::post(format!("{}/v1/chat/completions", proxy.url()))
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap()
        };
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(&body_bytes(resp).await[..], b"ok");
    }
    // 200 at once.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = proxy.url();
        tasks.push(tokio::spawn(async move {
            let resp = chat(&support::client(), &url, None, &format!("c{i}"), false, 1).await;
            let status = resp.status();
            body_bytes(resp).await;
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1000);
}

async fn no_errors_against(cfg: anteroom::sim::SimConfig) -> anteroom::sim::Stats {
    let (sim, proxy, client) = setup(cfg, |c| c.max_concurrency = 16.into()).await;
    for i in 0..1000 {
        let resp = chat(&client, &proxy.url(), None, &format!("s{i}"), i % 2 == 0, 2).await;
        assert_eq!(resp.status(), 200, "sequential request {i}");
        body_bytes(resp).await;
    }
    let statuses = burst(&proxy.url(), 200, "c", 2).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    sim.stats()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_closing_every_connection_gives_no_errors() {
    let stats = no_errors_against(anteroom::sim::SimConfig {
        close_after_response: true,
        ttft: Duration::ZERO,
        ..sim_config(Mode::Batch)
    })
    .await;
    assert_eq!(stats.completed, 1200);
    assert!(
        stats.connections >= 1000,
        "it closed them: {}",
        stats.connections
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_closing_idle_connections_at_random_gives_no_errors() {
    let stats = no_errors_against(anteroom::sim::SimConfig {
        close_idle_share: 0.3,
        ttft: Duration::ZERO,
        ..sim_config(Mode::Batch)
    })
    .await;
    assert_eq!(stats.completed, 1200);
    assert!(
        stats.connections > 50,
        "it closed some: {}",
        stats.connections
    );
}

/// A vLLM stream that did not ask for its usage: anteroom asks for it and
/// takes the usage event out again, so the client's bytes are exactly a
/// direct answer's, and the record has vLLM's counts, not the events
/// (fewer than its tokens). A client that wrote `stream_options` itself,
/// or `stream_usage = false`, is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_streams_usage_is_asked_for_and_taken_out_again() {
    use anteroom::telemetry::{Record, TokenSource};
    for stream_usage in [true, false] {
        let mut cfg = sim_config(Mode::Vllm);
        cfg.pair_tokens = true;
        let log = log_path("stream-usage");
        let log_s = log.display().to_string();
        let (sim, proxy, client) = setup(cfg, |c| {
            c.backend =
                anteroom::config::backend::Setting::Is(anteroom::config::backend::Kind::Vllm);
            c.request_log = log_s;
            c.stream_usage = stream_usage;
        })
        .await;
        let send = |base: String, id: &'static str, body: &'static str| {
            let client = client.clone();
            async move {
                let req = Request::post(format!("{base}/v1/chat/completions"))
                    .header("x-request-id", id)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                body_bytes(resp).await
            }
        };
        let plain = r#"{"model":"m","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
        let own = r#"{"model":"m","stream":true,"stream_options":{"include_usage":false},"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
        for (id, body) in [("plain", plain), ("own", own)] {
            let direct = send(sim.url(), id, body).await;
            let proxied = send(proxy.url(), id, body).await;
            assert_eq!(
                String::from_utf8_lossy(&proxied),
                String::from_utf8_lossy(&direct),
                "{id}, stream_usage = {stream_usage}"
            );
            assert!(!String::from_utf8_lossy(&proxied).contains("\"usage\""));
        }
        proxy.recorder.flush().await;
        let records: Vec<Record> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let by: std::collections::HashMap<_, _> =
            records.iter().map(|r| (r.request_id.as_str(), r)).collect();
        let asked = stream_usage;
        let plain = by["plain"].timings;
        // Ten tokens in seven events (every third carries two).
        let (tokens, from) = if asked {
            (10, TokenSource::Usage)
        } else {
            (7, TokenSource::Counted)
        };
        assert_eq!(plain.completion_tokens, Some(tokens), "{plain:?}");
        assert_eq!(plain.tokens_from, Some(from));
        assert_eq!(plain.prompt_tokens.is_some(), asked);
        let own = by["own"].timings;
        assert_eq!(own.tokens_from, Some(TokenSource::Counted), "{own:?}");
    }
}
