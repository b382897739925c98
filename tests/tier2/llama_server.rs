//! anteroom in front of a real llama.cpp `llama-server` (built by
//! `tests/tier2/llama-server.sh` from the llama.cpp tree that the
//! llama-cpp-python source package vendors), with a tiny random-weight
//! model: detection, `"backend"` reading 1 and 4 slots, `"auto"` in front
//! of 1 and 4 slots, the backend's timings in the records, and
//! `stream_upgrade`'s answers against llama-server's own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anteroom::cli::serve::Running;
use anteroom::config::Concurrency;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

/// The llama-server binary and the model, built (or found in the cache) once.
fn artifacts() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        if let (Some(bin), Some(model)) = (
            std::env::var_os("ANTEROOM_LLAMA_SERVER"),
            std::env::var_os("ANTEROOM_LLAMA_MODEL"),
        ) {
            return (bin.into(), model.into());
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tier2/llama-server.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("bash runs the build script");
        assert!(out.status.success(), "tests/tier2/llama-server.sh failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines().map(PathBuf::from);
        (lines.next().unwrap(), lines.next().unwrap())
    })
}

/// A running llama-server, killed when dropped.
struct LlamaServer {
    child: Child,
    url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start llama-server with `slots` slots on a free loopback port and wait
/// (bounded) until it has loaded the model.
async fn llama_server(slots: usize) -> LlamaServer {
    llama_server_with(slots, 512).await
}

/// [`llama_server`] with `ctx` tokens of context per slot.
async fn llama_server_with(slots: usize, ctx: usize) -> LlamaServer {
    let (bin, model) = artifacts();
    let port = free_port();
    let child = Command::new(bin)
        .args(["-m", model.to_str().unwrap()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--parallel", &slots.to_string()])
        .args(["-c", &(ctx * slots).to_string()])
        .args(["--threads", "1", "--metrics", "--no-webui"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server starts");
    let server = LlamaServer {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ok = client()
            .get(format!("{}/health", server.url).parse().unwrap())
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            return server;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "llama-server did not load the model within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A chat request that generates exactly `tokens` tokens (random weights
/// would otherwise stop at a random end of sequence).
fn generation(
    stream: bool,
    tokens: usize,
    id: &str,
    priority: Option<i32>,
) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a story about a proxy."}],
        "max_tokens": tokens,
        "ignore_eos": true,
        "stream": stream,
        "stream_options": {"include_usage": true},
    });
    let mut b = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-request-id", id);
    if let Some(p) = priority {
        b = b.header("x-priority", p);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

async fn send(url: &str, req: Request<Full<Bytes>>) -> (u16, Bytes) {
    let (mut parts, body) = req.into_parts();
    parts.uri = format!("{url}{}", parts.uri).parse().unwrap();
    let resp = client()
        .request(Request::from_parts(parts, body))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, body_bytes(resp).await)
}

/// llama-server's own `requests_deferred` now.
async fn deferred(server: &LlamaServer) -> usize {
    let (_, text) = send(
        &server.url,
        Request::get("/metrics").body(Full::default()).unwrap(),
    )
    .await;
    anteroom::backend::parse::metric(
        std::str::from_utf8(&text).unwrap(),
        "llamacpp:requests_deferred",
    )
    .expect("llama-server started with --metrics reports requests_deferred")
}

async fn backend_status(proxy: &Running) -> serde_json::Value {
    proxy_status(proxy).await["backend"].clone()
}

async fn until_identified(proxy: &Running) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let b = backend_status(proxy).await;
        if b["kind"] == "llama.cpp" {
            return b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not identified: {b:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_mode_reads_one_and_four_slots() {
    for slots in [1, 4] {
        let server = llama_server(slots).await;
        let proxy = proxy(&server.url, |c| c.max_concurrency = Concurrency::Backend).await;
        let b = until_identified(&proxy).await;
        assert_eq!(b["slots"], slots, "{b:#}");
        wait_until("the limit follows the slots", || {
            proxy.scheduler.snapshot().max_concurrency == slots
        })
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let b = loop {
            let b = backend_status(&proxy).await;
            if b["limit"] == "backend" || tokio::time::Instant::now() > deadline {
                break b;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(b["limit"], "backend", "{b:#}");
        assert!(b["error"].is_null(), "{b:#}");
        // Its load is read from its /metrics.
        assert_eq!(b["waiting"], 0, "{b:#}");
        let (status, _) = send(&proxy.url(), generation(false, 4, "one", None)).await;
        assert_eq!(status, 200);
    }
}

/// `n` streams of `tokens` tokens at priority 10 through the proxy, polling
/// llama-server's own queue all the while; the most it held waiting, and
/// the proxy's limits seen.
async fn flood(
    proxy: &Running,
    server: &LlamaServer,
    n: usize,
    tokens: usize,
) -> (usize, Vec<usize>) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = proxy.url();
            tokio::spawn(async move {
                let (status, _) =
                    send(&url, generation(true, tokens, &format!("f{i}"), Some(10))).await;
                assert_eq!(status, 200);
            })
        })
        .collect();
    let mut most = 0;
    let mut limits = Vec::new();
    // Bounded: the flood ends, or two minutes pass.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tasks.iter().any(|t| !t.is_finished()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood did not end"
        );
        most = most.max(deferred(server).await);
        limits.push(proxy.scheduler.snapshot().max_concurrency);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    (most, limits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_the_queue_out_of_llama_server() {
    for slots in [1, 4] {
        let server = llama_server(slots).await;
        let log = log_path(&format!("tier2-auto-{slots}"));
        let log_s = log.display().to_string();
        let proxy = proxy(&server.url, |c| {
            c.max_concurrency = Concurrency::Auto;
            c.request_log = log_s;
        })
        .await;
        until_identified(&proxy).await;
        let (most_deferred, limits) = flood(&proxy, &server, 24, 48).await;
        eprintln!("{slots} slots: limits {limits:?}, most deferred {most_deferred}");
        assert!(
            limits.iter().all(|&l| l <= slots),
            "above the backend's slots: {limits:?}"
        );
        assert!(
            most_deferred <= 1,
            "the queue moved into llama-server: {most_deferred}"
        );
        // The records say the same from the backend's own timings: no
        // request waited inside it for as long as its prefill and a
        // generation of another.
        let recs = records(&proxy, &log).await;
        assert_eq!(recs.len(), 24);
        for r in &recs {
            assert!(r.timings.backend_prompt_ms.is_some(), "{r:?}");
            assert!(r.timings.backend_wait_ms.is_some(), "{r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_timings_are_recorded() {
    // A limit above the one slot: requests wait inside llama-server, and
    // the records show it; plain and streamed answers both.
    let server = llama_server(1).await;
    let log = log_path("tier2-timings");
    let log_s = log.display().to_string();
    let proxy = proxy(&server.url, |c| {
        c.max_concurrency = 4.into();
        c.request_log = log_s;
    })
    .await;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let url = proxy.url();
            tokio::spawn(async move {
                let (status, body) =
                    send(&url, generation(i % 2 == 0, 48, &format!("t{i}"), None)).await;
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let recs = records(&proxy, &log).await;
    assert_eq!(recs.len(), 4);
    let mut waits = Vec::new();
    for r in &recs {
        let t = &r.timings;
        let prompt = t
            .backend_prompt_ms
            .unwrap_or_else(|| panic!("no prefill time: {r:?}"));
        assert!(prompt > 0.0, "{r:?}");
        assert_eq!(t.completion_tokens, Some(48), "{r:?}");
        waits.push(
            t.backend_wait_ms
                .unwrap_or_else(|| panic!("no wait: {r:?}")),
        );
    }
    waits.sort_by(f64::total_cmp);
    // The last of four waited behind the others' generations.
    let e2e_min = recs
        .iter()
        .filter_map(|r| r.timings.e2e_ms)
        .fold(f64::MAX, f64::min);
    assert!(
        waits[3] > 0.5 * e2e_min,
        "waits {waits:?}, shortest e2e {e2e_min}"
    );
}

/// `stream_upgrade` in front of the real llama-server: a non-streamed chat
/// or text completion through anteroom (sent upstream as a stream, timed,
/// put back together) equals llama-server's own non-streamed answer field
/// by field but for `id`, `created` and `timings`, at temperature 0 with a
/// fixed seed; and its record has a time to first token before the end and
/// llama-server's token counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_answer_equals_llama_servers_own() {
    let server = llama_server(1).await;
    let log = log_path("tier2-upgrade");
    let log_s = log.display().to_string();
    let proxy = proxy(&server.url, |c| {
        c.max_concurrency = 1.into();
        c.request_log = log_s;
        c.stream_upgrade = true;
    })
    .await;
    until_identified(&proxy).await;
    // No prompt cache: the second of two runs would otherwise report its
    // prompt as cached (`usage.prompt_tokens_details`).
    let chat = serde_json::json!({
        "model": "tiny", "max_tokens": 24, "ignore_eos": true, "temperature": 0, "seed": 42,
        "cache_prompt": false,
        "messages": [{"role": "user", "content": "Tell me a story about a proxy."}],
    });
    let text = serde_json::json!({
        "model": "tiny", "max_tokens": 24, "ignore_eos": true, "temperature": 0, "seed": 42,
        "cache_prompt": false,
        "stream": false, "prompt": "Once upon a time",
    });
    for (path, id, body) in [
        ("/v1/chat/completions", "u-chat", chat),
        ("/v1/completions", "u-text", text),
    ] {
        let req = |id: &str| {
            Request::post(path)
                .header("content-type", "application/json")
                .header("x-request-id", id)
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        };
        let answer = |bytes: &Bytes| {
            let mut v: serde_json::Value = serde_json::from_slice(bytes)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)));
            for k in ["id", "created", "timings"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        };
        let (status, direct) = send(&server.url, req("direct")).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&direct));
        let (status, upgraded) = send(&proxy.url(), req(id)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&upgraded));
        assert_eq!(answer(&upgraded), answer(&direct), "{path}");
    }
    let recs = records(&proxy, &log).await;
    assert_eq!(recs.len(), 2);
    for r in &recs {
        let t = &r.timings;
        assert!(r.upgraded && !r.stream, "{r:?}");
        assert_eq!(t.completion_tokens, Some(24), "{r:?}");
        let (ttft, e2e) = (t.ttft_ms.unwrap(), t.e2e_ms.unwrap());
        assert!(ttft < e2e, "{r:?}");
        assert!(
            t.tpot_ms.is_some() && t.backend_prompt_ms.is_some(),
            "{r:?}"
        );
    }
}

/// A metric of llama-server's `/metrics`.
async fn server_metric(server: &LlamaServer, name: &str) -> usize {
    let (_, text) = send(
        &server.url,
        Request::get("/metrics").body(Full::default()).unwrap(),
    )
    .await;
    anteroom::backend::parse::metric(std::str::from_utf8(&text).unwrap(), name)
        .unwrap_or_else(|| panic!("no {name}"))
}

/// Preemption in front of the real llama-server, anteroom's limit 1, the
/// server with one slot and with a spare one: an urgent request takes the
/// slot of a running non-streamed generation; llama-server stops that
/// generation when anteroom closes its connection (it generates far fewer
/// tokens than two whole runs: this needs anteroom to read its load less
/// often than once a second, see `LLAMA_LOAD_EVERY`), the urgent one is
/// answered while the other is still to finish, and the preempted one
/// then gets its whole answer, its record saying it was preempted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_generation_stops_in_llama_server_and_runs_again_whole() {
    for slots in [1, 2] {
        preempt_in_front_of(slots).await;
    }
}

async fn preempt_in_front_of(slots: usize) {
    let server = llama_server_with(slots, 4096).await;
    let log = log_path(&format!("tier2-preempt-{slots}"));
    let log_s = log.display().to_string();
    let proxy = proxy(&server.url, |c| {
        c.max_concurrency = 1.into();
        c.preempt = true;
        c.request_log = log_s;
    })
    .await;
    until_identified(&proxy).await;
    const TOKENS: usize = 1200;
    let batch = {
        let url = proxy.url();
        tokio::spawn(async move { send(&url, generation(false, TOKENS, "batch", Some(10))).await })
    };
    wait_until("the batch request runs", || {
        proxy.scheduler.snapshot().running == 1
    })
    .await;
    // Let it generate for a while.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let start = tokio::time::Instant::now();
    let (status, body) = send(&proxy.url(), generation(false, 8, "urgent", Some(0))).await;
    let urgent_took = start.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        !batch.is_finished(),
        "the urgent request did not wait for it"
    );
    let (status, body) = batch.await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], TOKENS, "{answer}");
    let recs = by_id(&records(&proxy, &log).await);
    let b = &recs["batch"].timings;
    assert_eq!(b.preemptions, 1, "{b:?}");
    assert!(b.preempted_ms > 500.0, "{b:?}");
    let predicted = server_metric(&server, "llamacpp:tokens_predicted_total").await;
    eprintln!(
        "{slots} slot(s): urgent answered in {urgent_took:?} (preempted attempt ran {:.0} ms); \
         llama-server predicted {predicted} tokens in all",
        b.preempted_ms
    );
    // Had the stopped attempt run to its end: 2 × 1200 + 8. With a spare
    // slot it runs on beside the others until llama-server looks (a second
    // without any result of its tasks), so only "before its end" is sure.
    let most = if slots == 1 {
        TOKENS + TOKENS / 2
    } else {
        2 * TOKENS
    };
    assert!(
        predicted < most,
        "llama-server kept generating the preempted request: {predicted} tokens"
    );
}
